//! vhost-user-blk: Vanguard's virtio-blk device model ([`Block`]) behind a vhost-user socket.
//!
//! The frontend (QEMU's `vhost-user-blk-pci`, Cloud Hypervisor, ...) owns the virtio transport
//! and the guest; this backend gets the guest's memory (shared file descriptors), the rings'
//! addresses and an eventfd pair per queue, and serves each available chain with the same code
//! `vanguard run` uses for its own disks ([`VirtioDevice::process_queue`]).
//!
//! What it negotiates:
//! - virtio features: everything [`Block`] offers (VERSION_1, SEG_MAX, BLK_SIZE, FLUSH, and
//!   DISCARD + WRITE_ZEROES, or RO on a read-only disk), VIRTIO_RING_F_EVENT_IDX, MQ when
//!   serving more than one queue, and VHOST_USER_F_PROTOCOL_FEATURES;
//! - vhost-user protocol features: CONFIG (the frontend reads [`Block`]'s configuration space),
//!   MQ (the frontend asks how many queues there are) and REPLY_ACK.
//!
//! One worker thread serves all the queues, one request at a time, like `vanguard run`'s
//! disks. The guest (and the frontend) are hostile: a ring that cannot be read stops that queue
//! until the frontend starts the device again, with one message; nothing panics.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringState, VringT};
use virtio_devices::block::Block;
use virtio_devices::VirtioDevice;
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// Guest memory as the vhost-user library hands it over (no dirty-page bitmap: this backend
/// does not offer LOG_SHMFD, so it cannot take part in live migration's dirty logging).
pub type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap>;

/// The vring type the backend uses.
pub type Vring = VringRwLock<GuestMemory>;

/// `VIRTIO_BLK_F_MQ`: the configuration space's `num_queues` is valid.
const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
/// `VIRTIO_RING_F_EVENT_IDX`.
const EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
/// Offset of `num_queues` (le16) in virtio-blk's configuration space.
const CONFIG_NUM_QUEUES: usize = 34;
/// The most queues one backend serves.
pub const MAX_QUEUES: u16 = 64;

/// A [`Block`] device served over vhost-user.
pub struct BlkBackend {
    block: Block,
    queues: u16,
    mem: GuestMemory,
    /// Queues whose ring could not be read: not served again until the device restarts.
    broken: Vec<bool>,
    /// Whether the frontend has asked for the features since [`BlkBackend::clear_contact`]
    /// (every vhost-user frontend starts that way).
    contacted: AtomicBool,
    /// Where messages go: the features a frontend acked, misbehaving frontends or guests.
    report: Box<dyn Fn(&str) + Send + Sync>,
}

impl BlkBackend {
    /// Serves `block` on `queues` queues (1 to [`MAX_QUEUES`]; clamped), with `mem` as the
    /// guest memory until the frontend sends its memory table.
    pub fn new(block: Block, queues: u16, mem: GuestMemory) -> BlkBackend {
        let queues = queues.clamp(1, MAX_QUEUES);
        BlkBackend {
            block,
            queues,
            mem,
            broken: vec![false; usize::from(queues)],
            contacted: AtomicBool::new(false),
            report: Box::new(|message| eprintln!("{message}")),
        }
    }

    /// Whether a frontend has spoken vhost-user since the last [`BlkBackend::clear_contact`].
    pub fn contacted(&self) -> bool {
        self.contacted.load(Ordering::Relaxed)
    }

    /// Forgets that a frontend has spoken (before accepting the next connection).
    pub fn clear_contact(&self) {
        self.contacted.store(false, Ordering::Relaxed);
    }

    /// Sends messages about misbehaving frontends or guests to `report` (default: stderr).
    pub fn with_reporter(mut self, report: impl Fn(&str) + Send + Sync + 'static) -> BlkBackend {
        self.report = Box::new(report);
        self
    }

    /// The device, shared the way the daemon wants it.
    pub fn shared(self) -> Arc<RwLock<BlkBackend>> {
        Arc::new(RwLock::new(self))
    }

    /// The device model.
    pub fn block(&self) -> &Block {
        &self.block
    }

