//! `msix`: MSI-X delivery on the first virtio-blk PCI function. Table entry 0 gets the message
//! (address 0xfee00000: APIC ID 0, physical; data 0x41: fixed, edge, vector 0x41), queue 0 is
//! pointed at entry 0, and a completed read must leave vector 0x41 pending in the boot vCPU's
//! local APIC IRR (the LAPIC is software-enabled for the test; interrupts stay disabled, so
//! the vector stays pending: nothing ever EOIs it). Then, with entry 0 masked, the next
//! completion must set pending bit 0 in the PBA instead. At the end MSI-X is disabled again,
//! the LAPIC's previous SVR restored, and the device reset.

use crate::bootinfo::BootInfo;
use crate::pci::{Function, Msix};
use crate::println;
use crate::virtio::{self, Device, Location};

const VIRTIO_ID_BLOCK: u32 = 2;
const VECTOR: u32 = 0x41;
const MESSAGE_ADDRESS: u64 = 0xfee0_0000;
/// The LAPIC's interrupt request register: 8 dwords, 16 bytes apart.
const LAPIC_IRR: u64 = 0xfee0_0200;
/// The LAPIC's spurious-interrupt vector register, and its APIC Software Enable bit: a
/// software-disabled LAPIC (the state after reset) drops fixed interrupts.
const LAPIC_SVR: u64 = 0xfee0_00f0;
const SVR_ENABLE: u32 = 1 << 8;
/// TSC cycles to wait for a message (about a second).
const WAIT: u64 = 3_000_000_000;

fn lapic_read(reg: u64) -> u32 {
    // SAFETY: the LAPIC page is identity-mapped and user-accessible; the registers read here
    // (IRR, SVR) have no read side effects.
    unsafe { core::ptr::read_volatile(reg as *const u32) }
}

fn lapic_write(reg: u64, value: u32) {
    // SAFETY: as lapic_read; only the SVR is written, by the boot vCPU, to its own LAPIC.
    unsafe { core::ptr::write_volatile(reg as *mut u32, value) }
}

/// Whether `vector` is pending in the boot vCPU's local APIC.
fn irr_pending(vector: u32) -> bool {
    lapic_read(LAPIC_IRR + 0x10 * u64::from(vector / 32)) & (1 << (vector % 32)) != 0
}

/// Polls `cond` for up to WAIT cycles.
fn within_a_second(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = crate::io::rdtsc() + WAIT;
    while !cond() {
        if crate::io::rdtsc() > deadline {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

/// Runs the scenario.
pub fn run(info: &BootInfo, _arg: Option<&str>) -> bool {
    let found = virtio::devices(info)
        .find(|d| d.device_type == VIRTIO_ID_BLOCK && matches!(d.location, Location::Pci(_)));
    let Some(found) = found else {
        println!("msix: FAILED: no virtio-blk PCI device");
        return false;
    };
    let Location::Pci(function) = found.location else { return false };
    let mut dev = match Device::open_found(&found) {
        Ok(dev) => dev,
        Err(why) => {
            println!("msix: FAILED: {why}");
            return false;
        }
    };
    let msix = match Msix::find(function) {
        Ok(msix) => msix,
        Err(why) => {
            println!("msix: FAILED: {why}");
            return false;
        }
    };
    // The LAPIC must be software-enabled to accept the message; with RFLAGS.IF = 0 the
    // vector then stays pending in the IRR. The previous setting is restored afterwards.
    let svr = lapic_read(LAPIC_SVR);
    lapic_write(LAPIC_SVR, svr | SVR_ENABLE);
    let ok = check(&mut dev, function, &msix);
    dev.set_queue_vector(0xffff);
    msix.set_enabled(false);
    lapic_write(LAPIC_SVR, svr);
    let _ = dev.reset();
    ok
}

fn check(dev: &mut Device, function: Function, msix: &Msix) -> bool {
    msix.program(0, MESSAGE_ADDRESS, VECTOR, true);
    msix.set_enabled(true);
    if !msix.enabled() {
        println!("msix: FAILED: MSI-X Enable does not stick on 00:{:02x}.0", function.device);
        return false;
    }
    match dev.set_queue_vector(0) {
        Some(0) => {}
        Some(_) => {
            println!("msix: FAILED: the device refused vector 0 for queue 0");
            return false;
        }
        None => return false,
    }
    if irr_pending(VECTOR) {
        println!("msix: FAILED: vector {VECTOR:#x} was pending before the request");
        return false;
    }
    msix.set_masked(0, false);
    if let Err(why) = read_one(dev) {
        println!("msix: FAILED: {why}");
        return false;
    }
    if within_a_second(|| irr_pending(VECTOR)) {
        println!("msix: vector {VECTOR:#x} pending after queue interrupt: ok");
    } else {
        println!("msix: FAILED: vector {VECTOR:#x} not pending after the request completed");
        return false;
    }
    msix.set_masked(0, true);
    if msix.pending(0) {
        println!("msix: FAILED: PBA bit 0 set before the masked request");
        return false;
    }
    if let Err(why) = read_one(dev) {
        println!("msix: FAILED: {why}");
        return false;
    }
    if within_a_second(|| msix.pending(0)) {
        println!("msix: masked vector pending in PBA: ok");
        true
    } else {
        println!("msix: FAILED: PBA bit 0 not set after a masked queue interrupt");
        false
    }
}

/// One 4 KiB read at sector 0, which must succeed.
fn read_one(dev: &mut Device) -> Result<(), &'static str> {
    match super::disk::read(dev, 0, 4096)? {
        0 => Ok(()),
        _ => Err("the read returned an error status"),
    }
}
