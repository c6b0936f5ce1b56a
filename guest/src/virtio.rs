//! A polling virtio driver for two transports: virtio-pci (modern, virtio 1.x section 4.1:
//! functions on PCI bus 0, registers in the BARs their vendor capabilities name) and
//! virtio-mmio version 2 (windows named by the `virtio_mmio.device=` words on the command
//! line). It negotiates VIRTIO_F_VERSION_1 (plus what a caller asks for and the device offers)
//! and runs split virtqueues (queue 0, or queues 0 and 1 for a network card) out of static,
//! identity-mapped memory, one ring page per queue. Interrupts stay off; completion is polled
//! in the used ring.
//!
//! Requests are chains of descriptors taken from a queue's free list, so several can be in
//! flight (up to 128 descriptors' worth): `post` chains, `notify` once, and reap completions
//! with `poll`/`wait` in whatever order the device finishes them, matched by the head
//! descriptor `post` returned. `submit` and `fill` are one request at a time. The methods
//! without a queue argument use queue 0; `post_to`, `notify_queue`, `poll_queue` and
//! `wait_queue` name the queue.

use crate::bootinfo::BootInfo;
use crate::io;
use crate::pci;
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
const REG_CONFIG: u64 = 0x100;

/// virtio-pci: the vendor, the first modern device ID (0x1040 + type), the vendor-specific
/// capability and its `cfg_type`s.
const PCI_VENDOR: u16 = 0x1af4;
const PCI_DEVICE_BASE: u16 = 0x1040;
const PCI_CAP_VENDOR: u8 = 0x09;
const PCI_CAP_COMMON: u8 = 1;
const PCI_CAP_NOTIFY: u8 = 2;
const PCI_CAP_DEVICE: u8 = 4;
/// Common configuration offsets (4.1.4.3).
const COMMON_DEVICE_FEATURE_SELECT: u64 = 0x00;
const COMMON_DEVICE_FEATURE: u64 = 0x04;
const COMMON_DRIVER_FEATURE_SELECT: u64 = 0x08;
const COMMON_DRIVER_FEATURE: u64 = 0x0c;
const COMMON_STATUS: u64 = 0x14;
const COMMON_QUEUE_SELECT: u64 = 0x16;
const COMMON_QUEUE_SIZE: u64 = 0x18;
const COMMON_QUEUE_MSIX_VECTOR: u64 = 0x1a;
const COMMON_QUEUE_ENABLE: u64 = 0x1c;
const COMMON_QUEUE_NOTIFY_OFF: u64 = 0x1e;
const COMMON_QUEUE_DESC: u64 = 0x20;
const COMMON_QUEUE_DRIVER: u64 = 0x28;
const COMMON_QUEUE_DEVICE: u64 = 0x30;

const STATUS_ACK: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_NEEDS_RESET: u32 = 0x40;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
/// The most queue entries this driver uses (less if the device offers less).
pub const MAX_QUEUE_SIZE: u16 = 128;
/// Ring page layout for a 128-entry queue: descriptors (16 bytes each) at 0, the available
/// ring (4 + 2 * 128 + 2 bytes) at 0x800, the used ring (4 + 8 * 128 + 2 bytes) at 0xa00.
const AVAIL_OFFSET: u64 = 0x800;
const USED_OFFSET: u64 = 0xa00;
/// TSC cycles to wait for a device (a few seconds).
const TIMEOUT: u64 = 10_000_000_000;

/// Ring memory for one queue.
#[repr(C, align(4096))]
struct RingPage([u8; 4096]);
/// Most devices the driver handles, by position in `devices`.
const MAX_DEVICES: usize = 32;
/// Most queues the driver runs on one device (a network card's receive and transmit queues).
pub const MAX_QUEUES: usize = 2;
/// One ring page per queue: device n's queue q has page n * MAX_QUEUES + q.
static mut RINGS: [RingPage; MAX_DEVICES * MAX_QUEUES] =
    [const { RingPage([0; 4096]) }; MAX_DEVICES * MAX_QUEUES];

/// The virtio-mmio windows named on the command line (`virtio_mmio.device=4K@0xd0000000:16`).
pub fn windows(info: &BootInfo) -> impl Iterator<Item = u64> + '_ {
    info.words().filter_map(|w| {
        let spec = w.strip_prefix("virtio_mmio.device=")?;
        let (_, rest) = spec.split_once('@')?;
        let base = rest.split(':').next()?;
        u64::from_str_radix(base.strip_prefix("0x")?, 16).ok()
    })
}

