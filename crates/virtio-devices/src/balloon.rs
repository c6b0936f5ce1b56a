//! virtio-balloon (device ID 5): the guest gives pages back to the host and takes them again.
//!
//! Queues, in the order Linux numbers them for the features offered here:
//! - 0 inflate: buffers of little-endian u32 page frame numbers (4 KiB pages) the guest gives
//!   up; the device discards each page's backing with `madvise(MADV_DONTNEED)`, so the host
//!   gets the memory back and the guest later reads zeros there.
//! - 1 deflate: page frame numbers the guest takes back; nothing to do (the next touch faults
//!   a fresh zero page in).
//! - 2 statistics (`VIRTIO_BALLOON_F_STATS_VQ`): the driver posts a buffer of 10-byte
//!   `{u16 tag, u64 value}` entries; the device keeps it until the host asks for fresh figures
//!   ([`BalloonHandle::request_stats`]), then returns it and the driver refills it.
//! - 3 free page reporting (`VIRTIO_BALLOON_F_REPORTING`): device-writable buffers that are
//!   free guest pages; the device discards them and returns the buffers.
//!
//! A driver that declines the statistics queue numbers the reporting queue 2 (Linux skips
//! absent queues): the direction of the buffers tells the two apart (statistics are
//! device-readable, reports device-writable), so no feature bookkeeping is needed here.
//!
//! The target (`num_pages` in the configuration) is set by the host through
//! [`BalloonHandle::set_target`]; the driver reports what it holds in `actual`.

use crate::{DeviceError, VirtioDevice, VIRTIO_F_VERSION_1};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

/// The virtio device ID of a memory balloon.
pub const VIRTIO_ID_BALLOON: u32 = 5;
/// The statistics queue exists.
pub const VIRTIO_BALLOON_F_STATS_VQ: u64 = 1 << 1;
/// The guest may deflate when it runs out of memory.
pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u64 = 1 << 2;
/// The free page reporting queue exists.
pub const VIRTIO_BALLOON_F_REPORTING: u64 = 1 << 5;
/// Balloon pages are always 4 KiB, whatever the guest's page size.
pub const PAGE_SIZE: u64 = 4096;
/// Queue size offered.
pub const QUEUE_SIZE: u16 = 256;
/// Most statistics entries kept from one buffer (Linux sends 10 or so).
pub const MAX_STATS: usize = 64;
/// Bytes of one statistics entry: u16 tag, u64 value, packed.
const STAT_SIZE: usize = 10;

const INFLATE: u16 = 0;
const DEFLATE: u16 = 1;

/// What the host and the device share: the target, the guest's answer, the figures.
#[derive(Default)]
struct Shared {
    target_pages: AtomicU32,
    actual_pages: AtomicU32,
    inflated_pages: AtomicU64,
    deflated_pages: AtomicU64,
    reported_bytes: AtomicU64,
    /// Pages (or reported ranges) the device could not discard: outside guest memory, or
    /// memory madvise refused (hugetlbfs-backed guests).
    rejected: AtomicU64,
    stats: Mutex<Vec<(u16, u64)>>,
    stats_requested: AtomicBool,
    /// The target changed since the driver was last told.
    target_changed: AtomicBool,
}

/// The host's side of a balloon: set the target, read what the guest did.
#[derive(Clone)]
pub struct BalloonHandle {
    shared: Arc<Shared>,
    wake: Arc<EventFd>,
}

impl BalloonHandle {
    /// Asks the guest to hold `bytes` (rounded down to 4 KiB pages) in the balloon: the
    /// device's worker raises a configuration-change interrupt, and the driver inflates or
    /// deflates towards the new target.
    pub fn set_target(&self, bytes: u64) {
        let pages = u32::try_from(bytes / PAGE_SIZE).unwrap_or(u32::MAX);
        self.shared.target_pages.store(pages, Ordering::Release);
        self.shared.target_changed.store(true, Ordering::Release);
        let _ = self.wake.write(1);
    }

    /// The target, in bytes.
    pub fn target(&self) -> u64 {
        u64::from(self.shared.target_pages.load(Ordering::Acquire)) * PAGE_SIZE
    }

