//! A PCI function's configuration space (type 0 header, 4 KiB for PCI Express) with a write
//! mask per bit: the guest changes only what the mask allows, so read-only identity fields,
//! BAR type bits and capability contents stay as the device set them.

/// Size of a function's configuration space (PCI Express).
pub const CONFIG_SPACE_SIZE: usize = 4096;
/// The command register.
pub const COMMAND: usize = 0x04;
/// Command: respond to I/O space accesses.
pub const COMMAND_IO_SPACE: u16 = 1 << 0;
/// Command: respond to memory space accesses (BARs decode only when set).
pub const COMMAND_MEMORY_SPACE: u16 = 1 << 1;
/// Command: the function may master the bus (DMA, MSI).
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command: INTx disabled.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// The status register.
pub const STATUS: usize = 0x06;
/// Status: the capability list at [`CAPABILITIES_POINTER`] is valid.
pub const STATUS_CAPABILITIES: u16 = 1 << 4;
/// First base address register.
pub const BAR0: usize = 0x10;
/// Number of BARs in a type 0 header.
pub const BAR_COUNT: usize = 6;
/// Offset of the first capability.
pub const CAPABILITIES_POINTER: usize = 0x34;
/// Interrupt line (written by firmware or the OS, meaningless to the device).
pub const INTERRUPT_LINE: usize = 0x3c;
/// Where capabilities start (right after the standard header).
const FIRST_CAPABILITY: usize = 0x40;
/// End of the space capabilities may occupy (the legacy 256-byte space).
const CAPABILITIES_END: usize = 0x100;

/// Identity of a function, fixed at creation.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Revision ID.
    pub revision: u8,
    /// Class code, subclass and programming interface.
    pub class: (u8, u8, u8),
    /// Subsystem vendor ID.
    pub subsystem_vendor: u16,
    /// Subsystem ID.
    pub subsystem: u16,
}

/// The kind of a memory BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// A 32-bit memory BAR (one register).
    Memory32,
    /// A 64-bit memory BAR (two registers: this one and the next).
    Memory64,
}

/// Errors while a device builds its configuration space (device bugs, not guest input).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A BAR index out of range, already used, or a 64-bit BAR in the last slot.
    #[error("BAR {0} is not free")]
    BarIndex(usize),
    /// A BAR size that is not a power of two of at least 4 KiB, or an unaligned address.
    #[error("BAR of {size:#x} bytes at {address:#x} is not a naturally aligned power of two")]
    BarSize {
        /// Requested size.
        size: u64,
        /// Requested address.
        address: u64,
    },
    /// The capability list is full.
    #[error("no room for a capability of {0} bytes")]
    NoRoom(usize),
}

#[derive(Debug, Clone, Copy)]
struct Bar {
    size: u64,
    kind: BarKind,
}

/// A function's configuration space.
pub struct ConfigSpace {
    bytes: Vec<u8>,
    mask: Vec<u8>,
    bars: [Option<Bar>; BAR_COUNT],
    next_capability: usize,
    last_capability: Option<usize>,
}

impl ConfigSpace {
    /// A type 0 header with `header`'s identity, no BARs and no capabilities.
    pub fn new(header: Header) -> Self {
        let mut space = Self {
            bytes: vec![0; CONFIG_SPACE_SIZE],
            mask: vec![0; CONFIG_SPACE_SIZE],
            bars: [None; BAR_COUNT],
            next_capability: FIRST_CAPABILITY,
            last_capability: None,
        };
        space.set_u16(0x00, header.vendor);
        space.set_u16(0x02, header.device);
        space.bytes[0x08] = header.revision;
        space.bytes[0x09] = header.class.2;
        space.bytes[0x0a] = header.class.1;
        space.bytes[0x0b] = header.class.0;
        space.set_u16(0x2c, header.subsystem_vendor);
        space.set_u16(0x2e, header.subsystem);
        let command =
            COMMAND_IO_SPACE | COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE;
        space.mask[COMMAND..COMMAND + 2].copy_from_slice(&command.to_le_bytes());
        // Cache line size, latency timer and interrupt line are scratch registers to us.
        space.mask[0x0c] = 0xff;
        space.mask[0x0d] = 0xff;
        space.mask[INTERRUPT_LINE] = 0xff;
        space
    }

