//! What the VMM told the guest: the zero page's command line and e820 map.

use crate::println;

/// A usable RAM range.
#[derive(Clone, Copy)]
pub struct Range {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

/// Largest number of e820 entries kept.
pub const MAX_RANGES: usize = 16;

/// Boot information from the zero page.
pub struct BootInfo {
    /// The command line.
    pub cmdline: &'static str,
    /// Usable RAM.
    pub ram: [Range; MAX_RANGES],
    /// Entries used in `ram`.
    pub ram_count: usize,
    /// The RSDP address given in the zero page (0 if none).
    pub rsdp: u64,
}

const E820_COUNT: u64 = 0x1e8;
const E820_TABLE: u64 = 0x2d0;
const CMD_LINE_PTR: u64 = 0x228;
const ACPI_RSDP_ADDR: u64 = 0x70;

fn read<T: Copy>(addr: u64) -> T {
    // SAFETY: the zero page and everything it points to lie in identity-mapped guest RAM.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

impl BootInfo {
    /// Parses the zero page at `zero_page`.
    pub fn read(zero_page: u64) -> Self {
        let cmd_ptr = u64::from(read::<u32>(zero_page + CMD_LINE_PTR));
        let mut len = 0;
        while len < 4096 && read::<u8>(cmd_ptr + len) != 0 {
            len += 1;
        }
        // SAFETY: `len` bytes at cmd_ptr were just read; the VMM wrote them and never
        // changes them.
        let bytes = unsafe { core::slice::from_raw_parts(cmd_ptr as *const u8, len as usize) };
        let cmdline = core::str::from_utf8(bytes).unwrap_or("");
        let mut info = BootInfo {
            cmdline,
            ram: [Range { start: 0, end: 0 }; MAX_RANGES],
            ram_count: 0,
            rsdp: read::<u64>(zero_page + ACPI_RSDP_ADDR),
        };
        let count = u64::from(read::<u8>(zero_page + E820_COUNT));
        for i in 0..count.min(128) {
            let at = zero_page + E820_TABLE + i * 20;
            let (addr, size, kind) = (read::<u64>(at), read::<u64>(at + 8), read::<u32>(at + 16));
            if kind == 1 && info.ram_count < MAX_RANGES {
                info.ram[info.ram_count] = Range { start: addr, end: addr + size };
                info.ram_count += 1;
            }
        }
        info
    }

    /// Usable RAM ranges.
    pub fn ram(&self) -> &[Range] {
        &self.ram[..self.ram_count]
    }

    /// Total usable RAM in bytes.
    pub fn ram_total(&self) -> u64 {
        self.ram().iter().map(|r| r.end - r.start).sum()
    }

    /// The command-line words.
    pub fn words(&self) -> impl Iterator<Item = &'static str> {
        self.cmdline.split(' ').filter(|w| !w.is_empty())
    }

    /// Prints the memory map.
    pub fn print_map(&self) {
        for r in self.ram() {
            println!("e820: usable {:#014x}-{:#014x}", r.start, r.end - 1);
        }
    }
}

/// Parses a size with an optional K/M/G suffix.
pub fn parse_size(s: &str) -> Option<u64> {
    let (digits, shift) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 10),
        b'M' | b'm' => (&s[..s.len() - 1], 20),
        b'G' | b'g' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}
