//! PCI for Vanguard guests: one host bridge (segment 0, bus 0), its configuration space
//! reached through ports 0xCF8/0xCFC and through an ECAM window, a window of guest-physical
//! addresses where the devices' memory BARs live, and MSI-X.
//!
//! - [`config::ConfigSpace`] is a function's 4 KiB configuration space with per-bit write
//!   masks: the standard header, BAR sizing and relocation, a capability list. Devices own one
//!   and add their capabilities to it.
//! - [`PciDevice`] is what a function implements: configuration reads and writes (with the
//!   default behaviour of its `ConfigSpace`) and accesses to its BARs.
//! - [`root::PciRoot`] holds the functions by slot; [`root::ConfigIo`], [`root::ConfigMmio`]
//!   and [`root::BarWindow`] put it on the VM's port and MMIO buses.
//! - [`msix::Msix`] is an MSI-X table and pending-bit array whose vectors the VMM backs with
//!   KVM irqfds and GSI routes ([`msix::MsiRouter`]).
//!
//! Every value the guest writes is checked: accesses of odd sizes or outside a region read
//! as all-ones (as unclaimed PCI reads do) and write nothing; nothing here panics.

// Registers are narrower than the values they are cut from (a 64-bit BAR address into two
// dwords, a bus number out of an ECAM offset): truncation is the point of those casts.
#![allow(clippy::cast_possible_truncation)]

pub mod config;
pub mod msix;
pub mod root;

pub use config::{BarKind, ConfigSpace};
pub use root::PciRoot;

/// Red Hat's vendor ID, which the virtio specification assigns to virtio devices.
pub const VIRTIO_VENDOR_ID: u16 = 0x1af4;

/// A PCI function as the bus sees it.
pub trait PciDevice: Send {
    /// The function's configuration space.
    fn config(&self) -> &ConfigSpace;
    /// The same, for writing.
    fn config_mut(&mut self) -> &mut ConfigSpace;
    /// The guest reads configuration space at `offset` (`data.len()` is 1, 2 or 4 and the
    /// access does not cross a dword).
    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        self.config().read(offset, data);
    }
    /// The guest writes configuration space.
    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config_mut().write(offset, data);
    }
    /// The guest reads `data.len()` bytes at `offset` inside BAR `bar`.
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// The guest writes inside BAR `bar`.
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]);
}
