//! `rng`: reads entropy from the virtio-rng device (`vanguard run --rng`) through the
//! polling virtio-mmio driver, twice, and checks the bytes look random.

use crate::bootinfo::BootInfo;
use crate::println;
use crate::virtio::Device;

const VIRTIO_ID_RNG: u32 = 4;

/// Runs the scenario.
pub fn run(info: &BootInfo, _arg: Option<&str>) -> bool {
    let mut dev = match Device::open(info, VIRTIO_ID_RNG) {
        Ok(dev) => dev,
        Err(why) => {
            println!("rng: FAILED: {why}");
            return false;
        }
    };
    let (mut first, mut second) = ([0u8; 64], [0u8; 64]);
    let lens = (dev.fill(&mut first), dev.fill(&mut second));
    let (Ok(a), Ok(b)) = lens else {
        println!("rng: FAILED: the device did not answer");
        return false;
    };
    // 64 random bytes are never all zero, and two draws never equal, in practice.
    let random = a == 64 && b == 64 && first != second && first.iter().any(|x| *x != 0);
    print_hex(dev.base(), &first[..16]);
    println!(
        "rng: read {} + {} bytes from virtio-rng at {:#x}: {}",
        a,
        b,
        dev.base(),
        if random { "ok" } else { "FAILED" }
    );
    random
}

fn print_hex(base: u64, bytes: &[u8]) {
    let mut text = [0u8; 32];
    for (i, b) in bytes.iter().enumerate() {
        let digits = b"0123456789abcdef";
        text[2 * i] = digits[usize::from(b >> 4)];
        text[2 * i + 1] = digits[usize::from(b & 15)];
    }
    println!("rng: first bytes from {base:#x}: {}", core::str::from_utf8(&text).unwrap_or("?"));
}
