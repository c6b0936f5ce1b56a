//! Vanguard's management API: the resources `vanguard serve` exposes under `/v1` (VM specs and
//! status, operations, events, the host), how a spec is checked, and a client for the CLI.
//!
//! The types here are the wire format: JSON through serde, described for the OpenAPI document
//! (`/openapi.json`) through utoipa. Field names are snake_case; enums are lowercase strings.
//! Unknown fields in a spec are refused (a typo must not be silently ignored).

pub mod client;
pub mod spec;
pub mod vmm;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;

pub use spec::{validate, SpecError, SpecFormat};

/// The API version in every path (`/v1/...`).
pub const API_PREFIX: &str = "/v1";

/// A declarative VM: what to run. Only `name` is required.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// 1 to 63 characters: lowercase letters, digits and '-', starting with a letter or digit.
    pub name: String,
    /// vCPUs (1 to 254).
    #[serde(default = "default_cpus")]
    pub cpus: u8,
    /// Guest memory in MiB (16 to 1048576).
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    /// What to boot; by default Vanguard's built-in test guest.
    #[serde(default)]
    pub boot: Boot,
    /// virtio-blk disks, in the order the guest numbers them.
    #[serde(default)]
    pub disks: Vec<Disk>,
    /// virtio-net cards on TAP devices.
    #[serde(default)]
    pub nics: Vec<Nic>,
    /// A virtio-vsock device.
    #[serde(default)]
    pub vsock: Option<Vsock>,
    /// Which hypervisor runs it.
    #[serde(default)]
    pub hypervisor: Hypervisor,
    /// For the qemu hypervisor: KVM or software emulation (TCG); `auto` picks KVM only where
    /// the host has hardware virtualization.
    #[serde(default)]
    pub accel: Accel,
    /// Resource limits the kernel enforces on the VM's process (its cgroup).
    #[serde(default)]
    pub limits: Limits,
    /// What the daemon does when the VM's process ends without being asked to.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Free-form key/value pairs (keys 1 to 63 characters, values up to 255).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

fn default_cpus() -> u8 {
    1
}

fn default_memory() -> u64 {
    128
}

/// What a VM boots: a kernel (bzImage or ELF vmlinux) with an optional initrd, or, with no
/// kernel, the built-in test guest. Absolute paths on the host running the daemon.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Boot {
    /// The kernel.
    #[serde(default)]
    pub kernel: Option<String>,
    /// An initial ramdisk (needs a kernel).
    #[serde(default)]
    pub initrd: Option<String>,
    /// The kernel command line (for the test guest: its scenarios, docs/test-guest.md).
    #[serde(default)]
    pub cmdline: Option<String>,
    /// The firmware that boots a disk (qemu driver only): SeaBIOS (`bios`, the default) or
    /// OVMF (`uefi`).
    #[serde(default)]
    pub firmware: Firmware,
}

/// A PC's firmware.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    /// SeaBIOS (legacy BIOS).
    #[default]
    Bios,
    /// OVMF (UEFI), with a variable store of the VM's own.
    Uefi,
}

/// How a disk image is stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// The bytes of the disk, as they are.
    #[default]
    Raw,
    /// QEMU's copy-on-write format (qemu driver only).
    Qcow2,
}

/// A virtio-blk disk on a raw image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    /// The image (an absolute path).
    pub path: String,
    /// The guest may not write.
    #[serde(default)]
    pub readonly: bool,
    /// What the guest reads as the disk's ID (up to 20 bytes).
    #[serde(default)]
    pub serial: Option<String>,
    /// The image's format: `raw` (the default) or `qcow2` (qemu driver only).
    #[serde(default)]
    pub format: DiskFormat,
}

/// A virtio-net card on a TAP device (created by the VMM if absent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Nic {
    /// The TAP's name (1 to 15 bytes).
    pub tap: String,
    /// The card's MAC address (`52:54:00:12:34:56`); by default one derived from its position.
    #[serde(default)]
    pub mac: Option<String>,
}

/// A virtio-vsock device; host programs reach the guest through `socket` (docs/virtio.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    /// The guest's context ID (3 or more).
    pub cid: u32,
    /// The host-side Unix socket (an absolute path).
    pub socket: String,
}

/// Limits on a VM's whole process (vCPUs, device threads, the VMM itself), enforced by the
/// kernel through the cgroup the daemon puts it in.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// CPU time, in percent of one host CPU (50: half a CPU; 200: two CPUs), 1 to 25600.
    #[serde(default)]
    pub cpu_quota_percent: Option<u32>,
    /// CPU weight against other VMs when CPUs are contended, 1 to 10000 (default 100).
    #[serde(default)]
    pub cpu_weight: Option<u32>,
    /// Memory (guest RAM and the VMM's own) in MiB; at least `memory_mib` + 16.
    #[serde(default)]
    pub memory_max_mib: Option<u64>,
}

