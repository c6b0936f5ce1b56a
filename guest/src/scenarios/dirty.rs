//! `dirty=<size>[,<MiB/s>[,disk][,net:<guest-ip>:<host-ip>]]`: keeps writing guest memory,
//! one 4 KiB page per step, with a pattern that names the page and the step, until told to
//! stop; verifies every page on request. The workload of snapshot and migration tests:
//! whatever moment the VM is saved at, the restored guest must find every page as its last
//! step left it.
//!
//! Step `s` (from 1) writes page `(s - 1) mod N` of the region: word 0 is `s`, word `i` is
//! `word(page, s, i)`. So page `p` must hold the most recent step `s <= S` (S the last step)
//! with `(s - 1) mod N = p`. The first pass (steps 1 to N) runs at full speed before the
//! scenario reports anything, so every page holds data; later steps keep to the rate.
//!
//! Serial input while it runs: `v` verifies every page now, `q` ends the scenario.
//!
//! Optional words after the rate keep virtio devices busy meanwhile, so that a snapshot or a
//! migration also catches devices at work (`dirty=<size>,<MiB/s>,disk,net:<ip>:<ip>`):
//!
//! - `disk`: after each step, its page goes to disk0 at byte offset `page * 4096` (one
//!   request), and the page half a region away, `q = (page + N/2) mod N`, if written yet, is
//!   read back from the disk into the readback region R (N pages right after the region) at
//!   `R[q]` and must equal page `q` in memory. The device thus writes guest memory all the
//!   time. A per-page array after R records the step each `R[q]` holds; `v` also reads every
//!   page back from the disk and checks each filled `R[q]` still holds its step's pattern.
//! - `net:<guest-ip>:<host-ip>`: on the first virtio-net device, every 64 steps one UDP
//!   datagram `dirty step <n>\n` from port 5556 to `<host-ip>:5556` (once ARP resolved the
//!   host), answering ARP and ICMP echo requests for `<guest-ip>` as `net` does.

use super::disk;
use super::net::{Host, Ip};
use crate::bootinfo::{parse_size, BootInfo};
use crate::virtio::Device;
use crate::{io, println};

const PAGE: u64 = 4096;
const WORDS: u64 = PAGE / 8;
/// Check the serial port every this many steps (each check is a VM exit).
const POLL_EVERY: u64 = 64;
/// The UDP port the `net:` datagrams go from and to.
const NET_PORT: u16 = 5556;

/// What the argument asks for.
struct Options {
    size: u64,
    rate: u64,
    disk: bool,
    net: Option<(Ip, Ip)>,
}

/// `<size>[,<MiB/s>[,disk][,net:<guest-ip>:<host-ip>]]` (each word at most once).
fn parse(arg: Option<&str>) -> Option<Options> {
    let mut options = Options { size: 16 << 20, rate: 0, disk: false, net: None };
    let Some(arg) = arg else { return Some(options) };
    let mut parts = arg.split(',');
    options.size = parse_size(parts.next()?)?;
    if let Some(rate) = parts.next() {
        options.rate = rate.parse().ok()?;
    }
    for word in parts {
        if word == "disk" && !options.disk {
            options.disk = true;
        } else if let (Some(ips), None) = (word.strip_prefix("net:"), options.net) {
            let (ip, peer) = ips.split_once(':')?;
            options.net = Some((Ip::parse(ip)?, Ip::parse(peer)?));
        } else {
            return None;
        }
    }
    Some(options)
}

/// disk0 as the `disk` word uses it.
struct DiskIo {
    dev: Device,
    /// The readback region (as many pages as the dirty region).
    readback: u64,
    /// `pages` u64s: the step whose data `R[q]` holds, 0 if none yet.
    last_read: u64,
    /// Write and read requests done.
    writes: u64,
    reads: u64,
}

