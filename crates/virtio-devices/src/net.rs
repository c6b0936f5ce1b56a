//! virtio-net (device ID 1) on a Linux TAP device: one receive queue (0) and one transmit
//! queue (1). Every frame on either queue starts with a 12-byte `virtio_net_hdr_v1` (flags,
//! gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers), which is exactly the
//! TAP's own vnet header once `TUNSETVNETHDRSZ` says 12 bytes: headers pass between guest
//! and TAP as they are, so checksum and segmentation offloads cost nothing here.
//!
//! - **TAP**: `/dev/net/tun` opened non-blocking, `TUNSETIFF` with `IFF_TAP | IFF_NO_PI |
//!   IFF_VNET_HDR` (which creates the TAP if no interface has that name; it then lives as
//!   long as the VMM holds it), `TUNSETVNETHDRSZ` 12. The offloads the driver accepts for
//!   received frames (GUEST_CSUM, GUEST_TSO4/6) go to the TAP with `TUNSETOFFLOAD` when it
//!   sets FEATURES_OK, and are withdrawn on reset; without them the kernel hands the device
//!   whole, checksummed frames.
//! - **Transmit**: each chain is header + frame, all device-readable; it goes to the TAP in
//!   one `writev` straight from guest memory. Malformed chains (a header shorter than 12
//!   bytes, a device-writable buffer, memory outside the guest, a frame over 64 KiB, offloads
//!   the driver did not negotiate) are returned unsent and counted.
//! - **Receive**: a frame is read from the TAP into the device's buffer, then copied into the
//!   next available chain (header + data, all device-writable) and used with its length. With
//!   no chain available the frame waits and the device stops reading the TAP (the worker stops
//!   waiting on it) until the driver adds buffers, so frames queue in the kernel, which counts
//!   what it drops. A frame larger than the chain is dropped and counted, the chain returned
//!   with length 0.
//! - **Rate limits**: one [`RateLimiter`] per direction with the same limits, so `bandwidth=`
//!   and `ops=` hold each way; a frame counts as one operation and its length in bytes. A
//!   refused frame waits (transmit: on the ring; receive: in the device) for the limiter's
//!   timer.
//!
//! Everything runs on the device's worker thread, which waits on the TAP and both limiters'
//! timers besides the queue notifications ([`VirtioDevice::event_fds`]). A receive pass
//! stops after 64 chains, so that a flood of frames cannot starve the transmit queue, and
//! brings the worker straight back through an eventfd of its own.

use crate::{DeviceError, VirtioDevice, VIRTIO_F_VERSION_1};
use rate_limiter::{RateLimiter, RateLimiterConfig, RateLimiterHandle, TokenType};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// The virtio device ID of a network card.
pub const VIRTIO_ID_NET: u32 = 1;
/// Size offered for both queues.
pub const QUEUE_SIZE: u16 = 256;
/// The receive queue.
pub const RX_QUEUE: u16 = 0;
/// The transmit queue.
pub const TX_QUEUE: u16 = 1;
/// Bytes of `virtio_net_hdr_v1` before every frame (VERSION_1: num_buffers always there).
pub const HEADER_LEN: usize = 12;
/// The largest frame moved, header excluded: a 64 KiB segmentation-offload frame (the TAP's
/// gso_max_size) behind an Ethernet header and a VLAN tag, with room to spare.
pub const MAX_FRAME: usize = 65536 + 64;
/// The most receive chains used per pass: then the worker serves the other queue (and the
/// driver gets its interrupt) before it comes back for more.
const RX_BATCH: usize = 64;
/// The smallest frame: an Ethernet header.
const MIN_FRAME: usize = 14;
/// The most buffers one transmitted frame may come in (the kernel's `UIO_MAXIOV`).
const MAX_IOVECS: usize = 1024;
/// The most characters of an interface name (IFNAMSIZ less the terminating NUL).
pub const MAX_TAP_NAME: usize = 15;

/// Feature bits (virtio 1.2, 5.1.3).
pub mod features {
    /// The device takes frames with partial checksums (transmit checksum offload).
    pub const CSUM: u64 = 1 << 0;
    /// The driver takes frames with partial checksums.
    pub const GUEST_CSUM: u64 = 1 << 1;
    /// The configuration space holds the MAC address.
    pub const MAC: u64 = 1 << 5;
    /// The driver takes TCPv4 segmentation offload frames.
    pub const GUEST_TSO4: u64 = 1 << 7;
    /// The driver takes TCPv6 segmentation offload frames.
    pub const GUEST_TSO6: u64 = 1 << 8;
    /// The device takes TCPv4 segmentation offload frames.
    pub const HOST_TSO4: u64 = 1 << 11;
    /// The device takes TCPv6 segmentation offload frames.
    pub const HOST_TSO6: u64 = 1 << 12;
    /// The driver merges receive buffers (not offered).
    pub const MRG_RXBUF: u64 = 1 << 15;
    /// The configuration space holds the link status.
    pub const STATUS: u64 = 1 << 16;
}
use features::*;

/// `status` in the configuration space: the link is up.
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;
/// Header flag: the frame's checksum is partial (csum_start, csum_offset say where).
const HDR_F_NEEDS_CSUM: u8 = 1;
/// Header gso_types.
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;

/// Errors attaching a network device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Not a name Linux accepts for an interface.
    #[error("invalid TAP name '{name}': {reason}")]
    TapName {
        /// The name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The TAP could not be opened, created or configured.
    #[error("cannot open TAP device {name}: {what}{hint}")]
    Tap {
        /// The TAP.
        name: String,
        /// The step that failed.
        what: &'static str,
        /// What the error usually means.
        hint: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The rate limit cannot be set up.
    #[error("invalid network rate limit: {0}")]
    RateLimit(String),
}

/// Checks that `name` is an interface name Linux accepts (`dev_valid_name`): 1 to 15 bytes,
/// not `.` or `..`, no `/`, `:`, whitespace or NUL; `%` (a kernel name template) is refused
/// too, so that the TAP is the one named.
pub fn validate_tap_name(name: &str) -> Result<(), NetError> {
    let bad = |reason| Err(NetError::TapName { name: name.to_string(), reason });
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_TAP_NAME {
        return bad("longer than 15 bytes");
    }
    if name == "." || name == ".." {
        return bad("not a name");
    }
    if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b == b'%' || b == 0 || b.is_ascii_whitespace())
    {
        return bad("contains '/', ':', '%', a space or NUL");
    }
    Ok(())
}

