//! The virtio-mmio transport, version 2 (virtio 1.2, section 4.2): a 0x200-byte register
//! window per device, one interrupt line, and an interrupt status register. Negotiation,
//! queue checks and the worker live in [`crate::transport::VirtioCore`]; this module decodes
//! the registers.

pub use crate::transport::NotifyRegistrar;
use crate::transport::{Interrupt, VirtioCore};
use crate::VirtioDevice;
use devices::{BusDevice, SharedIrq, VmAction};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use virtio_queue::QueueT;
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

/// The interrupt status register and the line behind it.
struct MmioInterrupt {
    irq: SharedIrq,
    status: AtomicU32,
}

impl MmioInterrupt {
    fn raise(&self, why: u32) {
        self.status.fetch_or(why, Ordering::AcqRel);
        // A lost interrupt shows up as a stalled driver; there is no one to tell here.
        let _ = self.irq.trigger();
    }
}

impl Interrupt for MmioInterrupt {
    fn queue(&self, _index: u16) {
        self.raise(INT_USED_BUFFER);
    }
    fn config(&self) {
        self.raise(INT_CONFIG_CHANGE);
    }
}

/// One virtio device on the MMIO bus.
pub struct MmioTransport {
    core: VirtioCore,
    interrupt: Arc<MmioInterrupt>,
}

impl MmioTransport {
    /// Wraps `device`, which will raise `irq` and reach the guest's memory through `mem`.
    /// Notifications are served on the thread that writes QueueNotify.
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap, irq: SharedIrq) -> Self {
        let interrupt = Arc::new(MmioInterrupt { irq, status: AtomicU32::new(0) });
        Self { core: VirtioCore::new(device, mem, interrupt.clone()), interrupt }
    }

    /// Serves notifications on a worker thread through eventfds that `registrar` attaches to
    /// this device's QueueNotify register at guest address `base + 0x50`, one per queue
    /// (matching the queue index written).
    pub fn with_notifier(mut self, registrar: Arc<dyn NotifyRegistrar>, base: u64) -> Self {
        let count = u32::try_from(self.core.queue_count()).unwrap_or(0);
        let addresses = (0..count).map(|i| (base + QUEUE_NOTIFY, Some(i))).collect();
        self.core.set_notifier(registrar, addresses);
        self
    }

    /// The driver-visible status register.
    pub fn status(&self) -> u32 {
        self.core.status()
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            MAGIC_VALUE => MAGIC,
            VERSION => 2,
            DEVICE_ID => self.core.device_type(),
            VENDOR_ID => VENDOR,
            DEVICE_FEATURES => self.core.device_features(),
            QUEUE_NUM_MAX => {
                self.core.with_selected_queue(|q| u32::from(q.max_size())).unwrap_or(0)
            }
            QUEUE_READY => self.core.with_selected_queue(|q| u32::from(q.ready())).unwrap_or(0),
            INTERRUPT_STATUS => self.interrupt.status.load(Ordering::Acquire),
            STATUS => self.core.status(),
            CONFIG_GENERATION => self.core.config_generation(),
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            DEVICE_FEATURES_SEL => self.core.device_features_select = value,
            DRIVER_FEATURES_SEL => self.core.driver_features_select = value,
            DRIVER_FEATURES => self.core.set_driver_features(value),
            QUEUE_SEL => self.core.queue_select = value,
            QUEUE_NUM => self.core.set_queue_size(value),
            QUEUE_READY => self.core.set_queue_ready(value == 1),
            QUEUE_DESC_LOW | QUEUE_DESC_HIGH | QUEUE_DRIVER_LOW | QUEUE_DRIVER_HIGH
            | QUEUE_DEVICE_LOW | QUEUE_DEVICE_HIGH => {
                let high = offset & 4 != 0;
                let (low, high) = if high { (None, Some(value)) } else { (Some(value), None) };
                let which = match offset & !4 {
                    QUEUE_DESC_LOW => 0,
                    QUEUE_DRIVER_LOW => 1,
                    _ => 2,
                };
                self.core.set_queue_address(which, low, high);
            }
            QUEUE_NOTIFY => self.core.notify(value),
            INTERRUPT_ACK => {
                self.interrupt.status.fetch_and(!value, Ordering::AcqRel);
            }
            STATUS => {
                if value == 0 {
                    self.interrupt.status.store(0, Ordering::Release);
                }
                self.core.set_status(value);
            }
            _ => {}
        }
    }
}

impl crate::state::TransportState for MmioTransport {
    fn device_type(&self) -> u32 {
        self.core.device_type()
    }

    fn external(&mut self) -> bool {
        self.core.external()
    }

    fn quiesce(&mut self) {
        self.core.quiesce();
    }

    fn resume(&mut self) {
        self.core.resume();
    }

