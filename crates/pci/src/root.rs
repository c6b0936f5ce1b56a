//! The host bridge and the ways the guest reaches its bus: configuration mechanism #1 (ports
//! 0xCF8/0xCFC), the ECAM window, and the window where memory BARs decode.

use crate::config::{valid_access, ConfigSpace, Header};
use crate::PciDevice;
use devices::bus::lock;
use devices::{BusDevice, VmAction};
use std::sync::{Arc, Mutex};

/// Devices (slots) on the bus.
pub const SLOTS: usize = 32;

/// A function shared between the bus and whoever else drives it.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// Errors while putting devices on the bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    /// Every slot is taken.
    #[error("the PCI bus is full ({SLOTS} slots)")]
    Full,
}

/// The host bridge in slot 0: identity only.
struct HostBridge(ConfigSpace);

impl PciDevice for HostBridge {
    fn config(&self) -> &ConfigSpace {
        &self.0
    }
    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.0
    }
    fn read_bar(&mut self, _: usize, _: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write_bar(&mut self, _: usize, _: u64, _: &[u8]) {}
}

/// Bus 0 of segment 0 and the functions on it (function 0 of each slot).
pub struct PciRoot {
    slots: Vec<Option<SharedPciDevice>>,
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl PciRoot {
    /// A bus with only the host bridge (slot 0).
    pub fn new() -> Self {
        let bridge = HostBridge(ConfigSpace::new(Header {
            // A generic PCIe host bridge ID (Red Hat's), which no driver applies quirks to.
            vendor: 0x1b36,
            device: 0x0008,
            revision: 0,
            class: (0x06, 0x00, 0x00),
            subsystem_vendor: 0x1af4,
            subsystem: 0x1100,
        }));
        let mut slots = vec![None; SLOTS];
        slots[0] = Some(Arc::new(Mutex::new(bridge)) as SharedPciDevice);
        Self { slots }
    }

    /// Puts `device` in the first free slot and returns the slot number.
    pub fn add(&mut self, device: SharedPciDevice) -> Result<u8, PciError> {
        let slot = self.slots.iter().position(Option::is_none).ok_or(PciError::Full)?;
        self.slots[slot] = Some(device);
        u8::try_from(slot).map_err(|_| PciError::Full)
    }

    fn function(&self, bus: u8, slot: u8, function: u8) -> Option<&SharedPciDevice> {
        if bus != 0 || function != 0 {
            return None;
        }
        self.slots.get(usize::from(slot))?.as_ref()
    }

    /// How many functions the bus holds, the host bridge included.
    pub fn function_count(&self) -> usize {
        self.slots.iter().flatten().count()
    }

    /// Each present function's slot and configuration space bytes, for a snapshot.
    pub fn save_config(&self) -> Vec<(u8, Vec<u8>)> {
        (0u8..)
            .zip(&self.slots)
            .filter_map(|(slot, device)| {
                Some((slot, lock(device.as_ref()?).config().raw().to_vec()))
            })
            .collect()
    }

    /// Puts back configuration spaces from [`PciRoot::save_config`].
    pub fn restore_config(&self, saved: &[(u8, Vec<u8>)]) -> Result<(), String> {
        for (slot, bytes) in saved {
            let device =
                self.slots.get(usize::from(*slot)).and_then(Option::as_ref).ok_or_else(|| {
                    format!("the snapshot has a PCI function in slot {slot}, this VM none")
                })?;
            lock(device)
                .config_mut()
                .restore_raw(bytes)
                .map_err(|e| format!("slot {slot}: {e}"))?;
        }
        Ok(())
    }

    /// A configuration read; absent functions and malformed accesses read as all ones.
    pub fn config_read(&self, bus: u8, slot: u8, function: u8, offset: usize, data: &mut [u8]) {
        match self.function(bus, slot, function) {
            Some(device) if valid_access(offset, data.len()) => {
                lock(device).read_config(offset, data)
            }
            _ => data.fill(0xff),
        }
    }

    /// A configuration write; to absent functions or malformed, it is dropped.
    pub fn config_write(&self, bus: u8, slot: u8, function: u8, offset: usize, data: &[u8]) {
        if let Some(device) = self.function(bus, slot, function) {
            if valid_access(offset, data.len()) {
                lock(device).write_config(offset, data);
            }
        }
    }

    /// Calls `f` with the function whose enabled memory BAR holds `addr..addr+len`, the BAR
    /// index and the offset inside it; returns None when no BAR claims the access.
    fn with_bar<T>(
        &self,
        addr: u64,
        len: usize,
        f: impl FnOnce(&mut dyn PciDevice, usize, u64) -> T,
    ) -> Option<T> {
        let end = addr.checked_add(len as u64)?;
        for device in self.slots.iter().flatten() {
            let mut guard = lock(device);
            if !guard.config().memory_enabled() {
                continue;
            }
            let hit = (0..crate::config::BAR_COUNT).find_map(|i| {
                let (base, size) = guard.config().bar(i)?;
                (addr >= base && end <= base.checked_add(size)?).then(|| (i, addr - base))
            });
            if let Some((bar, offset)) = hit {
                return Some(f(&mut *guard, bar, offset));
            }
        }
        None
    }
}

/// Configuration mechanism #1: CONFIG_ADDRESS at port 0xCF8, CONFIG_DATA at 0xCFC..=0xCFF.
pub struct ConfigIo {
    root: Arc<PciRoot>,
    address: u32,
}

impl ConfigIo {
    /// The ports for `root`.
    pub fn new(root: Arc<PciRoot>) -> Self {
        Self { root, address: 0 }
    }

