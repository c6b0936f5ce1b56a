//! Per-vCPU CPUID for x86-64 guests.
//!
//! The starting point is what KVM says it can virtualize (`KVM_GET_SUPPORTED_CPUID`). That list
//! describes the host package, not the VM: it carries the host's APIC IDs, core counts and cache
//! sharing, and it may advertise power-management and PMU features that need MSRs we do not give
//! the guest. Linux builds its CPU topology from these leaves, so each vCPU gets a copy rewritten
//! to describe one socket with `num_cpus` single-threaded cores, whose APIC ID is its index.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// Basic feature leaf: family/model, APIC ID, feature flags.
const LEAF_FEATURES: u32 = 0x1;
/// Deterministic cache parameters, one subleaf per cache.
const LEAF_CACHE_PARAMS: u32 = 0x4;
/// Thermal and power management.
const LEAF_THERMAL_POWER: u32 = 0x6;
/// Architectural performance monitoring.
const LEAF_PMU: u32 = 0xa;
/// Extended topology enumeration.
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
/// V2 extended topology enumeration; Linux prefers it over 0xB when present.
const LEAF_EXT_TOPOLOGY_V2: u32 = 0x1f;

/// KVM hypervisor signature leaf (`KVM_CPUID_SIGNATURE`).
pub const KVM_CPUID_SIGNATURE: u32 = 0x4000_0000;
/// KVM paravirtual features leaf (`KVM_CPUID_FEATURES`).
pub const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
/// The signature Linux looks for in EBX, ECX, EDX of [`KVM_CPUID_SIGNATURE`] to enable its KVM
/// guest support (kvm-clock, PV EOI, ...).
pub const KVM_SIGNATURE: [u8; 12] = *b"KVMKVMKVM\0\0\0";
/// kvm-clock via the new MSRs (`KVM_FEATURE_CLOCKSOURCE2`).
pub const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;
/// kvm-clock's stable bit may be trusted (`KVM_FEATURE_CLOCKSOURCE_STABLE_BIT`).
pub const KVM_FEATURE_CLOCKSOURCE_STABLE_BIT: u32 = 1 << 24;

// Leaf 0x1 fields.
const EBX_BRAND_INDEX_MASK: u32 = 0xff;
const EBX_CLFLUSH_SHIFT: u32 = 8;
/// CLFLUSH line size in 8-byte units: 64-byte lines, as on every x86-64 host we run on.
const CLFLUSH_LINE_SIZE_QWORDS: u32 = 8;
const EBX_LOGICAL_COUNT_SHIFT: u32 = 16;
const EBX_APIC_ID_SHIFT: u32 = 24;
/// Perfmon and debug capability: promises IA32_PERF_CAPABILITIES, which describes a PMU.
const ECX_PDCM: u32 = 1 << 15;
/// Set by every hypervisor; Linux only probes hypervisor leaves when it sees it.
pub const ECX_HYPERVISOR: u32 = 1 << 31;
/// EBX[23:16] is meaningful only with HTT set.
pub const EDX_HTT: u32 = 1 << 28;

// Leaf 0x4 fields.
const CACHE_TYPE_MASK: u32 = 0x1f;
const CACHE_LEVEL_SHIFT: u32 = 5;
const CACHE_LEVEL_MASK: u32 = 0x7;
/// EAX[13:0] describe the cache itself and stay as the host reports them.
const CACHE_DESCRIPTOR_MASK: u32 = 0x3fff;
const CACHE_SHARING_SHIFT: u32 = 14;
const CACHE_SHARING_MAX: u32 = 0xfff;
const CACHE_CORES_SHIFT: u32 = 26;
const CACHE_CORES_MAX: u32 = 0x3f;
/// The last level cache is shared by the whole package; lower levels are private to a core.
const SHARED_CACHE_LEVEL: u32 = 3;

// Leaf 0x6: always-running APIC timer is the one bit KVM emulates. The others (turbo, HWP,
// energy-performance bias, APERF/MPERF) promise MSRs that would fault or lie inside a guest.
const THERMAL_EAX_ARAT: u32 = 1 << 2;

