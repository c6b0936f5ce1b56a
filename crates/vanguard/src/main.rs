//! `vanguard`: the command-line entry point of the Vanguard virtualization platform.

mod bench;
mod bench_api;
mod bench_net;
mod bench_snapshot;
mod manage;
mod size;
mod vmm_api;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;
use vmm::{KernelImage, SerialOutput, Vm, VmConfig, VmOutcome};

/// The test guest, built from guest/ by build.rs.
pub(crate) static DEFAULT_GUEST: &[u8] = include_bytes!(env!("VANGUARD_GUEST_PATH"));
/// What the default guest does when no command line is given: a banner, a short self-check.
const DEFAULT_GUEST_CMDLINE: &str = "console=ttyS0 hello smp mem=8M";

#[derive(Parser)]
#[command(name = "vanguard", version, about = "Vanguard: an open virtualization platform")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one VM in the foreground until the guest powers off (also `vanguard vmm`).
    #[command(visible_alias = "vmm")]
    Run(RunArgs),
    /// Measure boot time, memory overhead and exit cost (see docs/performance.md).
    #[command(subcommand)]
    Bench(bench::Bench),
    /// Serve a Vanguard device model to another VMM over a vhost-user socket (docs/virtio.md).
    #[command(subcommand)]
    VhostUser(VhostUserCommand),
    /// Run the host daemon: the REST API (docs/api.md), state, VMs supervised.
    Serve(manage::ServeArgs),
    /// Manage VMs through the daemon.
    Vm {
        #[command(subcommand)]
        command: manage::VmCommand,
        #[command(flatten)]
        client: manage::ClientArgs,
    },
    /// API tokens for the daemon's TCP listeners.
    Token {
        #[command(subcommand)]
        command: manage::TokenCommand,
        #[command(flatten)]
        client: manage::ClientArgs,
    },
    /// The host, as the daemon sees it.
    Host {
        #[command(subcommand)]
        command: manage::HostCommand,
        #[command(flatten)]
        client: manage::ClientArgs,
    },
}

#[derive(Subcommand)]
enum VhostUserCommand {
    /// A virtio-blk disk on a raw image (vhost-user-blk); serves one frontend, then exits.
    Blk(VhostUserBlkArgs),
    /// A virtio-net card on a TAP device (vhost-user-net); serves one frontend, then exits.
    Net(VhostUserNetArgs),
}

#[derive(clap::Args)]
struct VhostUserNetArgs {
    /// The Unix socket to listen on; a stale socket there is replaced, anything else refused.
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// The TAP device; created (for as long as the backend runs) if no interface has that
    /// name, which needs CAP_NET_ADMIN.
    #[arg(long, value_name = "NAME", value_parser = parse_tap_name)]
    tap: String,
}

fn parse_tap_name(s: &str) -> Result<String, String> {
    vmm::validate_tap_name(s).map_err(|e| e.to_string())?;
    Ok(s.to_string())
}

#[derive(clap::Args)]
struct VhostUserBlkArgs {
    /// The Unix socket to listen on; a stale socket there is replaced, anything else refused.
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// The raw disk image.
    #[arg(long, value_name = "FILE")]
    image: PathBuf,
    /// Open the image read-only: the driver sees a read-only disk and writes fail.
    #[arg(long)]
    readonly: bool,
    /// What the guest reads as the disk's ID (up to 20 bytes).
    #[arg(long, value_name = "ID", default_value = "", value_parser = parse_disk_serial)]
    serial: String,
    /// Open the image with O_DIRECT (no host page cache).
    #[arg(long)]
    direct: bool,
    /// Queues offered (the frontend may use fewer).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    queues: u16,
}

fn parse_disk_serial(s: &str) -> Result<String, String> {
    if s.len() > 20 {
        return Err("longer than 20 bytes".to_string());
    }
    Ok(s.to_string())
}

