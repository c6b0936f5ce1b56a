//! Building a VM from its configuration and running it to the end.

use crate::config::{SerialOutput, VirtioTransport, VmConfig};
use crate::control::VmControl;
use crate::error::VmmError;
use crate::kernel;
use crate::memory;
use crate::snapshot::{Machine, MachineDesc, RamRange, Restored};
use crate::vcpu::{self, BootState, VcpuReport, VcpuRunner};
use arch::layout::*;
use devices::legacy::{AcpiPm, BootTimer, DebugExit, SerialPort, I8042};
use devices::{Bus, IrqLine};
use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use std::ffi::CString;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, Once};
use std::time::Duration;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

/// How a VM ended when the guest ended it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmOutcome {
    /// ACPI power-off.
    PowerOff,
    /// Reset (i8042 or ACPI reset register).
    Reset,
    /// The guest wrote this status to the debug-exit port.
    DebugExit(u8),
    /// The user stopped the VM from the console (Ctrl-A x).
    ConsoleQuit,
    /// The VM moved to another VMM process (live migration) and runs there.
    Migrated,
}

/// Decides, once every vCPU is configured, whether they run: a migration's destination runs
/// them only when the source says go.
pub(crate) trait StartGate: Send {
    /// Every vCPU is configured: Ok lets them run.
    fn open(&mut self) -> Result<(), VmmError>;
    /// The VM cannot start (`why`); none of its vCPUs will run.
    fn abort(&mut self, why: &str);
}

/// Maps a failed VM-level KVM call to an error naming what was being done.
pub(crate) fn kvm_call(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { what, source }
}

/// The environment variable that points Vanguard at another KVM device node (for tests).
pub const KVM_DEVICE_ENV: &str = "VANGUARD_KVM_DEVICE";

/// A virtual machine.
pub struct Vm;

/// A snapshot read and checked by [`Vm::prepare_restore`].
pub struct PreparedRestore(Restored);

impl PreparedRestore {
    /// The snapshot's vCPUs.
    pub fn vcpus(&self) -> usize {
        usize::from(self.0.machine.vcpus)
    }
    /// The snapshot's guest memory, bytes.
    pub fn memory(&self) -> u64 {
        self.0.machine.memory
    }
}

/// What a restore takes from the command line rather than from the snapshot.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Where the guest's serial console goes.
    pub serial: SerialOutput,
    /// As [`VmConfig::serial_max_bytes`].
    pub serial_max_bytes: Option<u64>,
    /// As [`VmConfig::interactive_console`].
    pub interactive_console: bool,
    /// As [`VmConfig::ready_fd`].
    pub ready_fd: Option<i32>,
}

fn restore_err(what: String) -> VmmError {
    VmmError::Snapshot(crate::snapshot::SnapshotFailure::Incompatible(what))
}

/// A VM ready for its vCPUs.
pub(crate) struct BuiltVm {
    pub vm: Arc<VmFd>,
    pub mem: Arc<vm_memory::GuestMemoryMmap>,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub boot: BootState,
    pub cpuid: kvm_bindings::CpuId,
    pub machine: Arc<Machine>,
}

