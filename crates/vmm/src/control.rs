//! Control of a running VM from outside its vCPU threads: pause and resume (every vCPU parked
//! outside KVM_RUN, or let go), the power button, and the figures the per-VM API reports
//! (state, uptime, time paused, vCPU exits by kind).
//!
//! A pause sets `pause_requested`, then kicks every vCPU thread out of KVM_RUN with the kick
//! signal until each has parked on the condition variable at the top of its run loop; it
//! answers only once all are parked, so a paused VM runs no guest instruction. Devices keep
//! running (a virtio worker may still complete a request the guest made before the pause).
//! Resume clears the flag and wakes them.

use crate::migration::{
    self, MigrateOptions, MigrationProgress, MigrationReport, MigrationStatus, Sender,
};
use crate::snapshot::{Machine, SnapshotFailure, SnapshotReport, VcpuState};
use devices::legacy::AcpiPm;
use std::io::{BufReader, BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// How long a pause waits for every vCPU to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the VM is, as the per-VM API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Being built; no vCPU runs yet.
    Starting,
    /// Its vCPUs run.
    Running,
    /// Its vCPUs are parked.
    Paused,
    /// The guest ended the VM or it failed; the process is ending.
    Stopping,
}

impl RunState {
    /// The state's name in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Starting => "starting",
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Stopping => "stopping",
        }
    }
}

/// Why a control request was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ControlError {
    /// The request does not fit the VM's state.
    #[error("the VM is {0}: {1}")]
    WrongState(&'static str, &'static str),
    /// Not every vCPU parked in time.
    #[error("{parked} of {vcpus} vCPUs stopped within {timeout:?}; the VM was resumed")]
    PauseTimedOut { parked: usize, vcpus: usize, timeout: Duration },
}

/// Exits of one vCPU, by kind.
#[derive(Debug, Default)]
pub struct VcpuCounters {
    /// Port I/O exits.
    pub io: AtomicU64,
    /// MMIO exits.
    pub mmio: AtomicU64,
    /// Every other exit (interrupt windows, signals, system events).
    pub other: AtomicU64,
}

/// A snapshot of the VM's figures.
#[derive(Debug, Clone)]
pub struct ControlInfo {
    /// Where the VM is.
    pub state: RunState,
    /// vCPUs and guest memory.
    pub vcpus: usize,
    pub memory_bytes: u64,
    /// Since the process started building the VM.
    pub uptime: Duration,
    /// Time spent paused, the current pause included.
    pub paused: Duration,
    /// Per vCPU: (io, mmio, other) exits.
    pub exits: Vec<(u64, u64, u64)>,
}

struct Inner {
    state: RunState,
    /// vCPUs parked now.
    parked: usize,
    threads: Vec<libc::pthread_t>,
    power: Option<Arc<Mutex<AcpiPm>>>,
    paused_total: Duration,
    paused_since: Option<Instant>,
    machine: Option<Arc<Machine>>,
    /// Per vCPU, a snapshot's request for its state and the answer.
    capture: Vec<Capture>,
}

enum Capture {
    Wanted,
    Done(Box<Result<VcpuState, SnapshotFailure>>),
}

