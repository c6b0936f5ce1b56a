//! Routes port I/O exits to the device that owns the port.
//!
//! Lookups happen on every `in`/`out` exit, so the bus is a sorted list searched by binary
//! search; each device sits behind its own mutex so vCPUs touching different devices never
//! contend.

use crate::VmAction;
use std::sync::{Arc, Mutex};

/// A device on a bus: it sees offsets relative to the start of its range.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]) -> VmAction;
}

/// Errors when building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// Two devices claim overlapping ranges.
    #[error("device range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Start of the new range.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// A range of length zero or one that wraps around.
    #[error("invalid device range {base:#x}+{len:#x}")]
    InvalidRange {
        /// Start of the range.
        base: u64,
        /// Its length.
        len: u64,
    },
}

struct Entry {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// An address space of devices (port I/O or MMIO).
#[derive(Default)]
pub struct Bus {
    entries: Vec<Entry>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `base..base+len`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        if self.entries.iter().any(|e| base < e.base + e.len && e.base < end) {
            return Err(BusError::Overlap { base, len });
        }
        let at = self.entries.partition_point(|e| e.base < base);
        self.entries.insert(at, Entry { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(&Entry, u64)> {
        let idx = self.entries.partition_point(|e| e.base <= addr).checked_sub(1)?;
        let entry = &self.entries[idx];
        let offset = addr - entry.base;
        // The whole access must fall inside the device's range.
        let last = offset.checked_add(size as u64)?;
        (last <= entry.len).then_some((entry, offset))
    }

    /// Serves a read; returns false (and fills `data` with 0xff, as an open bus does) when no
    /// device owns the address.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((entry, offset)) => {
                lock(&entry.device).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Serves a write; `None` when no device owns the address (the write is dropped).
    pub fn write(&self, addr: u64, data: &[u8]) -> Option<VmAction> {
        let (entry, offset) = self.find(addr, data.len())?;
        let action = lock(&entry.device).write(offset, data);
        Some(action)
    }
}

/// Locks a device, recovering from a poisoned mutex: a device whose earlier access panicked is
/// still better served than a VMM that stops every vCPU.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }
    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) -> VmAction {
            self.writes.push((offset, data.to_vec()));
            VmAction::None
        }
    }

    #[test]
    fn routes_by_range_and_offset() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Recorder { writes: vec![] }));
        let b = Arc::new(Mutex::new(Recorder { writes: vec![] }));
        bus.insert(b.clone(), 0x600, 8).unwrap();
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        let mut d = [0u8; 1];
        assert!(bus.read(0x3fd, &mut d));
        assert_eq!(d[0], 5);
        assert_eq!(bus.write(0x604, &[1, 2]), Some(VmAction::None));
        assert_eq!(b.lock().unwrap().writes, vec![(4, vec![1, 2])]);
        assert!(a.lock().unwrap().writes.is_empty());
    }

    #[test]
    fn unowned_and_straddling_accesses_miss() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Recorder { writes: vec![] })), 0x3f8, 8).unwrap();
        let mut d = [0u8; 2];
        assert!(!bus.read(0x3f0, &mut d));
        assert_eq!(d, [0xff, 0xff]);
        // A 2-byte access at the last port crosses the end of the device.
        assert!(!bus.read(0x3ff, &mut d));
        assert_eq!(bus.write(0x400, &[0]), None);
        assert_eq!(bus.write(u64::MAX, &[0, 0]), None);
    }

    #[test]
    fn overlaps_and_empty_ranges_are_refused() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder { writes: vec![] }));
        bus.insert(dev.clone(), 0x10, 0x10).unwrap();
        assert_eq!(bus.insert(dev.clone(), 0x1f, 1), Err(BusError::Overlap { base: 0x1f, len: 1 }));
        assert_eq!(bus.insert(dev.clone(), 0x8, 0x9), Err(BusError::Overlap { base: 0x8, len: 9 }));
        assert!(bus.insert(dev.clone(), 0x20, 1).is_ok());
        assert_eq!(
            bus.insert(dev.clone(), 0x30, 0),
            Err(BusError::InvalidRange { base: 0x30, len: 0 })
        );
        assert!(bus.insert(dev, u64::MAX, 2).is_err());
    }
}
