//! `vanguard vhost-user blk` checked by a peer: QEMU (TCG, no KVM needed) attaches the backend as
//! a `vhost-user-blk-pci` device and boots Debian's stock kernel with the busybox initramfs of
//! scripts/build-linux-guest.sh, whose /init runs the `vanguard.test=blk` scenario: Linux's own
//! virtio_blk driver reads the disk, writes and discards ranges, and builds an ext2 file system on
//! a second disk. The host then checks the image files (md5, the written bytes, `e2fsck -fn`,
//! `debugfs -R cat`).
//!
//! Without QEMU (or e2fsprogs) the QEMU tests are skipped unless `VANGUARD_REQUIRE_TOOLS=1`;
//! without the Linux guest (the build script needs Debian's package mirrors) unless
//! `VANGUARD_REQUIRE_LINUX=1`. The command-line tests need neither. Every path kills QEMU and
//! the backends it started (their `Drop`).

mod common;

use common::linux_qemu::{
    feature, linux_guest, run_qemu, tool_available, LinuxGuest, Proc, BACKEND_TIMEOUT, INIT,
};

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, ExitStatus};

/// `vanguard vhost-user blk ARGS`.
fn backend<S: AsRef<OsStr>>(args: &[S]) -> Proc {
    let mut cmd = Command::new(common::BIN);
    cmd.args(["vhost-user", "blk"]).args(args);
    let shown: Vec<String> =
        args.iter().map(|a| a.as_ref().to_string_lossy().into_owned()).collect();
    Proc::spawn(&format!("vanguard vhost-user blk {}", shown.join(" ")), &mut cmd)
}

/// A backend on `socket` for `image` with `extra` flags, listening.
fn listening_backend(socket: &Path, image: &Path, extra: &[&str]) -> Proc {
    let mut args =
        vec!["--socket".as_ref(), socket.as_os_str(), "--image".as_ref(), image.as_os_str()];
    args.extend(extra.iter().map(OsStr::new));
    let mut proc = backend(&args);
    assert!(
        proc.wait_for_output("listening on", BACKEND_TIMEOUT),
        "the backend did not start listening\n{}",
        proc.report()
    );
    assert!(socket.exists(), "no socket at {}\n{}", socket.display(), proc.report());
    proc
}

/// One vhost-user-blk device for QEMU: its socket and how many queues QEMU gives it.
struct Disk<'a> {
    socket: &'a Path,
    queues: u16,
}

/// QEMU (TCG) with these vhost-user-blk disks, booting the guest into `vanguard.test=blk`.
fn qemu(guest: &LinuxGuest, cpus: u8, disks: &[Disk<'_>]) -> Proc {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-machine", "q35", "-smp", &cpus.to_string(), "-m", "512M"]);
    // vhost-user needs guest memory the backend can map: a shared memfd.
    cmd.args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on"]);
    cmd.args(["-numa", "node,memdev=mem"]);
    for (i, disk) in disks.iter().enumerate() {
        cmd.arg("-chardev").arg(format!("socket,id=vhu{i},path={}", disk.socket.display()));
        cmd.arg("-device")
            .arg(format!("vhost-user-blk-pci,chardev=vhu{i},num-queues={}", disk.queues));
    }
    cmd.arg("-kernel").arg(&guest.vmlinuz).arg("-initrd").arg(&guest.initramfs);
    cmd.args(["-append", "console=ttyS0 panic=-1 vanguard.test=blk"]);
    cmd.args(["-nographic", "-no-reboot"]);
    Proc::spawn("qemu-system-x86_64", &mut cmd)
}

/// A backend whose frontend went away ends by itself, with status 0, and removes its socket.
#[track_caller]
fn assert_backend_done(backend: &mut Proc, socket: &Path) {
    let status = backend.wait_exit(BACKEND_TIMEOUT);
    assert!(
        status.is_some_and(|s| s.success()),
        "the backend did not exit 0 after its frontend left\n{}",
        backend.report()
    );
    let out = backend.output();
    assert!(out.contains("frontend acked features"), "{}", backend.report());
    assert!(out.contains("frontend disconnected; exiting"), "{}", backend.report());
    assert!(!socket.exists(), "the backend left its socket behind\n{}", backend.report());
}

/// The guest's `blk` line that starts with `prefix` (after "blk "), as key=value pairs.
#[track_caller]
fn guest_line<'a>(console: &'a str, prefix: &str) -> HashMap<&'a str, &'a str> {
    let start = format!("{INIT}blk {prefix}");
    let lines: Vec<&str> = console.lines().filter(|l| l.trim_end().starts_with(&start)).collect();
    assert_eq!(lines.len(), 1, "expected one line starting with {start:?}\n{console}");
    lines[0].trim_end().split(' ').filter_map(|word| word.split_once('=')).collect()
}

