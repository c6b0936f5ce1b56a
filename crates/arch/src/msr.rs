//! Model-specific registers set on every x86-64 vCPU before its first run.
//!
//! A freshly created KVM vCPU is close to power-on state, but the Linux 64-bit boot protocol
//! enters the kernel as if firmware had already run: Linux does not program the MTRRs itself,
//! and it expects the fast-strings bit that every BIOS sets. The syscall and sysenter MSRs are
//! zeroed explicitly so no stale value can be inherited (for example across a vCPU reset).

use kvm_bindings::{kvm_msr_entry, Msrs};

/// Time-stamp counter.
pub const MSR_IA32_TSC: u32 = 0x10;
/// Code segment for SYSENTER.
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
/// Stack pointer for SYSENTER.
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
/// Entry point for SYSENTER.
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
/// Miscellaneous processor features.
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// Default memory type and global MTRR enable.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// SYSCALL/SYSRET segment selectors.
pub const MSR_STAR: u32 = 0xc000_0081;
/// 64-bit SYSCALL entry point.
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// Compatibility-mode SYSCALL entry point.
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// RFLAGS bits cleared on SYSCALL (SFMASK).
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// GS base swapped in by SWAPGS.
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// IA32_MISC_ENABLE: fast-strings (enhanced REP MOVS/STOS). Set by all firmware; Linux assumes
/// it and warns on some CPUs if it is clear.
pub const MISC_ENABLE_FAST_STRING: u64 = 1 << 0;
/// IA32_MTRR_DEF_TYPE: MTRRs enabled.
pub const MTRR_ENABLE: u64 = 1 << 11;
/// Memory type write-back, the default type for memory no variable MTRR covers.
pub const MTRR_MEM_TYPE_WB: u64 = 0x6;

/// Why the boot MSR list could not be built.
#[derive(Debug, thiserror::Error)]
pub enum MsrError {
    /// More entries than `KVM_SET_MSRS` accepts in one call.
    #[error("too many MSR entries for one KVM_SET_MSRS call")]
    TooManyEntries,
}

fn entry(index: u32, data: u64) -> kvm_msr_entry {
    kvm_msr_entry { index, data, ..Default::default() }
}

/// The MSRs to set on every vCPU before its first run (Linux boot protocol expectations).
///
/// Each MSR appears once. Without enabled MTRRs the guest would treat all memory as uncached,
/// which makes it boot extremely slowly; write-back default matches what firmware leaves behind
/// (MMIO is kept uncached by the page attributes and by KVM itself).
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    vec![
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
}

/// [`boot_msr_entries`] in the form `KVM_SET_MSRS` takes.
pub fn boot_msrs() -> Result<Msrs, MsrError> {
    Msrs::from_entries(&boot_msr_entries()).map_err(|_| MsrError::TooManyEntries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    const EXPECTED: [(u32, u64); 11] = [
        (0x174, 0),
        (0x175, 0),
        (0x176, 0),
        (0xc000_0081, 0),
        (0xc000_0082, 0),
        (0xc000_0083, 0),
        (0xc000_0084, 0),
        (0xc000_0102, 0),
        (0x10, 0),
        (0x1a0, 1),
        (0x2ff, (1 << 11) | 6),
    ];

    #[test]
    fn entries_have_expected_values() {
        let entries = boot_msr_entries();
        assert_eq!(entries.len(), EXPECTED.len());
        for (index, data) in EXPECTED {
            let found: Vec<_> = entries.iter().filter(|e| e.index == index).collect();
            assert_eq!(found.len(), 1, "MSR {index:#x} present once");
            assert_eq!(found[0].data, data, "MSR {index:#x} value");
            assert_eq!(found[0].reserved, 0, "MSR {index:#x} reserved field");
        }
    }

    #[test]
    fn no_duplicate_indices() {
        let entries = boot_msr_entries();
        let unique: HashSet<u32> = entries.iter().map(|e| e.index).collect();
        assert_eq!(unique.len(), entries.len());
    }

    #[test]
    fn fam_wrapper_matches_entries() {
        let msrs = boot_msrs().unwrap();
        assert_eq!(msrs.as_fam_struct_ref().nmsrs as usize, boot_msr_entries().len());
        assert_eq!(msrs.as_slice(), boot_msr_entries().as_slice());
    }
}
