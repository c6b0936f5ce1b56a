//! Bringing up the other vCPUs (INIT/SIPI through the local APIC, from ring 3) and handing
//! them work.

use crate::bootinfo::BootInfo;
use crate::entry::{self, MAX_CPUS, TRAMPOLINE_BASE};
use crate::{io, println};
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

const LAPIC_BASE: u64 = 0xfee0_0000;
const ICR_LOW: u64 = 0x300;
const ICR_HIGH: u64 = 0x310;
const ICR_INIT: u32 = 0x0000_4500; // INIT, level assert, all excluding self below
const ICR_STARTUP: u32 = 0x0000_4600;
const ICR_ALL_BUT_SELF: u32 = 0x000c_0000;

/// vCPUs that reached ring 3 (the boot vCPU included).
pub static ONLINE: AtomicUsize = AtomicUsize::new(1);
/// vCPUs the firmware (MADT) lists.
pub static PRESENT: AtomicUsize = AtomicUsize::new(1);

/// vCPUs whose CPUID identity did not match their index.
pub static CPUID_MISMATCHES: AtomicUsize = AtomicUsize::new(0);

/// A work request: the generation changes when new work is posted.
static WORK_GENERATION: AtomicU64 = AtomicU64::new(0);
static WORK_ROUNDS: AtomicU64 = AtomicU64::new(0);
static WORK_DONE: AtomicUsize = AtomicUsize::new(0);
static RESULTS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

fn lapic_write(offset: u64, value: u32) {
    // SAFETY: the LAPIC page is identity-mapped and user-accessible; MMIO has no other effect
    // on this program's memory.
    unsafe { core::ptr::write_volatile((LAPIC_BASE + offset) as *mut u32, value) }
}

/// Starts every vCPU the MADT lists and waits for them to reach ring 3.
pub fn start_aps(info: &BootInfo) {
    let Some(cpus) = crate::acpi::cpus(info.rsdp) else {
        println!("smp: no usable MADT, running on the boot vCPU only");
        return;
    };
    PRESENT.store(cpus.count, Ordering::Relaxed);
    if cpus.count <= 1 {
        return;
    }
    let code = entry::trampoline();
    // SAFETY: 0x8000 is usable low RAM that nothing else uses; the trampoline is small.
    unsafe {
        core::ptr::copy_nonoverlapping(code.as_ptr(), TRAMPOLINE_BASE as *mut u8, code.len())
    };
    let vector = (TRAMPOLINE_BASE >> 12) as u32;
    lapic_write(ICR_HIGH, 0);
    lapic_write(ICR_LOW, ICR_ALL_BUT_SELF | ICR_INIT);
    lapic_write(ICR_LOW, ICR_ALL_BUT_SELF | ICR_STARTUP | vector);
    // Generous: on a loaded host with more vCPUs than cores, start-up can take seconds.
    let deadline = io::rdtsc() + 100_000_000_000;
    while ONLINE.load(Ordering::Acquire) < cpus.count {
        if io::rdtsc() > deadline {
            println!(
                "smp: only {} of {} vCPUs came online",
                ONLINE.load(Ordering::Relaxed),
                cpus.count
            );
            return;
        }
        core::hint::spin_loop();
    }
}

/// Work each vCPU does: a pseudo-random walk whose result depends on the vCPU and the
/// number of rounds, so the boot vCPU can check every answer.
pub fn work(cpu: usize, rounds: u64) -> u64 {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ cpu as u64;
    for _ in 0..rounds {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    x
}

/// The loop every application processor runs.
pub fn ap_main(cpu: usize) -> ! {
    // The VMM promises APIC ID == vCPU index in CPUID leaves 0x1 and 0xB.
    let id = crate::cpu::identify(cpu);
    if usize::from(id.apic_id) != cpu || id.x2apic_id.is_some_and(|x| x as usize != cpu) {
        println!(
            "smp: cpu {cpu} FAILED: CPUID says apic id {} / x2apic id {:?}",
            id.apic_id, id.x2apic_id
        );
        CPUID_MISMATCHES.fetch_add(1, Ordering::AcqRel);
    }
    println!("smp: cpu {cpu} online");
    ONLINE.fetch_add(1, Ordering::AcqRel);
    let mut seen = 0;
    loop {
        let generation = WORK_GENERATION.load(Ordering::Acquire);
        if generation != seen {
            seen = generation;
            let rounds = WORK_ROUNDS.load(Ordering::Acquire);
            if let Some(slot) = RESULTS.get(cpu) {
                slot.store(work(cpu, rounds), Ordering::Release);
            }
            WORK_DONE.fetch_add(1, Ordering::AcqRel);
        }
        core::hint::spin_loop();
    }
}

/// Has every online vCPU (the caller included) do `rounds` of work; returns how many
/// vCPUs answered correctly.
pub fn run_on_all(rounds: u64) -> (usize, usize) {
    let online = ONLINE.load(Ordering::Acquire);
    WORK_DONE.store(0, Ordering::Release);
    for slot in RESULTS.iter() {
        slot.store(0, Ordering::Relaxed);
    }
    WORK_ROUNDS.store(rounds, Ordering::Release);
    WORK_GENERATION.fetch_add(1, Ordering::AcqRel);
    RESULTS[0].store(work(0, rounds), Ordering::Release);
    let deadline = io::rdtsc() + 60_000_000_000;
    while WORK_DONE.load(Ordering::Acquire) < online - 1 && io::rdtsc() < deadline {
        core::hint::spin_loop();
    }
    let correct =
        (0..online).filter(|c| RESULTS[*c].load(Ordering::Acquire) == work(*c, rounds)).count();
    (correct, online)
}