struct EventFdIrq(EventFd);
impl IrqLine for EventFdIrq {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Queue notifications as KVM ioeventfds: a guest write of the queue index to QueueNotify
/// signals the eventfd inside the kernel, with no exit to this process.
struct IoEventRegistrar(Arc<VmFd>);

impl virtio_devices::transport::NotifyRegistrar for IoEventRegistrar {
    fn register(&self, addr: u64, datamatch: Option<u32>, fd: &EventFd) -> std::io::Result<()> {
        let addr = kvm_ioctls::IoEventAddress::Mmio(addr);
        match datamatch {
            Some(value) => self.0.register_ioevent(fd, &addr, value),
            None => self.0.register_ioevent(fd, &addr, kvm_ioctls::NoDatamatch),
        }
        .map_err(std::io::Error::from)
    }
    fn unregister(&self, addr: u64, datamatch: Option<u32>, fd: &EventFd) -> std::io::Result<()> {
        let addr = kvm_ioctls::IoEventAddress::Mmio(addr);
        match datamatch {
            Some(value) => self.0.unregister_ioevent(fd, &addr, value),
            None => self.0.unregister_ioevent(fd, &addr, kvm_ioctls::NoDatamatch),
        }
        .map_err(std::io::Error::from)
    }
}

struct LineIrq {
    vm: Arc<VmFd>,
    gsi: u32,
}
impl IrqLine for LineIrq {
    fn trigger(&self) -> std::io::Result<()> {
        self.set_level(true)?;
        self.set_level(false)
    }
    fn set_level(&self, high: bool) -> std::io::Result<()> {
        self.vm.set_irq_line(self.gsi, high).map_err(std::io::Error::from)
    }
}

/// A virtio-pci function, shared by the PCI bus and the VM's snapshot handles.
type SharedVirtioPci = Arc<Mutex<virtio_devices::pci::VirtioPci>>;

/// Puts each virtio device on a PCI bus as a virtio-pci function: BAR 0 of device n at
/// `PCI_MMIO_START + n * BAR_SIZE`, one MSI-X vector per queue plus one for configuration
/// changes, each an irqfd on its own GSI (from `MSI_GSI_START`) whose route the guest's
/// MSI-X programming sets.
fn build_pci(
    vm: &Arc<VmFd>,
    mem: &vm_memory::GuestMemoryMmap,
    router: &Arc<crate::irq::GsiRouter>,
    virtio: Vec<Box<dyn virtio_devices::VirtioDevice>>,
) -> Result<(pci::PciRoot, Vec<SharedVirtioPci>), VmmError> {
    let pci_err =
        |e: String| VmmError::Device { what: "virtio-pci", source: std::io::Error::other(e) };
    let mut root = pci::PciRoot::new();
    let mut functions = Vec::with_capacity(virtio.len());
    let mut gsi = MSI_GSI_START;
    let registrar: Arc<dyn virtio_devices::transport::NotifyRegistrar> =
        Arc::new(IoEventRegistrar(vm.clone()));
    for (n, device) in virtio.into_iter().enumerate() {
        let mut vectors = Vec::new();
        for _ in 0..=device.queue_max_sizes().len() {
            let irqfd = EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|source| VmmError::Device { what: "MSI-X vector", source })?;
            vm.register_irqfd(&irqfd, gsi).map_err(kvm_call("register MSI-X irqfd"))?;
            vectors.push(pci::msix::Vector { gsi, irqfd });
            gsi += 1;
        }
        let msix = Arc::new(pci::msix::Msix::new(vectors, router.clone()));
        let bar = PCI_MMIO_START + n as u64 * virtio_devices::pci::BAR_SIZE;
        let function = virtio_devices::pci::VirtioPci::new(device, mem.clone(), msix, bar)
            .map_err(|e| pci_err(e.to_string()))?
            .with_notifier(registrar.clone());
        let function = Arc::new(Mutex::new(function));
        root.add(function.clone()).map_err(|e| pci_err(e.to_string()))?;
        functions.push(function);
    }
    Ok((root, functions))
}

pub(crate) fn open_kvm() -> Result<Kvm, VmmError> {
    let path = std::env::var(KVM_DEVICE_ENV).unwrap_or_else(|_| "/dev/kvm".to_string());
    let c_path =
        CString::new(path.clone()).map_err(|_| VmmError::KvmMissing { path: path.clone() })?;
    let kvm = Kvm::new_with_path(&c_path).map_err(|e| match e.errno() {
        libc::ENOENT => VmmError::KvmMissing { path: path.clone() },
        libc::EACCES | libc::EPERM => VmmError::KvmPermission { path: path.clone() },
        _ => VmmError::KvmOpen(e),
    })?;
    match kvm.get_api_version() {
        12 => {}
        v if v < 0 => return Err(VmmError::NotKvm { path }),
        _ => return Err(VmmError::MissingCapability("KVM API version 12")),
    }
    for (cap, name) in [
        (Cap::Irqchip, "in-kernel irqchip"),
        (Cap::Pit2, "in-kernel PIT"),
        (Cap::UserMemory, "user memory"),
        (Cap::SetTssAddr, "TSS address"),
        (Cap::Irqfd, "irqfd"),
        (Cap::ImmediateExit, "immediate exit"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmmError::MissingCapability(name));
        }
    }
    Ok(kvm)
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

pub(crate) fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // An empty handler is enough: its only job is to make KVM_RUN return EINTR. Failure
        // leaves the default action (terminate), so report it rather than hide it.
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler) {
            eprintln!("vanguard: cannot install the vCPU kick signal handler: {e}");
        }
    });
}

static SIGTERM_RECEIVED: AtomicBool = AtomicBool::new(false);
static SIGTERM_PRESSED: AtomicBool = AtomicBool::new(false);

extern "C" fn sigterm_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // The first SIGTERM asks the guest to shut down; a second one ends the VM at once.
    if SIGTERM_PRESSED.swap(true, Ordering::AcqRel) {
        crate::console::restore_terminal();
        // SAFETY: _exit is async-signal-safe and ends the process without running any code
        // that could be in an inconsistent state.
        unsafe { libc::_exit(128 + libc::SIGTERM) };
    }
    SIGTERM_RECEIVED.store(true, Ordering::Release);
}

fn install_sigterm_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) =
            vmm_sys_util::signal::register_signal_handler(libc::SIGTERM, sigterm_handler)
        {
            eprintln!(
                "vanguard: cannot handle SIGTERM (it will end the VM without power-off): {e}"
            );
        }
    });
}