/// The hypervisor drivers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Hypervisor {
    /// Vanguard's own VMM (`vanguard run`).
    #[default]
    Vanguard,
    /// QEMU (`qemu-system-x86_64`), controlled through QMP: boots anything a PC boots.
    Qemu,
}

/// How QEMU runs the guest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM where the host has hardware virtualization (VT-x/AMD-V), TCG otherwise.
    #[default]
    Auto,
    /// KVM.
    Kvm,
    /// Software emulation.
    Tcg,
}

/// What the daemon does when a VM's process ends without being asked to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Leave it stopped (or failed).
    #[default]
    Never,
    /// Start it again if it failed (a VMM error, a crash, killed), not if the guest powered off.
    OnFailure,
    /// Start it again whenever it ends by itself.
    Always,
}

/// Where a VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// Defined, no process.
    Stopped,
    /// Its VMM process is being started.
    Starting,
    /// Its VMM process runs.
    Running,
    /// Its VMM process runs with the vCPUs paused.
    Paused,
    /// Being stopped (power button pressed, or killed).
    Stopping,
    /// Its process ended with an error, or vanished.
    Failed,
    /// Arriving by live migration from another daemon: its VMM process waits for the source
    /// (`POST /v1/migrations/incoming`); `running` once the VM runs here.
    Incoming,
}

/// How a VM's last process ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExitInfo {
    /// The exit status, if it exited.
    pub code: Option<i32>,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
    /// In words.
    pub reason: String,
    /// When (seconds since the Unix epoch).
    pub at: u64,
}

/// What the daemon knows of a VM's process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmStatus {
    /// Where the VM is in its life.
    pub state: VmState,
    /// The VMM process, while there is one.
    pub pid: Option<u32>,
    /// When the current (or last) process started (seconds since the Unix epoch).
    pub started_at: Option<u64>,
    /// How the last process ended.
    pub last_exit: Option<ExitInfo>,
    /// How many times the restart policy started it again.
    pub restarts: u32,
}

impl Default for VmStatus {
    fn default() -> VmStatus {
        VmStatus {
            state: VmState::Stopped,
            pid: None,
            started_at: None,
            last_exit: None,
            restarts: 0,
        }
    }
}

/// A VM: its spec and its status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Vm {
    /// What to run.
    pub spec: VmSpec,
    /// What runs.
    pub status: VmStatus,
    /// When it was created (seconds since the Unix epoch).
    pub created_at: u64,
}

/// What an operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OperationKind {
    /// Start a VM.
    Start,
    /// Stop a VM.
    Stop,
    /// Restart a VM (stop, then start).
    Restart,
    /// Pause a running VM's vCPUs.
    Pause,
    /// Resume a paused VM.
    Resume,
    /// Write a snapshot of a running or paused VM.
    Snapshot,
    /// Run a VM on from one of its snapshots.
    Restore,
    /// Move a VM to a fresh VMM process here, or to another daemon, while it runs.
    Migrate,
    /// Receive a VM another daemon migrates here.
    Incoming,
}

/// Where an operation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OperationState {
    /// Under way.
    Running,
    /// Done.
    Succeeded,
    /// Ended in an error (see `error`).
    Failed,
}

/// A long-running action: answered 202 with this; poll it or wait on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Operation {
    /// Its number (increasing).
    pub id: u64,
    /// What it does.
    pub kind: OperationKind,
    /// The VM it acts on.
    pub vm: String,
    /// Where it is.
    pub state: OperationState,
    /// What it is doing now, in words.
    pub progress: String,
    /// Why it failed.
    pub error: Option<String>,
    /// When it was created and finished (seconds since the Unix epoch).
    pub created_at: u64,
    /// When it finished.
    pub finished_at: Option<u64>,
    /// For a migration: the VMM's figures (updated about every 200 ms while it runs; at the
    /// end, the result with `total_us`, `downtime_us` and `state_bytes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<vmm::MigrationInfo>,
}

/// Something that happened, as the events stream (`GET /v1/events`) carries it: one JSON
/// object per line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Event {
    /// Its number in this daemon's life (increasing).
    pub seq: u64,
    /// When (milliseconds since the Unix epoch).
    pub time_ms: u64,
    /// `vm.created`, `vm.starting`, `vm.running`, `vm.stopping`, `vm.stopped`, `vm.failed`,
    /// `vm.restarting`, `vm.paused`, `vm.resumed`, `vm.deleted`, `vm.snapshotted`,
    /// `vm.restored`, `vm.migrated`, `vm.incoming`, `operation.succeeded`, `operation.failed`,
    /// `daemon.started`; `events.subscribed` (first line of every stream) and `events.lost`
    /// (a slow reader missed some).
    pub kind: String,
    /// The VM concerned, if any.
    pub vm: Option<String>,
    /// The operation concerned, if any.
    pub operation: Option<u64>,
    /// In words.
    pub message: String,
}

