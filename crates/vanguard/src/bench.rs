//! `vanguard bench`: the benchmarks behind docs/performance.md. Each prints its figures; none
//! asserts a time.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vmm::{KernelImage, SerialOutput, VmConfig};

/// Which benchmark to run.
#[derive(clap::Subcommand)]
pub enum Bench {
    /// Process start to the test guest's payload (boot timer), and to process exit.
    Boot {
        /// Number of runs (the median is reported).
        #[arg(long, default_value_t = 20)]
        runs: usize,
    },
    /// VMM memory overhead: RSS not backing guest memory, for a 128 MiB guest.
    Memory,
    /// Guest port write round trip through Vanguard's VMM, against a bare KVM_RUN loop.
    Pio {
        /// Port writes per run.
        #[arg(long, default_value_t = 100_000)]
        count: u64,
        /// Runs of each (medians are reported).
        #[arg(long, default_value_t = 7)]
        runs: usize,
    },
    /// virtio-blk throughput and latency against the host reading the same file, on tmpfs
    /// (/dev/shm) and on disk (/var/tmp).
    Disk {
        /// Image size in MiB.
        #[arg(long, default_value_t = 256)]
        size_mib: u64,
        /// Random 4 KiB reads per run.
        #[arg(long, default_value_t = 4000)]
        ops: u64,
        /// The virtio transport: pci or mmio.
        #[arg(long, default_value = "pci")]
        transport: String,
        /// Who serves the guest's disk: in-vmm (the VMM's own virtio-blk), vhost-user
        /// (`vanguard vhost-user blk` through `--disk vhost-user=`), qsd (qemu-storage-daemon's
        /// vhost-user-blk export) or all (the three side by side, on the same image).
        #[arg(long, default_value = "in-vmm")]
        backend: String,
    },
    /// The host daemon through its API: create + start latency (p50/p99), VMs started per
    /// second, the daemon's memory with 100 VMs defined.
    Api {
        /// VMs started one after another for the latency figures.
        #[arg(long, default_value_t = 30)]
        runs: usize,
        /// VMs started at once for the rate.
        #[arg(long, default_value_t = 50)]
        concurrent: usize,
    },
    /// TCP over a TAP: Vanguard's VMM with the test guest's TCP, both ways; then the same
    /// Linux guest on QEMU with virtio-net served by Vanguard's vhost-user-net backend and by
    /// QEMU's own TAP backend (run from the repository root, after
    /// scripts/build-linux-guest.sh; skipped without it).
    Net {
        /// MiB per run.
        #[arg(long, default_value_t = 32)]
        size_mib: u64,
        /// Runs per backend (the median is reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// Snapshots: restore time (new process to a running restored guest) for 128 MiB and
    /// 1 GiB, and the write of a 1 GiB snapshot against dd of the same bytes.
    Snapshot {
        /// Restores per size (the median is reported).
        #[arg(long, default_value_t = 20)]
        runs: usize,
    },
    /// Live migration on loopback TCP of a 1 GiB guest dirtying memory at each rate (MiB/s).
    Migrate {
        /// Dirty rates, MiB/s (0: an idle guest).
        #[arg(long, value_delimiter = ',', default_value = "0,50,200")]
        rates: Vec<u64>,
    },
    /// Same-host VMM upgrade: live migration over a Unix socket to a new VMM process, with
    /// the guest's memory handed over (--memory-shared) and copied, 128 MiB and 1 GiB.
    Upgrade {
        /// Migrations per row (the median is shown).
        #[arg(long, default_value_t = 10)]
        runs: usize,
    },
    /// All of the above with their defaults.
    All,
}

fn monotonic_now() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes only into the timespec passed.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn self_exe() -> Result<std::path::PathBuf, String> {
    std::env::current_exe().map_err(|e| format!("cannot find the vanguard binary: {e}"))
}

fn boot(runs: usize) -> Result<(), String> {
    let exe = self_exe()?;
    let (mut to_payload, mut to_exit) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let t0 = monotonic_now();
        let out = Command::new(&exe)
            .args(["run", "--boot-timer", "--serial", "none", "--cmdline", ""])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
        let t_exit = monotonic_now();
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            return Err(format!("the VM failed: {stderr}"));
        }
        let mark: f64 = stderr
            .split("(monotonic ")
            .nth(1)
            .and_then(|s| s.split(')').next())
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("no boot-timer line in: {stderr}"))?;
        to_payload.push((mark - t0) * 1e3);
        to_exit.push((t_exit - t0) * 1e3);
    }
    let (min, max) =
        to_payload.iter().fold((f64::MAX, 0f64), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
    println!("boot: process start -> guest payload (boot timer), 1 vCPU, 128 MiB, {runs} runs:");
    println!("  median {:.2} ms (min {min:.2}, max {max:.2})", median(&mut to_payload));
    println!("boot: process start -> guest powered off -> process gone:");
    println!("  median {:.2} ms", median(&mut to_exit));
    Ok(())
}

