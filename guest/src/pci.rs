//! PCI bus 0 through configuration mechanism #1 (address at port 0xCF8, data at 0xCFC, 32-bit
//! accesses only): finding functions, walking capability lists, reading BARs as the VMM
//! assigned them (they are never moved here), and MSI-X tables. Only the boot vCPU touches
//! PCI: the address/data pair of ports is not safe to share.

use crate::io;

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;
/// Offsets in the type 0 header.
const REG_ID: u8 = 0x00;
const REG_COMMAND: u8 = 0x04;
const REG_BAR0: u8 = 0x10;
const REG_CAPABILITIES: u8 = 0x34;
/// Status register bit: the capability list pointer is valid.
const STATUS_CAPABILITIES: u32 = 1 << 4;
/// Command register bits.
const COMMAND_MEMORY: u32 = 1 << 1;
const COMMAND_BUS_MASTER: u32 = 1 << 2;
/// The MSI-X capability ID.
pub const CAP_MSIX: u8 = 0x11;
/// MSI-X message control bits.
const MSIX_ENABLE: u32 = 1 << 15;
const MSIX_FUNCTION_MASK: u32 = 1 << 14;
/// MSI-X table entry vector control: masked.
const MSIX_ENTRY_MASKED: u32 = 1;

/// Function 0 of a device on bus 0.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Function {
    /// The device (slot) number, 0..32.
    pub device: u8,
}

impl Function {
    fn address(self, reg: u8) -> u32 {
        0x8000_0000 | (u32::from(self.device & 0x1f) << 11) | u32::from(reg & 0xfc)
    }

    /// Reads the configuration dword holding `reg`.
    pub fn read32(self, reg: u8) -> u32 {
        io::outl(CONFIG_ADDRESS, self.address(reg));
        io::inl(CONFIG_DATA)
    }

    /// Writes the configuration dword holding `reg`.
    pub fn write32(self, reg: u8, value: u32) {
        io::outl(CONFIG_ADDRESS, self.address(reg));
        io::outl(CONFIG_DATA, value);
    }

    /// Reads the 16-bit register at `reg` (2-aligned).
    pub fn read16(self, reg: u8) -> u16 {
        (self.read32(reg) >> (8 * u32::from(reg & 2))) as u16
    }

    /// Reads the byte register at `reg`.
    pub fn read8(self, reg: u8) -> u8 {
        (self.read32(reg) >> (8 * u32::from(reg & 3))) as u8
    }

    /// (vendor, device) IDs; vendor 0xffff where no function answers.
    pub fn ids(self) -> (u16, u16) {
        let id = self.read32(REG_ID);
        (id as u16, (id >> 16) as u16)
    }

    /// Turns on memory decoding and bus mastering. The status half of the dword is written
    /// as zero: its bits are write-one-to-clear.
    pub fn enable_memory_and_dma(self) {
        let command = self.read32(REG_COMMAND) & 0xffff;
        self.write32(REG_COMMAND, command | COMMAND_MEMORY | COMMAND_BUS_MASTER);
    }

    /// The address BAR `bar` decodes, as the VMM assigned it: None for an I/O BAR, an
    /// unassigned one (address 0), or a 64-bit BAR in the last slot.
    pub fn bar_address(self, bar: u8) -> Option<u64> {
        if bar > 5 {
            return None;
        }
        let low = self.read32(REG_BAR0 + 4 * bar);
        if low & 1 != 0 {
            return None;
        }
        let mut address = u64::from(low & !0xf);
        if (low >> 1) & 3 == 0b10 {
            if bar == 5 {
                return None;
            }
            address |= u64::from(self.read32(REG_BAR0 + 4 * (bar + 1))) << 32;
        }
        (address != 0).then_some(address)
    }

    /// The capability list: (ID, offset in configuration space) of each capability.
    pub fn capabilities(self) -> Capabilities {
        let status = self.read32(REG_COMMAND) >> 16;
        let first =
            if status & STATUS_CAPABILITIES != 0 { self.read8(REG_CAPABILITIES) & 0xfc } else { 0 };
        // A well-formed list has at most 48 entries (each at least 4 bytes, above 0x40).
        Capabilities { function: self, next: first, left: 48 }
    }

