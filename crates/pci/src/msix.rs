//! MSI-X (PCI 3.0, 6.8.2): a table of message address/data pairs with a mask bit each, and a
//! pending-bit array. A vector is delivered by signalling its eventfd, which the VMM has
//! registered with KVM as an irqfd on the vector's GSI; the GSI's route carries the message
//! the guest programmed, set through [`MsiRouter`] whenever an entry is unmasked or changed
//! while unmasked. A vector that fires while masked is remembered in the PBA and delivered
//! when the guest unmasks it.

use devices::bus::lock;
use std::sync::{Arc, Mutex};
use vmm_sys_util::eventfd::EventFd;

/// Capability ID of MSI-X.
pub const CAPABILITY_ID: u8 = 0x11;
/// Bytes per table entry.
pub const ENTRY_SIZE: u64 = 16;
/// Message control: MSI-X enabled.
const CONTROL_ENABLE: u16 = 1 << 15;
/// Message control: every vector masked.
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// Vector control: this vector masked.
const VECTOR_MASKED: u32 = 1;
/// Largest table the capability can describe.
pub const MAX_VECTORS: usize = 2048;

/// An MSI message: where the interrupt is written and what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiMessage {
    /// Message address (0xFEExxxxx on x86: the destination APIC).
    pub address: u64,
    /// Message data (vector and delivery mode on x86).
    pub data: u32,
}

/// Points a GSI at an MSI message (the VMM's KVM GSI routing table).
pub trait MsiRouter: Send + Sync {
    /// Routes `gsi` to `message`, or removes its route when `None`.
    fn set_route(&self, gsi: u32, message: Option<MsiMessage>) -> std::io::Result<()>;
}

/// What backs one vector: its GSI and the irqfd registered on it.
pub struct Vector {
    /// The GSI whose route carries this vector's message.
    pub gsi: u32,
    /// Signalled to deliver the vector.
    pub irqfd: EventFd,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    address: u64,
    data: u32,
    control: u32,
}

const RESET_ENTRY: Entry = Entry { address: 0, data: 0, control: VECTOR_MASKED };

struct State {
    entries: Vec<Entry>,
    pending: Vec<bool>,
    /// The message each GSI is routed to now.
    routed: Vec<Option<MsiMessage>>,
    enabled: bool,
    function_masked: bool,
}

/// An MSI-X table, its pending bits and the vectors behind them.
pub struct Msix {
    state: Mutex<State>,
    vectors: Vec<Vector>,
    router: Arc<dyn MsiRouter>,
}

impl Msix {
    /// A table of `vectors.len()` entries (1..=2048), all masked, MSI-X disabled.
    pub fn new(vectors: Vec<Vector>, router: Arc<dyn MsiRouter>) -> Self {
        let n = vectors.len().clamp(1, MAX_VECTORS);
        Self {
            state: Mutex::new(State {
                entries: vec![RESET_ENTRY; n],
                pending: vec![false; n],
                routed: vec![None; n],
                enabled: false,
                function_masked: false,
            }),
            vectors,
            router,
        }
    }

    /// Number of vectors.
    pub fn len(&self) -> usize {
        lock(&self.state).entries.len()
    }

    /// Whether the table is empty (never: at least one vector).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Size in bytes of the table in its BAR.
    pub fn table_size(&self) -> u64 {
        self.len() as u64 * ENTRY_SIZE
    }

    /// Size in bytes of the pending-bit array (whole qwords).
    pub fn pba_size(&self) -> u64 {
        self.len().div_ceil(64) as u64 * 8
    }

    /// The capability body (after ID and next pointer) for a table at `table_offset` and a PBA
    /// at `pba_offset` in BAR `bar`, and its write mask (only the enable and function-mask
    /// bits of message control are writable).
    pub fn capability(&self, bar: u8, table_offset: u32, pba_offset: u32) -> (Vec<u8>, Vec<u8>) {
        let size_field = u16::try_from(self.len() - 1).unwrap_or(0x7ff);
        let mut body = Vec::with_capacity(10);
        body.extend_from_slice(&size_field.to_le_bytes());
        body.extend_from_slice(&((table_offset & !7) | u32::from(bar & 7)).to_le_bytes());
        body.extend_from_slice(&((pba_offset & !7) | u32::from(bar & 7)).to_le_bytes());
        let mut mask = vec![0; body.len()];
        mask[1] = ((CONTROL_ENABLE | CONTROL_FUNCTION_MASK) >> 8) as u8;
        (body, mask)
    }

    /// Whether MSI-X is enabled (then devices signal vectors, not INTx).
    pub fn enabled(&self) -> bool {
        lock(&self.state).enabled
    }

    /// The guest wrote message control.
    pub fn set_control(&self, control: u16) {
        let mut state = lock(&self.state);
        state.enabled = control & CONTROL_ENABLE != 0;
        state.function_masked = control & CONTROL_FUNCTION_MASK != 0;
        for v in 0..state.entries.len() {
            self.refresh(&mut state, v);
        }
    }

