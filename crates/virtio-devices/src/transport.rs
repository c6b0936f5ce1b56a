//! What every virtio transport shares: the device and its queues, the status state machine
//! and feature negotiation (virtio 1.2, 2.1 and 3.1), and the worker thread that serves
//! notifications. A transport ([`crate::mmio`], [`crate::pci`]) only decodes its registers
//! into calls on [`VirtioCore`] and says how the driver is interrupted ([`Interrupt`]).
//!
//! With a [`NotifyRegistrar`] (the VMM's KVM ioeventfds), DRIVER_OK starts a worker thread
//! for the device: each queue's notification is an eventfd the vCPU signals without leaving
//! the kernel, and the worker serves the queue and raises the interrupt (an irqfd), so a
//! request costs no exit to userspace. A reset stops the worker before anything changes.
//!
//! The worker also waits on the device's own descriptors ([`VirtioDevice::event_fds`]: a
//! rate limiter's timer, a TAP that has frames to receive). Before each wait it asks the
//! device which of them it wants ([`VirtioDevice::event_wanted`]), so that a descriptor the
//! device cannot serve yet (a readable TAP with no receive buffers) does not wake it in a
//! loop; when one fires it calls [`VirtioDevice::event_ready`] and serves every queue.

use crate::state::DirtyPages;
use crate::{status, QueueSetup, VirtioDevice, VIRTIO_F_VERSION_1};
use devices::bus::lock;
use snapshot::{Decoder, Encoder};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// How a transport tells the driver that something happened.
pub trait Interrupt: Send + Sync {
    /// Queue `index` has new used buffers.
    fn queue(&self, index: u16);
    /// The configuration changed, or the device needs a reset.
    fn config(&self);
}

/// Registers the eventfd that KVM signals when the guest writes to a queue's notification
/// address (with `datamatch`, only writes of that 32-bit value), instead of exiting.
pub trait NotifyRegistrar: Send + Sync {
    /// Starts routing the writes to `fd`.
    fn register(&self, addr: u64, datamatch: Option<u32>, fd: &EventFd) -> std::io::Result<()>;
    /// Stops it.
    fn unregister(&self, addr: u64, datamatch: Option<u32>, fd: &EventFd) -> std::io::Result<()>;
}

/// Where the driver notifies one queue: an address and, for transports that share one
/// address between queues, the value that names the queue.
pub type NotifyAddress = (u64, Option<u32>);

/// What the transport and the device's worker thread share.
struct Shared {
    device: Box<dyn VirtioDevice>,
    queues: Vec<Queue>,
}

/// State the worker updates and the transport reads.
struct Signals {
    interrupt: Arc<dyn Interrupt>,
    needs_reset: AtomicBool,
    /// Where the guest pages the device writes are marked (snapshots, migration).
    dirty: OnceLock<Arc<DirtyPages>>,
}

/// Serves one queue notification: the device processes the queue, then the driver is told.
fn serve(shared: &Mutex<Shared>, signals: &Signals, mem: &GuestMemoryMmap, index: u16) {
    let mut guard = lock(shared);
    let Shared { device, queues } = &mut *guard;
    let Some(queue) = queues.get_mut(usize::from(index)) else { return };
    if !queue.ready() || signals.needs_reset.load(Ordering::Acquire) {
        return;
    }
    let used_before = queue.next_used();
    let result = device.process_queue(mem, index, queue);
    if let Some(dirty) = signals.dirty.get().filter(|d| d.enabled()) {
        crate::state::mark_used(dirty, mem, queue, used_before);
    }
    match result {
        Ok(true) => signals.interrupt.queue(index),
        Ok(false) => {}
        Err(_) => {
            signals.needs_reset.store(true, Ordering::Release);
            signals.interrupt.config();
        }
    }
}

/// The device's thread while the driver runs it.
struct Worker {
    stop: EventFd,
    notifiers: Vec<EventFd>,
    /// Where each notifier is registered.
    addresses: Vec<NotifyAddress>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The device runs its queues elsewhere ([`crate::ExternalQueues`]): the notifiers are its
    /// kick eventfds and the thread turns its call eventfds into interrupts.
    external: bool,
}

