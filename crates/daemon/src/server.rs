//! The REST API: axum routes under `/v1`, the OpenAPI document generated from them
//! (`/openapi.json`), the events stream and Prometheus metrics.
//!
//! Every error is JSON (`ApiError`) with a status that says what kind: 400 a malformed request
//! or an invalid spec (with the field), 404 an unknown VM or operation, 409 a conflict with the
//! VM's state or an operation under way, 500 the daemon's own failure. Request bodies are read
//! and parsed here (not by axum's extractor) so that every malformed body gets the same JSON
//! 400 with serde's reason.

use crate::manager::{Failure, Manager, DEFAULT_STOP_TIMEOUT};
use api::{ApiError, DriverInfo, Event, HostInfo, Operation, Vm, VmSpec, VmState};
use axum::body::{Body, Bytes};
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;
use utoipa::OpenApi;

/// The OpenAPI document of the API.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Vanguard",
        description = "Vanguard's host daemon: VMs, operations, events, the host."
    ),
    paths(
        list_vms,
        create_vm,
        get_vm,
        delete_vm,
        start_vm,
        stop_vm,
        restart_vm,
        pause_vm,
        resume_vm,
        create_snapshot,
        list_snapshots,
        delete_snapshot,
        restore_vm,
        migrate_vm,
        cancel_migration,
        incoming_migration,
        cancel_incoming,
        console,
        console_ws,
        list_operations,
        get_operation,
        wait_operation,
        events,
        host,
        metrics
    ),
    components(schemas(
        VmSpec,
        Vm,
        api::VmStatus,
        api::VmState,
        api::ExitInfo,
        api::Boot,
        api::Disk,
        api::Nic,
        api::Vsock,
        api::RestartPolicy,
        Operation,
        api::OperationKind,
        api::OperationState,
        Event,
        HostInfo,
        DriverInfo,
        ApiError,
        api::NewSnapshot,
        api::SnapshotEntry,
        api::RestoreRequest,
        api::MigrateVmRequest,
        api::IncomingRequest,
        api::IncomingAccepted,
        api::vmm::MigrationInfo
    ))
)]
pub struct ApiDoc;

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.error)).into_response()
    }
}

type Shared = State<Arc<Manager>>;

/// The router of the whole API.
pub fn router(manager: Arc<Manager>) -> Router {
    Router::new()
        .route("/openapi.json", get(openapi))
        .route("/v1/vms", get(list_vms).post(create_vm))
        .route("/v1/vms/{name}", get(get_vm).delete(delete_vm))
        .route("/v1/vms/{name}/start", post(start_vm))
        .route("/v1/vms/{name}/stop", post(stop_vm))
        .route("/v1/vms/{name}/restart", post(restart_vm))
        .route("/v1/vms/{name}/pause", post(pause_vm))
        .route("/v1/vms/{name}/resume", post(resume_vm))
        .route("/v1/vms/{name}/snapshots", get(list_snapshots).post(create_snapshot))
        .route("/v1/vms/{name}/snapshots/{snapshot}", axum::routing::delete(delete_snapshot))
        .route("/v1/vms/{name}/restore", post(restore_vm))
        .route("/v1/vms/{name}/migrate", post(migrate_vm))
        .route("/v1/vms/{name}/migration/cancel", post(cancel_migration))
        .route("/v1/migrations/incoming", post(incoming_migration))
        .route("/v1/migrations/incoming/{name}", axum::routing::delete(cancel_incoming))
        .route("/v1/vms/{name}/console", get(console).post(console_input))
        .route("/v1/vms/{name}/console/ws", get(console_ws))
        .route("/v1/operations", get(list_operations))
        .route("/v1/operations/{id}", get(get_operation))
        .route("/v1/operations/{id}/wait", get(wait_operation))
        .route("/v1/events", get(events))
        .route("/v1/host", get(host))
        .route("/v1/tokens", get(list_tokens).post(create_token))
        .route("/v1/tokens/{name}", axum::routing::delete(revoke_token))
        .route("/metrics", get(metrics))
        .fallback(|| async { Failure::not_found_path() })
        .method_not_allowed_fallback(|| async {
            Failure {
                status: 405,
                error: ApiError { error: "method not allowed here".into(), field: None },
            }
        })
        .with_state(manager)
}

