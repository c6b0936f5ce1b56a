//! Live migration between two VMM processes, over TCP or a Unix socket (docs/snapshot.md,
//! "Migration"): pre-copy of guest memory through KVM's dirty log while the guest runs, then a
//! short stop-and-copy of what is left plus the same state file a snapshot writes.
//!
//! The stream is a sequence of messages, each `kind: u8, length: u64 LE, payload`:
//!
//! | kind | direction | payload |
//! |---|---|---|
//! | `H` hello | source → destination | `VGMIGR02`, then the `machine` section payload |
//! | `A` accept / `R` refuse | destination → source | empty / a UTF-8 reason |
//! | `M` memory | source → destination | u64 offset in the memory file layout, then whole pages |
//! | `S` state | source → destination | a complete state file (docs/snapshot.md) |
//! | `Y` ready / `E` error | destination → source | empty / a UTF-8 reason |
//! | `G` go | source → destination | empty |
//!
//! Exactly one side runs the VM: the destination starts its vCPUs only after `G`, and discards
//! the VM if the stream ends before it; the source sends `G` only after `Y` (the destination
//! holds the whole VM, built and checked), and resumes its guest on any failure before that.

use crate::control::VmControl;
use crate::error::VmmError;
use crate::snapshot::{decode_machine, encode_machine, MachineDesc, SnapshotFailure};
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// The hello's magic: `VGMIGR02` carries a version 2 `machine` section (with virtio
/// devices); `VGMIGR01`, from older sources, a version 1 one.
const HELLO_MAGIC: &[u8; 8] = b"VGMIGR02";
const HELLO_MAGIC_V1: &[u8; 8] = b"VGMIGR01";
pub(crate) const KIND_HELLO: u8 = b'H';
pub(crate) const KIND_ACCEPT: u8 = b'A';
pub(crate) const KIND_REFUSE: u8 = b'R';
pub(crate) const KIND_MEMORY: u8 = b'M';
pub(crate) const KIND_STATE: u8 = b'S';
pub(crate) const KIND_READY: u8 = b'Y';
pub(crate) const KIND_ERROR: u8 = b'E';
pub(crate) const KIND_GO: u8 = b'G';
/// Catch-up: the source asks, at the end of a pre-copy pass, and the destination answers
/// once it has applied every page before it (offered by destinations whose accept has a
/// second payload byte with bit 0 set).
pub(crate) const KIND_CATCH_UP: u8 = b'C';
/// Accept payload byte 1, bit 0: this destination answers catch-up messages.
pub(crate) const ACCEPT_CATCH_UP: u8 = 1;
/// Descriptors handed over on a Unix socket (the first message, before the hello).
pub(crate) const KIND_DESCRIPTORS: u8 = b'D';
/// The descriptors message: kind, length 12, then memfd count, TAP count, flags (u32 each).
const DESCRIPTORS_LEN: usize = 21;
/// Most descriptors one handover carries.
const MAX_HANDED: usize = 64;
/// The largest message: a state file or a run of pages.
const MAX_MESSAGE: u64 = 64 << 20;
/// Pages per memory message at most.
const RUN_PAGES: usize = 256;
const PAGE: usize = 4096;
/// How long either side waits for the other before giving up.
pub(crate) const PEER_TIMEOUT: Duration = Duration::from_secs(30);
/// Pre-copy passes before the stop-and-copy is forced.
pub(crate) const MAX_PASSES: u32 = 30;

/// A connection to the other VMM.
pub(crate) trait Link: Read + Write + Send {
    fn set_timeouts(&self, timeout: Option<Duration>) -> std::io::Result<()>;
    fn try_clone_link(&self) -> std::io::Result<Box<dyn Link>>;
    /// The Unix socket under the link, which can carry descriptors.
    fn unix(&self) -> Option<&std::os::unix::net::UnixStream> {
        None
    }
    /// The socket's descriptor, for moving guest memory without a copy through a buffer;
    /// `None` while the link still has bytes of its own to give first.
    fn fd(&self) -> Option<std::os::fd::BorrowedFd<'_>>;
}

/// A link whose first bytes were already read (while looking for handed-over descriptors):
/// they are read again first. Each clone has its own copy of what is left of them.
struct Prefixed {
    prefix: Vec<u8>,
    inner: Box<dyn Link>,
}

impl Read for Prefixed {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.prefix.is_empty() {
            return self.inner.read(buf);
        }
        let n = buf.len().min(self.prefix.len());
        buf[..n].copy_from_slice(&self.prefix[..n]);
        self.prefix.drain(..n);
        Ok(n)
    }
}

