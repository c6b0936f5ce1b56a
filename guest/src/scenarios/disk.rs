//! `disk`: reads every virtio-blk disk (`vanguard run --disk ...`) whole through the polling
//! virtio driver (virtio-pci or virtio-mmio) and prints its MD5, in the order of the `--disk`
//! flags; `diskwrite` and `diskbench` use the same requests.

use crate::bootinfo::BootInfo;
use crate::md5::Md5;
use crate::println;
use crate::virtio::Device;

pub(super) const VIRTIO_ID_BLOCK: u32 = 2;
pub(super) const VIRTIO_BLK_T_IN: u32 = 0;
pub(super) const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Bytes per read request of the `disk` scenario.
const CHUNK: usize = 64 * 1024;
/// The data buffer: large enough for the benchmark's 1 MiB requests.
pub(super) const BUFFER: usize = 1 << 20;
/// Bytes per request of the benchmark's sequential passes.
const SEQ_REQUEST: u64 = 1 << 20;
/// Requests in flight in the benchmark's QD32 passes.
const DEPTH: usize = 32;
/// Descriptors per request: header, data, status.
const DESCRIPTORS_PER_REQUEST: u16 = 3;

#[repr(C, align(4096))]
struct Buffer([u8; BUFFER]);
static mut DATA: Buffer = Buffer([0; BUFFER]);
/// Request headers (type u32, reserved u32, sector u64) and status bytes, one per request
/// that can be in flight, so that concurrent requests never share them.
#[repr(C, align(16))]
struct Headers([[u8; 16]; DEPTH]);
static mut HEADERS: Headers = Headers([[0; 16]; DEPTH]);
static mut STATUSES: [u8; DEPTH] = [0; DEPTH];

/// Fills in request slot `slot`'s header (and marks its status byte unwritten); returns the
/// descriptors for the header and the status byte.
fn prepare(slot: usize, kind: u32, sector: u64) -> ((u64, u32, bool), (u64, u32, bool)) {
    // SAFETY: the boot vCPU alone drives disks, and slot `slot` is not in flight.
    unsafe {
        let header = core::ptr::addr_of_mut!(HEADERS.0[slot]) as *mut u8;
        core::ptr::write_volatile(header as *mut u32, kind);
        core::ptr::write_volatile(header.add(4) as *mut u32, 0);
        core::ptr::write_volatile(header.add(8) as *mut u64, sector);
        let status = core::ptr::addr_of_mut!(STATUSES[slot]);
        core::ptr::write_volatile(status, 0xff);
        ((header as u64, 16, false), (status as u64, 1, true))
    }
}

/// The status byte the device wrote for request slot `slot`.
fn status_of(slot: usize) -> u8 {
    // SAFETY: the request in `slot` is complete, so the device no longer writes the byte.
    unsafe { core::ptr::read_volatile(core::ptr::addr_of!(STATUSES[slot])) }
}

/// Sends a request of `kind` at `sector` with `len` bytes of the data buffer (device-writable
/// for reads, device-readable for writes; none for a flush); returns the status byte.
fn request(dev: &mut Device, kind: u32, sector: u64, len: usize) -> Result<u8, &'static str> {
    request_at(dev, kind, sector, core::ptr::addr_of_mut!(DATA) as u64, len)
}

/// `request` with `len` bytes at guest address `addr` instead of the data buffer (identity-
/// mapped memory the caller does not touch until the request completes).
pub(super) fn request_at(
    dev: &mut Device,
    kind: u32,
    sector: u64,
    addr: u64,
    len: usize,
) -> Result<u8, &'static str> {
    let (head, status) = prepare(0, kind, sector);
    let data = (addr, len as u32, kind == VIRTIO_BLK_T_IN);
    if len == 0 {
        dev.submit(&[head, status])?;
    } else {
        dev.submit(&[head, data, status])?;
    }
    Ok(status_of(0))
}