/// Deterministic bytes that do not repeat within an image.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn md5(path: &Path) -> String {
    let out = Command::new("md5sum").arg(path).output().expect("md5sum runs");
    assert!(out.status.success(), "md5sum {}", path.display());
    String::from_utf8_lossy(&out.stdout).split(' ').next().unwrap_or_default().to_string()
}

/// What /init writes at 1 MiB: 256 numbered 32-byte lines.
fn pattern() -> Vec<u8> {
    (0..256).flat_map(|i| format!("vanguard-vhost-user-blk-{i:07}\n").into_bytes()).collect()
}

const MIB: usize = 1 << 20;

/// Linux reads the disk, writes 8 KiB, discards 64 KiB (on a disk served with two queues), and
/// builds an ext2 file system on a second disk; the host finds all of it in the files.
#[test]
fn linux_reads_writes_discards_and_builds_ext2_over_vhost_user() {
    if !tool_available("qemu-system-x86_64", "--version", "qemu-system-x86")
        || !tool_available("e2fsck", "-V", "e2fsprogs")
        || !tool_available("debugfs", "-V", "e2fsprogs")
    {
        return;
    }
    let Some(guest) = linux_guest() else { return };
    let dir = common::TempDir::new("vhost-user-blk");
    let original = noise(8 * MIB, 0x5eed);
    let a_img = dir.file("a.img", &original);
    let b_img = dir.path().join("b.img");
    std::fs::File::create(&b_img).and_then(|f| f.set_len(32 * MIB as u64)).unwrap();
    let (a_sock, b_sock) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let md5_before = md5(&a_img);

    let mut a = listening_backend(&a_sock, &a_img, &["--serial", "vhu-test-a", "--queues", "2"]);
    // The file system disk goes through O_DIRECT where the temp directory's file system has it.
    let direct =
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&b_img).is_ok();
    let mut b = listening_backend(&b_sock, &b_img, if direct { &["--direct"] } else { &[] });
    assert_eq!(b.output().contains("O_DIRECT"), direct, "{}", b.report());
    let disks = [Disk { socket: &a_sock, queues: 2 }, Disk { socket: &b_sock, queues: 1 }];
    let mut vm = qemu(guest, 2, &disks);
    let console = run_qemu(&mut vm, &[&a, &b]);
    let all = format!("{}\n{}\n{}", vm.report(), a.report(), b.report());
    println!("{}", console.lines().filter(|l| l.starts_with(INIT)).collect::<Vec<_>>().join("\n"));
    assert_backend_done(&mut a, &a_sock);
    assert_backend_done(&mut b, &b_sock);

    // What the driver saw: sizes, serial, queues, features, the bytes.
    let vda = guest_line(&console, "disk=vda ");
    assert_eq!(vda["sectors"], "16384", "{all}");
    assert_eq!(vda["ro"], "0", "{all}");
    assert_eq!(vda["serial"], "vhu-test-a", "{all}");
    assert_eq!(vda["queues"], "2", "{all}");
    assert_eq!(vda["md5"], md5_before, "Linux read other bytes than the image holds\n{all}");
    let features = vda["features"];
    assert!(feature(features, 29), "EVENT_IDX negotiated: {features}\n{all}");
    assert!(feature(features, 12), "MQ negotiated: {features}\n{all}");
    assert!(feature(features, 13) && feature(features, 14), "DISCARD, WRITE_ZEROES: {features}");
    assert!(!feature(features, 5), "not read-only: {features}");
    let vdb = guest_line(&console, "disk=vdb ");
    assert_eq!(vdb["sectors"], "65536", "{all}");
    assert_eq!(vdb["queues"], "1", "{all}");

    // The write and the discard, in the file.
    let write = guest_line(&console, "write disk=vda ");
    assert_eq!((write["result"], write["readback"]), ("ok", "match"), "{all}");
    assert_eq!(guest_line(&console, "discard disk=vda ")["result"], "ok", "{all}");
    let now = std::fs::read(&a_img).unwrap();
    let pattern = pattern();
    assert_eq!(&now[MIB..MIB + pattern.len()], &pattern[..], "the guest's write is in the file");
    assert!(now[2 * MIB..2 * MIB + 65536].iter().all(|&b| b == 0), "the discard zeroed its range");
    let mut expected = original.clone();
    expected[MIB..MIB + pattern.len()].copy_from_slice(&pattern);
    expected[2 * MIB..2 * MIB + 65536].fill(0);
    assert!(now == expected, "bytes outside the written and discarded ranges changed");
    assert_eq!(guest_line(&console, "after disk=vda ")["md5"], md5(&a_img), "{all}");

    // The file system, checked by the host's e2fsprogs.
    let fs = guest_line(&console, "fs disk=vdb ");
    for step in ["mkfs", "mount", "files", "umount"] {
        assert_eq!(fs[step], "ok", "{step}\n{all}");
    }
    let fsck = Command::new("e2fsck").arg("-fn").arg(&b_img).output().unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck -fn found problems:\n{}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    let cat = |file: &str| {
        let request = format!("cat {file}");
        let out = Command::new("debugfs").args(["-R", &request]).arg(&b_img).output().unwrap();
        assert!(out.status.success(), "debugfs cat {file}");
        out.stdout
    };
    assert_eq!(cat("/hello.txt"), b"hello from Linux over vhost-user-blk\n");
    assert!(cat("/dir/pattern.bin") == pattern.repeat(16), "/dir/pattern.bin differs");
    common_tail(&console);
}