/// What the device has counted since it was created.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NetStats {
    /// Frames handed to the driver.
    pub rx_frames: u64,
    /// Their bytes, headers included.
    pub rx_bytes: u64,
    /// Frames dropped because they did not fit the driver's buffer (or the device's).
    pub rx_too_big: u64,
    /// Receive chains the device could not write (device-readable buffers, memory outside
    /// the guest), returned with length 0; the frame went to the next chain.
    pub rx_bad_chains: u64,
    /// Reads from the TAP that failed, or gave less than a header and an Ethernet header.
    pub rx_errors: u64,
    /// Frames dropped at a device reset before the driver took them.
    pub rx_dropped_at_reset: u64,
    /// Frames written to the TAP.
    pub tx_frames: u64,
    /// Their bytes, headers included.
    pub tx_bytes: u64,
    /// Transmit chains refused as malformed.
    pub tx_malformed: u64,
    /// Frames the TAP refused (writev failed).
    pub tx_errors: u64,
    /// TUNSETOFFLOAD calls that failed.
    pub offload_errors: u64,
}

/// The device's side of the receive path.
struct Rx {
    /// Where frames land when read from the TAP: a header and the largest frame, allocated
    /// once.
    buffer: Box<[u8]>,
    /// The length of the frame in `buffer` waiting for a chain (or the rate limiter).
    pending: Option<usize>,
    /// Whether the worker should wait for the TAP to become readable: true once a read found
    /// it empty, false from when it fires until then (frames may be waiting in the kernel
    /// while the driver has no buffers).
    tap_wait: bool,
}

/// A virtio-net device on a TAP.
pub struct Net {
    tap: File,
    name: String,
    /// Whether `tap` is a real TAP (offloads can be set), not a test's socket.
    is_tap: bool,
    mac: [u8; 6],
    acked: u64,
    rx: Rx,
    rx_limiter: RateLimiter,
    tx_limiter: RateLimiter,
    /// Signalled to bring the worker straight back (a receive pass stopped at its batch).
    kick: EventFd,
    stats: NetStats,
}

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags in the union.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _union_rest: [u8; 22],
}

/// What an error from a step of opening the TAP usually means.
fn tap_hint(what: &str, error: &std::io::Error) -> &'static str {
    match (what, error.raw_os_error()) {
        ("open /dev/net/tun", Some(libc::ENOENT | libc::ENODEV)) => {
            " (no /dev/net/tun: load the tun module)"
        }
        ("open /dev/net/tun", Some(libc::EACCES | libc::EPERM)) => {
            " (no permission on /dev/net/tun)"
        }
        (_, Some(libc::EPERM)) => {
            " (creating a TAP, or attaching to one this user does not own, needs CAP_NET_ADMIN)"
        }
        (_, Some(libc::EBUSY)) => " (it is attached already: another process, or another --net)",
        ("TUNSETIFF", Some(libc::EINVAL)) => {
            " (an interface of that name exists and is not a TAP, or has other flags)"
        }
        _ => "",
    }
}