/// Drops this process's mappings of its own executable's read-only pages (code and read-only
/// data) once the VM runs: start-up touched much of them (the embedded test guest is copied
/// out of the read-only data, and fault-around maps 64 KiB around each code fault, in a binary
/// that also holds the daemon), most of it never needed again. The pages stay in the page cache; what the running VMM needs comes back with
/// a minor fault. Only RSS changes (docs/performance.md).
fn trim_startup_pages() {
    let Ok(exe) = std::fs::read_link("/proc/self/exe") else { return };
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else { return };
    // (start, end, read-only mapping of the executable, no private copies in it)
    let mut current: Option<(usize, usize, bool)> = None;
    let mut drop = Vec::new();
    for line in smaps.lines() {
        if let Some(anon) = line.strip_prefix("Anonymous:") {
            // The RELRO part (relocated by the loader, then made read-only) has private
            // copies: dropping those would bring back the file's unrelocated bytes.
            if let Some((start, end, true)) = current.take() {
                if anon.trim() == "0 kB" {
                    drop.push((start, end));
                }
            }
            continue;
        }
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else { continue };
        let Some((start, end)) = range.split_once('-') else { continue };
        let (Ok(start), Ok(end)) =
            (usize::from_str_radix(start, 16), usize::from_str_radix(end, 16))
        else {
            continue;
        };
        let path = fields.nth(3).unwrap_or("");
        // The executable only: the shared libraries' pages come straight back (libc's code is
        // in use, and fault-around maps its neighbours), measured.
        let ours = std::path::Path::new(path) == exe && !perms.contains('w');
        current = Some((start, end, ours));
    }
    for (start, end) in drop {
        // SAFETY: the range is a whole read-only, file-backed private mapping of this process
        // with no private (anonymous) pages in it (from /proc/self/smaps): MADV_DONTNEED only
        // drops page-table entries, and the same bytes come back from the file on the next
        // access.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
    }
}

/// Writes one byte to `fd` and closes it ([`VmConfig::ready_fd`]); a supervisor that has gone
/// away (EPIPE) or a bad descriptor changes nothing for the VM.
fn signal_ready(fd: i32) {
    // SAFETY: the byte is a valid one-byte buffer for the call; `fd` was handed to this process
    // for this purpose only and nothing else uses it, so closing it after the write is ours
    // to do. Errors are ignored: the VM runs either way.
    unsafe {
        let _ = libc::write(fd, b"R".as_ptr().cast(), 1);
        libc::close(fd);
    }
}

fn serial_writer(
    out: &SerialOutput,
    max_bytes: Option<u64>,
) -> Result<Box<dyn std::io::Write + Send>, VmmError> {
    Ok(match out {
        SerialOutput::Stdio => Box::new(std::io::stdout()),
        SerialOutput::File(path) => {
            let fail = |source| VmmError::SerialFile { path: path.clone(), source };
            match max_bytes {
                Some(max) => {
                    Box::new(crate::console::RotatingFile::create(path, max).map_err(fail)?)
                }
                None => Box::new(std::fs::File::create(path).map_err(fail)?),
            }
        }
        SerialOutput::None => Box::new(std::io::sink()),
    })
}

/// The virtio-mmio windows of `count` devices: window n at VIRTIO_MMIO_START + n * stride,
/// GSI 16 + n, described in ACPI (and on the command line).
fn mmio_windows(count: usize) -> Vec<arch::acpi::VirtioMmioInfo> {
    (0..count)
        .map(|n| arch::acpi::VirtioMmioInfo {
            base: u32::try_from(VIRTIO_MMIO_START + VIRTIO_MMIO_STRIDE * n as u64).unwrap_or(0),
            len: u32::try_from(virtio_devices::mmio::MMIO_WINDOW).unwrap_or(0),
            gsi: VIRTIO_MMIO_GSI_BASE + u32::try_from(n).unwrap_or(0),
        })
        .collect()
}

impl Vm {
    /// Builds the VM described by `config`, runs it, and returns how the guest ended it.
    pub fn run(config: VmConfig) -> Result<VmOutcome, VmmError> {
        let control = VmControl::new(usize::from(config.cpus), config.memory);
        Self::run_controlled(config, control)
    }

    /// [`Vm::run`] with a control handle made beforehand (by [`VmControl::new`] with the
    /// config's vCPUs and memory) that others use to pause, resume and query the VM.
    pub fn run_controlled(
        config: VmConfig,
        control: Arc<VmControl>,
    ) -> Result<VmOutcome, VmmError> {
        let built = Self::build(&config, None)?;
        Self::run_built(&config, built, &control, None, None)
    }

    /// Waits for a live migration on `from` (`tcp:HOST:PORT` or `unix:PATH`), receives the
    /// VM, and runs it once the source lets go; `make_control` gets the VM's vCPUs and memory
    /// as soon as they are known (to start the per-VM API on its control).
    pub fn run_incoming(
        from: &crate::migration::MigrationAddress,
        options: RestoreOptions,
        make_control: impl FnOnce(usize, u64) -> Result<Arc<VmControl>, VmmError>,
    ) -> Result<VmOutcome, VmmError> {
        crate::migration::run_incoming(from, options, make_control)
    }

    /// Reads and checks a snapshot directory (docs/snapshot.md) for [`Vm::run_restored`].
    pub fn prepare_restore(dir: &std::path::Path) -> Result<PreparedRestore, VmmError> {
        Ok(PreparedRestore(crate::snapshot::read_snapshot(dir)?))
    }

