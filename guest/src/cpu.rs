//! What CPUID told each vCPU, as recorded by its ring-0 entry (see `entry::CPUID_SAVE` for why
//! not from ring 3).

use crate::entry::{image_end, CPUID_SAVE, PERCPU_SIZE};

/// Identity of a vCPU according to the CPUID table the VMM gave it.
pub struct CpuIdentity {
    /// Initial APIC ID (leaf 0x1 EBX[31:24]).
    pub apic_id: u8,
    /// Logical processors per package (leaf 0x1 EBX[23:16]).
    pub logical_count: u8,
    /// Whether leaf 0x1 ECX has the hypervisor bit.
    pub hypervisor_bit: bool,
    /// x2APIC ID (leaf 0xB EDX), if leaf 0xB describes a level.
    pub x2apic_id: Option<u32>,
    /// Hypervisor signature (leaf 0x40000000).
    pub hypervisor: [u8; 12],
}

/// Reads what vCPU `cpu` recorded.
pub fn identify(cpu: usize) -> CpuIdentity {
    let base = image_end() + PERCPU_SIZE * cpu as u64 + CPUID_SAVE;
    // SAFETY: the per-vCPU area is identity-mapped guest memory written by the ring-0 entry
    // of that vCPU before it reached ring 3.
    let word = |i: u64| unsafe { core::ptr::read_volatile((base + 4 * i) as *const u32) };
    let (ebx1, ecx1, ecx_b, edx_b) = (word(0), word(1), word(2), word(3));
    let mut hypervisor = [0u8; 12];
    for i in 0..3 {
        hypervisor[4 * i..4 * i + 4].copy_from_slice(&word(4 + i as u64).to_le_bytes());
    }
    CpuIdentity {
        apic_id: (ebx1 >> 24) as u8,
        logical_count: (ebx1 >> 16) as u8,
        hypervisor_bit: ecx1 & (1 << 31) != 0,
        x2apic_id: ((ecx_b >> 8) & 0xff != 0).then_some(edx_b),
        hypervisor,
    }
}
