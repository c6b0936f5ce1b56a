//! The management commands: `vanguard serve` (the host daemon) and the CLI that talks to it
//! (`vanguard vm ...`, `vanguard host info`): human tables by default, `--output json` for
//! scripts, the daemon's own message on errors.

use api::client::{Client, ClientError};
use api::{HostInfo, Operation, OperationState, Vm, VmSpec};
use clap::{Args, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

/// Where the daemon listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/vanguard/vanguard.sock";
/// Where the daemon keeps its state unless told otherwise.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/vanguard";

/// `vanguard serve`.
#[derive(Args)]
pub struct ServeArgs {
    /// Where the state database and the VMs' files (console logs) live.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Where the API listens: unix:PATH (a socket only the daemon's owner may use; default
    /// unix:/run/vanguard/vanguard.sock) and any number of tcp:ADDR:PORT (TLS with
    /// --tls-cert and --tls-key, and a bearer token on every request). Repeat for more.
    #[arg(long, value_name = "unix:PATH|tcp:ADDR", value_parser = parse_listener)]
    listen: Vec<Listener>,
    /// The TLS certificate chain (PEM) of the tcp: listeners.
    #[arg(long, value_name = "PEM")]
    tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, value_name = "PEM")]
    tls_key: Option<PathBuf>,
}

/// A place the daemon listens on, or a client reaches it.
#[derive(Clone, Debug)]
pub enum Listener {
    /// A Unix socket.
    Unix(PathBuf),
    /// A TCP address (`host:port`), TLS.
    Tcp(String),
}

fn parse_listener(s: &str) -> Result<Listener, String> {
    if let Some(path) = s.strip_prefix("unix:") {
        if !path.is_empty() {
            return Ok(Listener::Unix(PathBuf::from(path)));
        }
    }
    if let Some(addr) = s.strip_prefix("tcp:") {
        if addr.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()) {
            return Ok(Listener::Tcp(addr.to_string()));
        }
        return Err(format!("invalid address '{s}': use tcp:HOST:PORT"));
    }
    Err(format!("invalid address '{s}': use unix:PATH or tcp:HOST:PORT"))
}

/// Options every client command takes.
#[derive(Args, Clone)]
pub struct ClientArgs {
    /// The daemon: unix:PATH (default unix:/run/vanguard/vanguard.sock) or tcp:HOST:PORT (TLS,
    /// with --token and --ca-cert); or $VANGUARD_REMOTE.
    #[arg(long, global = true, env = "VANGUARD_REMOTE", value_parser = parse_listener)]
    remote: Option<Listener>,
    /// The bearer token for a tcp: daemon (`vanguard token create`), or $VANGUARD_TOKEN.
    #[arg(long, global = true, env = "VANGUARD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The certificate (PEM) that signed the tcp: daemon's, or $VANGUARD_CA_CERT.
    #[arg(long, global = true, env = "VANGUARD_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// How to print results.
    #[arg(long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
}

/// How results are printed.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Tables and sentences, for people.
    Table,
    /// The API's JSON, for scripts.
    Json,
}