/// Sums `Rss:` over all mappings of `pid`, and over the one mapping of `guest_size` bytes.
fn rss_split(pid: u32, guest_size: u64) -> Result<(u64, u64), String> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .map_err(|e| format!("cannot read /proc/{pid}/smaps: {e}"))?;
    let (mut total, mut guest) = (0u64, 0u64);
    let mut current_is_guest = false;
    for line in smaps.lines() {
        let kb = |l: &str| -> u64 {
            l.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0)
        };
        if line.starts_with("Size:") {
            current_is_guest = kb(line) * 1024 == guest_size;
        } else if line.starts_with("Rss:") {
            let rss = kb(line) * 1024;
            total += rss;
            if current_is_guest {
                guest += rss;
            }
        }
    }
    Ok((total, guest))
}

fn memory() -> Result<(), String> {
    let exe = self_exe()?;
    let guest_size = 128u64 << 20;
    let mut child = Command::new(&exe)
        .args(["run", "--memory", "128M", "--cmdline", "echo"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    loop {
        match lines.next() {
            Some(Ok(line)) if line.contains("echo: ready") => break,
            Some(Ok(_)) => continue,
            _ => return Err("the guest ended before it was ready".into()),
        }
    }
    // The steady state of a VM waiting for input: after start-up (the VMM drops the start-up
    // pages of its executable once the vCPUs run, racing the guest's first output).
    std::thread::sleep(Duration::from_millis(200));
    let (total, guest) = rss_split(child.id(), guest_size)?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(b"quit\n");
    }
    let _ = child.wait();
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!("memory: 128 MiB guest (test guest waiting for input), 1 vCPU:");
    println!("  process RSS {:.2} MiB, of which guest memory {:.2} MiB", mib(total), mib(guest));
    println!("  VMM overhead (RSS not backing guest memory): {:.2} MiB", mib(total - guest));
    Ok(())
}

/// TSC ticks per microsecond, measured against the monotonic clock (the guest reads the
/// host's TSC).
fn tsc_per_us() -> f64 {
    // SAFETY: rdtsc has no side effects.
    let rdtsc = || unsafe { core::arch::x86_64::_rdtsc() };
    let (c0, t0) = (rdtsc(), Instant::now());
    std::thread::sleep(Duration::from_millis(100));
    let (c1, t1) = (rdtsc(), Instant::now());
    (c1 - c0) as f64 / t1.duration_since(t0).as_secs_f64() / 1e6
}

fn parse_pio_cycles(serial: &str) -> Result<f64, String> {
    serial
        .lines()
        .find_map(|l| l.strip_prefix("pio: "))
        .and_then(|l| l.split(" in ").nth(1))
        .and_then(|l| l.split(' ').next())
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no pio result in the guest's output: {serial}"))
}

fn pio(count: u64, runs: usize) -> Result<(), String> {
    let tsc = tsc_per_us();
    let guest: &'static [u8] = crate::DEFAULT_GUEST;
    let config = || {
        let mut c = VmConfig::new(KernelImage::Bytes { name: "test guest".into(), data: guest });
        c.cmdline = format!("pio={count}");
        c
    };
    let serial_file =
        std::env::temp_dir().join(format!("vanguard-bench-pio-{}.txt", std::process::id()));
    let (mut vanguard, mut bare) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let mut c = config();
        c.serial = SerialOutput::File(serial_file.clone());
        vmm::Vm::run(c).map_err(|e| format!("Vanguard VM failed: {e}"))?;
        let text = std::fs::read_to_string(&serial_file).map_err(|e| e.to_string())?;
        vanguard.push(parse_pio_cycles(&text)? / count as f64 / tsc);
        let mut c = config();
        c.serial = SerialOutput::None;
        let out = vmm::bench::bare_exit_loop(&c).map_err(|e| format!("bare loop failed: {e}"))?;
        bare.push(parse_pio_cycles(&String::from_utf8_lossy(&out))? / count as f64 / tsc);
    }
    let _ = std::fs::remove_file(&serial_file);
    let (v, b) = (median(&mut vanguard), median(&mut bare));
    println!("pio: guest `out` to a userspace port and back, {count} writes x {runs} runs (TSC {tsc:.0} MHz):");
    println!("  Vanguard VMM:        median {v:.2} us per round trip");
    println!("  bare KVM_RUN loop:   median {b:.2} us per round trip");
    println!("  Vanguard / bare = {:.3} ({:+.1}%)", v / b, (v / b - 1.0) * 100.0);
    Ok(())
}

