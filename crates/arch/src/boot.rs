//! The Linux x86-64 boot protocol as seen from the VMM: where guest RAM lies (the e820 map), the
//! zero page (`boot_params`), the PVH start info, the identity page tables and boot GDT, and the
//! register values a vCPU needs to enter a kernel.
//!
//! Everything here writes plain bytes into guest memory or returns plain register values; the
//! caller applies the registers through KVM.

use crate::layout::*;
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
// These conversions are checked at compile time by the asserts next to them.
/// The command line's address as the 32-bit field of the setup header holds it.
#[allow(clippy::cast_possible_truncation)]
const CMDLINE_START_32: u32 = {
    assert!(CMDLINE_START < 1 << 32);
    CMDLINE_START as u32
};
#[allow(clippy::cast_possible_truncation)]
const BOOT_PD_COUNT_USIZE: usize = BOOT_PD_COUNT as usize;
#[allow(clippy::cast_possible_truncation)]
const BOOT_GDT_LIMIT: u16 = {
    assert!(std::mem::size_of::<[u64; 5]>() <= 1 << 16);
    (std::mem::size_of::<[u64; 5]>() - 1) as u16
};
/// Largest number of e820 entries the zero page holds.
const E820_MAX_ENTRIES: usize = 128;

/// Errors while laying out the boot structures.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Guest memory smaller than Vanguard's minimum.
    #[error("guest memory of {size} bytes is too small: at least {min} MiB is needed", min = MIN_MEMORY >> 20)]
    MemoryTooSmall {
        /// The size asked for.
        size: u64,
    },
    /// Guest memory so large that its top would overflow the physical address space.
    #[error("guest memory of {size} bytes is larger than the address space allows")]
    MemoryTooLarge {
        /// The size asked for.
        size: u64,
    },
    /// A write of a boot structure to guest memory failed.
    #[error("cannot write the {what} to guest memory at {addr:#x}")]
    GuestWrite {
        /// Which structure.
        what: &'static str,
        /// Where it was to go.
        addr: u64,
    },
    /// More e820 entries than the protocol allows.
    #[error("too many e820 entries ({0})")]
    TooManyE820Entries(usize),
}

/// One range of the guest-physical memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// First byte.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// `E820_RAM` or `E820_RESERVED`.
    pub kind: u32,
}

/// The guest RAM ranges for a VM with `mem_size` bytes of memory: RAM up to the 32-bit MMIO
/// hole, then the rest above 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Result<Vec<(GuestAddress, u64)>, BootError> {
    if mem_size < MIN_MEMORY {
        return Err(BootError::MemoryTooSmall { size: mem_size });
    }
    let low = mem_size.min(MMIO_HOLE_START);
    let mut ranges = vec![(GuestAddress(0), low)];
    let high = mem_size - low;
    if high > 0 {
        MMIO_HOLE_END
            .checked_add(high)
            .filter(|end| *end <= 1 << 46)
            .ok_or(BootError::MemoryTooLarge { size: mem_size })?;
        ranges.push((GuestAddress(MMIO_HOLE_END), high));
    }
    Ok(ranges)
}

/// The e820 map a guest with `mem_size` bytes of RAM sees: low RAM below the EBDA, the legacy
/// area (where the ACPI tables are) reserved, RAM from 1 MiB to the MMIO hole, RAM above 4 GiB.
pub fn e820_map(mem_size: u64) -> Result<Vec<E820Entry>, BootError> {
    let ranges = ram_ranges(mem_size)?;
    let mut map = vec![
        E820Entry { addr: 0, size: EBDA_START, kind: E820_RAM },
        E820Entry { addr: EBDA_START, size: HIMEM_START - EBDA_START, kind: E820_RESERVED },
    ];
    let low_end = ranges[0].1;
    map.push(E820Entry { addr: HIMEM_START, size: low_end - HIMEM_START, kind: E820_RAM });
    if let Some((start, size)) = ranges.get(1) {
        map.push(E820Entry { addr: start.raw_value(), size: *size, kind: E820_RAM });
    }
    Ok(map)
}

