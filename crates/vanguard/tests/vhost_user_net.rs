//! `vanguard vhost-user net` checked by a peer: QEMU (TCG, no KVM needed) attaches the backend
//! as a `-netdev vhost-user` behind a `virtio-net-pci` and boots Debian's stock kernel with the
//! busybox initramfs of scripts/build-linux-guest.sh, whose /init runs `vanguard.test=net`:
//! Linux's own virtio_net driver brings the interface up on the TAP the backend created, pings
//! the host, sends it 4 MiB over TCP and receives 3 MiB from it; both ends compare md5s. The
//! host pings the guest too.
//!
//! Needs what the TAP tests need (`common::net::net_available`: /dev/net/tun, CAP_NET_ADMIN,
//! `ip`; skipped without, a failure under `VANGUARD_REQUIRE_KVM=1`), QEMU
//! (`VANGUARD_REQUIRE_TOOLS`) and the Linux guest (`VANGUARD_REQUIRE_LINUX`).
//!
//! QEMU 7.2 (Debian 12's) crashes (SIGSEGV in msix_set_vector_notifiers, before the backend
//! hears of the start) when a vhost-user netdev starts under TCG with MSI-X, so the device has
//! `vectors=0`: Linux's virtio_net then uses the legacy interrupt.

mod common;

use common::linux_qemu::{
    feature, linux_guest, run_qemu, tool_available, Proc, BACKEND_TIMEOUT, INIT,
};
use common::net::{accept_within, md5_hex, net_available, ping, ping_available, take_subnet, Tap};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// What the guest sends (set by /init: 64 blocks of 64 KiB) and what the host sends back.
const GUEST_BYTES: usize = 4 << 20;
const HOST_BYTES: usize = (3 << 20) + 4321;

/// `vanguard vhost-user net --socket SOCKET --tap TAP`, listening.
fn listening_backend(socket: &Path, tap: &str) -> Proc {
    let mut cmd = Command::new(common::BIN);
    cmd.args(["vhost-user", "net", "--socket"]).arg(socket).args(["--tap", tap]);
    let mut proc = Proc::spawn(&format!("vanguard vhost-user net --tap {tap}"), &mut cmd);
    assert!(
        proc.wait_for_output("listening on", BACKEND_TIMEOUT),
        "the backend did not start listening\n{}",
        proc.report()
    );
    proc
}

/// The guest's `net` line that starts with `prefix` (after "net "), as key=value pairs.
#[track_caller]
fn guest_line<'a>(console: &'a str, prefix: &str) -> HashMap<&'a str, &'a str> {
    let start = format!("{INIT}net {prefix}");
    let lines: Vec<&str> = console.lines().filter(|l| l.trim_end().starts_with(&start)).collect();
    assert_eq!(lines.len(), 1, "expected one line starting with {start:?}\n{console}");
    lines[0].trim_end().split(' ').filter_map(|word| word.split_once('=')).collect()
}

/// The host's side of the TCP exchange, on its own thread: takes the guest's bytes on
/// `listener` and answers with their md5; then, once `go` says so, connects to the guest's
/// `port + 1` (retrying until the guest listens) and sends `data`. Returns the bytes it
/// received.
fn host_side(
    listener: TcpListener,
    guest: Ipv4Addr,
    port: u16,
    data: Vec<u8>,
    go: std::sync::mpsc::Receiver<()>,
) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut conn = accept_within(&listener, Duration::from_secs(90));
    conn.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut received = Vec::new();
    conn.read_to_end(&mut received).expect("the guest's bytes");
    conn.write_all(format!("{}\n", md5_hex(&received)).as_bytes()).unwrap();
    drop(conn);

    let _ = go.recv();
    let to = SocketAddr::from((guest, port + 1));
    let mut out = loop {
        match TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("cannot connect to the guest at {to}: {e}"),
        }
    };
    out.write_all(&data).expect("send to the guest");
    received
}

