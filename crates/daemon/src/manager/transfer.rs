//! Snapshots, restore and live migration of the daemon's VMs (docs/api.md, "Snapshots and
//! migration"): operations that move a VM's state through its VMM's per-VM API. The daemon
//! passes nothing device-specific: the VMM takes the machine from the snapshot or the stream.
//!
//! - A snapshot is `PUT /v1/vm/snapshot` into `<vm dir>/snapshots/<name>/`.
//! - A restore kills the VM's VMM (if any) and starts `vanguard vmm --restore DIR` with the
//!   files, cgroup and ready pipe of a normal start.
//! - A same-host migration starts `vanguard vmm --migrate-from unix:<vm dir>/migrate.sock`
//!   whose API socket is the other one of `vmm.sock` and `vmm-b.sock`, and tells the current
//!   VMM to migrate to it; on success the new process is the VM's (stored with its socket).
//! - A migration to another daemon asks it (`POST /v1/migrations/incoming`) for an address its
//!   new VMM listens on, migrates there, and on success removes the VM here.
//!
//! While a VMM migrates away, its end belongs to the migration (`Entry::handover`): it is not a
//! stop, a failure or a reason to restart.

use super::{lock, state_name, Entry, Failure, Launch, Manager, START_TIMEOUT};
use crate::driver::{self, VmFiles};
use api::vmm::{MigrateRequest, MigrationInfo, SnapshotRequest, VmmState};
use api::{
    Hypervisor, IncomingAccepted, IncomingRequest, MigrateVmRequest, NewSnapshot, Operation,
    OperationKind, RestoreRequest, SnapshotEntry, VmState,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often a migration's progress is read from the VMM.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(200);
/// How long a destination VMM may take to listen.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an incoming VM may wait for its source (then its VMM is killed and it is removed).
const INCOMING_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// How long a migrated source VMM may take to exit after its migration succeeded.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest snapshot name.
const SNAPSHOT_NAME_MAX: usize = 64;

/// Checks a snapshot name (the request body's field `field`): 1 to 64 of `A-Z a-z 0-9 . _ -`,
/// not starting with '.', so that it is one directory under the VM's `snapshots/`.
pub fn check_snapshot_name(name: &str, field: &str) -> Result<(), Failure> {
    let fail = |why: &str| Err(Failure::field(field, format!("snapshot name '{name}': {why}")));
    if name.is_empty() {
        return Err(Failure::field(field, "a snapshot name must not be empty"));
    }
    if name.len() > SNAPSHOT_NAME_MAX {
        return fail(&format!("longer than {SNAPSHOT_NAME_MAX} bytes"));
    }
    if name.contains('/') {
        return fail("must not contain '/'");
    }
    if name == "." || name == ".." {
        return fail("must not be '.' or '..'");
    }
    if name.starts_with('.') {
        return fail("must not start with '.'");
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
        return fail("may hold only letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

/// 409 unless the VM's process runs (running or paused) and its driver does snapshots.
fn transferable(m: &Manager, entry: &Entry, name: &str, what: &str) -> Result<(), Failure> {
    let vm = &entry.record.vm;
    if vm.spec.hypervisor != Hypervisor::Vanguard {
        return Err(Failure::conflict(m.drivers.get(vm.spec.hypervisor).no_transfers()));
    }
    match vm.status.state {
        VmState::Running | VmState::Paused if vm.status.pid.is_some() => Ok(()),
        state => Err(Failure::conflict(format!(
            "'{name}' is {} ({what} needs it running or paused)",
            state_name(state)
        ))),
    }
}

/// The VM's generation recorded in a state file (`machine` section, docs/snapshot.md).
fn generation(state: &[u8]) -> Option<u64> {
    let file = snapshot::Snapshot::parse(state).ok()?;
    let mut machine = file.one("machine").ok()?.decoder();
    machine.u32("vcpus").ok()?;
    machine.u64("memory").ok()?;
    for what in ["transport", "debug exit", "boot timer"] {
        machine.u8(what).ok()?;
    }
    machine.bytes("vm id").ok()?;
    machine.u64("generation").ok()
}

/// What `GET /v1/vms/{name}/snapshots` says of snapshot directory `dir`.
fn snapshot_entry(name: String, dir: &Path) -> SnapshotEntry {
    use std::os::unix::fs::MetadataExt;
    let size_bytes = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|f| f.metadata().ok())
        .map(|meta| meta.blocks() * 512)
        .sum();
    let state_path = dir.join("state");
    let created_at =
        std::fs::metadata(&state_path).ok().and_then(|m| u64::try_from(m.mtime()).ok());
    let generation = std::fs::read(&state_path).ok().and_then(|bytes| generation(&bytes));
    let complete = generation.is_some() && dir.join("memory").is_file();
    SnapshotEntry { name, created_at, size_bytes, generation, complete }
}

/// The migration's progress in words: phase, pass, MiB sent against the VM's memory, the
/// dirty rate, the expected downtime and the throttle.
fn describe(info: &MigrationInfo, memory_mib: u64) -> String {
    let mib = |bytes: u64| bytes >> 20;
    format!(
        "{}: pass {}, {} MiB sent of {memory_mib} MiB, {} MiB dirty at {} MiB/s (link {} MiB/s), \
         expected downtime {} ms, throttle {}%",
        info.phase,
        info.passes,
        mib(info.bytes_sent),
        mib(info.dirty_bytes),
        mib(info.dirty_rate_bytes_per_s),
        mib(info.link_rate_bytes_per_s),
        info.expected_downtime_us / 1000,
        info.throttle_percent
    )
}

/// The result of a completed migration in words.
fn summary(info: &MigrationInfo) -> String {
    format!(
        "in {} ms (the guest stopped {} ms), {} MiB of memory in {} passes",
        info.total_us.unwrap_or(0) / 1000,
        info.downtime_us.unwrap_or(0) / 1000,
        info.bytes_sent >> 20,
        info.passes
    )
}

/// What the VM's VMM is told for `request`: migrate to the VMM at `destination`.
fn to_vmm(request: &MigrateVmRequest, destination: &str) -> MigrateRequest {
    MigrateRequest {
        destination: destination.into(),
        max_downtime_ms: request.max_downtime_ms,
        bandwidth_mib_s: request.bandwidth_mib_s,
        auto_converge: request.auto_converge,
    }
}

/// A client for the destination daemon `to` (`unix:PATH` or `tcp:HOST:PORT`).
fn destination_client(request: &MigrateVmRequest) -> Result<api::client::Client, Failure> {
    let to = request.to.as_deref().unwrap_or_default();
    if let Some(path) = to.strip_prefix("unix:").filter(|p| !p.is_empty()) {
        return Ok(api::client::Client::unix(path));
    }
    let addr = to
        .strip_prefix("tcp:")
        .filter(|a| {
            a.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
        })
        .ok_or_else(|| {
            Failure::field(
                "to",
                format!("invalid daemon address '{to}': use tcp:HOST:PORT or unix:PATH"),
            )
        })?;
    let pem = request.ca_cert.as_deref().ok_or_else(|| {
        Failure::field(
            "ca_cert",
            format!("a tcp: destination ({to}) needs the PEM certificate that signed its own"),
        )
    })?;
    api::client::Client::tls_pem(addr, pem.as_bytes(), "ca_cert", request.token.clone())
        .map_err(|e| Failure::field("ca_cert", e.to_string()))
}

impl Manager {
    /// Writes snapshot `request.name` of a running or paused VM: 202 with the operation.
    pub fn snapshot(
        self: &Arc<Self>,
        name: &str,
        request: NewSnapshot,
    ) -> Result<Operation, Failure> {
        check_snapshot_name(&request.name, "name")?;
        let op = self.begin(name, OperationKind::Snapshot, |entry| {
            transferable(self, entry, name, "a snapshot")
        })?;
        let manager = self.clone();
        let (name, id) = (name.to_string(), op.id);
        tokio::spawn(async move {
            let result = manager.run_snapshot(&name, id, &request).await;
            manager.finish(id, result);
        });
        Ok(op)
    }

    async fn run_snapshot(
        &self,
        name: &str,
        op: u64,
        request: &NewSnapshot,
    ) -> Result<String, String> {
        let spec = self.get(name).map_err(|e| e.error.error)?.spec;
        let files = self.files(name);
        let dir = files.snapshots().join(&request.name);
        std::fs::create_dir_all(files.snapshots())
            .map_err(|e| format!("cannot make {}: {e}", files.snapshots().display()))?;
        self.progress(op, &format!("writing snapshot '{}'", request.name));
        let destination = dir.to_string_lossy().into_owned();
        let info = self
            .drivers
            .get(spec.hypervisor)
            .snapshot(&files, SnapshotRequest { destination, incremental: request.incremental })
            .await?;
        let done = format!(
            "snapshot '{}' written{}: {} MiB of memory, {} bytes of state; the guest stopped {} ms",
            request.name,
            if info.incremental { " (incremental)" } else { "" },
            info.memory_bytes_written >> 20,
            info.state_bytes,
            info.downtime_us / 1000
        );
        self.emit("vm.snapshotted", Some(name), Some(op), &done);
        Ok(done)
    }

    /// The VM's snapshots, by name.
    pub fn snapshots(&self, name: &str) -> Result<Vec<SnapshotEntry>, Failure> {
        self.get(name)?;
        let dir = VmFiles::new(&self.data_dir, name).snapshots();
        let mut list: Vec<SnapshotEntry> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
            .map(|(snap, path)| snapshot_entry(snap, &path))
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(list)
    }

    /// Removes snapshot `snap` of VM `name` (refused while an operation acts on the VM).
    pub fn delete_snapshot(&self, name: &str, snap: &str) -> Result<(), Failure> {
        check_snapshot_name(snap, "snapshot")?;
        // Held while the directory goes, so that no operation starts writing it meanwhile.
        let vms = lock(&self.vms);
        let entry = vms.get(name).ok_or_else(|| Failure::not_found(name))?;
        if let Some(op) = entry.busy {
            return Err(Failure::conflict(format!("operation {op} is under way on '{name}'")));
        }
        let dir = VmFiles::new(&self.data_dir, name).snapshots().join(snap);
        if !dir.is_dir() {
            return Err(Failure::missing(format!("'{name}' has no snapshot '{snap}'")));
        }
        std::fs::remove_dir_all(&dir)
            .map_err(|e| Failure::internal(format!("cannot remove {}: {e}", dir.display())))?;
        drop(vms);
        self.emit("vm.snapshot-deleted", Some(name), None, &format!("snapshot '{snap}' deleted"));
        Ok(())
    }

    /// Runs VM `name` on from one of its snapshots (killing its VMM first if one runs): 202
    /// with the operation.
    pub fn restore(
        self: &Arc<Self>,
        name: &str,
        request: RestoreRequest,
    ) -> Result<Operation, Failure> {
        check_snapshot_name(&request.snapshot, "snapshot")?;
        let spec = self.get(name)?.spec;
        if spec.hypervisor != Hypervisor::Vanguard {
            return Err(Failure::conflict(self.drivers.get(spec.hypervisor).no_transfers()));
        }
        let snap = &request.snapshot;
        let dir = VmFiles::new(&self.data_dir, name).snapshots().join(snap);
        if !dir.is_dir() {
            return Err(Failure::missing(format!("'{name}' has no snapshot '{snap}'")));
        }
        if !snapshot_entry(snap.clone(), &dir).complete {
            return Err(Failure::conflict(format!(
                "snapshot '{snap}' of '{name}' cannot be restored: its state file is missing or \
                 unreadable (an interrupted snapshot)"
            )));
        }
        let op =
            self.begin(name, OperationKind::Restore, |entry| match entry.record.vm.status.state {
                VmState::Incoming => Err(Failure::conflict(format!("'{name}' is incoming"))),
                _ => Ok(()),
            })?;
        let manager = self.clone();
        let (name, id) = (name.to_string(), op.id);
        tokio::spawn(async move {
            let result = manager.run_restore(&name, id, &request.snapshot, dir).await;
            manager.finish(id, result);
        });
        Ok(op)
    }

    async fn run_restore(
        self: &Arc<Self>,
        name: &str,
        op: u64,
        snap: &str,
        dir: PathBuf,
    ) -> Result<String, String> {
        if self.is_running(name) {
            self.run_stop(name, op, true, Duration::ZERO).await?;
        }
        self.progress(op, &format!("starting the VMM from snapshot '{snap}'"));
        let generation = self.launch(name, &Launch::Restore(dir))?;
        self.progress(op, "waiting for the restored VM's vCPUs to run");
        let ran = self.wait_running(name, generation, START_TIMEOUT).await?;
        let done = format!("restored from snapshot '{snap}'; {ran}");
        self.emit("vm.restored", Some(name), Some(op), &done);
        Ok(done)
    }

    /// Live-migrates VM `name`: to a fresh VMM process here, or to the daemon `request.to`;
    /// 202 with the operation.
    pub fn migrate(
        self: &Arc<Self>,
        name: &str,
        request: MigrateVmRequest,
    ) -> Result<Operation, Failure> {
        let destination = match &request.to {
            Some(_) => Some(destination_client(&request)?),
            None => None,
        };
        let op = self.begin(name, OperationKind::Migrate, |entry| {
            transferable(self, entry, name, "a migration")
        })?;
        let manager = self.clone();
        let (name, id) = (name.to_string(), op.id);
        tokio::spawn(async move {
            let result = match destination {
                None => manager.run_migrate_here(&name, id, &request).await,
                Some(client) => manager.run_migrate_away(&name, id, &request, &client).await,
            };
            manager.finish(id, result);
        });
        Ok(op)
    }

    /// Stops the pre-copy of VM `name`'s migration (the guest runs on here): 202 with the
    /// migration's operation, which then fails.
    pub async fn cancel_migration(&self, name: &str) -> Result<Operation, Failure> {
        let vm = self.get(name)?;
        let busy = lock(&self.vms).get(name).and_then(|e| e.busy);
        let op = busy
            .and_then(|id| self.operation(id).ok())
            .filter(|op| op.kind == OperationKind::Migrate)
            .ok_or_else(|| Failure::conflict(format!("no migration of '{name}' is under way")))?;
        self.drivers
            .get(vm.spec.hypervisor)
            .cancel_migration(&self.files(name))
            .await
            .map_err(Failure::conflict)?;
        Ok(op)
    }

    /// Tells the VM's VMM to migrate (`request`), updating operation `op`'s progress from
    /// the VMM's figures until it answers. Meanwhile the VMM's end is the migration's
    /// ([`Entry::handover`]).
    async fn drive_migration(
        &self,
        name: &str,
        op: u64,
        files: &VmFiles,
        request: MigrateRequest,
    ) -> Result<MigrationInfo, String> {
        let spec = self.get(name).map_err(|e| e.error.error)?.spec;
        let driver = self.drivers.get(spec.hypervisor);
        self.update(name, |entry| {
            entry.handover = Some(entry.generation);
            entry.handed_over = None;
        });
        self.progress(op, &format!("migrating to {}", request.destination));
        let migrate = driver.migrate(files, request);
        tokio::pin!(migrate);
        let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
        loop {
            tokio::select! {
                result = &mut migrate => {
                    if let Ok(info) = &result {
                        self.progress_with(op, &describe(info, spec.memory_mib), Some(info.clone()));
                    }
                    return result.map_err(|e| format!("the migration failed: {e}"));
                }
                _ = tick.tick() => {
                    if let Ok(info) = driver.migration(files).await {
                        self.progress_with(op, &describe(&info, spec.memory_mib), Some(info));
                    }
                }
            }
        }
    }

    /// After a successful migration: waits (up to 10 s, then kills it) for the source VMM to
    /// end, as it does once it has answered.
    async fn source_gone(&self, name: &str, pid: Option<u32>) {
        let ended = |m: &Manager| {
            lock(&m.vms).get(name).is_none_or(|e| e.handed_over.is_some()).then_some(())
        };
        if self.wait_until(HANDOVER_TIMEOUT, || ended(self)).await.is_none() {
            if let Some(pid) = pid {
                let _ = driver::signal(pid, libc::SIGKILL);
            }
            self.wait_until(HANDOVER_TIMEOUT, || ended(self)).await;
        }
    }

    /// After a failed migration: the source's end is its own again; if it ended meanwhile,
    /// that end is taken as any other.
    fn take_back(self: &Arc<Self>, name: &str) {
        let mut ended = None;
        self.update(name, |entry| {
            if let (Some(generation), Some(status)) = (entry.handover, entry.handed_over) {
                ended = Some((generation, status));
            }
            entry.handover = None;
            entry.handed_over = None;
        });
        if let Some((generation, status)) = ended {
            self.process_ended(name, generation, status);
        }
    }

    /// Same-host migration to a fresh VMM process (the binary-upgrade case).
    async fn run_migrate_here(
        self: &Arc<Self>,
        name: &str,
        op: u64,
        request: &MigrateVmRequest,
    ) -> Result<String, String> {
        let vm = self.get(name).map_err(|e| e.error.error)?;
        let files = self.files(name);
        let old_pid = vm.status.pid;
        let socket = files.migrate_socket();
        let _ = std::fs::remove_file(&socket);
        let next_api = files.next_api_socket();
        let _ = std::fs::remove_file(&next_api);
        let from = format!("unix:{}", socket.display());
        let driver = self.drivers.get(vm.spec.hypervisor);
        let invocation = driver.incoming_invocation(&from, &files, &next_api)?;
        // Both processes hold the guest's memory until the source ends: the cgroup's memory
        // limit covers the two meanwhile.
        let mut limits = vm.spec.limits.clone();
        limits.memory_max_mib =
            limits.memory_max_mib.map(|max| max.saturating_add(vm.spec.memory_mib + 64));
        self.progress(op, "starting the destination VMM process");
        let launched = self.spawn_vmm(name, &limits, &invocation, &files)?;
        let mut child = launched.child;
        let result = async {
            wait_listening(&from, &mut child).await?;
            self.drive_migration(name, op, &files, to_vmm(request, &from)).await
        }
        .await;
        let _ = std::fs::remove_file(&socket);
        let info = match result {
            Ok(info) => info,
            Err(e) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                let _ = std::fs::remove_file(&next_api);
                self.take_back(name);
                self.restore_limits(name);
                return Err(e);
            }
        };
        self.source_gone(name, old_pid).await;
        // The new process is the VM's from now on.
        let default = VmFiles::new(&self.data_dir, name).api_socket();
        let api_socket = (next_api != default).then_some(next_api.clone());
        let new_files = VmFiles::new(&self.data_dir, name).with_api_socket(api_socket.clone());
        let paused =
            matches!(driver.vmm_info(&new_files).await, Ok(i) if i.state == VmmState::Paused);
        let mut generation = 0;
        self.update(name, |entry| {
            generation = entry.take_process(launched.pid, launched.proc_start, api_socket);
            entry.record.vm.status.state = if paused { VmState::Paused } else { VmState::Running };
        });
        self.watch(name, generation, child, launched.ready);
        self.restore_limits(name);
        let done = format!(
            "moved to VMM process {} (was {}) {}",
            launched.pid,
            old_pid.map_or("-".into(), |p| p.to_string()),
            summary(&info)
        );
        self.emit("vm.migrated", Some(name), Some(op), &done);
        Ok(done)
    }

    /// Sets the VM's cgroup limits back to its spec's (after a same-host migration).
    fn restore_limits(&self, name: &str) {
        if let Ok(vm) = self.get(name) {
            if let Err(e) = self.cgroups.prepare(name, &vm.spec.limits) {
                tracing::warn!("{name}: cannot set the cgroup limits back: {e}");
            }
        }
    }

    /// Migration to another daemon: it makes the VM and its VMM, this VMM sends the VM there,
    /// and on success the VM is removed here.
    async fn run_migrate_away(
        self: &Arc<Self>,
        name: &str,
        op: u64,
        request: &MigrateVmRequest,
        client: &api::client::Client,
    ) -> Result<String, String> {
        let vm = self.get(name).map_err(|e| e.error.error)?;
        let to = request.to.clone().unwrap_or_default();
        self.progress(op, &format!("asking the daemon at {to} to receive the VM"));
        let incoming = IncomingRequest { name: name.into(), spec: vm.spec.clone() };
        let accepted: IncomingAccepted = client
            .post("/v1/migrations/incoming", &incoming)
            .await
            .map_err(|e| format!("the destination daemon {to} refused the VM: {e}"))?;
        let files = self.files(name);
        let migrate = to_vmm(request, &accepted.address);
        let info = match self.drive_migration(name, op, &files, migrate).await {
            Ok(info) => info,
            Err(e) => {
                // The destination gives its VM up (its VMM may already have ended).
                let cancel = format!("/v1/migrations/incoming/{name}");
                let _ = client.delete(&cancel).await;
                self.take_back(name);
                return Err(e);
            }
        };
        self.source_gone(name, vm.status.pid).await;
        // The destination's operation ends when the VM runs there.
        let wait = format!("/v1/operations/{}/wait?timeout=30", accepted.operation.id);
        let there = match client.get::<Operation>(&wait).await {
            Ok(op) if op.state == api::OperationState::Succeeded => "it runs there".to_string(),
            Ok(op) => format!("the destination says: {}", op.error.unwrap_or(op.progress)),
            Err(e) => format!("the destination did not confirm: {e}"),
        };
        let done = format!("moved to {to} {}; {there}", summary(&info));
        self.remove_record(name, "vm.migrated", Some(op), &done);
        Ok(done)
    }

    /// Removes VM `name`'s record, files and cgroup (it has no process here any more).
    fn remove_record(&self, name: &str, event: &str, op: Option<u64>, message: &str) {
        if let Err(e) = self.store.delete_vm(name) {
            tracing::error!("{e}");
        }
        lock(&self.vms).remove(name);
        let _ = std::fs::remove_dir_all(VmFiles::new(&self.data_dir, name).dir);
        self.cgroups.remove(name);
        self.emit(event, Some(name), op, message);
        self.changed.notify_waiters();
    }

    /// `POST /v1/migrations/incoming`: defines VM `request.name` (409 if it exists), starts a
    /// VMM waiting for it on a free port of `ip` (the address the request came in on), and
    /// answers once that VMM listens.
    pub async fn incoming(
        self: &Arc<Self>,
        request: IncomingRequest,
        ip: std::net::IpAddr,
    ) -> Result<IncomingAccepted, Failure> {
        let name = request.name.clone();
        if request.spec.name != name {
            return Err(Failure::field(
                "name",
                format!("'{name}' is not the spec's name ('{}')", request.spec.name),
            ));
        }
        if request.spec.hypervisor != Hypervisor::Vanguard {
            return Err(Failure::conflict(
                self.drivers.get(request.spec.hypervisor).no_transfers(),
            ));
        }
        self.create(request.spec)?;
        let op = match self.begin(&name, OperationKind::Incoming, |_| Ok(())) {
            Ok(op) => op,
            Err(e) => {
                self.remove_record(&name, "vm.deleted", None, "the incoming migration failed");
                return Err(e);
            }
        };
        let address = match free_port(ip) {
            Ok(port) => match ip {
                std::net::IpAddr::V4(v4) => format!("tcp:{v4}:{port}"),
                std::net::IpAddr::V6(v6) => format!("tcp:[{v6}]:{port}"),
            },
            Err(e) => {
                return Err(self.incoming_failed(
                    &name,
                    op.id,
                    format!("no free port on {ip}: {e}"),
                ))
            }
        };
        self.progress(op.id, &format!("starting a VMM to receive the VM on {address}"));
        let generation = match self.launch(&name, &Launch::Incoming(address.clone())) {
            Ok(generation) => generation,
            Err(e) => return Err(self.incoming_failed(&name, op.id, e)),
        };
        let start = Instant::now();
        while !driver::listening(&address) {
            let gone = !self.is_running(&name);
            if gone || start.elapsed() > LISTEN_TIMEOUT {
                let why = self.get(&name).ok().and_then(|vm| vm.status.last_exit).map_or_else(
                    || format!("it did not listen on {address} in time"),
                    |e| e.reason,
                );
                if let Some(pid) = self.get(&name).ok().and_then(|vm| vm.status.pid) {
                    let _ = driver::signal(pid, libc::SIGKILL);
                }
                return Err(self.incoming_failed(
                    &name,
                    op.id,
                    format!("the VMM to receive the VM: {why}"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.progress(op.id, &format!("waiting for the source on {address}"));
        let accepted =
            IncomingAccepted { vm: self.get(&name)?, address, operation: self.operation(op.id)? };
        let manager = self.clone();
        tokio::spawn(async move {
            let result = manager.wait_running(&name, generation, INCOMING_TIMEOUT).await;
            if let Err(e) = &result {
                manager.remove_record(
                    &name,
                    "vm.deleted",
                    Some(op.id),
                    &format!("the incoming migration failed: {e}"),
                );
            }
            manager.finish(op.id, result.map(|_| "arrived; running".into()));
        });
        Ok(accepted)
    }

    /// Gives up an incoming VM before its VMM listened: removed, its operation failed; the
    /// 500 to answer.
    fn incoming_failed(&self, name: &str, op: u64, why: String) -> Failure {
        let message = format!("the incoming migration failed: {why}");
        self.remove_record(name, "vm.deleted", Some(op), &message);
        self.finish(op, Err(why.clone()));
        Failure::internal(why)
    }

    /// `DELETE /v1/migrations/incoming/{name}`: the source gave up; the incoming VM's VMM is
    /// killed and the VM removed (answered once it is).
    pub async fn cancel_incoming(&self, name: &str) -> Result<(), Failure> {
        let pid = {
            let vms = lock(&self.vms);
            let entry = vms.get(name).ok_or_else(|| Failure::not_found(name))?;
            let state = entry.record.vm.status.state;
            if state != VmState::Incoming {
                return Err(Failure::conflict(format!(
                    "'{name}' is {} (not incoming)",
                    state_name(state)
                )));
            }
            entry.record.vm.status.pid
        };
        if let Some(pid) = pid {
            let _ = driver::signal(pid, libc::SIGKILL);
        }
        let gone = || (!lock(&self.vms).contains_key(name)).then_some(());
        self.wait_until(Duration::from_secs(10), gone).await;
        Ok(())
    }

    /// An incoming VM found after a daemon restart: `running` once its VMM says the VM runs,
    /// removed if the process ends first (or after the incoming time limit).
    pub(super) async fn settle_incoming(self: &Arc<Self>, name: &str) {
        let Ok(vm) = self.get(name) else { return };
        let Some(pid) = vm.status.pid else { return };
        let start = lock(&self.vms).get(name).and_then(|e| e.record.proc_start);
        let driver = self.drivers.get(vm.spec.hypervisor);
        let deadline = Instant::now() + INCOMING_TIMEOUT;
        loop {
            if !driver::same_process(pid, start) {
                self.remove_record(
                    name,
                    "vm.deleted",
                    None,
                    "the incoming migration did not complete",
                );
                return;
            }
            if let Ok(info) = driver.vmm_info(&self.files(name)).await {
                if matches!(info.state, VmmState::Running | VmmState::Paused) {
                    let paused = info.state == VmmState::Paused;
                    self.update(name, |entry| {
                        entry.record.vm.status.state =
                            if paused { VmState::Paused } else { VmState::Running };
                    });
                    self.emit("vm.running", Some(name), None, &format!("VMM process {pid}"));
                    let manager = self.clone();
                    let name = name.to_string();
                    tokio::spawn(async move {
                        let _ = driver::wait_foreign(pid).await;
                        manager.process_ended(&name, 1, None);
                    });
                    return;
                }
            }
            if Instant::now() > deadline {
                let _ = driver::signal(pid, libc::SIGKILL);
            }
            tokio::time::sleep(PROGRESS_INTERVAL).await;
        }
    }
}

/// A TCP port free on `ip` now (the VMM binds it right after).
fn free_port(ip: std::net::IpAddr) -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind((ip, 0))?.local_addr()?.port())
}

/// Waits until the destination VMM `child` listens on `address`; why not if it ends first or
/// takes longer than 10 s.
async fn wait_listening(address: &str, child: &mut tokio::process::Child) -> Result<(), String> {
    let start = Instant::now();
    while !driver::listening(address) {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "the destination VMM ended before listening on {address}: {}",
                driver::describe_exit(&status).2
            ));
        }
        if start.elapsed() > LISTEN_TIMEOUT {
            return Err(format!("the destination VMM did not listen on {address} within 10 s"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}