impl Failure {
    fn not_found_path() -> Failure {
        Failure {
            status: 404,
            error: ApiError { error: "no such path (the API is under /v1)".into(), field: None },
        }
    }
}

async fn openapi() -> Response {
    let doc = ApiDoc::openapi().to_pretty_json().unwrap_or_default();
    ([(header::CONTENT_TYPE, "application/json")], doc).into_response()
}

/// Every VM.
#[utoipa::path(get, path = "/v1/vms", responses((status = 200, body = [Vm])))]
async fn list_vms(State(m): Shared) -> Json<Vec<Vm>> {
    Json(m.list())
}

/// Defines a VM from its spec: JSON, or YAML with `Content-Type: application/yaml`.
#[utoipa::path(post, path = "/v1/vms",
    request_body(content((VmSpec = "application/json"), (VmSpec = "application/yaml"))),
    responses(
    (status = 201, body = Vm), (status = 400, body = ApiError), (status = 409, body = ApiError)))]
async fn create_vm(
    State(m): Shared,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<Vm>), Failure> {
    let content_type = headers.get(axum::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let spec = api::spec::parse(&body, api::SpecFormat::from_content_type(content_type))
        .map_err(Failure::bad_request)?;
    Ok((StatusCode::CREATED, Json(m.create(spec)?)))
}

/// One VM.
#[utoipa::path(get, path = "/v1/vms/{name}", params(("name" = String, Path)), responses(
    (status = 200, body = Vm), (status = 404, body = ApiError)))]
async fn get_vm(State(m): Shared, Path(name): Path<String>) -> Result<Json<Vm>, Failure> {
    Ok(Json(m.get(&name)?))
}

