//! virtio-vsock (device ID 19) with its host side on Unix sockets, in Firecracker's
//! convention: queues rx (0), tx (1) and event (2); the configuration space holds the guest's
//! CID (u64). Every packet starts with the 44-byte little-endian `virtio_vsock_hdr`; only
//! stream sockets (type 1) exist.
//!
//! - **Host to guest**: the VMM listens on the Unix socket PATH. A host program connects and
//!   writes `CONNECT <port>\n`; the device sends the guest a REQUEST to that port from an
//!   ephemeral host port and, when the guest answers RESPONSE, writes `OK <host port>\n` to
//!   the program. An RST (nobody listens in the guest) closes the program's connection.
//! - **Guest to host**: a REQUEST to host port P connects to the Unix socket `PATH_P`; the
//!   device answers RESPONSE, or RST if nobody accepts there.
//! - **Data**: RW packets each way, with credit-based flow control: the device never sends
//!   more than the guest's `buf_alloc - (tx_cnt - fwd_cnt)`, and stops reading a host socket
//!   while that is zero; it advertises [`CONN_BUFFER`] bytes of its own per connection, which
//!   bounds what it holds for a host socket that does not read, and sends CREDIT_UPDATE as
//!   the host consumes. A guest that sends beyond its credit is reset.
//! - **Closing**: SHUTDOWN from the guest with both flags (after the buffered bytes reached
//!   the host) closes the host socket and is answered with RST; SHUTDOWN with SEND half-closes
//!   it. EOF from the host becomes SHUTDOWN(SEND) to the guest; a host socket error becomes
//!   RST.
//!
//! The worker thread waits on one epoll descriptor owned by the device (its only entry in
//! [`VirtioDevice::event_fds`]): the listener, every connection's socket (edge-triggered,
//! added and removed as connections come and go), a kick eventfd through which the tx path
//! asks for another rx pass, and a timer that drops connections pending for longer than
//! [`PENDING_TIMEOUT`] (a host program that never sends its line, a REQUEST never answered). Guest packets are hostile: a short header, a length beyond
//! the chain or [`MAX_PAYLOAD`], a wrong CID, an unknown type or op are dropped (with RST
//! where a connection exists); at most [`MAX_CONNECTIONS`] connections live at once.

use crate::{DeviceError, VirtioDevice, VIRTIO_F_VERSION_1};
use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

/// The virtio device ID of a socket device.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// Size offered for every queue.
pub const QUEUE_SIZE: u16 = 256;
/// The receive queue (device to driver).
pub const RX_QUEUE: u16 = 0;
/// The transmit queue (driver to device).
pub const TX_QUEUE: u16 = 1;
/// The event queue (transport resets; unused).
pub const EVENT_QUEUE: u16 = 2;
/// Bytes of `virtio_vsock_hdr`.
pub const HEADER_LEN: usize = 44;
/// The host's CID.
pub const HOST_CID: u64 = 2;
/// The largest payload of one packet either way (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// The buffer the device advertises (`buf_alloc`) per connection: the most guest bytes it
/// holds for a host socket that is not reading.
pub const CONN_BUFFER: u32 = 256 * 1024;
/// The most connections alive at once (either direction, handshakes included).
pub const MAX_CONNECTIONS: usize = 1024;
/// The most control packets waiting for receive buffers.
const MAX_CONTROL: usize = 4 * MAX_CONNECTIONS;
/// The longest `CONNECT <port>\n` line read from a host program.
const MAX_CONNECT_LINE: usize = 32;
/// The first ephemeral host port handed to host-initiated connections.
const FIRST_EPHEMERAL_PORT: u32 = 1 << 30;
/// The only socket type: stream.
pub const TYPE_STREAM: u16 = 1;

/// Packet operations (virtio 1.2, 5.10.6).
pub mod op {
    /// Connect.
    pub const REQUEST: u16 = 1;
    /// Accept.
    pub const RESPONSE: u16 = 2;
    /// Refuse or abort.
    pub const RST: u16 = 3;
    /// No more receiving (flag 1) and/or sending (flag 2).
    pub const SHUTDOWN: u16 = 4;
    /// Data.
    pub const RW: u16 = 5;
    /// Here is my credit.
    pub const CREDIT_UPDATE: u16 = 6;
    /// Tell me your credit.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN flags: the sender will receive no more, will send no more.
pub const SHUTDOWN_RCV: u32 = 1;
/// See [`SHUTDOWN_RCV`].
pub const SHUTDOWN_SEND: u32 = 2;

/// How long a host program may take to send its `CONNECT` line, and the guest to answer a
/// REQUEST, before the connection is dropped (Firecracker allows 2 s too).
pub const PENDING_TIMEOUT: Duration = Duration::from_secs(2);

/// epoll tokens: the listener, the kick eventfd, the timeout timer; connections from 3 up.
const TOKEN_LISTENER: u64 = 0;
const TOKEN_KICK: u64 = 1;
const TOKEN_TIMER: u64 = 2;
const FIRST_CONN_TOKEN: u64 = 3;

/// Errors creating a vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// CIDs 0-2 are reserved, and the upper 32 bits must be zero (u32::MAX means "any").
    #[error("invalid vsock cid {0}: use 3 to 4294967294")]
    InvalidCid(u64),
    /// Another process accepts connections on the socket.
    #[error("vsock socket {} is in use: another process accepts connections on it", .0.display())]
    SocketInUse(PathBuf),
    /// Something that is not a socket is in the way.
    #[error("vsock socket {} exists and is not a socket; not replacing it", .0.display())]
    NotASocket(PathBuf),
    /// The socket cannot be checked, removed or created.
    #[error("cannot listen on vsock socket {}", path.display())]
    Socket {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// epoll or eventfd failed.
    #[error("cannot create the vsock device's descriptors")]
    Setup(#[source] std::io::Error),
}

/// Checks a guest CID: 3 to 2^32 - 2.
pub fn validate_cid(cid: u64) -> Result<(), VsockError> {
    if (3..u64::from(u32::MAX)).contains(&cid) {
        Ok(())
    } else {
        Err(VsockError::InvalidCid(cid))
    }
}

/// `virtio_vsock_hdr`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload bytes after the header.
    pub len: u32,
    /// Socket type (1: stream).
    pub kind: u16,
    /// Operation.
    pub op: u16,
    /// Operation flags (SHUTDOWN).
    pub flags: u32,
    /// The sender's receive buffer.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed.
    pub fwd_cnt: u32,
}

impl Header {
    /// Decodes 44 little-endian bytes.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Header {
        let u64_at = |i: usize| {
            let mut v = [0u8; 8];
            v.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(v)
        };
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            kind: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encodes into 44 little-endian bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// What the device has counted since it was created.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct VsockStats {
    /// Guest packets dropped as malformed (short, too long, wrong CID, unknown type or op).
    pub tx_malformed: u64,
    /// Packets handed to the guest.
    pub rx_packets: u64,
    /// Receive chains the device could not write (returned with length 0).
    pub rx_bad_chains: u64,
    /// Connections established, either direction.
    pub connections: u64,
    /// Control packets dropped because too many were waiting for receive buffers.
    pub control_dropped: u64,
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// A host program connected; its `CONNECT <port>` line is still being read.
    Handshake,
    /// REQUEST sent to the guest; waiting for RESPONSE or RST.
    Connecting,
    /// Data flows.
    Established,
    /// The guest shut down both ways: the buffered bytes go to the host, then RST.
    Closing,
}

/// One connection: a host Unix stream and the guest port it talks to.
struct Conn {
    stream: UnixStream,
    state: State,
    /// (host port, guest port); meaningless in Handshake.
    key: (u32, u32),
    /// The host socket may have bytes (or EOF) to read.
    readable: bool,
    /// The host sent EOF (SHUTDOWN(SEND) queued for the guest).
    host_eof: bool,
    /// The guest will send no more: shut the host socket's write side once `to_host` drains.
    guest_send_done: bool,
    /// The guest will receive no more: stop reading the host socket.
    guest_rcv_done: bool,
    /// Guest bytes (and the `OK` line) not yet written to the host socket.
    to_host: VecDeque<u8>,
    /// Bytes at the front of `to_host` that are the device's own (the `OK` line), which do
    /// not count as consumed guest bytes.
    own_bytes: usize,
    /// Bytes sent to the guest, and the guest's last advertised buffer and consumption.
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Guest bytes written to the host socket, and the count last told to the guest.
    fwd_cnt: u32,
    fwd_cnt_sent: u32,
    /// A CREDIT_UPDATE is owed to the guest.
    credit_update: bool,
    /// When the connection entered its state (for the Handshake and Connecting timeouts).
    since: Instant,
}

impl Conn {
    fn new(stream: UnixStream, state: State, key: (u32, u32)) -> Conn {
        Conn {
            stream,
            state,
            key,
            readable: true,
            host_eof: false,
            guest_send_done: false,
            guest_rcv_done: false,
            to_host: VecDeque::new(),
            own_bytes: 0,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            credit_update: false,
            since: Instant::now(),
        }
    }

