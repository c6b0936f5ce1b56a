//! virtio-blk served by an external vhost-user backend (`--disk vhost-user=SOCKET`): Vanguard's
//! own `vanguard vhost-user blk`, qemu-storage-daemon, SPDK, ...
//!
//! The VMM keeps the transport (registers, status, feature negotiation, interrupts); the
//! backend serves the rings in its own process. At start the device connects, negotiates the
//! vhost-user protocol (CONFIG required, REPLY_ACK if offered) and reads the virtio-blk
//! configuration space once (GET_CONFIG). At DRIVER_OK ([`ExternalQueues::activate`]) it sends
//! the driver's features, the guest memory table (memfd-backed regions: their descriptors go
//! with the message) and each enabled queue's size, ring addresses, position and eventfds.
//! A reset stops the rings (GET_VRING_BASE) first.
//!
//! Every socket operation has a timeout, so a backend that hangs is an error, not a hang; after
//! any protocol error the connection is considered broken (the replies could be out of step)
//! and the device stays NEEDS_RESET.

use crate::{DeviceError, ExternalQueues, QueueSetup, VirtioDevice, VIRTIO_F_VERSION_1};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::Queue;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// How long one vhost-user request may take before the backend is declared unresponsive.
pub const SOCKET_TIMEOUT: Duration = Duration::from_secs(5);
/// The queue size offered to the driver (what `vanguard vhost-user blk` and QEMU's
/// libvhost-user accept).
pub const QUEUE_SIZE: u16 = 256;
/// Bytes of virtio-blk configuration read from the backend (up to `write_zeroes_may_unmap`).
pub const CONFIG_SIZE: u32 = 60;
/// VHOST_USER_F_PROTOCOL_FEATURES.
const PROTOCOL_FEATURES: u64 = 1 << 30;
/// Feature bits passed from the backend to the driver: VERSION_1, INDIRECT_DESC, EVENT_IDX and
/// the virtio-blk bits whose meaning lies in the backend (SIZE_MAX, SEG_MAX, GEOMETRY, RO,
/// BLK_SIZE, FLUSH, TOPOLOGY, DISCARD, WRITE_ZEROES). Not passed: MQ (one queue), CONFIG_WCE
/// (configuration writes are not forwarded), packed rings and anything the transport lacks.
const PASSED_FEATURES: u64 = VIRTIO_F_VERSION_1
    | 1 << 28
    | 1 << 29
    | 1 << 1
    | 1 << 2
    | 1 << 4
    | 1 << 5
    | 1 << 6
    | 1 << 9
    | 1 << 10
    | 1 << 13
    | 1 << 14;

/// Why a vhost-user disk cannot be attached.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserBlkError {
    /// Nobody answers on the socket.
    #[error("cannot connect to vhost-user backend {socket}")]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The backend failed or refused a request, or timed out.
    #[error("vhost-user backend {socket}: {what} failed: {reason}")]
    Protocol {
        /// The socket.
        socket: PathBuf,
        /// The request.
        what: &'static str,
        /// The library's description.
        reason: String,
    },
    /// The backend lacks something this frontend needs.
    #[error("vhost-user backend {socket}: {what}")]
    Unsupported {
        /// The socket.
        socket: PathBuf,
        /// What is missing.
        what: &'static str,
    },
}

/// A virtio-blk device whose requests an external vhost-user backend serves.
pub struct VhostUserBlk {
    socket: PathBuf,
    frontend: Frontend,
    /// Features offered to the driver.
    offered: u64,
    /// The backend's configuration space, read at connection.
    config: Vec<u8>,
    /// Queues started at the last DRIVER_OK.
    active: Vec<usize>,
    /// A request failed: the connection may be out of step and is not used again.
    broken: bool,
}

