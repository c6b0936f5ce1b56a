//! Peer checks with QEMU and Linux: child processes whose output is collected, the Linux guest
//! of scripts/build-linux-guest.sh, and QEMU runs (TCG, no KVM needed).

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long QEMU may take to boot Linux, run the scenario and power off (about 10 s here).
pub const QEMU_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a backend may take to start listening, or to exit once told to.
pub const BACKEND_TIMEOUT: Duration = Duration::from_secs(20);
pub const INIT: &str = "VANGUARD-LINUX-INIT: ";

/// A child process whose stdout and stderr are collected together; killed when dropped.
pub struct Proc {
    what: String,
    child: Child,
    output: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
    status: Option<ExitStatus>,
}

impl Proc {
    pub fn spawn(what: &str, cmd: &mut Command) -> Proc {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let output = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        let pipes: [Box<dyn Read + Send>; 2] = [
            Box::new(child.stdout.take().expect("piped stdout")),
            Box::new(child.stderr.take().expect("piped stderr")),
        ];
        for mut pipe in pipes {
            let into = output.clone();
            readers.push(std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                while let Ok(n @ 1..) = pipe.read(&mut buf) {
                    into.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(&buf[..n]);
                }
            }));
        }
        Proc { what: what.to_string(), child, output, readers, status: None }
    }

    pub fn output(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    /// Waits until the output contains `needle`; false if the process ends or time runs out.
    pub fn wait_for_output(&mut self, needle: &str, timeout: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.output().contains(needle) {
                return true;
            }
            if self.try_status().is_some() {
                self.join_readers();
                return self.output().contains(needle);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits for the process to end by itself; None (and the process killed) after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(status) = self.try_status() {
                self.join_readers();
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill();
        None
    }

    pub fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill has no memory-safety preconditions; the child is not reaped before
        // `wait_exit` or `kill`, so the pid still names it.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal}): {}", std::io::Error::last_os_error());
    }

    pub fn kill(&mut self) {
        if self.try_status().is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
        self.join_readers();
    }

    fn join_readers(&mut self) {
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }

    pub fn report(&self) -> String {
        format!("--- {} ({:?}) ---\n{}", self.what, self.status, self.output())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Skips (prints why, returns false) or fails under `VANGUARD_REQUIRE_TOOLS=1`.
pub fn tool_available(program: &str, arg: &str, package: &str) -> bool {
    if Command::new(program).arg(arg).output().is_ok() {
        return true;
    }
    let why = format!("{program} not found (Debian package {package})");
    if super::env_flag("VANGUARD_REQUIRE_TOOLS") {
        panic!("{why}; VANGUARD_REQUIRE_TOOLS=1 makes that a failure");
    }
    println!("skipping: {why} (set VANGUARD_REQUIRE_TOOLS=1 to make this a failure)");
    false
}

pub struct LinuxGuest {
    pub vmlinuz: PathBuf,
    pub initramfs: PathBuf,
    /// The uncompressed kernel (the script extracts it with lz4).
    pub vmlinux: PathBuf,
}

/// The Linux guest, brought up to date once per test run: the build script is cheap when its
/// cache is current, and rebuilds the initramfs when its /init changed.
pub fn linux_guest() -> Option<&'static LinuxGuest> {
    static GUEST: OnceLock<Result<LinuxGuest, String>> = OnceLock::new();
    let guest = GUEST.get_or_init(|| {
        let root = super::repo_root();
        let script = root.join("scripts/build-linux-guest.sh");
        let output = Command::new(&script)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        if !output.status.success() {
            return Err(format!(
                "{} failed ({}):\n{}{}",
                script.display(),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        let dir = root.join("build/linux-guest");
        let guest = LinuxGuest {
            vmlinuz: dir.join("vmlinuz"),
            initramfs: dir.join("initramfs.cpio.gz"),
            vmlinux: dir.join("vmlinux"),
        };
        if guest.vmlinuz.is_file() && guest.initramfs.is_file() && guest.vmlinux.is_file() {
            Ok(guest)
        } else {
            Err(format!(
                "{} has no vmlinuz, vmlinux and initramfs.cpio.gz (is lz4 installed?)",
                dir.display()
            ))
        }
    });
    match guest {
        Ok(guest) => Some(guest),
        Err(why) if super::env_flag("VANGUARD_REQUIRE_LINUX") => {
            panic!("{why}; VANGUARD_REQUIRE_LINUX=1 makes that a failure")
        }
        Err(why) => {
            println!("skipping: {why} (set VANGUARD_REQUIRE_LINUX=1 to make this a failure)");
            None
        }
    }
}

/// Runs QEMU to its end; fails (with everyone's output) if it does not power off in time.
pub fn run_qemu(qemu: &mut Proc, backends: &[&Proc]) -> String {
    let status = qemu.wait_exit(QEMU_TIMEOUT);
    let reports: Vec<String> = backends.iter().map(|b| b.report()).collect();
    let status = status.unwrap_or_else(|| {
        panic!(
            "QEMU ran longer than {QEMU_TIMEOUT:?}; killed\n{}\n{}",
            qemu.report(),
            reports.join("\n")
        )
    });
    assert!(status.success(), "QEMU failed\n{}\n{}", qemu.report(), reports.join("\n"));
    qemu.output()
}

/// Whether bit `bit` is set in a sysfs virtio `features` string (one '0'/'1' per bit, bit 0
/// first).
pub fn feature(features: &str, bit: usize) -> bool {
    features.as_bytes().get(bit) == Some(&b'1')
}
