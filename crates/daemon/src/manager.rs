//! The VMs the daemon manages: their records (in memory and in the store), their processes,
//! the operations acting on them, and the events they produce.
//!
//! Invariants:
//! - A record is written to the store before the API answers for the change it makes.
//! - At most one operation acts on a VM at a time (`busy`); another state-changing request
//!   gets 409 naming the operation under way.
//! - Each process launch has a generation number; the task waiting on a process only updates
//!   the record if the generation is still current, so a late exit cannot touch a newer run.
//! - The std mutex guarding the map is never held across an `.await`.

use crate::driver::{self, VmFiles};
use crate::store::{Store, StoreError, VmRecord};
use api::{
    ApiError, Event, ExitInfo, Operation, OperationKind, OperationState, RestartPolicy, Vm, VmSpec,
    VmState, VmStatus,
};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::sync::{broadcast, Notify};

mod transfer;
pub use transfer::check_snapshot_name;

/// How long a graceful stop waits for the guest before the VMM is killed, by default.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a start waits for the VMM to report its vCPUs running.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Delay before the restart policy starts a VM again.
const RESTART_DELAY: Duration = Duration::from_secs(1);

/// An error the API turns into a status and a JSON body.
#[derive(Debug)]
pub struct Failure {
    /// The HTTP status.
    pub status: u16,
    /// The body.
    pub error: ApiError,
}

impl Failure {
    fn new(status: u16, message: impl Into<String>) -> Failure {
        Failure { status, error: ApiError { error: message.into(), field: None } }
    }
    /// 400 about a spec field.
    pub fn spec(e: api::SpecError) -> Failure {
        Failure { status: 400, error: ApiError { error: e.reason, field: Some(e.field) } }
    }
    /// 400 about a field of a request body.
    pub fn field(field: &str, message: impl Into<String>) -> Failure {
        Failure {
            status: 400,
            error: ApiError { error: message.into(), field: Some(field.into()) },
        }
    }
    /// 404.
    pub fn missing(message: impl Into<String>) -> Failure {
        Failure::new(404, message)
    }
    /// 500.
    pub fn internal(message: impl Into<String>) -> Failure {
        Failure::new(500, message)
    }
    /// 400.
    pub fn bad_request(message: impl Into<String>) -> Failure {
        Failure::new(400, message)
    }
    /// 401.
    pub fn unauthorized(message: impl Into<String>) -> Failure {
        Failure::new(401, message)
    }
    fn not_found(name: &str) -> Failure {
        Failure::new(404, format!("no VM named '{name}'"))
    }
    pub fn conflict(message: impl Into<String>) -> Failure {
        Failure::new(409, message)
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Failure {
        Failure::new(500, e.to_string())
    }
}

struct Entry {
    record: VmRecord,
    /// The operation acting on the VM, if any.
    busy: Option<u64>,
    /// Increases with every process launched.
    generation: u64,
    /// The daemon asked the current process to end (a stop), so its end is not a failure.
    stop_requested: bool,
    /// The generation of a process migrating away (a migration's source): its end is the
    /// migration's to interpret, not a stop or a failure.
    handover: Option<u64>,
    /// How that process ended, once it has (its exit status, if known).
    handed_over: Option<Option<std::process::ExitStatus>>,
}

impl Entry {
    /// Makes process `pid` (started at `proc_start`, serving its API on `api_socket`, None
    /// for the default) the VM's, as a new generation; that generation.
    fn take_process(
        &mut self,
        pid: u32,
        proc_start: Option<u64>,
        api_socket: Option<PathBuf>,
    ) -> u64 {
        self.generation += 1;
        self.stop_requested = false;
        self.handover = None;
        self.handed_over = None;
        self.record.proc_start = proc_start;
        self.record.api_socket = api_socket;
        let status = &mut self.record.vm.status;
        status.pid = Some(pid);
        status.started_at = Some(api::now_secs());
        self.generation
    }