/// Runs the chosen benchmark.
pub fn run(which: Bench) -> Result<(), String> {
    match which {
        Bench::Boot { runs } => boot(runs),
        Bench::Memory => memory(),
        Bench::Pio { count, runs } => pio(count, runs),
        Bench::Disk { size_mib, ops, transport, backend } => {
            if transport != "pci" && transport != "mmio" {
                return Err(format!("unknown transport '{transport}': use pci or mmio"));
            }
            let backends = match backend.as_str() {
                "in-vmm" => vec![DiskBackend::InVmm],
                "vhost-user" => vec![DiskBackend::VhostUser],
                "qsd" => vec![DiskBackend::Qsd],
                "all" => vec![DiskBackend::InVmm, DiskBackend::VhostUser, DiskBackend::Qsd],
                _ => {
                    return Err(format!(
                        "unknown backend '{backend}': use in-vmm, vhost-user, qsd or all"
                    ))
                }
            };
            disk(size_mib, ops, &transport, &backends)
        }
        Bench::Api { runs, concurrent } => crate::bench_api::run(runs, concurrent),
        Bench::Net { size_mib, runs } => crate::bench_net::run(size_mib, runs),
        Bench::Snapshot { runs } => crate::bench_snapshot::run(runs),
        Bench::Migrate { rates } => crate::bench_snapshot::migrate(&rates),
        Bench::Upgrade { runs } => crate::bench_snapshot::upgrade(runs),
        Bench::All => {
            boot(20)?;
            memory()?;
            pio(100_000, 7)?;
            disk(256, 4000, "pci", &[DiskBackend::InVmm])
        }
    }
}

/// The host side of the disk benchmark: the guest's access pattern with pread/pwrite on the
/// same file (1 MiB sequential reads and writes, then random 4 KiB reads with the guest's
/// xorshift sequence); returns seconds for each.
fn host_disk_pass(path: &std::path::Path, ops: u64) -> Result<(f64, f64, f64), String> {
    use std::os::unix::fs::FileExt;
    let file =
        std::fs::OpenOptions::new().read(true).write(true).open(path).map_err(|e| e.to_string())?;
    let total = file.metadata().map_err(|e| e.to_string())?.len();
    let whole = total / (1 << 20) * (1 << 20);
    let mut buf = vec![0u8; 1 << 20];
    let t = Instant::now();
    let mut offset = 0;
    while offset < whole {
        file.read_exact_at(&mut buf, offset).map_err(|e| e.to_string())?;
        offset += 1 << 20;
    }
    let seq_read = t.elapsed().as_secs_f64();
    let t = Instant::now();
    offset = 0;
    while offset < whole {
        file.write_all_at(&buf, offset).map_err(|e| e.to_string())?;
        offset += 1 << 20;
    }
    let seq_write = t.elapsed().as_secs_f64();
    let blocks = total / 4096;
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let t = Instant::now();
    for _ in 0..ops {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        file.read_exact_at(&mut buf[..4096], (x % blocks) * 4096).map_err(|e| e.to_string())?;
    }
    Ok((seq_read, seq_write, t.elapsed().as_secs_f64()))
}

fn guest_cycles(serial: &str, what: &str) -> Result<f64, String> {
    serial
        .lines()
        .find_map(|l| l.strip_prefix(&format!("diskbench: {what} ")))
        .and_then(|l| l.split(" in ").nth(1))
        .and_then(|l| l.split(' ').next())
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no {what} result in the guest's output: {serial}"))
}