#[derive(clap::Args)]
struct RunArgs {
    /// Kernel to boot (bzImage or ELF vmlinux); default: the built-in test guest.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long)]
    cmdline: Option<String>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=254))]
    cpus: u8,
    /// Guest memory: a number with K, M, G or T (a bare number is MiB).
    #[arg(long, default_value = "128M", value_parser = size::parse_size)]
    memory: u64,
    /// Where the serial console goes: stdio, file:PATH or none.
    #[arg(long, default_value = "stdio", value_parser = parse_serial)]
    serial: SerialOutput,
    /// Back guest memory with hugetlbfs pages (reserve them first in /proc/sys/vm/nr_hugepages).
    #[arg(long)]
    hugepages: bool,
    /// Guest RAM in memfds, so that a live migration over a Unix socket to another VMM on
    /// this host (an upgrade of the VMM binary) hands the memory over instead of copying it.
    /// Without shmem transparent huge pages on the host, the guest's first touch of each
    /// page costs a little more.
    #[arg(long)]
    memory_shared: bool,
    /// Attach the debug-exit port (0xf4): a guest write of N ends the VM with exit status N.
    #[arg(long)]
    debug_exit: bool,
    /// Attach the boot-timer port (0x440) and report when the guest writes to it.
    #[arg(long)]
    boot_timer: bool,
    /// Attach a virtio-rng entropy device (fed by the host's getrandom).
    #[arg(long)]
    rng: bool,
    /// How virtio devices are attached: pci (virtio-pci on a PCI host bridge, with MSI-X) or
    /// mmio (virtio-mmio windows, at most 8 devices).
    #[arg(long, value_enum, default_value_t = Transport::Pci)]
    virtio_transport: Transport,
    /// Attach a virtio-blk disk: path=FILE[,readonly=on|off][,direct=on|off][,serial=ID]
    /// [,bandwidth=SIZE[/PERIOD]][,bandwidth_burst=SIZE][,ops=N[/PERIOD]][,ops_burst=N];
    /// direct=on opens the image with O_DIRECT (no host page cache; the file system must
    /// support it and the image be whole 512-byte sectors). Or vhost-user=SOCKET alone: an
    /// external vhost-user-blk backend (`vanguard vhost-user blk`, qemu-storage-daemon, ...)
    /// serves the disk, and guest memory is shared with it. Repeat for more disks (the guest
    /// numbers them in this order).
    #[arg(long, value_parser = parse_disk)]
    disk: Vec<vmm::DiskConfig>,
    /// Attach a virtio-net device on a TAP: tap=NAME[,mac=52:54:00:XX:XX:XX]
    /// [,bandwidth=SIZE[/PERIOD]][,bandwidth_burst=SIZE][,ops=N[/PERIOD]][,ops_burst=N]; the
    /// TAP is created (and removed at exit) if no interface has that name, which needs
    /// CAP_NET_ADMIN; limits hold in each direction, a frame being one op. The default MAC is
    /// 52:54:00:12:34:56 for the first --net, :57 for the second, ... Repeat for more
    /// devices (numbered after the disks).
    #[arg(long, value_parser = parse_net)]
    net: Vec<vmm::NetConfig>,
    /// Attach a virtio-balloon device: [size=SIZE][,deflate_on_oom=on|off] (size: the memory
    /// the guest is asked to give back at start, default 0). Numbered after every other
    /// virtio device.
    #[arg(long, value_parser = parse_balloon, num_args = 0..=1, default_missing_value = "")]
    balloon: Option<vmm::BalloonConfig>,
    /// Attach a virtio-vsock device: cid=N,socket=PATH (N: the guest's CID, 3 or more). The
    /// VMM listens on the Unix socket PATH: a host program connects and writes
    /// `CONNECT <port>\n` to reach a guest port (answered `OK <host port>\n`); the guest's
    /// connections to host port P go to the socket PATH_P. Numbered after the entropy device.
    #[arg(long, value_parser = parse_vsock)]
    vsock: Option<vmm::VsockConfig>,
    /// Serve the per-VM API on the Unix socket PATH (mode 0600): GET /v1/vm, PUT
    /// /v1/vm/pause|resume|shutdown, GET /metrics (docs/api.md).
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// For supervisors (the daemon): an inherited descriptor to write one byte to, and close,
    /// once every vCPU runs.
    #[arg(long, hide = true, value_name = "FD")]
    ready_fd: Option<i32>,
    /// With --serial file:PATH: keep at most about SIZE in PATH (older output moves to
    /// PATH.1, replacing it), e.g. 1M.
    #[arg(long, value_name = "SIZE", value_parser = size::parse_size)]
    serial_max: Option<u64>,
    /// Restore the VM of a snapshot directory (PUT /v1/vm/snapshot of the per-VM API,
    /// docs/snapshot.md) and run it from where it was; the machine comes from the snapshot,
    /// so the options that describe one are refused.
    #[arg(long, value_name = "DIR", conflicts_with_all = [
        "kernel", "initrd", "cmdline", "cpus", "memory", "hugepages", "memory_shared", "debug_exit", "boot_timer",
        "rng", "virtio_transport", "disk", "net", "balloon", "vsock",
    ])]
    restore: Option<PathBuf>,
    /// Receive a VM by live migration: listen on tcp:HOST:PORT or unix:PATH for one source
    /// VMM (PUT /v1/vm/migrate on its per-VM API), then run the VM once the source lets go.
    /// The machine comes from the source, so the options that describe one are refused.
    #[arg(long, value_name = "ADDRESS", conflicts_with_all = [
        "kernel", "initrd", "cmdline", "cpus", "memory", "hugepages", "memory_shared", "debug_exit", "boot_timer",
        "rng", "virtio_transport", "disk", "net", "balloon", "vsock", "restore",
    ])]
    migrate_from: Option<vmm::MigrationAddress>,
}

