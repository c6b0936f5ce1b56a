//! The per-VM API of one VMM process (`vanguard run --api-socket PATH`, also spelt `vanguard
//! vmm`): HTTP/1.1 with JSON over a Unix socket, described in docs/api.md.
//!
//! | method and path | answer |
//! |---|---|
//! | `GET /v1/vm` | 200 [`VmmInfo`] |
//! | `PUT /v1/vm/pause` | 200 [`VmmInfo`] once no vCPU runs; 409 [`crate::ApiError`] if the VM is starting or stopping |
//! | `PUT /v1/vm/resume` | 200 [`VmmInfo`] |
//! | `PUT /v1/vm/shutdown` | 202 [`VmmInfo`]: the ACPI power button was pressed; 409 while paused |
//! | `PUT /v1/vm/snapshot` | body [`SnapshotRequest`]; 200 [`SnapshotInfo`] once written (a running VM is paused for it, then resumed); 400 for a malformed body, 409 if the VM cannot be snapshotted now or at all, 500 if writing failed |
//! | `PUT /v1/vm/migrate` | body [`MigrateRequest`]; 200 [`MigrationInfo`] once the VM runs at the destination (this VMM then exits); 400 malformed, 409 not now or not this VM, 502 the migration failed (the guest runs on here) |
//! | `GET /v1/vm/migration` | 200 [`MigrationInfo`]: the current or last migration |
//! | `PUT /v1/vm/migration/cancel` | 202 [`MigrationInfo`]; 409 when none is in its pre-copy |
//! | `GET /metrics` | 200, Prometheus text format |

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Where a VMM's VM is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum VmmState {
    /// Being built; no vCPU runs yet.
    Starting,
    /// Its vCPUs run.
    Running,
    /// Its vCPUs are stopped.
    Paused,
    /// The guest ended it, or it failed: the process is ending.
    Stopping,
}

/// `GET /v1/vm`: what the VMM runs and where it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmmInfo {
    /// Where the VM is.
    pub state: VmmState,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest memory, MiB.
    pub memory_mib: u64,
    /// The VMM's process ID.
    pub pid: u32,
    /// Milliseconds since the VMM started building the VM.
    pub uptime_ms: u64,
    /// Milliseconds spent paused, the current pause included.
    pub paused_ms: u64,
    /// Vanguard's version.
    pub version: String,
}

/// `PUT /v1/vm/snapshot`: where to write a snapshot (docs/snapshot.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// The snapshot directory (created if missing); its `state` and `memory` files are
    /// replaced.
    pub destination: String,
    /// Write only the memory pages written since this VMM's last snapshot into the same
    /// directory.
    #[serde(default)]
    pub incremental: bool,
}

/// What a snapshot wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotInfo {
    /// The directory.
    pub destination: String,
    /// Whether only dirty pages were written.
    pub incremental: bool,
    /// Guest memory bytes written (zero pages of a full snapshot are holes, not counted).
    pub memory_bytes_written: u64,
    /// Size of the state file.
    pub state_bytes: u64,
    /// Microseconds the guest was stopped for it (0 if it was paused already).
    pub downtime_us: u64,
    /// Microseconds from the request to the answer.
    pub total_us: u64,
}

/// `PUT /v1/vm/migrate`: where and how to move the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// The destination VMM (`vanguard vmm --migrate-from ADDRESS`): `tcp:HOST:PORT` or
    /// `unix:PATH`.
    pub destination: String,
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

/// A migration's progress, or its result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MigrationInfo {
    /// `none`, `connecting`, `precopy`, `stop-and-copy`, `completed`, `failed` or `cancelled`.
    pub phase: String,
    /// Pre-copy passes done.
    pub passes: u32,
    /// Guest memory bytes sent.
    pub bytes_sent: u64,
    /// Dirty bytes the last pass found.
    pub dirty_bytes: u64,
    /// The guest's dirtying rate over the last pass.
    pub dirty_rate_bytes_per_s: u64,
    /// The link's rate over the last pass.
    pub link_rate_bytes_per_s: u64,
    /// How long the stop-and-copy would take now, microseconds.
    pub expected_downtime_us: u64,
    /// Share of the time auto-converge holds the vCPUs, percent.
    pub throttle_percent: u32,
    /// Why it failed or was cancelled.
    pub error: Option<String>,
    /// When completed: microseconds from the request to the destination's go.
    pub total_us: Option<u64>,
    /// When completed: microseconds the guest was stopped.
    pub downtime_us: Option<u64>,
    /// When completed: bytes of state sent.
    pub state_bytes: Option<u64>,
}