/// Where a virtio device is.
#[derive(Clone, Copy)]
pub enum Location {
    /// Function 0 of this device on PCI bus 0.
    Pci(pci::Function),
    /// A virtio-mmio window at this address.
    Mmio(u64),
}

/// A virtio device found on either transport.
#[derive(Clone, Copy)]
pub struct Found {
    /// Where it is.
    pub location: Location,
    /// The virtio device type (1 net, 2 block, 4 entropy, ...).
    pub device_type: u32,
    /// Its position in `devices`, which picks its ring page.
    index: usize,
}

/// Every virtio device: modern virtio-pci functions on bus 0 in slot order, then the
/// virtio-mmio windows of the command line that hold a device, in command-line order.
pub fn devices(info: &BootInfo) -> impl Iterator<Item = Found> + '_ {
    let on_pci = pci::functions().filter_map(|(function, vendor, id)| {
        let modern =
            vendor == PCI_VENDOR && (PCI_DEVICE_BASE..PCI_DEVICE_BASE + 0x40).contains(&id);
        modern.then_some((Location::Pci(function), u32::from(id - PCI_DEVICE_BASE)))
    });
    let on_mmio = windows(info).filter_map(|base| {
        if read32(base + REG_MAGIC) != MAGIC {
            return None;
        }
        let id = read32(base + REG_DEVICE_ID);
        (id != 0).then_some((Location::Mmio(base), id))
    });
    on_pci.chain(on_mmio).enumerate().map(|(index, (location, device_type))| Found {
        location,
        device_type,
        index,
    })
}

fn read8(addr: u64) -> u8 {
    // SAFETY: callers pass a device register (a virtio-mmio window or a virtio-pci BAR
    // region, in the identity-mapped, user-accessible MMIO hole below 4 GiB) or a field of
    // this driver's ring page (identity-mapped RAM that only the boot vCPU uses), aligned.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

fn read16(addr: u64) -> u16 {
    // SAFETY: as read8.
    unsafe { core::ptr::read_volatile(addr as *const u16) }
}

fn read32(addr: u64) -> u32 {
    // SAFETY: as read8.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

fn write8(addr: u64, value: u8) {
    // SAFETY: as read8.
    unsafe { core::ptr::write_volatile(addr as *mut u8, value) }
}

fn write16(addr: u64, value: u16) {
    // SAFETY: as read8.
    unsafe { core::ptr::write_volatile(addr as *mut u16, value) }
}

fn write32(addr: u64, value: u32) {
    // SAFETY: as read8.
    unsafe { core::ptr::write_volatile(addr as *mut u32, value) }
}

fn ring_page(device: usize, queue: usize) -> u64 {
    core::ptr::addr_of!(RINGS) as u64 + 4096 * (device * MAX_QUEUES + queue) as u64
}

/// The transport's registers.
#[derive(Clone, Copy)]
enum Regs {
    Mmio {
        base: u64,
    },
    Pci {
        /// Common configuration, notification region, device configuration.
        common: u64,
        notify: u64,
        notify_multiplier: u32,
        device: u64,
    },
}

/// The virtio-pci regions a function's vendor capabilities describe: (common, notify base,
/// notify_off_multiplier, device).
fn pci_regions(function: pci::Function) -> Result<(u64, u64, u32, u64), &'static str> {
    let (mut common, mut notify, mut device) = (None, None, None);
    for (id, at) in function.capabilities() {
        if id != PCI_CAP_VENDOR {
            continue;
        }
        let cfg_type = function.read8(at + 3);
        let region = || -> Result<u64, &'static str> {
            let bar = function.bar_address(function.read8(at + 4));
            Ok(bar.ok_or("a virtio capability names an unassigned BAR")?
                + u64::from(function.read32(at + 8)))
        };
        // The first capability of each type is the one to use (4.1.4).
        match cfg_type {
            PCI_CAP_COMMON if common.is_none() => common = Some(region()?),
            PCI_CAP_NOTIFY if notify.is_none() => {
                notify = Some((region()?, function.read32(at + 16)))
            }
            PCI_CAP_DEVICE if device.is_none() => device = Some(region()?),
            _ => {}
        }
    }
    let common = common.ok_or("no virtio-pci common configuration capability")?;
    let (notify, multiplier) = notify.ok_or("no virtio-pci notification capability")?;
    let device = device.ok_or("no virtio-pci device configuration capability")?;
    Ok((common, notify, multiplier, device))
}