impl Net {
    /// Opens the TAP `name` (creating it if no interface has that name) for a device with
    /// address `mac`.
    pub fn open(name: &str, mac: [u8; 6]) -> Result<Net, NetError> {
        validate_tap_name(name)?;
        let fail = |what: &'static str, source: std::io::Error| NetError::Tap {
            name: name.to_string(),
            what,
            hint: tap_hint(what, &source),
            source,
        };
        let tap = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| fail("open /dev/net/tun", e))?;
        let mut request = IfReq { name: [0; 16], flags: 0, _union_rest: [0; 22] };
        request.name[..name.len()].copy_from_slice(name.as_bytes());
        let flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        request.flags = libc::c_short::try_from(flags).unwrap_or(0);
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `request` is (same size
        // and layout), exclusively borrowed for the call; the descriptor is ours.
        if unsafe { libc::ioctl(tap.as_raw_fd(), libc::TUNSETIFF, &mut request) } < 0 {
            return Err(fail("TUNSETIFF", std::io::Error::last_os_error()));
        }
        let header_len = libc::c_int::try_from(HEADER_LEN).unwrap_or(12);
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, valid for the call.
        if unsafe { libc::ioctl(tap.as_raw_fd(), libc::TUNSETVNETHDRSZ, &header_len) } < 0 {
            return Err(fail("TUNSETVNETHDRSZ", std::io::Error::last_os_error()));
        }
        let mut net = Net::with_backend(tap, name, mac, true)
            .map_err(|e| fail("create the rate limiters", e))?;
        net.set_offload(0).map_err(|e| fail("TUNSETOFFLOAD", e))?;
        Ok(net)
    }

    /// A device on a TAP descriptor another VMM process opened as [`Net::open`] does and
    /// handed over (a live migration on this host), named `name`.
    pub fn from_handed_tap(tap: File, name: &str, mac: [u8; 6]) -> Result<Net, NetError> {
        let fail = |what: &'static str, source: std::io::Error| NetError::Tap {
            name: name.to_string(),
            what,
            hint: "",
            source,
        };
        let mut net = Net::with_backend(tap, name, mac, true)
            .map_err(|e| fail("create the rate limiters", e))?;
        net.set_offload(0).map_err(|e| fail("TUNSETOFFLOAD on the handed-over TAP", e))?;
        Ok(net)
    }

    /// A device whose frames go to `backend`: a TAP (`is_tap`) or, in tests, one end of a
    /// datagram socket pair, which keeps frame boundaries as a TAP does.
    fn with_backend(backend: File, name: &str, mac: [u8; 6], is_tap: bool) -> std::io::Result<Net> {
        let unlimited =
            || RateLimiter::new(&RateLimiterConfig::default()).map_err(std::io::Error::other);
        Ok(Net {
            tap: backend,
            name: name.to_string(),
            is_tap,
            mac,
            acked: 0,
            rx: Rx {
                buffer: vec![0u8; HEADER_LEN + MAX_FRAME].into_boxed_slice(),
                pending: None,
                tap_wait: true,
            },
            rx_limiter: unlimited()?,
            tx_limiter: unlimited()?,
            kick: EventFd::new(libc::EFD_NONBLOCK)?,
            stats: NetStats::default(),
        })
    }

    /// Limits bandwidth and operations (frames) in each direction to `config`.
    pub fn with_rate_limit(mut self, config: &RateLimiterConfig) -> Result<Net, NetError> {
        for limiter in [&mut self.rx_limiter, &mut self.tx_limiter] {
            limiter.set_limits(config).map_err(|e| NetError::RateLimit(e.to_string()))?;
        }
        Ok(self)
    }

    /// Handles that change the (receive, transmit) limits while the device runs, from any
    /// thread (see [`crate::block::Block::rate_limit_handle`]).
    pub fn rate_limit_handles(&self) -> (RateLimiterHandle, RateLimiterHandle) {
        (self.rx_limiter.handle(), self.tx_limiter.handle())
    }

    /// The TAP's name.
    pub fn tap_name(&self) -> &str {
        &self.name
    }

    /// The MAC address the driver reads.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// What the device has counted.
    pub fn stats(&self) -> &NetStats {
        &self.stats
    }

    /// Tells the TAP which offloads (`TUN_F_*`) the driver takes on received frames.
    fn set_offload(&mut self, flags: libc::c_uint) -> std::io::Result<()> {
        if !self.is_tap {
            return Ok(());
        }
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        let rc = unsafe {
            libc::ioctl(self.tap.as_raw_fd(), libc::TUNSETOFFLOAD, libc::c_ulong::from(flags))
        };
        if rc < 0 {
            self.stats.offload_errors += 1;
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads the next frame from the TAP into the receive buffer; None when there is none
    /// (the worker then waits for the TAP again).
    fn read_frame(&mut self) -> Option<usize> {
        loop {
            let buffer = &mut self.rx.buffer;
            // SAFETY: the kernel writes at most `buffer.len()` bytes into the buffer, which is
            // exclusively borrowed for the call. (A TAP returns a frame's whole length even
            // when it did not fit, which is why the length is checked below.)
            let n = unsafe {
                libc::read(self.tap.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len())
            };
            let result = usize::try_from(n).map_err(|_| std::io::Error::last_os_error());
            match result {
                Ok(n) if n > buffer.len() => self.stats.rx_too_big += 1,
                Ok(n) if n < HEADER_LEN + MIN_FRAME => self.stats.rx_errors += 1,
                Ok(n) => {
                    // More may follow: the TAP is read again when this frame has a chain.
                    self.rx.tap_wait = false;
                    return Some(n - HEADER_LEN);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if e.kind() == std::io::ErrorKind::WouldBlock {
                        self.rx.tap_wait = true;
                    } else {
                        // The TAP is gone or broken: try again at the next receive
                        // notification, not in a loop.
                        self.stats.rx_errors += 1;
                    }
                    return None;
                }
            }
        }
    }

    /// Copies the pending frame of `len` bytes (after its header) into `chain`; returns the
    /// used length and whether the frame is consumed (delivered or dropped).
    fn deliver(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
        len: usize,
    ) -> (u32, bool) {
        let all_writable = chain.clone().all(|d| d.is_write_only());
        let writer = if all_writable { chain.writer(mem).ok() } else { None };
        let Some(mut writer) = writer else {
            self.stats.rx_bad_chains += 1;
            return (0, false);
        };
        let total = HEADER_LEN + len;
        if writer.available_bytes() < total {
            self.stats.rx_too_big += 1;
            return (0, true);
        }
        let Some(frame) = self.rx.buffer.get_mut(..total) else { return (0, true) };
        // The TAP writes the first 10 bytes of the header; num_buffers is the device's: one
        // buffer, as MRG_RXBUF is not offered.
        frame[10..12].copy_from_slice(&1u16.to_le_bytes());
        if self.acked & GUEST_CSUM == 0 {
            // Without GUEST_CSUM the flags must be zero (the TAP may say DATA_VALID); the
            // TAP checksums and segments everything itself when its offloads are off.
            frame[0] = 0;
        }
        match writer.write_all(frame) {
            Ok(()) => {
                self.stats.rx_frames += 1;
                self.stats.rx_bytes += total as u64;
                (u32::try_from(total).unwrap_or(0), true)
            }
            Err(_) => {
                self.stats.rx_bad_chains += 1;
                (0, false)
            }
        }
    }

    /// Fills receive chains with frames from the TAP until either runs out (or the rate
    /// limiter says wait).
    fn process_rx(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
    ) -> Result<bool, DeviceError> {
        let queue_err =
            |e: virtio_queue::Error| DeviceError::Queue { queue: RX_QUEUE, reason: e.to_string() };
        let mut used_any = false;
        let mut chains = 0;
        loop {
            let len = match self.rx.pending {
                Some(len) => len,
                None => match self.read_frame() {
                    Some(len) => {
                        self.rx.pending = Some(len);
                        len
                    }
                    None => break,
                },
            };
            let Some(chain) = queue.iter(mem).map_err(queue_err)?.next() else {
                // No buffers: the frame waits, and the TAP is not read until the driver
                // notifies the queue.
                break;
            };
            if !consume(&mut self.rx_limiter, (HEADER_LEN + len) as u64) {
                queue.go_to_previous_position();
                break;
            }
            let head = chain.head_index();
            let (used, consumed) = self.deliver(mem, chain, len);
            if consumed {
                self.rx.pending = None;
            }
            queue.add_used(mem, head, used).map_err(queue_err)?;
            used_any = true;
            chains += 1;
            if chains == RX_BATCH {
                // There may be more: the worker comes back at once, after the other queue.
                let _ = self.kick.write(1);
                break;
            }
        }
        Ok(used_any)
    }

    /// Checks a transmit chain's header against the negotiated features: offloads the
    /// driver did not negotiate are malformed.
    fn header_allowed(&self, header: &[u8; HEADER_LEN]) -> bool {
        let (flags, gso) = (header[0], header[1]);
        if flags & !HDR_F_NEEDS_CSUM != 0 {
            return false;
        }
        if flags & HDR_F_NEEDS_CSUM != 0 && self.acked & CSUM == 0 {
            return false;
        }
        match gso {
            GSO_NONE => true,
            GSO_TCPV4 => self.acked & HOST_TSO4 != 0,
            GSO_TCPV6 => self.acked & HOST_TSO6 != 0,
            _ => false,
        }
    }

    /// Sends one transmit chain (header + frame) to the TAP in one writev from guest memory.
    fn transmit(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    ) {
        let mut slices = Vec::new();
        let mut total = 0usize;
        for desc in chain.clone() {
            let len = usize::try_from(desc.len()).unwrap_or(usize::MAX);
            total = total.saturating_add(len);
            if desc.is_write_only() || total > HEADER_LEN + MAX_FRAME {
                self.stats.tx_malformed += 1;
                return;
            }
            for slice in mem.get_slices(desc.addr(), len) {
                match slice {
                    Ok(slice) if slices.len() < MAX_IOVECS => slices.push(slice),
                    _ => {
                        self.stats.tx_malformed += 1;
                        return;
                    }
                }
            }
        }
        let mut header = [0u8; HEADER_LEN];
        let header_read =
            chain.reader(mem).ok().is_some_and(|mut r| r.read_exact(&mut header).is_ok());
        if total < HEADER_LEN + MIN_FRAME || !header_read || !self.header_allowed(&header) {
            self.stats.tx_malformed += 1;
            return;
        }
        let guards: Vec<_> = slices.iter().map(|s| s.ptr_guard()).collect();
        let iovecs: Vec<libc::iovec> = guards
            .iter()
            .zip(&slices)
            .map(|(guard, slice)| libc::iovec {
                iov_base: guard.as_ptr().cast_mut().cast(),
                iov_len: slice.len(),
            })
            .collect();
        let count = libc::c_int::try_from(iovecs.len()).unwrap_or(0);
        loop {
            // SAFETY: every iovec covers guest memory that `slices` validated and that stays
            // mapped for the VM's life (the guards are alive); writev only reads it.
            let n = unsafe { libc::writev(self.tap.as_raw_fd(), iovecs.as_ptr(), count) };
            if n >= 0 {
                self.stats.tx_frames += 1;
                self.stats.tx_bytes += total as u64;
                return;
            }
            if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                // The TAP's queue is full (EAGAIN), the interface is down or gone, or the
                // kernel refused the header: the frame is lost, as on a wire.
                self.stats.tx_errors += 1;
                return;
            }
        }
    }

    /// Sends every available transmit chain (until the rate limiter says wait).
    fn process_tx(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
    ) -> Result<bool, DeviceError> {
        crate::drain_queue(mem, TX_QUEUE, queue, |chain| {
            let bytes = chain.clone().fold(0u64, |sum, d| sum.saturating_add(u64::from(d.len())));
            if !consume(&mut self.tx_limiter, bytes) {
                return None;
            }
            self.transmit(mem, chain);
            Some(0)
        })
    }
}

