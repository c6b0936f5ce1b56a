//! vhost-user-net: Vanguard's virtio-net device model ([`Net`], on a TAP) behind a vhost-user
//! socket.
//!
//! The frontend (QEMU's `-netdev vhost-user`, Cloud Hypervisor, ...) owns the virtio transport,
//! the configuration space (MAC address, link status) and the guest; this backend gets the
//! guest's memory, the two rings (receive queue 0, transmit queue 1) and their eventfds, and
//! moves frames between them and the TAP with the code `vanguard run --net` uses
//! ([`VirtioDevice::process_queue`]): the 12-byte `virtio_net_hdr_v1` passes between guest and
//! TAP as it is, so checksum and segmentation offloads are the TAP's.
//!
//! What it negotiates:
//! - virtio features: everything [`Net`] offers (VERSION_1, CSUM, GUEST_CSUM, HOST/GUEST_TSO4/6,
//!   MAC, STATUS; the frontend keeps only those its transport handles), VIRTIO_RING_F_EVENT_IDX
//!   and VHOST_USER_F_PROTOCOL_FEATURES; the acked ones set the TAP's offloads (TUNSETOFFLOAD);
//! - vhost-user protocol features: REPLY_ACK. One queue pair (no MQ), and no CONFIG: the
//!   frontend answers the driver's configuration reads itself (MAC address, link status).
//!
//! QEMU's virtio-net sends SET_VRING_ENABLE before it acks the features, which the vhost
//! crate refuses; the daemon puts a [`crate::relay::Relay`] in between for this backend.
//!
//! Besides the rings' kicks, one worker thread waits on the device's own descriptors
//! ([`VirtioDevice::event_fds`]): the TAP (edge-triggered: a frame that waits for a receive
//! buffer must not wake the thread again and again; the driver's kick on queue 0 brings it
//! back), both rate limiters' timers and the device's batch eventfd. Hostile guests and
//! frontends get what `vanguard run`'s device gives them: malformed chains are returned and
//! counted; a ring that cannot be read stops that queue (one message) until the frontend
//! starts the device again.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VringState, VringT};
use virtio_devices::net::{self as model, Net};
use virtio_devices::VirtioDevice;
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::blk::{GuestMemory, Vring};

/// `VIRTIO_RING_F_EVENT_IDX`.
const EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
/// Receive and transmit.
const NUM_QUEUES: u16 = 2;
/// The event ID of the device's first own descriptor: IDs up to `NUM_QUEUES` are the library's
/// (the queues, then its exit and vring-enable events).
pub const FIRST_LISTENER: u64 = NUM_QUEUES as u64 + 1;

/// A [`Net`] device served over vhost-user.
pub struct NetBackend {
    net: Net,
    mem: GuestMemory,
    /// Queues whose ring could not be read: not served again until the device restarts.
    broken: [bool; NUM_QUEUES as usize],
    /// Whether the frontend has asked for the features since [`NetBackend::clear_contact`].
    contacted: AtomicBool,
    /// Where messages go: the features a frontend acked, misbehaving frontends or guests.
    report: Box<dyn Fn(&str) + Send + Sync>,
}

impl NetBackend {
    /// Serves `net`, with `mem` as the guest memory until the frontend sends its memory table.
    pub fn new(net: Net, mem: GuestMemory) -> NetBackend {
        NetBackend {
            net,
            mem,
            broken: [false; NUM_QUEUES as usize],
            contacted: AtomicBool::new(false),
            report: Box::new(|message| eprintln!("{message}")),
        }
    }

    /// Sends messages about misbehaving frontends or guests to `report` (default: stderr).
    pub fn with_reporter(mut self, report: impl Fn(&str) + Send + Sync + 'static) -> NetBackend {
        self.report = Box::new(report);
        self
    }

    /// The device, shared the way the daemon wants it.
    pub fn shared(self) -> Arc<RwLock<NetBackend>> {
        Arc::new(RwLock::new(self))
    }

    /// The device model.
    pub fn net(&self) -> &Net {
        &self.net
    }

    /// Whether a frontend has spoken vhost-user since the last [`NetBackend::clear_contact`].
    pub fn contacted(&self) -> bool {
        self.contacted.load(Ordering::Relaxed)
    }

    /// Forgets that a frontend has spoken (before accepting the next connection).
    pub fn clear_contact(&self) {
        self.contacted.store(false, Ordering::Relaxed);
    }