/// fio (the peer the issue names) on the same file: `rw` with blocks of `bs`, `depth` requests
/// in flight (io_uring above 1, psync at 1), `ios` operations (0: the whole file once).
/// Returns (bytes per second, operations per second), or None when fio is not installed.
fn fio(
    path: &std::path::Path,
    rw: &str,
    bs: &str,
    depth: u32,
    ios: u64,
) -> Option<Result<(f64, f64), String>> {
    let engine = if depth > 1 { "io_uring" } else { "psync" };
    let mut cmd = Command::new("fio");
    cmd.arg("--name=vanguard-bench")
        .arg(format!("--filename={}", path.display()))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={bs}"))
        .arg(format!("--iodepth={depth}"))
        .arg(format!("--ioengine={engine}"))
        // Leave the page cache alone: the guest reads through it too.
        .args(["--output-format=terse", "--terse-version=3", "--randrepeat=0", "--invalidate=0"]);
    if ios > 0 {
        cmd.arg(format!("--number_ios={ios}"));
    }
    let out = match cmd.stdin(Stdio::null()).stderr(Stdio::null()).output() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => return Some(Err(format!("cannot run fio: {e}"))),
        Ok(out) => out,
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let fields: Vec<&str> = text.lines().last().unwrap_or("").split(';').collect();
    // Terse v3: read bandwidth (KiB/s) and IOPS are fields 7 and 8, write 48 and 49.
    let (bw, iops) = if rw.contains("write") { (47, 48) } else { (6, 7) };
    let parse = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    Some(match (out.status.success(), parse(bw), parse(iops)) {
        (true, Some(kib), Some(iops)) => Ok((kib * 1024.0, iops)),
        _ => Err(format!("fio failed or printed no result: {text}")),
    })
}

/// One line of the disk table.
fn disk_line(what: &str, unit: &str, guest: f64, host: f64, peer: &str) {
    println!(
        "    {what:<22} guest {guest:9.0} {unit:<5}  host {host:9.0} {unit:<5} ({peer})  ratio {:.2}",
        guest / host
    );
}

/// Who serves the benchmark guest's disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DiskBackend {
    /// The VMM's own virtio-blk (`--disk path=`).
    InVmm,
    /// `vanguard vhost-user blk`, attached with `--disk vhost-user=`.
    VhostUser,
    /// qemu-storage-daemon's vhost-user-blk export, attached the same way.
    Qsd,
}

impl DiskBackend {
    fn label(self) -> &'static str {
        match self {
            DiskBackend::InVmm => "in-VMM",
            DiskBackend::VhostUser => "vanguard vhost-user",
            DiskBackend::Qsd => "qemu-storage-daemon",
        }
    }
}

/// A backend process for one benchmark VM; killed when dropped.
struct BackendProcess(std::process::Child);