/// One running split virtqueue: its ring page and the driver's view of it.
#[derive(Clone, Copy)]
struct Virtqueue {
    rings: u64,
    /// The queue's notification register.
    notify: u64,
    /// The value written there: the queue's index.
    index: u16,
    /// Entries (a power of two, at most MAX_QUEUE_SIZE).
    size: u16,
    next_avail: u16,
    last_used: u16,
    /// The free descriptors, linked through their `next` fields.
    free_head: u16,
    free: u16,
    /// Bit n: a chain with head descriptor n is with the device.
    in_flight: u128,
}

impl Virtqueue {
    const EMPTY: Virtqueue = Virtqueue {
        rings: 0,
        notify: 0,
        index: 0,
        size: 0,
        next_avail: 0,
        last_used: 0,
        free_head: 0,
        free: 0,
        in_flight: 0,
    };

    fn desc(&self, id: u16) -> u64 {
        self.rings + 16 * u64::from(id)
    }

    /// Clears the ring page and links every descriptor into the free list.
    fn init(&mut self, rings: u64, index: u16, size: u16) {
        // SAFETY: only the boot vCPU drives virtio devices; the page is this queue's and the
        // device was just reset, so it does not read the page.
        unsafe { core::ptr::write_bytes(rings as *mut u8, 0, 4096) };
        *self = Virtqueue { rings, index, size, free: size, ..Virtqueue::EMPTY };
        for i in 0..size {
            write16(self.desc(i) + 14, (i + 1) % size);
        }
    }

    fn post(&mut self, parts: &[(u64, u32, bool)]) -> Result<u16, &'static str> {
        if parts.is_empty() {
            return Err("bad request shape");
        }
        if parts.len() > usize::from(self.free) {
            return Err("not enough free descriptors");
        }
        let head = self.free_head;
        let mut id = head;
        for (i, (addr, len, writable)) in parts.iter().enumerate() {
            let desc = self.desc(id);
            // The free list's link is the next descriptor of the chain.
            let next = read16(desc + 14);
            let last = i + 1 == parts.len();
            let flags =
                if *writable { DESC_F_WRITE } else { 0 } | if last { 0 } else { DESC_F_NEXT };
            // SAFETY: the descriptor is free, in this queue's ring page.
            unsafe { core::ptr::write_volatile(desc as *mut u64, *addr) };
            write32(desc + 8, *len);
            write16(desc + 12, flags);
            if last {
                self.free_head = next;
            } else {
                id = next;
            }
        }
        self.free -= parts.len() as u16;
        self.in_flight |= 1 << head;
        let avail = self.rings + AVAIL_OFFSET;
        let slot = self.next_avail % self.size;
        write16(avail + 4 + 2 * u64::from(slot), head);
        fence(Ordering::SeqCst);
        self.next_avail = self.next_avail.wrapping_add(1);
        write16(avail + 2, self.next_avail);
        Ok(head)
    }

    fn notify(&self, regs: &Regs) {
        fence(Ordering::SeqCst);
        match regs {
            Regs::Mmio { .. } => write32(self.notify, u32::from(self.index)),
            Regs::Pci { .. } => write16(self.notify, self.index),
        }
    }

    fn poll(&mut self) -> Result<Option<(u16, u32)>, &'static str> {
        let used = self.rings + USED_OFFSET;
        if read16(used + 2) == self.last_used {
            return Ok(None);
        }
        fence(Ordering::SeqCst);
        let elem = used + 4 + 8 * u64::from(self.last_used % self.size);
        let (id, len) = (read32(elem), read32(elem + 4));
        self.last_used = self.last_used.wrapping_add(1);
        if id >= u32::from(self.size) || self.in_flight & (1 << id) == 0 {
            return Err("the device used a chain that was not in flight");
        }
        let head = id as u16;
        self.in_flight &= !(1 << head);
        let mut last = head;
        let mut count = 1;
        while read16(self.desc(last) + 12) & DESC_F_NEXT != 0 {
            last = read16(self.desc(last) + 14);
            count += 1;
        }
        write16(self.desc(last) + 14, self.free_head);
        self.free_head = head;
        self.free += count;
        Ok(Some((head, len)))
    }
}

/// A device whose queues are running.
pub struct Device {
    regs: Regs,
    features: u64,
    queues: [Virtqueue; MAX_QUEUES],
    /// How many of `queues` run.
    queue_count: usize,
}