/// Linux pings the host, and TCP carries 4 MiB out of the guest and 3 MiB into it, all
/// through Vanguard's vhost-user-net backend; the host pings the guest meanwhile.
#[test]
fn linux_pings_and_moves_tcp_both_ways_over_vhost_user_net() {
    if !net_available() || !tool_available("qemu-system-x86_64", "--version", "qemu-system-x86") {
        return;
    }
    let Some(guest) = linux_guest() else { return };
    let dir = common::TempDir::new("vhost-user-net");
    let socket = dir.path().join("net.sock");
    // The backend creates the TAP; the guard deletes it if the backend leaves it behind.
    let mut tap = Tap::missing();
    let mut backend = listening_backend(&socket, &tap.name);
    tap.configure_on(take_subnet());
    let (host_ip, guest_ip) = (tap.host_ip(), tap.guest_ip());
    let listener = TcpListener::bind((host_ip, 0)).expect("listen on the TAP's address");
    let port = listener.local_addr().unwrap().port();

    let data = common::image(HOST_BYTES, 0x006e_6574);
    let host_md5 = md5_hex(&data);
    let (go, wait) = std::sync::mpsc::channel();
    let host = std::thread::spawn(move || host_side(listener, guest_ip, port, data, wait));

    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-machine", "q35", "-m", "512M"]);
    cmd.args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on"]);
    cmd.args(["-numa", "node,memdev=mem"]);
    cmd.arg("-chardev").arg(format!("socket,id=vhu,path={}", socket.display()));
    cmd.args(["-netdev", "vhost-user,id=net0,chardev=vhu"]);
    cmd.args(["-device", "virtio-net-pci,netdev=net0,mac=52:54:00:76:68:75,vectors=0"]);
    cmd.arg("-kernel").arg(&guest.vmlinuz).arg("-initrd").arg(&guest.initramfs);
    cmd.arg("-append").arg(format!(
        "console=ttyS0 panic=-1 vanguard.test=net vanguard.net={guest_ip},{host_ip},{port}"
    ));
    cmd.args(["-nographic", "-no-reboot"]);
    let mut vm = Proc::spawn("qemu-system-x86_64", &mut cmd);

    // The host pings the guest while it waits for the host's data (which then ends the run).
    let all = |vm: &Proc, backend: &Proc| format!("{}\n{}", vm.report(), backend.report());
    assert!(
        vm.wait_for_output(&format!("{INIT}net listen"), Duration::from_secs(120)),
        "the guest did not get to its listening step\n{}",
        all(&vm, &backend)
    );
    if ping_available() {
        ping(guest_ip, 3);
    }
    go.send(()).expect("the host's side waits");
    let console = run_qemu(&mut vm, &[&backend]);
    let received = host.join().expect("the host's side");
    let all = all(&vm, &backend);
    println!("{}", console.lines().filter(|l| l.starts_with(INIT)).collect::<Vec<_>>().join("\n"));

    let nic = guest_line(&console, "if=");
    assert_eq!(nic["mac"], "52:54:00:76:68:75", "{all}");
    let features = nic["features"];
    for (bit, name) in [(0, "CSUM"), (1, "GUEST_CSUM"), (7, "GUEST_TSO4"), (11, "HOST_TSO4")] {
        assert!(feature(features, bit), "{name} negotiated: {features}\n{all}");
    }
    assert!(feature(features, 29) && feature(features, 32), "EVENT_IDX, VERSION_1: {features}");
    assert_eq!(guest_line(&console, "ping host=")["result"], "ok", "{all}");

    // Guest to host: the host's md5 of what arrived is the guest's md5 of what it sent.
    let sent = guest_line(&console, "send bytes=");
    assert_eq!(sent["bytes"], GUEST_BYTES.to_string(), "{all}");
    assert_eq!(received.len(), GUEST_BYTES, "{all}");
    assert_eq!(md5_hex(&received), sent["md5"], "the bytes changed on the way\n{all}");
    assert_eq!(guest_line(&console, "send host_md5=")["host_md5"], sent["md5"], "{all}");
    // Host to guest.
    let recv = guest_line(&console, "recv bytes=");
    assert_eq!(recv["bytes"], HOST_BYTES.to_string(), "{all}");
    assert_eq!(recv["md5"], host_md5, "the bytes changed on the way\n{all}");
    assert!(console.contains(&format!("{INIT}net end")), "{all}");

    // The backend saw the frontend go and removed its socket; with it went the TAP it made.
    let status = backend.wait_exit(BACKEND_TIMEOUT);
    assert!(status.is_some_and(|s| s.success()), "{}", backend.report());
    let out = backend.output();
    assert!(out.contains("frontend acked features"), "{out}");
    assert!(out.contains("frontend disconnected; exiting"), "{out}");
    assert!(!socket.exists(), "the backend left its socket behind\n{out}");
    assert!(!common::net::link_exists(&tap.name), "the backend's TAP outlived it");
}

/// Runs `vanguard vhost-user net ARGS` to its end (it must end by itself).
fn run_backend(args: &[&str]) -> (Option<i32>, String) {
    let mut cmd = Command::new(common::BIN);
    cmd.args(["vhost-user", "net"]).args(args);
    let mut proc = Proc::spawn(&format!("vanguard vhost-user net {}", args.join(" ")), &mut cmd);
    let status = proc.wait_exit(BACKEND_TIMEOUT);
    let status = status.unwrap_or_else(|| panic!("the backend did not exit\n{}", proc.report()));
    (status.code(), proc.output())
}

#[test]
fn bad_arguments_fail_with_one_clear_line() {
    let dir = common::TempDir::new("vhost-user-net-args");
    let sock = dir.path().join("s.sock");
    let sock_s = sock.to_str().unwrap();
    for (tap, reason) in [
        ("a-name-that-is-too-long", "longer than 15 bytes"),
        ("bad/name", "contains '/'"),
        ("", "empty"),
    ] {
        let (code, out) = run_backend(&["--socket", sock_s, "--tap", tap]);
        assert_eq!(code, Some(2), "{tap:?}: {out}");
        assert!(out.contains(reason), "{tap:?}: expected {reason:?} in\n{out}");
    }
    let (code, out) = run_backend(&["--tap", "vg0"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("--socket <PATH>"), "{out}");

    // An interface that is not a TAP: refused by name, before any socket exists.
    if net_available() {
        let (code, out) = run_backend(&["--socket", sock_s, "--tap", "lo"]);
        assert_eq!(code, Some(1), "{out}");
        assert_eq!(out.lines().count(), 1, "{out}");
        assert!(out.starts_with("vanguard: error: cannot open TAP device lo: TUNSETIFF"), "{out}");
    }
    assert!(!sock.exists());
}