    /// Bytes the guest can take now.
    fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }
}

/// The virtio-vsock device.
pub struct Vsock {
    cid: u64,
    path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    kick: EventFd,
    /// Wakes the worker to drop connections stuck in Handshake or Connecting.
    timer: TimerFd,
    timer_armed: bool,
    /// [`PENDING_TIMEOUT`]; tests use less.
    pending_timeout: Duration,
    conns: HashMap<u64, Conn>,
    keys: HashMap<(u32, u32), u64>,
    next_token: u64,
    next_port: u32,
    /// The most connections at once ([`MAX_CONNECTIONS`]; tests use fewer).
    max_connections: usize,
    /// Packets for the guest that carry no data, in order.
    control: VecDeque<Header>,
    /// Where packets are assembled: a header and the largest payload, allocated once.
    scratch: Box<[u8]>,
    stats: VsockStats,
    /// Restored from a snapshot: the driver is told, on the event queue, that every
    /// connection it had is gone (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET).
    transport_reset: bool,
}

/// Checks the socket path: free, or a stale socket (nobody accepts on it, removed here).
fn prepare_socket(path: &Path) -> Result<(), VsockError> {
    let socket_err = |source| VsockError::Socket { path: path.to_path_buf(), source };
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(socket_err(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(VsockError::NotASocket(path.to_path_buf()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(VsockError::SocketInUse(path.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(path).map_err(socket_err)
        }
        Err(e) => Err(socket_err(e)),
    }
}

/// Connects to the Unix socket `path` without blocking (a full backlog fails at once).
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data for which all zeroes is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX).unwrap_or(1);
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: socket has no memory preconditions; the result is checked.
    let fd = unsafe {
        libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0)
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a new socket this function owns; OwnedFd closes it on every path.
    let owned = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_un>()).unwrap_or(0);
    // SAFETY: addr is a valid sockaddr_un of `len` bytes, borrowed for the call.
    let rc = unsafe { libc::connect(fd, std::ptr::addr_of!(addr).cast(), len) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}

impl Vsock {
    /// A device for the guest `cid`, listening on the Unix socket `path` (a stale socket there
    /// is replaced; one in use, or anything else, is refused). The socket file is removed
    /// when the device is dropped.
    pub fn new(cid: u64, path: &Path) -> Result<Vsock, VsockError> {
        validate_cid(cid)?;
        prepare_socket(path)?;
        let socket_err = |source| VsockError::Socket { path: path.to_path_buf(), source };
        let listener = UnixListener::bind(path).map_err(socket_err)?;
        let mut device = Vsock::with_listener(cid, path, listener)?;
        device.listener.set_nonblocking(true).map_err(socket_err)?;
        device.path = path.to_path_buf();
        Ok(device)
    }

    fn with_listener(cid: u64, path: &Path, listener: UnixListener) -> Result<Vsock, VsockError> {
        let epoll = Epoll::new().map_err(VsockError::Setup)?;
        let kick = EventFd::new(libc::EFD_NONBLOCK).map_err(VsockError::Setup)?;
        let timer = TimerFd::new().map_err(|e| VsockError::Setup(e.into()))?;
        let et = EventSet::IN | EventSet::EDGE_TRIGGERED;
        for (fd, token) in [
            (listener.as_raw_fd(), TOKEN_LISTENER),
            (kick.as_raw_fd(), TOKEN_KICK),
            (timer.as_raw_fd(), TOKEN_TIMER),
        ] {
            epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(et, token))
                .map_err(VsockError::Setup)?;
        }
        Ok(Vsock {
            cid,
            path: path.to_path_buf(),
            listener,
            epoll,
            kick,
            timer,
            timer_armed: false,
            pending_timeout: PENDING_TIMEOUT,
            conns: HashMap::new(),
            keys: HashMap::new(),
            next_token: FIRST_CONN_TOKEN,
            next_port: FIRST_EPHEMERAL_PORT,
            max_connections: MAX_CONNECTIONS,
            control: VecDeque::new(),
            scratch: vec![0u8; HEADER_LEN + MAX_PAYLOAD].into_boxed_slice(),
            stats: VsockStats::default(),
            transport_reset: false,
        })
    }

    /// The guest's CID.
    pub fn cid(&self) -> u64 {
        self.cid
    }

    /// What the device has counted.
    pub fn stats(&self) -> &VsockStats {
        &self.stats
    }

    /// Connections alive now.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// A header from the host to the guest `cid` for the connection `key`.
    fn header_for(cid: u64, key: (u32, u32), op: u16) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: cid,
            src_port: key.0,
            dst_port: key.1,
            len: 0,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_BUFFER,
            fwd_cnt: 0,
        }
    }

    /// Queues a control packet; false (and counted) if too many wait already.
    fn push_control(&mut self, header: Header) -> bool {
        if self.control.len() >= MAX_CONTROL {
            self.stats.control_dropped += 1;
            return false;
        }
        self.control.push_back(header);
        true
    }

    fn add_conn(&mut self, stream: UnixStream, state: State, key: (u32, u32)) -> Option<u64> {
        if self.conns.len() >= self.max_connections || stream.set_nonblocking(true).is_err() {
            return None;
        }
        let token = self.next_token;
        let events =
            EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        self.epoll
            .ctl(ControlOperation::Add, stream.as_raw_fd(), EpollEvent::new(events, token))
            .ok()?;
        self.next_token = self.next_token.wrapping_add(1).max(FIRST_CONN_TOKEN);
        if state != State::Handshake {
            self.keys.insert(key, token);
        } else {
            self.arm_timer();
        }
        self.conns.insert(token, Conn::new(stream, state, key));
        Some(token)
    }

    /// Makes sure the timer will fire to check the pending connections' deadlines (every
    /// quarter of the timeout while any is pending).
    fn arm_timer(&mut self) {
        if !self.timer_armed && self.timer.reset(self.pending_timeout / 4, None).is_ok() {
            self.timer_armed = true;
        }
    }

    /// Drops the connections that waited too long: a host program that never sent its
    /// `CONNECT` line is closed; one whose REQUEST the guest never answered is closed and the
    /// guest gets RST (so that a late RESPONSE finds nothing).
    fn expire_pending(&mut self) {
        self.timer_armed = false;
        let timeout = self.pending_timeout;
        let mut expired = Vec::new();
        let mut pending = false;
        for (token, conn) in &self.conns {
            if matches!(conn.state, State::Handshake | State::Connecting) {
                if conn.since.elapsed() >= timeout {
                    expired.push((*token, conn.state == State::Connecting));
                } else {
                    pending = true;
                }
            }
        }
        for (token, rst) in expired {
            self.close(token, rst);
        }
        if pending {
            self.arm_timer();
        }
    }

    /// Closes a connection (the host socket with it); with `rst`, tells the guest.
    fn close(&mut self, token: u64, rst: bool) {
        let Some(conn) = self.conns.remove(&token) else { return };
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            conn.stream.as_raw_fd(),
            EpollEvent::new(EventSet::empty(), 0),
        );
        if conn.state != State::Handshake {
            self.keys.remove(&conn.key);
            if rst {
                let header = Self::header_for(self.cid, conn.key, op::RST);
                self.push_control(header);
            }
        }
    }

    fn wake(&self) {
        let _ = self.kick.write(1);
    }

    /// Accepts every pending host connection.
    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    // Over the limit, the connection is dropped (closed) at once.
                    if let Some(token) = self.add_conn(stream, State::Handshake, (0, 0)) {
                        self.handshake(token);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    /// Reads a host program's `CONNECT <port>\n` (without taking bytes past the newline) and
    /// sends the guest a REQUEST; a malformed line or EOF closes the program's connection.
    fn handshake(&mut self, token: u64) {
        let Some(conn) = self.conns.get_mut(&token) else { return };
        let mut line = [0u8; MAX_CONNECT_LINE];
        // SAFETY: recv writes at most line.len() bytes into the buffer, borrowed for the call.
        let n = unsafe {
            libc::recv(
                conn.stream.as_raw_fd(),
                line.as_mut_ptr().cast(),
                line.len(),
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        let Ok(n) = usize::try_from(n) else {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::WouldBlock {
                conn.readable = false;
            } else if e.kind() != std::io::ErrorKind::Interrupted {
                self.close(token, false);
            }
            return;
        };
        let Some(end) = line[..n].iter().position(|b| *b == b'\n') else {
            if n == 0 || n == line.len() {
                self.close(token, false);
            } else {
                // Part of the line: wait for the rest.
                conn.readable = false;
            }
            return;
        };
        let mut taken = vec![0u8; end + 1];
        if conn.stream.read_exact(&mut taken).is_err() {
            self.close(token, false);
            return;
        }
        let port = std::str::from_utf8(&taken[..end])
            .ok()
            .and_then(|l| l.trim_end_matches('\r').strip_prefix("CONNECT "))
            .and_then(|p| p.trim().parse::<u32>().ok());
        let Some(port) = port else {
            self.close(token, false);
            return;
        };
        // An ephemeral host port no connection to that guest port uses.
        let mut local = self.next_port;
        while self.keys.contains_key(&(local, port)) {
            local = local.checked_add(1).unwrap_or(FIRST_EPHEMERAL_PORT);
        }
        self.next_port = local.checked_add(1).unwrap_or(FIRST_EPHEMERAL_PORT);
        let key = (local, port);
        if let Some(conn) = self.conns.get_mut(&token) {
            conn.state = State::Connecting;
            conn.key = key;
            conn.readable = false;
            conn.since = Instant::now();
        }
        self.arm_timer();
        self.keys.insert(key, token);
        let header = Self::header_for(self.cid, key, op::REQUEST);
        if !self.push_control(header) {
            self.close(token, false);
        }
    }

    /// Writes buffered guest bytes to the host socket; then finishes a shutdown if one waits.
    fn flush(&mut self, token: u64) {
        let Some(conn) = self.conns.get_mut(&token) else { return };
        let mut broken = false;
        while !conn.to_host.is_empty() {
            let (front, _) = conn.to_host.as_slices();
            match conn.stream.write(front) {
                Ok(0) => {
                    broken = true;
                    break;
                }
                Ok(n) => {
                    conn.to_host.drain(..n);
                    let own = n.min(conn.own_bytes);
                    conn.own_bytes -= own;
                    let guest_bytes = u32::try_from(n - own).unwrap_or(0);
                    conn.fwd_cnt = conn.fwd_cnt.wrapping_add(guest_bytes);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    broken = true;
                    break;
                }
            }
        }
        if broken {
            self.close(token, true);
            return;
        }
        let Some(conn) = self.conns.get_mut(&token) else { return };
        // Tell the guest about freed buffer once half of it is free again, or when all is.
        let unannounced = conn.fwd_cnt.wrapping_sub(conn.fwd_cnt_sent);
        if unannounced >= CONN_BUFFER / 2 || (unannounced > 0 && conn.to_host.is_empty()) {
            conn.credit_update = true;
        }
        if conn.to_host.is_empty() {
            if conn.state == State::Closing {
                let _ = conn.stream.shutdown(std::net::Shutdown::Both);
                self.close(token, true);
                return;
            }
            if conn.guest_send_done {
                let _ = conn.stream.shutdown(std::net::Shutdown::Write);
            }
        }
    }

    /// Takes note of what epoll reports: new host connections, readable and writable
    /// sockets, the kick.
    fn drain_events(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        // A bounded number of rounds: a host program that keeps writing raises new events,
        // and the queues must be served meanwhile; what is left keeps the epoll descriptor
        // readable, so the worker comes straight back.
        for _ in 0..16 {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            for event in events.iter().take(n) {
                let token = event.data();
                let set = event.event_set();
                match token {
                    TOKEN_LISTENER => self.accept_all(),
                    TOKEN_KICK => {
                        let _ = self.kick.read();
                    }
                    TOKEN_TIMER => self.expire_pending(),
                    _ => {
                        let Some(conn) = self.conns.get_mut(&token) else { continue };
                        if set.intersects(
                            EventSet::IN
                                | EventSet::READ_HANG_UP
                                | EventSet::HANG_UP
                                | EventSet::ERROR,
                        ) {
                            conn.readable = true;
                        }
                        if conn.state == State::Handshake {
                            self.handshake(token);
                        } else if set.intersects(EventSet::OUT | EventSet::ERROR) {
                            self.flush(token);
                        }
                    }
                }
            }
            if n == 0 {
                return;
            }
        }
    }

    /// Handles one packet from the guest; `payload` is its data (RW).
    fn handle_packet(&mut self, h: &Header, payload: &[u8]) {
        let key = (h.dst_port, h.src_port);
        let token = self.keys.get(&key).copied();
        let valid_type =
            h.kind == TYPE_STREAM && (op::REQUEST..=op::CREDIT_REQUEST).contains(&h.op);
        if h.src_cid != self.cid || h.dst_cid != HOST_CID || !valid_type {
            self.stats.tx_malformed += 1;
            if let Some(token) = token {
                self.close(token, true);
            }
            return;
        }
        let Some(token) = token else {
            match h.op {
                op::REQUEST => self.guest_connect(h),
                op::RST => {}
                // Anything else for no connection is refused, as Linux does.
                _ => {
                    if self.control.len() < MAX_CONTROL / 4 {
                        let header = Self::header_for(self.cid, key, op::RST);
                        self.push_control(header);
                    }
                }
            }
            return;
        };
        let Some(conn) = self.conns.get_mut(&token) else { return };
        conn.peer_buf_alloc = h.buf_alloc;
        conn.peer_fwd_cnt = h.fwd_cnt;
        match (h.op, conn.state) {
            (op::RST, _) => self.close(token, false),
            (op::RESPONSE, State::Connecting) => {
                conn.state = State::Established;
                conn.readable = true;
                let line = format!("OK {}\n", key.0);
                conn.own_bytes = line.len();
                conn.to_host.extend(line.as_bytes());
                self.stats.connections += 1;
                self.flush(token);
                self.wake();
            }
            (op::RW, State::Established) => {
                let buffered = conn.to_host.len().saturating_add(payload.len());
                if buffered > CONN_BUFFER as usize || conn.guest_send_done {
                    // Beyond the credit the device gave, or after the guest said it was done.
                    self.close(token, true);
                    return;
                }
                conn.to_host.extend(payload);
                self.flush(token);
                self.wake();
            }
            (op::SHUTDOWN, State::Established) => {
                if h.flags & SHUTDOWN_RCV != 0 {
                    conn.guest_rcv_done = true;
                }
                if h.flags & SHUTDOWN_SEND != 0 {
                    conn.guest_send_done = true;
                }
                if conn.guest_send_done && (conn.guest_rcv_done || conn.host_eof) {
                    conn.state = State::Closing;
                }
                self.flush(token);
            }
            (op::CREDIT_REQUEST, State::Established) => {
                conn.credit_update = true;
                self.wake();
            }
            (op::CREDIT_UPDATE, State::Established) => self.wake(),
            (op::CREDIT_UPDATE | op::CREDIT_REQUEST | op::RW, State::Closing) => {}
            // REQUEST on a live connection, RESPONSE out of turn, data before RESPONSE, ...
            _ => self.close(token, true),
        }
    }

    /// The guest connects to host port `h.dst_port`: the socket `PATH_<port>`.
    fn guest_connect(&mut self, h: &Header) {
        let key = (h.dst_port, h.src_port);
        if self.conns.len() >= self.max_connections || self.control.len() >= MAX_CONTROL {
            let header = Self::header_for(self.cid, key, op::RST);
            self.push_control(header);
            return;
        }
        let mut name = self.path.clone().into_os_string();
        name.push(format!("_{}", h.dst_port));
        let stream = connect_nonblocking(Path::new(&name));
        let token = stream.ok().and_then(|s| self.add_conn(s, State::Established, key));
        let Some(token) = token else {
            let header = Self::header_for(self.cid, key, op::RST);
            self.push_control(header);
            return;
        };
        if let Some(conn) = self.conns.get_mut(&token) {
            conn.peer_buf_alloc = h.buf_alloc;
            conn.peer_fwd_cnt = h.fwd_cnt;
        }
        self.stats.connections += 1;
        let header = Self::header_for(self.cid, key, op::RESPONSE);
        self.push_control(header);
    }

    /// Reads one transmit chain: a header, then `len` bytes of payload.
    fn transmit(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    ) {
        let Ok(mut reader) = chain.reader(mem) else {
            self.stats.tx_malformed += 1;
            return;
        };
        let mut raw = [0u8; HEADER_LEN];
        if reader.read_exact(&mut raw).is_err() {
            self.stats.tx_malformed += 1;
            return;
        }
        let header = Header::decode(&raw);
        let len = usize::try_from(header.len).unwrap_or(usize::MAX);
        if len > MAX_PAYLOAD || len > reader.available_bytes() {
            self.stats.tx_malformed += 1;
            let key = (header.dst_port, header.src_port);
            if let Some(token) = self.keys.get(&key).copied() {
                if header.src_cid == self.cid {
                    self.close(token, true);
                }
            }
            return;
        }
        let mut payload = std::mem::take(&mut self.scratch);
        let ok = payload.get_mut(..len).is_some_and(|p| reader.read_exact(p).is_ok());
        if ok {
            let data = if header.op == op::RW { &payload[..len] } else { &[][..] };
            self.handle_packet(&header, data);
        } else {
            self.stats.tx_malformed += 1;
        }
        self.scratch = payload;
    }

    /// The next packet for the guest, written into `scratch`: its length, and the connection
    /// whose data it carries. None when there is nothing to send.
    fn next_packet(&mut self, room: usize) -> Option<(usize, Option<u64>)> {
        if let Some(header) = self.control.pop_front() {
            let mut header = header;
            if let Some(conn) = self
                .keys
                .get(&(header.src_port, header.dst_port))
                .and_then(|t| self.conns.get_mut(t))
            {
                header.fwd_cnt = conn.fwd_cnt;
                conn.fwd_cnt_sent = conn.fwd_cnt;
            }
            self.scratch[..HEADER_LEN].copy_from_slice(&header.encode());
            return Some((HEADER_LEN, None));
        }
        let tokens: Vec<u64> = self.conns.keys().copied().collect();
        for token in tokens {
            let Some(conn) = self.conns.get_mut(&token) else { continue };
            if conn.state != State::Established && conn.state != State::Closing {
                continue;
            }
            if conn.credit_update {
                conn.credit_update = false;
                let mut header = Self::header_for(self.cid, conn.key, op::CREDIT_UPDATE);
                header.fwd_cnt = conn.fwd_cnt;
                conn.fwd_cnt_sent = conn.fwd_cnt;
                self.scratch[..HEADER_LEN].copy_from_slice(&header.encode());
                return Some((HEADER_LEN, None));
            }
            let want = usize::try_from(conn.peer_credit())
                .unwrap_or(usize::MAX)
                .min(room.saturating_sub(HEADER_LEN))
                .min(MAX_PAYLOAD);
            if conn.state != State::Established
                || !conn.readable
                || conn.host_eof
                || conn.guest_rcv_done
                || want == 0
            {
                continue;
            }
            let result = conn.stream.read(&mut self.scratch[HEADER_LEN..HEADER_LEN + want]);
            match result {
                Ok(0) => {
                    conn.host_eof = true;
                    let key = conn.key;
                    let done = conn.guest_send_done;
                    let mut header = Self::header_for(self.cid, key, op::SHUTDOWN);
                    header.flags = SHUTDOWN_SEND;
                    if done {
                        // Both sides are done.
                        self.close(token, true);
                    } else {
                        self.push_control(header);
                    }
                    return self.next_packet(room);
                }
                Ok(n) => {
                    let key = conn.key;
                    conn.tx_cnt = conn.tx_cnt.wrapping_add(u32::try_from(n).unwrap_or(0));
                    let fwd_cnt = conn.fwd_cnt;
                    conn.fwd_cnt_sent = fwd_cnt;
                    let mut header = Self::header_for(self.cid, key, op::RW);
                    header.len = u32::try_from(n).unwrap_or(0);
                    header.fwd_cnt = fwd_cnt;
                    self.scratch[..HEADER_LEN].copy_from_slice(&header.encode());
                    return Some((HEADER_LEN + n, Some(token)));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => conn.readable = false,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.close(token, true);
                    return self.next_packet(room);
                }
            }
        }
        None
    }

    /// Fills receive chains with packets until either runs out.
    fn process_rx(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
    ) -> Result<bool, DeviceError> {
        let queue_err =
            |e: virtio_queue::Error| DeviceError::Queue { queue: RX_QUEUE, reason: e.to_string() };
        let mut used_any = false;
        while let Some(chain) = queue.iter(mem).map_err(queue_err)?.next() {
            let head = chain.head_index();
            let writer = if chain.clone().all(|d| d.is_write_only()) {
                chain.writer(mem).ok().filter(|w| w.available_bytes() >= HEADER_LEN)
            } else {
                None
            };
            let Some(mut writer) = writer else {
                self.stats.rx_bad_chains += 1;
                queue.add_used(mem, head, 0).map_err(queue_err)?;
                used_any = true;
                continue;
            };
            let Some((len, data_of)) = self.next_packet(writer.available_bytes()) else {
                queue.go_to_previous_position();
                break;
            };
            let used = match writer.write_all(&self.scratch[..len]) {
                Ok(()) => {
                    self.stats.rx_packets += 1;
                    u32::try_from(len).unwrap_or(0)
                }
                Err(_) => {
                    self.stats.rx_bad_chains += 1;
                    // The data read from the host is lost: the stream cannot go on.
                    if let Some(token) = data_of {
                        self.close(token, true);
                    }
                    0
                }
            };
            queue.add_used(mem, head, used).map_err(queue_err)?;
            used_any = true;
        }
        Ok(used_any)
    }

    fn process_tx(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
    ) -> Result<bool, DeviceError> {
        let before = self.control.len();
        let used = crate::drain_queue(mem, TX_QUEUE, queue, |chain| {
            self.transmit(mem, chain);
            Some(0)
        })?;
        if self.control.len() != before || self.conns.values().any(|c| c.credit_update) {
            self.wake();
        }
        Ok(used)
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    /// guest_cid (u64).
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.cid.to_le_bytes();
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
            // Only a transport reset after a restore is ever sent on the event queue; its
            // buffers otherwise stay with the device.
            EVENT_QUEUE if self.transport_reset => {
                let mut sent = false;
                let used = crate::drain_queue(mem, index, queue, |chain| {
                    if sent {
                        return None;
                    }
                    let memory = chain.memory();
                    // struct virtio_vsock_event: u32 id, 0 = TRANSPORT_RESET.
                    let written = chain
                        .clone()
                        .writable()
                        .next()
                        .filter(|d| d.len() >= 4 && memory.write_obj(0u32, d.addr()).is_ok())
                        .map_or(0, |_| 4);
                    sent = true;
                    Some(written)
                })?;
                if sent {
                    self.transport_reset = false;
                }
                Ok(used)
            }
            _ => Ok(false),
        }
    }

    fn reset(&mut self) {
        let tokens: Vec<u64> = self.conns.keys().copied().collect();
        for token in tokens {
            self.close(token, false);
        }
        self.control.clear();
    }

    fn event_fds(&self) -> Vec<RawFd> {
        vec![self.epoll.as_raw_fd()]
    }

    /// Connections do not survive a snapshot (their host sockets stay with the old process):
    /// the restored device starts with none and tells the driver so.
    fn restore_state(&mut self, state: &[u8]) -> Result<(), String> {
        if !state.is_empty() {
            return Err(format!("{} bytes of virtio-vsock state; version 1 has none", state.len()));
        }
        self.transport_reset = true;
        Ok(())
    }

    fn event_ready(&mut self, _which: usize) {
        self.drain_events();
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use vm_memory::{Address, Bytes, GuestAddress};

    const CID: u64 = 3;
    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;
    /// Where the test puts packets for the device, and where receive buffers are.
    const TX_BUF: u64 = 0x10_0000;
    const RX_BUF: u64 = 0x20_0000;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
    }

    /// A scratch directory for the sockets, removed at the end.
    struct Dir(PathBuf);
    impl Dir {
        fn new() -> Dir {
            static N: AtomicUsize = AtomicUsize::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("vg-vsock-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Dir(dir)
        }
        fn socket(&self) -> PathBuf {
            self.0.join("v.sock")
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A 64-entry split queue the test keeps adding chains to: descriptors at `base`, the
    /// available ring at +0x400, the used ring at +0x600. (Laid out here rather than with
    /// `MockSplitQueue`, whose used ring overlaps the second half of its available ring, which
    /// matters once the ring wraps.)
    struct Ring<'a> {
        mem: &'a GuestMemoryMmap,
        base: u64,
        queue: Queue,
        next_desc: u16,
        avail_idx: u16,
        seen: u16,
    }

    impl<'a> Ring<'a> {
        fn at(mem: &'a GuestMemoryMmap, base: u64) -> Ring<'a> {
            mem.write_slice(&[0u8; 0x1000], GuestAddress(base)).unwrap();
            let mut queue = Queue::new(64).unwrap();
            queue.set_size(64);
            let low = |offset: u64| Some(u32::try_from(base + offset).unwrap());
            queue.set_desc_table_address(low(0), Some(0));
            queue.set_avail_ring_address(low(0x400), Some(0));
            queue.set_used_ring_address(low(0x600), Some(0));
            queue.set_ready(true);
            assert!(queue.is_valid(mem));
            Ring { mem, base, queue, next_desc: 0, avail_idx: 0, seen: 0 }
        }

        /// Makes one chain of (address, length, flags) available.
        fn push(&mut self, descs: &[(u64, u32, u16)]) {
            let first = self.next_desc;
            for (i, (addr, len, flags)) in descs.iter().enumerate() {
                let id = (first + i as u16) % 64;
                let at = GuestAddress(self.base + 16 * u64::from(id));
                self.mem.write_obj(*addr, at).unwrap();
                self.mem.write_obj(*len, at.unchecked_add(8)).unwrap();
                self.mem.write_obj(*flags, at.unchecked_add(12)).unwrap();
                self.mem.write_obj((id + 1) % 64, at.unchecked_add(14)).unwrap();
            }
            let slot = self.base + 0x404 + 2 * u64::from(self.avail_idx % 64);
            self.mem.write_obj(first, GuestAddress(slot)).unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            self.mem.write_obj(self.avail_idx, GuestAddress(self.base + 0x402)).unwrap();
            self.next_desc = (first + descs.len() as u16) % 64;
        }

        fn serve(&mut self, dev: &mut Vsock, index: u16) -> bool {
            dev.process_queue(self.mem, index, &mut self.queue).unwrap()
        }

        /// How many chains the device has used.
        fn used(&self) -> u16 {
            self.mem.read_obj(GuestAddress(self.base + 0x602)).unwrap()
        }

        /// The used length of the `n`th used chain.
        fn used_len(&self, n: u64) -> u32 {
            self.mem.read_obj(GuestAddress(self.base + 0x604 + 8 * (n % 64) + 4)).unwrap()
        }
    }

    /// The guest's side: a receive ring with buffers, a transmit ring.
    struct Guest<'a> {
        mem: &'a GuestMemoryMmap,
        rx: Ring<'a>,
        tx: Ring<'a>,
    }

    impl<'a> Guest<'a> {
        fn new(mem: &'a GuestMemoryMmap) -> Guest<'a> {
            Guest { mem, rx: Ring::at(mem, 0), tx: Ring::at(mem, 0x8000) }
        }

        /// Sends one packet (header and payload in one buffer).
        fn send(&mut self, dev: &mut Vsock, header: Header, payload: &[u8]) {
            let mut bytes = header.encode().to_vec();
            bytes.extend_from_slice(payload);
            self.send_raw(dev, &bytes, bytes.len() as u32);
        }

        fn send_raw(&mut self, dev: &mut Vsock, bytes: &[u8], desc_len: u32) {
            self.mem.write_slice(bytes, GuestAddress(TX_BUF)).unwrap();
            self.tx.push(&[(TX_BUF, desc_len, 0)]);
            self.tx.serve(dev, TX_QUEUE);
        }

        /// Every packet the device has for the guest now, one 4 KiB buffer posted at a time
        /// (so each packet is read before the next overwrites it).
        fn receive(&mut self, dev: &mut Vsock) -> Vec<(Header, Vec<u8>)> {
            dev.event_ready(0);
            let mut out = Vec::new();
            loop {
                if self.rx.avail_idx == self.rx.seen {
                    self.rx.push(&[(RX_BUF, 4096, WRITE)]);
                }
                self.rx.serve(dev, RX_QUEUE);
                if self.rx.used() == self.rx.seen {
                    // The buffer stays posted; nothing more now.
                    return out;
                }
                let len = self.rx.used_len(u64::from(self.rx.seen)) as usize;
                self.rx.seen = self.rx.seen.wrapping_add(1);
                let mut bytes = vec![0u8; len];
                self.mem.read_slice(&mut bytes, GuestAddress(RX_BUF)).unwrap();
                assert!(len >= HEADER_LEN, "a used buffer of {len} bytes");
                let mut raw = [0u8; HEADER_LEN];
                raw.copy_from_slice(&bytes[..HEADER_LEN]);
                out.push((Header::decode(&raw), bytes[HEADER_LEN..].to_vec()));
            }
        }
    }

    fn packet(op: u16, src_port: u32, dst_port: u32) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len: 0,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 0,
        }
    }

    fn read_with_timeout(stream: &mut UnixStream, want: usize) -> Vec<u8> {
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = vec![0u8; want];
        stream.read_exact(&mut buf).unwrap();
        buf
    }

    /// Waits until the device's epoll descriptor has something (so event_ready finds it).
    fn settle() {
        std::thread::sleep(Duration::from_millis(20));
    }

    #[test]
    fn header_round_trips_and_config_holds_the_cid() {
        let h = Header {
            src_cid: 1 << 40,
            dst_cid: 3,
            src_port: 7,
            dst_port: 0xdead_beef,
            len: 5,
            kind: 1,
            op: op::RW,
            flags: 3,
            buf_alloc: 99,
            fwd_cnt: 42,
        };
        let raw = h.encode();
        assert_eq!(raw[24..28], 5u32.to_le_bytes());
        assert_eq!(raw[30..32], op::RW.to_le_bytes());
        assert_eq!(Header::decode(&raw), h);
        let dir = Dir::new();
        let dev = Vsock::new(0x1234_5678, &dir.socket()).unwrap();
        let mut config = [0xffu8; 10];
        dev.read_config(0, &mut config);
        assert_eq!(config, [0x78, 0x56, 0x34, 0x12, 0, 0, 0, 0, 0, 0]);
        dev.read_config(u64::MAX, &mut config[..4]);
        assert_eq!(config[..4], [0; 4]);
        assert_eq!(dev.queue_max_sizes().len(), 3);
        assert_eq!(dev.device_type(), 19);
    }

    #[test]
    fn cids_and_socket_paths_are_checked() {
        for cid in [0, 1, 2, u64::from(u32::MAX), 1 << 32] {
            assert!(validate_cid(cid).is_err(), "{cid}");
        }
        assert!(validate_cid(3).is_ok());
        let dir = Dir::new();
        let path = dir.socket();
        let dev = Vsock::new(3, &path).unwrap();
        let busy = Vsock::new(3, &path).err().unwrap().to_string();
        assert!(busy.contains("is in use"), "{busy}");
        drop(dev);
        assert!(!path.exists(), "the socket outlived its device");
        std::fs::write(&path, b"x").unwrap();
        let not_socket = Vsock::new(3, &path).err().unwrap().to_string();
        assert!(not_socket.contains("is not a socket"), "{not_socket}");
        std::fs::remove_file(&path).unwrap();
        // A stale socket (nobody accepts) is replaced.
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        Vsock::new(3, &path).unwrap();
    }

    /// Host program connects, the guest accepts, bytes flow both ways, the guest closes.
    #[test]
    fn host_initiated_connection_carries_data_both_ways() {
        let dir = Dir::new();
        let mut dev = Vsock::new(CID, &dir.socket()).unwrap();
        let mem = mem();
        let mut guest = Guest::new(&mem);
        let mut host = UnixStream::connect(dir.socket()).unwrap();
        host.write_all(b"CONNECT 1234\n").unwrap();
        settle();
        let got = guest.receive(&mut dev);
        assert_eq!(got.len(), 1, "{got:?}");
        let (req, _) = got[0];
        assert_eq!((req.op, req.src_cid, req.dst_cid, req.dst_port), (op::REQUEST, 2, CID, 1234));
        assert_eq!((req.kind, req.buf_alloc), (TYPE_STREAM, CONN_BUFFER));
        let host_port = req.src_port;
        guest.send(&mut dev, packet(op::RESPONSE, 1234, host_port), &[]);
        assert_eq!(read_with_timeout(&mut host, 0), b"");
        let ok = format!("OK {host_port}\n");
        assert_eq!(read_with_timeout(&mut host, ok.len()), ok.as_bytes());
        // Host to guest.
        host.write_all(b"hello guest\n").unwrap();
        settle();
        let got = guest.receive(&mut dev);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!((got[0].0.op, got[0].0.len), (op::RW, 12));
        assert_eq!(got[0].1, b"hello guest\n");
        // Guest to host.
        let mut rw = packet(op::RW, 1234, host_port);
        rw.len = 5;
        guest.send(&mut dev, rw, b"HELLO");
        assert_eq!(read_with_timeout(&mut host, 5), b"HELLO");
        // The device tells the guest its bytes were consumed.
        let got = guest.receive(&mut dev);
        assert!(got.iter().any(|(h, _)| h.op == op::CREDIT_UPDATE && h.fwd_cnt == 5), "{got:?}");
        // The guest closes: the host sees EOF, the guest gets RST.
        let mut shutdown = packet(op::SHUTDOWN, 1234, host_port);
        shutdown.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
        guest.send(&mut dev, shutdown, &[]);
        let mut rest = Vec::new();
        host.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        let got = guest.receive(&mut dev);
        assert!(got.iter().any(|(h, _)| h.op == op::RST && h.src_port == host_port), "{got:?}");
        assert_eq!(dev.connection_count(), 0);
    }

    /// RST to a REQUEST (nobody listens in the guest) closes the host program's connection;
    /// a bad CONNECT line closes it too.
    #[test]
    fn refused_and_malformed_host_connections_are_closed() {
        let dir = Dir::new();
        let mut dev = Vsock::new(CID, &dir.socket()).unwrap();
        let mem = mem();
        let mut guest = Guest::new(&mem);
        let mut host = UnixStream::connect(dir.socket()).unwrap();
        host.write_all(b"CONNECT 99\n").unwrap();
        let mut junk = UnixStream::connect(dir.socket()).unwrap();
        junk.write_all(b"HELLO there\n").unwrap();
        settle();
        let got = guest.receive(&mut dev);
        assert_eq!(got.len(), 1, "{got:?}");
        guest.send(&mut dev, packet(op::RST, 99, got[0].0.src_port), &[]);
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        junk.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = Vec::new();
        assert_eq!(host.read_to_end(&mut buf).unwrap(), 0);
        assert_eq!(junk.read_to_end(&mut buf).unwrap(), 0);
        assert_eq!(dev.connection_count(), 0);
    }

    /// The guest connects to PATH_<port>; with nobody there it gets RST.
    #[test]
    fn guest_initiated_connections_reach_path_port() {
        let dir = Dir::new();
        let mut dev = Vsock::new(CID, &dir.socket()).unwrap();
        let mem = mem();
        let mut guest = Guest::new(&mem);
        guest.send(&mut dev, packet(op::REQUEST, 40000, 5000), &[]);
        let got = guest.receive(&mut dev);
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].0.op, got[0].0.dst_port, got[0].0.src_port), (op::RST, 40000, 5000));

        let listener = UnixListener::bind(dir.0.join("v.sock_5000")).unwrap();
        guest.send(&mut dev, packet(op::REQUEST, 40001, 5000), &[]);
        let got = guest.receive(&mut dev);
        assert_eq!((got.len(), got[0].0.op), (1, op::RESPONSE));
        let (mut host, _) = listener.accept().unwrap();
        let mut rw = packet(op::RW, 40001, 5000);
        rw.len = 3;
        guest.send(&mut dev, rw, b"abc");
        assert_eq!(read_with_timeout(&mut host, 3), b"abc");
        host.write_all(b"xyz").unwrap();
        settle();
        let got = guest.receive(&mut dev);
        let data: Vec<u8> =
            got.iter().filter(|(h, _)| h.op == op::RW).flat_map(|p| p.1.clone()).collect();
        assert_eq!(data, b"xyz");
        // The host closes: the guest hears SHUTDOWN(SEND); then the guest closes too.
        drop(host);
        settle();
        let got = guest.receive(&mut dev);
        assert!(got.iter().any(|(h, _)| h.op == op::SHUTDOWN && h.flags == SHUTDOWN_SEND));
        let mut shutdown = packet(op::SHUTDOWN, 40001, 5000);
        shutdown.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
        guest.send(&mut dev, shutdown, &[]);
        let got = guest.receive(&mut dev);
        assert!(got.iter().any(|(h, _)| h.op == op::RST), "{got:?}");
        assert_eq!(dev.connection_count(), 0);
        assert_eq!(dev.stats().connections, 1);
    }

    /// Sets up a guest-initiated connection on guest port `port` to host port 5000.
    fn connected(dev: &mut Vsock, guest: &mut Guest<'_>, dir: &Dir, port: u32) -> UnixStream {
        let path = dir.0.join("v.sock_5000");
        let listener = match UnixListener::bind(&path) {
            Ok(l) => l,
            Err(_) => {
                std::fs::remove_file(&path).unwrap();
                UnixListener::bind(&path).unwrap()
            }
        };
        let mut request = packet(op::REQUEST, port, 5000);
        request.buf_alloc = 4;
        guest.send(dev, request, &[]);
        let got = guest.receive(dev);
        assert_eq!(got[0].0.op, op::RESPONSE);
        listener.accept().unwrap().0
    }

    /// The device never sends more than the guest's credit, and goes on when it grows.
    #[test]
    fn host_data_respects_the_guest_credit() {
        let dir = Dir::new();
        let mut dev = Vsock::new(CID, &dir.socket()).unwrap();
        let mem = mem();
        let mut guest = Guest::new(&mem);
        let mut host = connected(&mut dev, &mut guest, &dir, 40000);
        host.write_all(b"0123456789").unwrap();
        settle();
        let got = guest.receive(&mut dev);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1, b"0123");
        assert!(guest.receive(&mut dev).is_empty(), "no credit left");
        let mut update = packet(op::CREDIT_UPDATE, 40000, 5000);
        update.buf_alloc = 4;
        update.fwd_cnt = 4;
        guest.send(&mut dev, update, &[]);
        let got = guest.receive(&mut dev);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1, b"4567");
        // A CREDIT_REQUEST is answered with the device's buffer.
        guest.send(&mut dev, packet(op::CREDIT_REQUEST, 40000, 5000), &[]);
        let got = guest.receive(&mut dev);
        assert!(got.iter().any(|(h, _)| h.op == op::CREDIT_UPDATE && h.buf_alloc == CONN_BUFFER));
        // Data beyond the credit the device gave resets the connection.
        let mut rw = packet(op::RW, 40000, 5000);
        let big = vec![7u8; MAX_PAYLOAD];
        rw.len = MAX_PAYLOAD as u32;
        // The host does not read: 4 full packets fill the device's buffer, the fifth is too
        // much (the socket's own buffer takes some first, so send until reset).
        let mut reset = false;
        for _ in 0..64 {
            guest.send(&mut dev, rw, &big);
            if dev.connection_count() == 0 {
                reset = true;
                break;
            }
        }
        assert!(reset, "a guest beyond its credit was not reset");
        let got = guest.receive(&mut dev);
        assert!(got.iter().any(|(h, _)| h.op == op::RST));
    }

    /// Short headers, lengths beyond the chain or the limit, wrong CIDs, unknown types and
    /// ops: dropped, with RST where a connection exists; nothing panics.
    #[test]
    fn malformed_packets_are_dropped_and_reset_connections() {
        let dir = Dir::new();
        let mut dev = Vsock::new(CID, &dir.socket()).unwrap();
        let mem = mem();
        let mut guest = Guest::new(&mem);
        // Without a connection: dropped silently.
        guest.send_raw(&mut dev, &[1, 2, 3], 3);
        guest.tx.push(&[(0x4000_0000, 64, 0)]); // outside guest memory
        guest.tx.serve(&mut dev, TX_QUEUE);
        guest.tx.push(&[(TX_BUF, 64, WRITE)]); // device-writable: nothing to read
        guest.tx.serve(&mut dev, TX_QUEUE);
        assert_eq!(dev.stats().tx_malformed, 3);
        assert!(guest.receive(&mut dev).is_empty());

        type Mangle = fn(&mut Header) -> u32;
        let cases: [(&str, Mangle); 5] = [
            ("len beyond the chain", |h: &mut Header| {
                h.op = op::RW;
                h.len = 100;
                HEADER_LEN as u32 + 10
            }),
            ("len beyond the limit", |h: &mut Header| {
                h.op = op::RW;
                h.len = MAX_PAYLOAD as u32 + 1;
                HEADER_LEN as u32
            }),
            ("wrong dst cid", |h: &mut Header| {
                h.dst_cid = 7;
                HEADER_LEN as u32
            }),
            ("unknown type", |h: &mut Header| {
                h.kind = 2;
                HEADER_LEN as u32
            }),
            ("unknown op", |h: &mut Header| {
                h.op = 99;
                HEADER_LEN as u32
            }),
        ];
        for (i, (what, mangle)) in cases.iter().enumerate() {
            let port = 41000 + i as u32;
            let mut host = connected(&mut dev, &mut guest, &dir, port);
            let mut h = packet(op::CREDIT_UPDATE, port, 5000);
            let desc_len = mangle(&mut h);
            let mut bytes = h.encode().to_vec();
            bytes.resize(desc_len as usize, 0);
            guest.send_raw(&mut dev, &bytes, desc_len);
            assert_eq!(dev.connection_count(), 0, "{what}: not reset");
            let got = guest.receive(&mut dev);
            assert!(
                got.iter().any(|(h, _)| h.op == op::RST && h.dst_port == port),
                "{what}: {got:?}"
            );
            host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = Vec::new();
            assert_eq!(host.read_to_end(&mut buf).unwrap(), 0, "{what}: host not closed");
        }
        // A header split over two descriptors is fine.
        let mut host = connected(&mut dev, &mut guest, &dir, 42000);
        let mut rw = packet(op::RW, 42000, 5000);
        rw.len = 2;
        let mut bytes = rw.encode().to_vec();
        bytes.extend_from_slice(b"ok");
        mem.write_slice(&bytes, GuestAddress(TX_BUF)).unwrap();
        guest.tx.push(&[(TX_BUF, 10, NEXT), (TX_BUF + 10, 36, 0)]);
        guest.tx.serve(&mut dev, TX_QUEUE);
        assert_eq!(read_with_timeout(&mut host, 2), b"ok");
        drop(host);
        // A receive chain too small for a header is returned empty; the packet goes to the
        // next chain.
        let mem = self::mem();
        let mut guest = Guest::new(&mem);
        guest.send(&mut dev, packet(op::REQUEST, 43000, 6000), &[]);
        guest.rx.push(&[(RX_BUF, 10, WRITE)]);
        guest.rx.push(&[(RX_BUF, 64, 0)]);
        guest.rx.serve(&mut dev, RX_QUEUE);
        assert_eq!((guest.rx.used(), guest.rx.used_len(0), guest.rx.used_len(1)), (2, 0, 0));
        guest.rx.seen = 2;
        assert_eq!(dev.stats().rx_bad_chains, 2);
        let got = guest.receive(&mut dev);
        assert!(got.iter().any(|(h, _)| h.op == op::RST && h.dst_port == 43000), "{got:?}");
    }

    /// Beyond the limit, guest REQUESTs get RST and host programs are closed at once; a
    /// closed connection frees its slot.
    #[test]
    fn connections_are_bounded() {
        let dir = Dir::new();
        let mut dev = Vsock::new(CID, &dir.socket()).unwrap();
        dev.max_connections = 2;
        let mem = mem();
        let mut guest = Guest::new(&mem);
        let listener = UnixListener::bind(dir.0.join("v.sock_5000")).unwrap();
        for port in [40000, 40001, 40002] {
            guest.send(&mut dev, packet(op::REQUEST, port, 5000), &[]);
        }
        let got = guest.receive(&mut dev);
        let ops: Vec<(u16, u32)> = got.iter().map(|(h, _)| (h.op, h.dst_port)).collect();
        assert_eq!(
            ops,
            [(op::RESPONSE, 40000), (op::RESPONSE, 40001), (op::RST, 40002)],
            "{got:?}"
        );
        assert_eq!(dev.connection_count(), 2);
        let mut host = UnixStream::connect(dir.socket()).unwrap();
        host.write_all(b"CONNECT 7\n").unwrap();
        settle();
        assert!(guest.receive(&mut dev).is_empty(), "no REQUEST beyond the limit");
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = Vec::new();
        // Closed with its line unread: EOF or a reset.
        match host.read_to_end(&mut buf) {
            Ok(n) => assert_eq!(n, 0),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
        }
        // The guest resets one: its slot takes the next REQUEST.
        guest.send(&mut dev, packet(op::RST, 40000, 5000), &[]);
        guest.send(&mut dev, packet(op::REQUEST, 40003, 5000), &[]);
        let got = guest.receive(&mut dev);
        assert_eq!((got.len(), got[0].0.op, got[0].0.dst_port), (1, op::RESPONSE, 40003));
        drop(listener);
    }

    /// A host program that never sends its line, and a REQUEST the guest never answers, are
    /// dropped after the timeout (the guest gets RST for the latter).
    #[test]
    fn pending_connections_time_out() {
        let dir = Dir::new();
        let mut dev = Vsock::new(CID, &dir.socket()).unwrap();
        dev.pending_timeout = Duration::from_millis(100);
        let mem = mem();
        let mut guest = Guest::new(&mem);
        let mut silent = UnixStream::connect(dir.socket()).unwrap();
        let mut unanswered = UnixStream::connect(dir.socket()).unwrap();
        unanswered.write_all(b"CONNECT 80\n").unwrap();
        let got = guest.receive(&mut dev);
        assert_eq!((got.len(), got[0].0.op), (1, op::REQUEST));
        let host_port = got[0].0.src_port;
        assert_eq!(dev.connection_count(), 2);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut got = Vec::new();
        while dev.connection_count() > 0 {
            assert!(Instant::now() < deadline, "still {} connections", dev.connection_count());
            std::thread::sleep(Duration::from_millis(10));
            got.extend(guest.receive(&mut dev));
        }
        assert!(got.iter().any(|(h, _)| h.op == op::RST && h.src_port == host_port), "{got:?}");
        for stream in [&mut silent, &mut unanswered] {
            stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = Vec::new();
            assert_eq!(stream.read_to_end(&mut buf).unwrap(), 0);
        }
        // A late RESPONSE finds no connection: it is answered with RST.
        guest.send(&mut dev, packet(op::RESPONSE, 80, host_port), &[]);
        let got = guest.receive(&mut dev);
        assert_eq!((got.len(), got[0].0.op), (1, op::RST));
    }

    /// A megabyte each way through one connection, in many packets (the rings wrap): bytes
    /// arrive whole and in order, and the device never exceeds the guest's credit.
    #[test]
    fn a_megabyte_each_way_within_credit() {
        const TOTAL: usize = 1 << 20;
        const GUEST_BUF: u32 = 16 * 1024;
        let pattern: Vec<u8> = (0..TOTAL).map(|i| (i % 251) as u8).collect();
        let dir = Dir::new();
        let mut dev = Vsock::new(CID, &dir.socket()).unwrap();
        let mem = mem();
        let mut guest = Guest::new(&mem);
        let host = connected(&mut dev, &mut guest, &dir, 40000);
        let mut update = packet(op::CREDIT_UPDATE, 40000, 5000);
        update.buf_alloc = GUEST_BUF;
        guest.send(&mut dev, update, &[]);
        // The host writes a megabyte and reads a megabyte, on its own thread.
        let to_send = pattern.clone();
        let host_thread = std::thread::spawn(move || {
            let mut writer = host.try_clone().unwrap();
            let sender = std::thread::spawn(move || writer.write_all(&to_send).unwrap());
            let mut reader = host;
            reader.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut got = vec![0u8; TOTAL];
            reader.read_exact(&mut got).unwrap();
            sender.join().unwrap();
            got
        });
        let (mut received, mut sent) = (Vec::new(), 0usize);
        let (mut dev_buf_alloc, mut dev_fwd_cnt) = (CONN_BUFFER, 0u32);
        let deadline = Instant::now() + Duration::from_secs(20);
        while received.len() < TOTAL || sent < TOTAL {
            assert!(Instant::now() < deadline, "stuck: {} received, {sent} sent", received.len());
            // Everything received since the last CREDIT_UPDATE must fit the guest's buffer.
            let mut since_update = 0;
            for (h, data) in guest.receive(&mut dev) {
                dev_buf_alloc = h.buf_alloc;
                dev_fwd_cnt = h.fwd_cnt;
                if h.op == op::RW {
                    received.extend_from_slice(&data);
                    since_update += data.len();
                    assert!(since_update <= GUEST_BUF as usize, "beyond the guest's credit");
                }
            }
            // The guest consumes everything it got and says so.
            let mut update = packet(op::CREDIT_UPDATE, 40000, 5000);
            update.buf_alloc = GUEST_BUF;
            update.fwd_cnt = received.len() as u32;
            guest.send(&mut dev, update, &[]);
            // The guest sends within the device's credit.
            let credit = dev_buf_alloc.saturating_sub((sent as u32).wrapping_sub(dev_fwd_cnt));
            let n = (credit as usize).min(MAX_PAYLOAD).min(TOTAL - sent);
            if n > 0 {
                let mut rw = packet(op::RW, 40000, 5000);
                rw.buf_alloc = GUEST_BUF;
                rw.fwd_cnt = received.len() as u32;
                rw.len = n as u32;
                guest.send(&mut dev, rw, &pattern[sent..sent + n]);
                sent += n;
            } else {
                std::thread::sleep(Duration::from_millis(1));
            }
            assert_eq!(dev.connection_count(), 1, "reset");
        }
        assert!(received == pattern, "host to guest bytes differ");
        assert!(host_thread.join().unwrap() == pattern, "guest to host bytes differ");
    }
}
