//! `vanguard bench snapshot` and `vanguard bench migrate` (docs/performance.md):
//!
//! - restore: a new `vanguard vmm --restore DIR` process to a running restored guest (the
//!   `echo` scenario answering a line that waits in its stdin), for 128 MiB and 1 GiB guests;
//! - snapshot write of a 1 GiB guest whose memory is full (`mem`), against `dd` writing the
//!   same bytes to the same directory with the same durability (`conv=fdatasync`);
//! - live migration on loopback TCP of a 1 GiB guest dirtying 0, 50 and 200 MiB/s.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Kills the VMM it holds when dropped (a failed run leaves no process behind).
struct Vmm {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Vmm {
    fn spawn(args: &[&str], stdin: &[u8]) -> Result<Vmm, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut child = Command::new(&exe)
            .arg("vmm")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
        if !stdin.is_empty() {
            if let Some(pipe) = child.stdin.as_mut() {
                pipe.write_all(stdin).map_err(|e| e.to_string())?;
            }
        }
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Ok(Vmm { child, lines })
    }

    fn wait_for(&self, needle: &str, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Ok(()),
                Ok(_) => {}
                Err(_) => return Err(format!("the guest did not print {needle:?}")),
            }
        }
    }

    fn type_line(&mut self, text: &[u8]) -> Result<(), String> {
        let pipe = self.child.stdin.as_mut().ok_or("no stdin")?;
        pipe.write_all(text).and_then(|()| pipe.flush()).map_err(|e| e.to_string())
    }
}

/// A pipe whose ends a child inherits (no close-on-exec): (read, write).
fn pipe() -> Result<(i32, i32), String> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe writes two descriptors into the two-element array.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    Ok((fds[0], fds[1]))
}

/// One HTTP/1.1 request on the per-VM API socket: (status, body).
fn api(socket: &Path, method: &str, path: &str, body: &str) -> Result<(u16, String), String> {
    let mut s = std::os::unix::net::UnixStream::connect(socket)
        .map_err(|e| format!("cannot connect to {}: {e}", socket.display()))?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: vmm\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).map_err(|e| e.to_string())?;
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer: {answer}"))?;
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
    Ok((status, body))
}

fn field(body: &str, name: &str) -> Result<u64, String> {
    let v: serde_json::Value = serde_json::from_str(body).map_err(|e| format!("{e}: {body}"))?;
    v[name].as_u64().ok_or_else(|| format!("no {name} in {body}"))
}

