//! `vanguard bench net`: TCP throughput over a TAP, in one run:
//!
//! 1. Vanguard's VMM (KVM) with its in-process virtio-net, the test guest's own TCP (its `tcp`
//!    scenario, docs/test-guest.md), guest to host and host to guest. The host times each
//!    stream from the connection to its end (the guest's FIN; the guest's MD5 answer), and
//!    checks the MD5 the guest reports.
//! 2. The same Linux guest (Debian's kernel and the busybox initramfs of
//!    scripts/build-linux-guest.sh, its `vanguard.test=netbench` scenario: `dd if=/dev/zero |
//!    nc HOST PORT`) on QEMU, guest to host, with its virtio-net served (a) by Vanguard's
//!    vhost-user-net backend (`vanguard vhost-user net`) and (b) by QEMU's own TAP backend.
//!    The host times the stream from its first byte to the end. Skipped, with the reason, when
//!    the Linux guest is not built.
//!
//! Vanguard's VMM cannot run the Linux guest on a host without hardware virtualization (see
//! docs/linux-guest.md), so the Linux guest runs on QEMU; with TCG its CPU is the bottleneck,
//! which both QEMU columns share. The test guest's figures are not comparable with those: a
//! different guest, and its TCP is minimal (no window scaling, 64 KiB in flight).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Children killed when dropped.
struct Kill(Vec<Child>);

impl Drop for Kill {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip: {e}"))?;
    if !out.status.success() {
        return Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr)));
    }
    Ok(())
}

/// One run: QEMU with `net_args` (its -netdev, and -chardev for vhost-user) on a TAP made
/// beforehand; returns MiB/s measured by the host.
fn run_once(
    guest: &Path,
    net_args: &[String],
    host_ip: &str,
    guest_ip: &str,
    mib: u64,
) -> Result<f64, String> {
    let listener =
        TcpListener::bind((host_ip, 0)).map_err(|e| format!("listen on {host_ip}: {e}"))?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-accel", "tcg", "-machine", "q35", "-m", "512M", "-nodefaults"]);
    qemu.args(["-display", "none", "-serial", "null", "-no-reboot"]);
    // Shared guest memory for both backends (vhost-user needs it), so the guests are alike.
    qemu.args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on"]);
    qemu.args(["-numa", "node,memdev=mem"]);
    qemu.args(net_args);
    qemu.args(["-device", "virtio-net-pci,netdev=n0,mac=52:54:00:62:65:6e,vectors=0"]);
    qemu.arg("-kernel").arg(guest.join("vmlinuz"));
    qemu.arg("-initrd").arg(guest.join("initramfs.cpio.gz"));
    qemu.arg("-append").arg(format!(
        "console=ttyS0 panic=-1 vanguard.test=netbench vanguard.net={guest_ip},{host_ip},{port} vanguard.netbench={mib}"
    ));
    let child = qemu
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start qemu-system-x86_64: {e}"))?;
    let _qemu = Kill(vec![child]);
    let mut conn = accept(&listener, Duration::from_secs(120))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    let mut first = None;
    loop {
        let n = conn.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        first.get_or_insert_with(Instant::now);
        total += n as u64;
    }
    let secs = first.map_or(f64::NAN, |t| t.elapsed().as_secs_f64());
    if total != mib << 20 {
        return Err(format!("received {total} bytes, expected {}", mib << 20));
    }
    Ok(total as f64 / (1 << 20) as f64 / secs)
}

/// Accepts the guest's connection on `listener`, waiting at most `within`.
fn accept(listener: &TcpListener, within: Duration) -> Result<TcpStream, String> {
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + within;
    let conn = loop {
        match listener.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err(format!("the guest did not connect within {} s", within.as_secs()));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(e.to_string()),
        }
    };
    conn.set_nonblocking(false).map_err(|e| e.to_string())?;
    conn.set_read_timeout(Some(Duration::from_secs(120))).map_err(|e| e.to_string())?;
    Ok(conn)
}

/// The MD5 of `bytes` in hex, by the host's `md5sum`.
fn md5sum(bytes: &[u8]) -> Result<String, String> {
    let mut child = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("md5sum: {e}"))?;
    child.stdin.take().ok_or("md5sum: no stdin")?.write_all(bytes).map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&out.stdout).split(' ').next().unwrap_or_default().to_string())
}

