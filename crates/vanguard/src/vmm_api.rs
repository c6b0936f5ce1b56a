//! The per-VM API (`vanguard run --api-socket PATH`): HTTP/1.1 over a Unix socket, served by
//! hyper on one thread of its own with a single-threaded tokio runtime, on top of
//! [`vmm::VmControl`]. The routes and types are in `api::vmm`; docs/api.md describes them.
//!
//! The socket is made before the VM is built, so a bad path fails the run at once; it is
//! readable and writable by the owner only (mode 0600), and removed when the VMM ends. A socket
//! left by a VMM that was killed is replaced; one that still answers is refused.

use api::vmm::{MigrateRequest, MigrationInfo, SnapshotInfo, SnapshotRequest, VmmInfo, VmmState};
use api::ApiError;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use std::convert::Infallible;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use vmm::{RunState, VmControl, VmmError};

/// The socket, removed when dropped; dropping also waits (up to a second) for open
/// connections to finish, so that an answer given as the VM ends (a migration's) reaches its
/// client before the process exits.
pub struct ApiSocket(PathBuf, Arc<AtomicUsize>);

impl Drop for ApiSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        while self.1.load(Ordering::Acquire) > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

/// Binds `path` and serves the per-VM API for `control` on a thread of its own.
pub fn start(path: &Path, control: Arc<VmControl>) -> Result<ApiSocket, VmmError> {
    let fail = |why: String| VmmError::ApiSocket { path: path.to_path_buf(), why };
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(fail("another process is listening there".into()));
        }
        std::fs::remove_file(path).map_err(|e| fail(format!("cannot remove the old one: {e}")))?;
    }
    let listener = UnixListener::bind(path).map_err(|e| fail(e.to_string()))?;
    let open = Arc::new(AtomicUsize::new(0));
    let socket = ApiSocket(path.to_path_buf(), open.clone());
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| fail(format!("cannot make it private: {e}")))?;
    listener.set_nonblocking(true).map_err(|e| fail(e.to_string()))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| fail(format!("cannot start its runtime: {e}")))?;
    std::thread::Builder::new()
        .name("vmm-api".into())
        .spawn(move || runtime.block_on(serve(listener, control, open)))
        .map_err(|e| fail(format!("cannot start its thread: {e}")))?;
    Ok(socket)
}

async fn serve(listener: UnixListener, control: Arc<VmControl>, open: Arc<AtomicUsize>) {
    let Ok(listener) = tokio::net::UnixListener::from_std(listener) else { return };
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let control = control.clone();
        let open = open.clone();
        open.fetch_add(1, Ordering::AcqRel);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(req, control.clone()));
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            open.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

type Answer = Response<Full<Bytes>>;

fn respond(status: StatusCode, content_type: &str, body: Vec<u8>) -> Answer {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response.headers_mut().insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Answer {
    respond(status, "application/json", serde_json::to_vec(value).unwrap_or_default())
}

fn error(status: StatusCode, message: impl Into<String>) -> Answer {
    json(status, &ApiError { error: message.into(), field: None })
}

fn info(control: &VmControl) -> VmmInfo {
    let info = control.info();
    VmmInfo {
        state: match info.state {
            RunState::Starting => VmmState::Starting,
            RunState::Running => VmmState::Running,
            RunState::Paused => VmmState::Paused,
            RunState::Stopping => VmmState::Stopping,
        },
        vcpus: u32::try_from(info.vcpus).unwrap_or(u32::MAX),
        memory_mib: info.memory_bytes >> 20,
        pid: std::process::id(),
        uptime_ms: u64::try_from(info.uptime.as_millis()).unwrap_or(u64::MAX),
        paused_ms: u64::try_from(info.paused.as_millis()).unwrap_or(u64::MAX),
        version: env!("CARGO_PKG_VERSION").to_string(),
    }
}

/// The process's resident memory in bytes, from /proc/self/statm.
fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf only reads a system constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page).unwrap_or(4096)
}

