//! The virtio-pci transport, modern (virtio 1.2, section 4.1): a PCI function with vendor
//! 0x1af4 and device 0x1040 + the virtio type, whose registers live in one 64-bit memory BAR
//! that vendor capabilities describe:
//!
//! | BAR 0 offset | region                                   |
//! |--------------|------------------------------------------|
//! | 0x0000       | common configuration (0x3c bytes)        |
//! | 0x1000       | ISR status (1 byte, read clears)         |
//! | 0x2000       | device-specific configuration            |
//! | 0x3000       | notifications, 4 bytes per queue         |
//! | 0x4000       | MSI-X table (one vector per queue + 1)   |
//! | 0x6000       | MSI-X pending bits                       |
//!
//! Interrupts are MSI-X only: each vector is an irqfd whose GSI route carries the message the
//! guest programmed. With MSI-X disabled the ISR register still reports why (a polling driver
//! works), but no INTx line is wired (interrupt pin 0), as on Firecracker and Cloud
//! Hypervisor. Notifications are ioeventfds on each queue's own address (any write width),
//! re-registered if the guest moves the BAR.

// Registers are cut out of wider values (a u64 written as two dwords, a 16-bit vector out of
// a decoded write): those truncations are the register semantics.
#![allow(clippy::cast_possible_truncation)]

use crate::transport::{Interrupt, NotifyRegistrar, VirtioCore};
use crate::VirtioDevice;
use pci::config::{self, BarKind, ConfigSpace, Header};
use pci::msix::{self, Msix};
use pci::{PciDevice, VIRTIO_VENDOR_ID};
use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::Arc;
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;

/// Size of BAR 0.
pub const BAR_SIZE: u64 = 0x8000;
const COMMON: u64 = 0x0000;
/// The common configuration as of virtio 1.2 (0x38 bytes) plus the two later u16 fields
/// (queue_notif_config_data, queue_reset), which read as zero: no feature enables them.
const COMMON_LEN: u64 = 0x3c;
const ISR: u64 = 0x1000;
const DEVICE_CONFIG: u64 = 0x2000;
const DEVICE_CONFIG_LEN: u64 = 0x1000;
const NOTIFY: u64 = 0x3000;
/// Bytes between consecutive queues' notification addresses.
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x6000;
/// "No vector": the queue or configuration change raises no MSI-X message.
pub const NO_VECTOR: u16 = 0xffff;
/// Most queues a device may have here (the notification region and MSI-X table sizes).
pub const MAX_QUEUES: usize = 64;

/// Vendor capability `cfg_type`s (4.1.4).
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_PCI_CFG: u8 = 5;
const CAP_VENDOR: u8 = 0x09;

/// ISR bits.
const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

/// Errors building a device.
#[derive(Debug, thiserror::Error)]
pub enum PciTransportError {
    /// A device with more queues than the transport lays out.
    #[error("virtio device type {0} has more than {MAX_QUEUES} queues")]
    TooManyQueues(u32),
    /// The MSI-X table has fewer vectors than queues + 1.
    #[error("{given} MSI-X vectors for {queues} queues (one per queue plus one are needed)")]
    Vectors {
        /// Vectors given.
        given: usize,
        /// Queues.
        queues: usize,
    },
    /// The configuration space could not be built.
    #[error("PCI configuration space: {0}")]
    Config(#[from] pci::config::ConfigError),
}

/// Where interrupts go: MSI-X vectors when enabled, else only the ISR bits.
struct PciInterrupt {
    msix: Arc<Msix>,
    isr: AtomicU8,
    config_vector: AtomicU16,
    queue_vectors: Vec<AtomicU16>,
}

impl Interrupt for PciInterrupt {
    fn queue(&self, index: u16) {
        let vector = self
            .queue_vectors
            .get(usize::from(index))
            .map_or(NO_VECTOR, |v| v.load(Ordering::Acquire));
        // One lock of the MSI-X state on the usual path: `trigger` answers false only when
        // MSI-X is off (vectors are checked when the driver assigns them).
        if vector != NO_VECTOR && self.msix.trigger(vector) {
            return;
        }
        if !self.msix.enabled() {
            self.isr.fetch_or(ISR_QUEUE, Ordering::AcqRel);
        }
    }