// Leaf 0xB / 0x1F level types (ECX[15:8]).
const LEVEL_TYPE_INVALID: u32 = 0;
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;
const LEVEL_TYPE_SHIFT: u32 = 8;
const LEVEL_NUMBER_MASK: u32 = 0xff;

/// Where one vCPU sits in the VM's topology.
///
/// Vanguard guests see a single socket with one die, `num_cpus` cores and one thread per core;
/// a vCPU's APIC ID (and x2APIC ID) equals its `cpu_index`, which is what the MADT must list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTopology {
    /// This vCPU's index, also its APIC ID. Must be below `num_cpus`.
    pub cpu_index: u8,
    /// Number of vCPUs in the VM. Must be at least 1.
    pub num_cpus: u8,
}

/// Why a CPUID list could not be prepared for a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    /// A VM must have at least one vCPU.
    #[error("a VM needs at least one vCPU")]
    NoCpus,
    /// The vCPU index does not name one of the VM's vCPUs.
    #[error("vCPU index {cpu_index} is out of range for a VM with {num_cpus} vCPUs")]
    CpuIndexOutOfRange {
        /// The index that was asked for.
        cpu_index: u8,
        /// The VM's vCPU count.
        num_cpus: u8,
    },
    /// The list was already at KVM's entry limit, leaving no room for the KVM leaves.
    #[error("no room in the CPUID list for the KVM hypervisor leaves")]
    TooManyEntries,
}

/// Adjusts the host-supported CPUID (from KVM_GET_SUPPORTED_CPUID) for one vCPU.
///
/// Rewrites the APIC ID, logical processor counts, cache sharing (leaf 0x4) and extended topology
/// (leaves 0xB and 0x1F, only where the host list has them) to describe `topo`; sets the
/// hypervisor bit; hides the PMU and the power-management features KVM cannot back; and makes
/// sure the KVM signature and feature leaves are present so the guest uses kvm-clock. Leaves not
/// mentioned here are left as KVM reported them.
///
/// On error `cpuid` is left unchanged.
pub fn configure_cpuid(cpuid: &mut CpuId, topo: &CpuTopology) -> Result<(), CpuidError> {
    validate(topo)?;
    // Grow the list before touching anything, so a full list fails without a half-edited result.
    add_missing_kvm_leaves(cpuid)?;

    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => update_features(entry, topo),
            LEAF_CACHE_PARAMS => update_cache_params(entry, topo),
            LEAF_THERMAL_POWER => update_thermal_power(entry),
            LEAF_PMU => clear_registers(entry),
            LEAF_EXT_TOPOLOGY | LEAF_EXT_TOPOLOGY_V2 => update_ext_topology(entry, topo),
            KVM_CPUID_SIGNATURE => update_kvm_signature(entry),
            _ => {}
        }
    }
    Ok(())
}

fn validate(topo: &CpuTopology) -> Result<(), CpuidError> {
    if topo.num_cpus == 0 {
        return Err(CpuidError::NoCpus);
    }
    if topo.cpu_index >= topo.num_cpus {
        return Err(CpuidError::CpuIndexOutOfRange {
            cpu_index: topo.cpu_index,
            num_cpus: topo.num_cpus,
        });
    }
    Ok(())
}

/// The EBX, ECX, EDX words of [`KVM_CPUID_SIGNATURE`].
fn kvm_signature_words() -> [u32; 3] {
    let word = |i: usize| {
        u32::from_le_bytes([
            KVM_SIGNATURE[i],
            KVM_SIGNATURE[i + 1],
            KVM_SIGNATURE[i + 2],
            KVM_SIGNATURE[i + 3],
        ])
    };
    [word(0), word(4), word(8)]
}