    /// Builds the VM a snapshot describes, puts its state back and runs it from where it
    /// was. `control` comes from [`VmControl::new`] with the snapshot's vCPUs and memory.
    pub fn run_restored(
        prepared: PreparedRestore,
        options: RestoreOptions,
        control: Arc<VmControl>,
    ) -> Result<VmOutcome, VmmError> {
        let restored = prepared.0;
        Self::run_restored_gated(restored, options, control, None)
    }

    /// [`Vm::run_restored`] with a gate deciding when the vCPUs run.
    pub(crate) fn run_restored_gated(
        restored: Restored,
        options: RestoreOptions,
        control: Arc<VmControl>,
        mut gate: Option<Box<dyn StartGate>>,
    ) -> Result<VmOutcome, VmmError> {
        let m = &restored.machine;
        let mut config = VmConfig::new(crate::config::KernelImage::Bytes {
            name: format!("snapshot {}", restored.dir.display()),
            data: &[],
        });
        config.cpus = m.vcpus;
        config.memory = m.memory;
        config.debug_exit = m.debug_exit;
        config.boot_timer = m.boot_timer;
        config.virtio_transport =
            if m.mmio_transport { VirtioTransport::Mmio } else { VirtioTransport::Pci };
        config.serial = options.serial;
        config.serial_max_bytes = options.serial_max_bytes;
        config.interactive_console = options.interactive_console;
        config.ready_fd = options.ready_fd;
        let devices = crate::snapshot::VirtioDesc::apply(&m.virtio, &mut config)
            .map_err(|e| restore_err(format!("the snapshot's virtio devices: {e}")))
            .and_then(|()| {
                for (i, device) in m.virtio.iter().enumerate() {
                    device.check_here(i)?;
                }
                Ok(())
            });
        let built = match devices.and_then(|()| Self::build(&config, Some(&restored))) {
            Ok(built) => built,
            Err(e) => {
                if let Some(gate) = gate.as_mut() {
                    gate.abort(&e.to_string());
                }
                return Err(e);
            }
        };
        Self::run_built(&config, built, &control, Some(restored.vcpus), gate)
    }

