//! What a snapshot or a live migration needs from a virtio device and its transport: the
//! driver-visible state (status, features, every queue's addresses and ring positions, the
//! transport's interrupt registers, the device's own state) as bytes, a way to stop a
//! device's worker while the VM is captured, and the guest pages devices wrote.
//!
//! KVM's dirty-page log sees only what vCPUs write. A device writes guest memory only
//! into the device-writable buffers of the chains it uses and into the used ring, so the
//! transport marks exactly those after each pass over a queue ([`DirtyPages`]): for every
//! used entry it walks the chain again (bounded by the queue size, indirect tables
//! included) and marks its writable buffers. The byte layout is in docs/snapshot.md
//! (section `virtio`).

use snapshot::{Decoder, Encoder, SnapshotError};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

const PAGE: u64 = 4096;

/// Guest pages devices wrote since the last [`DirtyPages::take`], per RAM region (in the
/// order of the guest memory's regions), one bit per 4 KiB page. Marking costs nothing while
/// tracking is off.
pub struct DirtyPages {
    enabled: AtomicBool,
    regions: Vec<(u64, u64, Vec<AtomicU64>)>,
}

impl DirtyPages {
    /// A tracker for the regions of `mem`, off.
    pub fn new(mem: &GuestMemoryMmap) -> Self {
        let regions = mem
            .iter()
            .map(|r| {
                let pages = r.len().div_ceil(PAGE);
                let words = usize::try_from(pages.div_ceil(64)).unwrap_or(0);
                (
                    r.start_addr().raw_value(),
                    r.len(),
                    (0..words).map(|_| AtomicU64::new(0)).collect(),
                )
            })
            .collect();
        Self { enabled: AtomicBool::new(false), regions }
    }

    /// Starts or stops tracking (stopping forgets nothing: [`DirtyPages::take`] still
    /// returns what was marked).
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Release);
    }

    /// Whether writes are being tracked.
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// Marks the pages of `[gpa, gpa + len)` that lie in guest RAM.
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 || !self.enabled() {
            return;
        }
        let end = gpa.saturating_add(len);
        for (start, size, bits) in &self.regions {
            let region_end = start.saturating_add(*size);
            let (from, to) = (gpa.max(*start), end.min(region_end));
            if from >= to {
                continue;
            }
            let (first, last) = ((from - start) / PAGE, (to - 1 - start) / PAGE);
            for page in first..=last {
                if let Some(word) = usize::try_from(page / 64).ok().and_then(|w| bits.get(w)) {
                    word.fetch_or(1 << (page % 64), Ordering::AcqRel);
                }
            }
        }
    }

    /// Per region, the bitmap of pages marked since the last call (64 pages a word, as KVM's
    /// dirty log), clearing it.
    pub fn take(&self) -> Vec<Vec<u64>> {
        self.regions
            .iter()
            .map(|(_, _, bits)| bits.iter().map(|w| w.swap(0, Ordering::AcqRel)).collect())
            .collect()
    }
}

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
const VIRTQ_DESC_F_INDIRECT: u16 = 4;

/// One descriptor as the guest wrote it: address, length, flags, next.
fn descriptor(mem: &GuestMemoryMmap, table: u64, index: u16) -> Option<(u64, u32, u16, u16)> {
    let at = GuestAddress(table.checked_add(u64::from(index) * 16)?);
    let raw: [u8; 16] = mem.read_obj(at).ok()?;
    let addr = u64::from_le_bytes(raw[0..8].try_into().ok()?);
    let len = u32::from_le_bytes(raw[8..12].try_into().ok()?);
    let flags = u16::from_le_bytes(raw[12..14].try_into().ok()?);
    let next = u16::from_le_bytes(raw[14..16].try_into().ok()?);
    Some((addr, len, flags, next))
}

/// Marks the writable buffers of the chain at `head` in a table of `size` entries (an
/// indirect table is walked too; at most `size` descriptors per table, so a looping chain
/// ends).
fn mark_chain(dirty: &DirtyPages, mem: &GuestMemoryMmap, table: u64, size: u16, head: u16) {
    let mut index = head;
    for _ in 0..size {
        let Some((addr, len, flags, next)) = descriptor(mem, table, index) else { return };
        if flags & VIRTQ_DESC_F_INDIRECT != 0 {
            let entries = u16::try_from(len / 16).unwrap_or(u16::MAX);
            if entries > 0 {
                // An indirect table has no indirect entries of its own; it is walked from 0.
                let mut inner = 0u16;
                for _ in 0..entries {
                    let Some((a, l, f, n)) = descriptor(mem, addr, inner) else { break };
                    if f & VIRTQ_DESC_F_WRITE != 0 {
                        dirty.mark(a, u64::from(l));
                    }
                    if f & VIRTQ_DESC_F_NEXT == 0 || n >= entries {
                        break;
                    }
                    inner = n;
                }
            }
        } else if flags & VIRTQ_DESC_F_WRITE != 0 {
            dirty.mark(addr, u64::from(len));
        }
        if flags & VIRTQ_DESC_F_NEXT == 0 || next >= size {
            return;
        }
        index = next;
    }
}

