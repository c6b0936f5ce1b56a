//! `vanguard run --disk vhost-user=SOCKET`: the VMM as a vhost-user frontend. The test guest's
//! virtio-blk driver reads the whole disk (md5 against the host's md5sum of the image) and
//! writes a pattern that must land in the image file, with the disk served by an external
//! backend: Vanguard's own `vanguard vhost-user blk`, and qemu-storage-daemon's vhost-user-blk
//! export (skipped when absent unless `VANGUARD_REQUIRE_TOOLS=1`), on both transports.

mod common;

use common::guest;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian's qemu-system-x86 package installs it.
const QSD: &str = "qemu-storage-daemon";

/// md5sum of a file, from the host's own tool.
fn md5(path: &Path) -> String {
    let out = Command::new("md5sum").arg(path).output().expect("run md5sum");
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or("").to_string()
}

/// Bytes that differ at every position, so a misplaced read shows in the checksum.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

/// A backend process, killed (and reaped) when dropped.
struct Backend {
    child: Child,
    what: &'static str,
}

impl Backend {
    /// Starts `cmd` and waits until `socket` accepts connections... without connecting (the
    /// backends serve the first frontend): until the socket file exists.
    fn start(what: &'static str, cmd: &mut Command, socket: &Path) -> Backend {
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let mut backend = Backend { child, what };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            if let Ok(Some(status)) = backend.child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = backend.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                panic!("{what} exited with {status} before listening: {err}");
            }
            assert!(Instant::now() < deadline, "{what} did not create {}", socket.display());
            std::thread::sleep(Duration::from_millis(20));
        }
        backend
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        if self.child.wait().is_err() {
            eprintln!("cannot reap {}", self.what);
        }
    }
}

/// Vanguard's backend on `image`, listening on `socket`.
fn vanguard_backend(socket: &Path, image: &Path) -> Backend {
    let mut cmd = Command::new(common::BIN);
    cmd.args(["vhost-user", "blk", "--socket"]).arg(socket).arg("--image").arg(image);
    Backend::start("vanguard vhost-user blk", &mut cmd, socket)
}

/// qemu-storage-daemon exporting `image` writable on `socket`.
fn qsd_backend(socket: &Path, image: &Path) -> Backend {
    let mut cmd = Command::new(QSD);
    cmd.arg("--blockdev")
        .arg(format!("driver=file,node-name=f,filename={}", image.display()))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on",
            socket.display()
        ));
    Backend::start("qemu-storage-daemon", &mut cmd, socket)
}

/// Whether qemu-storage-daemon runs here; skips (prints why) or fails under
/// `VANGUARD_REQUIRE_TOOLS=1`.
fn qsd_available() -> bool {
    if Command::new(QSD).arg("--version").output().is_ok() {
        return true;
    }
    let why = format!("{QSD} not found (Debian package qemu-system-x86)");
    if common::env_flag("VANGUARD_REQUIRE_TOOLS") {
        panic!("{why}; VANGUARD_REQUIRE_TOOLS=1 makes that a failure");
    }
    println!("skipping: {why} (set VANGUARD_REQUIRE_TOOLS=1 to make this a failure)");
    false
}

type StartBackend = fn(&Path, &Path) -> Backend;

/// The guest reads the disk whole through the backend (md5 equal to the host's), then, in a
/// second VM on the same backend kind, writes its pattern over the first 300 KiB, which the
/// host then finds in the file, the rest unchanged.
fn read_and_write_through(start: StartBackend, transport: &str, dir: &common::TempDir) {
    let original = pattern((5 << 20) + 512 * 3, 7);
    let image = dir.file(&format!("{transport}.img"), &original);
    let socket: PathBuf = dir.path().join(format!("{transport}.sock"));
    let sum = md5(&image);
    let disk = format!("vhost-user={}", socket.display());
    {
        let _backend = start(&socket, &image);
        let out =
            guest("console=ttyS0 disk", &["--virtio-transport", transport, "--disk", &disk]).run();
        out.assert_clean_exit();
        out.assert_line(&format!("disk0 md5 {sum}"));
        out.assert_line("disk0: 10243 sectors");
    }
    let _ = std::fs::remove_file(&socket);
    {
        let _backend = start(&socket, &image);
        let out = guest(
            "console=ttyS0 diskwrite=300K",
            &["--virtio-transport", transport, "--disk", &disk],
        )
        .run();
        out.assert_clean_exit();
        out.assert_line("disk0 write: wrote, flushed and verified 300 KiB: ok");
    }
    common::assert_diskwrite_pattern(&image, &original, 300 << 10);
}