impl Device {
    /// Finds the first device of `device_id` (PCI first, then virtio-mmio) and brings queue 0
    /// up.
    pub fn open(info: &BootInfo, device_id: u32) -> Result<Device, &'static str> {
        Self::open_nth(info, device_id, 0)
    }

    /// Brings up the `nth` device (counting from 0) of `device_id`: virtio-pci functions in
    /// slot order, then virtio-mmio windows in command-line order.
    pub fn open_nth(info: &BootInfo, device_id: u32, nth: usize) -> Result<Device, &'static str> {
        let found = Self::find_nth(info, device_id, nth)?;
        Self::open_found(&found)
    }

    /// The `nth` device of `device_id`, as `open_nth` numbers them.
    pub fn find_nth(info: &BootInfo, device_id: u32, nth: usize) -> Result<Found, &'static str> {
        devices(info).filter(|d| d.device_type == device_id).nth(nth).ok_or_else(|| {
            let any_pci = devices(info).any(|d| matches!(d.location, Location::Pci(_)));
            if any_pci {
                "no such virtio device on PCI bus 0"
            } else {
                "no such virtio-mmio device on the command line"
            }
        })
    }

    /// Brings up a device `devices` found, with queue 0.
    pub fn open_found(found: &Found) -> Result<Device, &'static str> {
        Self::open_with(found, 1, 0)
    }

    /// Brings up a device `devices` found with queues 0..`queues` (at most MAX_QUEUES),
    /// accepting VIRTIO_F_VERSION_1 and whichever of the `wanted` features the device offers.
    pub fn open_with(found: &Found, queues: usize, wanted: u64) -> Result<Device, &'static str> {
        if found.index >= MAX_DEVICES {
            return Err("too many virtio devices for the driver");
        }
        if queues == 0 || queues > MAX_QUEUES {
            return Err("the driver runs one or two queues");
        }
        let regs = match found.location {
            Location::Mmio(base) => {
                if read32(base + REG_VERSION) != 2 {
                    return Err("not a virtio-mmio version 2 device");
                }
                Regs::Mmio { base }
            }
            Location::Pci(function) => {
                let (common, notify, notify_multiplier, device) = pci_regions(function)?;
                function.enable_memory_and_dma();
                Regs::Pci { common, notify, notify_multiplier, device }
            }
        };
        let mut dev =
            Device { regs, features: 0, queues: [Virtqueue::EMPTY; MAX_QUEUES], queue_count: 0 };
        dev.initialise(found.index, queues, wanted)?;
        Ok(dev)
    }

    /// Reset, feature negotiation, the queues, DRIVER_OK (3.1.1).
    fn initialise(&mut self, index: usize, queues: usize, wanted: u64) -> Result<(), &'static str> {
        self.reset()?;
        self.set_status(STATUS_ACK);
        self.set_status(STATUS_ACK | STATUS_DRIVER);
        let features = self.regs.device_features();
        self.features = features;
        if features >> 32 & 1 == 0 {
            return Err("device does not offer VIRTIO_F_VERSION_1");
        }
        self.regs.set_driver_features(1 << 32 | (features & wanted));
        self.set_status(STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK);
        if self.status() & STATUS_FEATURES_OK == 0 {
            return Err("device refused the features");
        }
        for q in 0..queues {
            let max = self.regs.queue_max(q as u16);
            if max < 4 {
                return Err(if q == 0 { "queue 0 is too small" } else { "queue 1 is too small" });
            }
            // The largest power of two the device and the ring page allow.
            let size = 1u16 << (15 - max.min(MAX_QUEUE_SIZE).leading_zeros());
            let rings = ring_page(index, q);
            self.queues[q].init(rings, q as u16, size);
            self.queues[q].notify =
                self.regs.setup_queue(size, rings, rings + AVAIL_OFFSET, rings + USED_OFFSET);
        }
        self.queue_count = queues;
        let all = STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        self.set_status(all);
        if self.status() & (STATUS_NEEDS_RESET | STATUS_DRIVER_OK) != STATUS_DRIVER_OK {
            return Err("device did not accept DRIVER_OK");
        }
        Ok(())
    }

    /// Resets the device (status 0) and waits until it reads back 0; the device forgets its
    /// queues, and on virtio-pci its MSI-X vectors.
    pub fn reset(&self) -> Result<(), &'static str> {
        self.set_status(0);
        let deadline = io::rdtsc() + TIMEOUT;
        while self.status() != 0 {
            if io::rdtsc() > deadline {
                return Err("the device did not reset");
            }
            core::hint::spin_loop();
        }
        Ok(())
    }

    fn set_status(&self, status: u32) {
        match self.regs {
            Regs::Mmio { base } => write32(base + REG_STATUS, status),
            Regs::Pci { common, .. } => write8(common + COMMON_STATUS, status as u8),
        }
    }

    fn status(&self) -> u32 {
        match self.regs {
            Regs::Mmio { base } => read32(base + REG_STATUS),
            Regs::Pci { common, .. } => u32::from(read8(common + COMMON_STATUS)),
        }
    }

    /// The device's register window (virtio-mmio) or common configuration (virtio-pci).
    pub fn base(&self) -> u64 {
        match self.regs {
            Regs::Mmio { base } => base,
            Regs::Pci { common, .. } => common,
        }
    }

    /// The features the device offered.
    pub fn offered_features(&self) -> u64 {
        self.features
    }

    /// Descriptors of queue 0 not in use by a request in flight.
    pub fn free_descriptors(&self) -> u16 {
        self.queues[0].free
    }

    /// Reads a 32-bit word of the device-specific configuration space.
    pub fn config32(&self, offset: u64) -> u32 {
        match self.regs {
            Regs::Mmio { base } => read32(base + REG_CONFIG + offset),
            Regs::Pci { device, .. } => read32(device + offset),
        }
    }

    /// Reads a byte of the device-specific configuration space.
    pub fn config8(&self, offset: u64) -> u8 {
        match self.regs {
            Regs::Mmio { base } => read8(base + REG_CONFIG + offset),
            Regs::Pci { device, .. } => read8(device + offset),
        }
    }

    /// virtio-pci: sets queue 0's MSI-X vector and returns what the device reads back
    /// (0xffff: no vector, which is also how a device refuses one). None on virtio-mmio.
    pub fn set_queue_vector(&mut self, vector: u16) -> Option<u16> {
        let Regs::Pci { common, .. } = self.regs else { return None };
        write16(common + COMMON_QUEUE_SELECT, 0);
        write16(common + COMMON_QUEUE_MSIX_VECTOR, vector);
        Some(read16(common + COMMON_QUEUE_MSIX_VECTOR))
    }

    /// Offers one device-writable buffer, notifies, and waits for the device to use it;
    /// returns the length the device wrote.
    pub fn fill(&mut self, buf: &mut [u8]) -> Result<u32, &'static str> {
        self.submit(&[(buf.as_mut_ptr() as u64, buf.len() as u32, true)])
    }

    /// Offers one chain of (address, length, device-writable) buffers on queue 0, notifies,
    /// and waits for the device to use it; returns the used length. Nothing else may be in
    /// flight on queue 0.
    pub fn submit(&mut self, parts: &[(u64, u32, bool)]) -> Result<u32, &'static str> {
        self.submit_to(0, parts)
    }

    /// `submit` on queue `queue`.
    pub fn submit_to(
        &mut self,
        queue: usize,
        parts: &[(u64, u32, bool)],
    ) -> Result<u32, &'static str> {
        if self.queue(queue)?.in_flight != 0 {
            return Err("other requests are in flight");
        }
        let head = self.post_to(queue, parts)?;
        self.notify_queue(queue);
        let (id, len) = self.wait_queue(queue)?;
        if id != head {
            return Err("the device used a different chain");
        }
        Ok(len)
    }

    fn queue(&mut self, queue: usize) -> Result<&mut Virtqueue, &'static str> {
        if queue >= self.queue_count {
            return Err("no such queue");
        }
        Ok(&mut self.queues[queue])
    }

    /// Makes one chain of (address, length, device-writable) buffers available on queue 0
    /// without notifying; returns its head descriptor, which `poll` and `wait` report on
    /// completion.
    pub fn post(&mut self, parts: &[(u64, u32, bool)]) -> Result<u16, &'static str> {
        self.post_to(0, parts)
    }

    /// `post` on queue `queue`.
    pub fn post_to(
        &mut self,
        queue: usize,
        parts: &[(u64, u32, bool)],
    ) -> Result<u16, &'static str> {
        self.queue(queue)?.post(parts)
    }

    /// Tells the device that queue 0 has new chains.
    pub fn notify(&self) {
        self.notify_queue(0);
    }

    /// Tells the device that queue `queue` has new chains.
    pub fn notify_queue(&self, queue: usize) {
        if let Some(q) = self.queues.get(queue).filter(|_| queue < self.queue_count) {
            q.notify(&self.regs);
        }
    }

    /// Takes one completion from queue 0's used ring, if there is one: (head descriptor, used
    /// length). Its descriptors become free again.
    pub fn poll(&mut self) -> Result<Option<(u16, u32)>, &'static str> {
        self.poll_queue(0)
    }

    /// `poll` on queue `queue`.
    pub fn poll_queue(&mut self, queue: usize) -> Result<Option<(u16, u32)>, &'static str> {
        self.queue(queue)?.poll()
    }

    /// Waits for one completion on queue 0 (see `poll`).
    pub fn wait(&mut self) -> Result<(u16, u32), &'static str> {
        self.wait_queue(0)
    }

    /// `wait` on queue `queue`.
    pub fn wait_queue(&mut self, queue: usize) -> Result<(u16, u32), &'static str> {
        let deadline = io::rdtsc() + TIMEOUT;
        loop {
            if let Some(done) = self.poll_queue(queue)? {
                return Ok(done);
            }
            if io::rdtsc() > deadline {
                return Err("the device did not use the buffer");
            }
            core::hint::spin_loop();
        }
    }
}