/// Removes a VM that is not running.
#[utoipa::path(delete, path = "/v1/vms/{name}", params(("name" = String, Path)), responses(
    (status = 204), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn delete_vm(State(m): Shared, Path(name): Path<String>) -> Result<StatusCode, Failure> {
    m.delete(&name)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Starts a VM: 202 with the operation to wait on.
#[utoipa::path(post, path = "/v1/vms/{name}/start", params(("name" = String, Path)), responses(
    (status = 202, body = Operation), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn start_vm(
    State(m): Shared,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<Operation>), Failure> {
    Ok((StatusCode::ACCEPTED, Json(m.start(&name)?)))
}

/// How to stop.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
struct StopParams {
    /// Kill the VMM at once instead of pressing the power button.
    #[serde(default)]
    force: bool,
    /// Seconds to wait for the guest to shut down before killing it (default 30).
    timeout: Option<u64>,
}

/// `force` and the timeout (default 30 s) of a stop or restart request.
fn stop_params(
    params: Result<Query<StopParams>, axum::extract::rejection::QueryRejection>,
) -> Result<(bool, Duration), Failure> {
    let Query(params) = params.map_err(|e| Failure::bad_request(e.body_text()))?;
    Ok((params.force, params.timeout.map_or(DEFAULT_STOP_TIMEOUT, Duration::from_secs)))
}

/// Stops a VM: the ACPI power button, then a kill after `timeout` seconds; or a kill at once.
#[utoipa::path(post, path = "/v1/vms/{name}/stop", params(("name" = String, Path), StopParams), responses(
    (status = 202, body = Operation), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn stop_vm(
    State(m): Shared,
    Path(name): Path<String>,
    params: Result<Query<StopParams>, axum::extract::rejection::QueryRejection>,
) -> Result<(StatusCode, Json<Operation>), Failure> {
    let (force, timeout) = stop_params(params)?;
    Ok((StatusCode::ACCEPTED, Json(m.stop(&name, force, timeout)?)))
}

/// Pauses a running VM: its vCPUs stop (its devices and memory stay); the VM is `paused`.
#[utoipa::path(post, path = "/v1/vms/{name}/pause", params(("name" = String, Path)), responses(
    (status = 202, body = Operation), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn pause_vm(
    State(m): Shared,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<Operation>), Failure> {
    Ok((StatusCode::ACCEPTED, Json(m.set_paused(&name, true)?)))
}

/// Resumes a paused VM.
#[utoipa::path(post, path = "/v1/vms/{name}/resume", params(("name" = String, Path)), responses(
    (status = 202, body = Operation), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn resume_vm(
    State(m): Shared,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<Operation>), Failure> {
    Ok((StatusCode::ACCEPTED, Json(m.set_paused(&name, false)?)))
}

/// Restarts a running VM (stop with the power button, then start), or starts a stopped one.
#[utoipa::path(post, path = "/v1/vms/{name}/restart", params(("name" = String, Path), StopParams), responses(
    (status = 202, body = Operation), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn restart_vm(
    State(m): Shared,
    Path(name): Path<String>,
    params: Result<Query<StopParams>, axum::extract::rejection::QueryRejection>,
) -> Result<(StatusCode, Json<Operation>), Failure> {
    let (force, timeout) = stop_params(params)?;
    Ok((StatusCode::ACCEPTED, Json(m.restart(&name, force, timeout)?)))
}

/// The address a TCP connection came in on (set per connection by the TLS listener), where
/// an incoming migration's VMM listens; 127.0.0.1 for the Unix socket.
#[derive(Debug, Clone, Copy)]
pub struct LocalAddr(pub std::net::IpAddr);

/// A JSON request body of type `T` (what it is, for the 400's message); an empty body is
/// `{}`.
fn body_of<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> Result<T, Failure> {
    let body = if body.iter().all(u8::is_ascii_whitespace) { b"{}" } else { body };
    serde_json::from_slice(body).map_err(|e| Failure::bad_request(format!("invalid {what}: {e}")))
}

/// Writes a snapshot of a running or paused VM into `<vm dir>/snapshots/<name>/` (through
/// its VMM): 202 with the operation.
#[utoipa::path(post, path = "/v1/vms/{name}/snapshots", params(("name" = String, Path)),
    request_body = api::NewSnapshot, responses(
    (status = 202, body = Operation), (status = 400, body = ApiError),
    (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn create_snapshot(
    State(m): Shared,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Operation>), Failure> {
    let request = body_of(&body, "snapshot request")?;
    Ok((StatusCode::ACCEPTED, Json(m.snapshot(&name, request)?)))
}

/// The VM's snapshots.
#[utoipa::path(get, path = "/v1/vms/{name}/snapshots", params(("name" = String, Path)),
    responses((status = 200, body = [api::SnapshotEntry]), (status = 404, body = ApiError)))]
async fn list_snapshots(
    State(m): Shared,
    Path(name): Path<String>,
) -> Result<Json<Vec<api::SnapshotEntry>>, Failure> {
    Ok(Json(m.snapshots(&name)?))
}

/// Removes a snapshot.
#[utoipa::path(delete, path = "/v1/vms/{name}/snapshots/{snapshot}",
    params(("name" = String, Path), ("snapshot" = String, Path)), responses(
    (status = 204), (status = 400, body = ApiError), (status = 404, body = ApiError),
    (status = 409, body = ApiError)))]
