//! Virtio devices and their transports.
//!
//! Every device implements [`VirtioDevice`]: what it offers (type, features, queues, config
//! space), what it does when the driver makes buffers available, and which other descriptors
//! (timers, a TAP) its worker thread waits on. Devices: [`block`], [`net`], [`rng`].
//! Transports ([`pci::VirtioPci`], [`mmio::MmioTransport`]) decode registers into
//! [`transport::VirtioCore`], which holds the driver-visible state — status, negotiated
//! features, queue addresses — and validates everything the driver writes before a device
//! sees it. Guest memory and the driver are hostile: a malformed request fails that
//! request or marks the device NEEDS_RESET; it never panics the VMM.

pub mod balloon;
pub mod block;
pub mod mmio;
pub mod net;
pub mod pci;
pub mod rng;
pub mod state;
pub mod transport;
pub mod vhost_user_blk;
pub mod vsock;

use std::os::fd::RawFd;
use std::sync::Arc;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

/// Feature bit every modern (virtio 1.x) device offers and every driver must accept.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// What a device did with the buffers a notification announced.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The driver broke the queue protocol (bad ring index, memory outside the guest).
    #[error("queue {queue}: {reason}")]
    Queue {
        /// Which queue.
        queue: u16,
        /// What was wrong.
        reason: String,
    },
}

/// A virtio device model, independent of the transport that exposes it.
pub trait VirtioDevice: Send {
    /// The virtio device ID (4 for entropy, 2 for block, ...).
    fn device_type(&self) -> u32;
    /// The largest size of each queue; the number of entries is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered to the driver (must include [`VIRTIO_F_VERSION_1`]).
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let _ = offset;
        data.fill(0);
    }
    /// Writes the device-specific configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let _ = (offset, data);
    }
    /// Serves the buffers available on `queue`; returns whether any were used (so the
    /// transport interrupts the driver).
    fn process_queue(
        &mut self,
        mem: &GuestMemoryMmap,
        index: u16,
        queue: &mut Queue,
    ) -> Result<bool, DeviceError>;
    /// Forgets any per-driver state (the transport resets the queues).
    fn reset(&mut self) {}
    /// The driver set FEATURES_OK and the transport accepted `features` (offered ones only,
    /// VERSION_1 among them): the device adapts to them (a network device tells its TAP which
    /// offloads the driver takes). Called again after every reset and renegotiation.
    fn ack_features(&mut self, features: u64) {
        let _ = features;
    }
    /// Descriptors the worker thread waits on besides the queue notifications: a rate
    /// limiter's timer, a TAP device, ... Asked once each time the worker starts; the list
    /// must stay valid (open) while the device lives.
    fn event_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }
    /// Whether the worker should wait on `event_fds()[which]` now. Asked before every wait:
    /// a level-triggered descriptor the device cannot serve yet (a readable TAP with no
    /// receive buffers) would otherwise wake the worker in a loop.
    fn event_wanted(&self, which: usize) -> bool {
        let _ = which;
        true
    }
    /// `event_fds()[which]` became readable: the device takes note (reads its timer, marks
    /// its TAP readable); the worker then serves every queue, as if each had been notified.
    fn event_ready(&mut self, which: usize) {
        let _ = which;
    }
    /// Whether the host changed the device's configuration space since the last call (a
    /// balloon's target). Asked after `event_ready`: a device that changes its configuration
    /// signals one of its `event_fds`, and the worker then raises a configuration-change
    /// interrupt.
    fn config_changed(&mut self) -> bool {
        false
    }
    /// The host descriptor a live migration to another process on this host hands over
    /// (a net device's TAP), so that the new process need not reopen it.
    fn handover_fd(&self) -> Option<RawFd> {
        None
    }
    /// The device's own state for a snapshot, beyond what its configuration and the
    /// transport's queues hold (most devices have none).
    fn save_state(&self) -> Vec<u8> {
        Vec::new()
    }
    /// Puts back what [`VirtioDevice::save_state`] wrote, into a device just built from the
    /// same configuration (after `ack_features` with the negotiated features).
    fn restore_state(&mut self, state: &[u8]) -> Result<(), String> {
        if state.is_empty() {
            Ok(())
        } else {
            Err(format!("{} bytes of device state for a device that keeps none", state.len()))
        }
    }
    /// A device whose queues run outside the VMM (a vhost-user backend) answers with its
    /// [`ExternalQueues`]: the transport then hands it the rings and eventfds at DRIVER_OK
    /// instead of starting a worker that calls [`VirtioDevice::process_queue`].
    fn external_queues(&mut self) -> Option<&mut dyn ExternalQueues> {
        None
    }
}

