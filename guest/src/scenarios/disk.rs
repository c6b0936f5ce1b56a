//! `disk`: reads every virtio-blk disk (`vanguard run --disk ...`) whole through the polling
//! virtio-mmio driver and prints its MD5, in the order of the `--disk` flags.

use crate::bootinfo::BootInfo;
use crate::md5::Md5;
use crate::println;
use crate::virtio::Device;

const VIRTIO_ID_BLOCK: u32 = 2;
const VIRTIO_BLK_T_IN: u32 = 0;
/// Bytes per read request.
const CHUNK: usize = 64 * 1024;

#[repr(C, align(4096))]
struct Buffer([u8; CHUNK]);
static mut DATA: Buffer = Buffer([0; CHUNK]);
#[repr(C, align(16))]
struct Header([u8; 16]);
static mut HEADER: Header = Header([0; 16]);
static mut STATUS: u8 = 0;

/// Reads `len` bytes at `sector` into the data buffer; returns the status byte.
pub fn read(dev: &mut Device, sector: u64, len: usize) -> Result<u8, &'static str> {
    // SAFETY: the boot vCPU alone drives disks; these buffers are only used here.
    unsafe {
        let header = core::ptr::addr_of_mut!(HEADER) as *mut u8;
        core::ptr::write_volatile(header as *mut u32, VIRTIO_BLK_T_IN);
        core::ptr::write_volatile(header.add(4) as *mut u32, 0);
        core::ptr::write_volatile(header.add(8) as *mut u64, sector);
        core::ptr::write_volatile(core::ptr::addr_of_mut!(STATUS), 0xff);
        dev.submit(&[
            (header as u64, 16, false),
            (core::ptr::addr_of_mut!(DATA) as u64, len as u32, true),
            (core::ptr::addr_of_mut!(STATUS) as u64, 1, true),
        ])?;
        Ok(core::ptr::read_volatile(core::ptr::addr_of!(STATUS)))
    }
}

/// Runs the scenario.
pub fn run(info: &BootInfo, _arg: Option<&str>) -> bool {
    let mut ok = true;
    let mut n = 0;
    while let Ok(mut dev) = Device::open_nth(info, VIRTIO_ID_BLOCK, n) {
        let sectors = u64::from(dev.config32(0)) | (u64::from(dev.config32(4)) << 32);
        let total = sectors * 512;
        let mut md5 = Md5::new();
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
            let data: &[u8; CHUNK] = unsafe { &(*core::ptr::addr_of!(DATA)).0 };
            md5.update(&data[..len]);
            done += len as u64;
        }
        let digest = md5.hex();
        println!("disk{n} md5 {}", core::str::from_utf8(&digest).unwrap_or("?"));
        println!("disk{n}: {sectors} sectors");
        n += 1;
    }
    if n == 0 {
        println!("disk: FAILED: no virtio-blk device on the command line");
        return false;
    }
    ok
}