/// `GET /metrics` in Prometheus text format.
fn metrics(control: &VmControl) -> String {
    use std::fmt::Write;
    let info = control.info();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, String)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let one = |value: String| vec![(String::new(), value)];
    metric(
        "vanguard_vmm_paused",
        "gauge",
        "1 while the VM's vCPUs are paused.",
        &one(u8::from(info.state == RunState::Paused).to_string()),
    );
    metric(
        "vanguard_vmm_uptime_seconds",
        "gauge",
        "Seconds since the VMM started building the VM.",
        &one(format!("{:.3}", info.uptime.as_secs_f64())),
    );
    metric(
        "vanguard_vmm_paused_seconds_total",
        "counter",
        "Seconds spent paused.",
        &one(format!("{:.3}", info.paused.as_secs_f64())),
    );
    metric("vanguard_vmm_vcpus", "gauge", "vCPUs.", &one(info.vcpus.to_string()));
    metric(
        "vanguard_vmm_guest_memory_bytes",
        "gauge",
        "Guest memory.",
        &one(info.memory_bytes.to_string()),
    );
    metric(
        "vanguard_vmm_resident_memory_bytes",
        "gauge",
        "The VMM process's resident memory, guest memory it touched included.",
        &one(resident_bytes().to_string()),
    );
    let mut exits = Vec::new();
    for (cpu, (io, mmio, other)) in info.exits.iter().enumerate() {
        for (kind, count) in [("io", io), ("mmio", mmio), ("other", other)] {
            exits.push((format!("{{vcpu=\"{cpu}\",kind=\"{kind}\"}}"), count.to_string()));
        }
    }
    metric(
        "vanguard_vmm_vcpu_exits_total",
        "counter",
        "Exits from KVM_RUN to the VMM, by vCPU and kind (port I/O, MMIO, other).",
        &exits,
    );
    out
}