/// `vanguard vm ...`.
#[derive(Subcommand)]
pub enum VmCommand {
    /// Define a VM from a spec file (JSON, see docs/api.md) or from flags.
    Create(Box<CreateArgs>),
    /// List the VMs.
    List,
    /// Show one VM: spec and status.
    Show {
        /// The VM.
        name: String,
    },
    /// Start a VM (and wait until it runs, unless --no-wait).
    Start {
        /// The VM.
        name: String,
        /// Return once the operation is accepted.
        #[arg(long)]
        no_wait: bool,
    },
    /// Stop a VM: the ACPI power button, then a kill after --timeout; --force kills at once.
    Stop(StopArgs),
    /// Pause a running VM's vCPUs (its memory and devices stay).
    Pause {
        /// The VM.
        name: String,
        /// Return once the operation is accepted.
        #[arg(long)]
        no_wait: bool,
    },
    /// Resume a paused VM.
    Resume {
        /// The VM.
        name: String,
        /// Return once the operation is accepted.
        #[arg(long)]
        no_wait: bool,
    },
    /// Stop (if running), then start a VM.
    Restart(StopArgs),
    /// Remove a VM that is not running.
    Delete {
        /// The VM.
        name: String,
    },
    /// Print the serial console output of the VM's current (or last) run.
    Logs {
        /// The VM.
        name: String,
        /// Keep printing new output until the VM stops (or Ctrl-C).
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Attach to the VM's serial console: its output live, your keys to the guest (raw mode
    /// on a terminal). Ctrl-] detaches; the VM keeps running.
    Console {
        /// The VM.
        name: String,
    },
    /// Write a snapshot of a running or paused VM (kept by the daemon under the VM's name).
    Snapshot {
        /// The VM.
        name: String,
        /// The snapshot's name (letters, digits, '.', '_', '-'); an existing one is replaced.
        snapshot: String,
        /// Write only the pages written since this VMM last wrote this snapshot.
        #[arg(long)]
        incremental: bool,
        /// Return once the operation is accepted.
        #[arg(long)]
        no_wait: bool,
    },
    /// List a VM's snapshots.
    Snapshots {
        /// The VM.
        name: String,
    },
    /// Remove one of a VM's snapshots.
    DeleteSnapshot {
        /// The VM.
        name: String,
        /// The snapshot.
        snapshot: String,
    },
    /// Run a VM on from one of its snapshots (its running VMM, if any, is killed first).
    Restore {
        /// The VM.
        name: String,
        /// The snapshot.
        snapshot: String,
        /// Return once the operation is accepted.
        #[arg(long)]
        no_wait: bool,
    },
    /// Live-migrate a running VM: to a fresh VMM process on this host, or with --to to
    /// another daemon. Shows the progress on stderr while it waits.
    Migrate(MigrateArgs),
    /// Stop a VM's migration while it is still copying memory (the VM runs on here).
    CancelMigration {
        /// The VM.
        name: String,
    },
}

/// `vanguard vm migrate`.
#[derive(Args)]
pub struct MigrateArgs {
    /// The VM.
    name: String,
    /// The destination daemon: tcp:HOST:PORT (TLS; with --to-token and --to-ca-cert) or
    /// unix:PATH. Without it, a fresh VMM process on this host takes the VM over.
    #[arg(long, value_name = "ADDRESS", value_parser = parse_listener)]
    to: Option<Listener>,
    /// The bearer token of the destination daemon.
    #[arg(long, value_name = "TOKEN", requires = "to", hide_env_values = true)]
    to_token: Option<String>,
    /// The certificate (PEM) that signed the destination daemon's.
    #[arg(long, value_name = "PEM", requires = "to")]
    to_ca_cert: Option<PathBuf>,
    /// The longest the guest may stop for the final copy (default 300).
    #[arg(long, value_name = "MS")]
    max_downtime_ms: Option<u64>,
    /// Send at most this many MiB/s (default: no limit).
    #[arg(long, value_name = "MIB_S")]
    bandwidth_mib_s: Option<u64>,
    /// Do not slow down a guest that dirties memory faster than the link sends it.
    #[arg(long)]
    no_auto_converge: bool,
}

/// How to stop.
#[derive(Args)]
pub struct StopArgs {
    /// The VM.
    name: String,
    /// Kill the VMM at once.
    #[arg(long)]
    force: bool,
    /// Seconds to wait for the guest to shut down before killing it.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// Return once the operation is accepted.
    #[arg(long)]
    no_wait: bool,
}

/// `vanguard vm create`.
#[derive(Args)]
pub struct CreateArgs {
    /// A spec file: JSON, or YAML if its name ends in .yaml or .yml (docs/api.md); the flags
    /// below are then not allowed.
    #[arg(long, short = 'f', value_name = "FILE", conflicts_with_all = ["name", "cpus", "memory", "kernel", "initrd", "cmdline", "disk", "restart", "label", "cpu_quota", "cpu_weight", "memory_max"])]
    file: Option<PathBuf>,
    /// The VM's name.
    #[arg(required_unless_present = "file")]
    name: Option<String>,
    /// vCPUs.
    #[arg(long)]
    cpus: Option<u8>,
    /// Guest memory (512M, 2G; a bare number is MiB).
    #[arg(long, value_parser = crate::size::parse_size)]
    memory: Option<u64>,
    /// A kernel to boot (default: the built-in test guest).
    #[arg(long)]
    kernel: Option<String>,
    /// An initial ramdisk.
    #[arg(long)]
    initrd: Option<String>,
    /// The kernel command line.
    #[arg(long)]
    cmdline: Option<String>,
    /// A raw disk image (repeat for more).
    #[arg(long)]
    disk: Vec<String>,
    /// never, on-failure or always.
    #[arg(long)]
    restart: Option<String>,
    /// CPU quota in percent of one host CPU (50: half a CPU).
    #[arg(long, value_name = "PERCENT")]
    cpu_quota: Option<u32>,
    /// CPU weight against other VMs (1 to 10000, default 100).
    #[arg(long)]
    cpu_weight: Option<u32>,
    /// Memory limit for the whole VM process (guest RAM and VMM), e.g. 200M.
    #[arg(long, value_parser = crate::size::parse_size)]
    memory_max: Option<u64>,
    /// KEY=VALUE (repeat for more).
    #[arg(long)]
    label: Vec<String>,
    /// Start it once created.
    #[arg(long)]
    start: bool,
}

/// `vanguard token ...`.
#[derive(Subcommand)]
pub enum TokenCommand {
    /// Make a token for the daemon's TCP listeners; its secret is printed this once.
    Create {
        /// Its name.
        name: String,
    },
    /// List the tokens (names and dates).
    List,
    /// Revoke a token: requests carrying it are refused from now on.
    Revoke {
        /// Its name.
        name: String,
    },
}

/// `vanguard host ...`.
#[derive(Subcommand)]
pub enum HostCommand {
    /// The host: capacity, VMs running, hypervisor drivers.
    Info,
}

/// Runs `vanguard serve`.
pub fn serve(args: ServeArgs) -> ExitCode {
    let fail = |message: String| {
        eprintln!("vanguard: error: {message}");
        ExitCode::FAILURE
    };
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return fail(format!("cannot find the vanguard binary: {e}")),
    };
    let mut socket = None;
    let mut tcp = Vec::new();
    for listener in args.listen {
        match listener {
            Listener::Unix(path) if socket.is_none() => socket = Some(path),
            Listener::Unix(_) => return fail("one unix: listener at most".into()),
            Listener::Tcp(addr) => {
                let Ok(addr) = addr.parse::<std::net::SocketAddr>() else {
                    return fail(format!("invalid tcp: address '{addr}': use IP:PORT"));
                };
                let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
                    return fail("a tcp: listener needs --tls-cert and --tls-key".into());
                };
                tcp.push(daemon::TcpListen { addr, cert: cert.clone(), key: key.clone() });
            }
        }
    }
    let options = daemon::Options {
        data_dir: args.data_dir,
        socket: socket.unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET)),
        tcp,
        vmm_exe: exe,
    };
    let ready = |tcp: &[String]| {
        let mut line = format!("vanguard: serving the API on unix:{}", options.socket.display());
        for addr in tcp {
            line.push_str(&format!(" and tcp:{addr} (TLS, tokens)"));
        }
        println!("{line} (state in {})", options.data_dir.display());
    };
    match daemon::serve(&options, ready) {
        Ok(()) => {
            println!("vanguard: daemon stopped (the VMs keep running)");
            ExitCode::SUCCESS
        }
        Err(e) => {
            crate::report(&e);
            ExitCode::FAILURE
        }
    }
}

