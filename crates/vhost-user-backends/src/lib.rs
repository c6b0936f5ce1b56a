//! Vanguard's device models served to other hypervisors over vhost-user.
//!
//! A vhost-user backend is a process that serves a virtio device's queues for a VMM it does
//! not belong to (the frontend: QEMU, Cloud Hypervisor, ...). The frontend shares the guest's
//! memory with it as file descriptors and hands over each queue's rings and eventfds on a Unix
//! socket; the backend then reads and writes guest memory and interrupts the guest itself.
//!
//! [`blk`] serves [`virtio_devices::block::Block`], the virtio-blk model of `vanguard run`, and
//! [`net`] serves [`virtio_devices::net::Net`], its virtio-net model on a TAP; [`serve_blk`] and
//! [`serve_net`] are the daemons behind `vanguard vhost-user blk` and `vanguard vhost-user net`
//! (see `docs/virtio.md`).
//!
//! One frontend per run: the daemon listens on its socket, serves the first frontend that
//! speaks vhost-user, and returns when that frontend disconnects. A connection that closes
//! before its first message (a probe, such as another backend checking whether the socket is
//! in use) does not count: the daemon waits for the next one.

pub mod blk;
pub mod net;
mod relay;

use blk::{BlkBackend, GuestMemory, Vring};
use net::NetBackend;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{ShutdownHandle, VhostUserBackendMut, VhostUserDaemon};
use virtio_devices::block::{Block, BlockError};
use virtio_devices::net::{Net, NetError};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

/// What `vanguard vhost-user blk` serves, and where.
#[derive(Debug, Clone)]
pub struct BlkOptions {
    /// The Unix socket to listen on (created; a stale socket there is replaced).
    pub socket: PathBuf,
    /// The raw disk image.
    pub image: PathBuf,
    /// Open the image read-only: the driver sees VIRTIO_BLK_F_RO and writes fail.
    pub read_only: bool,
    /// What GET_ID answers (at most 20 bytes).
    pub serial: String,
    /// Open the image with `O_DIRECT`.
    pub direct: bool,
    /// Queues offered (1 to [`blk::MAX_QUEUES`]).
    pub queues: u16,
}

/// What `vanguard vhost-user net` serves, and where.
#[derive(Debug, Clone)]
pub struct NetOptions {
    /// The Unix socket to listen on (created; a stale socket there is replaced).
    pub socket: PathBuf,
    /// The TAP device: attached to if it exists, created (for the daemon's life) if not.
    pub tap: String,
}

/// Why [`serve_blk`] or [`serve_net`] returned without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The frontend disconnected (the VM ended, or its VMM let the device go).
    Disconnected,
    /// SIGTERM or SIGINT (the number).
    Signal(i32),
}