/// What a hypervisor driver can do on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DriverInfo {
    /// `vanguard`.
    pub name: String,
    /// Whether VMs can run with it here.
    pub available: bool,
    /// Why not, or how (e.g. KVM without hardware virtualization).
    pub detail: String,
}

/// The host the daemon runs on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HostInfo {
    /// The host's name.
    pub hostname: String,
    /// The daemon's version.
    pub version: String,
    /// Online CPUs.
    pub cpus: u32,
    /// Memory, and memory available (MiB, from /proc/meminfo).
    pub memory_total_mib: u64,
    /// Memory available to new processes.
    pub memory_available_mib: u64,
    /// VMs defined, and running.
    pub vms_defined: u64,
    /// VMs whose process runs.
    pub vms_running: u64,
    /// vCPUs and MiB given to running VMs.
    pub vcpus_running: u64,
    /// Memory of running VMs (MiB).
    pub memory_running_mib: u64,
    /// The hypervisor drivers.
    pub drivers: Vec<DriverInfo>,
    /// How VM limits are enforced here: `cgroup v1`, `cgroup v2`, or why they cannot be.
    pub cgroups: String,
}

/// A token's public part: its name and when it was made (the secret is shown once, at
/// creation, and stored only as a digest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TokenInfo {
    /// Its name (1 to 63 of `a-z 0-9 -`).
    pub name: String,
    /// When it was made (seconds since the Unix epoch).
    pub created_at: u64,
}

/// A request for a new token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    /// Its name (1 to 63 of `a-z 0-9 -`).
    pub name: String,
}

/// A token just made: the secret to send as `Authorization: Bearer <token>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CreatedToken {
    /// Its name.
    pub name: String,
    /// The secret (shown this once).
    pub token: String,
    /// When it was made.
    pub created_at: u64,
}

/// `POST /v1/vms/{name}/snapshots`: a snapshot to write into `<vm dir>/snapshots/<name>/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSnapshot {
    /// 1 to 64 of `A-Z a-z 0-9 . _ -`, not starting with '.'. Writing to an existing name
    /// replaces that snapshot (or, with `incremental`, updates it).
    pub name: String,
    /// Write only the pages the guest wrote since this VMM process last wrote this snapshot
    /// (docs/snapshot.md).
    #[serde(default)]
    pub incremental: bool,
}

/// A snapshot of a VM, as `GET /v1/vms/{name}/snapshots` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotEntry {
    /// Its name.
    pub name: String,
    /// When its state file was last written (seconds since the Unix epoch).
    pub created_at: Option<u64>,
    /// Bytes it takes on disk (the memory file is sparse: zero pages take nothing).
    pub size_bytes: u64,
    /// The VM's generation in it (0 at boot, +1 per snapshot), if its state file can be read.
    pub generation: Option<u64>,
    /// Whether it can be restored: a state file that checks out (an interrupted incremental
    /// snapshot leaves memory without state).
    pub complete: bool,
}

/// `POST /v1/vms/{name}/restore`: which snapshot to run the VM on from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// The snapshot's name.
    pub snapshot: String,
}

/// `POST /v1/vms/{name}/migrate`: where and how to move a running VM. Without `to`, to a
/// fresh VMM process on this host (e.g. after upgrading the `vanguard` binary).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrateVmRequest {
    /// The destination daemon: `tcp:HOST:PORT` (TLS; with `token` and `ca_cert`) or
    /// `unix:PATH`.
    #[serde(default)]
    pub to: Option<String>,
    /// The bearer token for a `tcp:` destination.
    #[serde(default)]
    pub token: Option<String>,
    /// The PEM certificate (the text, not a path) that signed a `tcp:` destination's own.
    #[serde(default)]
    pub ca_cert: Option<String>,
    /// The longest the guest may stop for the final copy, ms (default 300).
    #[serde(default)]
    pub max_downtime_ms: Option<u64>,
    /// Send at most this many MiB/s (default: no limit).
    #[serde(default)]
    pub bandwidth_mib_s: Option<u64>,
    /// Hold the vCPUs part of the time when the guest dirties memory faster than the link
    /// sends it (default true).
    #[serde(default)]
    pub auto_converge: Option<bool>,
}

/// `POST /v1/migrations/incoming`: another daemon is about to send VM `name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IncomingRequest {
    /// The VM's name (the spec's).
    pub name: String,
    /// Its spec, as the source daemon has it (its paths must exist here).
    pub spec: VmSpec,
}

/// The answer to `POST /v1/migrations/incoming`: where the source's VMM sends the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct IncomingAccepted {
    /// The VM as defined here (state `incoming`).
    pub vm: Vm,
    /// The address the VMM here listens on: `tcp:IP:PORT`.
    pub address: String,
    /// The operation that ends when the VM runs here (or is given up).
    pub operation: Operation,
}

/// Every error the API returns: the HTTP status says what kind, this says what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ApiError {
    /// What went wrong.
    pub error: String,
    /// The spec field at fault (`memory_mib`, `disks[1].path`, ...), for 400s about a spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
