//! Snapshots and live migration of VMs with virtio devices (docs/snapshot.md): the test guest
//! brings up a virtio-blk disk and a virtio-rng device, then keeps writing memory (the `dirty`
//! scenario) while it is saved and restored, or moved to another VMM process over TCP. The
//! guest then verifies every page, and uses the devices again through the rings it had: its
//! MD5 of the whole disk must match the host's `md5sum` of the image. Also: a restore and a
//! migration's destination refuse a disk image that is missing or changed size.

mod common;

use common::dirty::{free_tcp_port, steps, verify, wait_for_step, wait_listening};
use common::linux_qemu::tool_available;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn ready() -> bool {
    common::kvm_available() && tool_available("curl", "--version", "curl")
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// The guest: disk and rng brought up and used, then `dirty` writing every page it writes to
/// the disk too and reading other pages back into memory (so the device writes guest memory
/// all along), then both devices used again after `q`.
const CMDLINE: &str = "console=ttyS0 disk rng dirty=4M,20,disk disk rng";

/// A VM with a 16 MiB disk of random bytes and an rng; returns it once it writes memory.
fn start(dir: &Path, socket: &Path, extra: &[&str]) -> (common::Running, PathBuf) {
    let image = dir.join("disk.img");
    std::fs::write(&image, common::image(16 << 20, 7)).unwrap();
    let disk = format!("path={}", image.display());
    let mut args = vec!["--disk", &disk, "--rng", "--api-socket", socket.to_str().unwrap()];
    args.extend_from_slice(extra);
    let mut vm =
        common::guest(CMDLINE, &args).timeout(Duration::from_secs(180)).spawn_interactive();
    wait_for_step(&mut vm, 0);
    (vm, image)
}

/// The guest goes on from `before`, verifies its memory, stops `dirty` and reads the disk and
/// the rng again through the restored devices; the disk's MD5 must be the host's.
fn check_moved(mut vm: common::Running, before: u64, image: &Path) {
    let first = wait_for_step(&mut vm, 0);
    assert!(first > before, "step {first} is not past {before}");
    verify(&mut vm);
    common::dirty::stop(&mut vm);
    let out = vm.finish();
    out.assert_clean_exit();
    let md5 = common::host_md5(image);
    // Read again after the move (the first reads were the source's).
    let lines = out.stdout.lines().filter(|l| l.trim() == format!("disk0 md5 {md5}")).count();
    assert_eq!(lines, 1, "{}", out.report());
    assert_eq!(out.stdout.matches("rng: read 64 + 64 bytes").count(), 1, "{}", out.report());
}

#[test]
fn a_vm_with_a_disk_and_rng_in_use_is_saved_and_restored() {
    if !ready() {
        return;
    }
    let dir = common::TempDir::new("vsnap");
    let socket = dir.path().join("vmm.sock");
    let snap = dir.path().join("snap");
    let (mut vm, image) = start(dir.path(), &socket, &[]);
    verify(&mut vm);
    // Paused first, so that the source writes nothing more to the disk (which a snapshot
    // references, not copies) before it is killed.
    let (code, answer) = common::curl_unix(&socket, "PUT", "/v1/vm/pause", None);
    assert_eq!(code, 200, "{answer}");
    let before = *steps(&vm.stdout_so_far()).last().unwrap();
    let body = format!(r#"{{"destination":"{}"}}"#, snap.display());
    let (code, answer) = common::curl_unix(&socket, "PUT", "/v1/vm/snapshot", Some(&body));
    assert_eq!(code, 200, "{answer}");
    vm.kill_now();
    let restored = common::run_args(["--restore", snap.to_str().unwrap()])
        .timeout(Duration::from_secs(120))
        .spawn_interactive();
    check_moved(restored, before, &image);
}

#[test]
fn a_vm_with_a_disk_and_rng_in_use_moves_over_tcp() {
    if !ready() {
        return;
    }
    let dir = common::TempDir::new("vmig");
    let socket = dir.path().join("src.sock");
    let (mut src, image) = start(dir.path(), &socket, &[]);
    verify(&mut src);
    let address = format!("tcp:127.0.0.1:{}", free_tcp_port());
    let dst = common::run_args(["--migrate-from", &address])
        .timeout(Duration::from_secs(180))
        .spawn_interactive();
    wait_listening(&address);
    let before = *steps(&src.stdout_so_far()).last().unwrap();
    let body = format!(r#"{{"destination":"{address}"}}"#);
    let (code, answer) = common::curl_unix(&socket, "PUT", "/v1/vm/migrate", Some(&body));
    assert_eq!(code, 200, "{answer}");
    assert_eq!(json(&answer)["phase"], "completed", "{answer}");
    src.finish().assert_code(0).assert_stderr_contains("the VM moved to another VMM");
    check_moved(dst, before, &image);
}

#[test]
fn a_missing_or_resized_disk_image_is_refused_before_the_vm_runs() {
    if !ready() {
        return;
    }
    let dir = common::TempDir::new("vdisk");
    let socket = dir.path().join("vmm.sock");
    let snap = dir.path().join("snap");
    let (mut vm, image) = start(dir.path(), &socket, &[]);
    let body = format!(r#"{{"destination":"{}"}}"#, snap.display());
    let (code, answer) = common::curl_unix(&socket, "PUT", "/v1/vm/snapshot", Some(&body));
    assert_eq!(code, 200, "{answer}");

    // A migration's destination checks before any memory is sent; the source runs on.
    let file = std::fs::OpenOptions::new().write(true).open(&image).unwrap();
    file.set_len(5 << 20).unwrap();
    let address = format!("tcp:127.0.0.1:{}", free_tcp_port());
    let dst = common::run_args(["--migrate-from", &address])
        .timeout(Duration::from_secs(60))
        .spawn_interactive();
    wait_listening(&address);
    let body = format!(r#"{{"destination":"{address}"}}"#);
    let (code, answer) = common::curl_unix(&socket, "PUT", "/v1/vm/migrate", Some(&body));
    assert_eq!(code, 502, "{answer}");
    let why = format!("the disk image {} is 5242880 bytes, it was 16777216", image.display());
    assert!(answer.contains(&why), "{answer}");
    dst.finish().assert_code(1).assert_stderr_contains(&why);
    let seen = steps(&vm.stdout_so_far()).len();
    wait_for_step(&mut vm, seen);
    verify(&mut vm);
    vm.kill_now();

    // A restore, likewise.
    let restore_fails = |needle: &str| {
        common::run_args(["--restore", snap.to_str().unwrap(), "--serial", "none"])
            .timeout(Duration::from_secs(60))
            .run()
            .assert_code(1)
            .assert_stderr_contains(needle)
            .assert_no_panic();
    };
    restore_fails(&why);
    std::fs::remove_file(&image).unwrap();
    restore_fails(&format!("the disk image {} is not reachable here", image.display()));
}

/// A same-host upgrade of the VMM binary: over a Unix socket, a VM with `--memory-shared`
/// hands its RAM (memfds) and its TAP over to the new process instead of copying and
/// reopening them; the guest verifies its memory there, reads its disk again, and talks to
/// the host through the same TAP (hello, ping, UDP echo).
#[test]
fn a_vmm_upgrade_hands_memory_and_the_tap_over() {
    if !ready() || !common::net::net_available() {
        return;
    }
    use std::net::{SocketAddrV4, UdpSocket};
    let tap = common::net::Tap::create();
    let (host, guest_ip) = (tap.host_ip(), tap.guest_ip());
    let socket = UdpSocket::bind(SocketAddrV4::new(host, 5555)).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let hello = |socket: &UdpSocket| {
        let mut buf = [0u8; 256];
        let (n, from) = socket.recv_from(&mut buf).expect("the guest's hello");
        assert_eq!(&buf[..n], b"vanguard-guest hello 1");
        from
    };
    let echo = |socket: &UdpSocket| {
        let payload = b"through the handed-over TAP";
        socket.send_to(payload, SocketAddrV4::new(guest_ip, 7)).unwrap();
        let mut buf = [0u8; 256];
        let (n, _) = socket.recv_from(&mut buf).expect("the guest's echo");
        assert_eq!(&buf[..n], payload);
    };
    // The guest's `dirty ... net:` datagrams (`dirty step N`, one every 64 steps), counted
    // on a thread of their own across the move.
    let counter = UdpSocket::bind(SocketAddrV4::new(host, 5556)).unwrap();
    counter.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let counted = std::thread::spawn(move || {
        let mut steps = Vec::new();
        let mut buf = [0u8; 64];
        while let Ok(n) = counter.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).to_string();
            match text.trim().strip_prefix("dirty step ").and_then(|s| s.parse::<u64>().ok()) {
                Some(step) => steps.push((step, Instant::now())),
                None => break,
            }
        }
        steps
    });
    let dir = common::TempDir::new("vupgrade");
    let image = dir.path().join("disk.img");
    std::fs::write(&image, common::image(16 << 20, 9)).unwrap();
    let api = dir.path().join("src.sock");
    let (disk, net) = (format!("path={}", image.display()), format!("tap={}", tap.name));
    let pings = u32::from(common::net::ping_available());
    let cmdline = format!(
        "console=ttyS0 net={guest_ip},{host},0 disk rng dirty=4M,20,disk,net:{guest_ip}:{host} \
         disk rng net={guest_ip},{host},{pings}"
    );
    let args = [
        "--memory-shared",
        "--disk",
        &disk,
        "--rng",
        "--net",
        &net,
        "--api-socket",
        api.to_str().unwrap(),
    ];
    let mut src =
        common::guest(&cmdline, &args).timeout(Duration::from_secs(180)).spawn_interactive();
    hello(&socket);
    echo(&socket);
    wait_for_step(&mut src, 0);
    verify(&mut src);
    let address = format!("unix:{}", dir.path().join("upgrade.sock").display());
    let dst = common::run_args(["--migrate-from", &address])
        .timeout(Duration::from_secs(180))
        .spawn_interactive();
    wait_listening(&address);
    let before = *steps(&src.stdout_so_far()).last().unwrap();
    let body = format!(r#"{{"destination":"{address}"}}"#);
    let (code, answer) = common::curl_unix(&api, "PUT", "/v1/vm/migrate", Some(&body));
    assert_eq!(code, 200, "{answer}");
    let info = json(&answer);
    // Nothing was copied: the memory went over as memfds.
    assert_eq!(info["bytes_sent"], 0, "{info}");
    assert_eq!(info["passes"], 0, "{info}");
    src.finish().assert_code(0).assert_stderr_contains("the VM moved to another VMM");
    let mut dst = dst;
    let first = wait_for_step(&mut dst, 0);
    assert!(first > before, "step {first} is not past {before}");
    verify(&mut dst);
    common::dirty::stop(&mut dst);
    // The datagrams went on from the new process through the handed-over TAP, with no step
    // missing around the move (a pause of a few milliseconds).
    UdpSocket::bind("127.0.0.1:0").unwrap().send_to(b"end", SocketAddrV4::new(host, 5556)).unwrap();
    let arrived = counted.join().unwrap();
    let sent: Vec<u64> = arrived.iter().map(|(step, _)| *step).collect();
    assert!(sent.iter().any(|s| *s > before + 64), "no datagram after the move: {sent:?}");
    for pair in sent.windows(2) {
        assert_eq!(pair[1] - pair[0], 64, "a gap in the datagrams: {sent:?}");
    }
    // Nor a gap in time much larger than the downtime: the longest wait between two
    // datagrams (the move's among them) against their usual spacing and the downtime the
    // source reported, with room for a loaded machine's scheduling.
    let mut gaps: Vec<Duration> = arrived.windows(2).map(|p| p[1].1 - p[0].1).collect();
    let longest = *gaps.iter().max().expect("datagrams");
    gaps.sort();
    let usual = gaps[gaps.len() / 2];
    let downtime = Duration::from_micros(info["downtime_us"].as_u64().unwrap());
    println!(
        "datagrams: {} steps, usual spacing {usual:?}, longest {longest:?}, downtime {downtime:?}",
        sent.len()
    );
    let bound = downtime + usual * 4 + Duration::from_millis(250);
    assert!(
        longest <= bound,
        "a {longest:?} wait between two datagrams (usual {usual:?}, downtime {downtime:?})"
    );
    // The last `net` scenario, in the new process, on the TAP it was handed.
    hello(&socket);
    if pings > 0 {
        common::net::ip(&["neigh", "flush", "dev", &tap.name]);
        common::net::ping(guest_ip, 1);
    }
    echo(&socket);
    let out = dst.finish();
    out.assert_clean_exit();
    let md5 = common::host_md5(&image);
    out.assert_line(&format!("disk0 md5 {md5}"));
}
