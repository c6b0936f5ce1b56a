//! Port I/O from ring 3 (allowed by the TSS I/O bitmap): the serial console, power-off, the
//! debug-exit and boot-timer ports, PCI configuration space, and the LAPIC.

use core::fmt;
use core::sync::atomic::{AtomicBool, Ordering};

const COM1: u16 = 0x3f8;
const PM1A_CNT: u16 = 0x604;
const SLP_TYP_S5_EN: u16 = (5 << 10) | (1 << 13);
const DEBUG_EXIT: u16 = 0xf4;
const BOOT_TIMER: u16 = 0x440;
const I8042_CMD: u16 = 0x64;

/// Writes a byte to a port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no memory effects; ring 3 may use every port (I/O bitmap).
    unsafe {
        core::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

/// Writes a 16-bit word to a port.
pub fn outw(port: u16, value: u16) {
    // SAFETY: as outb.
    unsafe {
        core::arch::asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Writes a 32-bit word to a port.
pub fn outl(port: u16, value: u32) {
    // SAFETY: as outb.
    unsafe {
        core::arch::asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a 32-bit word from a port.
pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as outb.
    unsafe {
        core::arch::asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags))
    }
    value
}

/// Reads a byte from a port.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as outb.
    unsafe {
        core::arch::asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    }
    value
}

static SERIAL_LOCK: AtomicBool = AtomicBool::new(false);

/// The serial console, held for the duration of one message so vCPUs do not interleave.
pub struct SerialWriter(());

impl SerialWriter {
    /// Takes the console.
    pub fn lock() -> Self {
        while SERIAL_LOCK
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
        SerialWriter(())
    }
}

impl Drop for SerialWriter {
    fn drop(&mut self) {
        SERIAL_LOCK.store(false, Ordering::Release);
    }
}

impl fmt::Write for SerialWriter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // The VMM's UART always has room (THRE stays set), so the line status register is not
        // polled: each poll would cost a VM exit.
        for b in s.bytes() {
            if b == b'\n' {
                outb(COM1, b'\r');
            }
            outb(COM1, b);
        }
        Ok(())
    }
}

/// Prints to the serial console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = write!($crate::io::SerialWriter::lock(), $($arg)*);
    }};
}

/// Prints a line to the serial console.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!($crate::io::SerialWriter::lock(), $($arg)*);
    }};
}

/// Reads a byte of serial input, waiting for one.
pub fn serial_read_byte() -> u8 {
    while inb(COM1 + 5) & 1 == 0 {
        core::hint::spin_loop();
    }
    inb(COM1)
}

/// A byte of serial input if one is waiting.
pub fn serial_try_read() -> Option<u8> {
    (inb(COM1 + 5) & 1 != 0).then(|| inb(COM1))
}

/// Tells the boot timer (if the VMM attached one) that the payload has been reached.
pub fn boot_timer_mark() {
    outb(BOOT_TIMER, 1);
}

/// Powers off through ACPI (PM1a_CNT, SLP_TYP = S5).
pub fn power_off() -> ! {
    outw(PM1A_CNT, SLP_TYP_S5_EN);
    // Without ACPI power management there is nothing more to do than stop.
    halt_forever();
}

/// Ends the VM with `code` through the debug-exit port (only if the VMM attached it).
pub fn debug_exit(code: u8) {
    outb(DEBUG_EXIT, code);
}

/// Resets the machine through the i8042.
pub fn reset() -> ! {
    outb(I8042_CMD, 0xfe);
    halt_forever();
}

/// Spins forever (ring 3 cannot `hlt`).
pub fn halt_forever() -> ! {
    loop {
        core::hint::spin_loop();
    }
}

/// Stops the guest in a way the VMM reports as a failure: an invalid opcode with no IDT
/// loaded escalates to a triple fault.
pub fn crash() -> ! {
    // SAFETY: deliberately raises #UD; nothing after it runs.
    unsafe { core::arch::asm!("ud2", options(noreturn)) }
}

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc only reads the counter (CR4.TSD is clear).
    unsafe { core::arch::x86_64::_rdtsc() }
}
