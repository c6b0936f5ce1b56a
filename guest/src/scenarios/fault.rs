//! `fault`: crashes the guest on purpose (a triple fault), to exercise the VMM's crash report.

use crate::bootinfo::BootInfo;
use crate::io;

/// Runs the scenario; never returns.
pub fn run(_info: &BootInfo, _arg: Option<&str>) -> bool {
    io::crash()
}
