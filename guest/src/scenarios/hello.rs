//! `hello`: the banner — vCPUs, memory, command line, CPUID identity, memory map.

use crate::bootinfo::BootInfo;
use crate::{println, smp};
use core::sync::atomic::Ordering;

/// Runs the scenario.
pub fn run(info: &BootInfo, _arg: Option<&str>) -> bool {
    println!(
        "Vanguard test guest: {} vCPUs online of {}, {} MiB RAM",
        smp::ONLINE.load(Ordering::Relaxed),
        smp::PRESENT.load(Ordering::Relaxed),
        info.ram_total() >> 20
    );
    println!("cmdline: {}", info.cmdline);
    let cpu = crate::cpu::identify(0);
    let signature = cpu.hypervisor.map(|b| if b.is_ascii_graphic() { b } else { b'.' });
    println!(
        "cpuid: apic id {}, {} logical processors, hypervisor bit {}, signature {}",
        cpu.apic_id,
        cpu.logical_count,
        if cpu.hypervisor_bit { "set" } else { "clear" },
        core::str::from_utf8(&signature).unwrap_or("?")
    );
    info.print_map();
    println!("hello: ok");
    true
}
