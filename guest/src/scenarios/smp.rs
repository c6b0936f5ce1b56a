//! `smp[=ROUNDS]`: every vCPU does verifiable work; CPUID identities are checked.

use crate::bootinfo::BootInfo;
use crate::{println, smp};
use core::sync::atomic::Ordering;

/// Runs the scenario.
pub fn run(_info: &BootInfo, arg: Option<&str>) -> bool {
    match super::number_arg("smp", arg, 10_000_000) {
        Some(rounds) => smp_work(rounds),
        None => false,
    }
}

fn smp_work(rounds: u64) -> bool {
    let (correct, online) = smp::run_on_all(rounds);
    let present = smp::PRESENT.load(Ordering::Relaxed);
    let mismatches = smp::CPUID_MISMATCHES.load(Ordering::Relaxed);
    let ok = correct == online && online == present && mismatches == 0;
    println!(
        "smp: {correct} of {present} vCPUs did {rounds} rounds of work correctly: {}",
        if ok { "ok" } else { "FAILED" }
    );
    ok
}