/// The scenario ran to its end and /init powered off.
#[track_caller]
fn common_tail(console: &str) {
    for line in ["blk begin", "blk end", "poweroff"] {
        assert!(
            console.lines().any(|l| l.trim_end() == format!("{INIT}{line}")),
            "expected {line:?} from /init\n{console}"
        );
    }
}

/// `--readonly`: Linux sees a read-only disk, its write fails, and the file keeps its bytes.
#[test]
fn linux_sees_a_read_only_vhost_user_disk() {
    if !tool_available("qemu-system-x86_64", "--version", "qemu-system-x86") {
        return;
    }
    let Some(guest) = linux_guest() else { return };
    let dir = common::TempDir::new("vhost-user-blk-ro");
    let original = noise(4 * MIB, 0xdead);
    let img = dir.file("ro.img", &original);
    let sock = dir.path().join("ro.sock");
    let md5_before = md5(&img);
    let mut backend = listening_backend(&sock, &img, &["--readonly"]);
    let mut vm = qemu(guest, 1, &[Disk { socket: &sock, queues: 1 }]);
    let console = run_qemu(&mut vm, &[&backend]);
    let all = format!("{}\n{}", vm.report(), backend.report());
    println!("{}", console.lines().filter(|l| l.starts_with(INIT)).collect::<Vec<_>>().join("\n"));
    assert_backend_done(&mut backend, &sock);
    let vda = guest_line(&console, "disk=vda ");
    assert_eq!(vda["ro"], "1", "{all}");
    assert!(feature(vda["features"], 5), "VIRTIO_BLK_F_RO offered\n{all}");
    assert!(!feature(vda["features"], 13), "no DISCARD on a read-only disk\n{all}");
    assert_eq!(vda["md5"], md5_before, "{all}");
    assert_eq!(guest_line(&console, "write disk=vda ")["result"], "refused", "{all}");
    assert!(std::fs::read(&img).unwrap() == original, "a read-only image changed");
    common_tail(&console);
}

/// Runs `vanguard vhost-user blk ARGS` to its end (it must end by itself).
fn run_backend<S: AsRef<OsStr>>(args: &[S]) -> (ExitStatus, String) {
    let mut proc = backend(args);
    let status = proc.wait_exit(BACKEND_TIMEOUT);
    let status = status.unwrap_or_else(|| panic!("the backend did not exit\n{}", proc.report()));
    (status, proc.output())
}