    fn new(record: VmRecord, generation: u64) -> Entry {
        Entry {
            record,
            busy: None,
            generation,
            stop_requested: false,
            handover: None,
            handed_over: None,
        }
    }
}

/// What a VMM process is started for.
pub(crate) enum Launch {
    /// Booting the spec.
    Boot,
    /// Running on from this snapshot directory.
    Restore(PathBuf),
    /// Receiving the VM by live migration on this address (`tcp:IP:PORT`).
    Incoming(String),
}

/// The manager, shared by the API handlers and the tasks it starts.
pub struct Manager {
    store: Store,
    cgroups: crate::cgroup::Cgroups,
    drivers: crate::hypervisor::Drivers,
    data_dir: PathBuf,
    vms: Mutex<BTreeMap<String, Entry>>,
    operations: Mutex<BTreeMap<u64, Operation>>,
    /// The tokens, by name (a copy of the store's table).
    tokens: Mutex<BTreeMap<String, crate::store::TokenRecord>>,
    /// Woken whenever an operation or a VM's process changes.
    changed: Notify,
    events: broadcast::Sender<Event>,
    event_seq: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Manager {
    /// Loads the state from `store` and finds the VMM processes that kept running while the
    /// daemon was down; `exe` is the `vanguard` binary the VMs run.
    pub fn new(store: Store, exe: PathBuf, data_dir: PathBuf) -> Result<Arc<Manager>, Failure> {
        let (events, _) = broadcast::channel(1024);
        let manager = Arc::new(Manager {
            store,
            cgroups: crate::cgroup::Cgroups::detect(std::path::Path::new("/sys/fs/cgroup")),
            drivers: crate::hypervisor::Drivers::new(exe),
            data_dir,
            vms: Mutex::new(BTreeMap::new()),
            operations: Mutex::new(BTreeMap::new()),
            tokens: Mutex::new(BTreeMap::new()),
            changed: Notify::new(),
            events,
            event_seq: AtomicU64::new(0),
        });
        let mut interrupted = Vec::new();
        for mut op in manager.store.operations()? {
            if op.state == OperationState::Running {
                // The daemon died under it: it will not finish.
                op.state = OperationState::Failed;
                op.error = Some("the daemon was restarted while the operation ran".into());
                op.finished_at = Some(api::now_secs());
                interrupted.push(op.clone());
            }
            lock(&manager.operations).insert(op.id, op);
        }
        for op in interrupted {
            manager.store.put_operation(&op)?;
        }
        for token in manager.store.tokens()? {
            lock(&manager.tokens).insert(token.info.name.clone(), token);
        }
        for record in manager.store.vms()? {
            manager.adopt(record)?;
        }
        manager.emit("daemon.started", None, None, "the daemon started");
        Ok(manager)
    }

    /// Takes a stored record over at startup: a process that still runs is watched again; one
    /// that vanished marks the VM failed.
    fn adopt(self: &Arc<Self>, mut record: VmRecord) -> Result<(), Failure> {
        let name = record.vm.spec.name.clone();
        let status = &mut record.vm.status;
        let had_process = matches!(
            status.state,
            VmState::Running
                | VmState::Starting
                | VmState::Stopping
                | VmState::Paused
                | VmState::Incoming
        );
        let mut watch = None;
        if had_process {
            let console = VmFiles::new(&self.data_dir, &name).console();
            let found = match status.pid {
                Some(pid) if driver::same_process(pid, record.proc_start) => {
                    Some((pid, record.proc_start))
                }
                // Killed between starting the process and storing its pid, or the pid
                // stored belongs to someone else now: look for the VM's own process.
                _ => driver::find_by_console(&console),
            };
            match found {
                Some((pid, start)) => {
                    // Only the daemon pauses and resumes: a paused VM is still paused.
                    if !matches!(status.state, VmState::Paused | VmState::Incoming) {
                        status.state = VmState::Running;
                    }
                    // A same-host migration may have moved it to another socket, or ended
                    // while the daemon was down: the process's own command line says.
                    let default = VmFiles::new(&self.data_dir, &name).api_socket();
                    record.api_socket =
                        driver::arg_of(pid, "--api-socket").filter(|path| *path != default);
                    status.pid = Some(pid);
                    status.started_at = status.started_at.or(Some(api::now_secs()));
                    record.proc_start = start;
                    watch = Some(pid);
                }
                None if status.state == VmState::Incoming => {
                    // It never arrived: nothing of it is left here.
                    self.store.delete_vm(&name)?;
                    let _ = std::fs::remove_dir_all(VmFiles::new(&self.data_dir, &name).dir);
                    self.cgroups.remove(&name);
                    return Ok(());
                }
                None => {
                    let reason = if status.state == VmState::Starting {
                        "the daemon was restarted while the VM was starting"
                    } else {
                        "its VMM process ended while the daemon was not running"
                    };
                    status.state = VmState::Failed;
                    status.pid = None;
                    status.last_exit = Some(ExitInfo {
                        code: None,
                        signal: None,
                        reason: reason.into(),
                        at: api::now_secs(),
                    });
                    record.proc_start = None;
                }
            }
            self.store.put_vm(&record)?;
        }
        let incoming = record.vm.status.state == VmState::Incoming;
        lock(&self.vms).insert(name.clone(), Entry::new(record, 1));
        if incoming {
            // Its migration's operation ended with the old daemon: the VM either arrives (the
            // VMM says it runs) or its process ends (the VM is removed).
            let manager = self.clone();
            let name = name.clone();
            tokio::spawn(async move { manager.settle_incoming(&name).await });
        } else if let Some(pid) = watch {
            let manager = self.clone();
            tokio::spawn(async move {
                let mut pid = pid;
                loop {
                    let _ = driver::wait_foreign(pid).await;
                    // A same-host migration that went on while the daemon was down: when its
                    // source ends, the destination (same console) runs the VM.
                    match manager.take_over(&name, pid) {
                        Some(next) => pid = next,
                        None => break,
                    }
                }
                manager.process_ended(&name, 1, None);
            });
        }
        Ok(())
    }

    /// Process `ended` of a VM found again after a restart has ended: if another live process
    /// writes the VM's console (the destination of a same-host migration), it becomes the
    /// VM's; its pid.
    fn take_over(&self, name: &str, ended: u32) -> Option<u32> {
        let files = VmFiles::new(&self.data_dir, name);
        let (pid, start) = driver::find_by_console(&files.console()).filter(|f| f.0 != ended)?;
        let default = files.api_socket();
        let mut taken = false;
        self.update(name, |entry| {
            if entry.generation == 1 && entry.record.vm.status.pid == Some(ended) {
                let api = driver::arg_of(pid, "--api-socket").filter(|path| *path != default);
                entry.take_process(pid, start, api);
                // Still the generation its watcher knows.
                entry.generation = 1;
                taken = true;
            }
        });
        taken.then_some(pid)
    }

    /// The files of VM `name`, with its current process's API socket.
    pub(crate) fn files(&self, name: &str) -> VmFiles {
        let api = lock(&self.vms).get(name).and_then(|e| e.record.api_socket.clone());
        VmFiles::new(&self.data_dir, name).with_api_socket(api)
    }

    /// Sends an event to every listener of the stream.
    pub(crate) fn emit(&self, kind: &str, vm: Option<&str>, operation: Option<u64>, message: &str) {
        let seq = self.event_seq.fetch_add(1, Ordering::Relaxed) + 1;
        let _ = self.events.send(Event {
            seq,
            time_ms: api::now_ms(),
            kind: kind.into(),
            vm: vm.map(str::to_string),
            operation,
            message: message.into(),
        });
    }

    /// A receiver of the events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Every VM, by name.
    pub fn list(&self) -> Vec<Vm> {
        lock(&self.vms).values().map(|e| e.record.vm.clone()).collect()
    }

    /// Makes a token; its secret is returned this once.
    pub fn create_token(&self, name: &str) -> Result<api::CreatedToken, Failure> {
        api::spec::check_name(name)
            .map_err(|e| Failure::bad_request(format!("token name: {}", e.reason)))?;
        let mut tokens = lock(&self.tokens);
        if tokens.contains_key(name) {
            return Err(Failure::conflict(format!("a token named '{name}' exists")));
        }
        let secret = crate::auth::new_secret()
            .map_err(|e| Failure::new(500, format!("cannot make a token: {e}")))?;
        let record = crate::store::TokenRecord {
            info: api::TokenInfo { name: name.into(), created_at: api::now_secs() },
            digest: crate::auth::digest(&secret),
        };
        self.store.put_token(&record)?;
        tokens.insert(name.into(), record.clone());
        Ok(api::CreatedToken {
            name: name.into(),
            token: secret,
            created_at: record.info.created_at,
        })
    }

    /// The tokens' public parts.
    pub fn tokens(&self) -> Vec<api::TokenInfo> {
        lock(&self.tokens).values().map(|t| t.info.clone()).collect()
    }

    /// Revokes a token: it stops working at once.
    pub fn revoke_token(&self, name: &str) -> Result<(), Failure> {
        let mut tokens = lock(&self.tokens);
        if !tokens.contains_key(name) {
            return Err(Failure::new(404, format!("no token named '{name}'")));
        }
        self.store.delete_token(name)?;
        tokens.remove(name);
        Ok(())
    }

    /// The digests of the valid tokens.
    pub fn token_digests(&self) -> Vec<String> {
        lock(&self.tokens).values().map(|t| t.digest.clone()).collect()
    }

    /// How VM limits are enforced on this host.
    pub fn cgroups(&self) -> String {
        self.cgroups.describe()
    }

    /// One VM.
    pub fn get(&self, name: &str) -> Result<Vm, Failure> {
        lock(&self.vms)
            .get(name)
            .map(|e| e.record.vm.clone())
            .ok_or_else(|| Failure::not_found(name))
    }

    /// Defines a VM.
    pub fn create(&self, spec: VmSpec) -> Result<Vm, Failure> {
        api::validate(&spec).map_err(Failure::spec)?;
        driver::check_files(&spec).map_err(Failure::spec)?;
        let mut vms = lock(&self.vms);
        if vms.contains_key(&spec.name) {
            return Err(Failure::conflict(format!("a VM named '{}' exists", spec.name)));
        }
        let vm = Vm { spec, status: VmStatus::default(), created_at: api::now_secs() };
        let record = VmRecord { vm: vm.clone(), proc_start: None, api_socket: None };
        self.store.put_vm(&record)?;
        let name = vm.spec.name.clone();
        vms.insert(name.clone(), Entry::new(record, 0));
        drop(vms);
        self.emit("vm.created", Some(&name), None, "defined");
        Ok(vm)
    }

    /// Removes a stopped VM and its files.
    pub fn delete(&self, name: &str) -> Result<(), Failure> {
        let mut vms = lock(&self.vms);
        let entry = vms.get(name).ok_or_else(|| Failure::not_found(name))?;
        if let Some(op) = entry.busy {
            return Err(Failure::conflict(format!("operation {op} is under way on '{name}'")));
        }
        if entry.record.vm.status.pid.is_some() {
            return Err(Failure::conflict(format!("'{name}' is running: stop it first")));
        }
        self.store.delete_vm(name)?;
        vms.remove(name);
        drop(vms);
        let _ = std::fs::remove_dir_all(VmFiles::new(&self.data_dir, name).dir);
        self.cgroups.remove(name);
        self.emit("vm.deleted", Some(name), None, "deleted");
        Ok(())
    }

    /// One operation.
    pub fn operation(&self, id: u64) -> Result<Operation, Failure> {
        lock(&self.operations)
            .get(&id)
            .cloned()
            .ok_or_else(|| Failure::new(404, format!("no operation {id}")))
    }

    /// Every operation, oldest first.
    pub fn operations(&self) -> Vec<Operation> {
        lock(&self.operations).values().cloned().collect()
    }

    /// Waits until operation `id` is done or `timeout` passes; returns it either way.
    pub async fn wait_operation(&self, id: u64, timeout: Duration) -> Result<Operation, Failure> {
        let finished = self
            .wait_until(timeout, || match self.operation(id) {
                Ok(op) if op.state == OperationState::Running => None,
                other => Some(other),
            })
            .await;
        finished.unwrap_or_else(|| self.operation(id))
    }

    /// Evaluates `check` now and after every change (`changed`) until it gives a value, or
    /// `timeout` passes (None).
    async fn wait_until<T>(
        &self,
        timeout: Duration,
        mut check: impl FnMut() -> Option<T>,
    ) -> Option<T> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Made before the check: a change between the check and the wait still wakes it.
            let notified = self.changed.notified();
            if let Some(value) = check() {
                return Some(value);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }

    /// Creates operation `kind` on `name`, marking the VM busy; `check` says whether the VM's
    /// state allows it.
    fn begin(
        &self,
        name: &str,
        kind: OperationKind,
        check: impl FnOnce(&Entry) -> Result<(), Failure>,
    ) -> Result<Operation, Failure> {
        let mut vms = lock(&self.vms);
        let entry = vms.get_mut(name).ok_or_else(|| Failure::not_found(name))?;
        if let Some(op) = entry.busy {
            return Err(Failure::conflict(format!("operation {op} is under way on '{name}'")));
        }
        check(entry)?;
        let op = Operation {
            id: self.store.next_operation_id()?,
            kind,
            vm: name.into(),
            state: OperationState::Running,
            progress: "queued".into(),
            error: None,
            created_at: api::now_secs(),
            finished_at: None,
            migration: None,
        };
        self.store.put_operation(&op)?;
        entry.busy = Some(op.id);
        drop(vms);
        lock(&self.operations).insert(op.id, op.clone());
        Ok(op)
    }

    fn progress(&self, id: u64, text: &str) {
        self.progress_with(id, text, None);
    }

    /// Sets operation `id`'s progress, and its migration figures if `migration` is given.
    pub(crate) fn progress_with(
        &self,
        id: u64,
        text: &str,
        migration: Option<api::vmm::MigrationInfo>,
    ) {
        if let Some(op) = lock(&self.operations).get_mut(&id) {
            op.progress = text.into();
            if migration.is_some() {
                op.migration = migration;
            }
        }
        self.changed.notify_waiters();
    }

    /// Ends operation `id` with `result`, freeing its VM.
    fn finish(&self, id: u64, result: Result<String, String>) {
        // The VM is free before anyone can see the operation done.
        let vm = lock(&self.operations).get(&id).map(|op| op.vm.clone());
        if let Some(vm) = vm {
            if let Some(entry) = lock(&self.vms).get_mut(&vm) {
                if entry.busy == Some(id) {
                    entry.busy = None;
                }
            }
        }
        let mut ops = lock(&self.operations);
        let Some(op) = ops.get_mut(&id) else { return };
        match &result {
            Ok(done) => {
                op.state = OperationState::Succeeded;
                op.progress = done.clone();
            }
            Err(e) => {
                op.state = OperationState::Failed;
                op.error = Some(e.clone());
            }
        }
        op.finished_at = Some(api::now_secs());
        let op = op.clone();
        drop(ops);
        if let Err(e) = self.store.put_operation(&op) {
            tracing::error!("{e}");
        }
        let (kind, message) = match &result {
            Ok(done) => ("operation.succeeded", format!("{:?} {}: {done}", op.kind, op.vm)),
            Err(e) => ("operation.failed", format!("{:?} {}: {e}", op.kind, op.vm)),
        };
        self.emit(kind, Some(&op.vm), Some(id), &message.to_lowercase());
        self.changed.notify_waiters();
    }

    /// Updates a VM's record (in memory and in the store) through `change`.
    fn update(&self, name: &str, change: impl FnOnce(&mut Entry)) {
        self.update_quietly(name, change);
        self.changed.notify_waiters();
    }

    /// [`Manager::update`] without waking the waiters (the caller does, after its event).
    fn update_quietly(&self, name: &str, change: impl FnOnce(&mut Entry)) {
        let mut vms = lock(&self.vms);
        let Some(entry) = vms.get_mut(name) else { return };
        change(entry);
        if let Err(e) = self.store.put_vm(&entry.record) {
            tracing::error!("{e}");
        }
    }

    /// Starts a stopped (or failed) VM: 202 with the operation.
    pub fn start(self: &Arc<Self>, name: &str) -> Result<Operation, Failure> {
        let op =
            self.begin(name, OperationKind::Start, |entry| match entry.record.vm.status.pid {
                Some(_) => Err(Failure::conflict(format!("'{name}' is already running"))),
                None => Ok(()),
            })?;
        let manager = self.clone();
        let (name, id) = (name.to_string(), op.id);
        tokio::spawn(async move {
            let result = manager.run_start(&name, id).await;
            manager.finish(id, result);
        });
        Ok(op)
    }

    /// Launches the VM's process and watches it; the operation's result.
    async fn run_start(self: &Arc<Self>, name: &str, op: u64) -> Result<String, String> {
        self.progress(op, "starting the VMM process");
        let generation = self.launch(name, &Launch::Boot)?;
        self.progress(op, "waiting for the VM's vCPUs to run");
        self.wait_running(name, generation, START_TIMEOUT).await
    }

    /// Waits until the VM's process of `generation` reports its vCPUs running (the result),
    /// or ends first (why); kills it after `timeout`.
    pub(crate) async fn wait_running(
        &self,
        name: &str,
        generation: u64,
        timeout: Duration,
    ) -> Result<String, String> {
        // The VMM says when every vCPU runs (its ready pipe); a VMM that fails first ends.
        let outcome = self
            .wait_until(timeout, || {
                let vms = lock(&self.vms);
                let Some(entry) = vms.get(name) else {
                    return Some(Err(format!("'{name}' was deleted")));
                };
                let status = &entry.record.vm.status;
                match (status.state, entry.generation == generation) {
                    (VmState::Running, true) => Some(Ok("running".into())),
                    (VmState::Stopped, true) => {
                        Some(Ok("started; the guest has already powered off".into()))
                    }
                    (VmState::Starting | VmState::Incoming, true) => None,
                    _ => Some(Err(status
                        .last_exit
                        .as_ref()
                        .map(|exit| exit.reason.clone())
                        .unwrap_or_else(|| "the VM did not start".into()))),
                }
            })
            .await;
        if let Some(outcome) = outcome {
            return outcome;
        }
        if let Some(pid) = self.get(name).ok().and_then(|vm| vm.status.pid) {
            let _ = driver::signal(pid, libc::SIGKILL);
        }
        Err(format!(
            "the VMM did not report its vCPUs running within {}s; killed",
            timeout.as_secs()
        ))
    }

    /// Records that a start failed before any process ran: `failed`, with the reason.
    fn mark_start_failed(&self, name: &str, reason: &str) {
        self.update(name, |entry| {
            entry.record.vm.status.state = VmState::Failed;
            entry.record.vm.status.last_exit = Some(ExitInfo {
                code: None,
                signal: None,
                reason: reason.to_string(),
                at: api::now_secs(),
            });
        });
    }

    /// Starts the VMM process for `name` (booting its spec, restoring a snapshot, or waiting
    /// for an incoming migration, as `how` says); returns its generation.
    pub(crate) fn launch(self: &Arc<Self>, name: &str, how: &Launch) -> Result<u64, String> {
        let spec = self.get(name).map_err(|e| e.error.error)?.spec;
        // A fresh process serves its API on the default socket.
        let files = VmFiles::new(&self.data_dir, name);
        // A fresh console for each run.
        let _ = std::fs::create_dir_all(&files.dir);
        let _ = std::fs::remove_file(files.console());
        let driver = self.drivers.get(spec.hypervisor);
        let invocation = match how {
            Launch::Boot => driver::check_files(&spec)
                .map_err(|e| e.to_string())
                .and_then(|()| driver.invocation(&spec, &files)),
            Launch::Restore(dir) => driver.restore_invocation(dir, &files),
            Launch::Incoming(from) => driver.incoming_invocation(from, &files, &files.api_socket()),
        };
        let invocation = match invocation {
            Ok(invocation) => invocation,
            Err(reason) => {
                self.mark_start_failed(name, &reason);
                return Err(reason);
            }
        };
        // Stored before the process exists: a daemon killed in between finds the process by
        // its console path when it comes back.
        let (state, event) = match how {
            Launch::Incoming(_) => (VmState::Incoming, "vm.incoming"),
            _ => (VmState::Starting, "vm.starting"),
        };
        self.update(name, |entry| entry.record.vm.status.state = state);
        self.emit(event, Some(name), None, state_name(state));
        let launched = match self.spawn_vmm(name, &spec.limits, &invocation, &files) {
            Ok(launched) => launched,
            Err(reason) => {
                self.mark_start_failed(name, &reason);
                self.emit("vm.failed", Some(name), None, &reason);
                return Err(reason);
            }
        };
        let mut generation = 0;
        self.update(name, |entry| {
            generation = entry.take_process(launched.pid, launched.proc_start, None);
        });
        self.watch(name, generation, launched.child, launched.ready);
        Ok(generation)
    }

    /// Makes VM `name`'s cgroup (with `limits`) and starts `invocation` in it.
    pub(crate) fn spawn_vmm(
        &self,
        name: &str,
        limits: &api::Limits,
        invocation: &driver::Invocation,
        files: &VmFiles,
    ) -> Result<driver::Launched, String> {
        self.cgroups
            .prepare(name, limits)
            .map_err(|e| format!("cannot set up the VM's cgroup: {e}"))
            .and_then(|procs| {
                driver::launch(invocation, files, procs)
                    .map_err(|e| format!("cannot start {}: {e}", invocation.program.display()))
            })
    }

    /// Watches the VM's current process (generation `generation`): its end, and its report
    /// that the VM runs (a starting or incoming VM is then `running`).
    pub(crate) fn watch(
        self: &Arc<Self>,
        name: &str,
        generation: u64,
        mut child: tokio::process::Child,
        mut ready: driver::Ready,
    ) {
        let pid = child.id().unwrap_or(0);
        let manager = self.clone();
        let owned = name.to_string();
        tokio::spawn(async move {
            let status = child.wait().await.ok();
            manager.process_ended(&owned, generation, status);
        });
        let manager = self.clone();
        let owned = name.to_string();
        tokio::spawn(async move {
            if !driver::wait_ready(&mut ready).await {
                return; // it ended first: process_ended says how
            }
            let mut now_running = false;
            manager.update_quietly(&owned, |entry| {
                let status = &mut entry.record.vm.status;
                if entry.generation == generation
                    && matches!(status.state, VmState::Starting | VmState::Incoming)
                {
                    status.state = VmState::Running;
                    now_running = true;
                }
            });
            if now_running {
                manager.emit("vm.running", Some(&owned), None, &format!("VMM process {pid}"));
            }
            // The start waiting on this wakes after the event.
            manager.changed.notify_waiters();
        });
    }

    /// A VM's process ended (`status` unknown for one found again after a restart).
    fn process_ended(
        self: &Arc<Self>,
        name: &str,
        generation: u64,
        status: Option<std::process::ExitStatus>,
    ) {
        let (code, signal, mut reason, mut failed) = match &status {
            Some(status) => driver::describe_exit(status),
            None => (None, None, "the VMM process ended (its exit status is unknown: the daemon was restarted while it ran)".into(), false),
        };
        let mut restart = false;
        let mut stale = true;
        let mut handed_over = false;
        let files = VmFiles::new(&self.data_dir, name);
        // Waiters (a stop) wake after the event, so the stream shows the VM stopped before
        // the operation that stopped it succeeds.
        self.update_quietly(name, |entry| {
            if entry.generation != generation {
                return;
            }
            if entry.handover == Some(generation) {
                // A migration's source: the migration says what its end means.
                entry.handed_over = Some(status);
                handed_over = true;
                return;
            }
            stale = false;
            // A VM that never arrived is not started again (the incoming operation removes it).
            let incoming = entry.record.vm.status.state == VmState::Incoming;
            if incoming {
                failed = true;
                reason = format!("the incoming migration ended: {reason}");
            }
            if entry.stop_requested {
                failed = false;
                reason = format!("stopped ({reason})");
            }
            if failed {
                let detail = driver::tail(&files.vmm_log(), 3);
                if !detail.is_empty() {
                    reason = format!("{reason}: {detail}");
                }
            }
            let status = &mut entry.record.vm.status;
            status.pid = None;
            status.state = if failed { VmState::Failed } else { VmState::Stopped };
            status.last_exit =
                Some(ExitInfo { code, signal, reason: reason.clone(), at: api::now_secs() });
            entry.record.proc_start = None;
            restart = !entry.stop_requested
                && !incoming
                && match entry.record.vm.spec.restart {
                    RestartPolicy::Never => false,
                    RestartPolicy::OnFailure => failed,
                    RestartPolicy::Always => true,
                };
            entry.stop_requested = false;
        });
        if handed_over {
            self.changed.notify_waiters();
        }
        if stale {
            return;
        }
        // Empty now; a later start makes it again with the spec's limits then.
        self.cgroups.remove(name);
        self.emit(if failed { "vm.failed" } else { "vm.stopped" }, Some(name), None, &reason);
        self.changed.notify_waiters();
        if restart {
            let manager = self.clone();
            let name = name.to_string();
            tokio::spawn(async move {
                tokio::time::sleep(RESTART_DELAY).await;
                manager.restart_by_policy(&name);
            });
        }
    }

    /// Starts a VM again under its restart policy (unless someone else acted on it meanwhile).
    fn restart_by_policy(self: &Arc<Self>, name: &str) {
        let go = {
            let vms = lock(&self.vms);
            vms.get(name).is_some_and(|e| e.busy.is_none() && e.record.vm.status.pid.is_none())
        };
        if !go {
            return;
        }
        self.update(name, |entry| entry.record.vm.status.restarts += 1);
        self.emit("vm.restarting", Some(name), None, "restart policy");
        if let Err(e) = self.launch(name, &Launch::Boot) {
            tracing::warn!("restarting {name}: {e}");
        }
    }

    /// Stops a running VM: the power button (the guest shuts down), then after `timeout` a
    /// kill; or a kill at once (`force`).
    pub fn stop(
        self: &Arc<Self>,
        name: &str,
        force: bool,
        timeout: Duration,
    ) -> Result<Operation, Failure> {
        let op =
            self.begin(name, OperationKind::Stop, |entry| match entry.record.vm.status.pid {
                None => Err(Failure::conflict(format!("'{name}' is not running"))),
                Some(_) => Ok(()),
            })?;
        let manager = self.clone();
        let (name, id) = (name.to_string(), op.id);
        tokio::spawn(async move {
            let result = manager.run_stop(&name, id, force, timeout).await;
            manager.finish(id, result);
        });
        Ok(op)
    }

    async fn run_stop(
        &self,
        name: &str,
        op: u64,
        force: bool,
        timeout: Duration,
    ) -> Result<String, String> {
        let mut pid = None;
        let mut was_paused = false;
        self.update(name, |entry| {
            entry.stop_requested = true;
            pid = entry.record.vm.status.pid;
            was_paused = entry.record.vm.status.state == VmState::Paused;
            if pid.is_some() {
                entry.record.vm.status.state = VmState::Stopping;
            }
        });
        let Some(pid) = pid else { return Ok("it had already stopped".into()) };
        self.emit(
            "vm.stopping",
            Some(name),
            Some(op),
            if force { "killing" } else { "power button" },
        );
        if !force && was_paused {
            // A paused guest cannot see the power button.
            self.progress(op, "resuming the paused VM so that the guest can shut down");
            let hypervisor = self.get(name).map_err(|e| e.error.error)?.spec.hypervisor;
            let files = self.files(name);
            if let Err(e) = self.drivers.get(hypervisor).set_paused(&files, false).await {
                self.progress(op, &format!("cannot resume ({e}); waiting anyway"));
            }
        }
        if !force {
            self.progress(
                op,
                &format!(
                    "power button pressed; waiting up to {}s for the guest",
                    timeout.as_secs()
                ),
            );
            let hypervisor = self.get(name).map_err(|e| e.error.error)?.spec.hypervisor;
            let files = self.files(name);
            if let Err(e) = self.drivers.get(hypervisor).power_button(&files, pid).await {
                self.progress(op, &format!("the power button failed ({e}); waiting anyway"));
            }
            if self.wait_stopped(name, timeout).await {
                return Ok("the guest shut down".into());
            }
            self.progress(op, "the guest did not shut down in time; killing the VMM");
        }
        let _ = driver::signal(pid, libc::SIGKILL);
        if self.wait_stopped(name, Duration::from_secs(10)).await {
            Ok(if force { "killed".into() } else { "killed after the timeout".into() })
        } else {
            Err(format!("VMM process {pid} did not end after SIGKILL"))
        }
    }

    /// Pauses (`pause`) or resumes a VM: 202 with the operation. Pausing needs a running VM,
    /// resuming a paused one.
    pub fn set_paused(self: &Arc<Self>, name: &str, pause: bool) -> Result<Operation, Failure> {
        let (kind, wanted, verb) = if pause {
            (OperationKind::Pause, VmState::Running, "running")
        } else {
            (OperationKind::Resume, VmState::Paused, "paused")
        };
        let op = self.begin(name, kind, |entry| {
            let state = entry.record.vm.status.state;
            if state == wanted {
                Ok(())
            } else {
                Err(Failure::conflict(format!("'{name}' is {} (not {verb})", state_name(state))))
            }
        })?;
        let manager = self.clone();
        let (name, id) = (name.to_string(), op.id);
        tokio::spawn(async move {
            let result = manager.run_set_paused(&name, pause).await;
            manager.finish(id, result);
        });
        Ok(op)
    }

    async fn run_set_paused(&self, name: &str, pause: bool) -> Result<String, String> {
        let spec = self.get(name).map_err(|e| e.error.error)?.spec;
        let files = self.files(name);
        self.drivers.get(spec.hypervisor).set_paused(&files, pause).await?;
        let (from, to, kind, text) = if pause {
            (VmState::Running, VmState::Paused, "vm.paused", "paused")
        } else {
            (VmState::Paused, VmState::Running, "vm.resumed", "resumed")
        };
        let mut changed = false;
        self.update_quietly(name, |entry| {
            let status = &mut entry.record.vm.status;
            if status.state == from && status.pid.is_some() {
                status.state = to;
                changed = true;
            }
        });
        if !changed {
            return Err("the VM's process ended meanwhile".into());
        }
        self.emit(kind, Some(name), None, text);
        self.changed.notify_waiters();
        Ok(text.into())
    }

    /// Restarts a VM: stops it if it runs (as [`Manager::stop`]), then starts it.
    pub fn restart(
        self: &Arc<Self>,
        name: &str,
        force: bool,
        timeout: Duration,
    ) -> Result<Operation, Failure> {
        let op = self.begin(name, OperationKind::Restart, |_| Ok(()))?;
        let manager = self.clone();
        let (name, id) = (name.to_string(), op.id);
        tokio::spawn(async move {
            let running = manager.get(&name).is_ok_and(|vm| vm.status.pid.is_some());
            let stopped = if running {
                manager.run_stop(&name, id, force, timeout).await
            } else {
                Ok(String::new())
            };
            let result = match stopped {
                Ok(_) => manager.run_start(&name, id).await,
                Err(e) => Err(e),
            };
            manager.finish(id, result);
        });
        Ok(op)
    }

    /// Waits until the VM has no process; false after `timeout`.
    async fn wait_stopped(&self, name: &str, timeout: Duration) -> bool {
        self.wait_until(timeout, || (!self.is_running(name)).then_some(())).await.is_some()
    }

    /// The hypervisor drivers.
    pub fn drivers(&self) -> [&dyn crate::hypervisor::Driver; 2] {
        self.drivers.all()
    }

    /// Types `bytes` on a running VM's serial console.
    pub fn console_input(&self, name: &str, bytes: &[u8]) -> Result<(), Failure> {
        if self.get(name)?.status.pid.is_none() {
            return Err(Failure::conflict(format!("'{name}' is not running")));
        }
        driver::write_console(&VmFiles::new(&self.data_dir, name), bytes).map_err(|e| {
            if e.kind() == std::io::ErrorKind::WouldBlock {
                Failure::conflict("the guest is not reading its console (its input is full)")
            } else {
                Failure::new(500, format!("console input: {e}"))
            }
        })
    }

    /// Where a VM's console output is.
    pub fn console_path(&self, name: &str) -> Result<PathBuf, Failure> {
        self.get(name)?;
        Ok(VmFiles::new(&self.data_dir, name).console())
    }

    /// Whether a VM has a process now.
    pub fn is_running(&self, name: &str) -> bool {
        lock(&self.vms).get(name).is_some_and(|e| e.record.vm.status.pid.is_some())
    }

    /// The console output of a VM's current (or last) run.
    pub fn console(&self, name: &str) -> Result<Vec<u8>, Failure> {
        self.get(name)?;
        Ok(std::fs::read(VmFiles::new(&self.data_dir, name).console()).unwrap_or_default())
    }
}

/// A state's name in messages (as the API spells it).
pub(crate) fn state_name(state: VmState) -> &'static str {
    match state {
        VmState::Stopped => "stopped",
        VmState::Starting => "starting",
        VmState::Running => "running",
        VmState::Paused => "paused",
        VmState::Stopping => "stopping",
        VmState::Failed => "failed",
        VmState::Incoming => "incoming",
    }
}
