//! Shared helpers for the integration tests: run the `vanguard` binary under a time limit and
//! collect what it printed, skip (or fail, with `VANGUARD_REQUIRE_KVM=1`) where `/dev/kvm` is
//! missing, and scratch directories that clean up after themselves.
//!
//! Every test starts real VMs through the binary, so the tests of one file run in parallel
//! safely: each VM is its own process with its own files.
#![allow(dead_code)]

pub mod daemon;
pub mod dirty;
pub mod linux_qemu;
pub mod net;

use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_vanguard");

/// How long one VM may run before the test kills it and fails.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Whether an environment variable is set to "1".
pub fn env_flag(name: &str) -> bool {
    std::env::var(name).as_deref() == Ok("1")
}

/// True when `/dev/kvm` exists. Otherwise panics under `VANGUARD_REQUIRE_KVM=1`, or prints why
/// the test is skipped and returns false: every test that boots a VM starts with
/// `if !common::kvm_available() { return; }`.
pub fn kvm_available() -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    if env_flag("VANGUARD_REQUIRE_KVM") {
        panic!("/dev/kvm does not exist, and VANGUARD_REQUIRE_KVM=1 makes that a failure");
    }
    println!("skipping: /dev/kvm not available");
    false
}

/// The repository root (this crate is crates/vanguard).
pub fn repo_root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.canonicalize().unwrap_or(root)
}

/// A directory under the system temp dir, removed (with its contents) when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("vanguard-test-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `data` to a file in this directory and returns its path.
    pub fn file(&self, name: &str, data: &[u8]) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `vanguard` command line to run.
pub struct Vanguard {
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    stdin: Option<Vec<u8>>,
    timeout: Duration,
    uid: Option<u32>,
}

/// `vanguard run ARGS...`.
pub fn run_args<I, S>(args: I) -> Vanguard
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut all = vec![OsString::from("run")];
    all.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
    Vanguard { args: all, envs: Vec::new(), stdin: None, timeout: DEFAULT_TIMEOUT, uid: None }
}

/// `vanguard run --cmdline CMDLINE ARGS...`: the test guest with these scenarios.
pub fn guest(cmdline: &str, args: &[&str]) -> Vanguard {
    let mut all = vec!["--cmdline", cmdline];
    all.extend_from_slice(args);
    run_args(all)
}

impl Vanguard {
    /// Feeds these bytes to the process's stdin, then closes it (default: stdin is /dev/null).
    pub fn stdin(mut self, data: &[u8]) -> Self {
        self.stdin = Some(data.to_vec());
        self
    }

    pub fn env(mut self, key: &str, value: impl AsRef<OsStr>) -> Self {
        self.envs.push((key.into(), value.as_ref().to_owned()));
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Runs the process as this user (and group of the same number); only root can.
    pub fn uid(mut self, uid: u32) -> Self {
        self.uid = Some(uid);
        self
    }

    /// The command as a shell would show it, for failure messages.
    pub fn shown(&self) -> String {
        let mut text = String::new();
        for (k, v) in &self.envs {
            let _ = write!(text, "{}={} ", k.to_string_lossy(), quote(v));
        }
        text.push_str("vanguard");
        for a in &self.args {
            text.push(' ');
            text.push_str(&quote(a));
        }
        if let Some(uid) = self.uid {
            let _ = write!(text, "   (as uid {uid})");
        }
        text
    }

    /// Starts the process; stdin stays open for [`Running::write_stdin`] unless data was given
    /// with [`Vanguard::stdin`] (then it is written and closed).
    pub fn spawn_interactive(self) -> Running {
        self.spawn_inner(true)
    }

    fn spawn_inner(self, interactive: bool) -> Running {
        let mut cmd = Command::new(BIN);
        cmd.args(&self.args).stdout(Stdio::piped()).stderr(Stdio::piped()).stdin(
            if interactive || self.stdin.is_some() { Stdio::piped() } else { Stdio::null() },
        );
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        if let Some(uid) = self.uid {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(uid);
        }
        let shown = self.shown();
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start `{shown}`: {e}"));
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            collect(child.stdout.take().expect("piped stdout"), stdout.clone()),
            collect(child.stderr.take().expect("piped stderr"), stderr.clone()),
        ];
        let mut stdin = child.stdin.take();
        if let Some(data) = self.stdin {
            if let Some(mut pipe) = stdin.take() {
                // On a thread, so that a VMM that stops reading cannot block the time limit;
                // the VMM may also end before reading everything: a broken pipe is fine.
                std::thread::spawn(move || {
                    let _ = pipe.write_all(&data);
                });
            }
        }
        Running {
            child,
            stdin,
            stdout,
            stderr,
            readers,
            start: Instant::now(),
            timeout: self.timeout,
            shown,
        }
    }

