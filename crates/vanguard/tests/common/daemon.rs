//! The daemon harness of the daemon tests (tests/daemon.rs, tests/daemon_migrate.rs): a real
//! `vanguard serve` on a data directory of its own, optionally with a TLS listener; a guard
//! that kills the daemon and every VMM process of that data directory, whatever happens; the
//! OpenAPI check of its answers.

use api::client::Client;
use api::{Event, Operation, OperationState};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A daemon on a data directory of its own.
pub struct Daemon {
    child: Option<Child>,
    pub dir: super::TempDir,
    /// The TLS listener's certificate and key, if it has one (on 127.0.0.1).
    tls: Option<(PathBuf, PathBuf)>,
    /// That listener's address (`127.0.0.1:PORT`) in the current run.
    pub tcp: Option<String>,
}

impl Daemon {
    pub fn start() -> Daemon {
        Daemon::start_with(None)
    }

    /// A daemon that also listens on tcp:127.0.0.1 (a port of its own) with TLS, this
    /// certificate and key.
    pub fn start_with(tls: Option<(PathBuf, PathBuf)>) -> Daemon {
        let dir = super::TempDir::new("daemon");
        let mut daemon = Daemon { child: None, dir, tls, tcp: None };
        daemon.spawn();
        daemon
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("api.sock")
    }

    /// Starts `vanguard serve` and waits until its socket answers.
    pub fn spawn(&mut self) {
        let _ = std::fs::remove_file(self.socket());
        let listen = format!("unix:{}", self.socket().display());
        let mut command = Command::new(super::BIN);
        command
            .args(["serve", "--data-dir"])
            .arg(self.data())
            .args(["--listen", &listen])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some((cert, key)) = &self.tls {
            command.args(["--listen", "tcp:127.0.0.1:0", "--tls-cert"]).arg(cert);
            command.arg("--tls-key").arg(key).stdout(Stdio::piped());
        }
        let mut child = command.spawn().expect("start vanguard serve");
        if let Some(stdout) = child.stdout.take() {
            // The start-up line names the TCP listener's address.
            let mut line = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
            let addr = line.split_whitespace().find_map(|w| w.strip_prefix("tcp:"));
            self.tcp = Some(addr.unwrap_or_else(|| panic!("no tcp: address in {line:?}")).into());
        }
        self.child = Some(child);
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(self.socket()).is_err() {
            assert!(start.elapsed() < Duration::from_secs(20), "the daemon did not come up");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL to the daemon (its VMs keep running).
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn client(&self) -> Client {
        Client::unix(self.socket())
    }

    /// `vanguard ARGS` against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(super::BIN)
            .args(args)
            .env("VANGUARD_REMOTE", format!("unix:{}", self.socket().display()))
            .stdin(Stdio::null())
            .output()
            .expect("run the CLI")
    }
}

/// The pids of the VMM processes whose command line names `data` (their console is there).
pub fn vmm_pids(data: &Path) -> Vec<u32> {
    let needle = data.to_string_lossy().into_owned();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if (text.contains(" vmm ") || text.contains(" run ")) && text.contains(&needle) {
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            if !stat.contains(") Z") {
                pids.push(pid);
            }
        }
    }
    pids
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        for pid in vmm_pids(&self.data()) {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(i32::try_from(pid).unwrap_or(0), libc::SIGKILL) };
        }
    }
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// A runtime whose spawned tasks run in the background.
pub fn multi_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

pub async fn wait_op(client: &Client, op: &Operation) -> Operation {
    let done: Operation =
        client.get(&format!("/v1/operations/{}/wait?timeout=60", op.id)).await.unwrap();
    assert_ne!(done.state, OperationState::Running, "operation {} did not finish", op.id);
    done
}

pub fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z"))
}

pub async fn status_code(
    client: &Client,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, serde_json::Value) {
    let (status, bytes) =
        client.raw(method, path, body.map(|b| b.as_bytes().to_vec())).await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
}