    /// Routes vector `v` if it is deliverable and delivers it if it was pending.
    fn refresh(&self, state: &mut State, v: usize) {
        let entry = state.entries[v];
        let deliverable =
            state.enabled && !state.function_masked && entry.control & VECTOR_MASKED == 0;
        if !deliverable {
            return;
        }
        let message = MsiMessage { address: entry.address, data: entry.data };
        let Some(vector) = self.vectors.get(v) else { return };
        if state.routed[v] != Some(message)
            && self.router.set_route(vector.gsi, Some(message)).is_ok()
        {
            state.routed[v] = Some(message);
        }
        if std::mem::take(&mut state.pending[v]) {
            let _ = vector.irqfd.write(1);
        }
    }

    /// Signals `vector`: delivered now, or left pending while masked. Returns false when
    /// MSI-X is disabled or the vector does not exist (the caller falls back to INTx/ISR).
    pub fn trigger(&self, vector: u16) -> bool {
        let v = usize::from(vector);
        let mut state = lock(&self.state);
        if !state.enabled || v >= state.entries.len() {
            return false;
        }
        if state.function_masked || state.entries[v].control & VECTOR_MASKED != 0 {
            state.pending[v] = true;
            return true;
        }
        if let Some(vector) = self.vectors.get(v) {
            let _ = vector.irqfd.write(1);
        }
        true
    }

