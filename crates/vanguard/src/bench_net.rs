//! `vanguard bench net`: guest-to-host TCP throughput over a TAP, side by side: the same Linux
//! guest (Debian's kernel and the busybox initramfs of scripts/build-linux-guest.sh, its
//! `vanguard.test=netbench` scenario: `dd if=/dev/zero | nc HOST PORT`) on QEMU, with its
//! virtio-net served (a) by Vanguard's vhost-user-net backend (`vanguard vhost-user net`) and
//! (b) by QEMU's own TAP backend. The host times the stream from its first byte to the end.
//!
//! Vanguard's VMM itself cannot run that Linux guest on a host without hardware virtualization
//! (see docs/linux-guest.md), and its test guest has no TCP, so the guest here is QEMU's; with
//! TCG the guest's CPU is the bottleneck, which both columns share.

use std::io::Read;
use std::net::TcpListener;
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
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut conn = loop {
        match listener.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err("the guest did not connect within 120 s".into());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e.to_string()),
        }
    };
    conn.set_nonblocking(false).map_err(|e| e.to_string())?;
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

/// Runs the benchmark: `runs` runs of `mib` MiB per backend.
pub fn run(mib: u64, runs: usize) -> Result<(), String> {
    let guest = PathBuf::from("build/linux-guest");
    if !guest.join("vmlinuz").is_file() || !guest.join("initramfs.cpio.gz").is_file() {
        return Err("build the Linux guest first: scripts/build-linux-guest.sh (run from the repository root)".into());
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let tap = format!("vgbn{}", std::process::id() % 100_000);
    let dir = std::env::temp_dir().join(format!("vanguard-bench-net-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let (host_ip, guest_ip) = ("10.79.0.1", "10.79.0.2");
    println!("net: guest-to-host TCP, {mib} MiB per run, Debian's kernel on QEMU TCG, virtio-net over a TAP");
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
    for (backend, mut figures) in results {
        figures.sort_by(f64::total_cmp);
        let text: Vec<String> =
            figures.iter().map(|f| format!("{:.0}", f * 8.0 * 1.048576)).collect();
        println!(
            "  {backend:<24} median {:.0} Mbit/s (runs: {} Mbit/s)",
            figures[figures.len() / 2] * 8.0 * 1.048576,
            text.join(", ")
        );
    }
    Ok(())
}