/// After a pass over `queue` that moved its used index from `before`: marks the used ring
/// and the writable buffers of every chain used since.
pub(crate) fn mark_used(dirty: &DirtyPages, mem: &GuestMemoryMmap, queue: &Queue, before: u16) {
    let after = queue.next_used();
    let size = queue.size();
    if after == before || size == 0 {
        return;
    }
    // flags, idx, the ring, avail_event.
    dirty.mark(queue.used_ring(), 4 + 8 * u64::from(size) + 2);
    let count = after.wrapping_sub(before).min(size);
    for i in 0..count {
        let slot = u64::from(before.wrapping_add(i) % size);
        let Some(at) = queue.used_ring().checked_add(4 + 8 * slot) else { return };
        let Ok(id) = mem.read_obj::<u32>(GuestAddress(at)) else { return };
        if let Ok(head) = u16::try_from(u32::from_le(id)) {
            mark_chain(dirty, mem, queue.desc_table(), size, head);
        }
    }
}

/// Writes a queue's state.
pub(crate) fn encode_queue(e: &mut Encoder, q: &QueueState) {
    e.u16(q.max_size).u16(q.size).u8(u8::from(q.ready)).u8(u8::from(q.event_idx_enabled));
    e.u16(q.next_avail).u16(q.next_used);
    e.u64(q.desc_table).u64(q.avail_ring).u64(q.used_ring);
}

/// Reads a queue's state (checked later, by `Queue::try_from`).
pub(crate) fn decode_queue(d: &mut Decoder<'_>) -> Result<QueueState, SnapshotError> {
    let flag = |d: &mut Decoder<'_>, what: &str| -> Result<bool, SnapshotError> {
        match d.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(d.malformed(format!("{what} is {v}, not 0 or 1"))),
        }
    };
    Ok(QueueState {
        max_size: d.u16("queue maximum size")?,
        size: d.u16("queue size")?,
        ready: flag(d, "queue ready")?,
        event_idx_enabled: flag(d, "queue event index")?,
        next_avail: d.u16("queue next available")?,
        next_used: d.u16("queue next used")?,
        desc_table: d.u64("descriptor table address")?,
        avail_ring: d.u64("driver ring address")?,
        used_ring: d.u64("device ring address")?,
    })
}

/// A transport with its device, as a snapshot sees it.
pub trait TransportState: Send {
    /// The device's virtio type.
    fn device_type(&self) -> u32;
    /// Whether the device's queues run in another process (a vhost-user backend), whose ring
    /// state the VMM does not hold.
    fn external(&mut self) -> bool;
    /// Stops the device's worker: no queue is served and no guest memory written until
    /// [`TransportState::resume`]. The vCPUs must be stopped first.
    fn quiesce(&mut self);
    /// Starts the worker again (if the driver runs the device) and serves every queue once,
    /// in case a notification came just before [`TransportState::quiesce`].
    fn resume(&mut self);
    /// The transport's and the device's state (quiesced).
    fn save(&mut self) -> Result<Vec<u8>, String>;
    /// Puts back what [`TransportState::save`] wrote, before any vCPU runs; the device runs
    /// again as the driver left it (the caller then [`TransportState::resume`]s it).
    fn restore(&mut self, state: &[u8]) -> Result<(), String>;
    /// The host descriptor the device hands over to another VMM process on this host.
    fn handover_fd(&self) -> Option<std::os::fd::RawFd>;
    /// Where the transport marks the guest pages its device writes.
    fn set_dirty_log(&mut self, dirty: std::sync::Arc<DirtyPages>);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_only_pages_in_ram_and_take_clears() {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x1_0000_0000), 0x10_0000),
        ])
        .unwrap();
        let dirty = DirtyPages::new(&mem);
        dirty.mark(0x1000, 1);
        assert!(dirty.take().iter().all(|r| r.iter().all(|w| *w == 0)), "marked while off");
        dirty.set_enabled(true);
        dirty.mark(0x1fff, 2); // pages 1 and 2
        dirty.mark(0xf_f000, 0x10_0000); // last page of region 0; the gap is not RAM
        dirty.mark(0x1_0000_0000 + 0x4000, 0x1000);
        dirty.mark(u64::MAX - 10, 100); // overflows: ignored
        let bits = dirty.take();
        assert_eq!(bits[0][0], 0b110);
        assert_eq!(bits[0][3], 1 << 63);
        assert_eq!(bits[1][0], 1 << 4);
        assert!(dirty.take().iter().all(|r| r.iter().all(|w| *w == 0)));
    }

    #[test]
    fn a_looping_chain_ends() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let dirty = DirtyPages::new(&mem);
        dirty.set_enabled(true);
        // Two descriptors pointing at each other, both writable.
        let mut table = [0u8; 32];
        for (i, (addr, next)) in [(0x8000u64, 1u16), (0x9000, 0)].into_iter().enumerate() {
            let d = &mut table[i * 16..i * 16 + 16];
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&16u32.to_le_bytes());
            d[12..14].copy_from_slice(&(VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE).to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
        }
        mem.write_slice(&table, GuestAddress(0x1000)).unwrap();
        mark_chain(&dirty, &mem, 0x1000, 2, 0);
        assert_eq!(dirty.take()[0][0], (1 << 8) | (1 << 9));
    }
}
