//! Vanguard's virtual machine monitor: one KVM virtual machine with its memory, vCPU threads,
//! in-kernel interrupt controllers and legacy devices, booted through the Linux boot protocol.
//!
//! [`Vm::run`] builds the machine from a [`VmConfig`], runs it until the guest powers off,
//! resets, asks to exit through the debug port, or fails, and returns what happened.

pub mod bench;
mod config;
pub mod console;
mod control;
mod error;
mod irq;
mod kernel;
mod memory;
mod migration;
mod regs;
mod snapshot;
mod vcpu;
mod vm;

pub use config::{
    BalloonConfig, DiskConfig, KernelImage, NetConfig, SerialOutput, VirtioTransport, VmConfig,
    VsockConfig,
};
pub use control::{ControlError, ControlInfo, RunState, VmControl};
pub use error::{GuestFailure, VmmError};
pub use migration::{MigrateOptions, MigrationAddress, MigrationProgress, MigrationReport};
pub use snapshot::{SnapshotFailure, SnapshotReport, MEMORY_FILE, STATE_FILE};
pub use vm::{PreparedRestore, RestoreOptions, Vm, VmOutcome};

/// Checks a `--net tap=` name as the kernel will (see [`NetConfig`]).
pub use virtio_devices::net::validate_tap_name;
/// Checks a `--vsock cid=` value (see [`VsockConfig`]).
pub use virtio_devices::vsock::validate_cid as validate_vsock_cid;