/// Reads `count` requests of `len` bytes each, keeping up to 32 in flight (fewer if the
/// queue is small): request i reads at sector `sector_of(i)` into `buffers + slot * len`,
/// where `slot` (below 32) is a request slot not in flight. As completions come back (in any
/// order) their slots take the next requests, with one notification per batch posted.
/// Returns the TSC cycles from the first request to the last completion.
fn read_queued(
    dev: &mut Device,
    len: u32,
    buffers: u64,
    count: u64,
    mut sector_of: impl FnMut(u64) -> u64,
) -> Result<u64, &'static str> {
    let depth = DEPTH.min(usize::from(dev.free_descriptors() / DESCRIPTORS_PER_REQUEST));
    if depth == 0 {
        return Err("the queue is too small");
    }
    // Free request slots (a stack), and which slot each head descriptor carries.
    let mut free = [0u8; DEPTH];
    for (i, slot) in free.iter_mut().enumerate() {
        *slot = (DEPTH - 1 - i) as u8;
    }
    let mut free_count = depth;
    let mut slot_of = [0u8; crate::virtio::MAX_QUEUE_SIZE as usize];
    let (mut issued, mut done) = (0, 0);
    let start = crate::io::rdtsc();
    while done < count {
        let mut posted = false;
        while issued < count && free_count > 0 {
            free_count -= 1;
            let slot = usize::from(free[free_count]);
            let (head, status) = prepare(slot, VIRTIO_BLK_T_IN, sector_of(issued));
            let data = (buffers + slot as u64 * u64::from(len), len, true);
            let id = dev.post(&[head, data, status])?;
            slot_of[usize::from(id)] = slot as u8;
            issued += 1;
            posted = true;
        }
        if posted {
            dev.notify();
        }
        let mut completion = Some(dev.wait()?);
        while let Some((id, _)) = completion {
            let slot = slot_of[usize::from(id)];
            if status_of(usize::from(slot)) != 0 {
                return Err("a read returned an error status");
            }
            free[free_count] = slot;
            free_count += 1;
            done += 1;
            completion = dev.poll()?;
        }
    }
    Ok(crate::io::rdtsc() - start)
}

/// Reads `len` bytes at `sector` into the data buffer; returns the status byte.
pub fn read(dev: &mut Device, sector: u64, len: usize) -> Result<u8, &'static str> {
    request(dev, VIRTIO_BLK_T_IN, sector, len)
}

/// The byte the `diskwrite` scenario writes at disk offset `offset` (documented in
/// docs/test-guest.md so the host can check the image).
pub fn pattern(offset: u64) -> u8 {
    (offset ^ (offset >> 9) ^ 0xa5) as u8
}

/// The disk's capacity in 512-byte sectors (config space offset 0, 64 bits).
pub(super) fn sectors(dev: &Device) -> u64 {
    u64::from(dev.config32(0)) | (u64::from(dev.config32(4)) << 32)
}

pub(super) fn data() -> &'static mut [u8; BUFFER] {
    // SAFETY: the boot vCPU alone uses the buffer, and not while a request is in flight.
    unsafe { &mut (*core::ptr::addr_of_mut!(DATA)).0 }
}