/// Where a kernel asked to be loaded, and what it needs in its zero page.
#[derive(Debug, Clone, Copy, Default)]
pub struct InitrdInfo {
    /// Guest address of the initrd.
    pub addr: u64,
    /// Its size in bytes.
    pub size: u64,
}

/// Fills the zero page for the 64-bit Linux boot protocol and writes it at `ZERO_PAGE_START`.
///
/// `header` is the setup header from a bzImage, if the kernel was one; an ELF kernel gets a
/// default header.
pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    header: Option<setup_header>,
    cmdline_size: usize,
    initrd: Option<InitrdInfo>,
    rsdp: Option<GuestAddress>,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START_32;
    params.hdr.cmdline_size = u32::try_from(cmdline_size).unwrap_or(u32::MAX);
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = u32::try_from(initrd.addr).unwrap_or(0);
        params.hdr.ramdisk_size = u32::try_from(initrd.size).unwrap_or(0);
    }
    if let Some(rsdp) = rsdp {
        params.acpi_rsdp_addr = rsdp.raw_value();
    }
    let map = e820_map(mem_size)?;
    if map.len() > E820_MAX_ENTRIES {
        return Err(BootError::TooManyE820Entries(map.len()));
    }
    for (slot, entry) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry { addr: entry.addr, size: entry.size, r#type: entry.kind };
    }
    params.e820_entries =
        u8::try_from(map.len()).map_err(|_| BootError::TooManyE820Entries(map.len()))?;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(|_| BootError::GuestWrite { what: "zero page", addr: ZERO_PAGE_START })
}

/// Writes the PVH `hvm_start_info` and its memory map at `PVH_INFO_START`; the address goes to
/// the vCPU in EBX.
pub fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    initrd: Option<InitrdInfo>,
    rsdp: Option<GuestAddress>,
) -> Result<GuestAddress, BootError> {
    #[derive(Clone, Copy, Default)]
    #[repr(C)]
    struct StartInfo(hvm_start_info);
    // SAFETY: a plain-old-data C struct with no padding-dependent invariants.
    unsafe impl ByteValued for StartInfo {}
    #[derive(Clone, Copy, Default)]
    #[repr(C)]
    struct MemmapEntry(hvm_memmap_table_entry);
    // SAFETY: a plain-old-data C struct with no padding-dependent invariants.
    unsafe impl ByteValued for MemmapEntry {}
    #[derive(Clone, Copy, Default)]
    #[repr(C)]
    struct ModEntry(linux_loader::loader::elf::start_info::hvm_modlist_entry);
    // SAFETY: a plain-old-data C struct with no padding-dependent invariants.
    unsafe impl ByteValued for ModEntry {}

    let map = e820_map(mem_size)?;
    let info_size = std::mem::size_of::<hvm_start_info>() as u64;
    let memmap_addr = PVH_INFO_START + info_size.next_multiple_of(16);
    let entry_size = std::mem::size_of::<hvm_memmap_table_entry>() as u64;
    let modlist_addr = memmap_addr + entry_size * map.len() as u64;
    for (i, entry) in map.iter().enumerate() {
        let e = MemmapEntry(hvm_memmap_table_entry {
            addr: entry.addr,
            size: entry.size,
            type_: entry.kind,
            reserved: 0,
        });
        let at = memmap_addr + entry_size * i as u64;
        mem.write_obj(e, GuestAddress(at))
            .map_err(|_| BootError::GuestWrite { what: "PVH memory map", addr: at })?;
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: memmap_addr,
        memmap_entries: u32::try_from(map.len())
            .map_err(|_| BootError::TooManyE820Entries(map.len()))?,
        rsdp_paddr: rsdp.map_or(0, |a| a.raw_value()),
        ..Default::default()
    };
    if let Some(initrd) = initrd {
        let module = ModEntry(linux_loader::loader::elf::start_info::hvm_modlist_entry {
            paddr: initrd.addr,
            size: initrd.size,
            ..Default::default()
        });
        mem.write_obj(module, GuestAddress(modlist_addr))
            .map_err(|_| BootError::GuestWrite { what: "PVH module list", addr: modlist_addr })?;
        info.nr_modules = 1;
        info.modlist_paddr = modlist_addr;
    }
    mem.write_obj(StartInfo(info), GuestAddress(PVH_INFO_START))
        .map_err(|_| BootError::GuestWrite { what: "PVH start info", addr: PVH_INFO_START })?;
    Ok(GuestAddress(PVH_INFO_START))
}