/// Takes one operation and `bytes` from `limiter`; false (and nothing taken) if it refuses,
/// in which case its timer will wake the worker.
fn consume(limiter: &mut RateLimiter, bytes: u64) -> bool {
    limiter.apply_pending_updates();
    if limiter.is_unlimited() {
        return true;
    }
    limiter.consume(1, TokenType::Ops)
        && (limiter.consume(bytes, TokenType::Bytes) || {
            limiter.manual_replenish(1, TokenType::Ops);
            false
        })
}

/// Which of [`Net`]'s event descriptors ([`VirtioDevice::event_fds`]) is which: the TAP
/// (readable: frames to receive).
pub const EVENT_TAP: usize = 0;
/// The receive rate limiter's timer.
pub const EVENT_RX_LIMITER: usize = 1;
/// The transmit rate limiter's timer.
pub const EVENT_TX_LIMITER: usize = 2;
/// The device's own eventfd: a receive pass stopped at its batch and wants to go on.
pub const EVENT_KICK: usize = 3;

impl VirtioDevice for Net {
    fn handover_fd(&self) -> Option<RawFd> {
        self.is_tap.then(|| self.tap.as_raw_fd())
    }

    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | CSUM
            | GUEST_CSUM
            | MAC
            | GUEST_TSO4
            | GUEST_TSO6
            | HOST_TSO4
            | HOST_TSO6
            | STATUS
    }

    /// mac (6 bytes), status (u16: link up), max_virtqueue_pairs (u16: 1).
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 10];
        config[..6].copy_from_slice(&self.mac);
        config[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        crate::read_config_bytes(&config, offset, data);
    }

    fn process_queue(
        &mut self,
        mem: &GuestMemoryMmap,
        index: u16,
        queue: &mut Queue,
    ) -> Result<bool, DeviceError> {
        match index {
            RX_QUEUE => self.process_rx(mem, queue),
            TX_QUEUE => self.process_tx(mem, queue),
            _ => Ok(false),
        }
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features;
        let mut offload = 0;
        if features & GUEST_CSUM != 0 {
            offload |= libc::TUN_F_CSUM;
            // The TAP segments only frames it may also leave partially checksummed.
            if features & GUEST_TSO4 != 0 {
                offload |= libc::TUN_F_TSO4;
            }
            if features & GUEST_TSO6 != 0 {
                offload |= libc::TUN_F_TSO6;
            }
        }
        // On failure the TAP keeps handing over whole frames, which every driver takes.
        let _ = self.set_offload(offload);
    }

    fn reset(&mut self) {
        if self.rx.pending.take().is_some() {
            self.stats.rx_dropped_at_reset += 1;
        }
        self.rx.tap_wait = true;
        self.acked = 0;
        let _ = self.set_offload(0);
    }

    fn event_fds(&self) -> Vec<RawFd> {
        vec![
            self.tap.as_raw_fd(),
            self.rx_limiter.as_raw_fd(),
            self.tx_limiter.as_raw_fd(),
            self.kick.as_raw_fd(),
        ]
    }

    fn event_wanted(&self, which: usize) -> bool {
        which != EVENT_TAP || self.rx.tap_wait
    }

    fn event_ready(&mut self, which: usize) {
        match which {
            EVENT_TAP => self.rx.tap_wait = false,
            EVENT_RX_LIMITER => {
                let _ = self.rx_limiter.event_handler();
            }
            EVENT_TX_LIMITER => {
                let _ = self.tx_limiter.event_handler();
            }
            EVENT_KICK => {
                let _ = self.kick.read();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixDatagram;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};

    const A: u64 = 0x10_0000;
    const B: u64 = 0x20_0000;
    const C: u64 = 0x30_0000;
    /// Past the end of the test's guest memory.
    const OUTSIDE: u64 = 0x4000_0000;
    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;
    const MAC_ADDR: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
    }

    /// A device on one end of a datagram socket pair (frame boundaries kept, as on a TAP);
    /// the test plays the host's network on the other end.
    fn device() -> (Net, UnixDatagram) {
        let (ours, peer) = UnixDatagram::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        peer.set_nonblocking(true).unwrap();
        let net = Net::with_backend(File::from(OwnedFd::from(ours)), "test", MAC_ADDR, false);
        (net.unwrap(), peer)
    }

    /// A header (`flags`, `gso_type`, num_buffers garbage) and an Ethernet frame of `len`
    /// bytes, all different.
    fn packet(flags: u8, gso: u8, len: usize, seed: u8) -> Vec<u8> {
        let mut p = vec![flags, gso, 0, 0, 0, 0, 0, 0, 0, 0, 0xee, 0xee];
        p.extend((0..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
        p
    }

    /// A queue the test keeps adding chains to.
    struct Ring<'a> {
        mem: &'a GuestMemoryMmap,
        vq: MockSplitQueue<'a, GuestMemoryMmap>,
        queue: Queue,
        next_desc: u16,
    }

    impl<'a> Ring<'a> {
        fn new(mem: &'a GuestMemoryMmap) -> Ring<'a> {
            Ring::at(mem, 0)
        }

        /// A ring whose descriptor table starts at `base`.
        fn at(mem: &'a GuestMemoryMmap, base: u64) -> Ring<'a> {
            let vq = MockSplitQueue::create(mem, GuestAddress(base), 64);
            let queue = vq.create_queue().unwrap();
            Ring { mem, vq, queue, next_desc: 0 }
        }

        /// Makes one chain of (address, length, flags) available.
        fn push(&mut self, descs: &[(u64, u32, u16)]) {
            let first = self.next_desc;
            let raw: Vec<RawDescriptor> = descs
                .iter()
                .enumerate()
                .map(|(i, (a, l, f))| {
                    RawDescriptor::from(Descriptor::new(*a, *l, *f, first + i as u16 + 1))
                })
                .collect();
            self.vq.add_desc_chains(&raw, first).unwrap();
            self.next_desc = first + descs.len() as u16;
        }

        fn serve(&mut self, net: &mut Net, index: u16) -> bool {
            net.process_queue(self.mem, index, &mut self.queue).unwrap()
        }

        /// How many chains the device has used.
        fn used(&self) -> u16 {
            self.mem.read_obj(self.vq.used_addr().unchecked_add(2)).unwrap()
        }

        /// The used length of the `n`th used chain.
        fn used_len(&self, n: u64) -> u32 {
            self.mem.read_obj(self.vq.used_addr().unchecked_add(4 + 8 * n + 4)).unwrap()
        }
    }

    fn guest_bytes(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// Every datagram the device sent.
    fn sent(peer: &UnixDatagram) -> Vec<Vec<u8>> {
        let mut all = Vec::new();
        let mut buf = vec![0u8; 1 << 17];
        while let Ok(n) = peer.recv(&mut buf) {
            all.push(buf[..n].to_vec());
        }
        all
    }

    #[test]
    fn offers_the_features_and_configuration() {
        let (net, _peer) = device();
        let f = net.features();
        for bit in [VIRTIO_F_VERSION_1, CSUM, GUEST_CSUM, MAC, STATUS, HOST_TSO4, GUEST_TSO6] {
            assert_ne!(f & bit, 0, "{bit:#x}");
        }
        assert_eq!(f & MRG_RXBUF, 0);
        assert_eq!(net.queue_max_sizes(), &[256, 256]);
        let mut config = [0xffu8; 12];
        net.read_config(0, &mut config);
        assert_eq!(config, [0x52, 0x54, 0, 0x12, 0x34, 0x56, 1, 0, 1, 0, 0, 0]);
        let mut status = [0u8; 2];
        net.read_config(6, &mut status);
        assert_eq!(u16::from_le_bytes(status), VIRTIO_NET_S_LINK_UP);
        net.read_config(u64::MAX, &mut status);
        assert_eq!(status, [0, 0]);
    }

    #[test]
    fn transmits_header_and_frame_in_one_write() {
        let (mut net, peer) = device();
        let mem = mem();
        let mut ring = Ring::new(&mem);
        let p = packet(0, 0, 60, 1);
        mem.write_slice(&p[..12], GuestAddress(A)).unwrap();
        mem.write_slice(&p[12..], GuestAddress(B)).unwrap();
        ring.push(&[(A, 12, NEXT), (B, 60, 0)]);
        // The header split across buffers, and header and frame sharing one.
        mem.write_slice(&p[..5], GuestAddress(C)).unwrap();
        mem.write_slice(&p[5..], GuestAddress(C + 0x1000)).unwrap();
        ring.push(&[(C, 5, NEXT), (C + 0x1000, 67, 0)]);
        mem.write_slice(&p, GuestAddress(C + 0x2000)).unwrap();
        ring.push(&[(C + 0x2000, 72, 0)]);
        assert!(ring.serve(&mut net, TX_QUEUE));
        assert_eq!(ring.used(), 3);
        assert_eq!((ring.used_len(0), ring.used_len(1), ring.used_len(2)), (0, 0, 0));
        assert_eq!(sent(&peer), vec![p.clone(), p.clone(), p]);
        assert_eq!((net.stats().tx_frames, net.stats().tx_bytes), (3, 216));
    }

    #[test]
    fn malformed_transmit_chains_are_returned_unsent() {
        let (mut net, peer) = device();
        let mem = mem();
        let mut ring = Ring::new(&mem);
        mem.write_slice(&packet(0, 0, 1000, 2), GuestAddress(A)).unwrap();
        mem.write_slice(&packet(0, GSO_TCPV4, 1000, 3), GuestAddress(B)).unwrap();
        mem.write_slice(&packet(HDR_F_NEEDS_CSUM, 0, 1000, 4), GuestAddress(C)).unwrap();
        let cases: [&[(u64, u32, u16)]; 9] = [
            // A header shorter than 12 bytes, alone or before nothing.
            &[(A, 8, 0)],
            &[(A, 4, NEXT), (A + 4, 4, 0)],
            // A header and no Ethernet header.
            &[(A, 12, 0)],
            // A device-writable buffer.
            &[(A, 12, NEXT), (A + 12, 60, WRITE)],
            // Outside guest memory, whole or in part.
            &[(OUTSIDE, 72, 0)],
            &[(A, 12, NEXT), (0xff_fff0, 64, 0)],
            // More than the largest frame.
            &[(A, (HEADER_LEN + MAX_FRAME + 1) as u32, 0)],
            // Offloads not negotiated: segmentation, partial checksum.
            &[(B, 1012, 0)],
            &[(C, 1012, 0)],
        ];
        for (i, descs) in cases.iter().enumerate() {
            ring.push(descs);
            assert!(ring.serve(&mut net, TX_QUEUE), "case {i}");
            assert_eq!(ring.used(), i as u16 + 1, "case {i}");
            assert_eq!(ring.used_len(i as u64), 0, "case {i}");
            assert!(sent(&peer).is_empty(), "case {i} was sent");
            assert_eq!(net.stats().tx_malformed, i as u64 + 1, "case {i}");
        }
        // Negotiated, the same offloads go through.
        net.ack_features(VIRTIO_F_VERSION_1 | CSUM | HOST_TSO4);
        ring.push(&[(B, 1012, 0)]);
        ring.push(&[(C, 1012, 0)]);
        ring.serve(&mut net, TX_QUEUE);
        assert_eq!(sent(&peer).len(), 2);
        assert_eq!(net.stats().tx_frames, 2);
    }

    #[test]
    fn receives_frames_into_chains() {
        let (mut net, peer) = device();
        let mem = mem();
        let mut ring = Ring::new(&mem);
        let p = packet(2, 0, 60, 5); // DATA_VALID, which needs GUEST_CSUM
        peer.send(&p).unwrap();
        ring.push(&[(A, 2048, WRITE)]);
        assert!(ring.serve(&mut net, RX_QUEUE));
        assert_eq!((ring.used(), ring.used_len(0)), (1, 72));
        let got = guest_bytes(&mem, A, 72);
        assert_eq!(&got[..12], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0], "flags cleared, one buffer");
        assert_eq!(got[12..], p[12..]);
        // With GUEST_CSUM the flags pass; a header split across buffers.
        net.ack_features(VIRTIO_F_VERSION_1 | GUEST_CSUM);
        peer.send(&p).unwrap();
        ring.push(&[(B, 5, WRITE | NEXT), (C, 100, WRITE)]);
        ring.serve(&mut net, RX_QUEUE);
        assert_eq!((ring.used(), ring.used_len(1)), (2, 72));
        let mut got = guest_bytes(&mem, B, 5);
        got.extend(guest_bytes(&mem, C, 67));
        assert_eq!(&got[..12], &[2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        assert_eq!(got[12..], p[12..]);
        assert_eq!((net.stats().rx_frames, net.stats().rx_bytes), (2, 144));
    }

    /// With no receive buffer the frame waits and the TAP is not read (nor waited on) until
    /// the driver adds buffers; nothing is lost.
    #[test]
    fn receive_waits_for_buffers() {
        let (mut net, peer) = device();
        let mem = mem();
        let mut ring = Ring::new(&mem);
        for seed in 0..3 {
            peer.send(&packet(0, 0, 100, seed)).unwrap();
        }
        assert!(net.event_wanted(EVENT_TAP));
        net.event_ready(EVENT_TAP);
        assert!(!ring.serve(&mut net, RX_QUEUE), "no buffers yet");
        assert!(!net.event_wanted(EVENT_TAP), "frames wait: the TAP is left alone");
        ring.push(&[(A, 2048, WRITE)]);
        assert!(ring.serve(&mut net, RX_QUEUE));
        assert_eq!(ring.used(), 1);
        assert!(!net.event_wanted(EVENT_TAP));
        ring.push(&[(B, 2048, WRITE)]);
        ring.push(&[(C, 2048, WRITE)]);
        ring.push(&[(C + 0x1000, 2048, WRITE)]);
        ring.serve(&mut net, RX_QUEUE);
        assert_eq!(ring.used(), 3, "the other two frames, then the TAP is empty");
        assert!(net.event_wanted(EVENT_TAP), "empty: wait for the TAP again");
        for (i, addr) in [A, B, C].into_iter().enumerate() {
            assert_eq!(guest_bytes(&mem, addr + 12, 100), packet(0, 0, 100, i as u8)[12..]);
        }
        assert_eq!(net.stats().rx_frames, 3);
    }

    /// A pass takes at most RX_BATCH frames and brings the worker back for the rest.
    #[test]
    fn receive_passes_are_batches() {
        let (mut net, peer) = device();
        let mem = mem();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 256);
        let mut queue: Queue = vq.create_queue().unwrap();
        let total = RX_BATCH + 10;
        for i in 0..total {
            peer.send(&packet(0, 0, 60, i as u8)).unwrap();
        }
        let raw: Vec<RawDescriptor> = (0..total)
            .map(|i| RawDescriptor::from(Descriptor::new(A + 2048 * i as u64, 2048, WRITE, 0)))
            .collect();
        vq.add_desc_chains(&raw, 0).unwrap();
        let kick = net.event_fds()[EVENT_KICK];
        let mut pollfd = libc::pollfd { fd: kick, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, exclusively borrowed for the call.
        assert_eq!(unsafe { libc::poll(&mut pollfd, 1, 0) }, 0, "not kicked yet");
        assert!(net.process_queue(&mem, RX_QUEUE, &mut queue).unwrap());
        let used = |mem: &GuestMemoryMmap| -> u16 {
            mem.read_obj(vq.used_addr().unchecked_add(2)).unwrap()
        };
        assert_eq!(usize::from(used(&mem)), RX_BATCH);
        // SAFETY: as above.
        assert_eq!(unsafe { libc::poll(&mut pollfd, 1, 0) }, 1, "the worker is called back");
        net.event_ready(EVENT_KICK);
        // SAFETY: as above.
        assert_eq!(unsafe { libc::poll(&mut pollfd, 1, 0) }, 0, "the kick was taken");
        net.process_queue(&mem, RX_QUEUE, &mut queue).unwrap();
        assert_eq!(usize::from(used(&mem)), total);
        assert!(net.event_wanted(EVENT_TAP));
    }

    #[test]
    fn frames_larger_than_the_chain_are_dropped_and_counted() {
        let (mut net, peer) = device();
        let mem = mem();
        let mut ring = Ring::new(&mem);
        peer.send(&packet(0, 0, 1000, 1)).unwrap();
        peer.send(&packet(0, 0, 60, 2)).unwrap();
        ring.push(&[(A, 100, WRITE)]);
        ring.push(&[(B, 2048, WRITE)]);
        ring.serve(&mut net, RX_QUEUE);
        assert_eq!(ring.used(), 2);
        assert_eq!((ring.used_len(0), ring.used_len(1)), (0, 72));
        assert_eq!(guest_bytes(&mem, B + 12, 60), packet(0, 0, 60, 2)[12..]);
        assert_eq!((net.stats().rx_too_big, net.stats().rx_frames), (1, 1));
        // A chain too small for even a header.
        peer.send(&packet(0, 0, 60, 3)).unwrap();
        ring.push(&[(A, 11, WRITE)]);
        ring.serve(&mut net, RX_QUEUE);
        assert_eq!((ring.used(), ring.used_len(2)), (3, 0));
        assert_eq!(net.stats().rx_too_big, 2);
    }

    /// Chains the device cannot write are returned empty; the frame goes to the next one.
    #[test]
    fn bad_receive_chains_are_returned_empty() {
        let (mut net, peer) = device();
        let mem = mem();
        let mut ring = Ring::new(&mem);
        peer.send(&packet(0, 0, 60, 9)).unwrap();
        ring.push(&[(A, 2048, 0)]); // device-readable
        ring.push(&[(A, 12, NEXT), (B, 2048, WRITE)]); // a readable one first
        ring.push(&[(OUTSIDE, 2048, WRITE)]);
        ring.push(&[(B, 12, WRITE | NEXT), (0xff_ff00, 2048, WRITE)]); // runs off the end
        ring.push(&[(C, 2048, WRITE)]);
        ring.serve(&mut net, RX_QUEUE);
        assert_eq!(ring.used(), 5);
        for n in 0..4 {
            assert_eq!(ring.used_len(n), 0, "chain {n}");
        }
        assert_eq!(ring.used_len(4), 72);
        assert_eq!(guest_bytes(&mem, C + 12, 60), packet(0, 0, 60, 9)[12..]);
        assert_eq!((net.stats().rx_bad_chains, net.stats().rx_frames), (4, 1));
    }

    #[test]
    fn short_reads_are_counted_and_skipped() {
        let (mut net, peer) = device();
        let mem = mem();
        let mut ring = Ring::new(&mem);
        peer.send(&[0u8; 20]).unwrap();
        peer.send(&packet(0, 0, 60, 1)).unwrap();
        ring.push(&[(A, 2048, WRITE)]);
        ring.serve(&mut net, RX_QUEUE);
        assert_eq!((ring.used(), ring.used_len(0)), (1, 72));
        assert_eq!(net.stats().rx_errors, 1);
    }

    /// A reset drops the frame waiting for a buffer (counted) and waits for the TAP again.
    #[test]
    fn reset_drops_the_waiting_frame() {
        let (mut net, peer) = device();
        let mem = mem();
        let mut ring = Ring::new(&mem);
        peer.send(&packet(0, 0, 60, 1)).unwrap();
        ring.serve(&mut net, RX_QUEUE);
        assert!(!net.event_wanted(EVENT_TAP));
        net.reset();
        assert!(net.event_wanted(EVENT_TAP));
        assert_eq!(net.stats().rx_dropped_at_reset, 1);
    }

    fn ops_per_day(n: u64) -> RateLimiterConfig {
        format!("ops={n}/24h").parse().unwrap()
    }

    #[test]
    fn rate_limits_hold_each_way() {
        let (net, peer) = device();
        let mut net = net.with_rate_limit(&ops_per_day(1)).unwrap();
        let (rx_handle, tx_handle) = net.rate_limit_handles();
        let mem = mem();
        let (mut rx, mut tx) = (Ring::new(&mem), Ring::at(&mem, 0x8000));
        mem.write_slice(&packet(0, 0, 60, 1), GuestAddress(A)).unwrap();
        tx.push(&[(A, 72, 0)]);
        tx.push(&[(A, 72, 0)]);
        tx.serve(&mut net, TX_QUEUE);
        assert_eq!(tx.used(), 1, "one frame a day");
        assert_eq!(sent(&peer).len(), 1);
        tx_handle.update(None).unwrap();
        net.event_ready(EVENT_TX_LIMITER);
        tx.serve(&mut net, TX_QUEUE);
        assert_eq!(tx.used(), 2, "lifted");
        // Receive has its own budget.
        peer.send(&packet(0, 0, 60, 2)).unwrap();
        peer.send(&packet(0, 0, 60, 3)).unwrap();
        rx.push(&[(B, 2048, WRITE)]);
        rx.push(&[(C, 2048, WRITE)]);
        rx.serve(&mut net, RX_QUEUE);
        assert_eq!(rx.used(), 1);
        assert!(!net.event_wanted(EVENT_TAP), "a frame waits for the limiter, not the TAP");
        rx_handle.update(None).unwrap();
        net.event_ready(EVENT_RX_LIMITER);
        rx.serve(&mut net, RX_QUEUE);
        assert_eq!(rx.used(), 2);
        assert_eq!(guest_bytes(&mem, C + 12, 60), packet(0, 0, 60, 3)[12..]);
    }

    #[test]
    fn tap_names_are_checked() {
        for name in ["vg0", "tap-1.2_x", "a23456789012345"] {
            assert!(validate_tap_name(name).is_ok(), "{name}");
        }
        for (name, reason) in [
            ("", "empty"),
            ("a234567890123456", "longer than 15 bytes"),
            ("..", "not a name"),
            ("a/b", "contains"),
            ("a b", "contains"),
            ("vg%d", "contains"),
            ("a:1", "contains"),
        ] {
            let error = validate_tap_name(name).unwrap_err().to_string();
            assert!(error.starts_with(&format!("invalid TAP name '{name}': {reason}")), "{error}");
        }
    }

    /// Whether this process may create TAPs; prints why not (or fails under
    /// VANGUARD_REQUIRE_KVM=1, as the integration tests do).
    fn can_create_taps() -> bool {
        let tun = std::path::Path::new("/dev/net/tun").exists();
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let cap_net_admin = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .is_some_and(|caps| caps & (1 << 12) != 0);
        if tun && cap_net_admin {
            return true;
        }
        let why = if tun { "no CAP_NET_ADMIN" } else { "no /dev/net/tun" };
        assert!(std::env::var("VANGUARD_REQUIRE_KVM").as_deref() != Ok("1"), "{why}");
        println!("skipping: {why}");
        false
    }

    fn tap_exists(name: &str) -> bool {
        std::path::Path::new("/sys/class/net").join(name).exists()
    }

    /// A TAP that does not exist is created, with the flags asked for, and goes away with
    /// the device; the offloads a driver accepts are set without error.
    #[test]
    fn opening_a_missing_tap_creates_it_for_the_device_lifetime() {
        if !can_create_taps() {
            return;
        }
        let name = format!("vgu{}", std::process::id());
        assert!(!tap_exists(&name));
        let mut net = Net::open(&name, MAC_ADDR).unwrap();
        assert!(tap_exists(&name));
        // One device per TAP.
        let busy = Net::open(&name, MAC_ADDR).err().unwrap().to_string();
        assert_eq!(
            busy,
            format!(
                "cannot open TAP device {name}: TUNSETIFF (it is attached already: another \
                 process, or another --net)"
            )
        );
        let flags = std::fs::read_to_string(format!("/sys/class/net/{name}/tun_flags")).unwrap();
        let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap();
        let wanted = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as u32;
        assert_eq!(flags & wanted, wanted, "tun_flags {flags:#x}");
        net.ack_features(VIRTIO_F_VERSION_1 | GUEST_CSUM | GUEST_TSO4 | GUEST_TSO6);
        net.reset();
        assert_eq!(net.stats().offload_errors, 0);
        drop(net);
        assert!(!tap_exists(&name), "the TAP outlived its device");
    }

    #[test]
    fn an_interface_that_is_not_a_tap_is_refused_by_name() {
        if !can_create_taps() {
            return;
        }
        let error = Net::open("lo", MAC_ADDR).err().unwrap();
        let text = error.to_string();
        assert_eq!(
            text,
            "cannot open TAP device lo: TUNSETIFF (an interface of that name exists and is not \
             a TAP, or has other flags)"
        );
        let source = std::error::Error::source(&error).unwrap().to_string();
        assert!(source.contains("Invalid argument"), "{source}");
    }

    /// Without CAP_NET_ADMIN (dropped on this thread only) creating a TAP fails with a line
    /// that names the TAP and the capability.
    #[test]
    fn creating_a_tap_without_cap_net_admin_is_a_clear_error() {
        if !can_create_taps() {
            return;
        }
        #[repr(C)]
        struct Header {
            version: u32,
            pid: libc::c_int,
        }
        #[repr(C)]
        #[derive(Clone, Copy, Default)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        let name = format!("vgp{}", std::process::id());
        let error = std::thread::spawn(move || {
            // Capabilities are per thread: pid 0 is this thread alone.
            let header = Header { version: 0x2008_0522, pid: 0 };
            let mut data = [Data::default(); 2];
            // SAFETY: capget writes two `Data` (version 3) into `data`, valid for the call.
            let rc = unsafe { libc::syscall(libc::SYS_capget, &header, data.as_mut_ptr()) };
            assert_eq!(rc, 0);
            data[0].effective &= !(1 << 12); // CAP_NET_ADMIN
                                             // SAFETY: capset reads the header and two `Data`, valid for the call.
            let rc = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
            assert_eq!(rc, 0);
            Net::open(&name, MAC_ADDR).err().map(|e| e.to_string())
        })
        .join()
        .unwrap()
        .expect("opening must fail without CAP_NET_ADMIN");
        assert_eq!(
            error,
            format!(
                "cannot open TAP device vgp{}: TUNSETIFF (creating a TAP, or attaching to one \
                 this user does not own, needs CAP_NET_ADMIN)",
                std::process::id()
            )
        );
    }
}