/// `diskwrite[=SIZE]`: on every disk, writes the pattern over the first SIZE bytes (default
/// 1M, clipped to the disk), flushes, reads it back and checks it.
pub fn run_write(info: &BootInfo, arg: Option<&str>) -> bool {
    let Some(size) = arg.map_or(Some(1 << 20), crate::bootinfo::parse_size) else {
        return super::bad("diskwrite", arg);
    };
    let mut ok = true;
    let mut n = 0;
    while let Ok(mut dev) = Device::open_nth(info, VIRTIO_ID_BLOCK, n) {
        let total = sectors(&dev) * 512;
        let len_total = size.min(total) & !511;
        let mut done = 0u64;
        let mut failure = None;
        while done < len_total && failure.is_none() {
            let len = (len_total - done).min(CHUNK as u64) as usize;
            for (i, b) in data()[..len].iter_mut().enumerate() {
                *b = pattern(done + i as u64);
            }
            match request(&mut dev, VIRTIO_BLK_T_OUT, done / 512, len) {
                Ok(0) => done += len as u64,
                Ok(status) => failure = Some(("write", status)),
                Err(_) => failure = Some(("write", 0xff)),
            }
        }
        if failure.is_none() {
            match request(&mut dev, VIRTIO_BLK_T_FLUSH, 0, 0) {
                Ok(0) => {}
                Ok(status) => failure = Some(("flush", status)),
                Err(_) => failure = Some(("flush", 0xff)),
            }
        }
        let mut checked = 0u64;
        while failure.is_none() && checked < len_total {
            let len = (len_total - checked).min(CHUNK as u64) as usize;
            match read(&mut dev, checked / 512, len) {
                Ok(0) => {}
                Ok(status) => failure = Some(("read", status)),
                Err(_) => failure = Some(("read", 0xff)),
            }
            if failure.is_none()
                && data()[..len].iter().enumerate().any(|(i, b)| *b != pattern(checked + i as u64))
            {
                failure = Some(("verify", 0));
            }
            checked += len as u64;
        }
        let read_only = dev.offered_features() & VIRTIO_BLK_F_RO != 0;
        match (failure, read_only) {
            (None, false) => {
                println!("disk{n} write: wrote, flushed and verified {} KiB: ok", len_total >> 10)
            }
            (Some(("write", VIRTIO_BLK_S_IOERR)), true) if done == 0 => {
                println!("disk{n} write: refused, the disk is read-only: ok")
            }
            (None, true) => {
                println!("disk{n} write: FAILED: a read-only disk accepted writes");
                ok = false;
            }
            (Some((what, status)), _) => {
                println!("disk{n} write: FAILED at {what} (status {status})");
                ok = false;
            }
        }
        n += 1;
    }
    if n == 0 {
        println!("diskwrite: FAILED: no virtio-blk device on the command line");
        return false;
    }
    ok
}

/// Runs the scenario.
pub fn run(info: &BootInfo, _arg: Option<&str>) -> bool {
    let mut ok = true;
    let mut n = 0;
    while let Ok(mut dev) = Device::open_nth(info, VIRTIO_ID_BLOCK, n) {
        let sectors = sectors(&dev);
        let total = sectors * 512;
        let mut md5 = Md5::new();
        let start = crate::io::rdtsc();
        let mut done = 0u64;
        while done < total {
            let len = (total - done).min(CHUNK as u64) as usize;
            match read(&mut dev, done / 512, len) {
                Ok(0) => {}
                Ok(status) => {
                    println!(
                        "disk{n}: FAILED: read at sector {} returned status {status}",
                        done / 512
                    );
                    ok = false;
                    break;
                }
                Err(why) => {
                    println!("disk{n}: FAILED: {why}");
                    ok = false;
                    break;
                }
            }
            // SAFETY: the device wrote `len` bytes into the buffer and is done with it.
            let data: &[u8; BUFFER] = unsafe { &(*core::ptr::addr_of!(DATA)).0 };
            md5.update(&data[..len]);
            done += len as u64;
        }
        let digest = md5.hex();
        println!("disk{n} md5 {}", core::str::from_utf8(&digest).unwrap_or("?"));
        println!("disk{n}: {sectors} sectors");
        println!("disk{n}: read in {} cycles", crate::io::rdtsc() - start);
        n += 1;
    }
    if n == 0 {
        println!("disk: FAILED: no virtio-blk device on the command line");
        return false;
    }
    ok
}

