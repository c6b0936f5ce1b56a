//! Interrupt routing: which PIC and IOAPIC pins each GSI drives.
//!
//! KVM's default table sends GSI n to IOAPIC pin n. PCs wire the PIT (ISA IRQ 0) to IOAPIC pin
//! 2, and Vanguard's MADT says so with an interrupt source override (IRQ 0 -> GSI 2), so GSI 0
//! must also reach pin 2 for the table to be true.

use crate::error::VmmError;
use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip,
    KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQ_ROUTING_IRQCHIP,
};
use kvm_ioctls::VmFd;

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

/// Installs [`legacy_routes`].
pub fn set_legacy_routing(vm: &VmFd) -> Result<(), VmmError> {
    let routes = legacy_routes();
    let table = KvmIrqRouting::from_entries(&routes)
        .map_err(|_| VmmError::MissingCapability("an IRQ routing table of 24 pins"))?;
    vm.set_gsi_routing(&table).map_err(|source| VmmError::Kvm { what: "set GSI routing", source })
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