/// The first virtio-net device, as the `net:` word uses it.
struct NetIo {
    host: Host,
    sent: u64,
}

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
    let Some(Options { size, rate, disk, net }) = parse(arg) else {
        return super::bad("dirty", arg);
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
    let mut disk = match disk.then(|| open_disk(info, start, pages, size, range.end)) {
        None => None,
        Some(Some(disk)) => Some(disk),
        Some(None) => return false,
    };
    // The region (and with `disk` its readback region and array) is this scenario's now.
    let footprint = if disk.is_some() {
        2 * pages * PAGE + (pages * 8).next_multiple_of(PAGE)
    } else {
        pages * PAGE
    };
    super::mem::claim(start, start + footprint);
    let mut net = match net.map(|(ip, peer)| Host::open(info, ip, peer)) {
        None => None,
        Some(Ok(host)) => Some(NetIo { host, sent: 0 }),
        Some(Err(why)) => {
            println!("dirty: FAILED: net: {why}");
            return false;
        }
    };
    let hz = tsc_hz();
    // TSC cycles per page at the asked rate (0: as fast as it can).
    let per_page = if rate == 0 { 0 } else { hz / (rate * 256).max(1) };
    for step in 1..=pages {
        write_step(start, pages, step);
        if !disk_step(disk.as_mut(), start, pages, step) {
            return false;
        }
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
    if let Some(d) = &disk {
        println!(
            "dirty: disk0 virtio-blk at {:#x}, readback region at {:#x}",
            d.dev.base(),
            d.readback
        );
    }
    let report_every = hz / 4;
    let mut step: u64 = pages;
    let t0 = io::rdtsc();
    let mut last_report = t0;
    let mut paced_from = (t0, step);
    loop {
        step += 1;
        write_step(start, pages, step);
        if !disk_step(disk.as_mut(), start, pages, step) {
            return false;
        }
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
        if let Some(n) = net.as_mut() {
            if let Err(why) = net_step(n, step) {
                println!("dirty: FAILED: net at step {step}: {why}");
                return false;
            }
        }
        match io::serial_try_read() {
            Some(b'v') => {
                if let Some(n) = &net {
                    println!("dirty: net sent {} datagrams", n.sent);
                }
                if !verify(start, pages, step, disk.as_mut()) {
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

/// Checks every page against the steps up to `last` (at least one whole pass), and with
/// `disk` the disk's copy of every page and every filled page of the readback region; prints
/// the result.
fn verify(start: u64, pages: u64, last: u64, disk: Option<&mut DiskIo>) -> bool {
    if !verify_memory(start, pages, last) {
        return false;
    }
    match disk {
        None => println!("dirty: verified {pages} pages at step {last}: ok"),
        Some(d) => {
            if !verify_disk(d, start, pages) {
                return false;
            }
            let Some(filled) = verify_readback(d, pages) else { return false };
            println!(
                "dirty: verified {pages} pages, disk {pages} pages, readback {filled} pages at \
                 step {last}: ok"
            );
        }
    }
    true
}

/// Checks every page of the region against the steps up to `last`; prints what is wrong.
fn verify_memory(start: u64, pages: u64, last: u64) -> bool {
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
    true
}

/// Brings up disk0 for the `disk` word and places the readback region and its array after
/// the region; None (reported) if there is no disk, it is too small, or RAM is.
fn open_disk(info: &BootInfo, start: u64, pages: u64, size: u64, ram_end: u64) -> Option<DiskIo> {
    let readback = start + pages * PAGE;
    let last_read = readback + pages * PAGE;
    let end = last_read + (pages * 8).next_multiple_of(PAGE);
    if size / PAGE > pages || end > ram_end {
        println!(
            "dirty: FAILED: disk: the region, its readback region and array need {} KiB from \
             {start:#x}, usable RAM ends at {ram_end:#x}",
            (2 * size + (size / PAGE * 8).next_multiple_of(PAGE)) >> 10
        );
        return None;
    }
    let dev = match Device::open_nth(info, disk::VIRTIO_ID_BLOCK, 0) {
        Ok(dev) => dev,
        Err(why) => {
            println!("dirty: FAILED: disk: no disk0: {why}");
            return None;
        }
    };
    let sectors = disk::sectors(&dev);
    if sectors * 512 < pages * PAGE {
        println!(
            "dirty: FAILED: disk: disk0 has {sectors} sectors ({} KiB), smaller than the \
             region ({} KiB)",
            sectors / 2,
            pages * PAGE >> 10
        );
        return None;
    }
    for i in 0..pages {
        // SAFETY: usable RAM past the region, identity-mapped, that nothing else uses.
        unsafe { core::ptr::write_volatile((last_read + i * 8) as *mut u64, 0) };
    }
    Some(DiskIo { dev, readback, last_read, writes: 0, reads: 0 })
}

/// One disk request for the `disk` word; prints why it failed.
fn disk_request(d: &mut DiskIo, kind: u32, page: u64, addr: u64, step: u64) -> bool {
    let what = if kind == disk::VIRTIO_BLK_T_OUT { "write" } else { "read" };
    match disk::request_at(&mut d.dev, kind, page * (PAGE / 512), addr, PAGE as usize) {
        Ok(0) => true,
        Ok(status) => {
            println!("dirty: FAILED: disk {what} of page {page} at step {step}: status {status}");
            false
        }
        Err(why) => {
            println!("dirty: FAILED: disk {what} of page {page} at step {step}: {why}");
            false
        }
    }
}

/// With the `disk` word, after step `step`: writes its page to the disk, then reads the page
/// half a region away (if some step wrote it) into the readback region and checks it equals
/// that page in memory. Prints what failed.
fn disk_step(disk: Option<&mut DiskIo>, start: u64, pages: u64, step: u64) -> bool {
    let Some(d) = disk else { return true };
    let page = (step - 1) % pages;
    if !disk_request(d, disk::VIRTIO_BLK_T_OUT, page, start + page * PAGE, step) {
        return false;
    }
    d.writes += 1;
    let q = (page + pages / 2) % pages;
    // Steps 1..=step wrote pages 0..min(step, N).
    if q >= step {
        return true;
    }
    let into = d.readback + q * PAGE;
    if !disk_request(d, disk::VIRTIO_BLK_T_IN, q, into, step) {
        return false;
    }
    d.reads += 1;
    let base = start + q * PAGE;
    for i in 0..WORDS {
        // SAFETY: the region and the readback region are usable RAM past everything this
        // program uses, identity-mapped; the device is done with R[q].
        let (got, want) = unsafe {
            (
                core::ptr::read_volatile((into + i * 8) as *const u64),
                core::ptr::read_volatile((base + i * 8) as *const u64),
            )
        };
        if got != want {
            println!(
                "dirty: FAILED: page {q} read back from the disk at step {step}: word {i} is \
                 {got:#x}, memory holds {want:#x}"
            );
            return false;
        }
    }
    // The most recent step that wrote page q, whose data R[q] now holds.
    let held = step - (step - 1 - q) % pages;
    // SAFETY: the array lies past the readback region, as placed by `open_disk`.
    unsafe { core::ptr::write_volatile((d.last_read + q * 8) as *mut u64, held) };
    true
}

/// Reads every page back from the disk and compares it with memory; prints what is wrong.
fn verify_disk(d: &mut DiskIo, start: u64, pages: u64) -> bool {
    let per_request = disk::BUFFER as u64 / PAGE;
    let mut first = 0;
    while first < pages {
        let count = per_request.min(pages - first);
        match disk::read(&mut d.dev, first * (PAGE / 512), (count * PAGE) as usize) {
            Ok(0) => {}
            Ok(status) => {
                println!("dirty: FAILED: disk read of pages {first}.. returned status {status}");
                return false;
            }
            Err(why) => {
                println!("dirty: FAILED: disk read of pages {first}..: {why}");
                return false;
            }
        }
        let data = disk::data();
        for page in first..first + count {
            let at = ((page - first) * PAGE) as usize;
            for i in 0..WORDS as usize {
                let bytes = data[at + i * 8..at + i * 8 + 8].try_into().unwrap_or([0; 8]);
                let got = u64::from_le_bytes(bytes);
                // SAFETY: as in `run`.
                let want = unsafe {
                    core::ptr::read_volatile((start + page * PAGE + i as u64 * 8) as *const u64)
                };
                if got != want {
                    println!(
                        "dirty: FAILED: disk page {page} (offset {:#x}) word {i} is {got:#x}, \
                         memory holds {want:#x}",
                        page * PAGE
                    );
                    return false;
                }
            }
        }
        first += count;
    }
    true
}

/// Checks every filled page of the readback region holds the pattern of the step recorded
/// for it; returns how many were filled, None (reported) if one is wrong.
fn verify_readback(d: &DiskIo, pages: u64) -> Option<u64> {
    let mut filled = 0;
    for q in 0..pages {
        // SAFETY: the array and the readback region lie where `open_disk` placed them.
        let held = unsafe { core::ptr::read_volatile((d.last_read + q * 8) as *const u64) };
        if held == 0 {
            continue;
        }
        filled += 1;
        let base = d.readback + q * PAGE;
        // SAFETY: as above.
        let got = unsafe { core::ptr::read_volatile(base as *const u64) };
        if got != held {
            println!(
                "dirty: FAILED: readback of page {q} at {base:#x} holds step {got}, expected {held}"
            );
            return None;
        }
        for i in 1..WORDS {
            let want = word(q, held, i);
            // SAFETY: as above.
            let got = unsafe { core::ptr::read_volatile((base + i * 8) as *const u64) };
            if got != want {
                println!(
                    "dirty: FAILED: readback of page {q} word {i} is {got:#x}, expected {want:#x} (step {held})"
                );
                return None;
            }
        }
    }
    Some(filled)
}

/// With the `net:` word, every POLL_EVERY steps: answers what arrived (ARP, ping), asks for
/// the host's MAC address until known, and sends it `dirty step <n>`.
fn net_step(n: &mut NetIo, step: u64) -> Result<(), &'static str> {
    n.host.receive_pending()?;
    n.host.resolve(io::rdtsc())?;
    let mut buf = [0u8; 40];
    let mut text = super::net::Cursor { buf: &mut buf, len: 0 };
    core::fmt::Write::write_fmt(&mut text, format_args!("dirty step {step}\n"))
        .map_err(|_| "datagram too long")?;
    let len = text.len;
    if n.host.udp_to_peer(NET_PORT, &buf[..len])? {
        n.sent += 1;
    }
    Ok(())
}