/// One queue as the driver set it up, handed to a device that runs its queues elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueSetup {
    /// The queue's index.
    pub index: u16,
    /// Its size (entries).
    pub size: u16,
    /// Guest-physical address of the descriptor table (the transport checked that every
    /// ring lies in guest memory).
    pub desc: u64,
    /// The driver ring.
    pub avail: u64,
    /// The device ring.
    pub used: u64,
    /// The first available entry the device has not consumed.
    pub next_avail: u16,
}

/// The seam for devices whose queues are served by another process (vhost-user): the
/// transport keeps the registers, the status machine and the interrupts; the device gets the
/// rings and two eventfds per queue: `kick`, which KVM signals when the driver notifies (an
/// ioeventfd), and `call`, which the backend signals when it used buffers (the transport turns
/// it into the queue's interrupt).
pub trait ExternalQueues {
    /// The driver set DRIVER_OK: start the enabled `queues` with the negotiated `features`.
    /// `kicks` and `calls` are indexed like `queues`. An error (the backend refused or is gone)
    /// marks the device NEEDS_RESET; its text is printed after [`ExternalQueues::describe`].
    fn activate(
        &mut self,
        mem: &GuestMemoryMmap,
        features: u64,
        queues: &[QueueSetup],
        kicks: &[vmm_sys_util::eventfd::EventFd],
        calls: &[vmm_sys_util::eventfd::EventFd],
    ) -> Result<(), String>;
    /// Stops every started queue (the backend hands back its ring positions) before the
    /// transport changes anything: on reset, and when the device is dropped.
    fn deactivate(&mut self);
    /// A descriptor that reports a hang-up when the backend goes away (its socket).
    fn hangup_fd(&self) -> Option<RawFd>;
    /// What to call the backend in messages.
    fn describe(&self) -> String;
}

/// Reads `data.len()` bytes of a device's configuration space `config` at `offset`; bytes
/// past the end of `config` read as zero, as do reads at offsets beyond it.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else { return };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

/// Serves every chain available on `queue`: `serve` handles one and returns the length it
/// wrote to the chain's device-writable buffers, which goes back to the driver in the used
/// ring; `None` leaves the chain on the ring for later and stops (a rate limiter said wait).
/// Returns whether any chain was used, so the transport knows to interrupt the driver.
pub fn drain_queue(
    mem: &GuestMemoryMmap,
    index: u16,
    queue: &mut Queue,
    mut serve: impl FnMut(virtio_queue::DescriptorChain<&GuestMemoryMmap>) -> Option<u32>,
) -> Result<bool, DeviceError> {
    use virtio_queue::{QueueOwnedT, QueueT};
    let queue_err =
        |e: virtio_queue::Error| DeviceError::Queue { queue: index, reason: e.to_string() };
    let mut used_any = false;
    while let Some(chain) = queue.iter(mem).map_err(queue_err)?.next() {
        let head = chain.head_index();
        let Some(used_len) = serve(chain) else {
            queue.go_to_previous_position();
            break;
        };
        queue.add_used(mem, head, used_len).map_err(queue_err)?;
        used_any = true;
    }
    Ok(used_any)
}

/// A shared, lockable device.
pub type SharedDevice = Arc<std::sync::Mutex<dyn VirtioDevice>>;
