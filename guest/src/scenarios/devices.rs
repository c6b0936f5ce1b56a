//! `virtio`: lists the virtio devices the driver finds, in the order `Device::open_nth`
//! counts them (virtio-pci functions on bus 0 in slot order, then virtio-mmio windows).

use crate::bootinfo::BootInfo;
use crate::println;
use crate::virtio::{self, Location};

/// Runs the scenario.
pub fn run(info: &BootInfo, _arg: Option<&str>) -> bool {
    let mut count = 0;
    for found in virtio::devices(info) {
        let kind = found.device_type;
        match found.location {
            Location::Pci(function) => {
                let slot = function.device;
                println!("virtio: pci 00:{slot:02x}.0 type {kind}");
                let bar0 = function.bar_address(0).unwrap_or(0);
                let vectors = function.msix_table_size().unwrap_or(0);
                println!("virtio: pci 00:{slot:02x}.0 bar0 {bar0:#x} msix {vectors}");
            }
            Location::Mmio(base) => println!("virtio: mmio {base:#x} type {kind}"),
        }
        count += 1;
    }
    if count == 0 {
        println!("virtio: no devices");
    }
    true
}