#[test]
fn bad_arguments_fail_with_one_clear_line() {
    let dir = common::TempDir::new("vhost-user-args");
    let img = dir.file("disk.img", &[0u8; 4096]);
    let sock = dir.path().join("s.sock");
    let (sock_s, img_s) = (sock.to_str().unwrap(), img.to_str().unwrap());

    let missing = dir.path().join("missing.img");
    let (status, out) = run_backend(&["--socket", sock_s, "--image", missing.to_str().unwrap()]);
    assert_eq!(status.code(), Some(1), "{out}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.starts_with("vanguard: error: cannot open disk image "), "{out}");
    assert!(out.contains("missing.img: No such file or directory"), "{out}");
    assert!(!sock.exists(), "no socket without a disk");

    let (status, out) = run_backend(&["--socket", sock_s, "--image", dir.path().to_str().unwrap()]);
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(out.contains("Is a directory"), "{out}");

    let file = dir.file("not-a-socket", b"keep me");
    let (status, out) = run_backend(&["--socket", file.to_str().unwrap(), "--image", img_s]);
    assert_eq!(status.code(), Some(1), "{out}");
    assert_eq!(
        out.trim_end(),
        format!("vanguard: error: {} exists and is not a socket; not replacing it", file.display())
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");

    let nowhere = dir.path().join("no-such-dir/s.sock");
    let (status, out) = run_backend(&["--socket", nowhere.to_str().unwrap(), "--image", img_s]);
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(out.starts_with("vanguard: error: cannot listen on socket "), "{out}");

    // clap's errors: status 2, the reason on the first line.
    let long_serial = "x".repeat(21);
    for (args, reason) in [
        (vec!["--socket", sock_s, "--image", img_s, "--queues", "0"], "0 is not in 1..=64"),
        (vec!["--socket", sock_s, "--image", img_s, "--serial", &long_serial], "longer than 20"),
        (vec!["--socket", sock_s, "--image", img_s, "--bogus"], "unexpected argument '--bogus'"),
        (vec!["--image", img_s], "--socket <PATH>"),
    ] {
        let (status, out) = run_backend(&args);
        assert_eq!(status.code(), Some(2), "{args:?}: {out}");
        assert!(out.contains(reason), "{args:?}: expected {reason:?} in\n{out}");
    }
    assert!(!sock.exists());
}

/// Sends one vhost-user request without payload; returns the reply's u64 payload.
fn request_u64(stream: &mut UnixStream, request: u32) -> u64 {
    let mut msg = Vec::new();
    for word in [request, 1, 0] {
        msg.extend_from_slice(&word.to_le_bytes()); // request, flags (version 1), size
    }
    stream.write_all(&msg).unwrap();
    let mut reply = [0u8; 20];
    stream.read_exact(&mut reply).unwrap();
    assert_eq!(u32::from_le_bytes(reply[0..4].try_into().unwrap()), request);
    assert_eq!(u32::from_le_bytes(reply[8..12].try_into().unwrap()), 8);
    u64::from_le_bytes(reply[12..20].try_into().unwrap())
}

/// A stale socket is replaced; a live one is refused, and the probe does not end the backend
/// that owns it; SIGTERM ends a backend whose frontend is connected, and removes the socket.
#[test]
fn sockets_stale_live_and_sigterm() {
    let dir = common::TempDir::new("vhost-user-socket");
    let img = dir.file("disk.img", &noise(1 << 16, 7));
    let sock = dir.path().join("s.sock");
    drop(UnixListener::bind(&sock).unwrap()); // leaves a socket nobody listens on
    assert!(sock.exists());
    let mut first = listening_backend(&sock, &img, &[]);

    let (status, out) =
        run_backend(&["--socket", sock.to_str().unwrap(), "--image", img.to_str().unwrap()]);
    assert_eq!(status.code(), Some(1), "{out}");
    assert_eq!(
        out.trim_end(),
        format!(
            "vanguard: error: socket {} is in use: another process accepts connections on it",
            sock.display()
        )
    );
    assert!(
        first.wait_for_output("closed before its first vhost-user message", BACKEND_TIMEOUT),
        "{}",
        first.report()
    );
    assert!(first.try_status().is_none(), "the probe ended the backend\n{}", first.report());

    // A frontend by hand: the features it is offered.
    let mut frontend = UnixStream::connect(&sock).unwrap();
    frontend.set_read_timeout(Some(BACKEND_TIMEOUT)).unwrap();
    let features = request_u64(&mut frontend, 1); // GET_FEATURES
    for (bit, name) in [(32, "VERSION_1"), (29, "EVENT_IDX"), (30, "PROTOCOL_FEATURES")] {
        assert_ne!(features & (1 << bit), 0, "{name} offered: {features:#x}");
    }
    assert_eq!(features & (1 << 12), 0, "no MQ with one queue: {features:#x}");
    let protocol = request_u64(&mut frontend, 15); // GET_PROTOCOL_FEATURES
    assert_eq!(protocol & 0x201, 0x201, "CONFIG and MQ offered: {protocol:#x}");

    first.signal(libc::SIGTERM);
    let status = first.wait_exit(BACKEND_TIMEOUT);
    assert!(status.is_some_and(|s| s.success()), "{}", first.report());
    assert!(first.output().contains("SIGTERM: stopping"), "{}", first.report());
    assert!(!sock.exists(), "the socket is removed");
    // The backend hung up on the frontend.
    let mut byte = [0u8; 1];
    assert!(matches!(frontend.read(&mut byte), Ok(0) | Err(_)));

    // SIGTERM before any frontend: the same.
    let mut idle = listening_backend(&sock, &img, &[]);
    idle.signal(libc::SIGTERM);
    assert!(idle.wait_exit(BACKEND_TIMEOUT).is_some_and(|s| s.success()), "{}", idle.report());
    assert!(!sock.exists());
}