/// `diskbench[=OPS]`: on disk0, times sequential 1 MiB reads over the whole disk, sequential
/// 1 MiB writes over the whole disk, and OPS (default 2000) random 4 KiB reads, one request in
/// flight; then OPS random 4 KiB reads and sequential reads over the whole disk with 32
/// requests in flight; in TSC cycles (the host converts; the guest TSC is the host's).
pub fn run_bench(info: &BootInfo, arg: Option<&str>) -> bool {
    let Some(ops) = super::number_arg("diskbench", arg, 2000) else { return false };
    let Ok(mut dev) = Device::open_nth(info, VIRTIO_ID_BLOCK, 0) else {
        println!("diskbench: FAILED: no virtio-blk device on the command line");
        return false;
    };
    let total = sectors(&dev) * 512;
    let mib = SEQ_REQUEST;
    let whole = total / mib * mib;
    if whole == 0 {
        println!("diskbench: FAILED: the disk is smaller than 1 MiB");
        return false;
    }
    for (name, kind) in [("seqread", VIRTIO_BLK_T_IN), ("seqwrite", VIRTIO_BLK_T_OUT)] {
        let start = crate::io::rdtsc();
        let mut offset = 0;
        while offset < whole {
            if request(&mut dev, kind, offset / 512, SEQ_REQUEST as usize) != Ok(0) {
                println!("diskbench: FAILED: {name} at {offset}");
                return false;
            }
            offset += mib;
        }
        let cycles = crate::io::rdtsc() - start;
        println!("diskbench: {name} {whole} bytes in {cycles} cycles");
    }
    let blocks = total / 4096;
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let start = crate::io::rdtsc();
    for _ in 0..ops {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let sector = (x % blocks) * 8;
        if read(&mut dev, sector, 4096) != Ok(0) {
            println!("diskbench: FAILED: random read at sector {sector}");
            return false;
        }
    }
    let cycles = crate::io::rdtsc() - start;
    println!("diskbench: randread4k {ops} ops in {cycles} cycles");
    let data = core::ptr::addr_of_mut!(DATA) as u64;
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let random = |_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % blocks) * 8
    };
    match read_queued(&mut dev, 4096, data, ops, random) {
        Ok(cycles) => println!("diskbench: randread4k-qd32 {ops} ops in {cycles} cycles"),
        Err(why) => {
            println!("diskbench: FAILED: randread4k-qd32: {why}");
            return false;
        }
    }
    // 32 requests of 1 MiB in flight where free RAM allows, else of 32 KiB in the data buffer.
    let (len, buffers) = match scratch(info, SEQ_REQUEST * DEPTH as u64) {
        Some(at) => (SEQ_REQUEST, at),
        None => ((BUFFER / DEPTH) as u64, data),
    };
    let count = whole / len;
    match read_queued(&mut dev, len as u32, buffers, count, |i| i * len / 512) {
        Ok(cycles) => println!("diskbench: seqread-qd32 {whole} bytes in {cycles} cycles"),
        Err(why) => {
            println!("diskbench: FAILED: seqread-qd32: {why}");
            return false;
        }
    }
    true
}

/// `bytes` of usable RAM below 4 GiB (identity-mapped) that the guest does not otherwise use:
/// past its image and per-vCPU areas. Every page is touched once, so that the host's first
/// touch of guest memory is not part of a timed pass.
pub(super) fn scratch(info: &BootInfo, bytes: u64) -> Option<u64> {
    let cpus = crate::smp::PRESENT.load(core::sync::atomic::Ordering::Relaxed);
    let floor = super::mem::first_free(cpus);
    let start = info.ram().iter().find_map(|r| {
        let start = r.start.max(floor);
        (start + bytes <= r.end.min(1 << 32)).then_some(start)
    })?;
    for page in (start..start + bytes).step_by(4096) {
        // SAFETY: usable RAM that nothing else in the guest uses, identity-mapped.
        unsafe { core::ptr::write_volatile(page as *mut u8, 0) };
    }
    Some(start)
}
