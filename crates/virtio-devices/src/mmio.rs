//! The virtio-mmio transport, version 2 (virtio 1.2, section 4.2): a 0x200-byte register
//! window per device. The driver's writes are checked here — feature negotiation, queue
//! sizes and addresses, the status state machine — before the device model sees anything.

use crate::{status, VirtioDevice, VIRTIO_F_VERSION_1};
use devices::{BusDevice, SharedIrq, VmAction};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

/// Size of a device's register window.
pub const MMIO_WINDOW: u64 = 0x200;

const MAGIC_VALUE: u64 = 0x000;
const VERSION: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const VENDOR_ID: u64 = 0x00c;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const QUEUE_NOTIFY: u64 = 0x050;
const INTERRUPT_STATUS: u64 = 0x060;
const INTERRUPT_ACK: u64 = 0x064;
const STATUS: u64 = 0x070;
const QUEUE_DESC_LOW: u64 = 0x080;
const QUEUE_DESC_HIGH: u64 = 0x084;
const QUEUE_DRIVER_LOW: u64 = 0x090;
const QUEUE_DRIVER_HIGH: u64 = 0x094;
const QUEUE_DEVICE_LOW: u64 = 0x0a0;
const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG: u64 = 0x100;

/// "virt" in little-endian.
const MAGIC: u32 = 0x7472_6976;
/// Vendor ID reported to drivers ("VNGD").
pub const VENDOR: u32 = 0x4447_4e56;
/// Interrupt status: a used buffer was added.
pub const INT_USED_BUFFER: u32 = 1;
/// Interrupt status: the configuration (or device status) changed.
pub const INT_CONFIG_CHANGE: u32 = 2;

/// One virtio device on the MMIO bus.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    irq: SharedIrq,
    queues: Vec<Queue>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: u32,
    config_generation: u32,
    /// The driver wrote a queue size the queue refused; DRIVER_OK will fail until reset.
    bad_queue_config: bool,
}