    /// The guest reads the table: dword accesses (or a qword for the address) inside it.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        let state = lock(&self.state);
        let (index, field) = (offset / ENTRY_SIZE, offset % ENTRY_SIZE);
        let Some(entry) = usize::try_from(index).ok().and_then(|i| state.entries.get(i)) else {
            return data.fill(0xff);
        };
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&entry.address.to_le_bytes());
        raw[8..12].copy_from_slice(&entry.data.to_le_bytes());
        raw[12..16].copy_from_slice(&entry.control.to_le_bytes());
        let f = field as usize;
        match (data.len(), raw.get(f..f + data.len())) {
            (4 | 8, Some(src)) if f.is_multiple_of(data.len()) => data.copy_from_slice(src),
            _ => data.fill(0xff),
        }
    }

    /// The guest writes the table.
    pub fn write_table(&self, offset: u64, data: &[u8]) {
        let mut state = lock(&self.state);
        let (index, field) = (offset / ENTRY_SIZE, offset % ENTRY_SIZE);
        let Some(v) = usize::try_from(index).ok().filter(|i| *i < state.entries.len()) else {
            return;
        };
        let entry = &mut state.entries[v];
        match (field, data.len()) {
            (0, 8) => {
                entry.address = u64::from_le_bytes(data.try_into().unwrap_or([0; 8]));
            }
            (0, 4) | (4, 4) | (8, 4) | (12, 4) => {
                let value = u32::from_le_bytes(data.try_into().unwrap_or([0; 4]));
                match field {
                    0 => entry.address = (entry.address & !0xffff_ffff) | u64::from(value),
                    4 => entry.address = (entry.address & 0xffff_ffff) | (u64::from(value) << 32),
                    8 => entry.data = value,
                    // Only the mask bit of vector control is defined.
                    _ => entry.control = value & VECTOR_MASKED,
                }
            }
            (8, 8) => {
                let value = u64::from_le_bytes(data.try_into().unwrap_or([0; 8]));
                entry.data = value as u32;
                entry.control = (value >> 32) as u32 & VECTOR_MASKED;
            }
            _ => return,
        }
        self.refresh(&mut state, v);
    }

    /// The guest reads the pending-bit array (read-only).
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        let state = lock(&self.state);
        let mut bytes = vec![0u8; state.entries.len().div_ceil(64) * 8];
        for (v, pending) in state.pending.iter().enumerate() {
            if *pending {
                bytes[v / 8] |= 1 << (v % 8);
            }
        }
        let o = usize::try_from(offset).unwrap_or(usize::MAX);
        match bytes.get(o..o.saturating_add(data.len())) {
            Some(src) if matches!(data.len(), 4 | 8) && o.is_multiple_of(data.len()) => {
                data.copy_from_slice(src)
            }
            _ => data.fill(0xff),
        }
    }

    /// Every entry's message address, data and vector control, and its pending bit, for a
    /// snapshot (enable and function mask live in the capability, in configuration space).
    pub fn save(&self) -> Vec<(u64, u32, u32, bool)> {
        let state = lock(&self.state);
        state
            .entries
            .iter()
            .zip(&state.pending)
            .map(|(e, p)| (e.address, e.data, e.control, *p))
            .collect()
    }

    /// Puts back what [`Msix::save`] wrote, then applies message control `control` (from the
    /// restored capability): deliverable vectors are routed, pending ones delivered.
    pub fn restore(&self, saved: &[(u64, u32, u32, bool)], control: u16) -> Result<(), String> {
        {
            let mut state = lock(&self.state);
            if saved.len() != state.entries.len() {
                return Err(format!(
                    "the snapshot has {} MSI-X vectors, this function {}",
                    saved.len(),
                    state.entries.len()
                ));
            }
            for (v, (address, data, control, pending)) in saved.iter().enumerate() {
                state.entries[v] =
                    Entry { address: *address, data: *data, control: control & VECTOR_MASKED };
                state.pending[v] = *pending;
            }
        }
        self.set_control(control);
        Ok(())
    }

    /// Back to the power-on state: disabled, every entry masked and cleared, nothing pending,
    /// no routes.
    pub fn reset(&self) {
        let mut state = lock(&self.state);
        state.enabled = false;
        state.function_masked = false;
        state.entries.fill(RESET_ENTRY);
        state.pending.fill(false);
        for (v, routed) in state.routed.iter_mut().enumerate() {
            if routed.take().is_some() {
                if let Some(vector) = self.vectors.get(v) {
                    let _ = self.router.set_route(vector.gsi, None);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Routes(Mutex<Vec<(u32, Option<MsiMessage>)>>);
    impl MsiRouter for Routes {
        fn set_route(&self, gsi: u32, message: Option<MsiMessage>) -> std::io::Result<()> {
            lock(&self.0).push((gsi, message));
            Ok(())
        }
    }

    fn table(n: u32) -> (Msix, Arc<Routes>) {
        let routes = Arc::new(Routes::default());
        let vectors = (0..n)
            .map(|i| Vector { gsi: 24 + i, irqfd: EventFd::new(libc::EFD_NONBLOCK).unwrap() })
            .collect();
        (Msix::new(vectors, routes.clone()), routes)
    }

    fn fired(m: &Msix, v: usize) -> bool {
        m.vectors[v].irqfd.read().is_ok()
    }

    fn program(m: &Msix, v: u64, address: u64, data: u32) {
        m.write_table(v * 16, &(address as u32).to_le_bytes());
        m.write_table(v * 16 + 4, &((address >> 32) as u32).to_le_bytes());
        m.write_table(v * 16 + 8, &data.to_le_bytes());
        m.write_table(v * 16 + 12, &0u32.to_le_bytes());
    }

    #[test]
    fn a_programmed_unmasked_vector_is_routed_and_fires() {
        let (m, routes) = table(3);
        assert!(!m.trigger(0), "MSI-X disabled: the caller uses INTx");
        m.set_control(CONTROL_ENABLE);
        program(&m, 1, 0xfee0_0000, 0x41);
        let msg = MsiMessage { address: 0xfee0_0000, data: 0x41 };
        assert_eq!(*lock(&routes.0), vec![(25, Some(msg))], "routed once, when unmasked");
        assert!(m.trigger(1));
        assert!(fired(&m, 1));
        assert!(!fired(&m, 0));
        let mut b = [0; 4];
        m.read_table(16 + 8, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x41);
    }

    #[test]
    fn masked_vectors_pend_and_fire_on_unmask() {
        let (m, _) = table(2);
        m.set_control(CONTROL_ENABLE);
        assert!(m.trigger(0), "entries start masked");
        assert!(!fired(&m, 0));
        let mut pba = [0; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 1);
        program(&m, 0, 0xfee0_0000, 0x42);
        assert!(fired(&m, 0), "delivered on unmask");
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0);
        // The function mask holds every vector back the same way.
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        assert!(m.trigger(0));
        assert!(!fired(&m, 0));
        m.set_control(CONTROL_ENABLE);
        assert!(fired(&m, 0));
    }

    #[test]
    fn hostile_accesses_are_ignored() {
        let (m, routes) = table(2);
        m.set_control(CONTROL_ENABLE);
        m.write_table(2 * 16, &[0xff; 4]);
        m.write_table(u64::MAX - 3, &[0xff; 4]);
        m.write_table(3, &[0xff; 4]);
        m.write_table(0, &[0xff; 2]);
        assert!(lock(&routes.0).is_empty());
        let mut b = [0; 4];
        m.read_table(2 * 16, &mut b);
        assert_eq!(b, [0xff; 4]);
        m.read_table(2, &mut b);
        assert_eq!(b, [0xff; 4]);
        m.read_pba(64, &mut b);
        assert_eq!(b, [0xff; 4]);
        assert!(!m.trigger(7));
        // Reserved vector-control bits stay zero.
        m.write_table(12, &u32::MAX.to_le_bytes());
        m.read_table(12, &mut b);
        assert_eq!(u32::from_le_bytes(b), 1);
    }

    #[test]
    fn reset_masks_and_unroutes() {
        let (m, routes) = table(1);
        m.set_control(CONTROL_ENABLE);
        program(&m, 0, 0xfee0_0000, 0x41);
        m.reset();
        assert!(!m.enabled());
        assert_eq!(lock(&routes.0).last(), Some(&(24, None)));
        let mut b = [0; 4];
        m.read_table(12, &mut b);
        assert_eq!(u32::from_le_bytes(b), 1);
        let (body, mask) = m.capability(0, 0x4000, 0x5000);
        assert_eq!(body, [0, 0, 0, 0x40, 0, 0, 0, 0x50, 0, 0]);
        assert_eq!(mask[1], 0xc0);
    }
}