fn add_missing_kvm_leaves(cpuid: &mut CpuId) -> Result<(), CpuidError> {
    let has =
        |cpuid: &CpuId, function: u32| cpuid.as_slice().iter().any(|e| e.function == function);
    let mut missing = Vec::new();
    if !has(cpuid, KVM_CPUID_SIGNATURE) {
        // The signature words are filled in by update_kvm_signature with the rest of the list.
        missing.push(kvm_cpuid_entry2 {
            function: KVM_CPUID_SIGNATURE,
            eax: KVM_CPUID_FEATURES,
            ..Default::default()
        });
    }
    if !has(cpuid, KVM_CPUID_FEATURES) {
        // Only what every KVM we support provides and what keeps guest time sane.
        missing.push(kvm_cpuid_entry2 {
            function: KVM_CPUID_FEATURES,
            eax: KVM_FEATURE_CLOCKSOURCE2 | KVM_FEATURE_CLOCKSOURCE_STABLE_BIT,
            ..Default::default()
        });
    }
    let free = kvm_bindings::KVM_MAX_CPUID_ENTRIES.saturating_sub(cpuid.as_slice().len());
    if missing.len() > free {
        return Err(CpuidError::TooManyEntries);
    }
    for entry in missing {
        cpuid.push(entry).map_err(|_| CpuidError::TooManyEntries)?;
    }
    Ok(())
}

fn update_features(entry: &mut kvm_cpuid_entry2, topo: &CpuTopology) {
    entry.ebx = (entry.ebx & EBX_BRAND_INDEX_MASK)
        | (CLFLUSH_LINE_SIZE_QWORDS << EBX_CLFLUSH_SHIFT)
        | (u32::from(topo.num_cpus) << EBX_LOGICAL_COUNT_SHIFT)
        | (u32::from(topo.cpu_index) << EBX_APIC_ID_SHIFT);
    // TSC-deadline (bit 24) is deliberately untouched: KVM reports it only when it can emulate
    // it, and advertising it otherwise would leave the guest without a working timer.
    entry.ecx |= ECX_HYPERVISOR;
    // Leaf 0xA is zeroed, so there is no PMU for IA32_PERF_CAPABILITIES to describe.
    entry.ecx &= !ECX_PDCM;
    if topo.num_cpus > 1 {
        entry.edx |= EDX_HTT;
    } else {
        entry.edx &= !EDX_HTT;
    }
}

fn update_cache_params(entry: &mut kvm_cpuid_entry2, topo: &CpuTopology) {
    // Type 0 terminates the subleaf list; its registers carry no fields to rewrite.
    if entry.eax & CACHE_TYPE_MASK == 0 {
        return;
    }
    let others = u32::from(topo.num_cpus - 1);
    let level = (entry.eax >> CACHE_LEVEL_SHIFT) & CACHE_LEVEL_MASK;
    let sharing = if level >= SHARED_CACHE_LEVEL { others.min(CACHE_SHARING_MAX) } else { 0 };
    // The field is 6 bits wide; with more cores than that Linux takes the count from leaf 0xB.
    let cores = others.min(CACHE_CORES_MAX);
    entry.eax = (entry.eax & CACHE_DESCRIPTOR_MASK)
        | (sharing << CACHE_SHARING_SHIFT)
        | (cores << CACHE_CORES_SHIFT);
}

fn update_thermal_power(entry: &mut kvm_cpuid_entry2) {
    entry.eax &= THERMAL_EAX_ARAT;
    entry.ebx = 0;
    entry.ecx = 0;
    entry.edx = 0;
}

fn clear_registers(entry: &mut kvm_cpuid_entry2) {
    entry.eax = 0;
    entry.ebx = 0;
    entry.ecx = 0;
    entry.edx = 0;
}

/// Number of low x2APIC ID bits needed to number `count` items.
fn id_bits(count: u8) -> u32 {
    match count {
        0 | 1 => 0,
        n => u32::BITS - u32::from(n - 1).leading_zeros(),
    }
}

fn update_ext_topology(entry: &mut kvm_cpuid_entry2, topo: &CpuTopology) {
    let level_number = entry.index & LEVEL_NUMBER_MASK;
    let (shift, count, level_type) = match entry.index {
        // One thread per core: no x2APIC ID bits select a thread.
        0 => (0, 1, LEVEL_TYPE_SMT),
        // All cores in one package: the package ID is whatever lies above the core bits.
        1 => (id_bits(topo.num_cpus), u32::from(topo.num_cpus), LEVEL_TYPE_CORE),
        // No die, module or tile levels: Linux stops at the first invalid subleaf.
        _ => (0, 0, LEVEL_TYPE_INVALID),
    };
    entry.eax = shift;
    entry.ebx = count;
    entry.ecx = (level_type << LEVEL_TYPE_SHIFT) | level_number;
    entry.edx = u32::from(topo.cpu_index);
}