    fn config(&self) {
        self.isr.fetch_or(ISR_CONFIG, Ordering::AcqRel);
        let vector = self.config_vector.load(Ordering::Acquire);
        if vector != NO_VECTOR {
            self.msix.trigger(vector);
        }
    }
}

/// A virtio device as a PCI function.
pub struct VirtioPci {
    core: VirtioCore,
    config: ConfigSpace,
    interrupt: Arc<PciInterrupt>,
    msix_cap: usize,
    pci_cfg_cap: usize,
    registrar: Option<Arc<dyn NotifyRegistrar>>,
    /// Where BAR 0 was when the notifiers were last registered.
    bar_address: u64,
}

fn class_of(device_type: u32) -> (u8, u8, u8) {
    match device_type {
        1 => (0x02, 0x00, 0x00), // network controller, Ethernet
        2 => (0x01, 0x80, 0x00), // mass storage, other
        _ => (0xff, 0x00, 0x00), // unassigned class
    }
}

/// A vendor capability body (after ID and next): cap_len, cfg_type, bar, id, padding,
/// offset, length, and any `extra` bytes.
fn vendor_cap(cfg_type: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    let mut body = vec![(16 + extra.len()) as u8, cfg_type, 0, 0, 0, 0];
    body.extend_from_slice(&(offset as u32).to_le_bytes());
    body.extend_from_slice(&(length as u32).to_le_bytes());
    body.extend_from_slice(extra);
    body
}

impl VirtioPci {
    /// Wraps `device` with BAR 0 at `bar_address` and `msix` (at least one vector per queue
    /// plus one for configuration changes).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        msix: Arc<Msix>,
        bar_address: u64,
    ) -> Result<Self, PciTransportError> {
        let device_type = device.device_type();
        let queues = device.queue_max_sizes().len();
        if queues > MAX_QUEUES {
            return Err(PciTransportError::TooManyQueues(device_type));
        }
        if msix.len() < queues + 1 {
            return Err(PciTransportError::Vectors { given: msix.len(), queues });
        }
        let mut config = ConfigSpace::new(Header {
            vendor: VIRTIO_VENDOR_ID,
            device: 0x1040 + (device_type & 0xff) as u16,
            revision: 1,
            class: class_of(device_type),
            subsystem_vendor: VIRTIO_VENDOR_ID,
            subsystem: 0x40,
        });
        config.add_bar(0, BAR_SIZE, BarKind::Memory64, bar_address)?;
        config.add_capability(CAP_VENDOR, &vendor_cap(CAP_COMMON, COMMON, COMMON_LEN, &[]), &[])?;
        let notify_len = (queues.max(1) as u64) * u64::from(NOTIFY_MULTIPLIER);
        config.add_capability(
            CAP_VENDOR,
            &vendor_cap(CAP_NOTIFY, NOTIFY, notify_len, &NOTIFY_MULTIPLIER.to_le_bytes()),
            &[],
        )?;
        config.add_capability(CAP_VENDOR, &vendor_cap(CAP_ISR, ISR, 1, &[]), &[])?;
        config.add_capability(
            CAP_VENDOR,
            &vendor_cap(CAP_DEVICE, DEVICE_CONFIG, DEVICE_CONFIG_LEN, &[]),
            &[],
        )?;
        // The PCI configuration access capability: bar, offset and length are the driver's
        // to set; pci_cfg_data is a window onto BAR 0 handled in write_config/read_config.
        let mut writable = vec![0u8; 18];
        writable[2] = 0xff; // bar
        writable[6..14].fill(0xff); // offset, length
        let pci_cfg_cap = config.add_capability(
            CAP_VENDOR,
            &vendor_cap(CAP_PCI_CFG, 0, 0, &[0; 4]),
            &writable,
        )?;
        let (body, mask) = msix.capability(0, MSIX_TABLE as u32, MSIX_PBA as u32);
        let msix_cap = config.add_capability(msix::CAPABILITY_ID, &body, &mask)?;
        let interrupt = Arc::new(PciInterrupt {
            msix,
            isr: AtomicU8::new(0),
            config_vector: AtomicU16::new(NO_VECTOR),
            queue_vectors: (0..queues).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
        });
        Ok(Self {
            core: VirtioCore::new(device, mem, interrupt.clone()),
            config,
            interrupt,
            msix_cap,
            pci_cfg_cap,
            registrar: None,
            bar_address,
        })
    }