async fn delete_snapshot(
    State(m): Shared,
    Path((name, snapshot)): Path<(String, String)>,
) -> Result<StatusCode, Failure> {
    m.delete_snapshot(&name, &snapshot)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Runs the VM on from one of its snapshots: its VMM (if one runs) is killed, and a new one
/// restores the snapshot; 202 with the operation.
#[utoipa::path(post, path = "/v1/vms/{name}/restore", params(("name" = String, Path)),
    request_body = api::RestoreRequest, responses(
    (status = 202, body = Operation), (status = 400, body = ApiError),
    (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn restore_vm(
    State(m): Shared,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Operation>), Failure> {
    let request = body_of(&body, "restore request")?;
    Ok((StatusCode::ACCEPTED, Json(m.restore(&name, request)?)))
}

/// Live-migrates a running VM: without `to`, to a fresh VMM process on this host; with it, to
/// that daemon. 202 with the operation, whose `progress` and `migration` follow the VMM's.
#[utoipa::path(post, path = "/v1/vms/{name}/migrate", params(("name" = String, Path)),
    request_body = api::MigrateVmRequest, responses(
    (status = 202, body = Operation), (status = 400, body = ApiError),
    (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn migrate_vm(
    State(m): Shared,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Operation>), Failure> {
    let request = body_of(&body, "migration request")?;
    Ok((StatusCode::ACCEPTED, Json(m.migrate(&name, request)?)))
}

/// Stops the VM's migration in its pre-copy (the guest runs on here): 202 with the
/// migration's operation (which then fails).
#[utoipa::path(post, path = "/v1/vms/{name}/migration/cancel", params(("name" = String, Path)),
    responses((status = 202, body = Operation), (status = 404, body = ApiError),
    (status = 409, body = ApiError)))]
async fn cancel_migration(
    State(m): Shared,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<Operation>), Failure> {
    Ok((StatusCode::ACCEPTED, Json(m.cancel_migration(&name).await?)))
}

/// For a source daemon: defines the VM it is about to migrate here (state `incoming`), starts
/// a VMM waiting for it, and answers with the address that VMM listens on.
#[utoipa::path(post, path = "/v1/migrations/incoming", request_body = api::IncomingRequest,
    responses((status = 201, body = api::IncomingAccepted), (status = 400, body = ApiError),
    (status = 409, body = ApiError), (status = 500, body = ApiError)))]
async fn incoming_migration(
    State(m): Shared,
    local: Option<axum::Extension<LocalAddr>>,
    body: Bytes,
) -> Result<(StatusCode, Json<api::IncomingAccepted>), Failure> {
    let request = body_of(&body, "incoming migration request")?;
    let ip = local.map_or(std::net::IpAddr::from([127, 0, 0, 1]), |l| l.0 .0);
    Ok((StatusCode::CREATED, Json(m.incoming(request, ip).await?)))
}

/// For a source daemon whose migration failed: kills the incoming VM's VMM and removes it.
#[utoipa::path(delete, path = "/v1/migrations/incoming/{name}", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn cancel_incoming(
    State(m): Shared,
    Path(name): Path<String>,
) -> Result<StatusCode, Failure> {
    m.cancel_incoming(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Whether to follow.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
struct ConsoleParams {
    /// Keep the response open and stream new output as the guest writes it (after the last
    /// 64 KiB already written), until the VM's process ends or the client hangs up.
    #[serde(default)]
    follow: bool,
}

/// The serial console output of the VM's current (or last) run (the newest 1 MiB or so), or
/// with `follow=true` a live stream of it.
#[utoipa::path(get, path = "/v1/vms/{name}/console", params(("name" = String, Path), ConsoleParams), responses(
    (status = 200, content_type = "application/octet-stream", body = String), (status = 404, body = ApiError)))]
async fn console(
    State(m): Shared,
    Path(name): Path<String>,
    params: Result<Query<ConsoleParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Failure> {
    let Query(params) = params.map_err(|e| Failure::bad_request(e.body_text()))?;
    if !params.follow {
        let bytes = m.console(&name)?;
        return Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], bytes).into_response());
    }
    let path = m.console_path(&name)?;
    let stream = console_stream(m, name, path).map(Ok::<_, std::io::Error>);
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], Body::from_stream(stream))
        .into_response())
}

