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
        Bench::Disk { size_mib, ops } => disk(size_mib, ops),
        Bench::All => {
            boot(20)?;
            memory()?;
            pio(100_000, 7)?;
            disk(256, 4000)
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

fn disk(size_mib: u64, ops: u64) -> Result<(), String> {
    let tsc = tsc_per_us() * 1e6;
    let exe = self_exe()?;
    println!(
        "disk: virtio-blk (virtio-mmio, ioeventfd + worker thread) vs the host on the same file,"
    );
    println!("      {size_mib} MiB image, 1 request in flight (QD1); MiB/s and IOPS, ratio = guest / host");
    for dir in ["/dev/shm", "/var/tmp"] {
        let path = std::path::Path::new(dir)
            .join(format!("vanguard-bench-disk-{}.img", std::process::id()));
        let file = std::fs::File::create(&path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        file.set_len(size_mib << 20).map_err(|e| e.to_string())?;
        drop(file);
        // Fill it, so neither side reads holes, and warm the page cache the same for both.
        host_disk_pass(&path, 0)?;
        let out = Command::new(&exe)
            .args(["run", "--cmdline", &format!("diskbench={ops}"), "--memory", "256M"])
            .arg("--disk")
            .arg(format!("path={}", path.display()))
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
        let serial = String::from_utf8_lossy(&out.stdout).to_string();
        let host = host_disk_pass(&path, ops);
        let _ = std::fs::remove_file(&path);
        let (h_read, h_write, h_rand) = host?;
        let bytes = (size_mib << 20) as f64;
        let g_read = guest_cycles(&serial, "seqread")? / tsc;
        let g_write = guest_cycles(&serial, "seqwrite")? / tsc;
        let g_rand = guest_cycles(&serial, "randread4k")? / tsc;
        let mibs = |secs: f64| bytes / secs / (1 << 20) as f64;
        let iops = |secs: f64| ops as f64 / secs;
        println!("  {dir}:");
        println!(
            "    seq read 1 MiB   guest {:8.0} MiB/s   host {:8.0} MiB/s   ratio {:.2}",
            mibs(g_read),
            mibs(h_read),
            h_read / g_read
        );
        println!(
            "    seq write 1 MiB  guest {:8.0} MiB/s   host {:8.0} MiB/s   ratio {:.2}",
            mibs(g_write),
            mibs(h_write),
            h_write / g_write
        );
        println!(
            "    rand read 4 KiB  guest {:8.0} IOPS    host {:8.0} IOPS    ratio {:.2}",
            iops(g_rand),
            iops(h_rand),
            h_rand / g_rand
        );
    }
    Ok(())
}