/// The handle: shared by the VM's threads and whoever controls it (the per-VM API).
pub struct VmControl {
    inner: Mutex<Inner>,
    snapshotting: Mutex<()>,
    migration: MigrationStatus,
    parked_changed: Condvar,
    pause_requested: AtomicBool,
    stop: Arc<AtomicBool>,
    started: Instant,
    vcpus: usize,
    memory_bytes: u64,
    counters: Vec<Arc<VcpuCounters>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl VmControl {
    /// A handle for a VM of `vcpus` vCPUs and `memory_bytes` of memory, not yet running.
    pub fn new(vcpus: usize, memory_bytes: u64) -> Arc<VmControl> {
        Arc::new(VmControl {
            inner: Mutex::new(Inner {
                state: RunState::Starting,
                parked: 0,
                threads: Vec::new(),
                power: None,
                paused_total: Duration::ZERO,
                paused_since: None,
                machine: None,
                capture: Vec::new(),
            }),
            snapshotting: Mutex::new(()),
            migration: MigrationStatus::default(),
            parked_changed: Condvar::new(),
            pause_requested: AtomicBool::new(false),
            stop: Arc::new(AtomicBool::new(false)),
            started: Instant::now(),
            vcpus,
            memory_bytes,
            counters: (0..vcpus).map(|_| Arc::new(VcpuCounters::default())).collect(),
        })
    }

    /// The flag that tells the vCPUs the VM is stopping.
    pub(crate) fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// vCPU `cpu`'s exit counters.
    pub(crate) fn counters(&self, cpu: usize) -> Arc<VcpuCounters> {
        self.counters.get(cpu).cloned().unwrap_or_default()
    }

    /// Every vCPU thread runs: the VM can be paused (and snapshotted) from now on.
    pub(crate) fn running(&self, threads: Vec<libc::pthread_t>, machine: Arc<Machine>) {
        let mut inner = lock(&self.inner);
        inner.threads = threads;
        inner.power = Some(machine.power.clone());
        inner.machine = Some(machine);
        inner.state = RunState::Running;
    }

    /// The VM is ending: parked vCPUs wake (and see `stop`), requests are refused.
    pub(crate) fn stopping(&self) {
        let mut inner = lock(&self.inner);
        inner.state = RunState::Stopping;
        if let Some(since) = inner.paused_since.take() {
            inner.paused_total += since.elapsed();
        }
        self.pause_requested.store(false, Ordering::Release);
        self.parked_changed.notify_all();
    }

    /// Called by a vCPU thread at the top of its run loop: parks while a pause is requested
    /// (and the VM is not stopping). A parked vCPU captures its own state when a snapshot asks
    /// (KVM's vCPU calls belong on the vCPU's thread).
    pub(crate) fn checkpoint(&self, cpu: usize, vcpu: &mut kvm_ioctls::VcpuFd) {
        if !self.pause_requested.load(Ordering::Acquire) {
            return;
        }
        let mut inner = lock(&self.inner);
        inner.parked += 1;
        self.parked_changed.notify_all();
        while self.pause_requested.load(Ordering::Acquire) && !self.stop.load(Ordering::Acquire) {
            if inner.capture.get(cpu).is_some_and(|c| matches!(c, Capture::Wanted)) {
                let indices =
                    inner.machine.as_ref().map(|m| m.msr_indices.clone()).unwrap_or_default();
                drop(inner);
                let index = u8::try_from(cpu).unwrap_or(u8::MAX);
                let result = crate::snapshot::capture_vcpu(vcpu, index, &indices);
                inner = lock(&self.inner);
                if let Some(slot) = inner.capture.get_mut(cpu) {
                    *slot = Capture::Done(Box::new(result));
                }
                self.parked_changed.notify_all();
                continue;
            }
            inner = self.parked_changed.wait(inner).unwrap_or_else(PoisonError::into_inner);
        }
        inner.parked -= 1;
    }

    /// Asks every parked vCPU for its state and waits for all of them.
    fn capture_vcpus(&self) -> Result<Vec<VcpuState>, SnapshotFailure> {
        let mut inner = lock(&self.inner);
        if inner.state != RunState::Paused {
            return Err(ControlError::WrongState(
                inner.state.as_str(),
                "a snapshot needs it paused",
            )
            .into());
        }
        inner.capture = (0..self.vcpus).map(|_| Capture::Wanted).collect();
        self.parked_changed.notify_all();
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        loop {
            if inner.capture.iter().all(|c| matches!(c, Capture::Done(_))) {
                break;
            }
            if Instant::now() > deadline || inner.state == RunState::Stopping {
                inner.capture.clear();
                return Err(SnapshotFailure::Unsupported(
                    "not every vCPU reported its state within 5 s".into(),
                ));
            }
            inner = self
                .parked_changed
                .wait_timeout(inner, Duration::from_millis(10))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        std::mem::take(&mut inner.capture)
            .into_iter()
            .map(|c| match c {
                Capture::Done(result) => *result,
                Capture::Wanted => Err(SnapshotFailure::Unsupported("lost a vCPU's state".into())),
            })
            .collect()
    }

    /// Writes a snapshot of the VM into `dir` (docs/snapshot.md): a running VM is paused for
    /// it and resumed after, a paused one stays paused. `incremental` writes only the memory
    /// pages written since this process's last snapshot into the same directory.
    pub fn snapshot(
        &self,
        dir: &Path,
        incremental: bool,
    ) -> Result<SnapshotReport, SnapshotFailure> {
        let started = Instant::now();
        let (machine, _one, was_running) = self.begin_transfer()?;
        if was_running {
            self.pause()?;
        }
        let stopped = Instant::now();
        machine.quiesce_devices();
        let result = self.capture_vcpus().and_then(|vcpus| machine.write(dir, incremental, &vcpus));
        machine.resume_devices();
        let downtime = if was_running {
            // A VM that stops meanwhile cannot be resumed; the snapshot's result still stands.
            let _ = self.resume();
            stopped.elapsed()
        } else {
            Duration::ZERO
        };
        let (memory_bytes_written, state_bytes) = result?;
        Ok(SnapshotReport {
            dir: dir.to_path_buf(),
            incremental,
            memory_bytes_written,
            state_bytes,
            downtime,
            total: started.elapsed(),
        })
    }

    /// Pauses the VM: returns once no vCPU runs guest code. Pausing a paused VM does nothing.
    pub fn pause(&self) -> Result<(), ControlError> {
        let mut inner = lock(&self.inner);
        match inner.state {
            RunState::Running => {}
            RunState::Paused => return Ok(()),
            RunState::Starting => return Err(ControlError::WrongState("starting", "try again")),
            RunState::Stopping => return Err(ControlError::WrongState("stopping", "too late")),
        }
        self.pause_requested.store(true, Ordering::Release);
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        while inner.parked < self.vcpus {
            if inner.state == RunState::Stopping {
                return Err(ControlError::WrongState("stopping", "too late"));
            }
            if Instant::now() > deadline || self.stop.load(Ordering::Acquire) {
                let parked = inner.parked;
                self.pause_requested.store(false, Ordering::Release);
                self.parked_changed.notify_all();
                return Err(ControlError::PauseTimedOut {
                    parked,
                    vcpus: self.vcpus,
                    timeout: PAUSE_TIMEOUT,
                });
            }
            for thread in &inner.threads {
                // SAFETY: the vCPU threads are joined only after `stopping()`, which the VM
                // calls first; until then each pthread_t is valid. The signal has a no-op
                // handler (its job is to make KVM_RUN return).
                unsafe { libc::pthread_kill(*thread, crate::vm::kick_signal()) };
            }
            inner = self
                .parked_changed
                .wait_timeout(inner, Duration::from_millis(1))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        inner.state = RunState::Paused;
        inner.paused_since = Some(Instant::now());
        Ok(())
    }

    /// Resumes a paused VM. Resuming a running VM does nothing.
    pub fn resume(&self) -> Result<(), ControlError> {
        let mut inner = lock(&self.inner);
        match inner.state {
            RunState::Paused => {}
            RunState::Running => return Ok(()),
            RunState::Starting => return Err(ControlError::WrongState("starting", "try again")),
            RunState::Stopping => return Err(ControlError::WrongState("stopping", "too late")),
        }
        if let Some(since) = inner.paused_since.take() {
            inner.paused_total += since.elapsed();
        }
        inner.state = RunState::Running;
        self.pause_requested.store(false, Ordering::Release);
        self.parked_changed.notify_all();
        Ok(())
    }

    /// Whether the VM moved to another VMM (this one then ends).
    pub(crate) fn moved(&self) -> bool {
        self.migration.moved.load(Ordering::Acquire)
    }

    /// The current (or last) migration's progress.
    pub fn migration_progress(&self) -> MigrationProgress {
        lock(&self.migration.progress).clone()
    }

    /// Asks a migration in progress to stop (the guest goes on here).
    pub fn cancel_migration(&self) -> Result<(), ControlError> {
        let phase = lock(&self.migration.progress).phase.clone();
        if phase != "connecting" && phase != "precopy" {
            return Err(ControlError::WrongState("not migrating", "nothing to cancel"));
        }
        self.migration.cancel.store(true, Ordering::Release);
        Ok(())
    }

    fn set_progress(&self, f: impl FnOnce(&mut MigrationProgress)) {
        f(&mut lock(&self.migration.progress));
    }

    /// What a snapshot or a migration starts with: the VM's machine, the lock that lets one of
    /// them run at a time, and whether the VM was running (rather than paused).
    fn begin_transfer(&self) -> Result<(Arc<Machine>, MutexGuard<'_, ()>, bool), SnapshotFailure> {
        let Some(machine) = lock(&self.inner).machine.clone() else {
            return Err(ControlError::WrongState("starting", "try again").into());
        };
        let one = lock(&self.snapshotting);
        let was_running = match lock(&self.inner).state {
            RunState::Running => true,
            RunState::Paused => false,
            RunState::Starting => {
                return Err(ControlError::WrongState("starting", "try again").into())
            }
            RunState::Stopping => {
                return Err(ControlError::WrongState("stopping", "too late").into())
            }
        };
        Ok((machine, one, was_running))
    }

    /// Moves the running VM to the VMM listening at `options.destination` (`vanguard vmm
    /// --migrate-from`): pre-copy while the guest runs, then a stop-and-copy. On success this
    /// VMM ends (its VM runs there); on any failure the guest runs on here.
    pub fn migrate(&self, options: &MigrateOptions) -> Result<MigrationReport, SnapshotFailure> {
        let started = Instant::now();
        let (machine, _one, was_running) = self.begin_transfer()?;
        machine.check_supported()?;
        self.migration.cancel.store(false, Ordering::Release);
        self.set_progress(|p| {
            *p = MigrationProgress { phase: "connecting".into(), ..Default::default() }
        });
        let throttle_stop = AtomicBool::new(false);
        let result = std::thread::scope(|scope| {
            if options.auto_converge && was_running {
                scope.spawn(|| self.throttle_loop(&throttle_stop));
            }
            let r = self.migrate_inner(&machine, options, started, was_running, &throttle_stop);
            throttle_stop.store(true, Ordering::Release);
            r
        });
        match &result {
            Ok(_) => {
                self.set_progress(|p| p.phase = "completed".into());
                self.migration.moved.store(true, Ordering::Release);
            }
            Err(e) => {
                // The guest goes on here; a VM that stopped meanwhile stays stopped.
                machine.resume_devices();
                if was_running {
                    let _ = self.resume();
                }
                let cancelled = self.migration.cancel.load(Ordering::Acquire);
                self.set_progress(|p| {
                    p.phase = if cancelled { "cancelled" } else { "failed" }.into();
                    p.throttle_percent = 0;
                    p.error = Some(e.to_string());
                });
            }
        }
        result
    }

    /// Auto-converge: holds the vCPUs for `throttle`% of every 10 ms until told to stop.
    fn throttle_loop(&self, stop: &AtomicBool) {
        while !stop.load(Ordering::Acquire) {
            let pct = self.migration.throttle.load(Ordering::Acquire).min(99);
            if pct == 0 {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            if self.pause().is_err() {
                return;
            }
            std::thread::sleep(Duration::from_micros(pct * 100));
            if stop.load(Ordering::Acquire) {
                // Leave it paused: the stop-and-copy pauses it anyway, or the failure path
                // resumes it.
                return;
            }
            let _ = self.resume();
            std::thread::sleep(Duration::from_micros((100 - pct) * 100));
        }
    }

    fn migrate_inner(
        &self,
        machine: &Machine,
        options: &MigrateOptions,
        started: Instant,
        was_running: bool,
        throttle_stop: &AtomicBool,
    ) -> Result<MigrationReport, SnapshotFailure> {
        let link = options.destination.connect()?;
        let offered_memory = migration::hand_over(&*link, machine)?;
        let mut input =
            BufReader::new(link.try_clone_link().map_err(|e| {
                SnapshotFailure::Migration(format!("duplicate the connection: {e}"))
            })?);
        let mut out = BufWriter::with_capacity(1 << 20, link);
        let flush = |out: &mut BufWriter<_>| {
            out.flush().map_err(|e| SnapshotFailure::Migration(format!("send: {e}")))
        };
        let cpuid = lock(&machine.cpuid0).clone().unwrap_or_default();
        migration::send(
            &mut out,
            migration::KIND_HELLO,
            &[&migration::hello(&machine.desc, &cpuid)],
        )?;
        flush(&mut out)?;
        let (memory_handed, catch_up) = match migration::receive(&mut input)? {
            (migration::KIND_ACCEPT, flags) => (
                offered_memory && flags.first() == Some(&1),
                flags.get(1).is_some_and(|f| f & migration::ACCEPT_CATCH_UP != 0),
            ),
            (migration::KIND_REFUSE, why) => {
                return Err(SnapshotFailure::Migration(format!(
                    "the destination refused: {}",
                    String::from_utf8_lossy(&why)
                )))
            }
            (kind, _) => {
                return Err(SnapshotFailure::Migration(format!(
                    "the destination answered the hello with message {kind:#04x}"
                )))
            }
        };
        if memory_handed {
            return self.hand_over_inner(machine, &mut input, &mut out, started, was_running);
        }
        machine.restart_dirty_log()?;
        let mut sender = Sender {
            mem: &machine.mem,
            ranges: &machine.desc.ranges,
            out: &mut out,
            bandwidth: options.bandwidth,
            started: Instant::now(),
            sent: 0,
            cancel: &self.migration.cancel,
            progress: &self.migration.progress,
            published: 0,
        };
        self.set_progress(|p| p.phase = "precopy".into());
        // Pass 0: everything that is not zero.
        let mut pass_start = Instant::now();
        let mut pass_bytes = 0;
        for index in 0..machine.desc.ranges.len() {
            pass_bytes += sender.range(index, true, |_| true)?;
        }
        let mut passes = 1;
        let mut throttle = 0u64;
        let mut pending = loop {
            // The pass is over when the destination has applied it, not when the socket took
            // it: without this, what sits in the socket buffers (megabytes on TCP) would be
            // applied during the downtime, and the link rate would be the buffers' speed.
            if catch_up {
                sender.catch_up(&mut input)?;
            }
            let bitmaps = machine.dirty_bitmaps()?;
            let elapsed_us = pass_start.elapsed().as_micros().max(1);
            let per_second = |bytes: u64| {
                u64::try_from(u128::from(bytes) * 1_000_000 / elapsed_us).unwrap_or(u64::MAX)
            };
            let dirty_pages: u64 =
                bitmaps.iter().flatten().map(|w| u64::from(w.count_ones())).sum();
            let dirty = dirty_pages * 4096;
            let link_rate = per_second(pass_bytes).max(1);
            let dirty_rate = per_second(dirty);
            let expected = Duration::from_secs_f64(dirty as f64 / link_rate as f64);
            let sent = sender.sent;
            self.set_progress(|p| {
                p.passes = passes;
                p.bytes_sent = sent;
                p.dirty_bytes = dirty;
                p.dirty_rate = dirty_rate;
                p.link_rate = link_rate;
                p.expected_downtime = expected;
                p.throttle_percent = u32::try_from(throttle).unwrap_or(99);
            });
            if expected <= options.max_downtime || passes >= migration::MAX_PASSES || !was_running {
                break bitmaps;
            }
            // Not converging: the guest dirties more than half what the link sends.
            if options.auto_converge && passes >= 2 && dirty_rate * 2 > link_rate {
                throttle = (throttle + 20).min(99);
                self.migration.throttle.store(throttle, Ordering::Release);
            }
            pass_start = Instant::now();
            pass_bytes = 0;
            for (index, bitmap) in bitmaps.iter().enumerate() {
                pass_bytes += sender.range(index, false, |page| bit(bitmap, page))?;
            }
            passes += 1;
        };
        // Stop-and-copy.
        throttle_stop.store(true, Ordering::Release);
        self.migration.throttle.store(0, Ordering::Release);
        self.set_progress(|p| p.phase = "stop-and-copy".into());
        let stopped = Instant::now();
        if was_running {
            self.pause()?;
        }
        // The devices finish what they were doing; their last writes are in the log below.
        machine.quiesce_devices();
        for (all, last) in pending.iter_mut().zip(machine.dirty_bitmaps()?) {
            for (a, l) in all.iter_mut().zip(last) {
                *a |= l;
            }
        }
        for (index, bitmap) in pending.iter().enumerate() {
            sender.range(index, false, |page| bit(bitmap, page))?;
        }
        let bytes_sent = sender.sent;
        let vcpus = self.capture_vcpus()?;
        let state = machine.state_bytes(&vcpus)?;
        self.finish_transfer(&mut input, &mut out, &state)?;
        Ok(MigrationReport {
            total: started.elapsed(),
            downtime: stopped.elapsed(),
            bytes_sent,
            state_bytes: state.len() as u64,
            passes,
        })
    }

    /// The stop-and-copy of a migration whose destination took this VM's memory over (a
    /// Unix socket on this host): no page is sent, only the state.
    fn hand_over_inner(
        &self,
        machine: &Machine,
        input: &mut impl std::io::Read,
        out: &mut BufWriter<Box<dyn migration::Link>>,
        started: Instant,
        was_running: bool,
    ) -> Result<MigrationReport, SnapshotFailure> {
        self.set_progress(|p| p.phase = "stop-and-copy".into());
        let stopped = Instant::now();
        if was_running {
            self.pause()?;
        }
        machine.quiesce_devices();
        let vcpus = self.capture_vcpus()?;
        let state = machine.state_bytes(&vcpus)?;
        self.finish_transfer(input, out, &state)?;
        Ok(MigrationReport {
            total: started.elapsed(),
            downtime: stopped.elapsed(),
            bytes_sent: 0,
            state_bytes: state.len() as u64,
            passes: 0,
        })
    }

    /// Sends the state, waits for the destination's ready and sends go.
    fn finish_transfer(
        &self,
        input: &mut impl std::io::Read,
        out: &mut BufWriter<Box<dyn migration::Link>>,
        state: &[u8],
    ) -> Result<(), SnapshotFailure> {
        let flush = |out: &mut BufWriter<_>| {
            out.flush().map_err(|e| SnapshotFailure::Migration(format!("send: {e}")))
        };
        migration::send(out, migration::KIND_STATE, &[state])?;
        flush(out)?;
        match migration::receive(input)? {
            (migration::KIND_READY, _) => {}
            (migration::KIND_ERROR, why) => {
                return Err(SnapshotFailure::Migration(format!(
                    "the destination could not start the VM: {}",
                    String::from_utf8_lossy(&why)
                )))
            }
            (kind, _) => {
                return Err(SnapshotFailure::Migration(format!(
                    "the destination sent message {kind:#04x} instead of ready"
                )))
            }
        }
        migration::send(out, migration::KIND_GO, &[])?;
        flush(out)
    }

    /// Presses the ACPI power button (the guest decides what to do).
    pub fn power_button(&self) -> Result<(), ControlError> {
        let inner = lock(&self.inner);
        match (inner.state, &inner.power) {
            (RunState::Running, Some(power)) => {
                devices::bus::lock(power).press_power_button();
                Ok(())
            }
            (RunState::Paused, _) => Err(ControlError::WrongState(
                "paused",
                "a paused guest cannot see the power button; resume it first",
            )),
            (RunState::Stopping, _) => Err(ControlError::WrongState("stopping", "already")),
            _ => Err(ControlError::WrongState("starting", "try again")),
        }
    }

    /// The VM's figures now.
    pub fn info(&self) -> ControlInfo {
        let inner = lock(&self.inner);
        let paused =
            inner.paused_total + inner.paused_since.map_or(Duration::ZERO, |s| s.elapsed());
        ControlInfo {
            state: inner.state,
            vcpus: self.vcpus,
            memory_bytes: self.memory_bytes,
            uptime: self.started.elapsed(),
            paused,
            exits: self
                .counters
                .iter()
                .map(|c| {
                    (
                        c.io.load(Ordering::Relaxed),
                        c.mmio.load(Ordering::Relaxed),
                        c.other.load(Ordering::Relaxed),
                    )
                })
                .collect(),
        }
    }
}

fn bit(bitmap: &[u64], page: usize) -> bool {
    bitmap.get(page / 64).is_some_and(|w| w & (1 << (page % 64)) != 0)
}