    /// What the driver says the balloon holds, in bytes.
    pub fn actual(&self) -> u64 {
        u64::from(self.shared.actual_pages.load(Ordering::Acquire)) * PAGE_SIZE
    }

    /// Pages given back (inflate) and taken again (deflate) since start, bytes reported free,
    /// and pages or ranges the device refused.
    pub fn counters(&self) -> (u64, u64, u64, u64) {
        let s = &self.shared;
        (
            s.inflated_pages.load(Ordering::Acquire),
            s.deflated_pages.load(Ordering::Acquire),
            s.reported_bytes.load(Ordering::Acquire),
            s.rejected.load(Ordering::Acquire),
        )
    }

    /// The guest's last statistics: (tag, value) as the virtio specification numbers them
    /// (0 swap in, 1 swap out, 2 major faults, 3 minor faults, 4 free memory, 5 total
    /// memory, 6 available memory, ...).
    pub fn stats(&self) -> Vec<(u16, u64)> {
        self.shared.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Returns the statistics buffer the device holds, so the driver sends fresh figures.
    pub fn request_stats(&self) {
        self.shared.stats_requested.store(true, Ordering::Release);
        let _ = self.wake.write(1);
    }
}

/// The balloon device.
pub struct Balloon {
    shared: Arc<Shared>,
    wake: Arc<EventFd>,
    features: u64,
    /// The statistics buffer the device holds until the host wants new figures.
    stats_head: Option<u16>,
    /// Page frame numbers read from one chain; allocated once.
    pfns: Vec<u32>,
}

impl Balloon {
    /// A balloon with an initial target of `target_bytes`, optionally letting the guest
    /// deflate under memory pressure.
    pub fn new(target_bytes: u64, deflate_on_oom: bool) -> std::io::Result<Self> {
        let balloon = Self {
            shared: Arc::default(),
            wake: Arc::new(EventFd::new(libc::EFD_NONBLOCK)?),
            features: VIRTIO_F_VERSION_1
                | VIRTIO_BALLOON_F_STATS_VQ
                | VIRTIO_BALLOON_F_REPORTING
                | if deflate_on_oom { VIRTIO_BALLOON_F_DEFLATE_ON_OOM } else { 0 },
            stats_head: None,
            pfns: Vec::with_capacity(usize::from(QUEUE_SIZE) * 1024),
        };
        // The driver reads the first target at start-up: no interrupt for it.
        let pages = u32::try_from(target_bytes / PAGE_SIZE).unwrap_or(u32::MAX);
        balloon.shared.target_pages.store(pages, Ordering::Release);
        Ok(balloon)
    }

    /// The host's handle.
    pub fn handle(&self) -> BalloonHandle {
        BalloonHandle { shared: self.shared.clone(), wake: self.wake.clone() }
    }

    /// Discards `len` bytes of guest memory at `gpa` (whole pages inside guest RAM only).
    /// Returns whether the whole range was discarded.
    fn discard(mem: &GuestMemoryMmap, gpa: u64, len: u64) -> bool {
        if !gpa.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) || len == 0 {
            return false;
        }
        let (Some(end), Ok(size)) = (gpa.checked_add(len), usize::try_from(len)) else {
            return false;
        };
        // The range must lie in one region, or be split by the caller; check both ends.
        let (Ok(start), Ok(last)) =
            (mem.get_host_address(GuestAddress(gpa)), mem.get_host_address(GuestAddress(end - 1)))
        else {
            return false;
        };
        if (last as usize).wrapping_sub(start as usize) != size - 1 {
            return false;
        }
        // Shared guest memory (a memfd, when a vhost-user backend maps it too): dropping the
        // mapping would leave the pages in the file, so punch them out of the file first.
        if let Some((region, offset)) = mem.to_region_addr(GuestAddress(gpa)) {
            if let Some(file) = region.file_offset() {
                let Some(at) = file.start().checked_add(offset.0) else { return false };
                let (Ok(at), Ok(length)) = (libc::off_t::try_from(at), libc::off_t::try_from(len))
                else {
                    return false;
                };
                let flags = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                // SAFETY: fallocate on the region's own descriptor, within the range that
                // backs the guest pages just checked; it frees only those pages.
                if unsafe { libc::fallocate(file.file().as_raw_fd(), flags, at, length) } != 0 {
                    return false;
                }
            }
        }
        // SAFETY: [start, start + len) is guest memory this process mapped (checked above to
        // be one contiguous range of one region); MADV_DONTNEED only drops its contents,
        // which the guest gave up.
        unsafe { libc::madvise(start.cast(), size, libc::MADV_DONTNEED) == 0 }
    }