    /// The device's own descriptors for the worker's epoll, with the events wanted and the
    /// event ID [`VhostUserBackendMut::handle_event`] gets for each (from [`FIRST_LISTENER`]).
    pub fn listeners(&self) -> Vec<(RawFd, EventSet, u64)> {
        (FIRST_LISTENER..)
            .zip(self.net.event_fds())
            .enumerate()
            .map(|(which, (id, fd))| {
                let events = if which == model::EVENT_TAP {
                    EventSet::IN | EventSet::EDGE_TRIGGERED
                } else {
                    EventSet::IN
                };
                (fd, events, id)
            })
            .collect()
    }

    /// Serves one vring until it has nothing more to do, interrupting the driver as the
    /// ring's notification rules (EVENT_IDX or not) ask.
    ///
    /// Unlike a disk, the device does not use every chain it is given (receive buffers wait
    /// for frames, and a rate limit can hold transmit chains), so "the driver added more while
    /// notifications were off" is not a reason to go on by itself: after that, one more pass
    /// is made, and the loop ends when a pass uses nothing. The device's own events (the TAP,
    /// the limiters' timers) bring it back.
    fn serve(
        &mut self,
        mem: &GuestMemoryMmap,
        index: u16,
        state: &mut VringState<GuestMemory>,
    ) -> Result<(), String> {
        let mut first = true;
        loop {
            if !state.is_enabled() {
                return Ok(());
            }
            let queue = state.get_queue_mut();
            if !queue.ready() {
                return Ok(());
            }
            queue.disable_notification(mem).map_err(|e| e.to_string())?;
            let used = self.net.process_queue(mem, index, queue).map_err(|e| e.to_string())?;
            if used && queue.needs_notification(mem).map_err(|e| e.to_string())? {
                state.signal_used_queue().map_err(|e| format!("cannot signal the driver: {e}"))?;
            }
            let more = state.get_queue_mut().enable_notification(mem).map_err(|e| e.to_string())?;
            if !more || (!used && !first) {
                return Ok(());
            }
            first = false;
        }
    }

    /// Serves queue `index` (if the frontend has set it up and it is not broken).
    fn serve_queue(&mut self, index: u16, vrings: &[Vring]) {
        let slot = usize::from(index);
        let Some(vring) = vrings.get(slot) else { return };
        if self.broken.get(slot).copied().unwrap_or(true) {
            return;
        }
        let mem = self.mem.memory();
        let mut state = vring.get_mut();
        if let Err(e) = self.serve(&mem, index, &mut state) {
            // An error here would end the library's worker thread, and with it both queues:
            // stop only this one, and say so once.
            if let Some(flag) = self.broken.get_mut(slot) {
                *flag = true;
            }
            (self.report)(&format!(
                "queue {index}: {e}; the queue stops until the frontend restarts the device"
            ));
        }
    }
}

