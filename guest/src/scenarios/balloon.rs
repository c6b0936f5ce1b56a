//! `balloon`: gives memory back to the host through virtio-balloon (`vanguard run --balloon
//! size=SIZE`). The scenario reads the host's target (`num_pages`), fills that many free
//! pages with a pattern (so the host has them resident) and waits for a key on the serial
//! port; then it posts their page frame numbers on the inflate queue, checks that every page
//! now reads as zero (the host discarded its copy), reports, and waits for a second key; then
//! it deflates (posts the same frames on the deflate queue) and checks the pages hold data
//! again. The integration test reads the VMM's RSS at each pause.

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
    let opened = Device::find_nth(info, VIRTIO_ID_BALLOON, 0)
        .and_then(|found| Device::open_with(&found, 2, 0));
    let mut dev = match opened {
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
    let end = start + pages * PAGE;
    if let Err(why) = give(&mut dev, INFLATE, start, end) {
        println!("balloon: FAILED: inflate: {why}");
        return false;
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
    // Take the pages back and use them again.
    if let Err(why) = give(&mut dev, DEFLATE, start, end) {
        println!("balloon: FAILED: deflate: {why}");
        return false;
    }
    for word in (start..end).step_by(8) {
        // SAFETY: as above; the pages are the guest's again.
        unsafe { core::ptr::write_volatile(word as *mut u64, pattern(word)) };
    }
    let mut wrong = 0u64;
    for word in (start..end).step_by(8) {
        // SAFETY: as above.
        if unsafe { core::ptr::read_volatile(word as *const u64) } != pattern(word) {
            wrong += 1;
        }
    }
    if wrong != 0 {
        println!("balloon: FAILED: {wrong} words lost their data after deflating");
        return false;
    }
    println!("balloon: deflated {pages} pages; they hold data again: ok");
    true
}

const INFLATE: usize = 0;
const DEFLATE: usize = 1;

/// Posts the page frame numbers of [start, end) on `queue`, a buffer of up to 1024 at a time.
fn give(dev: &mut Device, queue: usize, start: u64, end: u64) -> Result<(), &'static str> {
    let pfns = core::ptr::addr_of_mut!(PFNS);
    let mut page = start;
    while page < end {
        let mut n = 0;
        while n < PFNS_PER_BUFFER && page < end {
            // SAFETY: the static PFN page is this scenario's; the device reads it only while
            // `submit_to` waits.
            unsafe { (*pfns).0[n] = (page / PAGE) as u32 };
            n += 1;
            page += PAGE;
        }
        dev.submit_to(queue, &[(pfns as u64, (n * 4) as u32, false)])?;
    }
    Ok(())
}
