//! The virtio-mmio transport, version 2 (virtio 1.2, section 4.2): a 0x200-byte register
//! window per device. The driver's writes are checked here — feature negotiation, queue
//! sizes and addresses, the status state machine — before the device model sees anything.
//!
//! With a [`NotifyRegistrar`] (the VMM's KVM ioeventfds), DRIVER_OK starts a worker thread
//! for the device: each queue's notification is an eventfd the vCPU signals without leaving
//! the kernel, and the worker serves the queue and raises the interrupt (an irqfd), so a
//! request costs no exit to userspace. A reset stops the worker before anything changes.

use crate::{status, VirtioDevice, VIRTIO_F_VERSION_1};
use devices::bus::lock;
use devices::{BusDevice, SharedIrq, VmAction};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

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

/// Registers the eventfd that KVM signals when the guest writes `datamatch` to `addr`
/// (the QueueNotify register), instead of exiting to userspace.
pub trait NotifyRegistrar: Send + Sync {
    /// Starts routing the writes to `fd`.
    fn register(&self, addr: u64, datamatch: u32, fd: &EventFd) -> std::io::Result<()>;
    /// Stops it.
    fn unregister(&self, addr: u64, datamatch: u32, fd: &EventFd) -> std::io::Result<()>;
}

/// What the transport and the device's worker thread share.
struct Shared {
    device: Box<dyn VirtioDevice>,
    queues: Vec<Queue>,
}

/// State the worker updates and the transport reads.
struct Signals {
    irq: SharedIrq,
    interrupt_status: AtomicU32,
    needs_reset: AtomicBool,
}

impl Signals {
    fn interrupt(&self, why: u32) {
        self.interrupt_status.fetch_or(why, Ordering::AcqRel);
        // A lost interrupt shows up as a stalled driver; there is no one to tell here.
        let _ = self.irq.trigger();
    }
}

/// Serves one queue notification: the device processes the queue, then the driver is told.
fn serve(shared: &Mutex<Shared>, signals: &Signals, mem: &GuestMemoryMmap, index: u16) {
    let mut guard = lock(shared);
    let Shared { device, queues } = &mut *guard;
    let Some(queue) = queues.get_mut(usize::from(index)) else { return };
    if !queue.ready() || signals.needs_reset.load(Ordering::Acquire) {
        return;
    }
    match device.process_queue(mem, index, queue) {
        Ok(true) => signals.interrupt(INT_USED_BUFFER),
        Ok(false) => {}
        Err(_) => {
            signals.needs_reset.store(true, Ordering::Release);
            signals.interrupt(INT_CONFIG_CHANGE);
        }
    }
}

/// The device's thread while the driver runs it.
struct Worker {
    stop: EventFd,
    notifiers: Vec<EventFd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn worker_loop(
    shared: Arc<Mutex<Shared>>,
    signals: Arc<Signals>,
    mem: GuestMemoryMmap,
    stop: EventFd,
    notifiers: Vec<EventFd>,
) {
    let mut fds: Vec<libc::pollfd> = std::iter::once(&stop)
        .chain(&notifiers)
        .map(|e| libc::pollfd { fd: e.as_raw_fd(), events: libc::POLLIN, revents: 0 })
        .collect();
    // The device's own timer (a rate limiter), if any, is polled last.
    let timer = lock(&shared).device.timer_fd();
    if let Some(fd) = timer {
        fds.push(libc::pollfd { fd, events: libc::POLLIN, revents: 0 });
    }
    let queue_count = notifiers.len();
    loop {
        let nfds = libc::nfds_t::try_from(fds.len()).unwrap_or(0);
        // SAFETY: `fds` is a valid array of `nfds` pollfd structures for the duration.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), nfds, -1) };
        if ready < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if fds[0].revents != 0 {
            return;
        }
        if timer.is_some() && fds[queue_count + 1].revents & libc::POLLIN != 0 {
            lock(&shared).device.timer_fired();
            for index in 0..queue_count {
                if let Ok(index) = u16::try_from(index) {
                    serve(&shared, &signals, &mem, index);
                }
            }
        }
        for (i, pfd) in fds.iter().enumerate().skip(1).take(queue_count) {
            if pfd.revents & libc::POLLIN != 0 {
                // Reading clears the count; several notifications are served as one pass.
                let _ = notifiers[i - 1].read();
                if let Ok(index) = u16::try_from(i - 1) {
                    serve(&shared, &signals, &mem, index);
                }
            }
        }
    }
}

/// One virtio device on the MMIO bus.
pub struct MmioTransport {
    shared: Arc<Mutex<Shared>>,
    signals: Arc<Signals>,
    mem: GuestMemoryMmap,
    notifier: Option<(Arc<dyn NotifyRegistrar>, u64)>,
    worker: Option<Worker>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    status: u32,
    config_generation: u32,
    /// The driver wrote a queue size the queue refused; DRIVER_OK will fail until reset.
    bad_queue_config: bool,
}

impl MmioTransport {
    /// Wraps `device`, which will raise `irq` and reach the guest's memory through `mem`.
    /// Notifications are served on the thread that writes QueueNotify.
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap, irq: SharedIrq) -> Self {
        let queues = Self::fresh_queues(device.as_ref());
        Self {
            shared: Arc::new(Mutex::new(Shared { device, queues })),
            signals: Arc::new(Signals {
                irq,
                interrupt_status: AtomicU32::new(0),
                needs_reset: AtomicBool::new(false),
            }),
            mem,
            notifier: None,
            worker: None,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            bad_queue_config: false,
        }
    }