fn parse_vsock(s: &str) -> Result<vmm::VsockConfig, String> {
    let (mut cid, mut socket) = (None, None);
    for part in s.split(',') {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| format!("invalid vsock option '{part}': expected KEY=VALUE"))?;
        match key {
            "cid" => {
                let n: u64 = value
                    .parse()
                    .map_err(|_| format!("invalid vsock cid '{value}': not a number"))?;
                vmm::validate_vsock_cid(n).map_err(|e| e.to_string())?;
                cid = Some(n);
            }
            "socket" if !value.is_empty() => socket = Some(PathBuf::from(value)),
            _ => return Err(format!("invalid vsock option '{part}': use cid= or socket=")),
        }
    }
    let cid = cid.ok_or("a vsock device needs cid=N")?;
    let socket = socket.ok_or("a vsock device needs socket=PATH")?;
    Ok(vmm::VsockConfig { cid, socket })
}

fn parse_balloon(s: &str) -> Result<vmm::BalloonConfig, String> {
    let mut config = vmm::BalloonConfig::default();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| format!("invalid balloon option '{part}': expected KEY=VALUE"))?;
        match key {
            "size" => {
                config.target =
                    crate::size::parse_size(value).map_err(|e| format!("balloon {e}"))?
            }
            "deflate_on_oom" => {
                config.deflate_on_oom = match value {
                    "on" | "true" => true,
                    "off" | "false" => false,
                    _ => return Err(format!("invalid deflate_on_oom '{value}': use on or off")),
                }
            }
            _ => {
                return Err(format!(
                    "invalid balloon option '{part}': use size= or deflate_on_oom="
                ))
            }
        }
    }
    Ok(config)
}

/// The `--virtio-transport` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Transport {
    /// virtio-pci (modern).
    Pci,
    /// virtio-mmio (version 2).
    Mmio,
}

fn parse_disk(s: &str) -> Result<vmm::DiskConfig, String> {
    let mut path = None;
    let mut read_only = false;
    let mut direct = false;
    let mut serial = String::new();
    let mut limits = Vec::new();
    let mut vhost_user = None;
    let mut local_options = Vec::new();
    for part in s.split(',') {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| format!("invalid disk option '{part}': expected KEY=VALUE"))?;
        if key != "vhost-user" {
            local_options.push(key);
        }
        match key {
            "vhost-user" if !value.is_empty() => vhost_user = Some(std::path::PathBuf::from(value)),
            "vhost-user" => return Err("vhost-user= needs the backend's socket path".into()),
            "path" if !value.is_empty() => path = Some(std::path::PathBuf::from(value)),
            "readonly" => {
                read_only = match value {
                    "on" | "true" => true,
                    "off" | "false" => false,
                    _ => return Err(format!("invalid readonly '{value}': use on or off")),
                }
            }
            "direct" => {
                direct = match value {
                    "on" | "true" => true,
                    "off" | "false" => false,
                    _ => return Err(format!("invalid direct '{value}': use on or off")),
                }
            }
            "serial" if value.len() <= 20 => serial = value.to_string(),
            "serial" => return Err(format!("serial '{value}' is longer than 20 bytes")),
            "bandwidth" | "bandwidth_burst" | "ops" | "ops_burst" => limits.push(part),
            _ => {
                return Err(format!(
                    "invalid disk option '{part}': use path=, readonly=, direct=, serial=, \
                     bandwidth=, bandwidth_burst=, ops=, ops_burst= or vhost-user="
                ))
            }
        }
    }
    if let Some(socket) = vhost_user {
        if let Some(key) = local_options.first() {
            return Err(format!(
                "vhost-user= cannot be combined with {key}=: the backend decides the image and \
                 its options"
            ));
        }
        return Ok(vmm::DiskConfig {
            path: std::path::PathBuf::new(),
            read_only: false,
            serial: String::new(),
            rate_limit: None,
            direct: false,
            vhost_user: Some(socket),
        });
    }
    let path = path.ok_or("a disk needs path=FILE or vhost-user=SOCKET")?;
    let rate_limit = if limits.is_empty() {
        None
    } else {
        let config = limits.join(",").parse::<rate_limiter::RateLimiterConfig>();
        Some(config.map_err(|e| format!("invalid disk rate limit: {e}"))?)
    };
    Ok(vmm::DiskConfig { path, read_only, serial, rate_limit, direct, vhost_user: None })
}