/// Errors of the vhost-user daemons.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The disk cannot be opened.
    #[error(transparent)]
    Disk(#[from] BlockError),
    /// The TAP cannot be opened or created.
    #[error(transparent)]
    Net(#[from] NetError),
    /// Another process accepts connections on the socket.
    #[error("socket {path} is in use: another process accepts connections on it")]
    SocketInUse {
        /// The socket.
        path: PathBuf,
    },
    /// Something that is not a socket is in the way.
    #[error("{path} exists and is not a socket; not replacing it")]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// The socket cannot be checked, removed or created.
    #[error("cannot listen on socket {path}")]
    Socket {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Signal handling cannot be set up.
    #[error("cannot set up SIGTERM handling")]
    Signals(#[source] io::Error),
    /// The vhost-user library failed, or the frontend broke the protocol.
    #[error("vhost-user: {0}")]
    VhostUser(String),
}

/// Checks the socket path: free, or a stale socket (nobody accepts on it, removed here).
fn prepare_socket(path: &Path) -> Result<(), Error> {
    let socket_err = |source| Error::Socket { path: path.to_path_buf(), source };
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(socket_err(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(Error::NotASocket { path: path.to_path_buf() });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(Error::SocketInUse { path: path.to_path_buf() }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(path).map_err(socket_err)
        }
        Err(e) => Err(socket_err(e)),
    }
}

/// The socket file, removed when the daemon ends.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The signals that end a daemon.
fn stop_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is a plain C bit set for which all zeroes is a valid value; sigemptyset
    // and sigaddset only write to the set we pass, with valid signal numbers.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    }
}

/// What the signal thread and the daemon share.
#[derive(Default)]
struct Stop {
    signal: Option<i32>,
    connection: Option<ShutdownHandle>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Blocks SIGTERM and SIGINT in this thread (and so in every thread it starts later) and takes
/// them on a thread of their own: the first ends the connection (or the wait for one) through
/// `stop`/`wake`; a second one ends the process at once.
fn handle_signals(stop: Arc<Mutex<Stop>>, wake: EventFd, log: fn(&str)) -> Result<(), Error> {
    let set = stop_signals();
    // SAFETY: pthread_sigmask only reads `set`, a valid signal set; the old mask is not wanted.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(Error::Signals(io::Error::from_raw_os_error(rc)));
    }
    std::thread::Builder::new()
        .name("vhost-user-signals".into())
        .spawn(move || loop {
            let mut signal = 0;
            // SAFETY: sigwait reads `set` and writes the signal's number to `signal`, both
            // valid for the call; the signals are blocked in every thread of the daemon.
            if unsafe { libc::sigwait(&set, &mut signal) } != 0 {
                continue;
            }
            let name = match signal {
                libc::SIGTERM => "SIGTERM",
                libc::SIGINT => "SIGINT",
                _ => "signal",
            };
            let mut state = lock(&stop);
            if state.signal.is_some() {
                log(&format!("{name} again: exiting at once"));
                std::process::exit(1);
            }
            state.signal = Some(signal);
            log(&format!("{name}: stopping"));
            if let Some(connection) = &state.connection {
                connection.shutdown();
            }
            let _ = wake.write(1);
        })
        .map_err(Error::Signals)?;
    Ok(())
}

/// What the daemon loop needs of a backend besides vhost-user itself.
trait Served: VhostUserBackendMut<Bitmap = (), Vring = Vring> + 'static {
    /// Whether a frontend has spoken vhost-user since the last `clear_contact`.
    fn contacted(&self) -> bool;
    /// Forgets that a frontend has spoken (before accepting the next connection).
    fn clear_contact(&self);
    /// The backend's own descriptors for the worker's epoll: (fd, events, event ID).
    fn listeners(&self) -> Vec<(RawFd, EventSet, u64)> {
        Vec::new()
    }
    /// Whether the frontend's messages go through a [`relay::Relay`] (QEMU's virtio-net).
    const RELAY: bool = false;
}

impl Served for BlkBackend {
    fn contacted(&self) -> bool {
        BlkBackend::contacted(self)
    }
    fn clear_contact(&self) {
        BlkBackend::clear_contact(self);
    }
}

impl Served for NetBackend {
    fn contacted(&self) -> bool {
        NetBackend::contacted(self)
    }
    fn clear_contact(&self) {
        NetBackend::clear_contact(self);
    }
    fn listeners(&self) -> Vec<(RawFd, EventSet, u64)> {
        NetBackend::listeners(self)
    }
    const RELAY: bool = true;
}

/// The daemon, which stops its worker threads when dropped: the library's own drop waits for
/// them to end, and they end only when told to.
struct StoppingDaemon<B: Served>(VhostUserDaemon<Arc<RwLock<B>>>);

impl<B: Served> Drop for StoppingDaemon<B> {
    fn drop(&mut self) {
        for handler in self.0.get_epoll_handlers() {
            handler.send_exit_event();
        }
    }
}

/// Waits until `listener` has a connection pending (true) or `wake` fires (false).
fn wait_for_connection(listener: &Listener, wake: &EventFd) -> io::Result<bool> {
    let mut fds = [
        libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: wake.as_raw_fd(), events: libc::POLLIN, revents: 0 },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfds for the call's duration; the count
        // matches its length.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[1].revents != 0 {
            return Ok(false);
        }
        if fds[0].revents != 0 {
            return Ok(true);
        }
    }
}

/// Accepts the frontend here and starts the daemon on a private socket behind a
/// [`relay::Relay`] (see there for why).
fn start_relayed<B: Served>(
    daemon: &mut VhostUserDaemon<Arc<RwLock<B>>>,
    listener: &Listener,
    log: fn(&str),
) -> io::Result<relay::Relay> {
    use std::os::linux::net::SocketAddrExt;
    let frontend = listener
        .accept()
        .map_err(|e| io::Error::other(e.to_string()))?
        .ok_or_else(|| io::Error::from(io::ErrorKind::WouldBlock))?;
    // An abstract socket: no file to clean up, and only this process knows the name.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = format!("vanguard-vhost-user-relay-{}-{n}", std::process::id());
    let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    let inner = UnixListener::bind_addr(&address)?;
    // Connected before the daemon accepts: the connection waits in the backlog.
    let backend = UnixStream::connect_addr(&address)?;
    daemon.start(&mut Listener::from(inner)).map_err(|e| io::Error::other(e.to_string()))?;
    relay::Relay::start(frontend, backend, log)
}

/// Whether the library's result is a frontend going away (the normal end of a connection).
fn is_disconnect(e: &vhost_user_backend::Error) -> bool {
    matches!(
        e,
        vhost_user_backend::Error::HandleRequest(
            VhostUserError::Disconnected
                | VhostUserError::PartialMessage
                | VhostUserError::SocketBroken(_)
        )
    )
}