/// The thread of a device that runs its queues elsewhere: each queue's call eventfd becomes
/// that queue's interrupt; a hang-up of the backend marks the device NEEDS_RESET.
fn call_loop(
    signals: Arc<Signals>,
    stop: EventFd,
    calls: Vec<EventFd>,
    hangup: Option<std::os::fd::RawFd>,
    describe: String,
) {
    let mut fds: Vec<libc::pollfd> = std::iter::once(&stop)
        .chain(&calls)
        .map(|e| libc::pollfd { fd: e.as_raw_fd(), events: libc::POLLIN, revents: 0 })
        .collect();
    if let Some(fd) = hangup {
        fds.push(libc::pollfd { fd, events: libc::POLLRDHUP, revents: 0 });
    }
    let hangup_at = calls.len() + 1;
    loop {
        let ready = wait_for_work(&mut fds);
        if ready < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if fds[0].revents != 0 {
            return;
        }
        for (i, pfd) in fds.iter().enumerate().skip(1).take(calls.len()) {
            if pfd.revents & libc::POLLIN != 0 {
                let _ = calls[i - 1].read();
                if let Ok(index) = u16::try_from(i - 1) {
                    signals.interrupt.queue(index);
                }
            }
        }
        if let Some(pfd) = fds.get_mut(hangup_at) {
            if pfd.fd >= 0 && pfd.revents != 0 {
                eprintln!("vanguard: {describe} hung up; the device needs a reset");
                pfd.fd = -1;
                signals.needs_reset.store(true, Ordering::Release);
                signals.interrupt.config();
            }
        }
    }
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
    // The device's own descriptors (rate limiter timers, a TAP), if any, come last.
    let events = lock(&shared).device.event_fds();
    fds.extend(events.iter().map(|fd| libc::pollfd { fd: *fd, events: libc::POLLIN, revents: 0 }));
    let queue_count = notifiers.len();
    let first_event = queue_count + 1;
    // A notification may have come while no worker ran (before a quiesce, or in the source
    // VM of a restore): every queue is served once before the first wait.
    for index in 0..queue_count {
        if let Ok(index) = u16::try_from(index) {
            serve(&shared, &signals, &mem, index);
        }
    }
    loop {
        if !events.is_empty() {
            // poll(2) skips negative descriptors: that is how an event the device cannot
            // serve yet stays out of this wait.
            let shared = lock(&shared);
            for (which, fd) in events.iter().enumerate() {
                if let Some(pfd) = fds.get_mut(first_event + which) {
                    pfd.fd = if shared.device.event_wanted(which) { *fd } else { -1 };
                }
            }
        }
        let ready = wait_for_work(&mut fds);
        if ready < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if fds[0].revents != 0 {
            return;
        }
        // The device's events first; any of them means every queue is served again.
        let mut serve_all = false;
        for (which, pfd) in fds.iter().skip(first_event).enumerate() {
            if pfd.fd >= 0 && pfd.revents != 0 {
                let mut guard = lock(&shared);
                guard.device.event_ready(which);
                if guard.device.config_changed() {
                    signals.interrupt.config();
                }
                serve_all = true;
            }
        }
        for (i, pfd) in fds.iter().enumerate().skip(1).take(queue_count) {
            if pfd.revents & libc::POLLIN != 0 {
                // Reading clears the count; several notifications are served as one pass.
                let _ = notifiers[i - 1].read();
                if !serve_all {
                    if let Ok(index) = u16::try_from(i - 1) {
                        serve(&shared, &signals, &mem, index);
                    }
                }
            }
        }
        if serve_all {
            for index in 0..queue_count {
                if let Ok(index) = u16::try_from(index) {
                    serve(&shared, &signals, &mem, index);
                }
            }
        }
    }
}

/// How long the worker keeps checking for the next notification before it sleeps. A sleeping
/// worker's CPU goes idle, and waking it costs more than serving a 4 KiB read from the page
/// cache: measured on our hosts, 4 KiB reads at queue depth 1 took ~34k TSC cycles each with
/// the worker sleeping at once and ~18k with 32-50 us of polling. QEMU's IOThreads poll for up
/// to 32 us by default for the same reason. The cost is at most this much CPU after each
/// burst of requests; an idle device costs nothing.
const BUSY_POLL: std::time::Duration = std::time::Duration::from_micros(32);

/// Waits until a descriptor in `fds` is ready: polls without sleeping for [`BUSY_POLL`], then
/// sleeps. Returns poll(2)'s result.
fn wait_for_work(fds: &mut [libc::pollfd]) -> libc::c_int {
    let nfds = libc::nfds_t::try_from(fds.len()).unwrap_or(0);
    let deadline = std::time::Instant::now() + BUSY_POLL;
    loop {
        // SAFETY: `fds` is a valid array of `nfds` pollfd structures for the duration.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), nfds, 0) };
        if ready != 0 {
            return ready;
        }
        if std::time::Instant::now() >= deadline {
            // SAFETY: as above.
            return unsafe { libc::poll(fds.as_mut_ptr(), nfds, -1) };
        }
        std::hint::spin_loop();
    }
}