/// `PUT /v1/vm/snapshot`: the body names the directory; the work (pause, capture, write)
/// runs off the runtime's thread.
async fn snapshot(body: &[u8], control: Arc<VmControl>) -> Answer {
    let request: SnapshotRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid snapshot request: {e}")),
    };
    let result = tokio::task::spawn_blocking(move || {
        control.snapshot(std::path::Path::new(&request.destination), request.incremental)
    })
    .await;
    match result {
        Ok(Ok(report)) => json(
            StatusCode::OK,
            &SnapshotInfo {
                destination: report.dir.display().to_string(),
                incremental: report.incremental,
                memory_bytes_written: report.memory_bytes_written,
                state_bytes: report.state_bytes,
                downtime_us: u64::try_from(report.downtime.as_micros()).unwrap_or(u64::MAX),
                total_us: u64::try_from(report.total.as_micros()).unwrap_or(u64::MAX),
            },
        ),
        Ok(Err(vmm::SnapshotFailure::Control(e))) => error(StatusCode::CONFLICT, e.to_string()),
        Ok(Err(e @ vmm::SnapshotFailure::Unsupported(_))) => {
            error(StatusCode::CONFLICT, e.to_string())
        }
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

fn progress_info(p: &vmm::MigrationProgress) -> MigrationInfo {
    MigrationInfo {
        phase: if p.phase.is_empty() { "none".into() } else { p.phase.clone() },
        passes: p.passes,
        bytes_sent: p.bytes_sent,
        dirty_bytes: p.dirty_bytes,
        dirty_rate_bytes_per_s: p.dirty_rate,
        link_rate_bytes_per_s: p.link_rate,
        expected_downtime_us: u64::try_from(p.expected_downtime.as_micros()).unwrap_or(u64::MAX),
        throttle_percent: p.throttle_percent,
        error: p.error.clone(),
        total_us: None,
        downtime_us: None,
        state_bytes: None,
    }
}

/// `PUT /v1/vm/migrate`: runs the whole migration off the runtime's thread and answers when
/// it is over (meanwhile `GET /v1/vm/migration` shows progress).
async fn migrate(body: &[u8], control: Arc<VmControl>) -> Answer {
    let request: MigrateRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid migrate request: {e}")),
    };
    let destination = match request.destination.parse::<vmm::MigrationAddress>() {
        Ok(d) => d,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let options = vmm::MigrateOptions {
        destination,
        max_downtime: std::time::Duration::from_millis(request.max_downtime_ms.unwrap_or(300)),
        bandwidth: request.bandwidth_mib_s.filter(|b| *b > 0).map(|b| b << 20),
        auto_converge: request.auto_converge.unwrap_or(true),
    };
    let worker = control.clone();
    let result = tokio::task::spawn_blocking(move || worker.migrate(&options)).await;
    match result {
        Ok(Ok(report)) => {
            let mut info = progress_info(&control.migration_progress());
            info.total_us = Some(u64::try_from(report.total.as_micros()).unwrap_or(u64::MAX));
            info.downtime_us = Some(u64::try_from(report.downtime.as_micros()).unwrap_or(u64::MAX));
            info.state_bytes = Some(report.state_bytes);
            info.bytes_sent = report.bytes_sent;
            info.passes = report.passes;
            json(StatusCode::OK, &info)
        }
        Ok(Err(vmm::SnapshotFailure::Control(e))) => error(StatusCode::CONFLICT, e.to_string()),
        Ok(Err(e @ vmm::SnapshotFailure::Unsupported(_))) => {
            error(StatusCode::CONFLICT, e.to_string())
        }
        Ok(Err(e)) => error(StatusCode::BAD_GATEWAY, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn handle(req: Request<Incoming>, control: Arc<VmControl>) -> Result<Answer, Infallible> {
    let (parts, body) = req.into_parts();
    // Read whole (bounded: the only body is a small JSON object); reading it also keeps the
    // connection usable.
    let body = match http_body_util::Limited::new(body, 64 << 10).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return Ok(error(StatusCode::BAD_REQUEST, format!("request body: {e}"))),
    };
    let path = parts.uri.path();
    match (path, &parts.method) {
        ("/v1/vm/migrate", &Method::PUT) => return Ok(migrate(&body, control).await),
        ("/v1/vm/migration", &Method::GET) => {
            return Ok(json(StatusCode::OK, &progress_info(&control.migration_progress())))
        }
        ("/v1/vm/migration/cancel", &Method::PUT) => {
            return Ok(match control.cancel_migration() {
                Ok(()) => json(StatusCode::ACCEPTED, &progress_info(&control.migration_progress())),
                Err(e) => error(StatusCode::CONFLICT, e.to_string()),
            })
        }
        ("/v1/vm/migrate" | "/v1/vm/migration/cancel", _) => {
            return Ok(error(StatusCode::METHOD_NOT_ALLOWED, format!("{path} takes PUT")))
        }
        ("/v1/vm/migration", _) => {
            return Ok(error(StatusCode::METHOD_NOT_ALLOWED, format!("{path} takes GET")))
        }
        _ => {}
    }
    if path == "/v1/vm/snapshot" {
        return Ok(if parts.method == Method::PUT {
            snapshot(&body, control).await
        } else {
            error(StatusCode::METHOD_NOT_ALLOWED, format!("{path} takes PUT"))
        });
    }
    let action = match path {
        "/v1/vm" | "/metrics" if parts.method == Method::GET => {
            return Ok(if path == "/metrics" {
                respond(StatusCode::OK, "text/plain; version=0.0.4", metrics(&control).into_bytes())
            } else {
                json(StatusCode::OK, &info(&control))
            });
        }
        "/v1/vm" | "/metrics" => {
            return Ok(error(StatusCode::METHOD_NOT_ALLOWED, format!("{path} takes GET")))
        }
        "/v1/vm/pause" | "/v1/vm/resume" | "/v1/vm/shutdown" if parts.method != Method::PUT => {
            return Ok(error(StatusCode::METHOD_NOT_ALLOWED, format!("{path} takes PUT")))
        }
        "/v1/vm/pause" => VmControl::pause,
        "/v1/vm/resume" => VmControl::resume,
        "/v1/vm/shutdown" => VmControl::power_button,
        _ => return Ok(error(StatusCode::NOT_FOUND, format!("no such resource: {path}"))),
    };
    // A pause waits for the vCPUs to park: off the runtime's only thread.
    let worker = control.clone();
    let result = tokio::task::spawn_blocking(move || action(&worker)).await;
    Ok(match result {
        Ok(Ok(())) if path == "/v1/vm/shutdown" => json(StatusCode::ACCEPTED, &info(&control)),
        Ok(Ok(())) => json(StatusCode::OK, &info(&control)),
        Ok(Err(e)) => error(StatusCode::CONFLICT, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    })
}