/// One run of Vanguard's VMM with the test guest's `tcp` scenario on `tap`: guest to host
/// (`to_host`) or host to guest; returns MiB/s measured by the host.
fn run_vmm_once(
    exe: &Path,
    tap: &str,
    host_ip: &str,
    guest_ip: &str,
    mib: u64,
    to_host: bool,
) -> Result<f64, String> {
    let listener =
        TcpListener::bind((host_ip, 0)).map_err(|e| format!("listen on {host_ip}: {e}"))?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    let bytes = mib << 20;
    let mode = if to_host { format!("send:{bytes}") } else { "recv".to_string() };
    let child = Command::new(exe)
        .args(["run", "--memory", "64M", "--net", &format!("tap={tap}"), "--cmdline"])
        .arg(format!("console=ttyS0 tcp={guest_ip},{host_ip},{port},{mode}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start vanguard run: {e}"))?;
    let mut vm = Kill(vec![child]);
    let mut conn = accept(&listener, Duration::from_secs(30))?;
    let start = Instant::now();
    let (digest, answer, secs) = if to_host {
        let mut received = Vec::with_capacity(usize::try_from(bytes).unwrap_or(0));
        conn.read_to_end(&mut received).map_err(|e| e.to_string())?;
        let secs = start.elapsed().as_secs_f64();
        if received.len() as u64 != bytes {
            return Err(format!("received {} bytes, expected {bytes}", received.len()));
        }
        let digest = md5sum(&received)?;
        conn.write_all(digest.as_bytes()).map_err(|e| e.to_string())?;
        (digest, None, secs)
    } else {
        let data: Vec<u8> =
            (0..bytes).map(|i| (i.wrapping_mul(0x9e37_79b1) >> 13).to_le_bytes()[0]).collect();
        let digest = md5sum(&data)?;
        let start = Instant::now();
        conn.write_all(&data).map_err(|e| e.to_string())?;
        conn.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
        let mut answer = String::new();
        conn.read_to_string(&mut answer).map_err(|e| e.to_string())?;
        (digest, Some(answer), start.elapsed().as_secs_f64())
    };
    drop(conn);
    if let Some(answer) = answer {
        if answer != digest {
            return Err(format!("the guest's md5 {answer:?} differs from the host's {digest}"));
        }
    }
    let status = vm.0[0].wait().map_err(|e| e.to_string())?;
    vm.0.clear();
    if !status.success() {
        return Err(format!("vanguard run ended with {status} (the guest's check failed?)"));
    }
    Ok(bytes as f64 / (1 << 20) as f64 / secs)
}

/// Prints one row: the median and every run.
fn report(name: &str, mut figures: Vec<f64>) {
    figures.sort_by(f64::total_cmp);
    let mbit = |mib_s: f64| mib_s * 8.0 * 1.048576;
    let text: Vec<String> = figures.iter().map(|f| format!("{:.0}", mbit(*f))).collect();
    println!(
        "  {name:<34} median {:.0} Mbit/s (runs: {} Mbit/s)",
        mbit(figures[figures.len() / 2]),
        text.join(", ")
    );
}

/// Runs the benchmark: `runs` runs of `mib` MiB per row.
pub fn run(mib: u64, runs: usize) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let tap = format!("vgbn{}", std::process::id() % 100_000);
    let (host_ip, guest_ip) = ("10.79.0.1", "10.79.0.2");
    println!("net: TCP over a TAP, {mib} MiB per run, {runs} runs per row");
    println!(" Vanguard VMM (KVM), in-process virtio-net, the test guest's TCP:");
    for (name, to_host) in [("guest to host", true), ("host to guest", false)] {
        let mut figures = Vec::new();
        for _ in 0..runs {
            ip(&["tuntap", "add", "dev", &tap, "mode", "tap", "vnet_hdr"])?;
            let result = ip(&["addr", "add", &format!("{host_ip}/24"), "dev", &tap])
                .and_then(|()| ip(&["link", "set", &tap, "up"]))
                .and_then(|()| run_vmm_once(&exe, &tap, host_ip, guest_ip, mib, to_host));
            let _ = Command::new("ip").args(["link", "del", &tap]).output();
            figures.push(result?);
        }
        report(name, figures);
    }
    let guest = PathBuf::from("build/linux-guest");
    if !guest.join("vmlinuz").is_file() || !guest.join("initramfs.cpio.gz").is_file() {
        println!(" Linux guest on QEMU: skipped, build it first with scripts/build-linux-guest.sh (run from the repository root)");
        return Ok(());
    }
    let dir = std::env::temp_dir().join(format!("vanguard-bench-net-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    println!(" Debian's kernel on QEMU TCG, guest to host, virtio-net backend:");
    let mut results: Vec<(&str, Vec<f64>)> = Vec::new();
    for backend in ["vanguard vhost-user-net", "QEMU tap backend"] {
        let mut figures = Vec::new();
        for _ in 0..runs {
            let socket = dir.join("net.sock");
            let mut keep = Kill(Vec::new());
            let net_args: Vec<String> = if backend.starts_with("vanguard") {
                // A killed backend leaves its socket behind: the next one's must be its own.
                let _ = std::fs::remove_file(&socket);
                let child = Command::new(&exe)
                    .args(["vhost-user", "net", "--socket"])
                    .arg(&socket)
                    .args(["--tap", &tap])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .map_err(|e| e.to_string())?;
                keep.0.push(child);
                let start = Instant::now();
                while !socket.exists() {
                    if start.elapsed() > Duration::from_secs(10) {
                        return Err("the vhost-user-net backend did not start".into());
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                let chardev = format!("socket,id=c0,path={}", socket.display());
                let args = [
                    "-chardev".into(),
                    chardev,
                    "-netdev".into(),
                    "vhost-user,id=n0,chardev=c0".into(),
                ];
                args.to_vec()
            } else {
                ip(&["tuntap", "add", "dev", &tap, "mode", "tap", "vnet_hdr"])?;
                let netdev = format!("tap,id=n0,ifname={tap},script=no,downscript=no,vhost=off");
                vec!["-netdev".into(), netdev]
            };
            ip(&["addr", "add", &format!("{host_ip}/24"), "dev", &tap])?;
            ip(&["link", "set", &tap, "up"])?;
            let result = run_once(&guest, &net_args, host_ip, guest_ip, mib);
            drop(keep);
            let _ = Command::new("ip").args(["link", "del", &tap]).output();
            figures.push(result?);
        }
        results.push((backend, figures));
    }
    let _ = std::fs::remove_dir_all(&dir);
    for (backend, figures) in results {
        report(backend, figures);
    }
    Ok(())
}
