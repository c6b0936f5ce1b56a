//! Interrupt routing: which PIC and IOAPIC pins each GSI drives.
//!
//! KVM's default table sends GSI n to IOAPIC pin n. PCs wire the PIT (ISA IRQ 0) to IOAPIC pin
//! 2, and Vanguard's MADT says so with an interrupt source override (IRQ 0 -> GSI 2), so GSI 0
//! must also reach pin 2 for the table to be true.

use crate::error::VmmError;
use devices::bus::lock;
use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip,
    kvm_irq_routing_msi, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use pci::msix::{MsiMessage, MsiRouter};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Pins on the IOAPIC.
pub const IOAPIC_PINS: u32 = 24;
/// The ISA IRQ of the PIT, and the IOAPIC pin it is wired to.
const PIT_IRQ: u32 = 0;
const PIT_IOAPIC_PIN: u32 = 2;
/// The PIC cascade line: no device uses it.
const CASCADE_IRQ: u32 = 2;

fn route(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            irqchip: kvm_irq_routing_irqchip { irqchip, pin },
        },
        ..Default::default()
    }
}

/// The routing table: GSIs 0..16 to the PICs (but the cascade) and the IOAPIC, GSIs 16..24 to
/// the IOAPIC, and GSI 0 to IOAPIC pin 2.
pub fn legacy_routes() -> Vec<kvm_irq_routing_entry> {
    let mut routes = Vec::new();
    for gsi in 0..IOAPIC_PINS {
        if gsi < 16 && gsi != CASCADE_IRQ {
            let chip = if gsi < 8 { KVM_IRQCHIP_PIC_MASTER } else { KVM_IRQCHIP_PIC_SLAVE };
            routes.push(route(gsi, chip, gsi % 8));
        }
        let pin = if gsi == PIT_IRQ { PIT_IOAPIC_PIN } else { gsi };
        routes.push(route(gsi, KVM_IRQCHIP_IOAPIC, pin));
    }
    routes
}

fn msi_route(gsi: u32, message: MsiMessage) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            msi: kvm_irq_routing_msi {
                address_lo: (message.address & 0xffff_ffff) as u32,
                address_hi: (message.address >> 32) as u32,
                data: message.data,
                ..Default::default()
            },
        },
        ..Default::default()
    }
}

/// The VM's GSI routing table: [`legacy_routes`] plus one MSI route per programmed MSI-X
/// vector. KVM replaces the whole table on every change, so the router keeps all of it.
pub struct GsiRouter {
    vm: Arc<VmFd>,
    msi: Mutex<BTreeMap<u32, MsiMessage>>,
}

impl GsiRouter {
    /// Installs the legacy routes.
    pub fn new(vm: Arc<VmFd>) -> Result<Self, VmmError> {
        let router = Self { vm, msi: Mutex::new(BTreeMap::new()) };
        router.apply(&BTreeMap::new()).map_err(|e| match e.raw_os_error() {
            Some(errno) => {
                VmmError::Kvm { what: "set GSI routing", source: kvm_ioctls::Error::new(errno) }
            }
            None => VmmError::MissingCapability("an IRQ routing table of 24 pins"),
        })?;
        Ok(router)
    }

    fn apply(&self, msi: &BTreeMap<u32, MsiMessage>) -> std::io::Result<()> {
        let mut routes = legacy_routes();
        routes.extend(msi.iter().map(|(gsi, message)| msi_route(*gsi, *message)));
        let table = KvmIrqRouting::from_entries(&routes)
            .map_err(|e| std::io::Error::other(format!("GSI routing table: {e:?}")))?;
        self.vm.set_gsi_routing(&table).map_err(std::io::Error::from)
    }
}

impl MsiRouter for GsiRouter {
    fn set_route(&self, gsi: u32, message: Option<MsiMessage>) -> std::io::Result<()> {
        if gsi < IOAPIC_PINS {
            return Err(std::io::Error::other(format!("GSI {gsi} is an IOAPIC pin, not MSI")));
        }
        let mut msi = lock(&self.msi);
        let previous = match message {
            Some(m) => msi.insert(gsi, m),
            None => msi.remove(&gsi),
        };
        let result = self.apply(&msi);
        if result.is_err() {
            // Keep the table as KVM has it.
            match previous {
                Some(p) => msi.insert(gsi, p),
                None => msi.remove(&gsi),
            };
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pins(gsi: u32, chip: u32) -> Vec<u32> {
        legacy_routes()
            .iter()
            .filter(|r| r.gsi == gsi && r.type_ == KVM_IRQ_ROUTING_IRQCHIP)
            // SAFETY: every entry built here is of the irqchip kind.
            .filter_map(|r| unsafe { (r.u.irqchip.irqchip == chip).then_some(r.u.irqchip.pin) })
            .collect()
    }

    #[test]
    fn pit_reaches_ioapic_pin_2_and_isa_irqs_their_pins() {
        assert_eq!(pins(0, KVM_IRQCHIP_IOAPIC), vec![2]);
        assert_eq!(pins(0, KVM_IRQCHIP_PIC_MASTER), vec![0]);
        assert_eq!(pins(4, KVM_IRQCHIP_IOAPIC), vec![4]);
        assert_eq!(pins(4, KVM_IRQCHIP_PIC_MASTER), vec![4]);
        assert_eq!(pins(9, KVM_IRQCHIP_PIC_SLAVE), vec![1]);
        assert!(pins(2, KVM_IRQCHIP_PIC_MASTER).is_empty(), "the cascade is not a device line");
        assert_eq!(pins(20, KVM_IRQCHIP_IOAPIC), vec![20]);
        assert!(pins(20, KVM_IRQCHIP_PIC_SLAVE).is_empty());
        assert_eq!(legacy_routes().len(), 15 + 24);
    }
}