    /// Sets a 16-bit field regardless of the write mask (the device's own view).
    pub fn set_u16(&mut self, offset: usize, value: u16) {
        if let Some(b) = self.bytes.get_mut(offset..offset + 2) {
            b.copy_from_slice(&value.to_le_bytes());
        }
    }

    /// Sets a 32-bit field regardless of the write mask.
    pub fn set_u32(&mut self, offset: usize, value: u32) {
        if let Some(b) = self.bytes.get_mut(offset..offset + 4) {
            b.copy_from_slice(&value.to_le_bytes());
        }
    }

    /// A 16-bit field (0xffff outside the space).
    pub fn u16_at(&self, offset: usize) -> u16 {
        self.bytes.get(offset..offset + 2).map_or(0xffff, |b| u16::from_le_bytes([b[0], b[1]]))
    }

    /// A 32-bit field (all ones outside the space).
    pub fn u32_at(&self, offset: usize) -> u32 {
        self.bytes
            .get(offset..offset + 4)
            .map_or(u32::MAX, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Declares BAR `index`: `size` bytes (a power of two, at least 4 KiB) at `address`.
    pub fn add_bar(
        &mut self,
        index: usize,
        size: u64,
        kind: BarKind,
        address: u64,
    ) -> Result<(), ConfigError> {
        let slots = if kind == BarKind::Memory64 { 2 } else { 1 };
        if index + slots > BAR_COUNT || self.bars[index..index + slots].iter().any(Option::is_some)
        {
            return Err(ConfigError::BarIndex(index));
        }
        let max = if kind == BarKind::Memory64 { 1 << 40 } else { 1 << 31 };
        if !size.is_power_of_two()
            || !(0x1000..=max).contains(&size)
            || !address.is_multiple_of(size)
        {
            return Err(ConfigError::BarSize { size, address });
        }
        if kind == BarKind::Memory32 && address.checked_add(size).is_none_or(|e| e > 1 << 32) {
            return Err(ConfigError::BarSize { size, address });
        }
        let offset = BAR0 + 4 * index;
        let type_bits: u32 = if kind == BarKind::Memory64 { 0b100 } else { 0 };
        // The address bits below the size read back as zero: that is how the guest sizes it.
        let low_mask = !(size - 1) as u32 & !0xf;
        self.set_u32(offset, (address as u32 & low_mask) | type_bits);
        self.mask[offset..offset + 4].copy_from_slice(&low_mask.to_le_bytes());
        self.bars[index] = Some(Bar { size, kind });
        if kind == BarKind::Memory64 {
            let high_mask = !((size - 1) >> 32) as u32;
            self.set_u32(offset + 4, (address >> 32) as u32);
            self.mask[offset + 4..offset + 8].copy_from_slice(&high_mask.to_le_bytes());
        }
        Ok(())
    }

    /// The guest-physical address BAR `index` is programmed to, and its size.
    pub fn bar(&self, index: usize) -> Option<(u64, u64)> {
        let bar = self.bars.get(index).copied().flatten()?;
        let offset = BAR0 + 4 * index;
        let low = u64::from(self.u32_at(offset) & !0xf);
        let high = match bar.kind {
            BarKind::Memory32 => 0,
            BarKind::Memory64 => u64::from(self.u32_at(offset + 4)),
        };
        Some(((high << 32) | low, bar.size))
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.u16_at(COMMAND)
    }

    /// Whether the function decodes its memory BARs.
    pub fn memory_enabled(&self) -> bool {
        self.command() & COMMAND_MEMORY_SPACE != 0
    }

    /// Appends a capability with `id` whose body (the bytes after the ID and next pointer) is
    /// `body`; `writable` (same length as `body`, or empty for none) masks what the guest may
    /// change. Returns the capability's offset.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        writable: &[u8],
    ) -> Result<usize, ConfigError> {
        let len = body.len() + 2;
        let offset = self.next_capability;
        let end = offset + len;
        if end > CAPABILITIES_END || (!writable.is_empty() && writable.len() != body.len()) {
            return Err(ConfigError::NoRoom(len));
        }
        self.bytes[offset] = id;
        self.bytes[offset + 1] = 0;
        self.bytes[offset + 2..end].copy_from_slice(body);
        if !writable.is_empty() {
            self.mask[offset + 2..end].copy_from_slice(writable);
        }
        // `offset` < 0x100, so it fits the one-byte pointer.
        let pointer = offset as u8;
        match self.last_capability {
            Some(last) => self.bytes[last + 1] = pointer,
            None => {
                self.bytes[CAPABILITIES_POINTER] = pointer;
                let status = self.u16_at(STATUS) | STATUS_CAPABILITIES;
                self.set_u16(STATUS, status);
            }
        }
        self.last_capability = Some(offset);
        self.next_capability = (end + 3) & !3;
        Ok(offset)
    }

    /// The guest reads: a naturally aligned access of 1, 2 or 4 bytes; anything else (or out
    /// of range) reads as all ones.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        match self.bytes.get(offset..offset + data.len()) {
            Some(src) if valid_access(offset, data.len()) => data.copy_from_slice(src),
            _ => data.fill(0xff),
        }
    }

    /// Every byte of the space as it stands (BAR addresses, command, capabilities' state), for
    /// a snapshot.
    pub fn raw(&self) -> &[u8] {
        &self.bytes
    }

    /// Puts back bytes from [`ConfigSpace::raw`] of the same function (a restored VM's): the
    /// read-only identity must match, so a snapshot cannot turn one function into another.
    pub fn restore_raw(&mut self, bytes: &[u8]) -> Result<(), String> {
        if bytes.len() != self.bytes.len() {
            return Err(format!(
                "{} bytes of configuration space, expected {}",
                bytes.len(),
                self.bytes.len()
            ));
        }
        for (at, (saved, now)) in bytes.iter().zip(&self.bytes).enumerate() {
            if self.mask[at] == 0 && saved != now && at < 0x40 && !(0x06..0x08).contains(&at) {
                return Err(format!(
                    "read-only byte {at:#x} is {saved:#04x} in the snapshot but {now:#04x} here"
                ));
            }
        }
        self.bytes.copy_from_slice(bytes);
        Ok(())
    }

    /// The guest writes: only the bits the mask allows change; invalid accesses are dropped.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        if !valid_access(offset, data.len()) || offset + data.len() > CONFIG_SPACE_SIZE {
            return;
        }
        for (i, value) in data.iter().enumerate() {
            let at = offset + i;
            self.bytes[at] = (self.bytes[at] & !self.mask[at]) | (value & self.mask[at]);
        }
    }
}

