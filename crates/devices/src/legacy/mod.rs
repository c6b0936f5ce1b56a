//! The PC devices every Vanguard VM has, and the opt-in test devices.

pub mod acpi_pm;
pub mod i8042;
pub mod serial;
pub mod test_devices;

pub use acpi_pm::AcpiPm;
pub use i8042::I8042;
pub use serial::{SerialPort, SerialState};
pub use test_devices::{BootTimer, DebugExit};