impl Write for Prefixed {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl Link for Prefixed {
    fn set_timeouts(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.inner.set_timeouts(timeout)
    }
    fn try_clone_link(&self) -> std::io::Result<Box<dyn Link>> {
        Ok(Box::new(Prefixed { prefix: self.prefix.clone(), inner: self.inner.try_clone_link()? }))
    }
    fn fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.prefix.is_empty().then(|| self.inner.fd()).flatten()
    }
}

/// What a source on this host handed over: its guest RAM (one memfd per RAM range) and the
/// TAP of each net device.
#[derive(Default)]
pub(crate) struct Handed {
    pub memfds: Vec<std::fs::File>,
    pub taps: Vec<std::fs::File>,
}

/// On a Unix link, sends the descriptors another VMM on this host can take over instead of
/// copying or reopening: every RAM range's memfd (when all of guest RAM is in memfds) and
/// every net device's TAP. Returns whether memory was offered. Nothing is sent when there is
/// nothing to hand over, so a destination that knows no handover still understands the link.
pub(crate) fn hand_over(
    link: &dyn Link,
    machine: &crate::snapshot::Machine,
) -> Result<bool, SnapshotFailure> {
    use std::os::fd::AsRawFd;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let Some(socket) = link.unix() else { return Ok(false) };
    let memfds: Option<Vec<std::os::fd::RawFd>> = machine
        .mem
        .iter()
        .map(|r| r.file_offset().filter(|f| f.start() == 0).map(|f| f.file().as_raw_fd()))
        .collect();
    let memfds = memfds.unwrap_or_default();
    let taps: Vec<std::os::fd::RawFd> =
        machine.transports.iter().filter_map(|t| devices::bus::lock(t).handover_fd()).collect();
    if memfds.is_empty() && taps.is_empty() {
        return Ok(false);
    }
    let mut message = vec![KIND_DESCRIPTORS];
    message.extend_from_slice(&12u64.to_le_bytes());
    for n in [memfds.len(), taps.len(), 0] {
        message.extend_from_slice(&u32::try_from(n).unwrap_or(0).to_le_bytes());
    }
    let fds: Vec<std::os::fd::RawFd> = memfds.iter().chain(&taps).copied().collect();
    let sent = socket
        .send_with_fds(&[&message[..]], &fds)
        .map_err(|e| SnapshotFailure::Migration(format!("hand over guest memory and TAPs: {e}")))?;
    if sent != message.len() {
        return Err(SnapshotFailure::Migration("hand over: a short write".into()));
    }
    Ok(!memfds.is_empty())
}

/// On a Unix link, takes the descriptors a source on this host handed over (see
/// [`hand_over`]), if its first message is that; otherwise the bytes read are given back in
/// front of the link.
pub(crate) fn take_over(link: Box<dyn Link>) -> Result<(Box<dyn Link>, Handed), SnapshotFailure> {
    use std::os::fd::FromRawFd;
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let Some(socket) = link.unix() else { return Ok((link, Handed::default())) };
    let mut buf = [0u8; DESCRIPTORS_LEN];
    let mut got = 0;
    let mut files: Vec<std::fs::File> = Vec::new();
    while got < DESCRIPTORS_LEN {
        let mut fds = [-1; MAX_HANDED];
        let mut iov = [libc::iovec {
            iov_base: buf[got..].as_mut_ptr().cast(),
            iov_len: DESCRIPTORS_LEN - got,
        }];
        // SAFETY: the iovec covers the unread tail of `buf`, which lives (exclusively
        // borrowed) for the call; any bytes may be written there.
        let (n, nfds) = unsafe { socket.recv_with_fds(&mut iov, &mut fds) }.map_err(lost_sys)?;
        for fd in fds.iter().take(nfds) {
            // SAFETY: recvmsg gave us these descriptors; nothing else owns them.
            files.push(unsafe { std::fs::File::from_raw_fd(*fd) });
        }
        if n == 0 {
            break;
        }
        got += n;
    }
    if got < DESCRIPTORS_LEN || buf[0] != KIND_DESCRIPTORS {
        if !files.is_empty() {
            return Err(SnapshotFailure::Migration(
                "corrupt migration stream: descriptors came without their message".into(),
            ));
        }
        let prefix = buf[..got].to_vec();
        return Ok((Box::new(Prefixed { prefix, inner: link }), Handed::default()));
    }
    let word = |i: usize| {
        let mut w = [0u8; 4];
        w.copy_from_slice(&buf[9 + 4 * i..13 + 4 * i]);
        u32::from_le_bytes(w) as usize
    };
    let length = u64::from_le_bytes(buf[1..9].try_into().unwrap_or([0; 8]));
    let (memfds, taps) = (word(0), word(1));
    if length != 12 || memfds.saturating_add(taps) != files.len() {
        return Err(SnapshotFailure::Migration(format!(
            "corrupt migration stream: the descriptors message names {memfds} memfds and {taps} \
             TAPs, {} descriptors came",
            files.len()
        )));
    }
    let taps = files.split_off(memfds);
    Ok((link, Handed { memfds: files, taps }))
}

