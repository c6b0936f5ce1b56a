//! Vanguard's test guest: a freestanding program booted like a Linux kernel (an ELF entered
//! in 64-bit mode with a zero page in RSI). Its ring-0 entry (entry.rs) sets up each vCPU and
//! drops it to ring 3, where the scenarios named on the command line run at native speed even
//! where KVM emulates ring 0. The scenarios, their syntax and what they print are documented
//! in docs/test-guest.md: a stable interface for scripts and tests.
#![no_std]
#![no_main]

mod acpi;
mod bootinfo;
mod cpu;
mod entry;
mod io;
mod md5;
mod pci;
mod scenarios;
mod smp;
mod virtio;

use core::fmt::Write;

/// Ring-3 entry of every vCPU; `boot_params` is 0 on the APs.
#[no_mangle]
pub extern "C" fn guest_main(cpu: u64, boot_params: u64) -> ! {
    if cpu != 0 {
        smp::ap_main(cpu as usize);
    }
    io::boot_timer_mark();
    let info = bootinfo::BootInfo::read(boot_params);
    smp::start_aps(&info);
    scenarios::run_all(&info);
    println!("vanguard-guest: done, powering off");
    io::power_off();
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let mut out = io::SerialWriter::lock();
    let _ = writeln!(out, "vanguard-guest: PANIC: {info}");
    drop(out);
    io::crash();
}

/// The prebuilt `core` for the host target was compiled with unwinding and names this symbol;
/// with panic=abort it is never called.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}

// The freestanding build has no C library, so the memory primitives the compiler calls come
// from here. They use string instructions so that the compiler cannot turn their loops back
// into calls to themselves.

/// # Safety
/// As C's memcpy.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid and do not overlap.
    unsafe {
        core::arch::asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _, options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// As C's memmove.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize).wrapping_add(n) {
        // SAFETY: forward copy is safe when dst is below src or the ranges are disjoint.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: backward copy with the direction flag set, restored before returning.
    unsafe {
        core::arch::asm!("std", "rep movsb", "cld",
            inout("rcx") n => _, inout("rdi") dst.add(n - 1) => _, inout("rsi") src.add(n - 1) => _,
            options(nostack));
    }
    dst
}

/// # Safety
/// As C's memset.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, value: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range is valid.
    unsafe {
        core::arch::asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") value as u8, options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// As C's memcmp.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: the caller guarantees both ranges hold n bytes.
        let (x, y) =
            unsafe { (core::ptr::read_volatile(a.add(i)), core::ptr::read_volatile(b.add(i))) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// # Safety
/// As C's bcmp.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}