impl VhostUserBackendMut for NetBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(NUM_QUEUES)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(model::QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        self.contacted.store(true, Ordering::Relaxed);
        self.net.features() | EVENT_IDX | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.contacted.store(true, Ordering::Relaxed);
        VhostUserProtocolFeatures::REPLY_ACK
    }

    fn acked_features(&mut self, features: u64) {
        // SET_FEATURES starts every (re)start of the device: broken rings get a new chance,
        // and the TAP's offloads follow what the driver takes.
        self.broken.fill(false);
        self.net.ack_features(features);
        (self.report)(&format!(
            "frontend acked features {features:#x} (EVENT_IDX {}, TAP {})",
            if features & EVENT_IDX != 0 { "on" } else { "off" },
            self.net.tap_name()
        ));
    }

    fn reset_device(&mut self) {
        self.net.reset();
        self.broken.fill(false);
    }

    fn set_event_idx(&mut self, _enabled: bool) {
        // The library sets it on every vring's queue, whose notification calls in `serve`
        // follow it.
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Lets the daemon stop the worker thread (dropping the daemon waits for it).
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn update_memory(&mut self, mem: GuestMemory) -> io::Result<()> {
        self.mem = mem;
        Ok(())
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        let event = u64::from(device_event);
        if event < u64::from(NUM_QUEUES) {
            self.serve_queue(device_event, vrings);
            return Ok(());
        }
        let Some(which) = event.checked_sub(FIRST_LISTENER).and_then(|w| usize::try_from(w).ok())
        else {
            return Ok(());
        };
        if which >= self.net.event_fds().len() {
            return Ok(());
        }
        self.net.event_ready(which);
        let queue =
            if which == model::EVENT_TX_LIMITER { model::TX_QUEUE } else { model::RX_QUEUE };
        self.serve_queue(queue, vrings);
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use std::os::fd::{FromRawFd, IntoRawFd};
    use std::sync::atomic::AtomicUsize;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};
    use vmm_sys_util::eventfd::EventFd;

    const FRAME: u64 = 0x10_0000;
    /// The used ring: away from the mock's, which overlaps the available ring's used_event.
    const USED: u64 = 0x1000;

    /// A TAP made for the test (removed with the device), or None where this process may not
    /// create one (the test then says so and passes: the QEMU test checks the device for
    /// real, and requires TAP rights in CI).
    fn tap() -> Option<Net> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!("vgvu{}x{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        match Net::open(&name, [0x52, 0x54, 0, 0, 0, 1]) {
            Ok(net) => Some(net),
            Err(e) => {
                println!("skipping: {e}");
                None
            }
        }
    }

    fn backend() -> Option<(NetBackend, GuestMemory)> {
        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap(),
        );
        Some((NetBackend::new(tap()?, mem.clone()), mem))
    }

    #[test]
    fn features_and_listeners() {
        let Some((b, _)) = backend() else { return };
        let f = b.features();
        assert_eq!(f & !(EVENT_IDX | (1 << 30)), b.net().features());
        assert_ne!(f & EVENT_IDX, 0);
        assert_ne!(f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
        assert!(b.contacted());
        b.clear_contact();
        assert!(!b.contacted());
        assert_eq!(b.protocol_features(), VhostUserProtocolFeatures::REPLY_ACK);
        assert_eq!((b.num_queues(), b.max_queue_size()), (2, 256));

        let listeners = b.listeners();
        assert_eq!(listeners.len(), 4);
        assert!(listeners.iter().all(|(_, _, id)| *id > u64::from(NUM_QUEUES)));
        assert_eq!(listeners[model::EVENT_TAP].1, EventSet::IN | EventSet::EDGE_TRIGGERED);
        assert_eq!(listeners[model::EVENT_KICK].1, EventSet::IN);
    }

    type Mock<'a> = MockSplitQueue<'a, GuestMemoryMmap>;

    /// A started and enabled vring over the mock's rings (16 entries) and [`USED`], and its
    /// call eventfd.
    fn vring(mem: &GuestMemory, vq: &Mock<'_>) -> (Vring, EventFd) {
        let vring = Vring::new(mem.clone(), 256).unwrap();
        vring.set_queue_size(16);
        vring.set_queue_info(vq.desc_table_addr().0, vq.avail_addr().0, USED).unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        // SAFETY: the descriptor is a fresh duplicate owned by nobody else; the File takes it.
        let file = unsafe { std::fs::File::from_raw_fd(call.try_clone().unwrap().into_raw_fd()) };
        vring.set_call(Some(file));
        (vring, call)
    }

    fn used_idx(mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    #[test]
    fn transmit_chains_are_used_and_bad_ones_counted() {
        let Some((mut b, mem)) = backend() else { return };
        let guard = mem.memory();
        // The receive ring is not started: events for it do nothing.
        let rx = Vring::new(mem.clone(), 256).unwrap();
        let tx_vq = MockSplitQueue::new(&*guard, 16);
        let (tx, call) = vring(&mem, &tx_vq);
        let vrings = [rx, tx];
        b.acked_features(b.features());

        // A header and a 60-byte frame in one buffer, then a chain of a header only.
        guard.write_slice(&[0u8; 12 + 60], GuestAddress(FRAME)).unwrap();
        let good = RawDescriptor::from(Descriptor::new(FRAME, 12 + 60, 0, 0));
        tx_vq.add_desc_chains(&[good], 0).unwrap();
        let short = RawDescriptor::from(Descriptor::new(FRAME, 12, 0, 0));
        tx_vq.add_desc_chains(&[short], 1).unwrap();
        b.handle_event(1, EventSet::IN, &vrings, 0).unwrap();

        assert_eq!(used_idx(&guard), 2);
        assert_eq!(call.read().unwrap(), 1);
        let stats = b.net().stats();
        assert_eq!(stats.tx_malformed, 1);
        // The TAP is down, so the kernel may refuse the good frame: sent or refused, counted.
        assert_eq!(stats.tx_frames + stats.tx_errors, 1, "{stats:?}");

        // Events for the receive side and unknown IDs do nothing, and do not fail.
        for event in [0, FIRST_LISTENER as u16, FIRST_LISTENER as u16 + 3, 2, 99] {
            b.handle_event(event, EventSet::IN, &vrings, 0).unwrap();
        }
        assert_eq!(b.net().stats().rx_frames, 0);
    }
}