    /// Runs the process to its end (killing it and failing the test after the timeout).
    pub fn run(self) -> Outcome {
        self.spawn_inner(false).finish()
    }
}

fn quote(s: &OsStr) -> String {
    let s = s.to_string_lossy();
    let shown =
        if s.len() > 120 { format!("{}...({} bytes)", &s[..60], s.len()) } else { s.to_string() };
    if !shown.is_empty()
        && shown.chars().all(|c| c.is_ascii_alphanumeric() || "-_=./:,+@".contains(c))
    {
        shown
    } else {
        format!("'{}'", shown.replace('\'', r"'\''"))
    }
}

fn collect<R: Read + Send + 'static>(mut pipe: R, into: Arc<Mutex<Vec<u8>>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    into.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(&buf[..n])
                }
            }
        }
    })
}

fn text(buf: &Arc<Mutex<Vec<u8>>>) -> String {
    String::from_utf8_lossy(&buf.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
}

/// A started `vanguard` process.
pub struct Running {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
    start: Instant,
    timeout: Duration,
    shown: String,
}

/// A test that fails part-way must not leave its VMM running (and eating the CPUs the
/// other tests need).
impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Running {
    /// Writes to the process's stdin.
    pub fn write_stdin(&mut self, data: &[u8]) {
        let pipe = self.stdin.as_mut().expect("stdin is open");
        pipe.write_all(data).and_then(|()| pipe.flush()).unwrap_or_else(|e| {
            panic!("writing to the stdin of `{}`: {e}\n{}", self.shown, self.so_far())
        });
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the process.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill has no memory-safety preconditions; the child is not reaped until
        // `finish` or `kill`, so the pid still names it.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal}): {}", std::io::Error::last_os_error());
    }

    /// What the process has printed on stdout so far.
    pub fn stdout_so_far(&self) -> String {
        text(&self.stdout)
    }

    /// Closes the process's stdin (EOF).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits until stdout contains `needle`; fails the test if the process ends or the time
    /// limit passes first.
    pub fn wait_for_stdout(&mut self, needle: &str) {
        loop {
            if text(&self.stdout).contains(needle) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // One more look: the output may have arrived with the exit.
                for r in self.readers.drain(..) {
                    let _ = r.join();
                }
                if text(&self.stdout).contains(needle) {
                    return;
                }
                panic!(
                    "`{}` ended ({status}) before printing {needle:?}\n{}",
                    self.shown,
                    self.so_far()
                );
            }
            if self.start.elapsed() > self.timeout {
                self.kill();
                panic!(
                    "`{}` did not print {needle:?} within {:?}; killed\n{}",
                    self.shown,
                    self.timeout,
                    self.so_far()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub fn kill_now(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }

    fn so_far(&self) -> String {
        format!(
            "--- stdout so far ---\n{}\n--- stderr so far ---\n{}",
            text(&self.stdout),
            text(&self.stderr)
        )
    }

    /// Closes stdin and waits for the process to end; kills it and fails the test after the
    /// time limit, showing the output so far.
    /// Whether the process has ended (it is reaped by [`Running::finish`]).
    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    pub fn finish(mut self) -> Outcome {
        self.close_stdin();
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) => {}
                Err(e) => panic!("waiting for `{}`: {e}", self.shown),
            }
            if self.start.elapsed() > self.timeout {
                self.kill();
                panic!(
                    "`{}` ran longer than {:?}; killed\n{}",
                    self.shown,
                    self.timeout,
                    self.so_far()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let elapsed = self.start.elapsed();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        Outcome {
            status,
            stdout: text(&self.stdout),
            stderr: text(&self.stderr),
            elapsed,
            shown: self.shown.clone(),
        }
    }
}

/// How a `vanguard` process ended and what it printed.
pub struct Outcome {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
    pub shown: String,
}

impl Outcome {
    /// Everything about the run, for assertion messages.
    pub fn report(&self) -> String {
        format!(
            "command: {}\nstatus: {} after {:.2?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.shown, self.status, self.elapsed, self.stdout, self.stderr
        )
    }

    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Stdout's lines (CR LF and LF both end a line).
    pub fn lines(&self) -> Vec<&str> {
        self.stdout.lines().collect()
    }

    pub fn stderr_lines(&self) -> Vec<&str> {
        self.stderr.lines().collect()
    }

    #[track_caller]
    pub fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(self.code(), Some(code), "expected exit status {code}\n{}", self.report());
        self
    }

    /// Exit status 0 and nothing on stderr.
    #[track_caller]
    pub fn assert_clean_exit(&self) -> &Self {
        self.assert_code(0);
        assert!(self.stderr.is_empty(), "expected nothing on stderr\n{}", self.report());
        self
    }

    /// Index of the stdout line equal to `line`; fails if there is none.
    #[track_caller]
    pub fn line_index(&self, line: &str) -> usize {
        self.lines()
            .iter()
            .position(|l| *l == line)
            .unwrap_or_else(|| panic!("expected the line {line:?} on stdout\n{}", self.report()))
    }

    #[track_caller]
    pub fn assert_line(&self, line: &str) -> &Self {
        self.line_index(line);
        self
    }

    /// The stdout lines, in this order (others may come between them).
    #[track_caller]
    pub fn assert_lines_in_order(&self, lines: &[&str]) -> &Self {
        let mut last = None;
        for line in lines {
            let i = self.line_index(line);
            if let Some((prev_i, prev)) = last {
                assert!(i > prev_i, "expected {line:?} after {prev:?}\n{}", self.report());
            }
            last = Some((i, *line));
        }
        self
    }

    /// The single stdout line starting with `prefix`.
    #[track_caller]
    pub fn line_starting(&self, prefix: &str) -> &str {
        let found: Vec<&str> = self.stdout.lines().filter(|l| l.starts_with(prefix)).collect();
        assert_eq!(
            found.len(),
            1,
            "expected one stdout line starting with {prefix:?}\n{}",
            self.report()
        );
        found[0]
    }

    #[track_caller]
    pub fn assert_stdout_contains(&self, needle: &str) -> &Self {
        assert!(self.stdout.contains(needle), "expected {needle:?} on stdout\n{}", self.report());
        self
    }

    #[track_caller]
    pub fn assert_stdout_lacks(&self, needle: &str) -> &Self {
        assert!(
            !self.stdout.contains(needle),
            "did not expect {needle:?} on stdout\n{}",
            self.report()
        );
        self
    }

    #[track_caller]
    pub fn assert_stderr_contains(&self, needle: &str) -> &Self {
        assert!(self.stderr.contains(needle), "expected {needle:?} on stderr\n{}", self.report());
        self
    }

    /// No Rust panic message, and the process was not killed by a signal.
    #[track_caller]
    pub fn assert_no_panic(&self) -> &Self {
        assert!(!self.stderr.contains("panicked"), "the VMM panicked\n{}", self.report());
        assert!(self.code().is_some(), "the VMM was killed by a signal\n{}", self.report());
        self
    }
}

/// Whether KVM here is PVM (no VT-x/AMD-V: guest ring 0 is emulated, see
/// docs/linux-guest.md): the `kvm_pvm` module is loaded, or the CPU flags lack vmx and svm.
pub fn kvm_is_pvm() -> bool {
    if Path::new("/sys/module/kvm_pvm").exists() {
        return true;
    }
    !hardware_virtualization()
}

/// Whether /proc/cpuinfo lists vmx or svm.
pub fn hardware_virtualization() -> bool {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// Whether this process runs as root (file permissions do not stop root).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// md5sum of a file, from the host's own tool.
pub fn host_md5(path: &std::path::Path) -> String {
    let out = std::process::Command::new("md5sum").arg(path).output().expect("run md5sum");
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or("").to_string()
}

/// Bytes that differ at every position, so a misplaced read shows in the checksum.
pub fn image(len: usize, seed: u64) -> Vec<u8> {
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

/// Checks what the guest's `diskwrite=<len>` scenario left in `path`: the pattern of
/// docs/test-guest.md (byte at offset o is `(o ^ (o >> 9) ^ 0xa5) as u8`) over the first `len`
/// bytes, and every later byte as in `original`.
pub fn assert_diskwrite_pattern(path: &Path, original: &[u8], len: usize) {
    let written = std::fs::read(path).unwrap();
    for (o, b) in written[..len].iter().enumerate() {
        assert_eq!(*b, (o ^ (o >> 9) ^ 0xa5).to_le_bytes()[0], "byte {o} of the written disk");
    }
    assert!(written[len..] == original[len..], "bytes past the write changed");
}

/// `curl` on a Unix socket, with an optional JSON body: (HTTP status, body).
pub fn curl_unix(socket: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-s", "-S", "--max-time", "60", "-X", method, "-w", "\n%{http_code}"]);
    if let Some(body) = body {
        cmd.args(["-H", "Content-Type: application/json", "--data-binary", body]);
    }
    let out = cmd
        .arg("--unix-socket")
        .arg(socket)
        .arg(format!("http://vmm{path}"))
        .output()
        .expect("curl runs");
    assert!(out.status.success(), "curl {method} {path}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').expect("curl printed the status");
    (code.parse().expect("a status code"), body.to_string())
}
