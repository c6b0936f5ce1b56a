//! `disk`: reads every virtio-blk disk (`vanguard run --disk ...`) whole through the polling
//! virtio-mmio driver and prints its MD5, in the order of the `--disk` flags.

use crate::bootinfo::BootInfo;
use crate::md5::Md5;
use crate::println;
use crate::virtio::Device;

const VIRTIO_ID_BLOCK: u32 = 2;
const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Bytes per read request of the `disk` scenario.
const CHUNK: usize = 64 * 1024;
/// The data buffer: large enough for the benchmark's 1 MiB requests.
const BUFFER: usize = 1 << 20;

#[repr(C, align(4096))]
struct Buffer([u8; BUFFER]);
static mut DATA: Buffer = Buffer([0; BUFFER]);
#[repr(C, align(16))]
struct Header([u8; 16]);
static mut HEADER: Header = Header([0; 16]);
static mut STATUS: u8 = 0;

/// Sends a request of `kind` at `sector` with `len` bytes of the data buffer (device-writable
/// for reads, device-readable for writes; none for a flush); returns the status byte.
fn request(dev: &mut Device, kind: u32, sector: u64, len: usize) -> Result<u8, &'static str> {
    // SAFETY: the boot vCPU alone drives disks; these buffers are only used here.
    unsafe {
        let header = core::ptr::addr_of_mut!(HEADER) as *mut u8;
        core::ptr::write_volatile(header as *mut u32, kind);
        core::ptr::write_volatile(header.add(4) as *mut u32, 0);
        core::ptr::write_volatile(header.add(8) as *mut u64, sector);
        core::ptr::write_volatile(core::ptr::addr_of_mut!(STATUS), 0xff);
        let data = (core::ptr::addr_of_mut!(DATA) as u64, len as u32, kind == VIRTIO_BLK_T_IN);
        let status = (core::ptr::addr_of_mut!(STATUS) as u64, 1, true);
        let head = (header as u64, 16, false);
        if len == 0 {
            dev.submit(&[head, status])?;
        } else {
            dev.submit(&[head, data, status])?;
        }
        Ok(core::ptr::read_volatile(core::ptr::addr_of!(STATUS)))
    }
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
fn sectors(dev: &Device) -> u64 {
    u64::from(dev.config32(0)) | (u64::from(dev.config32(4)) << 32)
}

fn data() -> &'static mut [u8; BUFFER] {
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
/// flight, in TSC cycles (the host converts; the guest TSC is the host's).
pub fn run_bench(info: &BootInfo, arg: Option<&str>) -> bool {
    let Some(ops) = super::number_arg("diskbench", arg, 2000) else { return false };
    let Ok(mut dev) = Device::open_nth(info, VIRTIO_ID_BLOCK, 0) else {
        println!("diskbench: FAILED: no virtio-blk device on the command line");
        return false;
    };
    let total = sectors(&dev) * 512;
    let mib = BUFFER as u64;
    let whole = total / mib * mib;
    if whole == 0 {
        println!("diskbench: FAILED: the disk is smaller than 1 MiB");
        return false;
    }
    for (name, kind) in [("seqread", VIRTIO_BLK_T_IN), ("seqwrite", VIRTIO_BLK_T_OUT)] {
        let start = crate::io::rdtsc();
        let mut offset = 0;
        while offset < whole {
            if request(&mut dev, kind, offset / 512, BUFFER) != Ok(0) {
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
    true
}