fn lost_sys(e: vmm_sys_util::errno::Error) -> SnapshotFailure {
    SnapshotFailure::Migration(format!("the connection to the other VMM failed: {e}"))
}

impl Link for std::net::TcpStream {
    fn set_timeouts(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(timeout)?;
        self.set_write_timeout(timeout)
    }
    fn try_clone_link(&self) -> std::io::Result<Box<dyn Link>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        Some(std::os::fd::AsFd::as_fd(self))
    }
}

impl Link for std::os::unix::net::UnixStream {
    fn set_timeouts(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(timeout)?;
        self.set_write_timeout(timeout)
    }
    fn try_clone_link(&self) -> std::io::Result<Box<dyn Link>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn unix(&self) -> Option<&std::os::unix::net::UnixStream> {
        Some(self)
    }
    fn fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        Some(std::os::fd::AsFd::as_fd(self))
    }
}

/// Where a migration goes or comes from: `tcp:HOST:PORT` or `unix:PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationAddress {
    /// A TCP address.
    Tcp(String),
    /// A Unix socket path.
    Unix(std::path::PathBuf),
}

impl std::str::FromStr for MigrationAddress {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(addr) = s.strip_prefix("tcp:") {
            if addr.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
            {
                return Ok(Self::Tcp(addr.to_string()));
            }
        } else if let Some(path) = s.strip_prefix("unix:") {
            if !path.is_empty() {
                return Ok(Self::Unix(path.into()));
            }
        }
        Err(format!("invalid migration address '{s}': use tcp:HOST:PORT or unix:PATH"))
    }
}

impl std::fmt::Display for MigrationAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "tcp:{a}"),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

fn link_err(what: &str, addr: &MigrationAddress) -> impl FnOnce(std::io::Error) -> SnapshotFailure {
    let what = format!("{what} {addr}");
    move |e| SnapshotFailure::Migration(format!("{what}: {e}"))
}

impl MigrationAddress {
    pub(crate) fn connect(&self) -> Result<Box<dyn Link>, SnapshotFailure> {
        let link: Box<dyn Link> = match self {
            Self::Tcp(a) => {
                let s = std::net::TcpStream::connect(a).map_err(link_err("connect to", self))?;
                let _ = s.set_nodelay(true);
                Box::new(s)
            }
            Self::Unix(p) => Box::new(
                std::os::unix::net::UnixStream::connect(p).map_err(link_err("connect to", self))?,
            ),
        };
        link.set_timeouts(Some(PEER_TIMEOUT)).map_err(link_err("set timeouts on", self))?;
        Ok(link)
    }

    /// Listens and takes one connection (a Unix socket path is removed afterwards).
    pub(crate) fn accept(&self) -> Result<Box<dyn Link>, SnapshotFailure> {
        let link: Box<dyn Link> = match self {
            Self::Tcp(a) => {
                let l = std::net::TcpListener::bind(a).map_err(link_err("listen on", self))?;
                let (s, _) = l.accept().map_err(link_err("accept on", self))?;
                let _ = s.set_nodelay(true);
                Box::new(s)
            }
            Self::Unix(p) => {
                // The socket is bound and listening under a temporary name, then renamed into
                // place: a source that sees the path can connect (binding it directly leaves
                // a moment between bind and listen where a connect is refused).
                if p.symlink_metadata().is_ok() {
                    let e = std::io::Error::from_raw_os_error(libc::EADDRINUSE);
                    return Err(link_err("listen on", self)(e));
                }
                let mut tmp = p.as_os_str().to_owned();
                tmp.push(format!(".{}.tmp", std::process::id()));
                let tmp = std::path::PathBuf::from(tmp);
                let l = std::os::unix::net::UnixListener::bind(&tmp)
                    .map_err(link_err("listen on", self))?;
                if let Err(e) = std::fs::rename(&tmp, p) {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(link_err("listen on", self)(e));
                }
                let accepted = l.accept();
                let _ = std::fs::remove_file(p);
                Box::new(accepted.map_err(link_err("accept on", self))?.0)
            }
        };
        link.set_timeouts(Some(PEER_TIMEOUT)).map_err(link_err("set timeouts on", self))?;
        Ok(link)
    }
}

