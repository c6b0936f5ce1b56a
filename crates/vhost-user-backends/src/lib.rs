//! Vanguard's device models served to other hypervisors over vhost-user.
//!
//! A vhost-user backend is a process that serves a virtio device's queues for a VMM it does
//! not belong to (the frontend: QEMU, Cloud Hypervisor, ...). The frontend shares the guest's
//! memory with it as file descriptors and hands over each queue's rings and eventfds on a Unix
//! socket; the backend then reads and writes guest memory and interrupts the guest itself.
//!
//! [`blk`] serves [`virtio_devices::block::Block`], the virtio-blk model of `vanguard run`;
//! [`serve_blk`] is the daemon behind `vanguard vhost-user blk` (see `docs/virtio.md`).
//!
//! One frontend per run: the daemon listens on its socket, serves the first frontend that
//! speaks vhost-user, and returns when that frontend disconnects. A connection that closes
//! before its first message (a probe, such as another backend checking whether the socket is
//! in use) does not count: the daemon waits for the next one.

pub mod blk;

use blk::{BlkBackend, GuestMemory};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use virtio_devices::block::{Block, BlockError};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
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

/// Why [`serve_blk`] returned without an error.
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

/// The daemon, which stops its worker threads when dropped: the library's own drop waits for
/// them to end, and they end only when told to.
struct StoppingDaemon(VhostUserDaemon<Arc<RwLock<BlkBackend>>>);

impl Drop for StoppingDaemon {
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
    let sectors = block.capacity_sectors();

    let stop = Arc::new(Mutex::new(Stop::default()));
    let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::Signals)?;
    let signal_wake = wake.try_clone().map_err(Error::Signals)?;
    // Before any thread is started, so that every thread has the signals blocked.
    handle_signals(stop.clone(), signal_wake, log)?;

    prepare_socket(&options.socket)?;
    let socket_err = |source| Error::Socket { path: options.socket.clone(), source };
    let listener = UnixListener::bind(&options.socket).map_err(socket_err)?;
    let _socket_file = SocketFile(options.socket.clone());
    let mut listener = Listener::from(listener);

    let mem: GuestMemory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let backend = BlkBackend::new(block, options.queues, mem.clone()).with_reporter(log).shared();
    let mut stopping = StoppingDaemon(
        VhostUserDaemon::new("vhost-user-blk".into(), backend.clone(), mem)
            .map_err(|e| Error::VhostUser(e.to_string()))?,
    );
    let daemon = &mut stopping.0;

    log(&format!(
        "listening on {} ({}, {} sectors, {}{}, {} queue{})",
        options.socket.display(),
        options.image.display(),
        sectors,
        if options.read_only { "read-only" } else { "read-write" },
        if options.direct { ", O_DIRECT" } else { "" },
        options.queues,
        if options.queues == 1 { "" } else { "s" },
    ));
    let result = loop {
        if !wait_for_connection(&listener, &wake).map_err(socket_err)? {
            break Ok(());
        }
        backend.read().unwrap_or_else(PoisonError::into_inner).clear_contact();
        daemon.start(&mut listener).map_err(|e| Error::VhostUser(e.to_string()))?;
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
