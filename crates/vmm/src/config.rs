//! What a user asks for when starting a VM.

use std::path::PathBuf;
use std::time::Instant;

/// Where the kernel comes from.
#[derive(Debug, Clone)]
pub enum KernelImage {
    /// A bzImage or ELF file on the host.
    Path(PathBuf),
    /// An image held in memory (the test guest embedded in the binary), with a name for messages.
    Bytes {
        /// Shown in error messages in place of a path.
        name: String,
        /// The image.
        data: &'static [u8],
    },
}

impl std::fmt::Display for KernelImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KernelImage::Path(p) => write!(f, "{}", p.display()),
            KernelImage::Bytes { name, .. } => f.write_str(name),
        }
    }
}

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialOutput {
    /// This process's stdout, with stdin as the guest's input.
    Stdio,
    /// A file (created or truncated); no input.
    File(PathBuf),
    /// Discarded; no input.
    None,
}

/// A VM to run.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// The kernel.
    pub kernel: KernelImage,
    /// An initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
    /// Number of vCPUs (1..=254).
    pub cpus: u8,
    /// Guest memory in bytes.
    pub memory: u64,
    /// Back guest memory with hugetlbfs pages instead of transparent huge pages.
    pub hugepages: bool,
    /// Guest RAM in memfds (mapped shared), so that a live migration to another VMM process
    /// on the same host hands the memory over instead of copying it. Implied by a vhost-user
    /// disk.
    pub shared_memory: bool,
    /// Serial console destination.
    pub serial: SerialOutput,
    /// Attach the debug-exit port.
    pub debug_exit: bool,
    /// Attach the boot-timer port.
    pub boot_timer: bool,
    /// When the process started, for the boot timer.
    pub start_time: Instant,
    /// Stdin is a terminal in raw mode: watch for the Ctrl-A x escape.
    pub interactive_console: bool,
    /// Attach a virtio-rng device.
    pub rng: bool,
    /// Attach a virtio-balloon device asking the guest for this many bytes at start
    /// (`Some(0)`: a balloon with nothing asked yet).
    pub balloon: Option<BalloonConfig>,
    /// How virtio devices are attached.
    pub virtio_transport: VirtioTransport,
    /// virtio-blk disks, in the order the guest numbers them.
    pub disks: Vec<DiskConfig>,
    /// virtio-net devices, numbered after the disks.
    pub nets: Vec<NetConfig>,
    /// A virtio-vsock device, numbered after the entropy device.
    pub vsock: Option<VsockConfig>,
    /// A descriptor (a pipe from whoever started this process) to write one byte to, and
    /// close, once the VM is built and every vCPU thread runs: how a supervisor tells a
    /// running VM from one that failed to start, without guessing from time.
    pub ready_fd: Option<i32>,
    /// With a file console: keep at most about this many bytes in it (the older part moves to
    /// `<file>.1`); None keeps everything.
    pub serial_max_bytes: Option<u64>,
}

/// A virtio-vsock device whose host side is a Unix socket (Firecracker's convention).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context ID (3 to 2^32 - 2).
    pub cid: u64,
    /// The Unix socket the VMM listens on for host-initiated connections; guest-initiated
    /// connections to host port P go to `<socket>_P`. Removed when the VMM exits.
    pub socket: PathBuf,
}

/// A memory balloon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BalloonConfig {
    /// The initial target: bytes the guest is asked to give back.
    pub target: u64,
    /// Let the guest take pages back from the balloon when it runs out of memory.
    pub deflate_on_oom: bool,
}

/// How virtio devices reach the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VirtioTransport {
    /// virtio-pci (modern) functions on a PCI host bridge, with MSI-X: what stock
    /// distribution kernels expect. The default.
    #[default]
    Pci,
    /// virtio-mmio windows described in ACPI and on the command line (one IOAPIC line each,
    /// at most 8 devices).
    Mmio,
}

/// One virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// A raw image file.
    pub path: PathBuf,
    /// Refuse guest writes (the file is opened read-only).
    pub read_only: bool,
    /// What GET_ID answers (at most 20 bytes).
    pub serial: String,
    /// Bandwidth and operation limits.
    pub rate_limit: Option<rate_limiter::RateLimiterConfig>,
    /// Open the image with `O_DIRECT`, bypassing the host's page cache.
    pub direct: bool,
    /// Served by an external vhost-user-blk backend listening on this socket instead (then
    /// `path` is empty and the other options are the backend's business). Guest memory is then
    /// shared (memfd) so that the backend can map it.
    pub vhost_user: Option<PathBuf>,
}

/// One virtio-net device on a TAP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The TAP's name (created by the VMM if no interface has it).
    pub tap: String,
    /// The guest's MAC address; by default 52:54:00:12:34:(0x56 + the device's index among
    /// the nets).
    pub mac: Option<[u8; 6]>,
    /// Bandwidth and operation (frame) limits, each way.
    pub rate_limit: Option<rate_limiter::RateLimiterConfig>,
}

impl NetConfig {
    /// The MAC address of net device `index` (from 0) without `mac=`: locally administered,
    /// unicast, QEMU's default for the first.
    pub fn default_mac(index: usize) -> [u8; 6] {
        [0x52, 0x54, 0x00, 0x12, 0x34, 0x56u8.wrapping_add(index.to_le_bytes()[0])]
    }
}

impl VmConfig {
    /// A configuration with defaults for everything but the kernel.
    pub fn new(kernel: KernelImage) -> Self {
        Self {
            kernel,
            initrd: None,
            cmdline: String::new(),
            cpus: 1,
            memory: 128 << 20,
            hugepages: false,
            shared_memory: false,
            serial: SerialOutput::Stdio,
            debug_exit: false,
            boot_timer: false,
            start_time: Instant::now(),
            interactive_console: false,
            rng: false,
            balloon: None,
            virtio_transport: VirtioTransport::Pci,
            disks: Vec::new(),
            nets: Vec::new(),
            vsock: None,
            ready_fd: None,
            serial_max_bytes: None,
        }
    }
}