#[test]
fn vanguard_backend_serves_the_guest_over_pci_and_mmio() {
    if !common::kvm_available() {
        return;
    }
    let dir = common::TempDir::new("vhu-frontend-vanguard");
    for transport in ["pci", "mmio"] {
        read_and_write_through(vanguard_backend, transport, &dir);
    }
}

#[test]
fn qemu_storage_daemon_serves_the_guest_over_pci_and_mmio() {
    if !common::kvm_available() || !qsd_available() {
        return;
    }
    let dir = common::TempDir::new("vhu-frontend-qsd");
    for transport in ["pci", "mmio"] {
        read_and_write_through(qsd_backend, transport, &dir);
    }
}

/// No backend: a socket file nobody listens on, and no file at all. The VM does not start;
/// one line names the socket.
#[test]
fn a_missing_backend_is_a_clear_error() {
    if !common::kvm_available() {
        return;
    }
    let dir = common::TempDir::new("vhu-frontend-missing");
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    for socket in [stale, dir.path().join("absent.sock")] {
        let out =
            guest("console=ttyS0 disk", &["--disk", &format!("vhost-user={}", socket.display())])
                .run();
        assert_eq!(out.code(), Some(1), "{}", out.report());
        out.assert_stderr_contains(&format!(
            "vanguard: error: cannot attach vhost-user disk: cannot connect to vhost-user backend {}",
            socket.display()
        ));
        out.assert_no_panic();
    }
}

/// A "backend" that accepts and never answers: the VMM gives up after its socket timeout with
/// a line naming the socket, instead of hanging.
#[test]
fn a_silent_backend_times_out() {
    if !common::kvm_available() {
        return;
    }
    let dir = common::TempDir::new("vhu-frontend-silent");
    let socket = dir.path().join("silent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let holder = std::thread::spawn(move || {
        let conn = listener.accept();
        std::thread::sleep(Duration::from_secs(8));
        drop(conn);
    });
    let start = Instant::now();
    let out =
        guest("console=ttyS0 disk", &["--disk", &format!("vhost-user={}", socket.display())]).run();
    assert_eq!(out.code(), Some(1), "{}", out.report());
    out.assert_stderr_contains(&format!("vhost-user backend {}", socket.display()));
    assert!(start.elapsed() < Duration::from_secs(30));
    out.assert_no_panic();
    let _ = holder.join();
}

/// Options that belong to the backend are refused next to vhost-user=.
#[test]
fn vhost_user_refuses_local_disk_options() {
    for (flag, message) in [
        ("vhost-user=/tmp/x.sock,serial=a", "vhost-user= cannot be combined with serial="),
        ("vhost-user=/tmp/x.sock,readonly=on", "vhost-user= cannot be combined with readonly="),
        ("path=/x,vhost-user=/tmp/x.sock", "vhost-user= cannot be combined with path="),
        ("vhost-user=", "vhost-user= needs the backend's socket path"),
    ] {
        let out = common::run_args(["--disk", flag]).run();
        assert_eq!(out.code(), Some(2), "{flag}: {}", out.report());
        out.assert_stderr_contains(message);
    }
}

/// The backend dies while the guest runs: the VMM says so on one line, marks the device
/// NEEDS_RESET, and the VM goes on to a clean end (no panic, no hang).
#[test]
fn a_backend_that_dies_while_running_is_reported() {
    if !common::kvm_available() {
        return;
    }
    let dir = common::TempDir::new("vhu-frontend-dies");
    let image = dir.file("d.img", &pattern(1 << 20, 9));
    let socket = dir.path().join("d.sock");
    let mut backend = vanguard_backend(&socket, &image);
    let disk = format!("vhost-user={}", socket.display());
    let mut vm = guest("console=ttyS0 disk echo", &["--disk", &disk]).spawn_interactive();
    vm.wait_for_stdout("echo: ready");
    let _ = backend.child.kill();
    let _ = backend.child.wait();
    std::thread::sleep(Duration::from_millis(300));
    vm.write_stdin(b"quit\n");
    let out = vm.finish();
    out.assert_code(0).assert_line("echo: done");
    out.assert_stderr_contains(&format!(
        "vanguard: vhost-user backend {} hung up; the device needs a reset",
        socket.display()
    ));
    out.assert_no_panic();
}