impl Regs {
    fn device_features(&self) -> u64 {
        let (select, value) = match *self {
            Regs::Mmio { base } => (base + REG_DEVICE_FEATURES_SEL, base + REG_DEVICE_FEATURES),
            Regs::Pci { common, .. } => {
                (common + COMMON_DEVICE_FEATURE_SELECT, common + COMMON_DEVICE_FEATURE)
            }
        };
        write32(select, 0);
        let low = read32(value);
        write32(select, 1);
        let high = read32(value);
        u64::from(low) | (u64::from(high) << 32)
    }

    fn set_driver_features(&self, features: u64) {
        let (select, value) = match *self {
            Regs::Mmio { base } => (base + REG_DRIVER_FEATURES_SEL, base + REG_DRIVER_FEATURES),
            Regs::Pci { common, .. } => {
                (common + COMMON_DRIVER_FEATURE_SELECT, common + COMMON_DRIVER_FEATURE)
            }
        };
        write32(select, 0);
        write32(value, features as u32);
        write32(select, 1);
        write32(value, (features >> 32) as u32);
    }

    /// Selects queue `queue` and returns the most entries it may have (0: no such queue).
    fn queue_max(&self, queue: u16) -> u16 {
        match *self {
            Regs::Mmio { base } => {
                write32(base + REG_QUEUE_SEL, u32::from(queue));
                read32(base + REG_QUEUE_NUM_MAX).min(0xffff) as u16
            }
            Regs::Pci { common, .. } => {
                write16(common + COMMON_QUEUE_SELECT, queue);
                read16(common + COMMON_QUEUE_SIZE)
            }
        }
    }