fn client(args: &ClientArgs) -> Result<Client, ClientError> {
    match &args.remote {
        None => Ok(Client::unix(DEFAULT_SOCKET)),
        Some(Listener::Unix(path)) => Ok(Client::unix(path)),
        Some(Listener::Tcp(addr)) => {
            let ca = args.ca_cert.as_ref().ok_or_else(|| {
                local_error(
                    "a tcp: daemon needs --ca-cert (the certificate that signed its own)".into(),
                )
            })?;
            Client::tls(addr, ca, args.token.clone())
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the client runtime: {e}"))
}

/// Runs a client command: the result printed, or the error on one line and status 1.
fn run_client<F: std::future::Future<Output = Result<(), ClientError>>>(f: F) -> ExitCode {
    let runtime = match runtime() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vanguard: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(f) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vanguard: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn print_json(value: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
}

fn age(since: Option<u64>) -> String {
    let Some(since) = since else { return "-".into() };
    let secs = api::now_secs().saturating_sub(since);
    match secs {
        0..=119 => format!("{secs}s"),
        120..=7199 => format!("{}m", secs / 60),
        _ => format!("{}h", secs / 3600),
    }
}

fn state_name(vm: &Vm) -> String {
    serde_json::to_value(vm.status.state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn print_vms(vms: &[Vm]) {
    println!(
        "{:<24} {:<9} {:>4} {:>8} {:>8} {:>7}",
        "NAME", "STATE", "CPUS", "MEMORY", "PID", "UPTIME"
    );
    for vm in vms {
        let running = vm.status.pid.is_some();
        println!(
            "{:<24} {:<9} {:>4} {:>7}M {:>8} {:>7}",
            vm.spec.name,
            state_name(vm),
            vm.spec.cpus,
            vm.spec.memory_mib,
            vm.status.pid.map_or("-".into(), |p| p.to_string()),
            if running { age(vm.status.started_at) } else { "-".into() },
        );
    }
}

fn print_vm(vm: &Vm) {
    println!("name:      {}", vm.spec.name);
    println!("state:     {}", state_name(vm));
    println!("cpus:      {}", vm.spec.cpus);
    println!("memory:    {} MiB", vm.spec.memory_mib);
    let boot = vm.spec.boot.kernel.as_deref().unwrap_or("the built-in test guest");
    println!("boot:      {boot}");
    if let Some(cmdline) = &vm.spec.boot.cmdline {
        println!("cmdline:   {cmdline}");
    }
    for (i, disk) in vm.spec.disks.iter().enumerate() {
        println!("disk{i}:     {}{}", disk.path, if disk.readonly { " (read-only)" } else { "" });
    }
    for (i, nic) in vm.spec.nics.iter().enumerate() {
        println!("nic{i}:      tap {}", nic.tap);
    }
    let limits = &vm.spec.limits;
    if let Some(quota) = limits.cpu_quota_percent {
        println!("cpu quota: {quota}% of a CPU");
    }
    if let Some(weight) = limits.cpu_weight {
        println!("cpu weight: {weight}");
    }
    if let Some(max) = limits.memory_max_mib {
        println!("memory max: {max} MiB");
    }
    if let Some(pid) = vm.status.pid {
        println!("pid:       {pid} (up {})", age(vm.status.started_at));
    }
    if let Some(exit) = &vm.status.last_exit {
        println!("last exit: {}", exit.reason);
    }
    if vm.status.restarts > 0 {
        println!("restarts:  {}", vm.status.restarts);
    }
    for (k, v) in &vm.spec.labels {
        println!("label:     {k}={v}");
    }
}

/// Follows operation `op` to its end, printing its progress; an error if it failed.
async fn follow(client: &Client, op: Operation, output: Output) -> Result<(), ClientError> {
    let mut last = String::new();
    let mut op = op;
    loop {
        if output == Output::Table
            && op.progress != last
            && op.progress != "queued"
            && op.state == OperationState::Running
        {
            eprintln!("  {}", op.progress);
            last = op.progress.clone();
        }
        if op.state != OperationState::Running {
            break;
        }
        op = client.get(&format!("/v1/operations/{}/wait?timeout=1", op.id)).await?;
    }
    if output == Output::Json {
        print_json(&op);
    }
    match op.state {
        OperationState::Failed => Err(ClientError::Api {
            status: 200,
            error: api::ApiError {
                error: format!(
                    "operation {} failed: {}",
                    op.id,
                    op.error.unwrap_or_else(|| "no reason given".into())
                ),
                field: None,
            },
        }),
        _ => {
            if output == Output::Table {
                println!("{} {}: {}", format!("{:?}", op.kind).to_lowercase(), op.vm, op.progress);
            }
            Ok(())
        }
    }
}

/// What `vm create` sends: the file's spec, or one built from the flags.
fn spec_of(args: CreateArgs) -> Result<VmSpec, String> {
    if let Some(file) = &args.file {
        let text =
            std::fs::read(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        return api::spec::parse(&text, api::SpecFormat::from_path(file))
            .map_err(|e| format!("{}: {e}", file.display()));
    }
    let mut spec: VmSpec =
        serde_json::from_value(serde_json::json!({ "name": args.name.unwrap_or_default() }))
            .map_err(|e| e.to_string())?;
    if let Some(cpus) = args.cpus {
        spec.cpus = cpus;
    }
    if let Some(memory) = args.memory {
        spec.memory_mib = memory >> 20;
    }
    spec.boot = api::Boot {
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        firmware: api::Firmware::Bios,
    };
    spec.disks = args
        .disk
        .into_iter()
        .map(|path| api::Disk { path, readonly: false, serial: None, format: api::DiskFormat::Raw })
        .collect();
    spec.limits = api::Limits {
        cpu_quota_percent: args.cpu_quota,
        cpu_weight: args.cpu_weight,
        memory_max_mib: args.memory_max.map(|m| m >> 20),
    };
    if let Some(restart) = args.restart {
        spec.restart =
            serde_json::from_value(serde_json::Value::String(restart.clone())).map_err(|_| {
                format!("invalid --restart '{restart}': use never, on-failure or always")
            })?;
    }
    for label in args.label {
        let (k, v) = label
            .split_once('=')
            .ok_or_else(|| format!("invalid --label '{label}': use KEY=VALUE"))?;
        spec.labels.insert(k.into(), v.into());
    }
    Ok(spec)
}

fn local_error(message: String) -> ClientError {
    ClientError::Api { status: 0, error: api::ApiError { error: message, field: None } }
}

/// Runs `vanguard vm ...`.
pub fn vm(command: VmCommand, args: ClientArgs) -> ExitCode {
    let output = args.output;
    run_client(async move {
        let client = client(&args)?;
        match command {
            VmCommand::Create(create) => {
                let start = create.start;
                let spec = spec_of(*create).map_err(local_error)?;
                let vm: Vm = client.post("/v1/vms", &spec).await?;
                if output == Output::Json && !start {
                    print_json(&vm);
                } else if output == Output::Table {
                    println!("created {}", vm.spec.name);
                }
                if start {
                    let op: Operation =
                        client.post(&format!("/v1/vms/{}/start", vm.spec.name), &()).await?;
                    follow(&client, op, output).await?;
                }
            }
            VmCommand::List => {
                let vms: Vec<Vm> = client.get("/v1/vms").await?;
                if output == Output::Json {
                    print_json(&vms);
                } else {
                    print_vms(&vms);
                }
            }
            VmCommand::Show { name } => {
                let vm: Vm = client.get(&format!("/v1/vms/{name}")).await?;
                if output == Output::Json {
                    print_json(&vm);
                } else {
                    print_vm(&vm);
                }
            }
            VmCommand::Start { name, no_wait } => {
                let op: Operation = client.post(&format!("/v1/vms/{name}/start"), &()).await?;
                finish(&client, op, no_wait, output).await?;
            }
            VmCommand::Pause { name, no_wait } => {
                let op: Operation = client.post(&format!("/v1/vms/{name}/pause"), &()).await?;
                finish(&client, op, no_wait, output).await?;
            }
            VmCommand::Resume { name, no_wait } => {
                let op: Operation = client.post(&format!("/v1/vms/{name}/resume"), &()).await?;
                finish(&client, op, no_wait, output).await?;
            }
            VmCommand::Stop(stop) => {
                let path = format!(
                    "/v1/vms/{}/stop?force={}&timeout={}",
                    stop.name, stop.force, stop.timeout
                );
                let op: Operation = client.post(&path, &()).await?;
                finish(&client, op, stop.no_wait, output).await?;
            }
            VmCommand::Restart(stop) => {
                let path = format!(
                    "/v1/vms/{}/restart?force={}&timeout={}",
                    stop.name, stop.force, stop.timeout
                );
                let op: Operation = client.post(&path, &()).await?;
                finish(&client, op, stop.no_wait, output).await?;
            }
            VmCommand::Delete { name } => {
                client.delete(&format!("/v1/vms/{name}")).await?;
                if output == Output::Table {
                    println!("deleted {name}");
                }
            }
            VmCommand::Logs { name, follow } => {
                use std::io::Write;
                let path = format!("/v1/vms/{name}/console?follow={follow}");
                client
                    .bytes(&path, |data| {
                        let mut out = std::io::stdout();
                        out.write_all(data).is_ok() && out.flush().is_ok()
                    })
                    .await?;
            }
            VmCommand::Console { name } => console(&client, &name).await?,
            VmCommand::Snapshot { name, snapshot, incremental, no_wait } => {
                let request = api::NewSnapshot { name: snapshot, incremental };
                let op: Operation =
                    client.post(&format!("/v1/vms/{name}/snapshots"), &request).await?;
                finish(&client, op, no_wait, output).await?;
            }
            VmCommand::Snapshots { name } => {
                let list: Vec<api::SnapshotEntry> =
                    client.get(&format!("/v1/vms/{name}/snapshots")).await?;
                if output == Output::Json {
                    print_json(&list);
                } else {
                    print_snapshots(&list);
                }
            }
            VmCommand::DeleteSnapshot { name, snapshot } => {
                client.delete(&format!("/v1/vms/{name}/snapshots/{snapshot}")).await?;
                if output == Output::Table {
                    println!("deleted snapshot {snapshot} of {name}");
                }
            }
            VmCommand::Restore { name, snapshot, no_wait } => {
                let request = api::RestoreRequest { snapshot };
                let op: Operation =
                    client.post(&format!("/v1/vms/{name}/restore"), &request).await?;
                finish(&client, op, no_wait, output).await?;
            }
            VmCommand::Migrate(args) => migrate(&client, args, output).await?,
            VmCommand::CancelMigration { name } => {
                let op: Operation =
                    client.post(&format!("/v1/vms/{name}/migration/cancel"), &()).await?;
                if output == Output::Json {
                    print_json(&op);
                } else {
                    println!("asked operation {} to stop the migration of {name}", op.id);
                }
            }
        }
        Ok(())
    })
}

fn print_snapshots(list: &[api::SnapshotEntry]) {
    println!("{:<24} {:>8} {:>10} {:>10}  STATE", "NAME", "AGE", "SIZE", "GENERATION");
    for snap in list {
        println!(
            "{:<24} {:>8} {:>9}M {:>10}  {}",
            snap.name,
            age(snap.created_at),
            snap.size_bytes >> 20,
            snap.generation.map_or("-".into(), |g| g.to_string()),
            if snap.complete { "complete" } else { "incomplete" }
        );
    }
}

/// `vanguard vm migrate`: starts the migration and follows it, a progress bar on stderr (one
/// line redrawn on a terminal, a line per change otherwise), the figures at the end.
async fn migrate(client: &Client, args: MigrateArgs, output: Output) -> Result<(), ClientError> {
    use std::io::{IsTerminal, Write};
    let vm: Vm = client.get(&format!("/v1/vms/{}", args.name)).await?;
    let ca_cert = match &args.to_ca_cert {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| local_error(format!("--to-ca-cert {}: {e}", path.display())))?,
        ),
        None => None,
    };
    let to = args.to.as_ref().map(|to| match to {
        Listener::Unix(path) => format!("unix:{}", path.display()),
        Listener::Tcp(addr) => format!("tcp:{addr}"),
    });
    let request = api::MigrateVmRequest {
        to: to.clone(),
        token: args.to_token.clone(),
        ca_cert,
        max_downtime_ms: args.max_downtime_ms,
        bandwidth_mib_s: args.bandwidth_mib_s,
        auto_converge: args.no_auto_converge.then_some(false),
    };
    let name = &args.name;
    let mut op: Operation = client.post(&format!("/v1/vms/{name}/migrate"), &request).await?;
    let total = vm.spec.memory_mib << 20;
    let terminal = std::io::stderr().is_terminal() && output == Output::Table;
    let mut last = String::new();
    while op.state == OperationState::Running {
        if output == Output::Table {
            let line = progress_line(&op, total);
            if line != last {
                if terminal {
                    eprint!("\r{line}\x1b[K");
                    let _ = std::io::stderr().flush();
                } else {
                    eprintln!("  {line}");
                }
                last = line;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        op = client.get(&format!("/v1/operations/{}", op.id)).await?;
    }
    if terminal {
        eprintln!();
    }
    if output == Output::Json {
        print_json(&op);
    }
    if op.state == OperationState::Failed {
        return Err(local_error(format!(
            "operation {} failed: {}",
            op.id,
            op.error.unwrap_or_else(|| "no reason given".into())
        )));
    }
    if output == Output::Table {
        println!("migrate {name}: {}", op.progress);
        if let Some(info) = &op.migration {
            println!(
                "total {} ms, downtime {} ms, {} bytes of memory ({} MiB) in {} passes, {} bytes of state",
                info.total_us.unwrap_or(0) / 1000,
                info.downtime_us.unwrap_or(0) / 1000,
                info.bytes_sent,
                info.bytes_sent >> 20,
                info.passes,
                info.state_bytes.unwrap_or(0)
            );
        }
    }
    Ok(())
}

/// One line of a migration's progress: a bar of the memory sent against the VM's memory
/// (`total` bytes; later passes send more), then the VMM's figures.
fn progress_line(op: &Operation, total: u64) -> String {
    let Some(info) = &op.migration else { return op.progress.clone() };
    const WIDTH: u64 = 30;
    let done = (info.bytes_sent.min(total) * WIDTH).checked_div(total).unwrap_or(WIDTH);
    let bar: String = (0..WIDTH).map(|i| if i < done { '#' } else { '-' }).collect();
    format!(
        "[{bar}] {:>3}% {} pass {}: {}/{} MiB, dirty {} MiB/s, expected downtime {} ms, throttle {}%",
        done * 100 / WIDTH,
        info.phase,
        info.passes,
        info.bytes_sent >> 20,
        total >> 20,
        info.dirty_rate_bytes_per_s >> 20,
        info.expected_downtime_us / 1000,
        info.throttle_percent
    )
}

async fn finish(
    client: &Client,
    op: Operation,
    no_wait: bool,
    output: Output,
) -> Result<(), ClientError> {
    if no_wait {
        if output == Output::Json {
            print_json(&op);
        } else {
            println!("operation {} accepted", op.id);
        }
        return Ok(());
    }
    follow(client, op, output).await
}

/// Runs `vanguard host ...`.
pub fn host(command: HostCommand, args: ClientArgs) -> ExitCode {
    let output = args.output;
    run_client(async move {
        let client = client(&args)?;
        match command {
            HostCommand::Info => {
                let host: HostInfo = client.get("/v1/host").await?;
                if output == Output::Json {
                    print_json(&host);
                    return Ok(());
                }
                println!("host:     {} (vanguard {})", host.hostname, host.version);
                println!("cpus:     {}", host.cpus);
                println!(
                    "memory:   {} MiB, {} MiB available",
                    host.memory_total_mib, host.memory_available_mib
                );
                println!(
                    "vms:      {} defined, {} running ({} vCPUs, {} MiB)",
                    host.vms_defined, host.vms_running, host.vcpus_running, host.memory_running_mib
                );
                println!("limits:   {}", host.cgroups);
                for driver in &host.drivers {
                    let state = if driver.available { "available" } else { "unavailable" };
                    println!("driver:   {} {state}: {}", driver.name, driver.detail);
                }
            }
        }
        Ok(())
    })
}

/// Runs `vanguard token ...`.
pub fn token(command: TokenCommand, args: ClientArgs) -> ExitCode {
    let output = args.output;
    run_client(async move {
        let client = client(&args)?;
        match command {
            TokenCommand::Create { name } => {
                let made: api::CreatedToken =
                    client.post("/v1/tokens", &api::NewToken { name }).await?;
                if output == Output::Json {
                    print_json(&made);
                } else {
                    println!("{}", made.token);
                    eprintln!("token '{}' created; its secret is shown this once", made.name);
                }
            }
            TokenCommand::List => {
                let tokens: Vec<api::TokenInfo> = client.get("/v1/tokens").await?;
                if output == Output::Json {
                    print_json(&tokens);
                } else {
                    println!("{:<24} CREATED", "NAME");
                    for t in tokens {
                        println!("{:<24} {} ago", t.name, age(Some(t.created_at)));
                    }
                }
            }
            TokenCommand::Revoke { name } => {
                client.delete(&format!("/v1/tokens/{name}")).await?;
                if output == Output::Table {
                    println!("revoked {name}");
                }
            }
        }
        Ok(())
    })
}

/// The key that detaches from a console: Ctrl-].
const DETACH: u8 = 0x1d;

/// `vanguard vm console NAME`: over the daemon's websocket console, output streamed to stdout,
/// stdin sent as typed, until Ctrl-] or the end of stdin (then output is shown for half a
/// second more) or the VM's end.
async fn console(client: &Client, name: &str) -> Result<(), ClientError> {
    use futures_util::{SinkExt, StreamExt};
    use std::io::{Read, Write};
    use tokio_tungstenite::tungstenite::Message;
    // Fails early, with the daemon's message, for an unknown VM.
    let vm: Vm = client.get(&format!("/v1/vms/{name}")).await?;
    if vm.status.pid.is_none() {
        return Err(local_error(format!("'{name}' is not running")));
    }
    let raw = vmm::console::RawTerminal::enable();
    if raw.is_some() {
        eprint!("[attached to {name}; Ctrl-] detaches]\r\n");
    }
    let (keys_tx, mut keys) = tokio::sync::mpsc::unbounded_channel::<Option<Vec<u8>>>();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 1024];
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let data = &buf[..n];
            if let Some(at) = data.iter().position(|&b| b == DETACH) {
                let _ = keys_tx.send(Some(data[..at].to_vec()));
                break;
            }
            if keys_tx.send(Some(data.to_vec())).is_err() {
                return;
            }
        }
        let _ = keys_tx.send(None);
    });
    // One websocket: the console's output comes in, the keys go out.
    let socket = client.websocket(&format!("/v1/vms/{name}/console/ws")).await?;
    let (mut to_vm, mut from_vm) = socket.split();
    let mut output = tokio::spawn(async move {
        while let Some(Ok(message)) = from_vm.next().await {
            match message {
                Message::Binary(data) => {
                    let mut out = std::io::stdout();
                    if out.write_all(&data).is_err() || out.flush().is_err() {
                        return;
                    }
                }
                // The daemon closes when the VM's process ends.
                Message::Close(_) => return,
                _ => {}
            }
        }
    });
    let result = loop {
        tokio::select! {
            key = keys.recv() => match key {
                Some(Some(bytes)) if !bytes.is_empty() => {
                    if let Err(e) = to_vm.send(Message::Binary(bytes.into())).await {
                        break Err(ClientError::Http(format!("websocket: {e}")));
                    }
                }
                Some(Some(_)) => {}
                _ => {
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    let _ = to_vm.send(Message::Close(None)).await;
                    break Ok(());
                }
            },
            _ = &mut output => break Ok(()),
        }
    };
    output.abort();
    drop(raw);
    eprint!("\r\n[detached from {name}]\r\n");
    result
}