    /// Creates the VM, its memory, devices and boot state, without any vCPU; for a restore,
    /// with the snapshot's memory and device state instead of a freshly loaded guest.
    pub(crate) fn build(
        config: &VmConfig,
        restored: Option<&Restored>,
    ) -> Result<BuiltVm, VmmError> {
        let kvm = open_kvm()?;
        if restored.is_some() {
            crate::snapshot::check_host(&kvm)?;
        }
        let max_cpus = kvm.get_max_vcpus().min(254);
        if config.cpus == 0 || usize::from(config.cpus) > max_cpus {
            return Err(VmmError::InvalidCpuCount {
                cpus: u32::from(config.cpus),
                max: u32::try_from(max_cpus).unwrap_or(254),
            });
        }
        let vm = Arc::new(kvm.create_vm().map_err(kvm_call("create VM"))?);
        // Memory goes in before the irqchip and PIT exist: after that, every memslot change
        // waits for an SRCU grace period (measured here: 4.5 ms instead of 0.09 ms), which
        // would dominate boot time.
        // A vhost-user backend maps guest memory itself: it must be shared, with descriptors.
        let shared = config.shared_memory || config.disks.iter().any(|d| d.vhost_user.is_some());
        let (mem, backing) = match restored {
            Some(Restored { memory: Some(mem), .. }) => (mem.clone(), None),
            Some(restored) => {
                let (mem, backing) = crate::snapshot::map_memory(restored)?;
                (mem, Some(backing))
            }
            None => (memory::create_guest_memory(config.memory, config.hugepages, shared)?, None),
        };
        let mem = Arc::new(mem);
        memory::register_memory(&vm, &mem)?;
        vm.set_identity_map_address(KVM_IDENTITY_MAP_START)
            .map_err(kvm_call("set identity map address"))?;
        vm.set_tss_address(usize::try_from(KVM_TSS_START).unwrap_or(usize::MAX))
            .map_err(kvm_call("set TSS address"))?;
        vm.create_irq_chip().map_err(kvm_call("create irqchip"))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        vm.create_pit2(pit).map_err(kvm_call("create PIT"))?;
        let router = Arc::new(crate::irq::GsiRouter::new(vm.clone())?);
        if let Some(restored) = restored {
            crate::snapshot::restore_kvm_vm(&vm, &restored.kvm_vm)?;
        }
        let virtio_devices = config.disks.len()
            + config.nets.len()
            + usize::from(config.rng)
            + usize::from(config.vsock.is_some())
            + usize::from(config.balloon.is_some());

        // Kernel, initrd, command line, boot structures: in a restored VM's memory already.
        let transport = config.virtio_transport;
        let max_devices = match transport {
            VirtioTransport::Mmio => VIRTIO_MMIO_MAX_DEVICES,
            // Slot 0 is the host bridge.
            VirtioTransport::Pci => pci::root::SLOTS - 1,
        };
        if virtio_devices > max_devices {
            return Err(VmmError::TooManyDevices { count: virtio_devices, max: max_devices });
        }
        let virtio_info = match transport {
            VirtioTransport::Mmio => mmio_windows(virtio_devices),
            VirtioTransport::Pci => Vec::new(),
        };
        let boot = match restored {
            Some(_) => {
                BootState { regs: Default::default(), mode: arch::boot::EntryMode::Linux64, cr3: 0 }
            }
            None => Self::load_guest(config, &mem, &virtio_info)?,
        };

        // virtio devices, in the order the guest numbers them: disks, nets, entropy, vsock,
        // balloon.
        let mut virtio: Vec<Box<dyn virtio_devices::VirtioDevice>> = Vec::new();
        for disk in &config.disks {
            if let Some(socket) = &disk.vhost_user {
                let device = virtio_devices::vhost_user_blk::VhostUserBlk::connect(socket)?;
                virtio.push(Box::new(device));
                continue;
            }
            let mut block =
                virtio_devices::block::Block::open(&disk.path, disk.read_only, &disk.serial)?;
            if let Some(limit) = &disk.rate_limit {
                block = block.with_rate_limit(limit)?;
            }
            if disk.direct {
                block = block.with_direct_io()?;
            }
            virtio.push(Box::new(block));
        }
        for (index, net) in config.nets.iter().enumerate() {
            let mac = net.mac.unwrap_or_else(|| crate::config::NetConfig::default_mac(index));
            let handed = restored.and_then(|r| r.handed_taps.get(index));
            let mut device = match handed {
                Some(tap) => {
                    let tap = tap.try_clone().map_err(|source| VmmError::Device {
                        what: "the handed-over TAP",
                        source,
                    })?;
                    virtio_devices::net::Net::from_handed_tap(tap, &net.tap, mac)?
                }
                None => virtio_devices::net::Net::open(&net.tap, mac)?,
            };
            if let Some(limit) = &net.rate_limit {
                device = device.with_rate_limit(limit)?;
            }
            virtio.push(Box::new(device));
        }
        if config.rng {
            virtio.push(Box::new(virtio_devices::rng::Rng::default()));
        }
        if let Some(vsock) = &config.vsock {
            // The device removes its socket file when the VM ends.
            virtio.push(Box::new(virtio_devices::vsock::Vsock::new(vsock.cid, &vsock.socket)?));
        }
        if let Some(balloon) = &config.balloon {
            let device =
                virtio_devices::balloon::Balloon::new(balloon.target, balloon.deflate_on_oom)
                    .map_err(|source| VmmError::Device { what: "virtio-balloon", source })?;
            virtio.push(Box::new(device));
        }
        // Devices.
        let serial_evt = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|source| VmmError::Device { what: "serial interrupt", source })?;
        vm.register_irqfd(&serial_evt, COM1_IRQ).map_err(kvm_call("register serial irqfd"))?;
        let serial_irq = Arc::new(EventFdIrq(serial_evt));
        let serial_out = serial_writer(&config.serial, config.serial_max_bytes)?;
        let serial = Arc::new(Mutex::new(match restored {
            Some(r) => SerialPort::from_state(serial_irq, serial_out, &r.devices.serial)
                .map_err(|e| restore_err(format!("the serial port's state: {e}")))?,
            None => SerialPort::new(serial_irq, serial_out),
        }));
        let mut pio = Bus::new();
        let bus_err = |what| {
            move |e: devices::BusError| VmmError::Device { what, source: std::io::Error::other(e) }
        };
        pio.insert(serial.clone(), u64::from(COM1_PORT), 8).map_err(bus_err("serial"))?;
        let i8042 = Arc::new(Mutex::new(match restored {
            Some(r) => I8042::from_state(r.devices.i8042.0, r.devices.i8042.1, r.devices.i8042.2),
            None => I8042::new(),
        }));
        // One device over 0x60..=0x64 so it sees the command port at offset 4; KVM serves
        // port 0x61 (the PIT speaker port) in the kernel, so it never reaches this device.
        let i8042_len = u64::from(I8042_COMMAND_PORT - I8042_DATA_PORT) + 1;
        pio.insert(i8042.clone(), u64::from(I8042_DATA_PORT), i8042_len)
            .map_err(bus_err("i8042"))?;
        let mut pm = AcpiPm::new(SLP_TYP_S5, Arc::new(LineIrq { vm: vm.clone(), gsi: SCI_IRQ }));
        if let Some(r) = restored {
            pm.restore(r.devices.acpi_pm);
        }
        let power = Arc::new(Mutex::new(pm));
        pio.insert(power.clone(), u64::from(PM1A_EVT_PORT), 6).map_err(bus_err("ACPI PM"))?;
        if config.debug_exit {
            pio.insert(Arc::new(Mutex::new(DebugExit)), u64::from(DEBUG_EXIT_PORT), 4)
                .map_err(bus_err("debug exit"))?;
        }
        if config.boot_timer {
            let report = Box::new(|elapsed: Duration| {
                let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
                // SAFETY: clock_gettime writes only into the timespec we pass.
                unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
                // One write, so the line arrives whole for whoever parses it.
                let line = format!(
                    "vanguard: boot timer: guest reached its payload {:.3} ms after start (monotonic {}.{:09})\n",
                    elapsed.as_secs_f64() * 1e3,
                    now.tv_sec,
                    now.tv_nsec
                );
                let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
            });
            pio.insert(
                Arc::new(Mutex::new(BootTimer::new(config.start_time, report))),
                u64::from(BOOT_TIMER_PORT),
                1,
            )
            .map_err(bus_err("boot timer"))?;
        }
        let mut mmio = Bus::new();
        let mut pci_handles = None;
        let mut transports: Vec<Arc<Mutex<dyn virtio_devices::state::TransportState>>> = Vec::new();
        if transport == VirtioTransport::Pci {
            let (root, functions) = build_pci(&vm, &mem, &router, std::mem::take(&mut virtio))?;
            let root = Arc::new(root);
            transports.extend(
                functions
                    .into_iter()
                    .map(|f| f as Arc<Mutex<dyn virtio_devices::state::TransportState>>),
            );
            let config_io = Arc::new(Mutex::new(pci::root::ConfigIo::new(root.clone())));
            if let Some((address, functions)) = restored.and_then(|r| r.devices.pci.as_ref()) {
                devices::bus::lock(&config_io).set_address(*address);
                root.restore_config(functions)
                    .map_err(|e| restore_err(format!("PCI configuration: {e}")))?;
            }
            pci_handles = Some((root.clone(), config_io.clone()));
            pio.insert(config_io, u64::from(PCI_CONFIG_PORT), u64::from(PCI_CONFIG_PORT_LEN))
                .map_err(bus_err("PCI configuration ports"))?;
            mmio.insert(
                Arc::new(Mutex::new(pci::root::ConfigMmio(root.clone()))),
                PCI_ECAM_START,
                PCI_ECAM_SIZE,
            )
            .map_err(bus_err("PCI ECAM"))?;
            mmio.insert(
                Arc::new(Mutex::new(pci::root::BarWindow::new(root, PCI_MMIO_START))),
                PCI_MMIO_START,
                PCI_MMIO_SIZE,
            )
            .map_err(bus_err("PCI BAR window"))?;
        }
        let pio = Arc::new(pio);
        for (device, info) in virtio.into_iter().zip(&virtio_info) {
            let evt = EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|source| VmmError::Device { what: "virtio interrupt", source })?;
            vm.register_irqfd(&evt, info.gsi).map_err(kvm_call("register virtio irqfd"))?;
            let transport = virtio_devices::mmio::MmioTransport::new(
                device,
                (*mem).clone(),
                Arc::new(EventFdIrq(evt)),
            )
            .with_notifier(Arc::new(IoEventRegistrar(vm.clone())), u64::from(info.base));
            let transport = Arc::new(Mutex::new(transport));
            mmio.insert(transport.clone(), u64::from(info.base), u64::from(info.len))
                .map_err(bus_err("virtio-mmio"))?;
            transports.push(transport);
        }
        // Guest pages the devices write, for migration and incremental snapshots.
        let device_dirty = Arc::new(virtio_devices::state::DirtyPages::new(&mem));
        for t in &transports {
            devices::bus::lock(t).set_dirty_log(device_dirty.clone());
        }
        if let Some(restored) = restored {
            if restored.devices.virtio.len() != transports.len() {
                return Err(restore_err(format!(
                    "the snapshot has state for {} virtio devices, the VM {}",
                    restored.devices.virtio.len(),
                    transports.len()
                )));
            }
            for (i, (t, state)) in transports.iter().zip(&restored.devices.virtio).enumerate() {
                devices::bus::lock(t)
                    .restore(state)
                    .map_err(|e| restore_err(format!("virtio device {i}: {e}")))?;
            }
        }
        let (virtio_desc, unsupported) = match crate::snapshot::VirtioDesc::from_config(config) {
            Ok(list) => (list, None),
            Err(why) => (Vec::new(), Some(why)),
        };
        let mmio = Arc::new(mmio);
        // Stdin is the console's input when its output goes somewhere (a terminal, or a file
        // with stdin a pipe or the daemon's FIFO).
        let serial_for_snapshot = serial.clone();
        if config.serial != SerialOutput::None {
            crate::console::spawn_stdin_reader(serial, config.interactive_console)
                .map_err(|source| VmmError::Thread { name: "serial-in".into(), source })?;
        }

        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_call("get supported CPUID"))?;
        let desc = match restored {
            Some(r) => MachineDesc { virtio: virtio_desc, ..r.machine.clone() },
            None => MachineDesc {
                vcpus: config.cpus,
                memory: config.memory,
                mmio_transport: transport == VirtioTransport::Mmio,
                debug_exit: config.debug_exit,
                boot_timer: config.boot_timer,
                vm_id: crate::snapshot::new_vm_id(),
                generation: 0,
                ranges: {
                    let mut offset = 0;
                    mem.iter()
                        .map(|region| {
                            let r = RamRange {
                                guest: region.start_addr().raw_value(),
                                len: region.len(),
                                file_offset: offset,
                            };
                            offset += region.len();
                            r
                        })
                        .collect()
                },
                memory_file_len: mem.iter().map(|r| r.len()).sum(),
                virtio: virtio_desc,
            },
        };
        let msr_indices = kvm
            .get_msr_index_list()
            .map_err(kvm_call("get the MSR index list"))?
            .as_slice()
            .to_vec();
        let machine = Arc::new(Machine {
            vm: vm.clone(),
            mem: mem.clone(),
            msr_indices,
            serial: serial_for_snapshot,
            i8042,
            power,
            pci: pci_handles,
            transports,
            device_dirty,
            unsupported,
            desc,
            backing,
            tracking: Default::default(),
            cpuid0: Default::default(),
        });
        Ok(BuiltVm { vm, mem, pio, mmio, boot, cpuid, machine })
    }

    /// Loads the kernel, initrd and command line, and writes the ACPI tables and boot
    /// structures into guest memory; returns the boot vCPU's entry state.
    fn load_guest(
        config: &VmConfig,
        mem: &vm_memory::GuestMemoryMmap,
        virtio_info: &[arch::acpi::VirtioMmioInfo],
    ) -> Result<BootState, VmmError> {
        let loaded = kernel::load_kernel(mem, &config.kernel, config.memory)?;
        let header = loaded.result.setup_header;
        let mut cmdline = config.cmdline.clone();
        for info in virtio_info {
            // For kernels that read it from the command line as well as from ACPI.
            cmdline.push_str(&format!(
                " virtio_mmio.device={}K@{:#x}:{}",
                VIRTIO_MMIO_STRIDE >> 10,
                info.base,
                info.gsi
            ));
        }
        let transport = config.virtio_transport;
        let cmdline_size =
            kernel::load_cmdline(mem, cmdline.trim_start(), header.map(|h| h.cmdline_size))?;
        let initrd = match &config.initrd {
            Some(path) => Some(kernel::load_initrd(
                mem,
                path,
                loaded.result.kernel_end,
                config.memory,
                header.map(|h| h.initrd_addr_max),
            )?),
            None => None,
        };
        let rsdp = arch::acpi::create_acpi_tables(mem, &{
            let mut acpi = arch::acpi::AcpiConfig::new(config.cpus);
            acpi.virtio_mmio = virtio_info.to_vec();
            acpi.pci = transport == VirtioTransport::Pci;
            acpi
        })
        .map_err(VmmError::Acpi)?;
        arch::boot::write_boot_gdt(mem)?;
        let cr3 = arch::boot::write_identity_page_tables(mem)?;
        Ok(if loaded.pvh {
            let info = arch::boot::write_pvh_start_info(mem, config.memory, initrd, Some(rsdp))?;
            let mode = arch::boot::EntryMode::Pvh;
            BootState { regs: arch::boot::boot_regs(mode, loaded.entry, info.0), mode, cr3 }
        } else {
            arch::boot::write_zero_page(
                mem,
                config.memory,
                header,
                cmdline_size,
                initrd,
                Some(rsdp),
            )?;
            let mode = arch::boot::EntryMode::Linux64;
            BootState {
                regs: arch::boot::boot_regs(mode, loaded.entry, ZERO_PAGE_START),
                mode,
                cr3,
            }
        })
    }

    fn run_built(
        config: &VmConfig,
        built: BuiltVm,
        control: &Arc<VmControl>,
        saved_vcpus: Option<Vec<crate::snapshot::VcpuState>>,
        mut gate: Option<Box<dyn StartGate>>,
    ) -> Result<VmOutcome, VmmError> {
        let BuiltVm { vm, mem, pio, mmio, boot, cpuid, machine } = built;
        let power = machine.power.clone();
        let saved = saved_vcpus.map(Arc::new);
        // vCPUs, each configured and run on its own thread.
        install_kick_handler();
        // Before any vCPU runs: a SIGTERM that arrives once the guest is up must press the
        // power button, not end the process with the default action.
        install_sigterm_handler();
        let stop = control.stop_flag();
        let (tx, rx) = mpsc::channel();
        let mut threads = Vec::with_capacity(usize::from(config.cpus));
        let boot = Arc::new(boot);
        // Each vCPU reports its configuration, then waits for the verdict: run or not.
        let (configured_tx, configured_rx) = mpsc::channel::<Result<(), VmmError>>();
        let verdict = Arc::new((Mutex::new(None::<bool>), std::sync::Condvar::new()));
        for cpu in 0..config.cpus {
            let vcpu = vm.create_vcpu(u64::from(cpu)).map_err(kvm_call("create vCPU"))?;
            let runner = VcpuRunner {
                cpu,
                vcpu,
                pio: pio.clone(),
                mmio: mmio.clone(),
                mem: mem.clone(),
                stop: stop.clone(),
                control: control.clone(),
                counters: control.counters(usize::from(cpu)),
                report: tx.clone(),
            };
            let cpuid = cpuid.clone();
            let num_cpus = config.cpus;
            let boot = boot.clone();
            let configured = configured_tx.clone();
            let verdict = verdict.clone();
            let saved = saved.clone();
            let cpuid0 = (cpu == 0).then(|| machine.cpuid0.clone());
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{cpu}"))
                .spawn(move || {
                    let result = match saved.as_ref().and_then(|s| s.get(usize::from(cpu))) {
                        Some(state) => {
                            let mut fresh = cpuid;
                            arch::cpuid::configure_cpuid(
                                &mut fresh,
                                &arch::cpuid::CpuTopology { cpu_index: cpu, num_cpus },
                            )
                            .map_err(VmmError::Cpuid)
                            .and_then(|()| {
                                crate::snapshot::restore_vcpu(&runner.vcpu, cpu, state, &fresh)
                                    .map_err(VmmError::from)
                            })
                        }
                        None => {
                            let boot_state = (cpu == 0).then_some(&*boot);
                            vcpu::configure(&runner.vcpu, cpu, cpuid, num_cpus, boot_state)
                        }
                    };
                    // No vCPU runs before all are configured: a guest's INIT/SIPI must not
                    // reach a vCPU whose LAPIC is about to be overwritten.
                    let ok = result.is_ok();
                    // What vCPU 0 shows the guest, for a migration's hello.
                    if let (true, Some(slot)) = (ok, &cpuid0) {
                        if let Ok(cpuid) = runner.vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES) {
                            *devices::bus::lock(slot) = Some(cpuid.as_slice().to_vec());
                        }
                    }
                    let _ = configured.send(result);
                    let (lock, changed) = &*verdict;
                    let mut go = devices::bus::lock(lock);
                    while go.is_none() {
                        go = changed.wait(go).unwrap_or_else(std::sync::PoisonError::into_inner);
                    }
                    if *go == Some(true) && ok {
                        drop(go);
                        runner.run();
                    }
                })
                .map_err(|source| VmmError::Thread { name: format!("vcpu{cpu}"), source })?;
            threads.push(handle);
        }
        drop(tx);
        drop(configured_tx);
        let mut failure = None;
        for _ in 0..config.cpus {
            match configured_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    failure.get_or_insert(e);
                }
                Err(_) => {
                    failure.get_or_insert(VmmError::MissingCapability("a configured vCPU"));
                }
            }
        }
        let decision = match (failure, gate.as_mut()) {
            (Some(e), gate) => {
                if let Some(gate) = gate {
                    gate.abort(&e.to_string());
                }
                Err(e)
            }
            (None, Some(gate)) => gate.open(),
            (None, None) => Ok(()),
        };
        if decision.is_ok() {
            // A restored VM's devices run from here (a migration's only after the go).
            machine.resume_devices();
        }
        {
            let (lock, changed) = &*verdict;
            *devices::bus::lock(lock) = Some(decision.is_ok());
            changed.notify_all();
        }
        if let Err(e) = decision {
            for handle in threads {
                let _ = handle.join();
            }
            return Err(e);
        }
        control.running(threads.iter().map(|t| t.as_pthread_t()).collect(), machine);
        if let Some(fd) = config.ready_fd {
            signal_ready(fd);
        }
        trim_startup_pages();

        // The first report decides the outcome; then every vCPU is stopped. Meanwhile a
        // SIGTERM presses the power button, as a host shutting down would.
        let first = loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if SIGTERM_RECEIVED.swap(false, Ordering::AcqRel) {
                        devices::bus::lock(&power).press_power_button();
                    }
                    if crate::console::QUIT_REQUESTED.load(Ordering::Acquire) {
                        break Ok(VcpuReport::Outcome(VmOutcome::ConsoleQuit));
                    }
                    if control.moved() {
                        break Ok(VcpuReport::Outcome(VmOutcome::Migrated));
                    }
                }
                Ok(report) => break Ok(report),
                Err(mpsc::RecvTimeoutError::Disconnected) => break Err(()),
            }
        };
        stop.store(true, Ordering::Release);
        // Parked vCPUs wake and see `stop`; a pause in progress gives up. After this nobody
        // else signals the threads, so they can be joined.
        control.stopping();
        for handle in &threads {
            while !handle.is_finished() {
                // SAFETY: the thread is alive (not finished) and its pthread_t valid until
                // joined below; the signal has an installed no-op handler.
                unsafe { libc::pthread_kill(handle.as_pthread_t(), kick_signal()) };
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        for handle in threads {
            let _ = handle.join();
        }
        match first {
            Ok(VcpuReport::Outcome(outcome)) => Ok(outcome),
            Ok(VcpuReport::Failed(e)) => Err(e),
            Err(_) => Err(VmmError::MissingCapability("a running vCPU")),
        }
    }
}