    /// Serves notifications on a worker thread through eventfds that `registrar` attaches to
    /// this device's QueueNotify register at guest address `base + 0x50`.
    pub fn with_notifier(mut self, registrar: Arc<dyn NotifyRegistrar>, base: u64) -> Self {
        self.notifier = Some((registrar, base + QUEUE_NOTIFY));
        self
    }

    fn fresh_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
        device.queue_max_sizes().iter().filter_map(|size| Queue::new(*size).ok()).collect()
    }

    /// The driver-visible status register.
    pub fn status(&self) -> u32 {
        if self.signals.needs_reset.load(Ordering::Acquire) {
            self.status | status::DEVICE_NEEDS_RESET
        } else {
            self.status
        }
    }

    /// Stops the worker (if any) and detaches its eventfds.
    fn stop_worker(&mut self) {
        let Some(mut worker) = self.worker.take() else { return };
        let _ = worker.stop.write(1);
        if let Some(thread) = worker.thread.take() {
            let _ = thread.join();
        }
        if let Some((registrar, addr)) = &self.notifier {
            for (i, fd) in worker.notifiers.iter().enumerate() {
                let _ = registrar.unregister(*addr, u32::try_from(i).unwrap_or(0), fd);
            }
        }
    }

    /// Starts the worker; on any failure notifications stay on the vCPU thread.
    fn start_worker(&mut self) {
        let Some((registrar, addr)) = self.notifier.clone() else { return };
        let count = lock(&self.shared).queues.len();
        let mut notifiers = Vec::with_capacity(count);
        for i in 0..count {
            let Ok(fd) = EventFd::new(libc::EFD_NONBLOCK) else { break };
            if registrar.register(addr, u32::try_from(i).unwrap_or(0), &fd).is_err() {
                break;
            }
            notifiers.push(fd);
        }
        let stop = EventFd::new(libc::EFD_NONBLOCK);
        let clones: Option<Vec<EventFd>> = notifiers.iter().map(|f| f.try_clone().ok()).collect();
        let (Ok(stop), Some(clones), true) = (stop, clones, notifiers.len() == count) else {
            for (i, fd) in notifiers.iter().enumerate() {
                let _ = registrar.unregister(addr, u32::try_from(i).unwrap_or(0), fd);
            }
            return;
        };
        let Ok(stop_clone) = stop.try_clone() else { return };
        let (shared, signals, mem) = (self.shared.clone(), self.signals.clone(), self.mem.clone());
        let type_id = lock(&self.shared).device.device_type();
        let thread = std::thread::Builder::new()
            .name(format!("virtio-{type_id}"))
            .spawn(move || worker_loop(shared, signals, mem, stop_clone, clones))
            .ok();
        if thread.is_none() {
            for (i, fd) in notifiers.iter().enumerate() {
                let _ = registrar.unregister(addr, u32::try_from(i).unwrap_or(0), fd);
            }
            return;
        }
        self.worker = Some(Worker { stop, notifiers, thread });
    }

    fn reset(&mut self) {
        self.stop_worker();
        {
            let mut shared = lock(&self.shared);
            shared.device.reset();
            shared.queues = Self::fresh_queues(shared.device.as_ref());
        }
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.signals.interrupt_status.store(0, Ordering::Release);
        self.signals.needs_reset.store(false, Ordering::Release);
        self.bad_queue_config = false;
    }

    fn needs_reset(&mut self) {
        self.signals.needs_reset.store(true, Ordering::Release);
        self.signals.interrupt(INT_CONFIG_CHANGE);
    }

    fn with_selected_queue<T>(&mut self, f: impl FnOnce(&mut Queue) -> T) -> Option<T> {
        let index = usize::try_from(self.queue_select).ok()?;
        let mut shared = lock(&self.shared);
        shared.queues.get_mut(index).map(f)
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
        let mut new = value & !status::DEVICE_NEEDS_RESET;
        if added & status::FEATURES_OK != 0 {
            let offered = lock(&self.shared).device.features();
            let acceptable = self.driver_features & !offered == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !acceptable {
                new &= !status::FEATURES_OK;
            }
        }
        if added & status::DRIVER_OK != 0 {
            let negotiated = new & status::FEATURES_OK != 0;
            let queues_valid = {
                let shared = lock(&self.shared);
                shared.queues.iter().all(|q| !q.ready() || q.is_valid(&self.mem))
            };
            if !negotiated || !queues_valid || self.bad_queue_config {
                self.status = new & !status::DRIVER_OK;
                self.needs_reset();
                return;
            }
            self.status = new;
            self.start_worker();
            return;
        }
        self.status = new;
    }

    fn notify(&mut self, index: u32) {
        if self.status & status::DRIVER_OK == 0 {
            return;
        }
        if let Ok(index) = u16::try_from(index) {
            serve(&self.shared, &self.signals, &self.mem, index);
        }
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            MAGIC_VALUE => MAGIC,
            VERSION => 2,
            DEVICE_ID => lock(&self.shared).device.device_type(),
            VENDOR_ID => VENDOR,
            DEVICE_FEATURES => {
                let features = lock(&self.shared).device.features();
                match self.device_features_select {
                    0 => (features & 0xffff_ffff) as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            QUEUE_NUM_MAX => self.with_selected_queue(|q| u32::from(q.max_size())).unwrap_or(0),
            QUEUE_READY => self.with_selected_queue(|q| u32::from(q.ready())).unwrap_or(0),
            INTERRUPT_STATUS => self.signals.interrupt_status.load(Ordering::Acquire),
            STATUS => self.status(),
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
                let accepted = u16::try_from(value)
                    .ok()
                    .and_then(|size| self.with_selected_queue(|q| q.try_set_size(size).is_ok()))
                    .unwrap_or(false);
                if !accepted {
                    self.bad_queue_config = true;
                }
            }
            QUEUE_READY if configuring => {
                self.with_selected_queue(|q| q.set_ready(value == 1));
            }
            QUEUE_DESC_LOW | QUEUE_DESC_HIGH | QUEUE_DRIVER_LOW | QUEUE_DRIVER_HIGH
            | QUEUE_DEVICE_LOW | QUEUE_DEVICE_HIGH
                if configuring =>
            {
                let high = offset & 4 != 0;
                let (low, high) = if high { (None, Some(value)) } else { (Some(value), None) };
                self.with_selected_queue(|q| match offset & !4 {
                    QUEUE_DESC_LOW => q.set_desc_table_address(low, high),
                    QUEUE_DRIVER_LOW => q.set_avail_ring_address(low, high),
                    _ => q.set_used_ring_address(low, high),
                });
            }
            QUEUE_NOTIFY => self.notify(value),
            INTERRUPT_ACK => {
                self.signals.interrupt_status.fetch_and(!value, Ordering::AcqRel);
            }
            STATUS => self.set_status(value),
            _ => {}
        }
    }
}

impl Drop for MmioTransport {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG {
            lock(&self.shared).device.read_config(offset - CONFIG, data);
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
            lock(&self.shared).device.write_config(offset - CONFIG, data);
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

    /// Records what the transport registers, and lets the test play KVM's part.
    #[derive(Default)]
    struct Registrar {
        registered: std::sync::Mutex<Vec<(u64, u32, EventFd)>>,
        unregistered: AtomicUsize,
    }
    impl NotifyRegistrar for Registrar {
        fn register(&self, addr: u64, datamatch: u32, fd: &EventFd) -> std::io::Result<()> {
            self.registered.lock().unwrap().push((addr, datamatch, fd.try_clone()?));
            Ok(())
        }
        fn unregister(&self, _addr: u64, _datamatch: u32, _fd: &EventFd) -> std::io::Result<()> {
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
        assert_eq!((addr, datamatch), (0xd000_0050, 0));
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
}