    /// CONFIG_ADDRESS as the guest last set it (snapshot).
    pub fn address(&self) -> u32 {
        self.address
    }

    /// Sets CONFIG_ADDRESS (restore).
    pub fn set_address(&mut self, address: u32) {
        self.address = address & 0x80ff_fffc;
    }

    /// The function and register CONFIG_ADDRESS selects, if enabled (bit 31).
    fn target(&self, data_offset: u64) -> Option<(u8, u8, u8, usize)> {
        if self.address & 0x8000_0000 == 0 {
            return None;
        }
        let bus = (self.address >> 16) as u8;
        let slot = ((self.address >> 11) & 0x1f) as u8;
        let function = ((self.address >> 8) & 0x7) as u8;
        // The legacy mechanism reaches the first 256 bytes only.
        let register = (self.address & 0xfc) as usize + usize::try_from(data_offset).ok()?;
        Some((bus, slot, function, register))
    }
}

impl BusDevice for ConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 => match self.target(offset - 4) {
                Some((b, s, f, r)) => self.root.config_read(b, s, f, r, data),
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> VmAction {
        match offset {
            0 => {
                // Only a dword write latches the address (byte writes to 0xCF8..0xCFB are
                // other, unrelated legacy registers on real chipsets).
                if let Ok(bytes) = <[u8; 4]>::try_from(data) {
                    self.address = u32::from_le_bytes(bytes) & 0x80ff_fffc;
                }
            }
            4..=7 => {
                if let Some((b, s, f, r)) = self.target(offset - 4) {
                    self.root.config_write(b, s, f, r, data);
                }
            }
            _ => {}
        }
        VmAction::None
    }
}

/// The ECAM window: 4 KiB of configuration space per function, bus in bits 20..28 of the
/// offset, slot in 15..20, function in 12..15.
pub struct ConfigMmio(pub Arc<PciRoot>);

fn ecam_target(offset: u64) -> Option<(u8, u8, u8, usize)> {
    let bus = u8::try_from(offset >> 20).ok()?;
    let slot = ((offset >> 15) & 0x1f) as u8;
    let function = ((offset >> 12) & 0x7) as u8;
    Some((bus, slot, function, (offset & 0xfff) as usize))
}

impl BusDevice for ConfigMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match ecam_target(offset) {
            Some((b, s, f, r)) => self.0.config_read(b, s, f, r, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> VmAction {
        if let Some((b, s, f, r)) = ecam_target(offset) {
            self.0.config_write(b, s, f, r, data);
        }
        VmAction::None
    }
}

/// The window of guest-physical addresses where memory BARs decode: an access goes to the
/// function whose enabled BAR contains it, wherever the guest has moved that BAR within the
/// window. Unclaimed reads return all ones; unclaimed writes are dropped.
pub struct BarWindow {
    root: Arc<PciRoot>,
    start: u64,
}

impl BarWindow {
    /// The window starting at guest-physical `start`.
    pub fn new(root: Arc<PciRoot>, start: u64) -> Self {
        Self { root, start }
    }
}

impl BusDevice for BarWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let Some(addr) = self.start.checked_add(offset) else { return data.fill(0xff) };
        let len = data.len();
        if self.root.with_bar(addr, len, |d, bar, off| d.read_bar(bar, off, data)).is_none() {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> VmAction {
        if let Some(addr) = self.start.checked_add(offset) {
            self.root.with_bar(addr, data.len(), |d, bar, off| d.write_bar(bar, off, data));
        }
        VmAction::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BarKind, COMMAND, COMMAND_MEMORY_SPACE};

    /// A function with one 4 KiB BAR of plain memory.
    struct Scratch {
        config: ConfigSpace,
        memory: Vec<u8>,
    }

    impl PciDevice for Scratch {
        fn config(&self) -> &ConfigSpace {
            &self.config
        }
        fn config_mut(&mut self) -> &mut ConfigSpace {
            &mut self.config
        }
        fn read_bar(&mut self, _: usize, offset: u64, data: &mut [u8]) {
            let o = offset as usize;
            data.copy_from_slice(&self.memory[o..o + data.len()]);
        }
        fn write_bar(&mut self, _: usize, offset: u64, data: &[u8]) {
            let o = offset as usize;
            self.memory[o..o + data.len()].copy_from_slice(data);
        }
    }

    fn root_with_scratch() -> Arc<PciRoot> {
        let mut config = ConfigSpace::new(Header {
            vendor: 0x1234,
            device: 0x5678,
            revision: 0,
            class: (0xff, 0, 0),
            subsystem_vendor: 0,
            subsystem: 0,
        });
        config.add_bar(0, 0x1000, BarKind::Memory32, 0xc000_1000).unwrap();
        let mut root = PciRoot::new();
        let slot = root.add(Arc::new(Mutex::new(Scratch { config, memory: vec![0; 0x1000] })));
        assert_eq!(slot, Ok(1));
        Arc::new(root)
    }

    fn io_read(io: &mut ConfigIo, slot: u32, reg: u32) -> u32 {
        io.write(0, &(0x8000_0000 | slot << 11 | reg).to_le_bytes());
        let mut b = [0; 4];
        io.read(4, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn both_config_mechanisms_see_the_same_functions() {
        let root = root_with_scratch();
        let mut io = ConfigIo::new(root.clone());
        let mut ecam = ConfigMmio(root);
        assert_eq!(io_read(&mut io, 0, 0), 0x0008_1b36, "host bridge in slot 0");
        assert_eq!(io_read(&mut io, 0, 8) >> 8, 0x06_0000, "class: host bridge");
        assert_eq!(io_read(&mut io, 1, 0), 0x5678_1234);
        assert_eq!(io_read(&mut io, 2, 0), u32::MAX, "empty slot");
        let mut b = [0; 4];
        ecam.read(1 << 15, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x5678_1234);
        ecam.read(1 << 20, &mut b);
        assert_eq!(b, [0xff; 4], "bus 1 does not exist");
        ecam.read((1 << 15) | (1 << 12), &mut b);
        assert_eq!(b, [0xff; 4], "function 1 does not exist");
        // A 2-byte read through the data port at 0xCFE.
        io.write(0, &(0x8000_0000u32 | 1 << 11).to_le_bytes());
        let mut w = [0; 2];
        io.read(6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x5678);
        // Disabled address (bit 31 clear) reads all ones.
        io.write(0, &(1u32 << 11).to_le_bytes());
        io.read(4, &mut b);
        assert_eq!(b, [0xff; 4]);
    }

    #[test]
    fn bars_decode_only_when_enabled_and_follow_relocation() {
        let root = root_with_scratch();
        let mut ecam = ConfigMmio(root.clone());
        let mut window = BarWindow::new(root, 0xc000_0000);
        window.write(0x1010, &[1, 2, 3, 4]);
        let mut b = [0; 4];
        window.read(0x1010, &mut b);
        assert_eq!(b, [0xff; 4], "memory space disabled: nothing decodes");
        let cmd = (1u32 << 15) | COMMAND as u32;
        ecam.write(u64::from(cmd), &COMMAND_MEMORY_SPACE.to_le_bytes());
        window.write(0x1010, &[1, 2, 3, 4]);
        window.read(0x1010, &mut b);
        assert_eq!(b, [1, 2, 3, 4]);
        // Move the BAR to 0xc000_5000: the old address goes dark, the new one decodes.
        ecam.write((1 << 15) | 0x10, &0xc000_5000u32.to_le_bytes());
        window.read(0x1010, &mut b);
        assert_eq!(b, [0xff; 4]);
        window.read(0x5010, &mut b);
        assert_eq!(b, [1, 2, 3, 4]);
        // An access straddling the end of the BAR is not claimed.
        window.read(0x5ffe, &mut b);
        assert_eq!(b, [0xff; 4]);
        window.read(u64::MAX - 1, &mut b);
        assert_eq!(b, [0xff; 4]);
    }

    #[test]
    fn the_bus_fills_up_cleanly() {
        let mut root = PciRoot::new();
        for _ in 1..SLOTS {
            let bridge = HostBridge(ConfigSpace::new(Header {
                vendor: 1,
                device: 1,
                revision: 0,
                class: (0, 0, 0),
                subsystem_vendor: 0,
                subsystem: 0,
            }));
            assert!(root.add(Arc::new(Mutex::new(bridge))).is_ok());
        }
        let extra = HostBridge(ConfigSpace::new(Header {
            vendor: 1,
            device: 1,
            revision: 0,
            class: (0, 0, 0),
            subsystem_vendor: 0,
            subsystem: 0,
        }));
        assert_eq!(root.add(Arc::new(Mutex::new(extra))), Err(PciError::Full));
    }
}
