//! `balloon`: gives memory back to the host through virtio-balloon (`vanguard run --balloon
//! size=SIZE`). The scenario reads the host's target (`num_pages`), fills that many free
//! pages with a pattern (so the host has them resident) and waits for a key on the serial
//! port; then it posts their page frame numbers on the inflate queue, checks that every page
//! now reads as zero (the host discarded its copy), reports, and waits for a second key. The
//! integration test reads the VMM's RSS at each pause.

use crate::bootinfo::BootInfo;
use crate::virtio::Device;
use crate::{io, println};

/// Page frame numbers per inflate buffer (one 4 KiB page of u32s).
const PFNS_PER_BUFFER: usize = 1024;

#[repr(C, align(4096))]
struct PfnPage([u32; PFNS_PER_BUFFER]);
static mut PFNS: PfnPage = PfnPage([0; PFNS_PER_BUFFER]);

const VIRTIO_ID_BALLOON: u32 = 5;
const PAGE: u64 = 4096;

fn pattern(addr: u64) -> u64 {
    addr ^ 0x5a5a_5a5a_0000_0000
}

/// Runs the scenario.
pub fn run(info: &BootInfo, _arg: Option<&str>) -> bool {
    let mut dev = match Device::open(info, VIRTIO_ID_BALLOON) {
        Ok(dev) => dev,
        Err(why) => {
            println!("balloon: FAILED: {why}");
            return false;
        }
    };
    let pages = u64::from(dev.config32(0));
    if pages == 0 {
        println!("balloon: FAILED: the host asked for no pages (use --balloon size=SIZE)");
        return false;
    }
    let Some(start) = super::disk::scratch(info, pages * PAGE) else {
        println!("balloon: FAILED: no {pages} free pages below 4 GiB");
        return false;
    };
    for word in (start..start + pages * PAGE).step_by(8) {
        // SAFETY: free, identity-mapped RAM that only this scenario uses.
        unsafe { core::ptr::write_volatile(word as *mut u64, pattern(word)) };
    }
    println!("balloon: filled {pages} pages at {start:#x}; waiting for a key");
    io::serial_read_byte();
    let pfns = core::ptr::addr_of_mut!(PFNS);
    let mut page = start;
    let end = start + pages * PAGE;
    while page < end {
        let mut n = 0;
        while n < PFNS_PER_BUFFER && page < end {
            // SAFETY: the static PFN page is this scenario's; the device reads it only while
            // `submit` waits.
            unsafe { (*pfns).0[n] = (page / PAGE) as u32 };
            n += 1;
            page += PAGE;
        }
        if let Err(why) = dev.submit(&[(pfns as u64, (n * 4) as u32, false)]) {
            println!("balloon: FAILED: inflate: {why}");
            return false;
        }
    }
    let mut nonzero = 0u64;
    for word in (start..end).step_by(8) {
        // SAFETY: as above.
        if unsafe { core::ptr::read_volatile(word as *const u64) } != 0 {
            nonzero += 1;
        }
    }
    if nonzero != 0 {
        println!("balloon: FAILED: {nonzero} words still hold data after inflating");
        return false;
    }
    println!("balloon: inflated {pages} pages; they read back as zero: ok");
    println!("balloon: waiting for a key");
    io::serial_read_byte();
    true
}
