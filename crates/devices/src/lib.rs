//! Device models that guests reach through port I/O: the bus that routes a vCPU's `in`/`out`
//! exits, and the legacy PC devices every Vanguard VM has (COM1 serial, i8042, ACPI power
//! management) plus two opt-in test devices (debug exit and boot timer).
//!
//! Devices never touch KVM directly: they raise interrupts through an [`IrqLine`] and ask the
//! VM to stop by returning a [`VmAction`] from a write.

pub mod bus;
pub mod legacy;

pub use bus::{Bus, BusDevice, BusError};

use std::sync::Arc;

/// What a device asks of the VM after a guest's access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmAction {
    /// Carry on.
    None,
    /// The guest powered the machine off (ACPI S5).
    PowerOff,
    /// The guest reset the machine (i8042 reset line or the ACPI reset register).
    Reset,
    /// The guest asked, through the debug-exit port, to end the VM with this exit status.
    DebugExit(u8),
}

/// A way for a device to assert an interrupt line. The VMM backs it with an irqfd or
/// KVM_IRQ_LINE; tests can back it with anything that records the calls.
pub trait IrqLine: Send + Sync {
    /// Raise an edge (or a pulse) on the line.
    fn trigger(&self) -> std::io::Result<()>;
    /// Set the level of a level-triggered line.
    fn set_level(&self, high: bool) -> std::io::Result<()> {
        if high {
            self.trigger()
        } else {
            Ok(())
        }
    }
}

/// An interrupt line shared between a device and the VMM.
pub type SharedIrq = Arc<dyn IrqLine>;
