//! `exit=N`: ends the VM with status N through the debug-exit port.

use crate::bootinfo::BootInfo;
use crate::{io, println};

/// Runs the scenario.
pub fn run(_info: &BootInfo, arg: Option<&str>) -> bool {
    let Some(code) = arg.and_then(|a| a.parse::<u8>().ok()) else {
        return super::bad("exit", arg);
    };
    println!("exit: requesting exit status {code}");
    io::debug_exit(code);
    // Still here: the VMM has no debug-exit port.
    println!("exit: no debug-exit device, continuing");
    true
}