fn wait_socket(path: &Path) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        if Instant::now() > deadline {
            return Err(format!("{} did not appear", path.display()));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

struct Scratch(PathBuf);
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch(tag: &str) -> Result<Scratch, String> {
    let dir = std::env::temp_dir().join(format!("vanguard-bench-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    Ok(Scratch(dir))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Starts a guest of `memory` running `cmdline` (which ends in `echo`) with its API on
/// `socket`; returns it once it waits at `echo`.
fn echo_guest(memory: &str, cmdline: &str, socket: &Path) -> Result<Vmm, String> {
    let vm = Vmm::spawn(
        &["--memory", memory, "--cmdline", cmdline, "--api-socket", socket.to_str().unwrap_or("")],
        b"",
    )?;
    vm.wait_for("echo: ready", Duration::from_secs(120))?;
    Ok(vm)
}

/// Snapshots the VM whose API is on `socket` into `dir`; returns the API's answer.
fn snapshot_into(socket: &Path, dir: &Path) -> Result<String, String> {
    let body = format!(r#"{{"destination":"{}"}}"#, dir.display());
    let (code, answer) = api(socket, "PUT", "/v1/vm/snapshot", &body)?;
    if code != 200 {
        return Err(format!("snapshot failed ({code}): {answer}"));
    }
    Ok(answer)
}

/// Snapshots a guest of `memory` running `cmdline` (which ends in `echo`) into `dir`; returns
/// the API's answer.
fn take_snapshot(memory: &str, cmdline: &str, dir: &Path, work: &Path) -> Result<String, String> {
    let socket = work.join("snap.sock");
    let _vm = echo_guest(memory, cmdline, &socket)?;
    snapshot_into(&socket, dir)
}

/// `vanguard bench snapshot`.
pub fn run(runs: usize) -> Result<(), String> {
    let work = scratch("snapshot")?;
    println!("snapshot restore: new `vanguard vmm --restore` process -> vCPUs running (--ready-fd), and -> the restored guest (echo) answers a line, {runs} runs:");
    for memory in ["128M", "1G"] {
        let dir = work.0.join(format!("restore-{memory}"));
        take_snapshot(memory, "console=ttyS0 echo", &dir, &work.0)?;
        let (mut ready, mut answered) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let (read_end, write_end) = pipe()?;
            let fd = write_end.to_string();
            let t0 = Instant::now();
            let vm = Vmm::spawn(
                &["--restore", dir.to_str().unwrap_or(""), "--serial", "stdio", "--ready-fd", &fd],
                b"x\n",
            );
            // SAFETY: `write_end` is this process's copy of the pipe's write end, inherited by
            // the child; closing ours leaves the child's.
            unsafe { libc::close(write_end) };
            let vm = vm?;
            let mut byte = [0u8];
            // SAFETY: reads one byte into a one-byte buffer from the pipe's read end, ours.
            let n = unsafe { libc::read(read_end, byte.as_mut_ptr().cast(), 1) };
            let t_ready = t0.elapsed();
            // SAFETY: ours, read once above.
            unsafe { libc::close(read_end) };
            if n != 1 {
                return Err("the restored VM never reported ready".into());
            }
            vm.wait_for("echo: x", Duration::from_secs(30))?;
            ready.push(t_ready.as_secs_f64() * 1e3);
            answered.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        let (lo, hi) = ready.iter().fold((f64::MAX, 0f64), |(l, h), v| (l.min(*v), h.max(*v)));
        println!(
            "  {memory:>4}: every vCPU running the restored state: median {:.2} ms (min {lo:.2}, max {hi:.2}); guest's answer on the console: median {:.2} ms",
            median(&mut ready),
            median(&mut answered)
        );
    }

    // A 1 GiB guest with its memory full of data, saved again and again into one directory,
    // each save followed by dd of the same bytes to a file of its own, removed after: both
    // write into page cache freed the same way (on a virtual machine, memory the host has
    // not backed yet is much slower to write first, whoever writes it).
    let dir = work.0.join("write-1G");
    let socket = work.0.join("write.sock");
    let vm = echo_guest("1G", "console=ttyS0 mem echo", &socket)?;
    let writes = runs.clamp(1, 5);
    let (mut saves, mut dds, mut bytes) = (Vec::new(), Vec::new(), 0);
    for _ in 0..writes {
        let answer = snapshot_into(&socket, &dir)?;
        saves.push(field(&answer, "total_us")? as f64 / 1e3);
        bytes = field(&answer, "memory_bytes_written")?;
        let out_file = work.0.join("dd.out");
        let t0 = Instant::now();
        let out = Command::new("dd")
            .arg(format!("if={}", dir.join("memory").display()))
            .arg(format!("of={}", out_file.display()))
            .args(["bs=1M", "conv=fdatasync", "status=none"])
            .output()
            .map_err(|e| format!("cannot run dd: {e}"))?;
        dds.push(t0.elapsed().as_secs_f64() * 1e3);
        if !out.status.success() {
            return Err(format!("dd failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
        std::fs::remove_file(&out_file).map_err(|e| e.to_string())?;
    }
    drop(vm);
    println!(
        "snapshot write, 1 GiB guest with full memory (mem scenario), in {}, {writes} runs each, alternating:",
        work.0.display()
    );
    let spread = |v: &[f64]| v.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(" ");
    println!(
        "  vanguard (guest stopped all along, {:.0} MiB of memory written, state and memory synced): median {:.1} ms ({})",
        bytes as f64 / f64::from(1 << 20),
        median(&mut saves.clone()),
        spread(&saves)
    );
    println!(
        "  dd bs=1M conv=fdatasync of the same 1 GiB file: median {:.1} ms ({})",
        median(&mut dds.clone()),
        spread(&dds)
    );
    Ok(())
}

/// `vanguard bench migrate`: loopback TCP, 1 GiB guest, for each dirty rate.
pub fn migrate(rates: &[u64]) -> Result<(), String> {
    let work = scratch("migrate")?;
    println!("live migration, 1 GiB guest (memory filled by `mem` first), 1 vCPU, loopback TCP, max downtime 300 ms:");
    println!(
        "  {:>12} {:>10} {:>12} {:>12} {:>7} {:>14}",
        "dirty MiB/s", "total ms", "downtime ms", "sent MiB", "passes", "link MiB/s"
    );
    for (i, rate) in rates.iter().enumerate() {
        let socket = work.0.join(format!("src{i}.sock"));
        let cmdline = if *rate == 0 {
            "console=ttyS0 mem echo".to_string()
        } else {
            format!("console=ttyS0 mem dirty=256M,{rate}")
        };
        let src = Vmm::spawn(
            &[
                "--memory",
                "1G",
                "--cmdline",
                &cmdline,
                "--api-socket",
                socket.to_str().unwrap_or(""),
            ],
            b"",
        )?;
        src.wait_for(
            if *rate == 0 { "echo: ready" } else { "dirty: step" },
            Duration::from_secs(120),
        )?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let address = format!("tcp:127.0.0.1:{port}");
        let dst_socket = work.0.join(format!("dst{i}.sock"));
        let mut dst = Vmm::spawn(
            &["--migrate-from", &address, "--api-socket", dst_socket.to_str().unwrap_or("")],
            b"",
        )?;
        // The destination's API socket appears once the VM arrives; its TCP port is bound
        // right after start: give it a moment.
        std::thread::sleep(Duration::from_millis(300));
        let (code, answer) =
            api(&socket, "PUT", "/v1/vm/migrate", &format!(r#"{{"destination":"{address}"}}"#))?;
        if code != 200 {
            return Err(format!("migration at {rate} MiB/s failed ({code}): {answer}"));
        }
        wait_socket(&dst_socket)?;
        // The guest runs at the destination.
        if *rate == 0 {
            dst.type_line(b"moved\n")?;
            dst.wait_for("echo: moved", Duration::from_secs(30))?;
        } else {
            dst.wait_for("dirty: step", Duration::from_secs(30))?;
        }
        let ms = |name: &str| field(&answer, name).map(|us| us as f64 / 1e3);
        println!(
            "  {:>12} {:>10.1} {:>12.2} {:>12.0} {:>7} {:>14.0}",
            rate,
            ms("total_us")?,
            ms("downtime_us")?,
            field(&answer, "bytes_sent")? as f64 / f64::from(1 << 20),
            field(&answer, "passes")?,
            field(&answer, "link_rate_bytes_per_s")? as f64 / f64::from(1 << 20),
        );
        drop(src);
    }
    Ok(())
}

/// One same-host migration of an idle guest whose memory `mem` filled: over a Unix socket to
/// a fresh destination; returns (total ms, downtime ms, MiB sent) from the source's answer
/// once the guest answers at the destination.
fn upgrade_once(
    work: &Path,
    i: usize,
    memory: &str,
    shared: bool,
) -> Result<(f64, f64, f64), String> {
    let socket = work.join(format!("up-src{i}.sock"));
    let mut args = vec!["--memory", memory, "--cmdline", "console=ttyS0 mem echo"];
    if shared {
        args.push("--memory-shared");
    }
    let socket_arg = socket.to_str().unwrap_or("").to_string();
    args.extend(["--api-socket", &socket_arg]);
    let src = Vmm::spawn(&args, b"")?;
    src.wait_for("echo: ready", Duration::from_secs(120))?;
    let address = format!("unix:{}", work.join(format!("up{i}.sock")).display());
    let mut dst = Vmm::spawn(&["--migrate-from", &address], b"")?;
    let listening = work.join(format!("up{i}.sock"));
    wait_socket(&listening)?;
    let (code, answer) =
        api(&socket, "PUT", "/v1/vm/migrate", &format!(r#"{{"destination":"{address}"}}"#))?;
    if code != 200 {
        return Err(format!("the migration failed ({code}): {answer}"));
    }
    dst.type_line(b"moved\n")?;
    dst.wait_for("echo: moved", Duration::from_secs(30))?;
    drop(src);
    let ms = |name: &str| field(&answer, name).map(|us| us as f64 / 1e3);
    Ok((
        ms("total_us")?,
        ms("downtime_us")?,
        field(&answer, "bytes_sent")? as f64 / f64::from(1 << 20),
    ))
}

/// `vanguard bench upgrade`: same-host VMM upgrade, memory handed over against copied.
pub fn upgrade(runs: usize) -> Result<(), String> {
    let work = scratch("upgrade")?;
    let runs = runs.max(1);
    println!("same-host VMM upgrade (live migration over a Unix socket), idle guest with its memory filled by `mem`, 1 vCPU, medians of {runs}:");
    println!(
        "  {:>8} {:>22} {:>10} {:>12} {:>10}",
        "memory", "memory", "total ms", "downtime ms", "sent MiB"
    );
    let mut n = 0;
    for memory in ["128M", "1G"] {
        for shared in [true, false] {
            let (mut total, mut down, mut sent) = (Vec::new(), Vec::new(), 0.0);
            for _ in 0..runs {
                let (t, d, s) = upgrade_once(&work.0, n, memory, shared)?;
                n += 1;
                total.push(t);
                down.push(d);
                sent = s;
            }
            println!(
                "  {:>8} {:>22} {:>10.2} {:>12.2} {:>10.0}",
                memory,
                if shared { "handed over (memfd)" } else { "copied" },
                median(&mut total),
                median(&mut down),
                sent
            );
        }
    }
    Ok(())
}
