//! The scenarios a command line can ask for, run in the order given. Each is a small function;
//! a new one is a new match arm here plus an entry in docs/test-guest.md.

use crate::bootinfo::{parse_size, BootInfo};
use crate::{io, mem, println, smp};
use core::sync::atomic::Ordering;

/// Runs every scenario word on the command line; words that are not scenarios (console=...,
/// anything meant for Linux) are ignored.
pub fn run_all(info: &BootInfo) {
    let mut failed = 0;
    for word in info.words() {
        let (name, arg) = match word.split_once('=') {
            Some((n, a)) => (n, Some(a)),
            None => (word, None),
        };
        let ok = match (name, arg) {
            ("hello", None) => hello(info),
            ("exit", Some(code)) => exit(code),
            ("mem", limit) => match limit.map(parse_size) {
                None => mem::test(info, u64::MAX),
                Some(Some(l)) => mem::test(info, l),
                Some(None) => bad(word),
            },
            ("smp", rounds) => match rounds.map(|r| r.parse::<u64>()) {
                None => smp_work(10_000_000),
                Some(Ok(r)) => smp_work(r),
                Some(Err(_)) => bad(word),
            },
            ("echo", None) => echo(),
            ("powerbutton", None) => power_button(),
            ("pio", count) => match count.map(|c| c.parse::<u64>()) {
                None => pio(100_000),
                Some(Ok(c)) => pio(c),
                Some(Err(_)) => bad(word),
            },
            ("fault", None) => io::crash(),
            ("reboot", None) => io::reset(),
            _ => true,
        };
        if !ok {
            failed += 1;
        }
    }
    if failed > 0 {
        println!("vanguard-guest: {failed} scenario(s) FAILED");
        io::crash();
    }
}

fn bad(word: &str) -> bool {
    println!("vanguard-guest: cannot parse '{word}'");
    false
}

fn hello(info: &BootInfo) -> bool {
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

fn exit(code: &str) -> bool {
    let Ok(code) = code.parse::<u8>() else { return bad("exit") };
    println!("exit: requesting exit status {code}");
    io::debug_exit(code);
    // Still here: the VMM has no debug-exit port.
    println!("exit: no debug-exit device, continuing");
    true
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

fn echo() -> bool {
    println!("echo: ready");
    let mut line = [0u8; 256];
    loop {
        let mut len = 0;
        loop {
            let b = io::serial_read_byte();
            if b == b'\n' || b == b'\r' {
                break;
            }
            if len < line.len() {
                line[len] = b;
                len += 1;
            }
        }
        if len == 0 {
            continue;
        }
        let text = core::str::from_utf8(&line[..len]).unwrap_or("<not utf-8>");
        if text == "quit" {
            println!("echo: done");
            return true;
        }
        println!("echo: {text}");
    }
}

/// A port nothing claims by default: each write still exits to the VMM and back, which is the
/// round trip the benchmark measures.
const PIO_BENCH_PORT: u16 = 0x442;

fn pio(count: u64) -> bool {
    let start = io::rdtsc();
    for i in 0..count {
        io::outb(PIO_BENCH_PORT, i as u8);
    }
    let cycles = io::rdtsc() - start;
    println!("pio: {count} port writes in {cycles} cycles");
    true
}

/// ACPI PM1a status register; bit 8 is PWRBTN_STS.
const PM1A_STS: u16 = 0x600;
const PWRBTN_STS: u16 = 1 << 8;

/// Waits for the ACPI power button (the VMM presses it on SIGTERM), acknowledges it and
/// returns, so the guest powers off as an OS would.
fn power_button() -> bool {
    println!("powerbutton: waiting");
    loop {
        let status = u16::from_le_bytes([io::inb(PM1A_STS), io::inb(PM1A_STS + 1)]);
        if status & PWRBTN_STS != 0 {
            break;
        }
        core::hint::spin_loop();
    }
    io::outw(PM1A_STS, PWRBTN_STS);
    println!("powerbutton: pressed");
    true
}