/// Whether openssl is there to make test certificates; otherwise says why the test is
/// skipped (or fails under VANGUARD_REQUIRE_TOOLS=1).
pub fn openssl_available() -> bool {
    if Command::new("openssl").arg("version").output().is_err() {
        assert!(!super::env_flag("VANGUARD_REQUIRE_TOOLS"), "no openssl (package openssl)");
        println!("skipping: no openssl to make a test certificate");
        return false;
    }
    true
}

/// A CA and a certificate it signed for localhost/127.0.0.1, made with openssl in `dir`;
/// (ca.pem, cert.pem, key.pem).
pub fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    let mut ca = vec!["req", "-x509", "-days", "1", "-subj", "/CN=vanguard test CA"];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.pem"]);
    run(&ca);
    let mut csr = vec!["req", "-new", "-subj", "/CN=localhost"];
    csr.extend(ec);
    csr.extend(["-keyout", "key.pem", "-out", "cert.csr"]);
    run(&csr);
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "cert.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
        "-out",
        "cert.pem",
    ]);
    (dir.join("ca.pem"), dir.join("cert.pem"), dir.join("key.pem"))
}

/// Whether python3 with jsonschema is there for [`check_openapi`]; otherwise says why the test
/// is skipped (or fails under VANGUARD_REQUIRE_TOOLS=1).
pub fn python_jsonschema() -> bool {
    let python = std::env::var("VANGUARD_PYTHON").unwrap_or_else(|_| "python3".into());
    let python_ok = Command::new(&python)
        .args(["-c", "import jsonschema"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !python_ok {
        if super::env_flag("VANGUARD_REQUIRE_TOOLS") {
            panic!(
                "python3 with jsonschema (python3-jsonschema) is needed; VANGUARD_REQUIRE_TOOLS=1"
            );
        }
        println!("skipping: no python3 jsonschema (Debian package python3-jsonschema)");
        return false;
    }
    true
}

/// Validates `samples` (`{"schema": component, "value": JSON}`) against the OpenAPI document
/// `doc` with Python's jsonschema (tests/openapi_check.py), and that all `count` were.
pub fn check_openapi(doc: serde_json::Value, samples: Vec<serde_json::Value>, count: usize) {
    let python = std::env::var("VANGUARD_PYTHON").unwrap_or_else(|_| "python3".into());
    let input = serde_json::json!({ "doc": doc, "samples": samples });
    let script = super::repo_root().join("crates/vanguard/tests/openapi_check.py");
    let mut child = Command::new(&python)
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(input.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("{count} responses valid")),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// The events of one daemon, collected from its stream on a runtime of their own.
pub struct Events {
    seen: Arc<Mutex<Vec<Event>>>,
    _runtime: tokio::runtime::Runtime,
}

impl Events {
    pub fn watch(client: &Client) -> Events {
        let rt = multi_thread();
        let events = Arc::new(Mutex::new(Vec::new()));
        let (sink, client) = (events.clone(), client.clone());
        rt.spawn(async move {
            let _ = client
                .lines("/v1/events", |line| {
                    sink.lock().unwrap().push(serde_json::from_str(line).unwrap());
                    true
                })
                .await;
        });
        let start = Instant::now();
        while events.lock().unwrap().is_empty() {
            assert!(start.elapsed() < Duration::from_secs(10), "the events stream did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
        Events { seen: events, _runtime: rt }
    }

    /// The kind of the first event (the stream's `events.subscribed`).
    pub fn first(&self) -> String {
        self.seen.lock().unwrap()[0].kind.clone()
    }

    /// The kinds of the events about `vm`, in order.
    pub fn kinds(&self, vm: &str) -> Vec<String> {
        let events = self.seen.lock().unwrap();
        events.iter().filter(|e| e.vm.as_deref() == Some(vm)).map(|e| e.kind.clone()).collect()
    }
}