    /// Serves notifications through eventfds `registrar` attaches to each queue's
    /// notification address.
    pub fn with_notifier(mut self, registrar: Arc<dyn NotifyRegistrar>) -> Self {
        self.registrar = Some(registrar);
        self.register_notifiers();
        self
    }

    fn register_notifiers(&mut self) {
        let Some(registrar) = self.registrar.clone() else { return };
        let Some((base, _)) = self.config.bar(0) else { return };
        self.bar_address = base;
        let addresses = (0..self.core.queue_count() as u64)
            .map(|q| (base + NOTIFY + q * u64::from(NOTIFY_MULTIPLIER), None))
            .collect();
        self.core.set_notifier(registrar, addresses);
    }

    /// The driver-visible device status.
    pub fn status(&self) -> u32 {
        self.core.status()
    }

    fn valid_vector(&self, vector: u16) -> u16 {
        if usize::from(vector) < self.interrupt.msix.len() {
            vector
        } else {
            NO_VECTOR
        }
    }

    fn selected_vector(&self) -> Option<&AtomicU16> {
        self.interrupt.queue_vectors.get(usize::try_from(self.core.queue_select).ok()?)
    }

    fn read_common(&mut self, offset: u64, data: &mut [u8]) {
        let c = &mut self.core;
        let queue = |c: &mut VirtioCore, f: fn(&virtio_queue::Queue) -> u64| {
            c.with_selected_queue(|q| f(q)).unwrap_or(0)
        };
        let value: u64 = match (offset, data.len()) {
            (0x00, 4) => u64::from(c.device_features_select),
            (0x04, 4) => u64::from(c.device_features()),
            (0x08, 4) => u64::from(c.driver_features_select),
            (0x0c, 4) => u64::from(c.driver_features()),
            (0x10, 2) => u64::from(self.interrupt.config_vector.load(Ordering::Acquire)),
            (0x12, 2) => c.queue_count() as u64,
            (0x14, 1) => u64::from(c.status() & 0xff),
            (0x15, 1) => u64::from(c.config_generation() & 0xff),
            (0x16, 2) => u64::from(c.queue_select),
            (0x18, 2) => queue(c, |q| u64::from(q.size())),
            (0x1a, 2) => {
                u64::from(self.selected_vector().map_or(NO_VECTOR, |v| v.load(Ordering::Acquire)))
            }
            (0x1c, 2) => queue(c, |q| u64::from(q.ready())),
            // Each queue notifies at its own index times the multiplier.
            (0x1e, 2) => u64::from(c.queue_select),
            (0x20 | 0x24, 4) | (0x20, 8) => queue(c, |q| q.desc_table()),
            (0x28 | 0x2c, 4) | (0x28, 8) => queue(c, |q| q.avail_ring()),
            (0x30 | 0x34, 4) | (0x30, 8) => queue(c, |q| q.used_ring()),
            _ => return data.fill(0),
        };
        // The high half of a 64-bit address read as a dword.
        let value = if matches!(offset, 0x24 | 0x2c | 0x34) { value >> 32 } else { value };
        data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let mut raw = [0u8; 8];
        raw[..data.len().min(8)].copy_from_slice(&data[..data.len().min(8)]);
        let value = u64::from_le_bytes(raw);
        let c = &mut self.core;
        match (offset, data.len()) {
            (0x00, 4) => c.device_features_select = value as u32,
            (0x08, 4) => c.driver_features_select = value as u32,
            (0x0c, 4) => c.set_driver_features(value as u32),
            (0x10, 2) => {
                let v = self.valid_vector(value as u16);
                self.interrupt.config_vector.store(v, Ordering::Release);
            }
            (0x14, 1) => {
                if value == 0 {
                    self.reset_transport();
                }
                self.core.set_status(value as u32);
            }
            (0x16, 2) => c.queue_select = value as u32,
            (0x18, 2) => c.set_queue_size(value as u32),
            (0x1a, 2) => {
                let v = self.valid_vector(value as u16);
                if let Some(slot) = self.selected_vector() {
                    slot.store(v, Ordering::Release);
                }
            }
            // Writing 0 to queue_enable is not allowed (4.1.4.3.2); only 1 counts.
            (0x1c, 2) if value == 1 => c.set_queue_ready(true),
            (0x20 | 0x28 | 0x30, 8) => {
                let which = ((offset - 0x20) / 8) as u8;
                c.set_queue_address(which, Some(value as u32), Some((value >> 32) as u32));
            }
            (0x20..=0x37, 4) if offset.is_multiple_of(4) => {
                let which = ((offset - 0x20) / 8) as u8;
                let (low, high) = if offset.is_multiple_of(8) {
                    (Some(value as u32), None)
                } else {
                    (None, Some(value as u32))
                };
                c.set_queue_address(which, low, high);
            }
            _ => {}
        }
    }