/// A MAC address written as six pairs of hex digits separated by colons.
fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let invalid = || format!("invalid mac '{s}': use six hex pairs, as in 52:54:00:12:34:56");
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let part = parts.next().filter(|p| p.len() == 2).ok_or_else(invalid)?;
        *byte = u8::from_str_radix(part, 16).map_err(|_| invalid())?;
    }
    if parts.next().is_some() {
        return Err(invalid());
    }
    if mac[0] & 1 != 0 {
        return Err(format!("invalid mac '{s}': a multicast address (the first byte is odd)"));
    }
    Ok(mac)
}

fn parse_net(s: &str) -> Result<vmm::NetConfig, String> {
    let mut tap = None;
    let mut mac = None;
    let mut limits = Vec::new();
    for part in s.split(',') {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| format!("invalid net option '{part}': expected KEY=VALUE"))?;
        match key {
            "tap" => {
                vmm::validate_tap_name(value).map_err(|e| e.to_string())?;
                tap = Some(value.to_string());
            }
            "mac" => mac = Some(parse_mac(value)?),
            "bandwidth" | "bandwidth_burst" | "ops" | "ops_burst" => limits.push(part),
            _ => {
                return Err(format!(
                    "invalid net option '{part}': use tap=, mac=, bandwidth=, bandwidth_burst=, \
                     ops= or ops_burst="
                ))
            }
        }
    }
    let tap = tap.ok_or("a network device needs tap=NAME")?;
    let rate_limit = if limits.is_empty() {
        None
    } else {
        let config = limits.join(",").parse::<rate_limiter::RateLimiterConfig>();
        Some(config.map_err(|e| format!("invalid net rate limit: {e}"))?)
    };
    Ok(vmm::NetConfig { tap, mac, rate_limit })
}

fn parse_serial(s: &str) -> Result<SerialOutput, String> {
    match s {
        "stdio" => Ok(SerialOutput::Stdio),
        "none" => Ok(SerialOutput::None),
        _ => match s.strip_prefix("file:") {
            Some(path) if !path.is_empty() => Ok(SerialOutput::File(path.into())),
            _ => Err(format!("invalid serial '{s}': use stdio, file:PATH or none")),
        },
    }
}

fn run(args: RunArgs, start: Instant) -> Result<VmOutcome, vmm::VmmError> {
    if let Some(from) = &args.migrate_from {
        let options = vmm::RestoreOptions {
            serial: args.serial.clone(),
            serial_max_bytes: args.serial_max,
            interactive_console: false,
            ready_fd: args.ready_fd,
        };
        let mut api = None;
        let api_socket = args.api_socket.clone();
        let result = Vm::run_incoming(from, options, |vcpus, memory| {
            let control = vmm::VmControl::new(vcpus, memory);
            if let Some(path) = &api_socket {
                api = Some(vmm_api::start(path, control.clone())?);
            }
            Ok(control)
        });
        drop(api);
        return result;
    }
    if let Some(dir) = &args.restore {
        let prepared = Vm::prepare_restore(dir)?;
        let _raw = if args.serial == SerialOutput::Stdio {
            vmm::console::RawTerminal::enable()
        } else {
            None
        };
        let options = vmm::RestoreOptions {
            serial: args.serial.clone(),
            serial_max_bytes: args.serial_max,
            interactive_console: _raw.is_some(),
            ready_fd: args.ready_fd,
        };
        let control = vmm::VmControl::new(prepared.vcpus(), prepared.memory());
        let _api = match &args.api_socket {
            Some(path) => Some(vmm_api::start(path, control.clone())?),
            None => None,
        };
        return Vm::run_restored(prepared, options, control);
    }
    let (kernel, default_cmdline) = match args.kernel {
        Some(path) => (KernelImage::Path(path), "console=ttyS0"),
        None => (
            KernelImage::Bytes { name: "built-in test guest".into(), data: DEFAULT_GUEST },
            DEFAULT_GUEST_CMDLINE,
        ),
    };
    let mut config = VmConfig::new(kernel);
    config.initrd = args.initrd;
    config.cmdline = args.cmdline.unwrap_or_else(|| default_cmdline.to_string());
    config.cpus = args.cpus;
    config.memory = args.memory;
    config.serial = args.serial;
    config.hugepages = args.hugepages;
    config.shared_memory = args.memory_shared;
    config.debug_exit = args.debug_exit;
    config.boot_timer = args.boot_timer;
    config.rng = args.rng;
    config.balloon = args.balloon;
    config.vsock = args.vsock;
    config.virtio_transport = match args.virtio_transport {
        Transport::Pci => vmm::VirtioTransport::Pci,
        Transport::Mmio => vmm::VirtioTransport::Mmio,
    };
    config.disks = args.disk;
    config.nets = args.net;
    config.ready_fd = args.ready_fd;
    config.serial_max_bytes = args.serial_max;
    config.start_time = start;
    // Raw mode only for a console on a terminal; restored when `_raw` drops.
    let _raw = if config.serial == SerialOutput::Stdio {
        vmm::console::RawTerminal::enable()
    } else {
        None
    };
    config.interactive_console = _raw.is_some();
    let control = vmm::VmControl::new(usize::from(config.cpus), config.memory);
    // Removed when the VM ends.
    let _api = match &args.api_socket {
        Some(path) => Some(vmm_api::start(path, control.clone())?),
        None => None,
    };
    Vm::run_controlled(config, control)
}

