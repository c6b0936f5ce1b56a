//! `powerbutton`: waits for the ACPI power button, as an OS would before shutting down.

use crate::bootinfo::BootInfo;
use crate::{io, println};

/// ACPI PM1a status register; bit 8 is PWRBTN_STS.
const PM1A_STS: u16 = 0x600;
const PWRBTN_STS: u16 = 1 << 8;

/// Waits for the ACPI power button (the VMM presses it on SIGTERM), acknowledges it and
/// returns, so the guest powers off as an OS would.
pub fn run(_info: &BootInfo, _arg: Option<&str>) -> bool {
    println!("powerbutton: waiting");
    loop {
        let status = u16::from_le_bytes([io::inb(PM1A_STS), io::inb(PM1A_STS + 1)]);
        if status & PWRBTN_STS != 0 {
            break;
        }
        core::hint::spin_loop();
    }
    io::outw(PM1A_STS, PWRBTN_STS);
    println!("powerbutton: pressed");
    true
}