fn lost(e: std::io::Error) -> SnapshotFailure {
    SnapshotFailure::Migration(format!("the connection to the other VMM failed: {e}"))
}

pub(crate) fn send(w: &mut impl Write, kind: u8, parts: &[&[u8]]) -> Result<(), SnapshotFailure> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    send_head(w, kind, len as u64)?;
    for p in parts {
        w.write_all(p).map_err(lost)?;
    }
    Ok(())
}

/// Writes a message's kind and length; its `len` payload bytes must follow.
fn send_head(w: &mut impl Write, kind: u8, len: u64) -> Result<(), SnapshotFailure> {
    w.write_all(&[kind]).map_err(lost)?;
    w.write_all(&len.to_le_bytes()).map_err(lost)
}

/// Reads one message; a length beyond [`MAX_MESSAGE`] is a corrupt stream.
pub(crate) fn receive(r: &mut impl Read) -> Result<(u8, Vec<u8>), SnapshotFailure> {
    let (kind, len) = receive_head(r)?;
    Ok((kind, receive_payload(r, len)?))
}

/// Reads a payload of `len` bytes (at most [`MAX_MESSAGE`], as [`receive_head`] checked).
fn receive_payload(r: &mut impl Read, len: u64) -> Result<Vec<u8>, SnapshotFailure> {
    let mut payload = vec![0u8; usize::try_from(len).unwrap_or(0)];
    r.read_exact(&mut payload).map_err(lost)?;
    Ok(payload)
}

/// Reads a message's kind and length (at most [`MAX_MESSAGE`]), leaving its payload.
fn receive_head(r: &mut impl Read) -> Result<(u8, u64), SnapshotFailure> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head).map_err(lost)?;
    let mut len = [0u8; 8];
    len.copy_from_slice(&head[1..]);
    let len = u64::from_le_bytes(len);
    if len > MAX_MESSAGE {
        return Err(SnapshotFailure::Migration(format!(
            "corrupt migration stream: a message of {len} bytes (kind {:#04x})",
            head[0]
        )));
    }
    Ok((head[0], len))
}

/// How to migrate.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// Where the destination VMM listens.
    pub destination: MigrationAddress,
    /// The longest the guest may be stopped for the final copy.
    pub max_downtime: Duration,
    /// Bytes per second at most (None: as fast as the link goes).
    pub bandwidth: Option<u64>,
    /// Slow the guest's vCPUs down when it dirties memory faster than the link sends it.
    pub auto_converge: bool,
}

/// Where a migration is.
#[derive(Debug, Clone, Default)]
pub struct MigrationProgress {
    /// `connecting`, `precopy`, `stop-and-copy`, `completed`, `failed`, `cancelled`, or
    /// empty when none has run.
    pub phase: String,
    /// Pre-copy passes done.
    pub passes: u32,
    /// Bytes of guest memory sent.
    pub bytes_sent: u64,
    /// Dirty bytes found by the last pass.
    pub dirty_bytes: u64,
    /// The guest's dirtying rate over the last pass, bytes per second.
    pub dirty_rate: u64,
    /// The link's rate over the last pass, bytes per second.
    pub link_rate: u64,
    /// How long the stop-and-copy would take now.
    pub expected_downtime: Duration,
    /// Share of each 10 ms the vCPUs are held by auto-converge, percent.
    pub throttle_percent: u32,
    /// Why it failed.
    pub error: Option<String>,
}

/// What a finished migration did.
#[derive(Debug, Clone)]
pub struct MigrationReport {
    /// From the request to the destination's go.
    pub total: Duration,
    /// From pausing the guest to the destination's go.
    pub downtime: Duration,
    /// Bytes of guest memory sent.
    pub bytes_sent: u64,
    /// Bytes of state sent.
    pub state_bytes: u64,
    /// Pre-copy passes.
    pub passes: u32,
}

/// The migration bookkeeping a VM's control keeps.
#[derive(Default)]
pub(crate) struct MigrationStatus {
    pub progress: Mutex<MigrationProgress>,
    pub cancel: AtomicBool,
    /// Set when the VM moved: the VMM ends.
    pub moved: AtomicBool,
    pub throttle: AtomicU64,
}

/// Sends guest memory: the pages `wanted` selects (in `fresh` mode, all-zero pages are
/// skipped: the destination's memory starts zeroed), in runs, at most `bandwidth` bytes/s.
pub(crate) struct Sender<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub ranges: &'a [crate::snapshot::RamRange],
    pub out: &'a mut BufWriter<Box<dyn Link>>,
    pub bandwidth: Option<u64>,
    pub started: Instant,
    pub sent: u64,
    pub cancel: &'a AtomicBool,
    /// Where `bytes_sent` (and, in the first pass, `link_rate`) is published as the pages go,
    /// at least every [`PUBLISH_EVERY`] bytes, so progress moves within a long pass.
    pub progress: &'a Mutex<MigrationProgress>,
    /// `sent` when it was last published.
    pub published: u64,
}