    /// A reset (status 0) also forgets the vectors and the ISR.
    fn reset_transport(&mut self) {
        self.interrupt.isr.store(0, Ordering::Release);
        self.interrupt.config_vector.store(NO_VECTOR, Ordering::Release);
        for v in &self.interrupt.queue_vectors {
            v.store(NO_VECTOR, Ordering::Release);
        }
    }

    /// Accesses through the PCI configuration access capability's data window.
    fn pci_cfg_window(&self) -> Option<(u64, usize)> {
        let cap = self.pci_cfg_cap;
        let bar = self.config.u32_at(cap + 4) & 0xff;
        let offset = u64::from(self.config.u32_at(cap + 8));
        let length = self.config.u32_at(cap + 12) as usize;
        (bar == 0 && matches!(length, 1 | 2 | 4) && offset.checked_add(length as u64)? <= BAR_SIZE)
            .then_some((offset, length))
    }
}

impl crate::state::TransportState for VirtioPci {
    fn device_type(&self) -> u32 {
        self.core.device_type()
    }

    fn external(&mut self) -> bool {
        self.core.external()
    }

    fn quiesce(&mut self) {
        self.core.quiesce();
    }

    fn resume(&mut self) {
        self.core.resume();
    }

    fn save(&mut self) -> Result<Vec<u8>, String> {
        let mut e = snapshot::Encoder::new();
        self.core.save(&mut e);
        let i = &self.interrupt;
        e.u8(i.isr.load(Ordering::Acquire)).u16(i.config_vector.load(Ordering::Acquire));
        e.u32(u32::try_from(i.queue_vectors.len()).unwrap_or(0));
        for v in &i.queue_vectors {
            e.u16(v.load(Ordering::Acquire));
        }
        let table = i.msix.save();
        e.u32(u32::try_from(table.len()).unwrap_or(0));
        for (address, data, control, pending) in table {
            e.u64(address).u32(data).u32(control).u8(u8::from(pending));
        }
        Ok(e.0)
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), String> {
        let mut d = snapshot::Decoder::new("virtio", state);
        let err = |e: snapshot::SnapshotError| e.to_string();
        // The notifiers go where the restored BAR 0 is before the worker can start.
        self.register_notifiers();
        self.core.restore(&mut d)?;
        let isr = d.u8("ISR").map_err(err)?;
        let config_vector = d.u16("configuration vector").map_err(err)?;
        let n = d.count(2, "queue vectors").map_err(err)?;
        if n != self.interrupt.queue_vectors.len() {
            return Err(format!(
                "the snapshot has {n} queue vectors, this function {}",
                self.interrupt.queue_vectors.len()
            ));
        }
        let mut vectors = Vec::with_capacity(n);
        for _ in 0..n {
            vectors.push(self.valid_vector(d.u16("queue vector").map_err(err)?));
        }
        let n = d.count(17, "MSI-X vectors").map_err(err)?;
        let mut table = Vec::with_capacity(n);
        for _ in 0..n {
            table.push((
                d.u64("MSI-X address").map_err(err)?,
                d.u32("MSI-X data").map_err(err)?,
                d.u32("MSI-X vector control").map_err(err)?,
                d.u8("MSI-X pending bit").map_err(err)? != 0,
            ));
        }
        d.finish().map_err(err)?;
        let i = &self.interrupt;
        i.isr.store(isr, Ordering::Release);
        i.config_vector.store(self.valid_vector(config_vector), Ordering::Release);
        for (slot, v) in i.queue_vectors.iter().zip(vectors) {
            slot.store(v, Ordering::Release);
        }
        i.msix.restore(&table, self.config.u16_at(self.msix_cap + 2))
    }

