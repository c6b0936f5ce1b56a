//! What can go wrong while building or running a VM, worded for the person who started it.

use std::path::PathBuf;

/// A guest that stopped in a way the VMM cannot continue from.
#[derive(Debug, thiserror::Error)]
pub enum GuestFailure {
    /// The vCPU triple-faulted (KVM_EXIT_SHUTDOWN).
    #[error("vCPU {cpu} triple-faulted (KVM_EXIT_SHUTDOWN)\n{registers}")]
    TripleFault {
        /// Which vCPU.
        cpu: u8,
        /// Its registers, formatted.
        registers: String,
    },
    /// KVM could not run or emulate the guest (KVM_EXIT_INTERNAL_ERROR).
    #[error("vCPU {cpu}: KVM internal error, suberror {suberror} ({what})\n{registers}")]
    InternalError {
        /// Which vCPU.
        cpu: u8,
        /// KVM's suberror code.
        suberror: u32,
        /// What the suberror means.
        what: &'static str,
        /// Its registers, formatted.
        registers: String,
    },
    /// Entry into the guest failed (KVM_EXIT_FAIL_ENTRY).
    #[error("vCPU {cpu}: VM entry failed, hardware reason {reason:#x}\n{registers}")]
    FailEntry {
        /// Which vCPU.
        cpu: u8,
        /// The hardware entry failure reason.
        reason: u64,
        /// Its registers, formatted.
        registers: String,
    },
    /// An exit the VMM does not handle.
    #[error("vCPU {cpu}: unexpected exit {exit}\n{registers}")]
    UnexpectedExit {
        /// Which vCPU.
        cpu: u8,
        /// The exit, as text.
        exit: String,
        /// Its registers, formatted.
        registers: String,
    },
}

/// Errors from building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// /dev/kvm does not exist.
    #[error(
        "cannot open {path}: it does not exist (load the kvm module, or run on a host with KVM)"
    )]
    KvmMissing {
        /// The device path (/dev/kvm unless VANGUARD_KVM_DEVICE says otherwise).
        path: String,
    },
    /// /dev/kvm exists but this user may not open it.
    #[error("cannot open {path}: permission denied (add this user to the 'kvm' group or adjust the device's permissions)")]
    KvmPermission {
        /// The device path.
        path: String,
    },
    /// The device opened is not KVM.
    #[error("{path} is not a KVM device (KVM_GET_API_VERSION failed)")]
    NotKvm {
        /// The path.
        path: String,
    },
    /// Another failure opening /dev/kvm.
    #[error("cannot open /dev/kvm")]
    KvmOpen(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("KVM call failed: {what}")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// The error from the kernel.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A KVM ioctl for one vCPU failed.
    #[error("KVM call failed for vCPU {cpu}: {what}")]
    VcpuKvm {
        /// Which vCPU.
        cpu: u8,
        /// What was being done.
        what: &'static str,
        /// The error from the kernel.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM lacks a capability Vanguard needs.
    #[error("KVM lacks a required capability: {0}")]
    MissingCapability(&'static str),
    /// The vCPU count is out of range.
    #[error("invalid number of vCPUs {cpus}: must be between 1 and {max}")]
    InvalidCpuCount {
        /// Asked for.
        cpus: u32,
        /// The limit on this host.
        max: u32,
    },
    /// The memory layout could not be built.
    #[error(transparent)]
    Boot(#[from] arch::boot::BootError),
    /// Guest memory could not be allocated.
    #[error("cannot allocate {size} bytes of guest memory{hint}")]
    MemoryAlloc {
        /// The size of the region.
        size: u64,
        /// A hint for the user.
        hint: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel file cannot be read.
    #[error("cannot read kernel {path}")]
    KernelRead {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The kernel is neither ELF nor bzImage, or is damaged.
    #[error("cannot load kernel {name}: {detail}")]
    KernelFormat {
        /// The kernel.
        name: String,
        /// What was found.
        detail: String,
    },
    /// The kernel does not fit in guest memory.
    #[error("cannot load kernel {name}: it needs {needed} MiB of guest memory but the VM has {memory} MiB")]
    KernelTooLarge {
        /// The kernel.
        name: String,
        /// Memory needed, in MiB.
        needed: u64,
        /// Memory given, in MiB.
        memory: u64,
    },
    /// The loader rejected the kernel.
    #[error("cannot load kernel {name}: {source}")]
    KernelLoad {
        /// The kernel.
        name: String,
        /// The loader's reason.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The initrd cannot be read.
    #[error("cannot read initrd {path}")]
    InitrdRead {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The initrd does not fit.
    #[error("initrd {path} ({size} bytes) does not fit in guest memory below {limit:#x} after the kernel")]
    InitrdTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Where it would have to end.
        limit: u64,
    },
    /// The command line is too long or malformed.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// ACPI tables could not be built.
    #[error("cannot build ACPI tables")]
    Acpi(#[source] arch::acpi::AcpiError),
    /// CPUID could not be configured.
    #[error("cannot configure CPUID")]
    Cpuid(#[source] arch::cpuid::CpuidError),
    /// The per-VM API socket cannot be made.
    #[error("cannot listen on API socket {path}: {why}")]
    ApiSocket {
        /// The socket.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The serial output file cannot be created.
    #[error("cannot open serial output {path}")]
    SerialFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A device could not be set up.
    #[error("cannot set up device {what}")]
    Device {
        /// Which.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A thread could not be started.
    #[error("cannot start thread {name}")]
    Thread {
        /// The thread.
        name: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A disk cannot be attached.
    #[error("cannot attach disk")]
    Disk(#[from] virtio_devices::block::BlockError),
    /// A vhost-user disk cannot be attached.
    #[error("cannot attach vhost-user disk")]
    VhostUserDisk(#[from] virtio_devices::vhost_user_blk::VhostUserBlkError),
    /// A network device cannot be attached.
    #[error("cannot attach network device")]
    Net(#[from] virtio_devices::net::NetError),
    /// The vsock device cannot be attached.
    #[error("cannot attach vsock device")]
    Vsock(#[from] virtio_devices::vsock::VsockError),
    /// More virtio devices than there are interrupt lines for them.
    #[error("too many virtio devices: {count} asked for, at most {max}")]
    TooManyDevices {
        /// Asked for.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// The guest crashed.
    #[error("guest failed")]
    Guest(#[from] GuestFailure),
    /// A snapshot or restore failed.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotFailure),
}