/// How many bytes a sender sends between two progress updates.
const PUBLISH_EVERY: u64 = 1 << 20;

impl Sender<'_> {
    /// Publishes the bytes sent so far. In the first pass (no pass finished yet) the link's
    /// rate is this pass's average; later passes publish theirs when they end.
    fn publish(&mut self) {
        self.published = self.sent;
        let elapsed_us = self.started.elapsed().as_micros().max(1);
        let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        p.bytes_sent = self.sent;
        if p.passes == 0 {
            p.link_rate =
                u64::try_from(u128::from(self.sent) * 1_000_000 / elapsed_us).unwrap_or(u64::MAX);
        }
    }

    fn pace(&self) {
        if let Some(rate) = self.bandwidth.filter(|r| *r > 0) {
            let due = Duration::from_secs_f64(self.sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(self.started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }

    /// Asks the destination to answer once it has applied everything sent so far, and waits.
    pub fn catch_up(&mut self, input: &mut impl Read) -> Result<(), SnapshotFailure> {
        send(self.out, KIND_CATCH_UP, &[])?;
        self.out.flush().map_err(lost)?;
        match receive(input)? {
            (KIND_CATCH_UP, _) => Ok(()),
            (KIND_ERROR, why) => Err(SnapshotFailure::Migration(format!(
                "the destination failed: {}",
                String::from_utf8_lossy(&why)
            ))),
            (kind, _) => Err(SnapshotFailure::Migration(format!(
                "the destination sent message {kind:#04x} instead of catching up"
            ))),
        }
    }

    /// Sends the selected pages of range `index`.
    pub fn range(
        &mut self,
        index: usize,
        fresh: bool,
        wanted: impl Fn(usize) -> bool,
    ) -> Result<u64, SnapshotFailure> {
        let Some(range) = self.ranges.get(index) else { return Ok(0) };
        let pages = usize::try_from(range.len).unwrap_or(0) / PAGE;
        let read_err = |e: vm_memory::GuestMemoryError| {
            SnapshotFailure::Migration(format!("read guest memory: {e}"))
        };
        let mut page = 0;
        let mut total = 0;
        while page < pages {
            if self.cancel.load(Ordering::Acquire) {
                return Err(SnapshotFailure::Migration("cancelled".into()));
            }
            if !wanted(page) {
                page += 1;
                continue;
            }
            // A run of wanted pages (in a fresh pass, non-zero ones), sent as they are now
            // (the guest may be running: a page it writes meanwhile is dirty again and goes in
            // a later pass).
            let start = page;
            while page < pages && page - start < RUN_PAGES && wanted(page) {
                let at = GuestAddress(range.guest + (page * PAGE) as u64);
                if fresh && is_zero_page(&self.mem.get_slice(at, PAGE).map_err(read_err)?) {
                    break;
                }
                page += 1;
            }
            let n = page - start;
            if n == 0 {
                // A zero page in a fresh pass: skipped.
                page += 1;
                continue;
            }
            let offset = range.file_offset + (start * PAGE) as u64;
            let at = GuestAddress(range.guest + (start * PAGE) as u64);
            let run = self.mem.get_slice(at, n * PAGE).map_err(read_err)?;
            send_head(self.out, KIND_MEMORY, (8 + n * PAGE) as u64)?;
            self.out.write_all(&offset.to_le_bytes()).map_err(lost)?;
            // The pages go from guest memory to the socket with no copy in between.
            self.out.flush().map_err(lost)?;
            match self.out.get_ref().fd() {
                Some(mut fd) => vm_memory::WriteVolatile::write_all_volatile(&mut fd, &run)
                    .map_err(|e| match e {
                        vm_memory::VolatileMemoryError::IOError(io) => lost(io),
                        e => SnapshotFailure::Migration(format!("read guest memory: {e}")),
                    })?,
                None => {
                    let mut buf = vec![0u8; n * PAGE];
                    run.copy_to(&mut buf[..]);
                    self.out.write_all(&buf).map_err(lost)?;
                }
            }
            let bytes = (n * PAGE) as u64;
            self.sent += bytes;
            total += bytes;
            if self.sent - self.published >= PUBLISH_EVERY {
                self.publish();
            }
            self.pace();
        }
        Ok(total)
    }
}

/// Whether a page of guest memory (which the guest may be writing) is all zero, read in
/// volatile words.
fn is_zero_page(page: &vm_memory::VolatileSlice<'_, ()>) -> bool {
    let words = page.len() / 8;
    let base = page.ptr_guard();
    let ptr = base.as_ptr().cast::<u64>();
    (0..words).all(|i| {
        // SAFETY: `ptr` points at the slice's `len` mapped bytes, page-aligned (so 8-aligned),
        // and `i < len / 8`; a volatile read tolerates the guest writing the word meanwhile.
        unsafe { std::ptr::read_volatile(ptr.add(i)) == 0 }
    })
}

/// The hello: magic, the machine description (a blob), and the CPUID vCPU 0 shows the guest
/// (a count, then raw `struct kvm_cpuid_entry2`s), which the destination checks before any
/// memory is sent.
pub(crate) fn hello(desc: &MachineDesc, cpuid: &[kvm_bindings::kvm_cpuid_entry2]) -> Vec<u8> {
    let mut e = snapshot::Encoder::new();
    e.bytes(&encode_machine(desc).0);
    e.u32(u32::try_from(cpuid.len()).unwrap_or(0));
    for entry in cpuid {
        e.bytes(zerocopy::IntoBytes::as_bytes(entry));
    }
    let mut out = HELLO_MAGIC.to_vec();
    out.extend_from_slice(&e.0);
    out
}

/// Reads the hello on the destination.
pub(crate) fn read_hello(
    input: &mut BufReader<Box<dyn Link>>,
) -> Result<(MachineDesc, Vec<kvm_bindings::kvm_cpuid_entry2>), SnapshotFailure> {
    let (kind, payload) = receive(input)?;
    let machine_version = match payload.get(..8) {
        Some(m) if kind == KIND_HELLO && m == HELLO_MAGIC => crate::snapshot::MACHINE_VERSION,
        Some(m) if kind == KIND_HELLO && m == HELLO_MAGIC_V1 => 1,
        _ => {
            return Err(SnapshotFailure::Migration(
                "the peer is not a Vanguard migration source (no hello)".into(),
            ))
        }
    };
    let bad = |e: snapshot::SnapshotError| SnapshotFailure::Migration(format!("hello: {e}"));
    let hello = snapshot::Section {
        tag: "hello".into(),
        version: 1,
        flags: snapshot::FLAG_REQUIRED,
        payload: &payload[8..],
    };
    let mut d = hello.decoder();
    let machine = snapshot::Section {
        tag: "machine".into(),
        version: machine_version,
        flags: snapshot::FLAG_REQUIRED,
        payload: d.bytes("machine").map_err(bad)?,
    };
    let desc = decode_machine(&machine).map_err(bad)?;
    let size = std::mem::size_of::<kvm_bindings::kvm_cpuid_entry2>();
    let n = d.count(4 + size, "CPUID entries").map_err(bad)?;
    let mut cpuid = Vec::with_capacity(n);
    for _ in 0..n {
        let bytes = d.exact(size, "CPUID entry").map_err(bad)?;
        let entry = <kvm_bindings::kvm_cpuid_entry2 as zerocopy::FromBytes>::read_from_bytes(bytes)
            .map_err(|_| {
                SnapshotFailure::Migration("hello: a CPUID entry does not decode".into())
            })?;
        cpuid.push(entry);
    }
    d.finish().map_err(bad)?;
    Ok((desc, cpuid))
}

/// Whether this host can show the source's vCPUs their CPU features: a throwaway vCPU is given
/// the CPUID a fresh VM here would have, and what it then shows must include every feature the
/// source's vCPU 0 shows.
fn check_cpu_here(
    desc: &MachineDesc,
    cpuid: &[kvm_bindings::kvm_cpuid_entry2],
) -> Result<(), VmmError> {
    if cpuid.is_empty() {
        return Ok(());
    }
    let kvm = crate::vm::open_kvm()?;
    let max = kvm.get_max_vcpus().min(254);
    if usize::from(desc.vcpus) > max {
        return Err(SnapshotFailure::Incompatible(format!(
            "the VM has {} vCPUs, this host's KVM at most {max}",
            desc.vcpus
        ))
        .into());
    }
    let kvm_err = |what: &'static str| move |source| VmmError::Kvm { what, source };
    let vm = kvm.create_vm().map_err(kvm_err("create a VM to check CPU features"))?;
    let vcpu = vm.create_vcpu(0).map_err(kvm_err("create a vCPU to check CPU features"))?;
    let mut fresh = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("get supported CPUID"))?;
    arch::cpuid::configure_cpuid(
        &mut fresh,
        &arch::cpuid::CpuTopology { cpu_index: 0, num_cpus: desc.vcpus },
    )
    .map_err(VmmError::Cpuid)?;
    vcpu.set_cpuid2(&fresh).map_err(kvm_err("set CPUID"))?;
    let here =
        vcpu.get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("read CPUID back"))?;
    crate::snapshot::check_cpuid(0, cpuid, here.as_slice())?;
    Ok(())
}

