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