/// A device with its queues and the driver-visible state every transport has.
pub struct VirtioCore {
    shared: Arc<Mutex<Shared>>,
    signals: Arc<Signals>,
    mem: GuestMemoryMmap,
    registrar: Option<Arc<dyn NotifyRegistrar>>,
    notify_addresses: Vec<NotifyAddress>,
    worker: Option<Worker>,
    /// The queue the driver selected.
    pub queue_select: u32,
    /// Which 32 bits of the device features the driver reads.
    pub device_features_select: u32,
    /// Which 32 bits of the driver features the driver writes.
    pub driver_features_select: u32,
    driver_features: u64,
    status: u32,
    config_generation: u32,
    /// The driver wrote a queue size the queue refused; DRIVER_OK will fail until reset.
    bad_queue_config: bool,
}

impl VirtioCore {
    /// Wraps `device`, which reaches the guest's memory through `mem` and tells the driver
    /// through `interrupt`. Notifications are served on the caller's thread until
    /// [`VirtioCore::set_notifier`] gives eventfds to a worker.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn Interrupt>,
    ) -> Self {
        let queues = fresh_queues(device.as_ref());
        Self {
            shared: Arc::new(Mutex::new(Shared { device, queues })),
            signals: Arc::new(Signals {
                interrupt,
                needs_reset: AtomicBool::new(false),
                dirty: OnceLock::new(),
            }),
            mem,
            registrar: None,
            notify_addresses: Vec::new(),
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
    /// `addresses` (one per queue). If the worker is running (the guest moved a BAR), its
    /// eventfds move to the new addresses.
    pub fn set_notifier(
        &mut self,
        registrar: Arc<dyn NotifyRegistrar>,
        addresses: Vec<NotifyAddress>,
    ) {
        if let Some(worker) = self.worker.as_mut().filter(|w| w.external) {
            // The backend keeps running: only the kick eventfds move.
            if let Some(old) = &self.registrar {
                for (fd, (addr, datamatch)) in worker.notifiers.iter().zip(&worker.addresses) {
                    let _ = old.unregister(*addr, *datamatch, fd);
                }
            }
            for (fd, (addr, datamatch)) in worker.notifiers.iter().zip(&addresses) {
                let _ = registrar.register(*addr, *datamatch, fd);
            }
            worker.addresses = addresses.iter().copied().take(worker.notifiers.len()).collect();
            self.registrar = Some(registrar);
            self.notify_addresses = addresses;
            return;
        }
        let running = self.worker.is_some();
        self.stop_worker();
        self.registrar = Some(registrar);
        self.notify_addresses = addresses;
        if running {
            self.start_worker();
        }
    }

    /// The device's virtio type.
    pub fn device_type(&self) -> u32 {
        lock(&self.shared).device.device_type()
    }

    /// Number of queues.
    pub fn queue_count(&self) -> usize {
        lock(&self.shared).queues.len()
    }

    /// The 32 bits of the offered features the driver selected.
    pub fn device_features(&self) -> u32 {
        let features = lock(&self.shared).device.features();
        match self.device_features_select {
            0 => (features & 0xffff_ffff) as u32,
            1 => (features >> 32) as u32,
            _ => 0,
        }
    }

    /// The 32 bits of the driver's features it selected.
    pub fn driver_features(&self) -> u32 {
        match self.driver_features_select {
            0 => (self.driver_features & 0xffff_ffff) as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        }
    }

    /// The driver writes its features (ignored once FEATURES_OK is set).
    pub fn set_driver_features(&mut self, value: u32) {
        if self.status & status::FEATURES_OK != 0 {
            return;
        }
        match self.driver_features_select {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.driver_features =
                    (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
            }
            _ => {}
        }
    }

    /// Whether the driver may still change the queue layout (before DRIVER_OK).
    pub fn configuring(&self) -> bool {
        self.status & status::DRIVER_OK == 0
    }

    /// The driver-visible status.
    pub fn status(&self) -> u32 {
        if self.signals.needs_reset.load(Ordering::Acquire) {
            self.status | status::DEVICE_NEEDS_RESET
        } else {
            self.status
        }
    }

    /// The configuration generation (changes whenever the configuration space is written).
    pub fn config_generation(&self) -> u32 {
        self.config_generation
    }

    /// Runs `f` on the selected queue, if it exists.
    pub fn with_selected_queue<T>(&mut self, f: impl FnOnce(&mut Queue) -> T) -> Option<T> {
        let index = usize::try_from(self.queue_select).ok()?;
        let mut shared = lock(&self.shared);
        shared.queues.get_mut(index).map(f)
    }

    /// The driver sets the selected queue's size; a size the queue refuses (zero, not a power
    /// of two, above the maximum) breaks the device at DRIVER_OK.
    pub fn set_queue_size(&mut self, value: u32) {
        if !self.configuring() {
            return;
        }
        let accepted = u16::try_from(value)
            .ok()
            .and_then(|size| self.with_selected_queue(|q| q.try_set_size(size).is_ok()))
            .unwrap_or(false);
        if !accepted {
            self.bad_queue_config = true;
        }
    }

    /// The driver enables (or, on transports that allow it, disables) the selected queue.
    pub fn set_queue_ready(&mut self, ready: bool) {
        if self.configuring() {
            self.with_selected_queue(|q| q.set_ready(ready));
        }
    }

    /// Part of a ring address: `which` is 0 (descriptors), 1 (driver ring) or 2 (device
    /// ring); `low`/`high` are the halves written (either may be absent).
    pub fn set_queue_address(&mut self, which: u8, low: Option<u32>, high: Option<u32>) {
        if !self.configuring() {
            return;
        }
        self.with_selected_queue(|q| match which {
            0 => q.set_desc_table_address(low, high),
            1 => q.set_avail_ring_address(low, high),
            _ => q.set_used_ring_address(low, high),
        });
    }

    /// Reads the device-specific configuration space.
    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        lock(&self.shared).device.read_config(offset, data);
    }

    /// Writes the device-specific configuration space.
    pub fn write_config(&mut self, offset: u64, data: &[u8]) {
        lock(&self.shared).device.write_config(offset, data);
        self.config_generation = self.config_generation.wrapping_add(1);
    }

    /// Marks the device broken and tells the driver.
    pub fn needs_reset(&mut self) {
        self.signals.needs_reset.store(true, Ordering::Release);
        self.signals.interrupt.config();
    }

    /// The driver writes the status register. Zero resets the device (the transport resets
    /// its own registers too); bits may only be added; FEATURES_OK holds only for features
    /// that were offered and include VERSION_1; DRIVER_OK with a bad queue marks the device
    /// NEEDS_RESET instead of running it.
    pub fn set_status(&mut self, value: u32) {
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
            let mut shared = lock(&self.shared);
            let offered = shared.device.features();
            let acceptable = self.driver_features & !offered == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if acceptable {
                shared.device.ack_features(self.driver_features);
            } else {
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

    /// The driver notified queue `index` through the transport's registers (not an eventfd).
    pub fn notify(&mut self, index: u32) {
        if self.status & status::DRIVER_OK == 0 {
            return;
        }
        if let Some(worker) = self.worker.as_ref().filter(|w| w.external) {
            if let Some(kick) = usize::try_from(index).ok().and_then(|i| worker.notifiers.get(i)) {
                let _ = kick.write(1);
            }
            return;
        }
        if let Ok(index) = u16::try_from(index) {
            serve(&self.shared, &self.signals, &self.mem, index);
        }
    }

    /// The descriptor the device hands over to another VMM process on this host.
    pub fn handover_fd(&self) -> Option<std::os::fd::RawFd> {
        lock(&self.shared).device.handover_fd()
    }

    /// Whether the device's queues run in another process.
    pub fn external(&self) -> bool {
        lock(&self.shared).device.external_queues().is_some()
    }

    /// Marks the guest pages the device writes in `dirty` from now on (once; later calls
    /// are ignored).
    pub fn set_dirty_log(&self, dirty: Arc<DirtyPages>) {
        let _ = self.signals.dirty.set(dirty);
    }

    /// Stops the worker, so that no queue is served until [`VirtioCore::resume`].
    pub fn quiesce(&mut self) {
        if !self.external() {
            self.stop_worker();
        }
    }

    /// Starts the worker again if the driver runs the device.
    pub fn resume(&mut self) {
        if self.worker.is_none() && self.status & status::DRIVER_OK != 0 {
            self.start_worker();
        }
    }

    /// Writes the driver-visible state, every queue's and the device's own (quiesced).
    pub fn save(&self, e: &mut Encoder) {
        let shared = lock(&self.shared);
        e.u32(self.status).u64(self.driver_features);
        e.u32(self.device_features_select).u32(self.driver_features_select);
        e.u32(self.queue_select).u32(self.config_generation);
        e.u8(u8::from(self.bad_queue_config));
        e.u8(u8::from(self.signals.needs_reset.load(Ordering::Acquire)));
        e.u32(u32::try_from(shared.queues.len()).unwrap_or(0));
        for q in &shared.queues {
            crate::state::encode_queue(e, &q.state());
        }
        e.bytes(&shared.device.save_state());
    }

    /// Puts back what [`VirtioCore::save`] wrote, into a device fresh from its configuration;
    /// the worker is started by [`VirtioCore::resume`]. Everything the bytes say is checked
    /// as if the driver had written it: a queue the device does not have, a size above its
    /// maximum, rings outside guest memory or features it does not offer are refused.
    pub fn restore(&mut self, d: &mut Decoder<'_>) -> Result<(), String> {
        let e = |e: snapshot::SnapshotError| e.to_string();
        let status = d.u32("device status").map_err(e)?;
        let driver_features = d.u64("driver features").map_err(e)?;
        let device_features_select = d.u32("device features select").map_err(e)?;
        let driver_features_select = d.u32("driver features select").map_err(e)?;
        let queue_select = d.u32("queue select").map_err(e)?;
        let config_generation = d.u32("configuration generation").map_err(e)?;
        let bad_queue_config = d.u8("bad queue flag").map_err(e)? != 0;
        let needs_reset = d.u8("needs-reset flag").map_err(e)? != 0;
        let n = d.count(30, "queues").map_err(e)?;
        let mut states: Vec<QueueState> = Vec::with_capacity(n);
        for _ in 0..n {
            states.push(crate::state::decode_queue(d).map_err(e)?);
        }
        let device_state = d.bytes("device state").map_err(e)?;
        let mut shared = lock(&self.shared);
        let maxima = shared.device.queue_max_sizes().to_vec();
        if states.len() != maxima.len() {
            return Err(format!(
                "the snapshot has {} queues, this device {}",
                states.len(),
                maxima.len()
            ));
        }
        let mut queues = Vec::with_capacity(n);
        for (i, (state, max)) in states.iter().zip(&maxima).enumerate() {
            if state.max_size != *max {
                return Err(format!(
                    "queue {i}: its maximum size was {}, this device's is {max}",
                    state.max_size
                ));
            }
            let queue = Queue::try_from(*state).map_err(|err| format!("queue {i}: {err}"))?;
            if status & status::DRIVER_OK != 0 && queue.ready() && !queue.is_valid(&self.mem) {
                return Err(format!("queue {i}: its rings are not in guest memory"));
            }
            queues.push(queue);
        }
        let offered = shared.device.features();
        if driver_features & !offered != 0 {
            return Err(format!(
                "the driver took features {:#x} this device does not offer",
                driver_features & !offered
            ));
        }
        if status & status::FEATURES_OK != 0 {
            shared.device.ack_features(driver_features);
        }
        shared.device.restore_state(device_state)?;
        shared.queues = queues;
        drop(shared);
        self.status = status;
        self.driver_features = driver_features;
        self.device_features_select = device_features_select;
        self.driver_features_select = driver_features_select;
        self.queue_select = queue_select;
        self.config_generation = config_generation;
        self.bad_queue_config = bad_queue_config;
        self.signals.needs_reset.store(needs_reset, Ordering::Release);
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
        {
            let mut shared = lock(&self.shared);
            shared.device.reset();
            shared.queues = fresh_queues(shared.device.as_ref());
        }
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.signals.needs_reset.store(false, Ordering::Release);
        self.bad_queue_config = false;
    }

    /// Stops the worker (if any) and detaches its eventfds.
    fn stop_worker(&mut self) {
        let Some(mut worker) = self.worker.take() else { return };
        if worker.external {
            // The backend stops the rings before anything else changes.
            if let Some(external) = lock(&self.shared).device.external_queues() {
                external.deactivate();
            }
        }
        let _ = worker.stop.write(1);
        if let Some(thread) = worker.thread.take() {
            let _ = thread.join();
        }
        if let Some(registrar) = &self.registrar {
            for (fd, (addr, datamatch)) in worker.notifiers.iter().zip(&worker.addresses) {
                let _ = registrar.unregister(*addr, *datamatch, fd);
            }
        }
    }

    /// Starts the worker; on any failure notifications stay on the vCPU thread.
    fn start_worker(&mut self) {
        if lock(&self.shared).device.external_queues().is_some() {
            if let Err(e) = self.start_external() {
                eprintln!("vanguard: {e}; the device needs a reset");
                self.needs_reset();
            }
            return;
        }
        let Some(registrar) = self.registrar.clone() else { return };
        let count = self.queue_count();
        let addresses: Vec<NotifyAddress> =
            self.notify_addresses.iter().copied().take(count).collect();
        let mut notifiers = Vec::with_capacity(count);
        for (addr, datamatch) in &addresses {
            let Ok(fd) = EventFd::new(libc::EFD_NONBLOCK) else { break };
            if registrar.register(*addr, *datamatch, &fd).is_err() {
                break;
            }
            notifiers.push(fd);
        }
        let unregister = |notifiers: &[EventFd]| {
            for (fd, (addr, datamatch)) in notifiers.iter().zip(&addresses) {
                let _ = registrar.unregister(*addr, *datamatch, fd);
            }
        };
        let stop = EventFd::new(libc::EFD_NONBLOCK);
        let clones: Option<Vec<EventFd>> = notifiers.iter().map(|f| f.try_clone().ok()).collect();
        let (Ok(stop), Some(clones), true) = (stop, clones, notifiers.len() == count) else {
            unregister(&notifiers);
            return;
        };
        let Ok(stop_clone) = stop.try_clone() else {
            unregister(&notifiers);
            return;
        };
        let (shared, signals, mem) = (self.shared.clone(), self.signals.clone(), self.mem.clone());
        let type_id = self.device_type();
        let thread = std::thread::Builder::new()
            .name(format!("virtio-{type_id}"))
            .spawn(move || worker_loop(shared, signals, mem, stop_clone, clones))
            .ok();
        if thread.is_none() {
            unregister(&notifiers);
            return;
        }
        self.worker = Some(Worker { stop, notifiers, addresses, thread, external: false });
    }

    /// DRIVER_OK for a device that runs its queues elsewhere: a kick eventfd per queue (a KVM
    /// ioeventfd on its notification address), a call eventfd per queue that a thread turns
    /// into the queue's interrupt, and the enabled queues handed to the device.
    fn start_external(&mut self) -> Result<(), String> {
        let setups: Vec<QueueSetup> = {
            let shared = lock(&self.shared);
            shared
                .queues
                .iter()
                .enumerate()
                .filter(|(_, q)| q.ready())
                .filter_map(|(i, q)| {
                    Some(QueueSetup {
                        index: u16::try_from(i).ok()?,
                        size: q.size(),
                        desc: q.desc_table(),
                        avail: q.avail_ring(),
                        used: q.used_ring(),
                        next_avail: q.next_avail(),
                    })
                })
                .collect()
        };
        let count = self.queue_count();
        let eventfd = || EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"));
        let mut notifiers = Vec::with_capacity(count);
        let mut calls = Vec::with_capacity(count);
        for _ in 0..count {
            notifiers.push(eventfd()?);
            calls.push(eventfd()?);
        }
        let stop = eventfd()?;
        let addresses: Vec<NotifyAddress> =
            self.notify_addresses.iter().copied().take(count).collect();
        let mut worker =
            Worker { stop, notifiers, addresses: Vec::new(), thread: None, external: true };
        if let Some(registrar) = &self.registrar {
            for (fd, (addr, datamatch)) in worker.notifiers.iter().zip(&addresses) {
                registrar
                    .register(*addr, *datamatch, fd)
                    .map_err(|e| format!("cannot register a queue notification: {e}"))?;
                worker.addresses.push((*addr, *datamatch));
            }
        }
        // From here on, dropping `worker` through stop_worker undoes everything.
        let (describe, hangup, activated) = {
            let mut shared = lock(&self.shared);
            let Some(external) = shared.device.external_queues() else {
                return Err("the device no longer runs its queues elsewhere".into());
            };
            let pick = |fds: &[EventFd]| -> Vec<EventFd> {
                setups
                    .iter()
                    .filter_map(|s| fds.get(usize::from(s.index)))
                    .filter_map(|f| f.try_clone().ok())
                    .collect()
            };
            let (kicks, queue_calls) = (pick(&worker.notifiers), pick(&calls));
            let activated =
                external.activate(&self.mem, self.driver_features, &setups, &kicks, &queue_calls);
            (external.describe(), external.hangup_fd(), activated)
        };
        let stop_clone = worker.stop.try_clone().map_err(|e| format!("eventfd: {e}"));
        self.worker = Some(worker);
        if let Err(e) = activated {
            self.stop_worker();
            return Err(format!("{describe}: {e}"));
        }
        let stop_clone = match stop_clone {
            Ok(stop) => stop,
            Err(e) => {
                self.stop_worker();
                return Err(e);
            }
        };
        let signals = self.signals.clone();
        let message = describe.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vhost-call-{}", self.device_type()))
            .spawn(move || call_loop(signals, stop_clone, calls, hangup, message));
        match thread {
            Ok(thread) => {
                if let Some(worker) = self.worker.as_mut() {
                    worker.thread = Some(thread);
                }
                Ok(())
            }
            Err(e) => {
                self.stop_worker();
                Err(format!("{describe}: cannot start its interrupt thread: {e}"))
            }
        }
    }
}

impl Drop for VirtioCore {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

fn fresh_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
    device.queue_max_sizes().iter().filter_map(|size| Queue::new(*size).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DeviceError;
    use std::sync::atomic::AtomicUsize;
    use std::time::{Duration, Instant};
    use vm_memory::GuestAddress;

    /// What the test device saw, shared with the test.
    #[derive(Default)]
    struct Seen {
        acked: Mutex<Vec<u64>>,
        events: AtomicUsize,
        served: AtomicUsize,
        wanted: AtomicBool,
    }

    /// A device with one queue and one event descriptor (an eventfd the test signals and the
    /// device never reads, so it stays readable: level-triggered, like a TAP with frames).
    struct EventDevice {
        seen: Arc<Seen>,
        event: EventFd,
    }

    impl VirtioDevice for EventDevice {
        fn device_type(&self) -> u32 {
            4
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 1
        }
        fn process_queue(
            &mut self,
            _mem: &GuestMemoryMmap,
            _index: u16,
            _queue: &mut Queue,
        ) -> Result<bool, DeviceError> {
            self.seen.served.fetch_add(1, Ordering::SeqCst);
            Ok(false)
        }
        fn ack_features(&mut self, features: u64) {
            lock(&self.seen.acked).push(features);
        }
        fn event_fds(&self) -> Vec<std::os::fd::RawFd> {
            vec![self.event.as_raw_fd()]
        }
        fn event_wanted(&self, which: usize) -> bool {
            which == 0 && self.seen.wanted.load(Ordering::SeqCst)
        }
        fn event_ready(&mut self, which: usize) {
            assert_eq!(which, 0);
            self.seen.events.fetch_add(1, Ordering::SeqCst);
        }
    }

    struct NoInterrupt;
    impl Interrupt for NoInterrupt {
        fn queue(&self, _index: u16) {}
        fn config(&self) {}
    }

    /// Keeps the queue's eventfd, to signal it as KVM would.
    #[derive(Default)]
    struct Registrar(Mutex<Option<EventFd>>);
    impl NotifyRegistrar for Registrar {
        fn register(&self, _: u64, _: Option<u32>, fd: &EventFd) -> std::io::Result<()> {
            *lock(&self.0) = Some(fd.try_clone()?);
            Ok(())
        }
        fn unregister(&self, _: u64, _: Option<u32>, _: &EventFd) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn core_with(seen: &Arc<Seen>, event: &EventFd) -> (VirtioCore, Arc<Registrar>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let device = EventDevice { seen: seen.clone(), event: event.try_clone().unwrap() };
        let mut core = VirtioCore::new(Box::new(device), mem, Arc::new(NoInterrupt));
        let registrar = Arc::new(Registrar::default());
        core.set_notifier(registrar.clone(), vec![(0x1000, None)]);
        (core, registrar)
    }

    fn negotiate(core: &mut VirtioCore, high: u32, low: u32) -> u32 {
        use status::{ACKNOWLEDGE, DRIVER, FEATURES_OK};
        core.set_status(ACKNOWLEDGE);
        core.set_status(ACKNOWLEDGE | DRIVER);
        core.driver_features_select = 0;
        core.set_driver_features(low);
        core.driver_features_select = 1;
        core.set_driver_features(high);
        core.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
        core.status()
    }

    fn wait_until(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn accepted_features_reach_the_device_and_refused_ones_do_not() {
        let seen = Arc::new(Seen::default());
        let event = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (mut core, _) = core_with(&seen, &event);
        // Bit 2 was not offered: FEATURES_OK does not hold, and the device hears nothing.
        assert_eq!(negotiate(&mut core, 1, 4) & status::FEATURES_OK, 0);
        assert!(lock(&seen.acked).is_empty());
        core.set_status(0);
        assert_ne!(negotiate(&mut core, 1, 1) & status::FEATURES_OK, 0);
        assert_eq!(*lock(&seen.acked), vec![VIRTIO_F_VERSION_1 | 1]);
    }

    /// The worker waits on the device's descriptor only while the device wants it: a
    /// descriptor that stays readable wakes it once per wait while wanted, never while not;
    /// each wake-up serves the queue.
    #[test]
    fn the_worker_waits_on_device_events_only_while_wanted() {
        let seen = Arc::new(Seen::default());
        seen.wanted.store(true, Ordering::SeqCst);
        let event = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (mut core, registrar) = core_with(&seen, &event);
        negotiate(&mut core, 1, 0);
        core.set_queue_size(16);
        for (which, addr) in [(0u8, 0x1000u32), (1, 0x2000), (2, 0x3000)] {
            core.set_queue_address(which, Some(addr), Some(0));
        }
        core.set_queue_ready(true);
        core.set_status(core.status() | status::DRIVER_OK);
        assert_ne!(core.status() & status::DRIVER_OK, 0);

        // Not readable yet: nothing happens.
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(seen.events.load(Ordering::SeqCst), 0);
        // Readable and never read: while wanted, the device hears of it again and again, and
        // each time the queue is served.
        event.write(1).unwrap();
        wait_until("repeated events", || seen.events.load(Ordering::SeqCst) >= 3);
        assert!(seen.served.load(Ordering::SeqCst) >= 3);
        // Not wanted: after the wait in progress, it is left alone although still readable.
        seen.wanted.store(false, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(20));
        let events = seen.events.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(seen.events.load(Ordering::SeqCst), events, "woken by an unwanted event");
        // A queue notification still serves the queue, without an event.
        let served = seen.served.load(Ordering::SeqCst);
        lock(&registrar.0).as_ref().expect("the queue's eventfd").write(1).unwrap();
        wait_until("the notification", || seen.served.load(Ordering::SeqCst) > served);
        assert_eq!(seen.events.load(Ordering::SeqCst), events);
        // Wanted again: the next wait sees it (a notification makes the worker ask).
        seen.wanted.store(true, Ordering::SeqCst);
        lock(&registrar.0).as_ref().expect("the queue's eventfd").write(1).unwrap();
        wait_until("the event again", || seen.events.load(Ordering::SeqCst) > events);
        seen.wanted.store(false, Ordering::SeqCst);
        drop(core);
    }

    /// What the external-queue device was handed.
    #[derive(Default)]
    struct Handed {
        setups: Mutex<Vec<QueueSetup>>,
        features: Mutex<u64>,
        kicks: Mutex<Vec<EventFd>>,
        calls: Mutex<Vec<EventFd>>,
        deactivated: AtomicUsize,
    }

    /// A device that runs its queues elsewhere: it keeps what DRIVER_OK hands it.
    struct ExternalDevice(Arc<Handed>);

    impl VirtioDevice for ExternalDevice {
        fn device_type(&self) -> u32 {
            2
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1
        }
        fn process_queue(
            &mut self,
            _mem: &GuestMemoryMmap,
            _index: u16,
            _queue: &mut Queue,
        ) -> Result<bool, DeviceError> {
            panic!("the transport served a queue that runs elsewhere");
        }
        fn external_queues(&mut self) -> Option<&mut dyn crate::ExternalQueues> {
            Some(self)
        }
    }

    impl crate::ExternalQueues for ExternalDevice {
        fn activate(
            &mut self,
            _mem: &GuestMemoryMmap,
            features: u64,
            queues: &[QueueSetup],
            kicks: &[EventFd],
            calls: &[EventFd],
        ) -> Result<(), String> {
            *lock(&self.0.features) = features;
            *lock(&self.0.setups) = queues.to_vec();
            *lock(&self.0.kicks) = kicks.iter().map(|k| k.try_clone().unwrap()).collect();
            *lock(&self.0.calls) = calls.iter().map(|c| c.try_clone().unwrap()).collect();
            Ok(())
        }
        fn deactivate(&mut self) {
            self.0.deactivated.fetch_add(1, Ordering::SeqCst);
        }
        fn hangup_fd(&self) -> Option<std::os::fd::RawFd> {
            None
        }
        fn describe(&self) -> String {
            "test backend".into()
        }
    }

    #[derive(Default)]
    struct CountInterrupts(Mutex<Vec<u16>>);
    impl Interrupt for CountInterrupts {
        fn queue(&self, index: u16) {
            lock(&self.0).push(index);
        }
        fn config(&self) {}
    }

    /// DRIVER_OK hands the enabled queues (only those) with their rings and position, the
    /// driver's features, a kick eventfd registered at the queue's address and a call eventfd
    /// that becomes the queue's interrupt; nothing is served in the VMM; a reset stops the
    /// rings first.
    #[test]
    fn a_device_with_external_queues_gets_rings_and_eventfds() {
        let handed = Arc::new(Handed::default());
        let interrupts = Arc::new(CountInterrupts::default());
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mut core =
            VirtioCore::new(Box::new(ExternalDevice(handed.clone())), mem, interrupts.clone());
        let registrar = Arc::new(Registrar::default());
        core.set_notifier(registrar.clone(), vec![(0x1000, None), (0x1004, None)]);
        negotiate(&mut core, 1, 0);
        core.queue_select = 1;
        core.set_queue_size(8);
        for (which, addr) in [(0u8, 0x1000u32), (1, 0x2000), (2, 0x3000)] {
            core.set_queue_address(which, Some(addr), Some(0));
        }
        core.set_queue_ready(true);
        core.set_status(core.status() | status::DRIVER_OK);
        assert_eq!(core.status() & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(*lock(&handed.features), VIRTIO_F_VERSION_1);
        let setup = QueueSetup {
            index: 1,
            size: 8,
            desc: 0x1000,
            avail: 0x2000,
            used: 0x3000,
            next_avail: 0,
        };
        assert_eq!(*lock(&handed.setups), vec![setup]);
        // The registrar kept the last eventfd registered: queue 1's kick.
        lock(&registrar.0).as_ref().expect("a kick eventfd").write(1).unwrap();
        assert_eq!(lock(&handed.kicks)[0].read().unwrap(), 1, "the kick is the ioeventfd");
        // A notification through the registers goes to the kick too.
        core.notify(1);
        assert_eq!(lock(&handed.kicks)[0].read().unwrap(), 1);
        lock(&handed.calls)[0].write(1).unwrap();
        wait_until("the queue's interrupt", || !lock(&interrupts.0).is_empty());
        assert_eq!(*lock(&interrupts.0), vec![1]);
        assert_eq!(handed.deactivated.load(Ordering::SeqCst), 0);
        core.set_status(0);
        assert_eq!(handed.deactivated.load(Ordering::SeqCst), 1);
        assert_eq!(core.status(), 0);
    }
}