/// Prints an error and its chain of causes on one line each.
pub(crate) fn report(err: &dyn std::error::Error) {
    let mut text = format!("vanguard: error: {err}");
    let mut source = err.source();
    while let Some(cause) = source {
        // Some libraries already print their cause in their own message; say it once.
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(&format!(": {cause_text}"));
        }
        source = cause.source();
    }
    eprintln!("{text}");
}

/// `vanguard vhost-user blk`: serves one frontend; 0 when it disconnects or on SIGTERM/SIGINT.
fn vhost_user_blk(args: VhostUserBlkArgs) -> ExitCode {
    let options = vhost_user_backends::BlkOptions {
        socket: args.socket,
        image: args.image,
        read_only: args.readonly,
        serial: args.serial,
        direct: args.direct,
        queues: args.queues,
    };
    let log = |line: &str| println!("vanguard: vhost-user blk: {line}");
    vhost_user_exit(vhost_user_backends::serve_blk(&options, log), log)
}

/// `vanguard vhost-user net`: likewise.
fn vhost_user_net(args: VhostUserNetArgs) -> ExitCode {
    let options = vhost_user_backends::NetOptions { socket: args.socket, tap: args.tap };
    let log = |line: &str| println!("vanguard: vhost-user net: {line}");
    vhost_user_exit(vhost_user_backends::serve_net(&options, log), log)
}

/// A vhost-user daemon's exit status: 0 when its frontend disconnected or on SIGTERM/SIGINT.
fn vhost_user_exit(
    result: Result<vhost_user_backends::End, vhost_user_backends::Error>,
    log: fn(&str),
) -> ExitCode {
    match result {
        Ok(vhost_user_backends::End::Disconnected) => {
            log("frontend disconnected; exiting");
            ExitCode::SUCCESS
        }
        Ok(vhost_user_backends::End::Signal(_)) => ExitCode::SUCCESS,
        Err(e) => {
            report(&e);
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let start = Instant::now();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => match run(args, start) {
            Ok(VmOutcome::PowerOff) | Ok(VmOutcome::Reset) => ExitCode::SUCCESS,
            Ok(VmOutcome::DebugExit(code)) => ExitCode::from(code),
            Ok(VmOutcome::ConsoleQuit) => {
                eprintln!("\r\nvanguard: VM stopped from the console (Ctrl-A x)");
                ExitCode::SUCCESS
            }
            Ok(VmOutcome::Migrated) => {
                eprintln!("vanguard: the VM moved to another VMM (live migration) and runs there");
                ExitCode::SUCCESS
            }
            Err(e) => {
                report(&e);
                ExitCode::FAILURE
            }
        },
        Command::VhostUser(VhostUserCommand::Blk(args)) => vhost_user_blk(args),
        Command::VhostUser(VhostUserCommand::Net(args)) => vhost_user_net(args),
        Command::Serve(args) => manage::serve(args),
        Command::Vm { command, client } => manage::vm(command, client),
        Command::Host { command, client } => manage::host(command, client),
        Command::Token { command, client } => manage::token(command, client),
        Command::Bench(which) => match bench::run(which) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vanguard: error: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
