//! `reboot`: resets the machine through the i8042.

use crate::bootinfo::BootInfo;
use crate::io;

/// Runs the scenario; never returns.
pub fn run(_info: &BootInfo, _arg: Option<&str>) -> bool {
    io::reset()
}