/// The console output of VM `name` (file `path`) from its last 64 KiB on, as it is written,
/// until the VM's process ends; empty chunks are heartbeats.
fn console_stream(
    m: Arc<Manager>,
    name: String,
    path: std::path::PathBuf,
) -> impl futures_util::Stream<Item = Bytes> {
    let start = std::fs::metadata(&path).map_or(0, |meta| meta.len().saturating_sub(64 << 10));
    // (offset, whether the process was gone at the last look)
    let state = (m, name, path, start, false);
    futures_util::stream::unfold(state, |(m, name, path, mut offset, gone)| async move {
        loop {
            let len = std::fs::metadata(&path).map_or(0, |meta| meta.len());
            if len < offset {
                offset = 0; // rotated (or a new run): start the new file from its beginning
            }
            if len > offset {
                let chunk = read_range(&path, offset, len.min(offset + (64 << 10)));
                if !chunk.is_empty() {
                    offset += chunk.len() as u64;
                    return Some((Bytes::from(chunk), (m, name, path, offset, false)));
                }
            }
            if gone {
                return None;
            }
            let gone_now = !m.is_running(&name);
            if !gone_now {
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            if gone_now {
                // One more look for output written just before the end.
                return Some((Bytes::new(), (m, name, path, offset, true)));
            }
        }
    })
}

/// Attaches to a running VM's serial console over a websocket: binary messages from the
/// server carry the console output (from its last 64 KiB on), binary or text messages from
/// the client are typed into the console; the server closes (1000, "the VM stopped") when
/// the VM's process ends.
#[utoipa::path(get, path = "/v1/vms/{name}/console/ws", params(("name" = String, Path)), responses(
    (status = 101, description = "Switching to the websocket protocol"),
    (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn console_ws(
    State(m): Shared,
    Path(name): Path<String>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, Failure> {
    let path = m.console_path(&name)?;
    if !m.is_running(&name) {
        return Err(Failure::conflict(format!("'{name}' is not running")));
    }
    let ws = ws.map_err(|e| Failure::bad_request(format!("not a websocket request: {e}")))?;
    Ok(ws.on_upgrade(move |socket| attach_console(m, name, path, socket)))
}

async fn attach_console(
    m: Arc<Manager>,
    name: String,
    path: std::path::PathBuf,
    socket: WebSocket,
) {
    use futures_util::SinkExt;
    let (mut tx, mut rx) = socket.split();
    let output = {
        let (m, name) = (m.clone(), name.clone());
        async move {
            let stream = console_stream(m, name, path);
            futures_util::pin_mut!(stream);
            while let Some(chunk) = stream.next().await {
                if !chunk.is_empty() && tx.send(Message::Binary(chunk)).await.is_err() {
                    return;
                }
            }
            let close = CloseFrame { code: 1000, reason: "the VM stopped".into() };
            let _ = tx.send(Message::Close(Some(close))).await;
        }
    };
    let input = async move {
        while let Some(Ok(message)) = rx.next().await {
            let bytes = match message {
                Message::Binary(b) => b.to_vec(),
                Message::Text(t) => t.as_bytes().to_vec(),
                Message::Close(_) => return,
                _ => continue,
            };
            if m.console_input(&name, &bytes).is_err() {
                return;
            }
        }
    };
    // Either side ending ends the attachment; the output side ends after the VM does.
    tokio::select! {
        () = output => {}
        () = input => {}
    }
}

fn read_range(path: &std::path::Path, from: u64, to: u64) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else { return Vec::new() };
    if file.seek(SeekFrom::Start(from)).is_err() {
        return Vec::new();
    }
    let mut buf = vec![0u8; usize::try_from(to.saturating_sub(from)).unwrap_or(0)];
    let n = file.read(&mut buf).unwrap_or(0);
    buf.truncate(n);
    buf
}

/// Types the request body on the VM's serial console (its input; 409 if it is not running).
#[utoipa::path(post, path = "/v1/vms/{name}/console", params(("name" = String, Path)),
    request_body(content = String, content_type = "application/octet-stream"), responses(
    (status = 204), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn console_input(
    State(m): Shared,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<StatusCode, Failure> {
    m.console_input(&name, &body)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Every operation, oldest first.
#[utoipa::path(get, path = "/v1/operations", responses((status = 200, body = [Operation])))]
async fn list_operations(State(m): Shared) -> Json<Vec<Operation>> {
    Json(m.operations())
}

/// One operation.
#[utoipa::path(get, path = "/v1/operations/{id}", params(("id" = u64, Path)), responses(
    (status = 200, body = Operation), (status = 404, body = ApiError)))]
async fn get_operation(
    State(m): Shared,
    Path(id): Path<String>,
) -> Result<Json<Operation>, Failure> {
    Ok(Json(m.operation(parse_id(&id)?)?))
}

fn parse_id(id: &str) -> Result<u64, Failure> {
    id.parse().map_err(|_| Failure::bad_request(format!("'{id}' is not an operation id")))
}

/// How long to wait.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
struct WaitParams {
    /// Seconds (default 60, at most 600).
    timeout: Option<u64>,
}

/// Waits for an operation to finish (or the timeout) and returns it.
#[utoipa::path(get, path = "/v1/operations/{id}/wait", params(("id" = u64, Path), WaitParams), responses(
    (status = 200, body = Operation), (status = 404, body = ApiError)))]