impl MmioTransport {
    /// Wraps `device`, which will raise `irq` and reach the guest's memory through `mem`.
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap, irq: SharedIrq) -> Self {
        let queues = Self::fresh_queues(device.as_ref());
        Self {
            device,
            mem,
            irq,
            queues,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
            bad_queue_config: false,
        }
    }

    fn fresh_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
        device.queue_max_sizes().iter().filter_map(|size| Queue::new(*size).ok()).collect()
    }

    /// The driver-visible status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    fn reset(&mut self) {
        self.device.reset();
        self.queues = Self::fresh_queues(self.device.as_ref());
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt_status = 0;
        self.bad_queue_config = false;
    }

    fn interrupt(&mut self, why: u32) {
        self.interrupt_status |= why;
        // A lost interrupt shows up as a stalled driver; there is no one to tell here.
        let _ = self.irq.trigger();
    }

    fn needs_reset(&mut self) {
        self.status |= status::DEVICE_NEEDS_RESET;
        self.interrupt(INT_CONFIG_CHANGE);
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        let index = usize::try_from(self.queue_select).ok()?;
        self.queues.get_mut(index)
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // Drivers only ever add bits (2.1.2); anything else is ignored.
        if value & self.status != self.status {
            return;
        }
        let added = value & !self.status;
        let mut new = value;
        if added & status::FEATURES_OK != 0 {
            let offered = self.device.features();
            let acceptable = self.driver_features & !offered == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !acceptable {
                new &= !status::FEATURES_OK;
            }
        }
        if added & status::DRIVER_OK != 0 {
            let negotiated =
                self.status & status::FEATURES_OK != 0 || new & status::FEATURES_OK != 0;
            let queues_valid = self.queues.iter().all(|q| !q.ready() || q.is_valid(&self.mem));
            if !negotiated || !queues_valid || self.bad_queue_config {
                self.status = new & !status::DRIVER_OK;
                self.needs_reset();
                return;
            }
        }
        self.status = new;
    }

    fn notify(&mut self, index: u32) {
        let running = status::DRIVER_OK;
        if self.status & (running | status::DEVICE_NEEDS_RESET) != running {
            return;
        }
        let Ok(slot) = usize::try_from(index) else { return };
        let Ok(index) = u16::try_from(index) else { return };
        let Some(queue) = self.queues.get_mut(slot) else { return };
        if !queue.ready() {
            return;
        }
        match self.device.process_queue(&self.mem, index, queue) {
            Ok(true) => self.interrupt(INT_USED_BUFFER),
            Ok(false) => {}
            Err(_) => self.needs_reset(),
        }
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            MAGIC_VALUE => MAGIC,
            VERSION => 2,
            DEVICE_ID => self.device.device_type(),
            VENDOR_ID => VENDOR,
            DEVICE_FEATURES => {
                let features = self.device.features();
                match self.device_features_select {
                    0 => (features & 0xffff_ffff) as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            INTERRUPT_STATUS => self.interrupt_status,
            STATUS => self.status,
            CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        // Queue layout may change only while the driver is setting the device up.
        let configuring = self.status & status::DRIVER_OK == 0;
        match offset {
            DEVICE_FEATURES_SEL => self.device_features_select = value,
            DRIVER_FEATURES_SEL => self.driver_features_select = value,
            DRIVER_FEATURES if self.status & status::FEATURES_OK == 0 => {
                match self.driver_features_select {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    _ => {}
                }
            }
            QUEUE_SEL => self.queue_select = value,
            QUEUE_NUM if configuring => {
                // Sizes that are zero, not a power of two or above the maximum are refused;
                // DRIVER_OK then reports the device broken.
                let accepted = match (self.selected_queue(), u16::try_from(value)) {
                    (Some(q), Ok(size)) => q.try_set_size(size).is_ok(),
                    _ => false,
                };
                if !accepted {
                    self.bad_queue_config = true;
                }
            }
            QUEUE_READY if configuring => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            QUEUE_DESC_LOW | QUEUE_DESC_HIGH | QUEUE_DRIVER_LOW | QUEUE_DRIVER_HIGH
            | QUEUE_DEVICE_LOW | QUEUE_DEVICE_HIGH
                if configuring =>
            {
                let high = offset & 4 != 0;
                let (low, high) = if high { (None, Some(value)) } else { (Some(value), None) };
                if let Some(q) = self.selected_queue() {
                    match offset & !4 {
                        QUEUE_DESC_LOW => q.set_desc_table_address(low, high),
                        QUEUE_DRIVER_LOW => q.set_avail_ring_address(low, high),
                        _ => q.set_used_ring_address(low, high),
                    }
                }
            }
            QUEUE_NOTIFY => self.notify(value),
            INTERRUPT_ACK => self.interrupt_status &= !value,
            STATUS => self.set_status(value),
            _ => {}
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG {
            self.device.read_config(offset - CONFIG, data);
            return;
        }
        // Registers are 32 bits wide and must be read whole (4.2.2.2).
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> VmAction {
        if offset >= CONFIG {
            self.device.write_config(offset - CONFIG, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return VmAction::None;
        }
        if let (Ok(bytes), true) = (<[u8; 4]>::try_from(data), offset.is_multiple_of(4)) {
            self.write_register(offset, u32::from_le_bytes(bytes));
        }
        VmAction::None
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use vm_memory::{Bytes, GuestAddress};

    #[derive(Default)]
    struct CountingIrq(AtomicUsize);
    impl devices::IrqLine for CountingIrq {
        fn trigger(&self) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    struct Driver {
        dev: MmioTransport,
        mem: GuestMemoryMmap,
        irq: Arc<CountingIrq>,
    }

    impl Driver {
        fn new() -> Self {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
            let irq = Arc::new(CountingIrq::default());
            let dev = MmioTransport::new(Box::new(Rng::default()), mem.clone(), irq.clone());
            Driver { dev, mem, irq }
        }
        fn r(&mut self, offset: u64) -> u32 {
            let mut d = [0u8; 4];
            self.dev.read(offset, &mut d);
            u32::from_le_bytes(d)
        }
        fn w(&mut self, offset: u64, value: u32) {
            self.dev.write(offset, &value.to_le_bytes());
        }
        /// The driver initialisation sequence of 3.1.1, with queue 0 of `size` entries at
        /// 0x1000 (descriptors), 0x2000 (available ring), 0x3000 (used ring).
        fn bring_up(&mut self, size: u32, features_high: u32) -> u32 {
            self.w(STATUS, 0);
            // A driver starts from fresh rings after a reset.
            self.mem.write_slice(&[0u8; 0x3000], GuestAddress(0x1000)).unwrap();
            self.w(STATUS, status::ACKNOWLEDGE);
            self.w(STATUS, status::ACKNOWLEDGE | status::DRIVER);
            self.w(DRIVER_FEATURES_SEL, 1);
            self.w(DRIVER_FEATURES, features_high);
            self.w(STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
            if self.r(STATUS) & status::FEATURES_OK == 0 {
                return self.r(STATUS);
            }
            self.w(QUEUE_SEL, 0);
            self.w(QUEUE_NUM, size);
            self.w(QUEUE_DESC_LOW, 0x1000);
            self.w(QUEUE_DRIVER_LOW, 0x2000);
            self.w(QUEUE_DEVICE_LOW, 0x3000);
            self.w(QUEUE_READY, 1);
            let all =
                status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
            self.w(STATUS, all);
            self.r(STATUS)
        }
        /// Posts one device-writable buffer of `len` bytes at 0x10_0000 and notifies.
        fn request(&mut self, len: u32) {
            let desc = [
                0x10_0000u64.to_le_bytes().as_slice(),
                &len.to_le_bytes(),
                &2u16.to_le_bytes(),
                &0u16.to_le_bytes(),
            ]
            .concat();
            self.mem.write_slice(&desc, GuestAddress(0x1000)).unwrap();
            let idx: u16 = self.mem.read_obj(GuestAddress(0x2002)).unwrap();
            self.mem.write_obj(0u16, GuestAddress(0x2004 + 2 * u64::from(idx % 8))).unwrap();
            self.mem.write_obj(idx.wrapping_add(1), GuestAddress(0x2002)).unwrap();
            self.w(QUEUE_NOTIFY, 0);
        }
        fn used_idx(&self) -> u16 {
            self.mem.read_obj(GuestAddress(0x3002)).unwrap()
        }
    }

    #[test]
    fn identifies_as_a_version_2_entropy_device() {
        let mut d = Driver::new();
        assert_eq!(d.r(MAGIC_VALUE), MAGIC);
        assert_eq!(d.r(VERSION), 2);
        assert_eq!(d.r(DEVICE_ID), 4);
        d.w(DEVICE_FEATURES_SEL, 1);
        assert_eq!(d.r(DEVICE_FEATURES), 1, "VIRTIO_F_VERSION_1 is bit 32");
        assert_eq!(d.r(QUEUE_NUM_MAX), 256);
        d.w(QUEUE_SEL, 1);
        assert_eq!(d.r(QUEUE_NUM_MAX), 0, "only one queue");
    }

    #[test]
    fn full_request_round_trip() {
        let mut d = Driver::new();
        let st = d.bring_up(8, 1);
        assert_eq!(st & status::DRIVER_OK, status::DRIVER_OK, "status {st:#x}");
        d.request(32);
        assert_eq!(d.used_idx(), 1);
        let len: u32 = d.mem.read_obj(GuestAddress(0x3008)).unwrap();
        assert_eq!(len, 32);
        assert_eq!(d.r(INTERRUPT_STATUS) & INT_USED_BUFFER, INT_USED_BUFFER);
        assert_eq!(d.irq.0.load(Ordering::SeqCst), 1);
        d.w(INTERRUPT_ACK, INT_USED_BUFFER);
        assert_eq!(d.r(INTERRUPT_STATUS), 0);
        d.request(16);
        assert_eq!(d.used_idx(), 2);
    }

    #[test]
    fn features_without_version_1_or_unknown_bits_are_refused() {
        let mut d = Driver::new();
        assert_eq!(d.bring_up(8, 0) & status::FEATURES_OK, 0, "legacy drivers refused");
        let mut d = Driver::new();
        assert_eq!(d.bring_up(8, 1 | 2) & status::FEATURES_OK, 0, "unoffered bit refused");
    }

    #[test]
    fn bad_queue_setup_marks_the_device_broken_not_running() {
        let mut d = Driver::new();
        // 7 is not a power of two.
        let st = d.bring_up(7, 1);
        assert_eq!(st & status::DRIVER_OK, 0);
        assert_eq!(st & status::DEVICE_NEEDS_RESET, status::DEVICE_NEEDS_RESET);
        // Notifications to a broken device do nothing.
        d.request(8);
        assert_eq!(d.used_idx(), 0);
        // A reset makes it usable again.
        assert_eq!(d.bring_up(8, 1) & status::DRIVER_OK, status::DRIVER_OK);
        d.request(8);
        assert_eq!(d.used_idx(), 1);
    }

    #[test]
    fn rings_outside_guest_memory_are_refused() {
        let mut d = Driver::new();
        d.w(STATUS, status::ACKNOWLEDGE | status::DRIVER);
        d.w(DRIVER_FEATURES_SEL, 1);
        d.w(DRIVER_FEATURES, 1);
        d.w(STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        d.w(QUEUE_NUM, 8);
        d.w(QUEUE_DESC_LOW, 0x1000);
        d.w(QUEUE_DESC_HIGH, 0x10); // 64 GiB: not guest memory
        d.w(QUEUE_DRIVER_LOW, 0x2000);
        d.w(QUEUE_DEVICE_LOW, 0x3000);
        d.w(QUEUE_READY, 1);
        d.w(STATUS, 0xf);
        assert_eq!(d.r(STATUS) & status::DEVICE_NEEDS_RESET, status::DEVICE_NEEDS_RESET);
    }

    #[test]
    fn odd_accesses_are_ignored_and_read_as_zero() {
        let mut d = Driver::new();
        let mut two = [0xffu8; 2];
        d.dev.read(MAGIC_VALUE, &mut two);
        assert_eq!(two, [0, 0]);
        d.dev.write(STATUS, &[1, 0]);
        assert_eq!(d.r(STATUS), 0);
        assert_eq!(d.r(0x1f0), 0, "unknown register");
        d.w(QUEUE_NOTIFY, 5);
        d.w(QUEUE_NOTIFY, u32::MAX);
        // Status bits may only be added.
        d.w(STATUS, status::ACKNOWLEDGE | status::DRIVER);
        d.w(STATUS, status::DRIVER);
        assert_eq!(d.r(STATUS), status::ACKNOWLEDGE | status::DRIVER);
    }
}