    fn save(&mut self) -> Result<Vec<u8>, String> {
        let mut e = snapshot::Encoder::new();
        self.core.save(&mut e);
        e.u32(self.interrupt.status.load(Ordering::Acquire));
        Ok(e.0)
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), String> {
        let mut d = snapshot::Decoder::new("virtio", state);
        self.core.restore(&mut d)?;
        let status = d.u32("interrupt status").map_err(|e| e.to_string())?;
        d.finish().map_err(|e| e.to_string())?;
        self.interrupt
            .status
            .store(status & (INT_USED_BUFFER | INT_CONFIG_CHANGE), Ordering::Release);
        if status != 0 {
            // The line is edge-triggered through an irqfd: raise it again for the driver.
            let _ = self.interrupt.irq.trigger();
        }
        Ok(())
    }

    fn handover_fd(&self) -> Option<std::os::fd::RawFd> {
        self.core.handover_fd()
    }

    fn set_dirty_log(&mut self, dirty: Arc<crate::state::DirtyPages>) {
        self.core.set_dirty_log(dirty);
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG {
            self.core.read_config(offset - CONFIG, data);
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
            self.core.write_config(offset - CONFIG, data);
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
    use crate::status;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use vm_memory::GuestMemoryMmap;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

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

    /// Records what the transport registers, and lets the test play KVM's part.
    #[derive(Default)]
    struct Registrar {
        registered: std::sync::Mutex<Vec<(u64, Option<u32>, EventFd)>>,
        unregistered: AtomicUsize,
    }
    impl NotifyRegistrar for Registrar {
        fn register(&self, addr: u64, datamatch: Option<u32>, fd: &EventFd) -> std::io::Result<()> {
            self.registered.lock().unwrap().push((addr, datamatch, fd.try_clone()?));
            Ok(())
        }
        fn unregister(
            &self,
            _addr: u64,
            _datamatch: Option<u32>,
            _fd: &EventFd,
        ) -> std::io::Result<()> {
            self.unregistered.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    #[test]
    fn notifications_through_eventfds_are_served_by_the_worker() {
        let mut d = Driver::new();
        let registrar = Arc::new(Registrar::default());
        let dev = std::mem::replace(
            &mut d.dev,
            MmioTransport::new(Box::new(Rng::default()), d.mem.clone(), d.irq.clone()),
        );
        d.dev = dev.with_notifier(registrar.clone(), 0xd000_0000);
        assert_eq!(d.bring_up(8, 1) & status::DRIVER_OK, status::DRIVER_OK);
        let (addr, datamatch) = {
            let regs = registrar.registered.lock().unwrap();
            assert_eq!(regs.len(), 1, "one eventfd per queue");
            (regs[0].0, regs[0].1)
        };
        assert_eq!((addr, datamatch), (0xd000_0050, Some(0)));
        // Post a buffer without the MMIO notify, then signal as KVM would.
        let desc = [
            0x10_0000u64.to_le_bytes().as_slice(),
            &32u32.to_le_bytes(),
            &2u16.to_le_bytes(),
            &0u16.to_le_bytes(),
        ]
        .concat();
        d.mem.write_slice(&desc, GuestAddress(0x1000)).unwrap();
        d.mem.write_obj(0u16, GuestAddress(0x2004)).unwrap();
        d.mem.write_obj(1u16, GuestAddress(0x2002)).unwrap();
        registrar.registered.lock().unwrap()[0].2.write(1).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while d.used_idx() != 1 {
            assert!(std::time::Instant::now() < deadline, "the worker did not serve the queue");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        while d.irq.0.load(Ordering::SeqCst) == 0 {
            assert!(std::time::Instant::now() < deadline, "no interrupt");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(d.r(INTERRUPT_STATUS) & INT_USED_BUFFER, INT_USED_BUFFER);
        // A reset stops the worker and detaches the eventfd.
        d.w(STATUS, 0);
        assert_eq!(registrar.unregistered.load(Ordering::SeqCst), 1);
        assert_eq!(d.r(STATUS), 0);
    }

    /// A host-side change of a balloon's target reaches the driver as a configuration-change
    /// interrupt raised by the worker, and the new target is in the configuration space.
    #[test]
    fn a_new_balloon_target_raises_a_configuration_interrupt() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
        let irq = Arc::new(CountingIrq::default());
        let balloon = crate::balloon::Balloon::new(1 << 20, false).unwrap();
        let handle = balloon.handle();
        let registrar = Arc::new(Registrar::default());
        let dev = MmioTransport::new(Box::new(balloon), mem.clone(), irq.clone())
            .with_notifier(registrar, 0xd000_0000);
        let mut d = Driver { dev, mem, irq };
        assert_eq!(d.r(CONFIG), 256, "1 MiB = 256 pages");
        assert_eq!(d.bring_up(8, 1) & status::DRIVER_OK, status::DRIVER_OK);
        assert_eq!(d.r(INTERRUPT_STATUS), 0, "no interrupt for the first target");
        handle.set_target(4 << 20);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while d.r(INTERRUPT_STATUS) & INT_CONFIG_CHANGE == 0 {
            assert!(std::time::Instant::now() < deadline, "no configuration interrupt");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(d.r(CONFIG), 1024);
        assert_eq!(d.irq.0.load(Ordering::SeqCst), 1);
    }
}
