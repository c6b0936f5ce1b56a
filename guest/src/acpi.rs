//! Finding the vCPUs the way an operating system does: RSDP, then XSDT, then the MADT's
//! processor local APIC entries.

/// APIC IDs of the enabled processors, and how many there are.
pub struct Cpus {
    /// APIC IDs.
    pub apic_ids: [u8; crate::entry::MAX_CPUS],
    /// How many are valid.
    pub count: usize,
}

fn read<T: Copy>(addr: u64) -> T {
    // SAFETY: ACPI tables lie in identity-mapped guest memory below 4 GiB.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

fn find_rsdp(hint: u64) -> Option<u64> {
    if hint != 0 && read::<[u8; 8]>(hint) == *b"RSD PTR " {
        return Some(hint);
    }
    (0xe0000u64..0x100000).step_by(16).find(|a| read::<[u8; 8]>(*a) == *b"RSD PTR ")
}

fn checksum_ok(addr: u64, len: u32) -> bool {
    (0..u64::from(len)).fold(0u8, |sum, i| sum.wrapping_add(read::<u8>(addr + i))) == 0
}

/// Reads the MADT; None if the tables are missing or damaged.
pub fn cpus(rsdp_hint: u64) -> Option<Cpus> {
    let rsdp = find_rsdp(rsdp_hint)?;
    if !checksum_ok(rsdp, 20) {
        return None;
    }
    let xsdt = read::<u64>(rsdp + 24);
    if read::<[u8; 4]>(xsdt) != *b"XSDT" {
        return None;
    }
    let xsdt_len = read::<u32>(xsdt + 4);
    let entries = (u64::from(xsdt_len).saturating_sub(36)) / 8;
    let madt = (0..entries)
        .map(|i| read::<u64>(xsdt + 36 + i * 8))
        .find(|t| read::<[u8; 4]>(*t) == *b"APIC")?;
    let madt_len = read::<u32>(madt + 4);
    if !checksum_ok(madt, madt_len) {
        return None;
    }
    let mut cpus = Cpus { apic_ids: [0; crate::entry::MAX_CPUS], count: 0 };
    let mut at = madt + 44;
    let end = madt + u64::from(madt_len);
    while at + 2 <= end {
        let (kind, len) = (read::<u8>(at), read::<u8>(at + 1));
        if len < 2 {
            break;
        }
        if kind == 0 && read::<u32>(at + 4) & 1 == 1 && cpus.count < crate::entry::MAX_CPUS {
            cpus.apic_ids[cpus.count] = read::<u8>(at + 3);
            cpus.count += 1;
        }
        at += u64::from(len);
    }
    Some(cpus)
}