/// Page-table entry flags: present, writable, and (for directory entries) a 2 MiB page.
const PTE_PRESENT_RW: u64 = 0x3;
const PDE_HUGE: u64 = 0x80;

/// Writes identity page tables that map the first `BOOT_PD_COUNT` GiB with 2 MiB pages, which
/// covers any kernel image, the zero page and the command line. Returns the value for CR3.
pub fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<u64, BootError> {
    let fail = |addr| BootError::GuestWrite { what: "boot page tables", addr };
    mem.write_obj(PDPTE_START | PTE_PRESENT_RW, GuestAddress(PML4_START))
        .map_err(|_| fail(PML4_START))?;
    let mut pd_bytes = Vec::with_capacity(BOOT_PD_COUNT_USIZE * 4096);
    for gib in 0..BOOT_PD_COUNT {
        let pd = PDE_START + gib * 4096;
        mem.write_obj(pd | PTE_PRESENT_RW, GuestAddress(PDPTE_START + gib * 8))
            .map_err(|_| fail(PDPTE_START))?;
        for i in 0..512u64 {
            let entry = ((gib << 30) + (i << 21)) | PTE_PRESENT_RW | PDE_HUGE;
            pd_bytes.extend_from_slice(&entry.to_le_bytes());
        }
    }
    mem.write_slice(&pd_bytes, GuestAddress(PDE_START)).map_err(|_| fail(PDE_START))?;
    Ok(PML4_START)
}

/// Builds a GDT descriptor from its parts.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

/// The boot GDT. The Linux boot protocol requires `__BOOT_CS` = 0x10 and `__BOOT_DS` = 0x18
/// to be flat segments; 0x08 is a flat 32-bit code segment for the PVH entry.
pub const BOOT_GDT: [u64; 5] = [
    0,                             // null
    gdt_entry(0xc09b, 0, 0xfffff), // 0x08: 32-bit code
    gdt_entry(0xa09b, 0, 0xfffff), // 0x10: 64-bit code (__BOOT_CS)
    gdt_entry(0xc093, 0, 0xfffff), // 0x18: data (__BOOT_DS)
    gdt_entry(0x808b, 0, 0xfffff), // 0x20: TSS
];
const CODE32_SELECTOR: u16 = 0x08;
const CODE64_SELECTOR: u16 = 0x10;
const DATA_SELECTOR: u16 = 0x18;
const TSS_SELECTOR: u16 = 0x20;

/// Unpacks a GDT descriptor into the form KVM takes.
pub fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    // The masks keep both values within 32 bits.
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit_raw = u32::try_from((entry & 0xffff) | ((entry >> 32) & 0xf_0000)).unwrap_or(0);
    let granularity = ((entry >> 55) & 1) as u8;
    // With 4 KiB granularity the limit counts pages: the byte limit fills the low 12 bits.
    let limit = if granularity == 1 { (limit_raw << 12) | 0xfff } else { limit_raw };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granularity,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(present == 0),
    }
}

/// Writes the boot GDT and an empty IDT into guest memory.
pub fn write_boot_gdt(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        let addr = BOOT_GDT_START + 8 * i as u64;
        mem.write_obj(*entry, GuestAddress(addr))
            .map_err(|_| BootError::GuestWrite { what: "boot GDT", addr })?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|_| BootError::GuestWrite { what: "boot IDT", addr: BOOT_IDT_START })
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// 64-bit long mode with paging (bzImage and ELF vmlinux): RSI points at the zero page.
    Linux64,
    /// 32-bit protected mode without paging (PVH): EBX points at the start info.
    Pvh,
}