    /// Serves everything available on one vring, interrupting the driver as the ring's
    /// notification rules (EVENT_IDX or not) ask.
    fn serve(
        &mut self,
        mem: &GuestMemoryMmap,
        index: u16,
        state: &mut VringState<GuestMemory>,
    ) -> Result<(), String> {
        // Notifications stay off while the queue is drained; re-enabling them re-checks the
        // ring so a chain made available in between is not missed. Every chain is served
        // (this backend has no rate limit), so the loop ends when the driver stops adding.
        loop {
            let queue = state.get_queue_mut();
            if !queue.ready() {
                return Ok(());
            }
            queue.disable_notification(mem).map_err(|e| e.to_string())?;
            let used = self.block.process_queue(mem, index, queue).map_err(|e| e.to_string())?;
            if used && queue.needs_notification(mem).map_err(|e| e.to_string())? {
                state.signal_used_queue().map_err(|e| format!("cannot signal the driver: {e}"))?;
            }
            if !state.get_queue_mut().enable_notification(mem).map_err(|e| e.to_string())? {
                return Ok(());
            }
        }
    }
}

impl VhostUserBackendMut for BlkBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.block.queue_max_sizes().first().copied().unwrap_or(0))
    }

    fn features(&self) -> u64 {
        self.contacted.store(true, Ordering::Relaxed);
        let mut features =
            self.block.features() | EVENT_IDX | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.queues > 1 {
            features |= VIRTIO_BLK_F_MQ;
        }
        features
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.contacted.store(true, Ordering::Relaxed);
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn acked_features(&mut self, features: u64) {
        // SET_FEATURES starts every (re)start of the device: broken rings get a new chance.
        self.broken.fill(false);
        (self.report)(&format!(
            "frontend acked features {features:#x} (EVENT_IDX {})",
            if features & EVENT_IDX != 0 { "on" } else { "off" }
        ));
    }

    fn reset_device(&mut self) {
        self.block.reset();
        self.broken.fill(false);
    }

    fn set_event_idx(&mut self, _enabled: bool) {
        // The library sets it on every vring's queue, whose notification calls in `serve`
        // follow it.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // The library checks offset + size against its 4 KiB limit; bytes past the device's
        // configuration space read as zero, as on `vanguard run`'s transports.
        let Ok(len) = usize::try_from(size) else { return Vec::new() };
        let mut data = vec![0u8; len];
        self.block.read_config(u64::from(offset), &mut data);
        // num_queues is this backend's, not the single queue `vanguard run` gives a disk.
        let queues = self.queues.to_le_bytes();
        for (i, byte) in queues.iter().enumerate() {
            let at = (CONFIG_NUM_QUEUES + i).checked_sub(usize::try_from(offset).unwrap_or(0));
            if let Some(slot) = at.and_then(|at| data.get_mut(at)) {
                *slot = *byte;
            }
        }
        data
    }

    fn set_config(&mut self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        // virtio-blk's configuration is read-only without CONFIG_WCE, which is not offered.
        Err(io::Error::from(io::ErrorKind::PermissionDenied))
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
        // This backend registers no listeners of its own: every event is a queue's kick.
        let index = usize::from(device_event);
        let Some(vring) = vrings.get(index) else { return Ok(()) };
        if self.broken.get(index).copied().unwrap_or(true) {
            return Ok(());
        }
        let mem = self.mem.memory();
        let mut state = vring.get_mut();
        if let Err(e) = self.serve(&mem, device_event, &mut state) {
            // An error here would end the library's worker thread, and with it every queue:
            // stop only this one, and say so once.
            if let Some(flag) = self.broken.get_mut(index) {
                *flag = true;
            }
            (self.report)(&format!(
                "queue {index}: {e}; the queue stops until the frontend restarts the device"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use std::os::fd::{FromRawFd, IntoRawFd};
    use std::path::PathBuf;
    use std::sync::Mutex;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_devices::VIRTIO_F_VERSION_1;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    const HEADER: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;
    /// The used ring: away from the mock's, which overlaps the available ring's used_event.
    const USED: u64 = 0x1000;
    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;

    /// A 64 KiB image whose byte i is (i / 512 + i) as u8, removed when dropped.
    struct Image(PathBuf);
    impl Image {
        fn new(tag: &str) -> Image {
            let path = std::env::temp_dir()
                .join(format!("vanguard-vhost-user-blk-{}-{tag}", std::process::id()));
            let bytes: Vec<u8> = (0..1u64 << 16).map(|i| (i / 512 + i) as u8).collect();
            std::fs::write(&path, bytes).unwrap();
            Image(path)
        }
    }
    impl Drop for Image {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn backend(image: &Image, queues: u16, read_only: bool) -> (BlkBackend, GuestMemory) {
        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap(),
        );
        let block = Block::open(&image.0, read_only, "vhu-serial").unwrap();
        (BlkBackend::new(block, queues, mem.clone()), mem)
    }

    #[test]
    fn features_and_configuration() {
        let image = Image::new("features");
        let (one, _) = backend(&image, 1, false);
        let (four, _) = backend(&image, 4, true);
        for b in [&one, &four] {
            let f = b.features();
            assert_ne!(f & VIRTIO_F_VERSION_1, 0);
            assert_ne!(f & EVENT_IDX, 0);
            assert_ne!(f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
            assert_eq!(f & !(EVENT_IDX | VIRTIO_BLK_F_MQ | (1 << 30)), b.block().features());
            assert!(b
                .protocol_features()
                .contains(VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ));
            assert_eq!(b.max_queue_size(), 256);
        }
        assert_eq!(one.features() & VIRTIO_BLK_F_MQ, 0);
        assert_ne!(four.features() & VIRTIO_BLK_F_MQ, 0);
        assert_eq!(four.num_queues(), 4);

        let config = four.get_config(0, 60);
        assert_eq!(config.len(), 60);
        assert_eq!(u64::from_le_bytes(config[0..8].try_into().unwrap()), 128); // sectors
        assert_eq!(u16::from_le_bytes(config[34..36].try_into().unwrap()), 4);
        assert_eq!(four.get_config(34, 2), vec![4, 0]);
        assert_eq!(four.get_config(35, 1), vec![0]);
        assert_eq!(one.get_config(34, 2), vec![1, 0]);
        // Past the device's configuration space: zeros, as many as asked for.
        assert_eq!(four.get_config(100, 8), vec![0; 8]);
        assert_eq!(four.get_config(u32::MAX - 1, 2), vec![0; 2]);
    }

    type Mock<'a> = MockSplitQueue<'a, GuestMemoryMmap>;

    /// A vring over the mock's descriptors and available ring (16 entries) and [`USED`], started and enabled, and its call eventfd.
    fn vring(mem: &GuestMemory, vq: &Mock<'_>, event_idx: bool) -> (Vring, EventFd) {
        let vring = Vring::new(mem.clone(), 256).unwrap();
        vring.set_queue_size(16);
        vring.set_queue_info(vq.desc_table_addr().0, vq.avail_addr().0, USED).unwrap();
        vring.set_queue_event_idx(event_idx);
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        // SAFETY: the descriptor is a fresh duplicate owned by nobody else; the File takes it.
        let file = unsafe { std::fs::File::from_raw_fd(call.try_clone().unwrap().into_raw_fd()) };
        vring.set_call(Some(file));
        (vring, call)
    }

    /// Makes a read of `sectors` sectors at `sector` available at descriptor `at`.
    fn add_read(vq: &Mock<'_>, mem: &GuestMemoryMmap, at: u16, sector: u64, sectors: u32) {
        mem.write_obj(0u32, GuestAddress(HEADER)).unwrap(); // VIRTIO_BLK_T_IN
        mem.write_obj(sector, GuestAddress(HEADER + 8)).unwrap();
        mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        let descs = [(HEADER, 16, NEXT), (DATA, sectors * 512, NEXT | WRITE), (STATUS, 1, WRITE)];
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, (a, l, f))| {
                RawDescriptor::from(Descriptor::new(*a, *l, *f, at + i as u16 + 1))
            })
            .collect();
        vq.add_desc_chains(&raw, at).unwrap();
    }

    fn used_idx(mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    #[test]
    fn serves_reads_through_a_vring_and_signals_the_driver() {
        let image = Image::new("read");
        for event_idx in [false, true] {
            let (mut b, mem) = backend(&image, 1, false);
            let guard = mem.memory();
            let vq = MockSplitQueue::new(&*guard, 16);
            let (vring, call) = vring(&mem, &vq, event_idx);
            b.set_event_idx(event_idx);
            add_read(&vq, &guard, 0, 3, 2);
            b.handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0).unwrap();
            assert_eq!(used_idx(&guard), 1);
            assert_eq!(guard.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
            let mut data = vec![0u8; 1024];
            guard.read_slice(&mut data, GuestAddress(DATA)).unwrap();
            let expected: Vec<u8> = (3 * 512..5 * 512u64).map(|i| (i / 512 + i) as u8).collect();
            assert_eq!(data, expected);
            // With EVENT_IDX the driver's used_event (0, the mock's) asks for the first one.
            assert_eq!(call.read().unwrap(), 1, "event_idx={event_idx}");
            // A kick with nothing new: nothing used, no interrupt.
            b.handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0).unwrap();
            assert_eq!(used_idx(&guard), 1);
            assert!(call.read().is_err(), "no second interrupt (event_idx={event_idx})");
            if event_idx {
                // The driver asks to hear only after the third chain from now (used_event 3).
                let used_event = vq.avail_addr().unchecked_add(4 + 2 * 16);
                guard.write_obj(3u16, used_event).unwrap();
                for i in 0..3u16 {
                    add_read(&vq, &guard, 3 * (i + 1), 0, 1);
                    b.handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0).unwrap();
                    assert_eq!(used_idx(&guard), i + 2);
                    let signalled = call.read().is_ok();
                    assert_eq!(
                        signalled,
                        i == 2,
                        "chain {}: interrupt only when used passes 3",
                        i + 2
                    );
                }
            }
        }
    }

    #[test]
    fn a_broken_ring_stops_only_its_queue_and_says_so_once() {
        let image = Image::new("broken");
        let (b, mem) = backend(&image, 2, false);
        let messages = Arc::new(Mutex::new(Vec::new()));
        let sink = messages.clone();
        let mut b = b.with_reporter(move |m| sink.lock().unwrap().push(m.to_string()));
        let guard = mem.memory();
        let vq = MockSplitQueue::new(&*guard, 16);
        let (good, _call) = vring(&mem, &vq, false);
        let broken = Vring::new(mem.clone(), 256).unwrap();
        broken.set_queue_size(16);
        // The available ring lies past the end of guest memory.
        broken.set_queue_info(0x1000, 0x7fff_0000, 0x2000).unwrap();
        broken.set_queue_ready(true);
        broken.set_enabled(true);
        let vrings = [good, broken];
        for _ in 0..3 {
            b.handle_event(1, EventSet::IN, &vrings, 0).unwrap();
        }
        assert_eq!(messages.lock().unwrap().len(), 1, "{:?}", messages.lock().unwrap());
        assert!(messages.lock().unwrap()[0].starts_with("queue 1: "));
        // The other queue still works.
        add_read(&vq, &guard, 0, 0, 1);
        b.handle_event(0, EventSet::IN, &vrings, 0).unwrap();
        assert_eq!(used_idx(&guard), 1);
        // Restarting the device gives the queue a new chance.
        b.acked_features(b.features());
        b.handle_event(1, EventSet::IN, &vrings, 0).unwrap();
        let queue1 = messages.lock().unwrap().iter().filter(|m| m.starts_with("queue 1")).count();
        assert_eq!(queue1, 2);
        // Unknown events are ignored.
        b.handle_event(7, EventSet::IN, &vrings, 0).unwrap();
    }

    #[test]
    fn read_only_backends_offer_ro() {
        let image = Image::new("ro");
        let (b, _) = backend(&image, 1, true);
        assert_ne!(b.features() & (1 << 5), 0);
        assert_eq!(b.features() & (1 << 13), 0, "no DISCARD on a read-only disk");
    }
}