    /// Reads the page frame numbers of one inflate/deflate chain into `self.pfns`.
    fn read_pfns(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    ) -> bool {
        self.pfns.clear();
        // Page lists are the driver's to write and the device's to read: anything else is a
        // malformed request.
        if chain.clone().any(|d| d.is_write_only()) {
            return false;
        }
        let Ok(mut reader) = chain.reader(mem) else { return false };
        let count = (reader.available_bytes() / 4).min(self.pfns.capacity());
        let mut word = [0u8; 4];
        for _ in 0..count {
            if reader.read_exact(&mut word).is_err() {
                return false;
            }
            self.pfns.push(u32::from_le_bytes(word));
        }
        true
    }

    /// Discards the pages in `self.pfns`, contiguous runs in one call each.
    fn discard_pfns(&mut self, mem: &GuestMemoryMmap) {
        self.pfns.sort_unstable();
        self.pfns.dedup();
        let mut i = 0;
        while i < self.pfns.len() {
            let first = self.pfns[i];
            let mut run = 1u32;
            while i + (run as usize) < self.pfns.len()
                && self.pfns[i + run as usize] == first.wrapping_add(run)
                && run < 512
            {
                run += 1;
            }
            let gpa = u64::from(first) * PAGE_SIZE;
            let len = u64::from(run) * PAGE_SIZE;
            if Self::discard(mem, gpa, len) {
                self.shared.inflated_pages.fetch_add(u64::from(run), Ordering::AcqRel);
            } else {
                // A run crossing a region boundary or a hole: try page by page.
                for p in 0..u64::from(run) {
                    if Self::discard(mem, gpa + p * PAGE_SIZE, PAGE_SIZE) {
                        self.shared.inflated_pages.fetch_add(1, Ordering::AcqRel);
                    } else {
                        self.shared.rejected.fetch_add(1, Ordering::AcqRel);
                    }
                }
            }
            i += run as usize;
        }
    }

    /// Parses a statistics buffer.
    fn read_stats(
        mem: &GuestMemoryMmap,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    ) -> Vec<(u16, u64)> {
        let Ok(mut reader) = chain.reader(mem) else { return Vec::new() };
        let count = (reader.available_bytes() / STAT_SIZE).min(MAX_STATS);
        let mut stats = Vec::with_capacity(count);
        let mut entry = [0u8; STAT_SIZE];
        for _ in 0..count {
            if reader.read_exact(&mut entry).is_err() {
                break;
            }
            let tag = u16::from_le_bytes([entry[0], entry[1]]);
            let mut value = [0u8; 8];
            value.copy_from_slice(&entry[2..]);
            stats.push((tag, u64::from_le_bytes(value)));
        }
        stats
    }

