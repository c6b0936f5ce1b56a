//! `mem[=SIZE]`: map all of guest RAM (above 4 GiB too), write a pattern that
//! differs at every address, and read it back.

use crate::bootinfo::{parse_size, BootInfo, Range};
use crate::entry::{self, PERCPU_SIZE};
use crate::{io, println};
use core::sync::atomic::{AtomicU64, Ordering};

/// What the last `mem` wrote, for `memcheck`: its seed and byte limit (limit 0: none ran).
static LAST_SEED: AtomicU64 = AtomicU64::new(0);
static LAST_LIMIT: AtomicU64 = AtomicU64::new(0);
/// Memory a later scenario took over (`dirty`'s region), [start, end): `memcheck` skips it.
static CLAIMED_START: AtomicU64 = AtomicU64::new(0);
static CLAIMED_END: AtomicU64 = AtomicU64::new(0);

/// Marks [start, end) as written by another scenario since `mem` (one claim at a time).
pub(super) fn claim(start: u64, end: u64) {
    CLAIMED_START.store(start, Ordering::Relaxed);
    CLAIMED_END.store(end, Ordering::Relaxed);
}

/// GiB of address space the guest can map (its page directories are static).
const MAX_GIB: usize = 64;
/// Page directories for addresses from 4 GiB up to MAX_GIB.
#[repr(C, align(4096))]
struct HighDirs([[u64; 512]; MAX_GIB - 4]);
static mut HIGH_DIRS: HighDirs = HighDirs([[0; 512]; MAX_GIB - 4]);

/// Maps `gib` (a 1 GiB slot above 4 GiB) with 2 MiB pages.
fn map_gib(gib: usize) -> bool {
    if !(4..MAX_GIB).contains(&gib) {
        return false;
    }
    // SAFETY: only the boot vCPU maps memory, before any other code touches these addresses;
    // the directory and the PDPT are identity-mapped guest memory.
    unsafe {
        let dir = &raw mut HIGH_DIRS.0[gib - 4];
        let pdpt = entry::pdpt_address() as *mut u64;
        if core::ptr::read_volatile(pdpt.add(gib)) & 1 == 1 {
            return true;
        }
        for (i, slot) in (*dir).iter_mut().enumerate() {
            core::ptr::write_volatile(slot, ((gib as u64) << 30) + ((i as u64) << 21) + 0x87);
        }
        core::ptr::write_volatile(pdpt.add(gib), dir as u64 + 0x7);
    }
    true
}

/// Where testable memory starts: past the image, the per-vCPU areas, and 2 MiB aligned.
pub(super) fn first_free(cpus: usize) -> u64 {
    (entry::image_end() + PERCPU_SIZE * cpus as u64).next_multiple_of(2 << 20)
}

fn pattern(addr: u64, seed: u64) -> u64 {
    (addr ^ seed).rotate_left(17) ^ 0xa5a5_5a5a_0f0f_f0f0
}

/// The ranges to test, clipped to `limit` bytes in all.
fn ranges(info: &BootInfo, cpus: usize, mut limit: u64) -> ([Range; 16], usize) {
    let mut out = [Range { start: 0, end: 0 }; 16];
    let mut n = 0;
    let floor = first_free(cpus);
    for r in info.ram() {
        let start = r.start.max(floor);
        if start >= r.end || limit == 0 {
            continue;
        }
        let end = r.end.min(start.saturating_add(limit));
        limit -= end - start;
        out[n] = Range { start, end };
        n += 1;
    }
    (out, n)
}

/// Runs the scenario.
pub fn run(info: &BootInfo, arg: Option<&str>) -> bool {
    match arg.map(parse_size) {
        None => test(info, u64::MAX),
        Some(Some(limit)) => test(info, limit),
        Some(None) => super::bad("mem", arg),
    }
}

/// Writes and verifies the pattern over up to `limit` bytes; prints the result.
fn test(info: &BootInfo, limit: u64) -> bool {
    let cpus = crate::smp::PRESENT.load(core::sync::atomic::Ordering::Relaxed);
    let (list, n) = ranges(info, cpus, limit);
    for r in &list[..n] {
        for gib in (r.start >> 30)..r.end.div_ceil(1 << 30) {
            if gib >= 4 && !map_gib(gib as usize) {
                println!("mem: cannot map {:#x}: more than {} GiB", gib << 30, MAX_GIB);
                return false;
            }
        }
    }
    let seed = io::rdtsc();
    LAST_SEED.store(seed, Ordering::Relaxed);
    LAST_LIMIT.store(limit.max(1), Ordering::Relaxed);
    claim(0, 0);
    let t0 = io::rdtsc();
    let mut bytes = 0;
    for r in &list[..n] {
        let mut a = r.start;
        while a < r.end {
            // SAFETY: [start, end) is usable RAM not used by this program, mapped above.
            unsafe { core::ptr::write_volatile(a as *mut u64, pattern(a, seed)) };
            a += 8;
        }
        bytes += r.end - r.start;
    }
    if let Err((a, want, got)) = check(&list[..n], seed, (0, 0)) {
        println!("mem: FAILED at {a:#x}: wrote {want:#018x}, read {got:#018x}");
        return false;
    }
    let cycles = io::rdtsc() - t0;
    println!(
        "mem: wrote and verified {} MiB in {} ranges ({} Mcycles): ok",
        bytes >> 20,
        n,
        cycles / 1_000_000
    );
    true
}

/// `memcheck`: reads back everything the last `mem` wrote (its pattern at every word) but
/// what another scenario claimed since; after a snapshot's restore or a migration, this checks
/// every RAM range came back in place.
pub fn run_check(info: &BootInfo, arg: Option<&str>) -> bool {
    if arg.is_some() {
        return super::bad("memcheck", arg);
    }
    let limit = LAST_LIMIT.load(Ordering::Relaxed);
    if limit == 0 {
        println!("memcheck: FAILED: no mem scenario ran before");
        return false;
    }
    let seed = LAST_SEED.load(Ordering::Relaxed);
    let (skip_start, skip_end) =
        (CLAIMED_START.load(Ordering::Relaxed), CLAIMED_END.load(Ordering::Relaxed));
    let cpus = crate::smp::PRESENT.load(Ordering::Relaxed);
    let (list, n) = ranges(info, cpus, limit);
    let (bytes, skipped) = match check(&list[..n], seed, (skip_start, skip_end)) {
        Ok(counts) => counts,
        Err((a, want, got)) => {
            println!("memcheck: FAILED at {a:#x}: mem wrote {want:#018x}, read {got:#018x}");
            return false;
        }
    };
    println!(
        "memcheck: verified {} MiB in {} ranges (skipped {} KiB another scenario wrote): ok",
        bytes >> 20,
        n,
        skipped >> 10
    );
    true
}

/// Reads `list` back against the pattern of `seed`, but for the words in [skip.0, skip.1);
/// returns the bytes checked and skipped, or the first wrong word (address, want, got).
fn check(list: &[Range], seed: u64, skip: (u64, u64)) -> Result<(u64, u64), (u64, u64, u64)> {
    let (mut bytes, mut skipped) = (0, 0);
    for r in list {
        let mut a = r.start;
        while a < r.end {
            if (skip.0..skip.1).contains(&a) {
                skipped += 8;
            } else {
                // SAFETY: `mem` mapped [start, end), usable RAM this program does not use.
                let got = unsafe { core::ptr::read_volatile(a as *const u64) };
                if got != pattern(a, seed) {
                    return Err((a, pattern(a, seed), got));
                }
                bytes += 8;
            }
            a += 8;
        }
    }
    Ok((bytes, skipped))
}
