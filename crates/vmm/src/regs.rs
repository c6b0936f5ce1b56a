//! A vCPU's state, formatted for a person reading a crash report, including the bytes of the
//! instruction it stopped on (found by walking the guest's own page tables).

use kvm_bindings::{kvm_regs, kvm_sregs};
use std::fmt::Write;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const PAGE_PRESENT: u64 = 1;
const PAGE_HUGE: u64 = 0x80;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Translates a guest virtual address with the guest's 4-level page tables (or returns it
/// unchanged when paging is off).
pub fn translate(mem: &GuestMemoryMmap, sregs: &kvm_sregs, va: u64) -> Option<u64> {
    const CR0_PG: u64 = 1 << 31;
    const EFER_LMA: u64 = 1 << 10;
    if sregs.cr0 & CR0_PG == 0 {
        return Some(va);
    }
    if sregs.efer & EFER_LMA == 0 {
        return None; // 32-bit paging: not needed for crash reports
    }
    let mut table = sregs.cr3 & ADDR_MASK;
    for level in (0..4).rev() {
        let shift = 12 + 9 * level;
        let index = (va >> shift) & 511;
        let entry: u64 = mem.read_obj(GuestAddress(table.checked_add(index * 8)?)).ok()?;
        if entry & PAGE_PRESENT == 0 {
            return None;
        }
        if level > 0 && level < 3 && entry & PAGE_HUGE != 0 {
            let page_mask = (1u64 << shift) - 1;
            return Some((entry & ADDR_MASK & !page_mask) | (va & page_mask));
        }
        table = entry & ADDR_MASK;
    }
    Some(table | (va & 0xfff))
}

/// Formats registers and the code at RIP.
pub fn describe(mem: &GuestMemoryMmap, regs: &kvm_regs, sregs: &kvm_sregs) -> String {
    let mut s = String::new();
    let r = regs;
    let _ = writeln!(s, "  rip {:016x} rsp {:016x} rflags {:08x}", r.rip, r.rsp, r.rflags);
    let _ = writeln!(
        s,
        "  rax {:016x} rbx {:016x} rcx {:016x} rdx {:016x}",
        r.rax, r.rbx, r.rcx, r.rdx
    );
    let _ =
        writeln!(s, "  rsi {:016x} rdi {:016x} rbp {:016x} r8  {:016x}", r.rsi, r.rdi, r.rbp, r.r8);
    let _ =
        writeln!(s, "  r9  {:016x} r10 {:016x} r11 {:016x} r12 {:016x}", r.r9, r.r10, r.r11, r.r12);
    let _ = writeln!(s, "  r13 {:016x} r14 {:016x} r15 {:016x}", r.r13, r.r14, r.r15);
    let sr = sregs;
    let _ = writeln!(
        s,
        "  cs {:04x} (dpl {} l {}) ss {:04x} cr0 {:08x} cr2 {:016x} cr3 {:016x} cr4 {:08x} efer {:x}",
        sr.cs.selector, sr.cs.dpl, sr.cs.l, sr.ss.selector, sr.cr0, sr.cr2, sr.cr3, sr.cr4, sr.efer
    );
    let code = translate(mem, sregs, r.rip).and_then(|pa| {
        let mut bytes = [0u8; 16];
        mem.read_slice(&mut bytes, GuestAddress(pa)).ok().map(|_| bytes)
    });
    match code {
        Some(bytes) => {
            let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
            let _ = write!(s, "  code at rip: {}", hex.join(" "));
        }
        None => {
            let _ = write!(s, "  code at rip: (not mapped)");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_4k_and_2m_pages() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        // PML4 at 0x1000 -> PDPT 0x2000 -> PD 0x3000: entry 0 a 2 MiB page at 4 MiB,
        // entry 1 a page table at 0x4000 whose entry 5 maps 0x5000.
        mem.write_obj(0x2000u64 | 3, GuestAddress(0x1000)).unwrap();
        mem.write_obj(0x3000u64 | 3, GuestAddress(0x2000)).unwrap();
        mem.write_obj(0x40_0000u64 | 0x83, GuestAddress(0x3000)).unwrap();
        mem.write_obj(0x4000u64 | 3, GuestAddress(0x3008)).unwrap();
        mem.write_obj(0x5000u64 | 3, GuestAddress(0x4000 + 5 * 8)).unwrap();
        let sregs = kvm_sregs { cr0: 1 << 31 | 1, efer: 0x500, cr3: 0x1000, ..Default::default() };
        assert_eq!(translate(&mem, &sregs, 0x1234), Some(0x40_1234));
        assert_eq!(translate(&mem, &sregs, 0x20_5abc), Some(0x5abc));
        assert_eq!(translate(&mem, &sregs, 0x20_6000), None);
        assert_eq!(translate(&mem, &sregs, 1 << 39), None);
        mem.write_slice(&[0x0f, 0x0b], GuestAddress(0x40_0010)).unwrap();
        let regs = kvm_regs { rip: 0x10, ..Default::default() };
        let text = describe(&mem, &regs, &sregs);
        assert!(text.contains("code at rip: 0f 0b"), "{text}");
        let flat = kvm_sregs::default();
        assert_eq!(translate(&mem, &flat, 0x1234), Some(0x1234));
    }
}