/// A configuration access is 1, 2 or 4 bytes, naturally aligned.
pub fn valid_access(offset: usize, len: usize) -> bool {
    matches!(len, 1 | 2 | 4) && offset.is_multiple_of(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space() -> ConfigSpace {
        ConfigSpace::new(Header {
            vendor: 0x1af4,
            device: 0x1042,
            revision: 1,
            class: (0x01, 0x80, 0x00),
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        })
    }

    fn read32(s: &ConfigSpace, offset: usize) -> u32 {
        let mut b = [0; 4];
        s.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn identity_is_read_only() {
        let mut s = space();
        assert_eq!(read32(&s, 0), 0x1042_1af4);
        s.write(0, &0u32.to_le_bytes());
        assert_eq!(read32(&s, 0), 0x1042_1af4);
        assert_eq!(read32(&s, 8), 0x0180_0001, "class 01/80/00, revision 1");
    }

    #[test]
    fn bar_sizing_and_relocation_of_a_64_bit_bar() {
        let mut s = space();
        s.add_bar(0, 0x8000, BarKind::Memory64, 0xc000_8000).unwrap();
        assert_eq!(s.bar(0), Some((0xc000_8000, 0x8000)));
        assert_eq!(read32(&s, BAR0) & 0xf, 0b100, "64-bit memory BAR type bits");
        // Sizing: all ones in, the size mask out, type bits untouched.
        s.write(BAR0, &u32::MAX.to_le_bytes());
        s.write(BAR0 + 4, &u32::MAX.to_le_bytes());
        assert_eq!(read32(&s, BAR0), 0xffff_8004);
        assert_eq!(read32(&s, BAR0 + 4), 0xffff_ffff);
        // Relocation above 4 GiB.
        s.write(BAR0, &0xd000_0000u32.to_le_bytes());
        s.write(BAR0 + 4, &1u32.to_le_bytes());
        assert_eq!(s.bar(0), Some((0x1_d000_0000, 0x8000)));
        // Unused BARs read zero and ignore writes.
        s.write(BAR0 + 8, &u32::MAX.to_le_bytes());
        assert_eq!(read32(&s, BAR0 + 8), 0);
        assert_eq!(s.bar(2), None);
    }

    #[test]
    fn bad_bars_are_refused() {
        let mut s = space();
        assert!(s.add_bar(0, 0x3000, BarKind::Memory32, 0).is_err());
        assert!(s.add_bar(0, 0x1000, BarKind::Memory32, 0x800).is_err());
        assert!(s.add_bar(5, 0x1000, BarKind::Memory64, 0).is_err());
        assert!(s.add_bar(0, 0x1000, BarKind::Memory32, 0xffff_f000).is_ok());
        assert!(s.add_bar(0, 0x1000, BarKind::Memory32, 0).is_err(), "already used");
    }

    #[test]
    fn capabilities_chain_and_masks() {
        let mut s = space();
        assert_eq!(s.u16_at(STATUS) & STATUS_CAPABILITIES, 0);
        let a = s.add_capability(0x09, &[1, 2, 3], &[]).unwrap();
        let b = s.add_capability(0x11, &[0, 0, 0, 0], &[0xff, 0, 0, 0]).unwrap();
        assert_eq!((a, b), (0x40, 0x48));
        assert_ne!(s.u16_at(STATUS) & STATUS_CAPABILITIES, 0);
        assert_eq!(s.u32_at(CAPABILITIES_POINTER) & 0xff, 0x40);
        assert_eq!(s.u32_at(0x40), 0x0201_4809);
        s.write(0x40, &[0xaa, 0xaa, 0xaa, 0xaa]);
        assert_eq!(s.u32_at(0x40), 0x0201_4809, "a read-only capability stays");
        s.write(0x48, &[0xaa, 0xaa, 0xaa, 0xaa]);
        assert_eq!(s.u32_at(0x48), 0x00aa_0011, "only the writable byte changed");
        assert!(s.add_capability(0x09, &[0; 200], &[]).is_err());
    }

    #[test]
    fn malformed_accesses_read_all_ones_and_write_nothing() {
        let mut s = space();
        let mut b = [0; 4];
        s.read(2, &mut b);
        assert_eq!(b, [0xff; 4], "unaligned dword");
        let mut b3 = [0; 3];
        s.read(0, &mut b3);
        assert_eq!(b3, [0xff; 3]);
        let mut one = [0; 1];
        s.read(CONFIG_SPACE_SIZE, &mut one);
        assert_eq!(one, [0xff]);
        s.write(CONFIG_SPACE_SIZE - 2, &[1, 2, 3, 4]);
        s.write(COMMAND + 1, &[0xff, 0xff]);
        assert_eq!(s.command(), 0);
        s.write(COMMAND, &0xffffu16.to_le_bytes());
        assert_eq!(
            s.command(),
            COMMAND_IO_SPACE | COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE
        );
    }
}