fn update_kvm_signature(entry: &mut kvm_cpuid_entry2) {
    let [ebx, ecx, edx] = kvm_signature_words();
    entry.eax = entry.eax.max(KVM_CPUID_FEATURES);
    entry.ebx = ebx;
    entry.ecx = ecx;
    entry.edx = edx;
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_MAX_CPUID_ENTRIES};

    const SIG: u32 = KVM_CPUID_FLAG_SIGNIFCANT_INDEX;

    fn e(function: u32, index: u32, flags: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    const HOST_LEAF1_ECX: u32 = 0x77fa_3203 | ECX_PDCM; // bit 24 (TSC-deadline) set, bit 31 clear
    const HOST_KVM_FEATURES: u32 = 0x0100_7afb;

    /// What KVM_GET_SUPPORTED_CPUID returns on a 64-thread Intel host (SMT on), trimmed to the
    /// leaves this module cares about plus a few it must leave alone.
    fn host_entries() -> Vec<kvm_cpuid_entry2> {
        vec![
            e(0x0, 0, 0, [0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]),
            e(0x1, 0, 0, [0x0008_06f8, 0x2a40_0800, HOST_LEAF1_ECX, 0x1f8b_fbff]),
            e(0x4, 0, SIG, [0xfc00_4121, 0x02c0_003f, 0x3f, 0]),
            e(0x4, 1, SIG, [0xfc00_4122, 0x01c0_003f, 0x3f, 0]),
            e(0x4, 2, SIG, [0xfc00_4143, 0x03c0_003f, 0x7ff, 0]),
            e(0x4, 3, SIG, [0xfc1f_c163, 0x04c0_003f, 0x1_ffff, 4]),
            e(0x4, 4, SIG, [0, 0, 0, 0]),
            e(0x6, 0, 0, [0x0000_0004 | 0x2 | 0x80, 0x2, 0x9, 0]),
            e(0x7, 0, SIG, [0x2, 0xf1bf_2fbb, 0x1bc0_5ffe, 0xbc10_4010]),
            e(0xa, 0, 0, [0x0830_0805, 0, 0, 0x8603]),
            e(0xb, 0, SIG, [0x1, 0x2, 0x100, 0x2a]),
            e(0xb, 1, SIG, [0x7, 0x40, 0x201, 0x2a]),
            e(0x1f, 0, SIG, [0x1, 0x2, 0x100, 0x2a]),
            e(0x1f, 1, SIG, [0x6, 0x20, 0x201, 0x2a]),
            e(0x1f, 2, SIG, [0x7, 0x40, 0x502, 0x2a]),
            e(KVM_CPUID_SIGNATURE, 0, 0, [0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d]),
            e(KVM_CPUID_FEATURES, 0, 0, [HOST_KVM_FEATURES, 0, 0, 0]),
            e(0x8000_0000, 0, 0, [0x8000_0008, 0, 0, 0]),
            e(0x8000_0001, 0, 0, [0, 0, 0x121, 0x2c10_0800]),
        ]
    }

    fn host_cpuid() -> CpuId {
        CpuId::from_entries(&host_entries()).unwrap()
    }

    fn configured(cpu_index: u8, num_cpus: u8) -> CpuId {
        let mut cpuid = host_cpuid();
        configure_cpuid(&mut cpuid, &CpuTopology { cpu_index, num_cpus }).unwrap();
        cpuid
    }

    fn find(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        let mut it = cpuid.as_slice().iter().filter(|e| e.function == function && e.index == index);
        let found = *it.next().expect("leaf present");
        assert!(it.next().is_none(), "leaf {function:#x}.{index} duplicated");
        found
    }

    fn all(cpuid: &CpuId, function: u32) -> Vec<kvm_cpuid_entry2> {
        cpuid.as_slice().iter().filter(|e| e.function == function).copied().collect()
    }

    const TOPOLOGIES: [(u8, u8); 4] = [(0, 1), (3, 8), (253, 254), (0, 254)];

    #[test]
    fn leaf1_apic_id_and_counts() {
        for (index, count) in TOPOLOGIES {
            let leaf = find(&configured(index, count), 0x1, 0);
            assert_eq!(leaf.ebx >> 24, u32::from(index), "APIC id for {index}/{count}");
            assert_eq!((leaf.ebx >> 16) & 0xff, u32::from(count), "count for {index}/{count}");
            assert_eq!((leaf.ebx >> 8) & 0xff, 8, "CLFLUSH line size");
            assert_eq!(leaf.ebx & 0xff, 0, "brand index kept");
            assert_eq!(leaf.edx & EDX_HTT != 0, count > 1, "HTT for {index}/{count}");
            // Family/model and the other EDX features are the host's.
            assert_eq!(leaf.eax, 0x0008_06f8);
            assert_eq!(leaf.edx & !EDX_HTT, 0x1f8b_fbff & !EDX_HTT);
        }
    }

    #[test]
    fn leaf1_feature_bits() {
        let leaf = find(&configured(3, 8), 0x1, 0);
        assert_ne!(leaf.ecx & ECX_HYPERVISOR, 0, "hypervisor bit");
        assert_ne!(leaf.ecx & (1 << 24), 0, "TSC-deadline kept");
        assert_eq!(leaf.ecx & ECX_PDCM, 0, "PDCM hidden with the PMU");
        assert_eq!(leaf.ecx & !(ECX_HYPERVISOR | ECX_PDCM), HOST_LEAF1_ECX & !ECX_PDCM);

        // TSC-deadline must not appear when KVM did not offer it.
        let mut entries = host_entries();
        entries[1].ecx &= !(1 << 24);
        let mut cpuid = CpuId::from_entries(&entries).unwrap();
        configure_cpuid(&mut cpuid, &CpuTopology { cpu_index: 0, num_cpus: 2 }).unwrap();
        assert_eq!(find(&cpuid, 0x1, 0).ecx & (1 << 24), 0);
    }

    #[test]
    fn cache_params_describe_vm() {
        for (index, count) in TOPOLOGIES {
            let cpuid = configured(index, count);
            let cores = u32::from(count - 1).min(63);
            for (sub, host) in host_entries().iter().filter(|e| e.function == 0x4).enumerate() {
                let leaf = find(&cpuid, 0x4, u32::try_from(sub).unwrap());
                if host.eax == 0 {
                    assert_eq!(leaf, *host, "terminator untouched");
                    continue;
                }
                assert_eq!(leaf.eax >> 26, cores, "cores for subleaf {sub}");
                let sharing = (leaf.eax >> 14) & 0xfff;
                let level = (leaf.eax >> 5) & 0x7;
                let expected = if level == 3 { u32::from(count - 1) } else { 0 };
                assert_eq!(sharing, expected, "sharing for L{level} ({index}/{count})");
                assert_eq!(leaf.eax & 0x3fff, host.eax & 0x3fff, "cache type/level kept");
                assert_eq!((leaf.ebx, leaf.ecx, leaf.edx), (host.ebx, host.ecx, host.edx));
            }
        }
    }

    #[test]
    fn extended_topology_leaves() {
        for (index, count, shift) in
            [(0u8, 1u8, 0u32), (3, 8, 3), (4, 5, 3), (1, 2, 1), (253, 254, 8)]
        {
            let cpuid = configured(index, count);
            for function in [0xb, 0x1f] {
                let smt = find(&cpuid, function, 0);
                assert_eq!(
                    [smt.eax, smt.ebx, smt.ecx, smt.edx],
                    [0, 1, 0x100, u32::from(index)],
                    "{function:#x}.0 for {index}/{count}"
                );
                let core = find(&cpuid, function, 1);
                assert_eq!(
                    [core.eax, core.ebx, core.ecx, core.edx],
                    [shift, u32::from(count), 0x201, u32::from(index)],
                    "{function:#x}.1 for {index}/{count}"
                );
                // Every APIC ID fits below the shift, so all vCPUs share package 0.
                assert!(u32::from(count - 1) >> shift == 0);
            }
            // The host's die level is turned into the terminating invalid level.
            let die = find(&cpuid, 0x1f, 2);
            assert_eq!([die.eax, die.ebx, die.ecx, die.edx], [0, 0, 2, u32::from(index)]);
            assert_eq!(all(&cpuid, 0xb).len(), 2, "no subleaves invented");
            assert_eq!(all(&cpuid, 0x1f).len(), 3, "no subleaves invented");
        }
    }

    #[test]
    fn missing_topology_leaves_stay_absent() {
        let entries: Vec<_> = host_entries()
            .into_iter()
            .filter(|e| e.function != 0xb && e.function != 0x1f)
            .collect();
        let mut cpuid = CpuId::from_entries(&entries).unwrap();
        configure_cpuid(&mut cpuid, &CpuTopology { cpu_index: 1, num_cpus: 4 }).unwrap();
        assert!(all(&cpuid, 0xb).is_empty());
        assert!(all(&cpuid, 0x1f).is_empty());
        assert_eq!(cpuid.as_slice().len(), entries.len());
    }

    fn signature_bytes(leaf: &kvm_cpuid_entry2) -> Vec<u8> {
        [leaf.ebx, leaf.ecx, leaf.edx].iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    #[test]
    fn kvm_signature_and_features_kept() {
        let cpuid = configured(3, 8);
        let sig = find(&cpuid, KVM_CPUID_SIGNATURE, 0);
        assert_eq!(signature_bytes(&sig), b"KVMKVMKVM\0\0\0");
        assert_eq!(sig.eax, KVM_CPUID_FEATURES);
        assert_eq!(find(&cpuid, KVM_CPUID_FEATURES, 0).eax, HOST_KVM_FEATURES);
        assert_eq!(cpuid.as_slice().len(), host_entries().len(), "nothing added");
    }

    #[test]
    fn kvm_signature_repaired() {
        let mut entries = host_entries();
        let sig = entries.iter_mut().find(|e| e.function == KVM_CPUID_SIGNATURE).unwrap();
        *sig = e(KVM_CPUID_SIGNATURE, 0, 0, [0, 0x1234, 0, 0]);
        let mut cpuid = CpuId::from_entries(&entries).unwrap();
        configure_cpuid(&mut cpuid, &CpuTopology { cpu_index: 0, num_cpus: 1 }).unwrap();
        let sig = find(&cpuid, KVM_CPUID_SIGNATURE, 0);
        assert_eq!(signature_bytes(&sig), b"KVMKVMKVM\0\0\0");
        assert_eq!(sig.eax, KVM_CPUID_FEATURES);

        // A larger max hypervisor leaf is the host's business and is kept.
        let mut entries = host_entries();
        entries.iter_mut().find(|e| e.function == KVM_CPUID_SIGNATURE).unwrap().eax = 0x4000_0010;
        let mut cpuid = CpuId::from_entries(&entries).unwrap();
        configure_cpuid(&mut cpuid, &CpuTopology { cpu_index: 0, num_cpus: 1 }).unwrap();
        assert_eq!(find(&cpuid, KVM_CPUID_SIGNATURE, 0).eax, 0x4000_0010);
    }

    #[test]
    fn kvm_leaves_added_when_absent() {
        let expected_features = (1 << 3) | (1 << 24);

        let entries: Vec<_> = host_entries()
            .into_iter()
            .filter(|e| e.function & 0xffff_0000 != 0x4000_0000)
            .collect();
        let mut cpuid = CpuId::from_entries(&entries).unwrap();
        configure_cpuid(&mut cpuid, &CpuTopology { cpu_index: 2, num_cpus: 3 }).unwrap();
        assert_eq!(cpuid.as_slice().len(), entries.len() + 2);
        let sig = find(&cpuid, KVM_CPUID_SIGNATURE, 0);
        assert_eq!(signature_bytes(&sig), b"KVMKVMKVM\0\0\0");
        assert!(sig.eax >= KVM_CPUID_FEATURES);
        assert_eq!(find(&cpuid, KVM_CPUID_FEATURES, 0).eax, expected_features);

        // Only the features leaf missing: the signature leaf is kept and the features added.
        let entries: Vec<_> =
            host_entries().into_iter().filter(|e| e.function != KVM_CPUID_FEATURES).collect();
        let mut cpuid = CpuId::from_entries(&entries).unwrap();
        configure_cpuid(&mut cpuid, &CpuTopology { cpu_index: 0, num_cpus: 1 }).unwrap();
        assert_eq!(cpuid.as_slice().len(), entries.len() + 1);
        assert_eq!(all(&cpuid, KVM_CPUID_SIGNATURE).len(), 1);
        assert_eq!(find(&cpuid, KVM_CPUID_FEATURES, 0).eax, expected_features);
    }

    #[test]
    fn pmu_and_power_management_hidden() {
        let cpuid = configured(3, 8);
        let pmu = find(&cpuid, 0xa, 0);
        assert_eq!([pmu.eax, pmu.ebx, pmu.ecx, pmu.edx], [0; 4]);
        let thermal = find(&cpuid, 0x6, 0);
        assert_eq!(
            [thermal.eax, thermal.ebx, thermal.ecx, thermal.edx],
            [THERMAL_EAX_ARAT, 0, 0, 0]
        );
    }

    #[test]
    fn unrelated_leaves_untouched() {
        let cpuid = configured(3, 8);
        let host = host_entries();
        for function in [0x0, 0x7, 0x8000_0000, 0x8000_0001] {
            let before = host.iter().find(|e| e.function == function).unwrap();
            assert_eq!(find(&cpuid, function, 0), *before, "leaf {function:#x}");
        }
        // Flags (significant-index) must survive, or KVM would match the wrong subleaves.
        for (after, before) in cpuid.as_slice().iter().zip(&host) {
            assert_eq!(
                (after.function, after.index, after.flags),
                (before.function, before.index, before.flags)
            );
        }
    }

    #[test]
    fn bad_topology_rejected_and_cpuid_unchanged() {
        let cases = [(0, 0), (1, 1), (8, 8), (9, 8), (255, 254), (255, 255)];
        for (cpu_index, num_cpus) in cases {
            let mut cpuid = host_cpuid();
            let err = configure_cpuid(&mut cpuid, &CpuTopology { cpu_index, num_cpus })
                .expect_err("invalid topology accepted");
            if num_cpus == 0 {
                assert!(matches!(err, CpuidError::NoCpus));
            } else {
                assert!(matches!(
                    err,
                    CpuidError::CpuIndexOutOfRange { cpu_index: i, num_cpus: n }
                        if i == cpu_index && n == num_cpus
                ));
            }
            assert_eq!(cpuid, host_cpuid(), "{cpu_index}/{num_cpus} edited the list");
        }
    }

    #[test]
    fn full_list_without_kvm_leaves_rejected_unchanged() {
        let mut entries: Vec<_> =
            host_entries().into_iter().filter(|e| e.function != KVM_CPUID_FEATURES).collect();
        // Pad with harmless extended-leaf subleaves up to KVM's limit.
        let mut pad = 0;
        while entries.len() < KVM_MAX_CPUID_ENTRIES {
            entries.push(e(0x8000_001d, pad, SIG, [0; 4]));
            pad += 1;
        }
        let original = CpuId::from_entries(&entries).unwrap();
        let mut cpuid = original.clone();
        let err = configure_cpuid(&mut cpuid, &CpuTopology { cpu_index: 0, num_cpus: 2 })
            .expect_err("no room for the features leaf");
        assert!(matches!(err, CpuidError::TooManyEntries));
        assert_eq!(cpuid, original);
    }

    #[test]
    fn id_bits_matches_definition() {
        for n in 1..=u8::MAX {
            let bits = id_bits(n);
            assert!(u32::from(n) <= 1 << bits, "{n} fits in {bits} bits");
            assert!(bits == 0 || u32::from(n) > 1 << (bits - 1), "{bits} is minimal for {n}");
        }
    }
}