    /// Entries in the MSI-X table, if the function has an MSI-X capability.
    pub fn msix_table_size(self) -> Option<u16> {
        let cap = self.find_capability(CAP_MSIX)?;
        Some((self.read16(cap + 2) & 0x7ff) + 1)
    }

    /// The offset of the first capability with `id`.
    pub fn find_capability(self, id: u8) -> Option<u8> {
        self.capabilities().find(|(cap_id, _)| *cap_id == id).map(|(_, at)| at)
    }
}

/// Iterator over a function's capability list.
pub struct Capabilities {
    function: Function,
    next: u8,
    left: u8,
}

impl Iterator for Capabilities {
    type Item = (u8, u8);

    fn next(&mut self) -> Option<(u8, u8)> {
        if self.next < 0x40 || self.left == 0 {
            return None;
        }
        self.left -= 1;
        let at = self.next;
        let head = self.function.read16(at);
        self.next = (head >> 8) as u8 & 0xfc;
        Some((head as u8, at))
    }
}

/// Every function 0 on bus 0 that answers, in slot order.
pub fn functions() -> impl Iterator<Item = (Function, u16, u16)> {
    (0..32u8).filter_map(|device| {
        let function = Function { device };
        let (vendor, id) = function.ids();
        (vendor != 0xffff).then_some((function, vendor, id))
    })
}

fn mmio_read32(addr: u64) -> u32 {
    // SAFETY: an MSI-X table or PBA dword inside a memory BAR, in the identity-mapped,
    // user-accessible MMIO hole below 4 GiB.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

fn mmio_write32(addr: u64, value: u32) {
    // SAFETY: as mmio_read32.
    unsafe { core::ptr::write_volatile(addr as *mut u32, value) }
}

/// A function's MSI-X capability, its table and its pending-bit array.
pub struct Msix {
    function: Function,
    cap: u8,
    table: u64,
    pba: u64,
}

impl Msix {
    /// Reads the function's MSI-X capability and locates the table and PBA in their BARs.
    pub fn find(function: Function) -> Result<Msix, &'static str> {
        let cap = function.find_capability(CAP_MSIX).ok_or("no MSI-X capability")?;
        let locate = |reg: u8| -> Result<u64, &'static str> {
            let value = function.read32(cap + reg);
            let bar = function.bar_address((value & 7) as u8).ok_or("MSI-X BAR not assigned")?;
            Ok(bar + u64::from(value & !7))
        };
        Ok(Msix { function, cap, table: locate(4)?, pba: locate(8)? })
    }

    /// Sets or clears MSI-X Enable (the function mask stays clear).
    pub fn set_enabled(&self, enabled: bool) {
        // The low half (ID and next pointer) is read-only; message control is the high half.
        let dword = self.function.read32(self.cap) & !(MSIX_FUNCTION_MASK << 16);
        let dword =
            if enabled { dword | (MSIX_ENABLE << 16) } else { dword & !(MSIX_ENABLE << 16) };
        self.function.write32(self.cap, dword);
    }

    /// Whether MSI-X Enable is set.
    pub fn enabled(&self) -> bool {
        u32::from(self.function.read16(self.cap + 2)) & MSIX_ENABLE != 0
    }

    /// Programs table entry `index` with a message (address, data), masked or not.
    pub fn program(&self, index: u16, address: u64, data: u32, masked: bool) {
        let entry = self.table + 16 * u64::from(index);
        mmio_write32(entry + 12, MSIX_ENTRY_MASKED);
        mmio_write32(entry, address as u32);
        mmio_write32(entry + 4, (address >> 32) as u32);
        mmio_write32(entry + 8, data);
        self.set_masked(index, masked);
    }

    /// Masks or unmasks table entry `index`.
    pub fn set_masked(&self, index: u16, masked: bool) {
        let control = self.table + 16 * u64::from(index) + 12;
        let value = mmio_read32(control) & !MSIX_ENTRY_MASKED;
        mmio_write32(control, value | u32::from(masked));
    }

    /// Whether entry `index`'s pending bit is set.
    pub fn pending(&self, index: u16) -> bool {
        let word = mmio_read32(self.pba + 4 * u64::from(index / 32));
        word & (1 << (index % 32)) != 0
    }
}