    fn handover_fd(&self) -> Option<std::os::fd::RawFd> {
        self.core.handover_fd()
    }

    fn set_dirty_log(&mut self, dirty: Arc<crate::state::DirtyPages>) {
        self.core.set_dirty_log(dirty);
    }
}

impl PciDevice for VirtioPci {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }

    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        let window = self.pci_cfg_cap + 16;
        if offset == window && data.len() == 4 {
            let mut value = [0u8; 4];
            if let Some((bar_offset, length)) = self.pci_cfg_window() {
                self.read_bar(0, bar_offset, &mut value[..length]);
            }
            return data.copy_from_slice(&value);
        }
        self.config.read(offset, data);
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        let window = self.pci_cfg_cap + 16;
        if offset == window && data.len() == 4 {
            if let Some((bar_offset, length)) = self.pci_cfg_window() {
                let bytes = data[..length].to_vec();
                self.write_bar(0, bar_offset, &bytes);
            }
            return;
        }
        self.config.write(offset, data);
        let control = self.msix_cap + 2;
        if (control..control + 2).contains(&offset)
            || (offset..offset + data.len()).contains(&control)
        {
            self.interrupt.msix.set_control(self.config.u16_at(control));
        }
        let bar_registers = config::BAR0..config::BAR0 + 8;
        if bar_registers.contains(&offset) {
            if let Some((base, _)) = self.config.bar(0) {
                if base != self.bar_address {
                    self.register_notifiers();
                }
            }
        }
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if bar != 0 {
            return data.fill(0xff);
        }
        let len = data.len() as u64;
        match offset {
            o if o < COMMON + COMMON_LEN => self.read_common(o - COMMON, data),
            ISR if len == 1 => data[0] = self.interrupt.isr.swap(0, Ordering::AcqRel),
            o if (DEVICE_CONFIG..DEVICE_CONFIG + DEVICE_CONFIG_LEN).contains(&o) => {
                self.core.read_config(o - DEVICE_CONFIG, data)
            }
            o if (MSIX_TABLE..MSIX_TABLE + self.interrupt.msix.table_size()).contains(&o) => {
                self.interrupt.msix.read_table(o - MSIX_TABLE, data)
            }
            o if (MSIX_PBA..MSIX_PBA + self.interrupt.msix.pba_size()).contains(&o) => {
                self.interrupt.msix.read_pba(o - MSIX_PBA, data)
            }
            _ => data.fill(0),
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != 0 {
            return;
        }
        let queues = self.core.queue_count() as u64 * u64::from(NOTIFY_MULTIPLIER);
        match offset {
            o if o < COMMON + COMMON_LEN => self.write_common(o - COMMON, data),
            o if (DEVICE_CONFIG..DEVICE_CONFIG + DEVICE_CONFIG_LEN).contains(&o) => {
                self.core.write_config(o - DEVICE_CONFIG, data)
            }
            // A notification that did not go through an eventfd (none registered).
            o if (NOTIFY..NOTIFY + queues).contains(&o) => {
                let queue = (o - NOTIFY) / u64::from(NOTIFY_MULTIPLIER);
                self.core.notify(queue as u32);
            }
            o if (MSIX_TABLE..MSIX_TABLE + self.interrupt.msix.table_size()).contains(&o) => {
                self.interrupt.msix.write_table(o - MSIX_TABLE, data)
            }
            _ => {}
        }
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use devices::BusDevice;
    use pci::msix::{MsiMessage, MsiRouter, Vector};
    use pci::root::{BarWindow, ConfigMmio, PciRoot};
    use std::sync::Mutex;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    const BAR: u64 = 0xc000_8000;
    const WINDOW: u64 = 0xc000_0000;

    #[derive(Default)]
    struct Routes(Mutex<Vec<(u32, Option<MsiMessage>)>>);
    impl MsiRouter for Routes {
        fn set_route(&self, gsi: u32, message: Option<MsiMessage>) -> std::io::Result<()> {
            self.0.lock().unwrap().push((gsi, message));
            Ok(())
        }
    }

    #[derive(Default)]
    struct Registrar {
        registered: Mutex<Vec<(u64, Option<u32>)>>,
        unregistered: Mutex<Vec<u64>>,
    }
    impl NotifyRegistrar for Registrar {
        fn register(&self, a: u64, d: Option<u32>, _: &EventFd) -> std::io::Result<()> {
            self.registered.lock().unwrap().push((a, d));
            Ok(())
        }
        fn unregister(&self, a: u64, _: Option<u32>, _: &EventFd) -> std::io::Result<()> {
            self.unregistered.lock().unwrap().push(a);
            Ok(())
        }
    }

    /// A driver on the other side of ECAM and the BAR window.
    struct Driver {
        ecam: ConfigMmio,
        window: BarWindow,
        mem: GuestMemoryMmap,
        msix: Arc<Msix>,
        /// Clones of the vectors' irqfds: what KVM would see.
        irqfds: Vec<EventFd>,
    }

    fn driver_with(registrar: Option<Arc<Registrar>>) -> Driver {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
        let irqfds: Vec<EventFd> =
            (0..2).map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap()).collect();
        let vectors = irqfds
            .iter()
            .zip(24..)
            .map(|(fd, gsi)| Vector { gsi, irqfd: fd.try_clone().unwrap() })
            .collect();
        let msix = Arc::new(Msix::new(vectors, Arc::new(Routes::default())));
        let mut dev =
            VirtioPci::new(Box::new(Rng::default()), mem.clone(), msix.clone(), BAR).unwrap();
        if let Some(r) = registrar {
            dev = dev.with_notifier(r);
        }
        let mut root = PciRoot::new();
        assert_eq!(root.add(Arc::new(Mutex::new(dev))), Ok(1));
        let root = Arc::new(root);
        Driver {
            ecam: ConfigMmio(root.clone()),
            window: BarWindow::new(root, WINDOW),
            mem,
            msix,
            irqfds,
        }
    }

    impl Driver {
        fn cfg32(&mut self, reg: u64) -> u32 {
            let mut b = [0; 4];
            self.ecam.read((1 << 15) | reg, &mut b);
            u32::from_le_bytes(b)
        }
        fn cfg_w(&mut self, reg: u64, data: &[u8]) {
            self.ecam.write((1 << 15) | reg, data);
        }
        fn bar_r(&mut self, offset: u64, len: usize) -> u64 {
            let mut b = [0u8; 8];
            self.window.read(BAR - WINDOW + offset, &mut b[..len]);
            u64::from_le_bytes(b)
        }
        fn bar_w(&mut self, offset: u64, value: u64, len: usize) {
            self.window.write(BAR - WINDOW + offset, &value.to_le_bytes()[..len]);
        }
        /// Walks the capability list: (id, cfg_type for vendor caps, offset).
        fn caps(&mut self) -> Vec<(u8, u8, u64)> {
            let mut out = Vec::new();
            let mut at = u64::from(self.cfg32(0x34) & 0xff);
            while at != 0 && out.len() < 16 {
                let head = self.cfg32(at);
                out.push((head as u8, (head >> 24) as u8, at));
                at = u64::from((head >> 8) & 0xff);
            }
            out
        }
        fn bring_up(&mut self, size: u16) -> u8 {
            self.cfg_w(4, &6u16.to_le_bytes());
            self.bar_w(0x14, 0, 1);
            self.mem.write_slice(&[0u8; 0x3000], GuestAddress(0x1000)).unwrap();
            self.bar_w(0x14, 1, 1);
            self.bar_w(0x14, 3, 1);
            self.bar_w(0x08, 1, 4);
            self.bar_w(0x0c, 1, 4);
            self.bar_w(0x14, 0xb, 1);
            if self.bar_r(0x14, 1) & 8 == 0 {
                return self.bar_r(0x14, 1) as u8;
            }
            self.bar_w(0x16, 0, 2);
            self.bar_w(0x18, u64::from(size), 2);
            self.bar_w(0x20, 0x1000, 8);
            self.bar_w(0x28, 0x2000, 4);
            self.bar_w(0x2c, 0, 4);
            self.bar_w(0x30, 0x3000, 8);
            self.bar_w(0x1c, 1, 2);
            self.bar_w(0x14, 0xf, 1);
            self.bar_r(0x14, 1) as u8
        }
        fn request(&mut self, len: u32) {
            let desc = [
                0x10_0000u64.to_le_bytes().as_slice(),
                &len.to_le_bytes(),
                &2u16.to_le_bytes(),
                &0u16.to_le_bytes(),
            ]
            .concat();
            self.mem.write_slice(&desc, GuestAddress(0x1000)).unwrap();
            let idx: u16 = self.mem.read_obj(GuestAddress(0x2002)).unwrap();
            self.mem.write_obj(0u16, GuestAddress(0x2004 + 2 * u64::from(idx % 8))).unwrap();
            self.mem.write_obj(idx.wrapping_add(1), GuestAddress(0x2002)).unwrap();
            self.bar_w(NOTIFY, 0, 2);
        }
        fn used_idx(&self) -> u16 {
            self.mem.read_obj(GuestAddress(0x3002)).unwrap()
        }
    }

    #[test]
    fn identity_bar_and_capabilities_describe_a_modern_virtio_device() {
        let mut d = driver_with(None);
        assert_eq!(d.cfg32(0), 0x1044_1af4, "vendor 0x1af4, device 0x1040 + 4 (entropy)");
        assert_eq!(d.cfg32(8) & 0xff, 1, "revision 1: modern");
        assert_eq!(d.cfg32(0x2c) >> 16, 0x40);
        assert_eq!(d.cfg32(0x10), (BAR as u32) | 0b100, "64-bit memory BAR");
        assert_eq!(d.cfg32(0x3c) >> 8 & 0xff, 0, "no INTx pin");
        let caps = d.caps();
        let vendor: Vec<u8> = caps.iter().filter(|c| c.0 == 9).map(|c| c.1).collect();
        assert_eq!(vendor, vec![CAP_COMMON, CAP_NOTIFY, CAP_ISR, CAP_DEVICE, CAP_PCI_CFG]);
        let notify = caps.iter().find(|c| c.0 == 9 && c.1 == CAP_NOTIFY).unwrap().2;
        assert_eq!(d.cfg32(notify + 8), NOTIFY as u32);
        assert_eq!(d.cfg32(notify + 16), NOTIFY_MULTIPLIER);
        let msix_at = caps.iter().find(|c| c.0 == 0x11).unwrap().2;
        assert_eq!(d.cfg32(msix_at) >> 16 & 0x7ff, 1, "two vectors");
        assert_eq!(d.cfg32(msix_at + 4), MSIX_TABLE as u32);
        assert_eq!(d.cfg32(msix_at + 8), MSIX_PBA as u32);
        // Memory decoding is off until the driver turns it on.
        assert_eq!(d.bar_r(0x12, 2), 0xffff);
        d.cfg_w(4, &2u16.to_le_bytes());
        assert_eq!(d.bar_r(0x12, 2), 1, "num_queues");
        assert_eq!(d.bar_r(0x18, 2), 256, "queue 0 size defaults to its maximum");
    }

    #[test]
    fn request_round_trip_with_isr_then_msix() {
        let mut d = driver_with(None);
        assert_eq!(d.bring_up(8), 0xf);
        d.request(16);
        assert_eq!(d.used_idx(), 1);
        assert_eq!(d.bar_r(ISR, 1), u64::from(ISR_QUEUE), "MSI-X off: the ISR says why");
        assert_eq!(d.bar_r(ISR, 1), 0, "and reading clears it");
        // Now with MSI-X: vector 1 for queue 0.
        let msix_at = d.caps().iter().find(|c| c.0 == 0x11).unwrap().2;
        d.cfg_w(msix_at + 2, &0x8000u16.to_le_bytes());
        d.bar_w(MSIX_TABLE + 16, 0xfee0_0000, 4);
        d.bar_w(MSIX_TABLE + 16 + 8, 0x41, 4);
        d.bar_w(MSIX_TABLE + 16 + 12, 0, 4);
        d.bar_w(0x16, 0, 2);
        d.bar_w(0x1a, 1, 2);
        assert_eq!(d.bar_r(0x1a, 2), 1);
        d.bar_w(0x1a, 7, 2);
        assert_eq!(d.bar_r(0x1a, 2), u64::from(NO_VECTOR), "a vector past the table is refused");
        d.bar_w(0x1a, 1, 2);
        d.request(16);
        assert_eq!(d.used_idx(), 2);
        assert_eq!(d.bar_r(ISR, 1), 0, "MSI-X on: no ISR bit for queues");
        assert_eq!(d.irqfds[1].read().ok(), Some(1), "vector 1's irqfd was signalled once");
        assert!(d.irqfds[0].read().is_err(), "vector 0 was not");
        assert!(d.msix.enabled());
        // Masked: the next completion waits in the PBA.
        d.bar_w(MSIX_TABLE + 16 + 12, 1, 4);
        d.request(16);
        assert_eq!(d.bar_r(MSIX_PBA, 8) & 2, 2);
        assert!(d.irqfds[1].read().is_err(), "held back while masked");
        d.bar_w(MSIX_TABLE + 16 + 12, 0, 4);
        assert_eq!(d.irqfds[1].read().ok(), Some(1), "delivered on unmask");
    }

    #[test]
    fn hostile_common_config_writes() {
        let mut d = driver_with(None);
        d.cfg_w(4, &2u16.to_le_bytes());
        // Legacy driver (no VERSION_1): FEATURES_OK refused.
        d.bar_w(0x14, 3, 1);
        d.bar_w(0x14, 0xb, 1);
        assert_eq!(d.bar_r(0x14, 1) & 8, 0);
        d.bar_w(0x14, 0, 1);
        // Bad queue size: DRIVER_OK turns into NEEDS_RESET.
        assert_eq!(d.bring_up(7) & 0x44, 0x40);
        d.request(8);
        assert_eq!(d.used_idx(), 0, "a broken device serves nothing");
        assert_eq!(d.bring_up(8), 0xf, "reset recovers it");
        // Odd widths, unknown offsets, a queue that does not exist.
        d.bar_w(0x14, 0, 4);
        d.bar_w(0x15, 0xff, 1);
        d.bar_w(0x16, 9, 2);
        assert_eq!(d.bar_r(0x18, 2), 0, "no queue 9");
        d.bar_w(0x18, 8, 2);
        d.bar_w(0x20, u64::MAX, 8);
        d.bar_w(NOTIFY + 4 * 9, 0, 2);
        d.bar_w(0x7ffe, 0, 2);
        assert_eq!(d.bar_r(0x14, 1), 0xf, "still running");
        assert_eq!(d.bar_r(0x37, 1), 0);
        // A ring outside guest memory is refused at DRIVER_OK.
        d.bar_w(0x14, 0, 1);
        d.bar_w(0x14, 0xb, 1);
        d.bar_w(0x08, 1, 4);
        d.bar_w(0x0c, 1, 4);
        d.bar_w(0x14, 0xb, 1);
        d.bar_w(0x16, 0, 2);
        d.bar_w(0x20, 0x10_0000_0000, 8);
        d.bar_w(0x1c, 1, 2);
        d.bar_w(0x14, 0xf, 1);
        assert_eq!(d.bar_r(0x14, 1) & 0x40, 0x40);
    }

    #[test]
    fn moving_the_bar_moves_the_notifiers() {
        let registrar = Arc::new(Registrar::default());
        let mut d = driver_with(Some(registrar.clone()));
        assert_eq!(d.bring_up(8), 0xf);
        assert_eq!(*registrar.registered.lock().unwrap(), vec![(BAR + NOTIFY, None)]);
        d.cfg_w(0x10, &0xc001_0000u32.to_le_bytes());
        assert_eq!(*registrar.unregistered.lock().unwrap(), vec![BAR + NOTIFY]);
        assert_eq!(registrar.registered.lock().unwrap().last(), Some(&(0xc001_3000, None)));
    }

    #[test]
    fn pci_cfg_capability_reaches_the_bar() {
        let mut d = driver_with(None);
        let at = d.caps().iter().find(|c| c.0 == 9 && c.1 == CAP_PCI_CFG).unwrap().2;
        d.cfg_w(at + 4, &[0]);
        d.cfg_w(at + 8, &0x12u32.to_le_bytes());
        d.cfg_w(at + 12, &2u32.to_le_bytes());
        assert_eq!(d.cfg32(at + 16), 1, "num_queues through the window");
        d.cfg_w(at + 8, &(BAR_SIZE as u32).to_le_bytes());
        assert_eq!(d.cfg32(at + 16), 0, "a window past the BAR reads nothing");
    }
}