/// Special registers for the boot vCPU, starting from what KVM reports.
pub fn boot_sregs(mut sregs: kvm_sregs, mode: EntryMode, cr3: u64) -> kvm_sregs {
    let gdt_limit = BOOT_GDT_LIMIT;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = gdt_limit;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    let data = segment_from_gdt(BOOT_GDT[3], DATA_SELECTOR);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(BOOT_GDT[4], TSS_SELECTOR);
    match mode {
        EntryMode::Linux64 => {
            sregs.cs = segment_from_gdt(BOOT_GDT[2], CODE64_SELECTOR);
            sregs.cr3 = cr3;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        EntryMode::Pvh => {
            sregs.cs = segment_from_gdt(BOOT_GDT[1], CODE32_SELECTOR);
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    sregs
}

/// A stack for the first instructions of a kernel (below the zero page).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;

/// General registers for the boot vCPU.
pub fn boot_regs(mode: EntryMode, entry: u64, boot_info: u64) -> kvm_regs {
    let mut regs = kvm_regs { rflags: 0x2, rip: entry, ..Default::default() };
    match mode {
        EntryMode::Linux64 => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = boot_info;
        }
        EntryMode::Pvh => regs.rbx = boot_info,
    }
    regs
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    fn guest_mem(size: u64) -> GuestMemoryMmap {
        let ranges: Vec<_> =
            ram_ranges(size).unwrap().into_iter().map(|(a, s)| (a, s as usize)).collect();
        GuestMemoryMmap::from_ranges(&ranges).unwrap()
    }

    #[test]
    fn ram_below_the_hole_only() {
        let r = ram_ranges(128 << 20).unwrap();
        assert_eq!(r, vec![(GuestAddress(0), 128 << 20)]);
    }

    #[test]
    fn ram_above_the_hole_is_relocated() {
        let r = ram_ranges(4 << 30).unwrap();
        assert_eq!(r, vec![(GuestAddress(0), 3 << 30), (GuestAddress(4 << 30), 1 << 30)]);
        let total: u64 = r.iter().map(|(_, s)| s).sum();
        assert_eq!(total, 4 << 30);
    }

    #[test]
    fn too_small_and_too_large_are_errors() {
        assert!(matches!(ram_ranges(8 << 20), Err(BootError::MemoryTooSmall { .. })));
        assert!(matches!(ram_ranges(u64::MAX), Err(BootError::MemoryTooLarge { .. })));
    }

    #[test]
    fn e820_covers_ram_exactly() {
        for size in [16u64 << 20, 128 << 20, 3 << 30, (3 << 30) + (1 << 20), 64 << 30] {
            let map = e820_map(size).unwrap();
            let ram: u64 = map.iter().filter(|e| e.kind == E820_RAM).map(|e| e.size).sum();
            // The legacy hole between the EBDA and 1 MiB is RAM in the guest's memory, but not
            // usable, so the usable total is the size less that hole.
            assert_eq!(ram, size - (HIMEM_START - EBDA_START), "size {size:#x}");
            for pair in map.windows(2) {
                assert!(pair[0].addr + pair[0].size <= pair[1].addr, "overlap in {map:?}");
            }
            assert!(map
                .iter()
                .all(|e| e.addr + e.size <= MMIO_HOLE_START || e.addr >= MMIO_HOLE_END));
        }
    }

    #[test]
    fn zero_page_fields() {
        let mem = guest_mem(64 << 20);
        let initrd = InitrdInfo { addr: 0x300_0000, size: 0x1234 };
        write_zero_page(&mem, 64 << 20, None, 42, Some(initrd), Some(GuestAddress(ACPI_START)))
            .unwrap();
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.header }, 0x5372_6448);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ p.hdr.cmdline_size }, 42);
        assert_eq!({ p.hdr.ramdisk_image }, 0x300_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x1234);
        assert_eq!({ p.acpi_rsdp_addr }, ACPI_START);
        assert_eq!(p.e820_entries, 3);
        let last = p.e820_table[2];
        assert_eq!(
            ({ last.addr }, { last.size }, { last.r#type }),
            (HIMEM_START, (64 << 20) - HIMEM_START, E820_RAM)
        );
    }

    #[test]
    fn identity_tables_map_low_memory() {
        let mem = guest_mem(64 << 20);
        let cr3 = write_identity_page_tables(&mem).unwrap();
        // Walk the tables for a few addresses the way the MMU does.
        for va in [0u64, 0x20_0000, 0x123_4567, (3 << 30) + 0x1000, 0xfee0_0000] {
            let pml4e: u64 = mem.read_obj(GuestAddress(cr3 + ((va >> 39) & 511) * 8)).unwrap();
            assert_eq!(pml4e & 1, 1);
            let pdpte: u64 =
                mem.read_obj(GuestAddress((pml4e & !0xfff) + ((va >> 30) & 511) * 8)).unwrap();
            assert_eq!(pdpte & 1, 1);
            let pde: u64 =
                mem.read_obj(GuestAddress((pdpte & !0xfff) + ((va >> 21) & 511) * 8)).unwrap();
            assert_eq!(pde & 0x81, 0x81, "2 MiB page present for {va:#x}");
            assert_eq!((pde & !0x1f_ffff & ((1 << 52) - 1)) | (va & 0x1f_ffff), va);
        }
        assert!(mem.last_addr().raw_value() > PDE_START + BOOT_PD_COUNT * 4096);
    }

    #[test]
    fn gdt_segments_decode() {
        let cs = segment_from_gdt(BOOT_GDT[2], CODE64_SELECTOR);
        assert_eq!(
            (cs.l, cs.db, cs.dpl, cs.present, cs.s, cs.type_, cs.g),
            (1, 0, 0, 1, 1, 0xb, 1)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment_from_gdt(BOOT_GDT[3], DATA_SELECTOR);
        assert_eq!((ds.l, ds.db, ds.type_, ds.base), (0, 1, 0x3, 0));
        let tss = segment_from_gdt(BOOT_GDT[4], TSS_SELECTOR);
        assert_eq!((tss.s, tss.type_), (0, 0xb));
        assert_eq!(gdt_entry(0xa09b, 0x1234_5678, 0xfffff) >> 56, 0x12);
    }

    #[test]
    fn sregs_for_each_mode() {
        let s = boot_sregs(kvm_sregs::default(), EntryMode::Linux64, PML4_START);
        assert_eq!(s.cs.selector, 0x10);
        assert_eq!(s.ds.selector, 0x18);
        assert_eq!(s.cr0 & 0x8000_0001, 0x8000_0001);
        assert_eq!(s.efer & 0x500, 0x500);
        assert_eq!(s.cr3, PML4_START);
        let p = boot_sregs(kvm_sregs::default(), EntryMode::Pvh, 0);
        assert_eq!((p.cs.selector, p.cs.db, p.cs.l), (0x08, 1, 0));
        assert_eq!(p.cr0 & 0x8000_0000, 0);
        let r = boot_regs(EntryMode::Pvh, 0x100_0000, PVH_INFO_START);
        assert_eq!((r.rip, r.rbx, r.rflags), (0x100_0000, PVH_INFO_START, 2));
    }

    #[test]
    fn pvh_start_info_lists_the_map() {
        let mem = guest_mem(4 << 30);
        let at = write_pvh_start_info(&mem, 4 << 30, None, Some(GuestAddress(ACPI_START))).unwrap();
        let magic: u32 = mem.read_obj(at).unwrap();
        assert_eq!(magic, XEN_HVM_START_MAGIC_VALUE);
        let entries: u32 = mem.read_obj(at.unchecked_add(48)).unwrap();
        assert_eq!(entries, 4);
    }
}