/// Reads a memory message's payload of `len` bytes (its offset in the memory file, then
/// whole pages) from `input` straight into guest memory: what `input` has buffered is
/// copied, the rest is read from the socket into the guest's pages. Every page must fall in
/// one RAM range.
fn receive_memory(
    input: &mut BufReader<Box<dyn Link>>,
    mem: &GuestMemoryMmap,
    desc: &MachineDesc,
    len: u64,
) -> Result<u64, SnapshotFailure> {
    let corrupt =
        |what: String| SnapshotFailure::Migration(format!("corrupt migration stream: {what}"));
    let data_len = len.checked_sub(8).filter(|n| n.is_multiple_of(PAGE as u64));
    let Some(data_len) = data_len else {
        return Err(corrupt(format!("a memory message of {len} bytes")));
    };
    let mut off = [0u8; 8];
    input.read_exact(&mut off).map_err(lost)?;
    let offset = u64::from_le_bytes(off);
    let end = offset.checked_add(data_len).ok_or_else(|| corrupt("offset overflow".into()))?;
    let range = desc
        .ranges
        .iter()
        .find(|r| offset >= r.file_offset && end <= r.file_offset + r.len)
        .ok_or_else(|| corrupt(format!("pages at {offset:#x}..{end:#x} outside guest memory")))?;
    let at = GuestAddress(range.guest + (offset - range.file_offset));
    let write_err = |e: vm_memory::GuestMemoryError| corrupt(format!("write guest memory: {e}"));
    // `data_len` is below MAX_MESSAGE, so it fits a usize.
    let mut left = usize::try_from(data_len).unwrap_or(usize::MAX);
    let buffered = input.buffer();
    let n = buffered.len().min(left);
    mem.write_slice(&buffered[..n], at).map_err(write_err)?;
    input.consume(n);
    left -= n;
    let at = at.unchecked_add(n as u64);
    if left > 0 {
        match input.get_ref().fd() {
            Some(mut fd) => {
                let mut slice = mem.get_slice(at, left).map_err(write_err)?;
                vm_memory::ReadVolatile::read_exact_volatile(&mut fd, &mut slice).map_err(|e| {
                    match e {
                        vm_memory::VolatileMemoryError::IOError(io) => lost(io),
                        e => corrupt(format!("write guest memory: {e}")),
                    }
                })?
            }
            None => {
                let mut data = vec![0u8; left];
                input.read_exact(&mut data).map_err(lost)?;
                mem.write_slice(&data, at).map_err(write_err)?;
            }
        }
    }
    Ok(data_len)
}