impl VhostUserBlk {
    /// Connects to the backend listening on `socket` and negotiates what the device offers.
    pub fn connect(socket: &Path) -> Result<Self, VhostUserBlkError> {
        let connect_err =
            |source: std::io::Error| VhostUserBlkError::Connect { socket: socket.into(), source };
        let stream = UnixStream::connect(socket).map_err(connect_err)?;
        stream.set_read_timeout(Some(SOCKET_TIMEOUT)).map_err(connect_err)?;
        stream.set_write_timeout(Some(SOCKET_TIMEOUT)).map_err(connect_err)?;
        let mut frontend = Frontend::from_stream(stream, 1);
        let protocol = |what: &'static str| {
            move |e: vhost::Error| VhostUserBlkError::Protocol {
                socket: socket.into(),
                what,
                reason: e.to_string(),
            }
        };
        let unsupported =
            |what: &'static str| VhostUserBlkError::Unsupported { socket: socket.into(), what };
        frontend.set_owner().map_err(protocol("SET_OWNER"))?;
        let features = frontend.get_features().map_err(protocol("GET_FEATURES"))?;
        if features & PROTOCOL_FEATURES == 0 {
            return Err(unsupported("does not offer VHOST_USER_F_PROTOCOL_FEATURES"));
        }
        if features & VIRTIO_F_VERSION_1 == 0 {
            return Err(unsupported("does not offer VIRTIO_F_VERSION_1"));
        }
        let offered_protocol =
            frontend.get_protocol_features().map_err(protocol("GET_PROTOCOL_FEATURES"))?;
        if !offered_protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(unsupported(
                "does not offer the CONFIG protocol feature (the disk's size comes from it)",
            ));
        }
        let wanted = VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK;
        let acked = offered_protocol & wanted;
        frontend.set_protocol_features(acked).map_err(protocol("SET_PROTOCOL_FEATURES"))?;
        if acked.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every request is answered, so a refusal shows at the request that caused it.
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let buf = vec![0u8; CONFIG_SIZE as usize];
        let (_, config) = frontend
            .get_config(0, CONFIG_SIZE, VhostUserConfigFlags::WRITABLE, &buf)
            .map_err(protocol("GET_CONFIG"))?;
        Ok(Self {
            socket: socket.into(),
            frontend,
            offered: features & PASSED_FEATURES,
            config,
            active: Vec::new(),
            broken: false,
        })
    }

    /// The socket this device talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn start(
        &mut self,
        mem: &GuestMemoryMmap,
        features: u64,
        queues: &[QueueSetup],
        kicks: &[EventFd],
        calls: &[EventFd],
    ) -> Result<(), String> {
        let fail = |what: &'static str| move |e: vhost::Error| format!("{what} failed: {e}");
        self.frontend.set_features(features | PROTOCOL_FEATURES).map_err(fail("SET_FEATURES"))?;
        let mut regions = Vec::new();
        for region in mem.iter() {
            regions.push(VhostUserMemoryRegionInfo::from_guest_region(region).map_err(|_| {
                "guest memory is not shared (no file descriptor to send)".to_string()
            })?);
        }
        self.frontend.set_mem_table(&regions).map_err(fail("SET_MEM_TABLE"))?;
        let host = |addr: u64| -> Result<u64, String> {
            mem.get_host_address(GuestAddress(addr))
                .map(|p| p as u64)
                .map_err(|_| format!("ring address {addr:#x} outside guest memory"))
        };
        for ((queue, kick), call) in queues.iter().zip(kicks).zip(calls) {
            let i = usize::from(queue.index);
            self.frontend.set_vring_num(i, queue.size).map_err(fail("SET_VRING_NUM"))?;
            let addresses = VringConfigData {
                queue_max_size: QUEUE_SIZE,
                queue_size: queue.size,
                flags: 0,
                desc_table_addr: host(queue.desc)?,
                used_ring_addr: host(queue.used)?,
                avail_ring_addr: host(queue.avail)?,
                log_addr: None,
            };
            self.frontend.set_vring_addr(i, &addresses).map_err(fail("SET_VRING_ADDR"))?;
            self.frontend.set_vring_base(i, queue.next_avail).map_err(fail("SET_VRING_BASE"))?;
            self.frontend.set_vring_kick(i, kick).map_err(fail("SET_VRING_KICK"))?;
            self.frontend.set_vring_call(i, call).map_err(fail("SET_VRING_CALL"))?;
            self.active.push(i);
            self.frontend.set_vring_enable(i, true).map_err(fail("SET_VRING_ENABLE"))?;
        }
        Ok(())
    }
}

impl VirtioDevice for VhostUserBlk {
    fn device_type(&self) -> u32 {
        2
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.offered
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::read_config_bytes(&self.config, offset, data);
    }

    fn process_queue(
        &mut self,
        _mem: &GuestMemoryMmap,
        _index: u16,
        _queue: &mut Queue,
    ) -> Result<bool, DeviceError> {
        // The backend serves the rings; the transport never asks (it kicks the backend).
        Ok(false)
    }

    fn external_queues(&mut self) -> Option<&mut dyn ExternalQueues> {
        Some(self)
    }
}

impl ExternalQueues for VhostUserBlk {
    fn activate(
        &mut self,
        mem: &GuestMemoryMmap,
        features: u64,
        queues: &[QueueSetup],
        kicks: &[EventFd],
        calls: &[EventFd],
    ) -> Result<(), String> {
        if self.broken {
            return Err("an earlier request failed; the connection is not used again".into());
        }
        let result = self.start(mem, features, queues, kicks, calls);
        if result.is_err() {
            self.broken = true;
        }
        result
    }

    fn deactivate(&mut self) {
        for index in std::mem::take(&mut self.active) {
            if self.broken {
                continue;
            }
            // GET_VRING_BASE stops the ring: the backend touches it no more once it answers.
            if self.frontend.get_vring_base(index).is_err() {
                self.broken = true;
            }
        }
    }

    fn hangup_fd(&self) -> Option<RawFd> {
        Some(self.frontend.as_raw_fd())
    }

    fn describe(&self) -> String {
        format!("vhost-user backend {}", self.socket.display())
    }
}

impl Drop for VhostUserBlk {
    fn drop(&mut self) {
        self.deactivate();
    }
}