async fn wait_operation(
    State(m): Shared,
    Path(id): Path<String>,
    params: Result<Query<WaitParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Operation>, Failure> {
    let Query(params) = params.map_err(|e| Failure::bad_request(e.body_text()))?;
    let timeout = Duration::from_secs(params.timeout.unwrap_or(60).min(600));
    Ok(Json(m.wait_operation(parse_id(&id)?, timeout).await?))
}

/// The events stream: one JSON `Event` per line, from now on, until the client hangs up. The
/// first line is an `events.subscribed` event: everything after it is seen.
#[utoipa::path(get, path = "/v1/events", responses(
    (status = 200, content_type = "application/x-ndjson", body = Event)))]
async fn events(State(m): Shared) -> Response {
    use futures_util::StreamExt;
    // The first line says the stream is live: every event after it will be seen.
    let hello = Event {
        seq: 0,
        time_ms: api::now_ms(),
        kind: "events.subscribed".into(),
        vm: None,
        operation: None,
        message: "events from here on".into(),
    };
    let first = serde_json::to_string(&hello).unwrap_or_default() + "\n";
    let first =
        futures_util::stream::once(async move { Ok::<_, std::io::Error>(Bytes::from(first)) });
    let stream = tokio_stream::wrappers::BroadcastStream::new(m.subscribe()).filter_map(
        |event| async move {
            match event {
                Ok(event) => serde_json::to_string(&event)
                    .ok()
                    .map(|line| Ok::<_, std::io::Error>(Bytes::from(line + "\n"))),
                // A slow reader missed some: say so in the stream.
                Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                    let lost = Event {
                        seq: 0,
                        time_ms: api::now_ms(),
                        kind: "events.lost".into(),
                        vm: None,
                        operation: None,
                        message: format!("{n} events were dropped for this slow reader"),
                    };
                    serde_json::to_string(&lost).ok().map(|line| Ok(Bytes::from(line + "\n")))
                }
            }
        },
    );
    let body = Body::from_stream(first.chain(stream));
    ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response()
}

fn meminfo(key: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key)?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
        .unwrap_or(0)
}

/// The host: capacity, what runs, the hypervisor drivers.
#[utoipa::path(get, path = "/v1/host", responses((status = 200, body = HostInfo)))]
async fn host(State(m): Shared) -> Json<HostInfo> {
    let vms = m.list();
    let running: Vec<&Vm> = vms.iter().filter(|v| v.status.pid.is_some()).collect();
    Json(HostInfo {
        hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap_or_default()
            .trim()
            .into(),
        version: env!("CARGO_PKG_VERSION").into(),
        cpus: std::thread::available_parallelism()
            .map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX)),
        memory_total_mib: meminfo("MemTotal:") / 1024,
        memory_available_mib: meminfo("MemAvailable:") / 1024,
        vms_defined: vms.len() as u64,
        vms_running: running.len() as u64,
        vcpus_running: running.iter().map(|v| u64::from(v.spec.cpus)).sum(),
        memory_running_mib: running.iter().map(|v| v.spec.memory_mib).sum(),
        drivers: m.drivers().iter().map(|d| d.info()).collect(),
        cgroups: m.cgroups(),
    })
}

