//! `pio[=COUNT]`: port writes that each exit to the VMM (the `vanguard bench pio` workload).

use crate::bootinfo::BootInfo;
use crate::{io, println};

/// A port nothing claims by default: each write still exits to the VMM and back, which is the
/// round trip the benchmark measures.
const PIO_BENCH_PORT: u16 = 0x442;

/// Runs the scenario.
pub fn run(_info: &BootInfo, arg: Option<&str>) -> bool {
    super::number_arg("pio", arg, 100_000).is_some_and(pio)
}

fn pio(count: u64) -> bool {
    let start = io::rdtsc();
    for i in 0..count {
        io::outb(PIO_BENCH_PORT, i as u8);
    }
    let cycles = io::rdtsc() - start;
    println!("pio: {count} port writes in {cycles} cycles");
    true
}
