//! A polling virtio-mmio (version 2) driver: finds devices from the `virtio_mmio.device=`
//! words on the command line, negotiates VIRTIO_F_VERSION_1, and runs split virtqueue 0 out of
//! static, identity-mapped memory. Interrupts stay off; completion is polled in the used ring.

use crate::bootinfo::BootInfo;
use crate::io;
use core::sync::atomic::{fence, Ordering};

const MAGIC: u32 = 0x7472_6976;
const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC: u64 = 0x080;
const REG_QUEUE_DRIVER: u64 = 0x090;
const REG_QUEUE_DEVICE: u64 = 0x0a0;
const STATUS_ACK: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_NEEDS_RESET: u32 = 0x40;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
/// Queue entries used by this driver.
const QUEUE_SIZE: u16 = 8;

/// Ring memory for one queue: descriptors at 0, available ring at 0x400, used ring at 0x800.
#[repr(C, align(4096))]
struct RingPage([u8; 4096]);
/// Most devices the driver handles (one ring page each, by command-line position).
const MAX_DEVICES: usize = 8;
static mut RINGS: [RingPage; MAX_DEVICES] = [const { RingPage([0; 4096]) }; MAX_DEVICES];

/// The virtio-mmio windows named on the command line (`virtio_mmio.device=4K@0xd0000000:16`).
pub fn windows(info: &BootInfo) -> impl Iterator<Item = u64> + '_ {
    info.words().filter_map(|w| {
        let spec = w.strip_prefix("virtio_mmio.device=")?;
        let (_, rest) = spec.split_once('@')?;
        let base = rest.split(':').next()?;
        u64::from_str_radix(base.strip_prefix("0x")?, 16).ok()
    })
}

/// A device whose queue 0 is running.
pub struct Device {
    base: u64,
    rings: u64,
    features: u64,
    next_avail: u16,
    last_used: u16,
}