    /// Gives the queue `queue_max` selected its size and ring addresses, enables it, and
    /// returns its notification address: on virtio-pci, the notification region plus
    /// queue_notify_off times the multiplier (4.1.4.4).
    fn setup_queue(&self, size: u16, desc: u64, driver: u64, device: u64) -> u64 {
        let (num, addresses, ready) = match *self {
            Regs::Mmio { base } => (
                base + REG_QUEUE_NUM,
                [base + REG_QUEUE_DESC, base + REG_QUEUE_DRIVER, base + REG_QUEUE_DEVICE],
                base + REG_QUEUE_READY,
            ),
            Regs::Pci { common, .. } => (
                common + COMMON_QUEUE_SIZE,
                [
                    common + COMMON_QUEUE_DESC,
                    common + COMMON_QUEUE_DRIVER,
                    common + COMMON_QUEUE_DEVICE,
                ],
                common + COMMON_QUEUE_ENABLE,
            ),
        };
        let pci = matches!(self, Regs::Pci { .. });
        if pci {
            write16(num, size);
        } else {
            write32(num, u32::from(size));
        }
        for (reg, addr) in addresses.into_iter().zip([desc, driver, device]) {
            write32(reg, addr as u32);
            write32(reg + 4, (addr >> 32) as u32);
        }
        match *self {
            Regs::Mmio { base } => {
                write32(ready, 1);
                base + REG_QUEUE_NOTIFY
            }
            Regs::Pci { common, notify, notify_multiplier, .. } => {
                let offset = u64::from(read16(common + COMMON_QUEUE_NOTIFY_OFF));
                write16(ready, 1);
                notify + offset * u64::from(notify_multiplier)
            }
        }
    }
}