/// Opens the disk, listens on the socket and serves one frontend (see the crate's docs);
/// `log` gets one line per event (listening, connected, features, disconnected, problems).
///
/// SIGTERM and SIGINT are blocked in the calling thread and taken by a thread of the daemon:
/// the first one ends the connection (a request being served completes first) and this
/// function returns [`End::Signal`]; a second one ends the process with status 1. The socket
/// file is removed on the way out.
pub fn serve_blk(options: &BlkOptions, log: fn(&str)) -> Result<End, Error> {
    let mut block = Block::open(&options.image, options.read_only, &options.serial)?;
    if options.direct {
        block = block.with_direct_io()?;
    }
    let what = format!(
        "{}, {} sectors, {}{}, {} queue{}",
        options.image.display(),
        block.capacity_sectors(),
        if options.read_only { "read-only" } else { "read-write" },
        if options.direct { ", O_DIRECT" } else { "" },
        options.queues,
        if options.queues == 1 { "" } else { "s" },
    );
    let mem: GuestMemory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let backend = BlkBackend::new(block, options.queues, mem.clone()).with_reporter(log);
    serve("vhost-user-blk", &options.socket, backend, mem, &what, log)
}

/// Opens (or creates) the TAP, listens on the socket and serves one frontend, like
/// [`serve_blk`] (signals, logging and the socket file alike).
pub fn serve_net(options: &NetOptions, log: fn(&str)) -> Result<End, Error> {
    // The MAC address is the frontend's (its configuration space); the model's is not used.
    let net = Net::open(&options.tap, [0x52, 0x54, 0, 0, 0, 1])?;
    let what = format!("TAP {}, 1 queue pair", options.tap);
    let mem: GuestMemory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let backend = NetBackend::new(net, mem.clone()).with_reporter(log);
    serve("vhost-user-net", &options.socket, backend, mem, &what, log)
}

/// The daemon loop shared by the backends: signals, the socket, one frontend.
fn serve<B: Served>(
    name: &str,
    socket: &Path,
    backend: B,
    mem: GuestMemory,
    what: &str,
    log: fn(&str),
) -> Result<End, Error> {
    let stop = Arc::new(Mutex::new(Stop::default()));
    let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::Signals)?;
    let signal_wake = wake.try_clone().map_err(Error::Signals)?;
    // Before any thread is started, so that every thread has the signals blocked.
    handle_signals(stop.clone(), signal_wake, log)?;

    prepare_socket(socket)?;
    let socket_err = |source| Error::Socket { path: socket.to_path_buf(), source };
    let listener = UnixListener::bind(socket).map_err(socket_err)?;
    let _socket_file = SocketFile(socket.to_path_buf());
    let mut listener = Listener::from(listener);

    let listeners = backend.listeners();
    let backend = Arc::new(RwLock::new(backend));
    let mut stopping = StoppingDaemon(
        VhostUserDaemon::new(name.into(), backend.clone(), mem)
            .map_err(|e| Error::VhostUser(e.to_string()))?,
    );
    let daemon = &mut stopping.0;
    if let Some(handler) = daemon.get_epoll_handlers().first() {
        for (fd, events, id) in listeners {
            handler
                .register_listener(fd, events, id)
                .map_err(|e| Error::VhostUser(format!("cannot wait on the device: {e}")))?;
        }
    }

    log(&format!("listening on {} ({what})", socket.display()));
    let result = loop {
        if !wait_for_connection(&listener, &wake).map_err(socket_err)? {
            break Ok(());
        }
        backend.read().unwrap_or_else(PoisonError::into_inner).clear_contact();
        let _relay = if B::RELAY {
            Some(start_relayed(daemon, &listener, log).map_err(socket_err)?)
        } else {
            daemon.start(&mut listener).map_err(|e| Error::VhostUser(e.to_string()))?;
            None
        };
        log("frontend connected");
        {
            let mut state = lock(&stop);
            state.connection = daemon.shutdown_handle();
            if state.signal.is_some() {
                daemon.request_shutdown();
            }
        }
        let result = daemon.wait();
        lock(&stop).connection = None;
        let contacted = backend.read().unwrap_or_else(PoisonError::into_inner).contacted();
        if lock(&stop).signal.is_none() && !contacted {
            log("a connection closed before its first vhost-user message; waiting for a frontend");
            continue;
        }
        break result;
    };
    // The worker thread finishes the request it is serving, if any.
    drop(stopping);
    if let Some(signal) = lock(&stop).signal {
        return Ok(End::Signal(signal));
    }
    match result {
        Ok(()) => Ok(End::Disconnected),
        Err(e) if is_disconnect(&e) => Ok(End::Disconnected),
        Err(e) => Err(Error::VhostUser(e.to_string())),
    }
}