    /// Serves queue 2 or 3: statistics (device-readable buffers) or free page reports
    /// (device-writable buffers).
    fn serve_stats_or_reports(
        &mut self,
        mem: &GuestMemoryMmap,
        index: u16,
        queue: &mut Queue,
    ) -> Result<bool, DeviceError> {
        let queue_err =
            |e: virtio_queue::Error| DeviceError::Queue { queue: index, reason: e.to_string() };
        let mut used_any = false;
        // The host asked for fresh statistics: give the held buffer back.
        if self.shared.stats_requested.swap(false, Ordering::AcqRel) {
            if let Some(head) = self.stats_head.take() {
                queue.add_used(mem, head, 0).map_err(queue_err)?;
                used_any = true;
            }
        }
        while let Some(chain) = queue.iter(mem).map_err(queue_err)?.next() {
            let head = chain.head_index();
            let reporting = chain.clone().any(|d| d.is_write_only());
            if reporting {
                for d in chain {
                    let (gpa, len) = (d.addr().0, u64::from(d.len()));
                    // Reports cover free pages; discard whole pages only.
                    let aligned = len / PAGE_SIZE * PAGE_SIZE;
                    if aligned > 0 && Self::discard(mem, gpa, aligned) {
                        self.shared.reported_bytes.fetch_add(aligned, Ordering::AcqRel);
                    } else {
                        self.shared.rejected.fetch_add(1, Ordering::AcqRel);
                    }
                }
                queue.add_used(mem, head, 0).map_err(queue_err)?;
                used_any = true;
            } else {
                let stats = Self::read_stats(mem, chain);
                if let Ok(mut held) = self.shared.stats.lock() {
                    *held = stats;
                }
                // A second buffer while one is held: return the older one.
                if let Some(old) = self.stats_head.replace(head) {
                    queue.add_used(mem, old, 0).map_err(queue_err)?;
                    used_any = true;
                }
            }
        }
        Ok(used_any)
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 4]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 16];
        config[0..4]
            .copy_from_slice(&self.shared.target_pages.load(Ordering::Acquire).to_le_bytes());
        config[4..8]
            .copy_from_slice(&self.shared.actual_pages.load(Ordering::Acquire).to_le_bytes());
        crate::read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (offset 4) is the driver's to write.
        if let (4, Ok(bytes)) = (offset, <[u8; 4]>::try_from(data)) {
            self.shared.actual_pages.store(u32::from_le_bytes(bytes), Ordering::Release);
        }
    }

    fn process_queue(
        &mut self,
        mem: &GuestMemoryMmap,
        index: u16,
        queue: &mut Queue,
    ) -> Result<bool, DeviceError> {
        match index {
            INFLATE | DEFLATE => {
                let queue_err = |e: virtio_queue::Error| DeviceError::Queue {
                    queue: index,
                    reason: e.to_string(),
                };
                let mut used_any = false;
                while let Some(chain) = queue.iter(mem).map_err(queue_err)?.next() {
                    let head = chain.head_index();
                    if self.read_pfns(mem, chain) {
                        if index == INFLATE {
                            self.discard_pfns(mem);
                        } else {
                            let n = self.pfns.len() as u64;
                            self.shared.deflated_pages.fetch_add(n, Ordering::AcqRel);
                        }
                    } else {
                        self.shared.rejected.fetch_add(1, Ordering::AcqRel);
                    }
                    queue.add_used(mem, head, 0).map_err(queue_err)?;
                    used_any = true;
                }
                Ok(used_any)
            }
            _ => self.serve_stats_or_reports(mem, index, queue),
        }
    }

    fn reset(&mut self) {
        self.stats_head = None;
        self.shared.actual_pages.store(0, Ordering::Release);
    }

    /// The target and actual page counts, and the statistics buffer the device holds:
    /// present u8, head u16.
    fn save_state(&self) -> Vec<u8> {
        let mut e = snapshot::Encoder::new();
        e.u32(self.shared.target_pages.load(Ordering::Acquire));
        e.u32(self.shared.actual_pages.load(Ordering::Acquire));
        e.u8(u8::from(self.stats_head.is_some())).u16(self.stats_head.unwrap_or(0));
        e.0
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), String> {
        let mut d = snapshot::Decoder::new("virtio-balloon", state);
        let err = |e: snapshot::SnapshotError| e.to_string();
        let target = d.u32("target pages").map_err(err)?;
        let actual = d.u32("actual pages").map_err(err)?;
        let held = d.u8("statistics buffer held").map_err(err)? != 0;
        let head = d.u16("statistics buffer").map_err(err)?;
        d.finish().map_err(err)?;
        self.shared.target_pages.store(target, Ordering::Release);
        self.shared.actual_pages.store(actual, Ordering::Release);
        self.stats_head = (held && head < QUEUE_SIZE).then_some(head);
        Ok(())
    }

    fn event_fds(&self) -> Vec<std::os::fd::RawFd> {
        vec![self.wake.as_raw_fd()]
    }

    fn event_ready(&mut self, _which: usize) {
        let _ = self.wake.read();
    }

    fn config_changed(&mut self) -> bool {
        self.shared.target_changed.swap(false, Ordering::AcqRel)
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes};

    const MEM: u64 = 0x100_0000;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
    }

    fn used_idx(vq: &MockSplitQueue<'_, GuestMemoryMmap>, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(vq.used_addr().unchecked_add(2)).unwrap()
    }

    /// Writes `pfns` at 0x10_0000 and posts them as one device-readable buffer.
    fn post_pfns(mem: &GuestMemoryMmap, vq: &MockSplitQueue<'_, GuestMemoryMmap>, pfns: &[u32]) {
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        mem.write_slice(&bytes, GuestAddress(0x10_0000)).unwrap();
        let len = u32::try_from(bytes.len()).unwrap();
        let descs = [RawDescriptor::from(Descriptor::new(0x10_0000, len, 0, 0))];
        vq.add_desc_chains(&descs, 0).unwrap();
    }

    #[test]
    fn inflated_pages_are_discarded_and_read_back_as_zero() {
        let mem = mem();
        // Guest data in pages 0x200..0x204 and 0x300.
        for page in [0x200u64, 0x201, 0x202, 0x203, 0x300] {
            mem.write_slice(&[0xaa; 4096], GuestAddress(page * PAGE_SIZE)).unwrap();
        }
        let vq = MockSplitQueue::new(&mem, 16);
        post_pfns(&mem, &vq, &[0x203, 0x200, 0x201, 0x202, 0x300, 0x300]);
        let mut q: Queue = vq.create_queue().unwrap();
        let mut b = Balloon::new(0, false).unwrap();
        assert!(b.process_queue(&mem, INFLATE, &mut q).unwrap());
        assert_eq!(used_idx(&vq, &mem), 1);
        let mut page = [0xffu8; 4096];
        for p in [0x200u64, 0x203, 0x300] {
            mem.read_slice(&mut page, GuestAddress(p * PAGE_SIZE)).unwrap();
            assert!(page.iter().all(|b| *b == 0), "page {p:#x} discarded");
        }
        assert_eq!(b.handle().counters(), (5, 0, 0, 0), "duplicates count once");
    }

    #[test]
    fn hostile_pfns_are_refused_without_touching_memory() {
        let mem = mem();
        mem.write_slice(&[0x55; 4096], GuestAddress(0x5000)).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        // Outside guest memory, at the top of the PFN space, and a buffer that is writable.
        post_pfns(&mem, &vq, &[u32::try_from(MEM / PAGE_SIZE).unwrap(), u32::MAX]);
        let descs = [RawDescriptor::from(Descriptor::new(0x5000, 8, VRING_DESC_F_WRITE as u16, 0))];
        vq.add_desc_chains(&descs, 1).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let mut b = Balloon::new(0, false).unwrap();
        assert!(b.process_queue(&mem, INFLATE, &mut q).unwrap());
        assert_eq!(used_idx(&vq, &mem), 2);
        let (inflated, _, _, rejected) = b.handle().counters();
        assert_eq!((inflated, rejected), (0, 3));
        let mut page = [0u8; 16];
        mem.read_slice(&mut page, GuestAddress(0x5000)).unwrap();
        assert_eq!(page, [0x55; 16], "the writable buffer's page was not discarded");
    }

    #[test]
    fn stats_are_held_until_the_host_asks() {
        let mem = mem();
        let mut entries = Vec::new();
        for (tag, value) in [(4u16, 1000u64), (5, 4000)] {
            entries.extend_from_slice(&tag.to_le_bytes());
            entries.extend_from_slice(&value.to_le_bytes());
        }
        mem.write_slice(&entries, GuestAddress(0x10_0000)).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        let descs = [RawDescriptor::from(Descriptor::new(0x10_0000, 20, 0, 0))];
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let mut b = Balloon::new(8 << 20, true).unwrap();
        let handle = b.handle();
        assert!(!b.process_queue(&mem, 2, &mut q).unwrap(), "the buffer is held");
        assert_eq!(handle.stats(), vec![(4, 1000), (5, 4000)]);
        handle.request_stats();
        b.event_ready(0);
        assert!(b.process_queue(&mem, 2, &mut q).unwrap(), "returned on request");
        assert_eq!(used_idx(&vq, &mem), 1);
        // Configuration: target 8 MiB = 2048 pages; the driver's `actual`.
        let mut word = [0u8; 4];
        b.read_config(0, &mut word);
        assert_eq!(u32::from_le_bytes(word), 2048);
        b.write_config(4, &100u32.to_le_bytes());
        assert_eq!(handle.actual(), 100 * PAGE_SIZE);
        b.write_config(0, &1u32.to_le_bytes());
        assert_eq!(handle.target(), 8 << 20, "num_pages is the host's");
        let mut far = [0xffu8; 4];
        b.read_config(64, &mut far);
        assert_eq!(far, [0; 4]);
        assert_ne!(b.features() & VIRTIO_BALLOON_F_DEFLATE_ON_OOM, 0);
    }

    #[test]
    fn free_page_reports_are_discarded() {
        let mem = mem();
        mem.write_slice(&[0x77; 8192], GuestAddress(0x40_0000)).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        let w = VRING_DESC_F_WRITE as u16;
        let descs = [
            RawDescriptor::from(Descriptor::new(0x40_0000, 8192, w | VRING_DESC_F_NEXT as u16, 1)),
            // Unaligned and outside memory: refused, counted.
            RawDescriptor::from(Descriptor::new(MEM + 0x1000, 4096, w, 0)),
        ];
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let mut b = Balloon::new(0, false).unwrap();
        assert!(b.process_queue(&mem, 3, &mut q).unwrap());
        let mut page = [0xffu8; 8192];
        mem.read_slice(&mut page, GuestAddress(0x40_0000)).unwrap();
        assert!(page.iter().all(|b| *b == 0));
        assert_eq!(b.handle().counters(), (0, 0, 8192, 1));
    }

    #[test]
    fn inflating_shared_memory_frees_the_file_pages_too() {
        // Guest memory in a memfd, as when a vhost-user backend shares it.
        // SAFETY: memfd_create with a valid C string; the descriptor is owned below.
        let fd = unsafe { libc::memfd_create(c"balloon-test".as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: `fd` was just created and is owned by nothing else.
        let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(MEM).unwrap();
        let region = vm_memory::GuestRegionMmap::from_range(
            GuestAddress(0),
            MEM as usize,
            Some(vm_memory::FileOffset::new(file.try_clone().unwrap(), 0)),
        )
        .unwrap();
        let mem = GuestMemoryMmap::from_regions(vec![region]).unwrap();
        mem.write_slice(&[0xaa; 0x10_0000], GuestAddress(0x20_0000)).unwrap();
        let blocks = |f: &std::fs::File| {
            use std::os::unix::fs::MetadataExt;
            f.metadata().unwrap().blocks()
        };
        let before = blocks(&file);
        let vq = MockSplitQueue::new(&mem, 16);
        let pfns: Vec<u32> = (0x200..0x300).collect();
        post_pfns(&mem, &vq, &pfns);
        let mut q: Queue = vq.create_queue().unwrap();
        let mut b = Balloon::new(0, false).unwrap();
        assert!(b.process_queue(&mem, INFLATE, &mut q).unwrap());
        assert_eq!(b.handle().counters().0, 256);
        let after = blocks(&file);
        assert!(
            before >= after + 2000,
            "the memfd should shrink by about 1 MiB: {before} -> {after} 512-byte blocks"
        );
        let mut page = [0xffu8; 4096];
        mem.read_slice(&mut page, GuestAddress(0x20_0000)).unwrap();
        assert!(page.iter().all(|b| *b == 0));
    }
}
