//! `vanguard serve`: the host daemon. It keeps the VMs' specs and status in an embedded
//! database (redb, in the data directory), runs each VM as its own `vanguard run` process and
//! supervises it (restart policy, re-attachment after a daemon restart), and serves the REST
//! API described by the OpenAPI document at `/openapi.json` (see docs/api.md) on a Unix socket
//! that only its owner may use.
//!
//! - [`store`]: the database.
//! - [`cgroup`]: each VM's cgroup and its limits.
//! - [`driver`]: the Vanguard driver (the VMM process of a VM).
//! - [`manager`]: VMs, operations, events; the state machine.
//! - [`server`]: the HTTP API.

pub mod auth;
pub mod cgroup;
pub mod driver;
pub mod hypervisor;
pub mod manager;
pub mod server;
pub mod store;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// How the daemon runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where the state and the VMs' files live.
    pub data_dir: PathBuf,
    /// The Unix socket of the API (mode 0600).
    pub socket: PathBuf,
    /// TCP listeners (TLS, bearer tokens).
    pub tcp: Vec<TcpListen>,
    /// The `vanguard` binary that runs the VMs.
    pub vmm_exe: PathBuf,
}

/// A TCP listener: its address and its TLS certificate chain and key (PEM files).
#[derive(Debug, Clone)]
pub struct TcpListen {
    /// Where to listen (`127.0.0.1:8443`; port 0 picks one, printed at start).
    pub addr: std::net::SocketAddr,
    /// The certificate chain.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

/// Why the daemon could not start (or stopped).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The data directory cannot be used.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The state database failed.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// Loading the state failed.
    #[error("loading the state: {0}")]
    Load(String),
    /// The socket cannot be used.
    #[error("socket {path}: {reason}")]
    Socket {
        /// The socket.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The runtime failed.
    #[error("{0}")]
    Runtime(#[from] std::io::Error),
}

/// Replaces a stale socket at `path`; refuses a live one or a non-socket.
fn prepare_socket(path: &Path) -> Result<(), Error> {
    let fail = |reason: String| Error::Socket { path: path.to_path_buf(), reason };
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(fail(e.to_string())),
        Ok(meta) if !meta.file_type().is_socket() => {
            Err(fail("exists and is not a socket; not replacing it".into()))
        }
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => Err(fail("another daemon listens on it".into())),
            Err(_) => std::fs::remove_file(path).map_err(|e| fail(e.to_string())),
        },
    }
}

/// Runs the daemon until SIGTERM or SIGINT; `ready` is called, with the TCP listeners'
/// addresses, once it accepts requests.
pub fn serve(options: &Options, ready: impl FnOnce(&[String])) -> Result<(), Error> {
    let data_err = |source| Error::DataDir { path: options.data_dir.clone(), source };
    std::fs::create_dir_all(&options.data_dir).map_err(data_err)?;
    std::fs::set_permissions(&options.data_dir, std::fs::Permissions::from_mode(0o700))
        .map_err(data_err)?;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async {
        let store = store::Store::open(&options.data_dir.join("state.redb"))?;
        let manager =
            manager::Manager::new(store, options.vmm_exe.clone(), options.data_dir.clone())
                .map_err(|e| Error::Load(e.error.error))?;
        if let Some(parent) = options.socket.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::Socket {
                path: options.socket.clone(),
                reason: e.to_string(),
            })?;
        }
        prepare_socket(&options.socket)?;
        let listener = tokio::net::UnixListener::bind(&options.socket)
            .map_err(|e| Error::Socket { path: options.socket.clone(), reason: e.to_string() })?;
        // Only the daemon's owner may talk to it: the socket is the access control.
        std::fs::set_permissions(&options.socket, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::Socket { path: options.socket.clone(), reason: e.to_string() })?;
        let mut tcp = Vec::new();
        for listen in &options.tcp {
            let tls = auth::server_config(&listen.cert, &listen.key)
                .map_err(|e| Error::Socket { path: listen.cert.clone(), reason: e.to_string() })?;
            let listener =
                tokio::net::TcpListener::bind(listen.addr).await.map_err(|e| Error::Socket {
                    path: PathBuf::from(listen.addr.to_string()),
                    reason: e.to_string(),
                })?;
            tcp.push((listener, tls));
        }
        let addresses: Vec<String> =
            tcp.iter().filter_map(|(l, _)| l.local_addr().ok()).map(|a| a.to_string()).collect();
        ready(&addresses);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        for (listener, tls) in tcp {
            let router = server::router(manager.clone())
                .layer(axum::middleware::from_fn_with_state(manager.clone(), auth::require_token));
            tokio::spawn(serve_tls(listener, tls, router, stop_rx.clone()));
        }
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            let _ = stop_tx.send(true);
        };
        let result =
            axum::serve(listener, server::router(manager)).with_graceful_shutdown(shutdown).await;
        let _ = std::fs::remove_file(&options.socket);
        result.map_err(Error::Runtime)
    })
}

/// Accepts TLS connections on `listener` and serves `router` on each, until `stop`.
async fn serve_tls(
    listener: tokio::net::TcpListener,
    tls: std::sync::Arc<rustls::ServerConfig>,
    router: axum::Router,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => continue,
            },
            _ = stop.changed() => return,
        };
        // Where the client reached this daemon: an incoming migration's VMM listens there.
        let local = stream.local_addr().map_or(std::net::IpAddr::from([127, 0, 0, 1]), |a| a.ip());
        let router = router.clone().layer(axum::Extension(server::LocalAddr(local)));
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            // A client that does not speak TLS, or gives up, just loses its connection.
            let Ok(stream) =
                tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(stream))
                    .await
            else {
                return;
            };
            let Ok(stream) = stream else { return };
            let service = hyper_util::service::TowerToHyperService::new(router);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                // The websocket console upgrades the connection.
                .with_upgrades()
                .await;
        });
    }
}