impl Drop for BackendProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `backend` on `image` listening on `socket` (None for the in-VMM disk) and waits for
/// its socket.
fn start_backend(
    backend: DiskBackend,
    exe: &std::path::Path,
    image: &std::path::Path,
    socket: &std::path::Path,
) -> Result<Option<BackendProcess>, String> {
    let _ = std::fs::remove_file(socket);
    let mut cmd = match backend {
        DiskBackend::InVmm => return Ok(None),
        DiskBackend::VhostUser => {
            let mut cmd = Command::new(exe);
            cmd.args(["vhost-user", "blk", "--socket"]).arg(socket).arg("--image").arg(image);
            cmd
        }
        DiskBackend::Qsd => {
            let mut cmd = Command::new("qemu-storage-daemon");
            cmd.arg("--blockdev")
                .arg(format!("driver=file,node-name=f,filename={}", image.display()))
                .arg("--export")
                .arg(format!(
                    "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on",
                    socket.display()
                ));
            cmd
        }
    };
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start the {} backend: {e}", backend.label()))?;
    let mut process = BackendProcess(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        if let Ok(Some(status)) = process.0.try_wait() {
            return Err(format!("the {} backend exited with {status}", backend.label()));
        }
        if Instant::now() > deadline {
            return Err(format!("the {} backend did not listen within 20 s", backend.label()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(Some(process))
}

fn disk(size_mib: u64, ops: u64, transport: &str, backends: &[DiskBackend]) -> Result<(), String> {
    let tsc = tsc_per_us() * 1e6;
    let exe = self_exe()?;
    let fio_present = Command::new("fio").arg("--version").output().is_ok();
    let served = backends.iter().map(|b| b.label()).collect::<Vec<_>>().join(", ");
    println!("disk: virtio-blk (virtio-{transport}, ioeventfd; served by {served}) vs the host on the same file,");
    println!("      {size_mib} MiB image; MiB/s and IOPS, ratio = guest / host");
    if !fio_present {
        println!(
            "      (fio is not installed: the host side is this process's own pread/pwrite loop;"
        );
        println!(
            "       apt-get install fio for the peer figures, and for the QD32 host baseline)"
        );
    }
    for dir in ["/dev/shm", "/var/tmp"] {
        let path = std::path::Path::new(dir)
            .join(format!("vanguard-bench-disk-{}.img", std::process::id()));
        let file = std::fs::File::create(&path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        file.set_len(size_mib << 20).map_err(|e| e.to_string())?;
        drop(file);
        // Fill it, so neither side reads holes, and warm the page cache the same for both.
        host_disk_pass(&path, 0)?;
        println!("  {dir}:");
        let result = disk_one(&exe, &path, size_mib, ops, transport, tsc, backends);
        let _ = std::fs::remove_file(&path);
        result?;
    }
    Ok(())
}

/// What the benchmark guest measured (bytes or operations per second).
struct GuestDisk {
    read: f64,
    write: f64,
    rand: f64,
    rand32: Option<f64>,
    seq32: Option<f64>,
}

/// One benchmark VM on `path`, its disk served by `backend`.
fn guest_disk(
    exe: &std::path::Path,
    path: &std::path::Path,
    size_mib: u64,
    ops: u64,
    transport: &str,
    tsc: f64,
    backend: DiskBackend,
) -> Result<GuestDisk, String> {
    let socket = path.with_extension("sock");
    let process = start_backend(backend, exe, path, &socket)?;
    let disk = match process {
        None => format!("path={}", path.display()),
        Some(_) => format!("vhost-user={}", socket.display()),
    };
    let out = Command::new(exe)
        .args(["run", "--cmdline", &format!("diskbench={ops}"), "--memory", "256M"])
        .args(["--virtio-transport", transport])
        .arg("--disk")
        .arg(disk)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()));
    drop(process);
    let _ = std::fs::remove_file(&socket);
    let out = out?;
    let serial = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        return Err(format!(
            "the VM ({}) failed: {}{serial}",
            backend.label(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let bytes = (size_mib << 20) as f64;
    Ok(GuestDisk {
        read: bytes / (guest_cycles(&serial, "seqread")? / tsc),
        write: bytes / (guest_cycles(&serial, "seqwrite")? / tsc),
        rand: ops as f64 / (guest_cycles(&serial, "randread4k")? / tsc),
        rand32: guest_cycles(&serial, "randread4k-qd32").ok().map(|c| ops as f64 / (c / tsc)),
        seq32: guest_amount(&serial, "seqread-qd32")
            .and_then(|amount| Some(amount / (guest_cycles(&serial, "seqread-qd32").ok()? / tsc))),
    })
}

/// Several backends on one image: a row per figure, a column per backend (guest figure and
/// its ratio to the host's best).
fn disk_table(results: &[(DiskBackend, GuestDisk)], host: &[(&str, &str, f64, &str)]) {
    let mut header = format!("    {:<22} {:>18}", "", "host (best)");
    for (backend, _) in results {
        header.push_str(&format!(" {:>26}", backend.label()));
    }
    println!("{header}");
    let figures: [fn(&GuestDisk) -> Option<f64>; 5] =
        [|g| Some(g.read), |g| g.seq32, |g| Some(g.write), |g| Some(g.rand), |g| g.rand32];
    let mib = (1u64 << 20) as f64;
    for ((what, unit, host, _), figure) in host.iter().zip(figures) {
        let scale = if *unit == "MiB/s" { mib } else { 1.0 };
        let mut line = format!("    {what:<22} {:>12.0} {unit:<5}", host / scale);
        for (_, guest) in results {
            match figure(guest) {
                Some(g) => {
                    line.push_str(&format!(" {:>12.0} {unit:<5} ({:.2}) ", g / scale, g / host))
                }
                None => line.push_str(&format!(" {:>26}", "-")),
            }
        }
        println!("{line}");
    }
}

/// The guest's runs (one per backend) and the host's on one image.
fn disk_one(
    exe: &std::path::Path,
    path: &std::path::Path,
    size_mib: u64,
    ops: u64,
    transport: &str,
    tsc: f64,
    backends: &[DiskBackend],
) -> Result<(), String> {
    let mut results = Vec::new();
    for backend in backends {
        results.push((*backend, guest_disk(exe, path, size_mib, ops, transport, tsc, *backend)?));
    }
    let bytes = (size_mib << 20) as f64;
    let (h_read, h_write, h_rand) = host_disk_pass(path, ops)?;
    // The host's best: its own pread/pwrite loop (what dd does) or fio, whichever is faster.
    let own = "pread loop";
    let best = |own_value: f64, fio_value: Option<f64>, fio_label: &'static str| match fio_value {
        Some(f) if f > own_value => (f, fio_label),
        _ => (own_value, own),
    };
    let fio_or_none = |r: Option<Result<(f64, f64), String>>| r.transpose();
    let f_read = fio_or_none(fio(path, "read", "1M", 1, 0))?.map(|r| r.0);
    let f_write = fio_or_none(fio(path, "write", "1M", 1, 0))?.map(|r| r.0);
    let f_seq32 = fio_or_none(fio(path, "read", "1M", 32, 0))?.map(|r| r.0);
    let f_rand = fio_or_none(fio(path, "randread", "4k", 1, ops * 8))?.map(|r| r.1);
    let f_rand32 = fio_or_none(fio(path, "randread", "4k", 32, ops * 8))?.map(|r| r.1);
    let mib = (1u64 << 20) as f64;
    let (host_read, l_read) = best(bytes / h_read, f_read, "fio psync");
    let (host_write, l_write) = best(bytes / h_write, f_write, "fio psync");
    let (host_seq32, l_seq32) = best(bytes / h_read, f_seq32, "fio io_uring QD32");
    let (host_rand, l_rand) = best(ops as f64 / h_rand, f_rand, "fio psync");
    let (host_rand32, l_rand32) = best(ops as f64 / h_rand, f_rand32, "fio io_uring QD32");
    if results.len() > 1 {
        disk_table(
            &results,
            &[
                ("seq read 1 MiB QD1", "MiB/s", host_read, l_read),
                ("seq read 1 MiB QD32", "MiB/s", host_seq32, l_seq32),
                ("seq write 1 MiB QD1", "MiB/s", host_write, l_write),
                ("rand read 4 KiB QD1", "IOPS", host_rand, l_rand),
                ("rand read 4 KiB QD32", "IOPS", host_rand32, l_rand32),
            ],
        );
        println!("    (host: {l_read}, {l_seq32}, {l_write}, {l_rand}, {l_rand32})");
        return Ok(());
    }
    let Some((_, guest)) = results.pop() else { return Ok(()) };
    let GuestDisk { read: g_read, write: g_write, rand: g_rand, rand32: g_rand32, seq32: g_seq32 } =
        guest;
    disk_line("seq read 1 MiB QD1", "MiB/s", g_read / mib, host_read / mib, l_read);
    if let Some(g) = g_seq32 {
        disk_line("seq read 1 MiB QD32", "MiB/s", g / mib, host_seq32 / mib, l_seq32);
    }
    disk_line("seq write 1 MiB QD1", "MiB/s", g_write / mib, host_write / mib, l_write);
    disk_line("rand read 4 KiB QD1", "IOPS", g_rand, host_rand, l_rand);
    match g_rand32 {
        Some(g) => disk_line("rand read 4 KiB QD32", "IOPS", g, host_rand32, l_rand32),
        None => println!("    rand read 4 KiB QD32   (the guest printed no QD32 result)"),
    }
    Ok(())
}

/// The amount (bytes or operations) a `diskbench: <what> <amount> ...` line reports.
fn guest_amount(serial: &str, what: &str) -> Option<f64> {
    serial
        .lines()
        .find_map(|l| l.strip_prefix(&format!("diskbench: {what} ")))
        .and_then(|l| l.split(' ').next())
        .and_then(|a| a.parse().ok())
}