fn read32(addr: u64) -> u32 {
    // SAFETY: a virtio-mmio register in the identity-mapped, user-accessible MMIO hole.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

fn write32(addr: u64, value: u32) {
    // SAFETY: as read32.
    unsafe { core::ptr::write_volatile(addr as *mut u32, value) }
}

fn ring_page(slot: usize) -> u64 {
    core::ptr::addr_of!(RINGS) as u64 + 4096 * slot as u64
}

impl Device {
    /// Finds the first device of `device_id` on the command line and brings queue 0 up.
    pub fn open(info: &BootInfo, device_id: u32) -> Result<Device, &'static str> {
        Self::open_nth(info, device_id, 0)
    }

    /// Brings up the `nth` device (counting from 0) of `device_id` on the command line.
    pub fn open_nth(info: &BootInfo, device_id: u32, nth: usize) -> Result<Device, &'static str> {
        let (slot, base) = windows(info)
            .enumerate()
            .filter(|(_, b)| {
                read32(b + REG_MAGIC) == MAGIC && read32(b + REG_DEVICE_ID) == device_id
            })
            .nth(nth)
            .ok_or("no such virtio-mmio device on the command line")?;
        if slot >= MAX_DEVICES {
            return Err("too many virtio-mmio devices for the driver");
        }
        let rings = ring_page(slot);
        if read32(base + REG_VERSION) != 2 {
            return Err("not a virtio-mmio version 2 device");
        }
        let reg = |r: u64| base + r;
        write32(reg(REG_STATUS), 0);
        write32(reg(REG_STATUS), STATUS_ACK);
        write32(reg(REG_STATUS), STATUS_ACK | STATUS_DRIVER);
        write32(reg(REG_DEVICE_FEATURES_SEL), 0);
        let low = read32(reg(REG_DEVICE_FEATURES));
        write32(reg(REG_DEVICE_FEATURES_SEL), 1);
        let high = read32(reg(REG_DEVICE_FEATURES));
        let features = u64::from(low) | (u64::from(high) << 32);
        if high & 1 == 0 {
            return Err("device does not offer VIRTIO_F_VERSION_1");
        }
        write32(reg(REG_DRIVER_FEATURES_SEL), 0);
        write32(reg(REG_DRIVER_FEATURES), 0);
        write32(reg(REG_DRIVER_FEATURES_SEL), 1);
        write32(reg(REG_DRIVER_FEATURES), 1);
        write32(reg(REG_STATUS), STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK);
        if read32(reg(REG_STATUS)) & STATUS_FEATURES_OK == 0 {
            return Err("device refused the features");
        }
        write32(reg(REG_QUEUE_SEL), 0);
        if read32(reg(REG_QUEUE_NUM_MAX)) < u32::from(QUEUE_SIZE) {
            return Err("queue 0 is too small");
        }
        // SAFETY: only the boot vCPU drives virtio devices; the page is this device's.
        unsafe { core::ptr::write_bytes(rings as *mut u8, 0, 4096) };
        write32(reg(REG_QUEUE_NUM), u32::from(QUEUE_SIZE));
        for (r, offset) in
            [(REG_QUEUE_DESC, 0), (REG_QUEUE_DRIVER, 0x400), (REG_QUEUE_DEVICE, 0x800)]
        {
            let addr = rings + offset;
            write32(reg(r), addr as u32);
            write32(reg(r + 4), (addr >> 32) as u32);
        }
        write32(reg(REG_QUEUE_READY), 1);
        let all = STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        write32(reg(REG_STATUS), all);
        if read32(reg(REG_STATUS)) & (STATUS_NEEDS_RESET | STATUS_DRIVER_OK) != STATUS_DRIVER_OK {
            return Err("device did not accept DRIVER_OK");
        }
        Ok(Device { base, rings, features, next_avail: 0, last_used: 0 })
    }

    /// The device's register window.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// The features the device offered.
    pub fn offered_features(&self) -> u64 {
        self.features
    }

    /// Reads a 32-bit word of the device-specific configuration space.
    pub fn config32(&self, offset: u64) -> u32 {
        read32(self.base + 0x100 + offset)
    }

    /// Offers one device-writable buffer, notifies, and waits for the device to use it;
    /// returns the length the device wrote.
    pub fn fill(&mut self, buf: &mut [u8]) -> Result<u32, &'static str> {
        self.submit(&[(buf.as_mut_ptr() as u64, buf.len() as u32, true)])
    }

    /// Offers one chain of (address, length, device-writable) buffers, notifies, and waits
    /// for the device to use it; returns the used length. Uses descriptors 0.. of the table,
    /// one request at a time.
    pub fn submit(&mut self, parts: &[(u64, u32, bool)]) -> Result<u32, &'static str> {
        if parts.is_empty() || parts.len() > usize::from(QUEUE_SIZE) {
            return Err("bad request shape");
        }
        let avail = self.rings + 0x400;
        let used = self.rings + 0x800;
        // SAFETY: the ring page belongs to this device's driver and lies in identity-mapped
        // RAM; the device reads it only after the notify below.
        unsafe {
            for (i, (addr, len, writable)) in parts.iter().enumerate() {
                let desc = self.rings + 16 * i as u64;
                let last = i + 1 == parts.len();
                let flags =
                    if *writable { DESC_F_WRITE } else { 0 } | if last { 0 } else { DESC_F_NEXT };
                core::ptr::write_volatile(desc as *mut u64, *addr);
                core::ptr::write_volatile((desc + 8) as *mut u32, *len);
                core::ptr::write_volatile((desc + 12) as *mut u16, flags);
                core::ptr::write_volatile(
                    (desc + 14) as *mut u16,
                    if last { 0 } else { i as u16 + 1 },
                );
            }
            let slot = self.next_avail % QUEUE_SIZE;
            core::ptr::write_volatile((avail + 4 + 2 * u64::from(slot)) as *mut u16, 0);
            fence(Ordering::SeqCst);
            self.next_avail = self.next_avail.wrapping_add(1);
            core::ptr::write_volatile((avail + 2) as *mut u16, self.next_avail);
        }
        fence(Ordering::SeqCst);
        write32(self.base + REG_QUEUE_NOTIFY, 0);
        let deadline = io::rdtsc() + 10_000_000_000;
        loop {
            // SAFETY: as above; the device writes the used ring.
            let idx = unsafe { core::ptr::read_volatile((used + 2) as *const u16) };
            if idx != self.last_used {
                fence(Ordering::SeqCst);
                let elem = used + 4 + 8 * u64::from(self.last_used % QUEUE_SIZE);
                self.last_used = self.last_used.wrapping_add(1);
                // SAFETY: as above.
                return Ok(unsafe { core::ptr::read_volatile((elem + 4) as *const u32) });
            }
            if io::rdtsc() > deadline {
                return Err("the device did not use the buffer");
            }
            core::hint::spin_loop();
        }
    }
}
