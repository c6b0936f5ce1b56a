//! `dirty=<size>[,<MiB/s>]`: keeps writing guest memory, one 4 KiB page per step, with a
//! pattern that names the page and the step, until told to stop; verifies every page on
//! request. The workload of snapshot and migration tests: whatever moment the VM is saved at,
//! the restored guest must find every page as its last step left it.
//!
//! Step `s` (from 1) writes page `(s - 1) mod N` of the region: word 0 is `s`, word `i` is
//! `word(page, s, i)`. So page `p` must hold the most recent step `s <= S` (S the last step)
//! with `(s - 1) mod N = p`. The first pass (steps 1 to N) runs at full speed before the
//! scenario reports anything, so every page holds data; later steps keep to the rate.
//!
//! Serial input while it runs: `v` verifies every page now, `q` ends the scenario.

use crate::bootinfo::{parse_size, BootInfo};
use crate::{io, println};

const PAGE: u64 = 4096;
const WORDS: u64 = PAGE / 8;
/// Check the serial port every this many steps (each check is a VM exit).
const POLL_EVERY: u64 = 64;

fn word(page: u64, step: u64, i: u64) -> u64 {
    let x = (page << 32 ^ step).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ i.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^ (x >> 31)
}

/// The TSC frequency, measured against 10 ms of the PIT (channel 2, gated through port 0x61).
fn tsc_hz() -> u64 {
    const PIT_HZ: u64 = 1_193_182;
    const COUNT: u64 = PIT_HZ / 100;
    let gate = io::inb(0x61);
    io::outb(0x61, (gate & !0x02) | 0x01);
    io::outb(0x43, 0xb0); // channel 2, low then high byte, mode 0 (interrupt on terminal count)
    io::outb(0x42, (COUNT & 0xff) as u8);
    io::outb(0x42, (COUNT >> 8) as u8);
    let t0 = io::rdtsc();
    while io::inb(0x61) & 0x20 == 0 {
        core::hint::spin_loop();
    }
    let cycles = io::rdtsc() - t0;
    io::outb(0x61, gate);
    cycles * PIT_HZ / COUNT
}

/// Runs the scenario.
pub fn run(info: &BootInfo, arg: Option<&str>) -> bool {
    let (size, rate) = match arg.map(|a| a.split_once(',').unwrap_or((a, "0"))) {
        Some((size, rate)) => match (parse_size(size), rate.parse::<u64>()) {
            (Some(size), Ok(rate)) => (size, rate),
            _ => return super::bad("dirty", arg),
        },
        None => (16 << 20, 0),
    };
    let cpus = crate::smp::PRESENT.load(core::sync::atomic::Ordering::Relaxed);
    let floor = super::mem::first_free(cpus);
    // The first usable range above the guest's own memory holds the region.
    let Some(range) = info.ram().iter().find(|r| r.end > floor + PAGE) else {
        println!("dirty: FAILED: no free memory");
        return false;
    };
    let start = range.start.max(floor);
    let pages = size.min(range.end - start) / PAGE;
    if pages == 0 {
        println!("dirty: FAILED: a region of 0 pages");
        return false;
    }
    let hz = tsc_hz();
    // TSC cycles per page at the asked rate (0: as fast as it can).
    let per_page = if rate == 0 { 0 } else { hz / (rate * 256).max(1) };
    for step in 1..=pages {
        write_step(start, pages, step);
    }
    println!(
        "dirty: writing {} pages ({} MiB) at {:#x}, {} MiB/s{}, tsc {} MHz",
        pages,
        pages * PAGE >> 20,
        start,
        rate,
        if rate == 0 { " (unlimited)" } else { "" },
        hz / 1_000_000
    );
    let report_every = hz / 4;
    let mut step: u64 = pages;
    let t0 = io::rdtsc();
    let mut last_report = t0;
    let mut paced_from = (t0, step);
    loop {
        step += 1;
        write_step(start, pages, step);
        if per_page != 0 {
            let due = paced_from.0 + (step - paced_from.1) * per_page;
            while io::rdtsc() < due {
                core::hint::spin_loop();
            }
        }
        if step % POLL_EVERY != 0 {
            continue;
        }
        let now = io::rdtsc();
        if now.wrapping_sub(last_report) > report_every {
            println!("dirty: step {step}");
            last_report = now;
        }
        match io::serial_try_read() {
            Some(b'v') => {
                if !verify(start, pages, step) {
                    return false;
                }
                // Verification took time: pace from here, not from the start.
                paced_from = (io::rdtsc(), step);
            }
            Some(b'q') => {
                println!("dirty: stopped at step {step}");
                return true;
            }
            _ => {}
        }
    }
}

/// Writes step `step`'s page.
fn write_step(start: u64, pages: u64, step: u64) {
    let page = (step - 1) % pages;
    let base = start + page * PAGE;
    // SAFETY: the region is usable RAM past everything this program uses, identity-mapped.
    unsafe {
        core::ptr::write_volatile(base as *mut u64, step);
        for i in 1..WORDS {
            core::ptr::write_volatile((base + i * 8) as *mut u64, word(page, step, i));
        }
    }
}

/// Checks every page against the steps up to `last` (at least one whole pass); prints the
/// result.
fn verify(start: u64, pages: u64, last: u64) -> bool {
    for page in 0..pages {
        let base = start + page * PAGE;
        // The most recent step that wrote this page.
        let expected = last - (last - 1 - page) % pages;
        // SAFETY: as in `run`.
        let got = unsafe { core::ptr::read_volatile(base as *const u64) };
        if got != expected {
            println!(
                "dirty: FAILED: page {page} at {base:#x} holds step {got}, expected {expected} (last step {last})"
            );
            return false;
        }
        for i in 1..WORDS {
            let want = word(page, expected, i);
            // SAFETY: as in `run`.
            let got = unsafe { core::ptr::read_volatile((base + i * 8) as *const u64) };
            if got != want {
                println!(
                    "dirty: FAILED: page {page} word {i} is {got:#x}, expected {want:#x} (step {expected})"
                );
                return false;
            }
        }
    }
    println!("dirty: verified {pages} pages at step {last}: ok");
    true
}