/// The API tokens (names and dates; the secrets are never shown again).
#[utoipa::path(get, path = "/v1/tokens", responses((status = 200, body = [api::TokenInfo])))]
async fn list_tokens(State(m): Shared) -> Json<Vec<api::TokenInfo>> {
    Json(m.tokens())
}

/// Makes a token for the TCP listener; the answer holds its secret, this once.
#[utoipa::path(post, path = "/v1/tokens", request_body = api::NewToken, responses(
    (status = 201, body = api::CreatedToken), (status = 400, body = ApiError), (status = 409, body = ApiError)))]
async fn create_token(
    State(m): Shared,
    body: Bytes,
) -> Result<(StatusCode, Json<api::CreatedToken>), Failure> {
    let request: api::NewToken = serde_json::from_slice(&body)
        .map_err(|e| Failure::bad_request(format!("invalid token request: {e}")))?;
    Ok((StatusCode::CREATED, Json(m.create_token(&request.name)?)))
}

/// Revokes a token: requests carrying it get 401 from now on.
#[utoipa::path(delete, path = "/v1/tokens/{name}", params(("name" = String, Path)), responses(
    (status = 204), (status = 404, body = ApiError)))]
async fn revoke_token(State(m): Shared, Path(name): Path<String>) -> Result<StatusCode, Failure> {
    m.revoke_token(&name)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Prometheus metrics (text format 0.0.4).
#[utoipa::path(get, path = "/metrics", responses((status = 200, content_type = "text/plain", body = String)))]
async fn metrics(State(m): Shared) -> Response {
    use std::fmt::Write;
    let vms = m.list();
    let mut out = String::new();
    let _ = writeln!(out, "# HELP vanguard_vms VMs defined, by state.\n# TYPE vanguard_vms gauge");
    for (state, label) in [
        (VmState::Stopped, "stopped"),
        (VmState::Starting, "starting"),
        (VmState::Running, "running"),
        (VmState::Paused, "paused"),
        (VmState::Stopping, "stopping"),
        (VmState::Failed, "failed"),
        (VmState::Incoming, "incoming"),
    ] {
        let n = vms.iter().filter(|v| v.status.state == state).count();
        let _ = writeln!(out, "vanguard_vms{{state=\"{label}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP vanguard_vm_up Whether the VM's process runs.\n# TYPE vanguard_vm_up gauge"
    );
    for vm in &vms {
        let _ = writeln!(
            out,
            "vanguard_vm_up{{vm=\"{}\"}} {}",
            vm.spec.name,
            u8::from(vm.status.pid.is_some())
        );
    }
    let _ = writeln!(out, "# HELP vanguard_vm_restarts_total Restarts by the restart policy.\n# TYPE vanguard_vm_restarts_total counter");
    for vm in &vms {
        let _ = writeln!(
            out,
            "vanguard_vm_restarts_total{{vm=\"{}\"}} {}",
            vm.spec.name, vm.status.restarts
        );
    }
    let ops = m.operations();
    let _ = writeln!(out, "# HELP vanguard_operations Operations since the state was created, by state.\n# TYPE vanguard_operations gauge");
    for (state, label) in [
        (api::OperationState::Running, "running"),
        (api::OperationState::Succeeded, "succeeded"),
        (api::OperationState::Failed, "failed"),
    ] {
        let _ = writeln!(
            out,
            "vanguard_operations{{state=\"{label}\"}} {}",
            ops.iter().filter(|o| o.state == state).count()
        );
    }
    let rss = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0)
        * 4096;
    let _ = writeln!(out, "# HELP vanguard_daemon_rss_bytes The daemon's resident memory.\n# TYPE vanguard_daemon_rss_bytes gauge\nvanguard_daemon_rss_bytes {rss}");
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