/// The host's RAM (MemTotal), bytes.
fn host_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The destination's gate: tells the source the VM is ready, and lets the vCPUs run only
/// when the source says go.
struct GoGate {
    input: BufReader<Box<dyn Link>>,
    out: BufWriter<Box<dyn Link>>,
}

impl crate::vm::StartGate for GoGate {
    fn open(&mut self) -> Result<(), VmmError> {
        send(&mut self.out, KIND_READY, &[])?;
        self.out.flush().map_err(lost)?;
        match receive(&mut self.input) {
            Ok((KIND_GO, _)) => Ok(()),
            Ok((kind, _)) => Err(SnapshotFailure::Migration(format!(
                "the source sent message {kind:#04x} instead of go; the VM is discarded"
            ))
            .into()),
            Err(e) => Err(SnapshotFailure::Migration(format!(
                "no go from the source ({e}); the VM is discarded"
            ))
            .into()),
        }
    }

    fn abort(&mut self, why: &str) {
        let _ = send(&mut self.out, KIND_ERROR, &[why.as_bytes()]);
        let _ = self.out.flush();
    }
}

/// Takes one incoming migration on `from` and runs the VM once the source lets go.
/// `make_control` is called with the VM's vCPUs and memory once they are known.
pub(crate) fn run_incoming(
    from: &MigrationAddress,
    options: crate::vm::RestoreOptions,
    make_control: impl FnOnce(usize, u64) -> Result<Arc<VmControl>, VmmError>,
) -> Result<crate::vm::VmOutcome, VmmError> {
    let link = from.accept()?;
    let (link, handed) = take_over(link)?;
    let mut input = BufReader::with_capacity(1 << 20, link.try_clone_link().map_err(lost)?);
    let mut out = BufWriter::new(link);
    let (desc, cpuid) = read_hello(&mut input)?;
    let nets = desc.virtio.iter().filter(|d| matches!(d, crate::snapshot::VirtioDesc::Net { .. }));
    let handed_ok = (handed.taps.is_empty() || handed.taps.len() == nets.count())
        && (handed.memfds.is_empty() || handed.memfds.len() == desc.ranges.len());
    if !handed_ok {
        let why = "the source handed over descriptors that do not match its VM";
        let _ = send(&mut out, KIND_REFUSE, &[why.as_bytes()]);
        let _ = out.flush();
        return Err(SnapshotFailure::Migration(why.into()).into());
    }
    // A source that handed its memory over runs on this host, on this CPU: the throwaway
    // vCPU (a few milliseconds) would tell nothing new.
    let same_host = !handed.memfds.is_empty();
    if let Err(e) = if same_host { Ok(()) } else { check_cpu_here(&desc, &cpuid) } {
        let _ = send(&mut out, KIND_REFUSE, &[e.to_string().as_bytes()]);
        let _ = out.flush();
        return Err(SnapshotFailure::Migration(format!("refused the incoming VM: {e}")).into());
    }
    let devices: Result<(), SnapshotFailure> =
        desc.virtio.iter().enumerate().try_for_each(|(i, d)| d.check_here(i));
    if let Err(e) = devices {
        let _ = send(&mut out, KIND_REFUSE, &[e.to_string().as_bytes()]);
        let _ = out.flush();
        return Err(SnapshotFailure::Migration(format!("refused the incoming VM: {e}")).into());
    }
    if let Some(host) = host_memory().filter(|host| desc.memory > *host) {
        let why = format!(
            "the VM has {} MiB of memory, more than this host's {} MiB",
            desc.memory >> 20,
            host >> 20
        );
        let _ = send(&mut out, KIND_REFUSE, &[why.as_bytes()]);
        let _ = out.flush();
        return Err(SnapshotFailure::Migration(format!("refused the incoming VM: {why}")).into());
    }
    let handed_memory = !handed.memfds.is_empty();
    let mem = if handed_memory {
        crate::memory::map_handed(&desc.ranges, handed.memfds)
    } else {
        crate::memory::create_guest_memory(desc.memory, false, false)
    };
    let mem = match mem {
        Ok(mem) => mem,
        Err(e) => {
            let _ = send(&mut out, KIND_REFUSE, &[e.to_string().as_bytes()]);
            let _ = out.flush();
            return Err(e);
        }
    };
    // Bit 0: the handed-over memory is the guest's; the source sends none.
    send(&mut out, KIND_ACCEPT, &[&[u8::from(handed_memory), ACCEPT_CATCH_UP]])?;
    out.flush().map_err(lost)?;
    let mut gate = GoGate { input, out };
    let fail = |gate: &mut GoGate, e: SnapshotFailure| -> VmmError {
        crate::vm::StartGate::abort(gate, &e.to_string());
        e.into()
    };
    let state = loop {
        let (kind, len) = receive_head(&mut gate.input)?;
        match kind {
            KIND_MEMORY => {
                receive_memory(&mut gate.input, &mem, &desc, len)
                    .map_err(|e| fail(&mut gate, e))?;
            }
            KIND_CATCH_UP if len == 0 => {
                // Every page before this is in guest memory: say so.
                send(&mut gate.out, KIND_CATCH_UP, &[])?;
                gate.out.flush().map_err(lost)?;
            }
            KIND_STATE => break receive_payload(&mut gate.input, len)?,
            other => {
                let e = SnapshotFailure::Migration(format!(
                    "corrupt migration stream: message {other:#04x} during the memory copy"
                ));
                return Err(fail(&mut gate, e));
            }
        }
    };
    let label = std::path::Path::new("(migration stream)");
    let mut restored =
        crate::snapshot::parse_state(&state, label, label).map_err(|e| fail(&mut gate, e))?;
    let m = &restored.machine;
    if m.vm_id != desc.vm_id || m.memory != desc.memory || m.vcpus != desc.vcpus {
        let e = SnapshotFailure::Migration("the state describes another VM than the hello".into());
        return Err(fail(&mut gate, e));
    }
    restored.memory = Some(mem);
    restored.handed_taps = handed.taps;
    let control = make_control(usize::from(m.vcpus), m.memory)?;
    crate::vm::Vm::run_restored_gated(restored, options, control, Some(Box::new(gate)))
}
