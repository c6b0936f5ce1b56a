//! `vanguard serve` end to end: the real daemon, the real CLI, real VMs (the test guest on
//! Vanguard's VMM, under KVM). Each test has its own data directory and socket; its guard
//! kills the daemon and every VMM process of that data directory, whatever happens.
//!
//! The guests run the test guest's `powerbutton` scenario: they wait (polling) for the ACPI
//! power button, so a graceful stop ends them with exit status 0.

mod common;

use common::daemon::{
    certificates, multi_thread, pid_alive, rt, status_code, vmm_pids, wait_op, Daemon, Events,
};

use api::client::{Client, ClientError};
use api::{Operation, OperationState, Vm, VmState};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const GUEST: &str = "console=ttyS0 powerbutton";

fn spec(name: &str) -> serde_json::Value {
    serde_json::json!({ "name": name, "memory_mib": 64, "boot": { "cmdline": GUEST } })
}

/// Create, start, stop (power button), start, stop --force, delete; through the CLI and the
/// API, with the events stream watching.
#[test]
fn lifecycle_through_the_cli_and_the_api() {
    if !common::kvm_available() {
        return;
    }
    let daemon = Daemon::start();
    let client = daemon.client();
    let rt = multi_thread();
    let events = Events::watch(&client);
    assert_eq!(events.first(), "events.subscribed");

    let file = daemon.dir.file("web.json", spec("web").to_string().as_bytes());
    let out = daemon.cli(&["vm", "create", "-f", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "created web");

    let out = daemon.cli(&["vm", "start", "web"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "start web: running");
    let vm: Vm = rt.block_on(client.get("/v1/vms/web")).unwrap();
    assert_eq!(vm.status.state, VmState::Running);
    let pid = vm.status.pid.expect("a pid");
    assert!(pid_alive(pid));
    assert_eq!(vmm_pids(&daemon.data()), vec![pid], "exactly one VMM, the one shown");

    let out = daemon.cli(&["vm", "list"]);
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(table.lines().next().unwrap().starts_with("NAME"), "{table}");
    assert!(table.contains("web") && table.contains("running") && table.contains(&pid.to_string()));
    let out = daemon.cli(&["vm", "show", "web", "--output", "json"]);
    let shown: Vm = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(shown.status.pid, Some(pid));

    // The guest is up: its console says it waits for the button.
    let start = Instant::now();
    loop {
        let out = daemon.cli(&["vm", "logs", "web"]);
        if String::from_utf8_lossy(&out.stdout).contains("powerbutton: waiting") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "no console output");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Graceful stop: the guest sees the button and powers off (exit status 0).
    let out = daemon.cli(&["vm", "stop", "web", "--timeout", "20"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "stop web: the guest shut down");
    let vm: Vm = rt.block_on(client.get("/v1/vms/web")).unwrap();
    assert_eq!(vm.status.state, VmState::Stopped);
    assert_eq!(vm.status.pid, None);
    let exit = vm.status.last_exit.expect("exit info");
    assert_eq!(exit.code, Some(0), "{exit:?}");
    assert!(!pid_alive(pid));
    let console = String::from_utf8_lossy(&daemon.cli(&["vm", "logs", "web"]).stdout).to_string();
    assert!(console.contains("powerbutton: pressed"), "{console}");

    // Again, and this time killed.
    let op: Operation = rt.block_on(client.post("/v1/vms/web/start", &())).unwrap();
    assert_eq!(rt.block_on(wait_op(&client, &op)).state, OperationState::Succeeded);
    let op: Operation = rt.block_on(client.post("/v1/vms/web/stop?force=true", &())).unwrap();
    let done = rt.block_on(wait_op(&client, &op));
    assert_eq!((done.state, done.progress.as_str()), (OperationState::Succeeded, "killed"));
    let vm: Vm = rt.block_on(client.get("/v1/vms/web")).unwrap();
    assert_eq!(vm.status.state, VmState::Stopped, "a requested kill is a stop, not a failure");
    assert_eq!(vm.status.last_exit.unwrap().signal, Some(libc::SIGKILL));

    let out = daemon.cli(&["vm", "delete", "web"]);
    assert!(out.status.success());
    let out = daemon.cli(&["vm", "show", "web"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stderr).trim(), "vanguard: error: no VM named 'web'");
    assert!(!daemon.data().join("vms/web").exists(), "its files are gone");

    // What the stream saw, in order.
    std::thread::sleep(Duration::from_millis(100));
    let kinds = events.kinds("web");
    let expected = [
        "vm.created",
        "vm.starting",
        "vm.running",
        "operation.succeeded",
        "vm.stopping",
        "vm.stopped",
        "operation.succeeded",
        "vm.starting",
        "vm.running",
        "operation.succeeded",
        "vm.stopping",
        "vm.stopped",
        "operation.succeeded",
        "vm.deleted",
    ];
    assert_eq!(kinds, expected);
}

/// Malformed and conflicting requests: JSON errors with the right status, nothing changed.
#[test]
fn bad_requests_get_clear_json_errors() {
    if !common::kvm_available() {
        return;
    }
    let daemon = Daemon::start();
    let client = daemon.client();
    rt().block_on(async {
        for (body, field, words) in [
            ("{", None, "invalid VM spec: EOF"),
            (r#"{"name": "a", "memroy_mib": 1}"#, None, "unknown field `memroy_mib`"),
            (r#"{"name": "A"}"#, Some("name"), "lowercase"),
            (r#"{"name": "a", "memory_mib": 1}"#, Some("memory_mib"), "16 to"),
            (
                r#"{"name": "a", "disks": [{"path": "/no/such.img"}]}"#,
                Some("disks[0].path"),
                "No such file",
            ),
            (r#"{"name": "a", "boot": {"kernel": "rel/path"}}"#, Some("boot.kernel"), "absolute"),
        ] {
            let (status, error) = status_code(&client, "POST", "/v1/vms", Some(body)).await;
            assert_eq!(status, 400, "{body}: {error}");
            assert_eq!(error["field"].as_str(), field, "{body}: {error}");
            assert!(error["error"].as_str().unwrap().contains(words), "{body}: {error}");
        }
        let vms: Vec<Vm> = client.get("/v1/vms").await.unwrap();
        assert!(vms.is_empty(), "nothing was created");

        assert_eq!(status_code(&client, "GET", "/v1/vms/nope", None).await.0, 404);
        assert_eq!(status_code(&client, "POST", "/v1/vms/nope/start", None).await.0, 404);
        assert_eq!(status_code(&client, "GET", "/v1/nothing", None).await.0, 404);
        assert_eq!(status_code(&client, "GET", "/v1/operations/99", None).await.0, 404);
        assert_eq!(status_code(&client, "GET", "/v1/operations/x", None).await.0, 400);
        assert_eq!(status_code(&client, "PUT", "/v1/vms", None).await.0, 405);
        let (status, error) =
            status_code(&client, "POST", "/v1/vms/x/stop?force=maybe", None).await;
        assert_eq!(status, 400, "{error}");

        let _: Vm = client.post("/v1/vms", &spec("a")).await.unwrap();
        let (status, error) =
            status_code(&client, "POST", "/v1/vms", Some(&spec("a").to_string())).await;
        assert_eq!((status, error["error"].as_str()), (409, Some("a VM named 'a' exists")));
        let (status, _) = status_code(&client, "POST", "/v1/vms/a/stop", None).await;
        assert_eq!(status, 409, "not running");
        let op: Operation = client.post("/v1/vms/a/start", &()).await.unwrap();
        // While the start is under way, or once it runs: another start conflicts.
        let (status, error) = status_code(&client, "POST", "/v1/vms/a/start", None).await;
        assert_eq!(status, 409, "{error}");
        assert_eq!(wait_op(&client, &op).await.state, OperationState::Succeeded);
        let (status, error) = status_code(&client, "DELETE", "/v1/vms/a", None).await;
        assert_eq!((status, error["error"].as_str()), (409, Some("'a' is running: stop it first")));
        let op: Operation = client.post("/v1/vms/a/stop?force=true", &()).await.unwrap();
        wait_op(&client, &op).await;
        assert_eq!(status_code(&client, "DELETE", "/v1/vms/a", None).await.0, 204);
    });

    // The CLI says what the API said, on one line.
    let out = daemon.cli(&["vm", "create", "Bad"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "vanguard: error: name: may hold only lowercase letters, digits and '-'"
    );
    let out = Command::new(common::BIN)
        .args(["vm", "list", "--remote", "unix:/nonexistent/vanguard.sock"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .starts_with("vanguard: error: cannot reach the daemon at /nonexistent/vanguard.sock"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// kill -9 of the daemon: one VM running, another being started at that moment. The new
/// daemon's view matches the processes: the running one is found again (and stops), the
/// interrupted operation is failed, and no VMM runs that the daemon does not show.
#[test]
fn a_daemon_killed_mid_operation_comes_back_matching_reality() {
    if !common::kvm_available() {
        return;
    }
    let mut daemon = Daemon::start();
    let client = daemon.client();
    let rt = rt();
    let (pid, op) = rt.block_on(async {
        let _: Vm = client.post("/v1/vms", &spec("steady")).await.unwrap();
        let _: Vm = client.post("/v1/vms", &spec("mid")).await.unwrap();
        let op: Operation = client.post("/v1/vms/steady/start", &()).await.unwrap();
        wait_op(&client, &op).await;
        let vm: Vm = client.get("/v1/vms/steady").await.unwrap();
        let mid: Operation = client.post("/v1/vms/mid/start", &()).await.unwrap();
        (vm.status.pid.unwrap(), mid)
    });
    daemon.kill9();
    assert!(pid_alive(pid), "the VM outlives its daemon");
    daemon.spawn();
    rt.block_on(async {
        let vm: Vm = client.get("/v1/vms/steady").await.unwrap();
        assert_eq!((vm.status.state, vm.status.pid), (VmState::Running, Some(pid)));
        let op: Operation = client.get(&format!("/v1/operations/{}", op.id)).await.unwrap();
        assert_ne!(op.state, OperationState::Running, "{op:?}");
        // The interrupted start: whatever the daemon says, the processes agree.
        let mid: Vm = client.get("/v1/vms/mid").await.unwrap();
        let mut shown: Vec<u32> = [Some(pid), mid.status.pid].into_iter().flatten().collect();
        shown.sort_unstable();
        let mut real = vmm_pids(&daemon.data());
        real.sort_unstable();
        assert_eq!(shown, real, "mid: {:?}", mid.status);

        // The found-again VM stops through the new daemon (its exit status is unknown now).
        let stop: Operation = client.post("/v1/vms/steady/stop?timeout=20", &()).await.unwrap();
        let done = wait_op(&client, &stop).await;
        assert_eq!(done.state, OperationState::Succeeded, "{done:?}");
        let vm: Vm = client.get("/v1/vms/steady").await.unwrap();
        assert_eq!(vm.status.state, VmState::Stopped);
        assert!(vm.status.last_exit.unwrap().reason.contains("unknown"));
        assert!(!pid_alive(pid));
    });
}

/// A VMM killed behind the daemon's back: failed (with the signal), and restarted when the
/// policy says so.
#[test]
fn a_vmm_killed_behind_the_daemons_back_fails_and_restarts_by_policy() {
    if !common::kvm_available() {
        return;
    }
    let daemon = Daemon::start();
    let client = daemon.client();
    rt().block_on(async {
        let mut keep = spec("keep");
        keep["restart"] = "on-failure".into();
        let _: Vm = client.post("/v1/vms", &keep).await.unwrap();
        let _: Vm = client.post("/v1/vms", &spec("once")).await.unwrap();
        for name in ["keep", "once"] {
            let op: Operation = client.post(&format!("/v1/vms/{name}/start"), &()).await.unwrap();
            wait_op(&client, &op).await;
        }
        let pids: Vec<u32> = futures_pids(&client, &["keep", "once"]).await;
        for pid in &pids {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(i32::try_from(*pid).unwrap(), libc::SIGKILL) };
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let once: Vm = client.get("/v1/vms/once").await.unwrap();
            let keep: Vm = client.get("/v1/vms/keep").await.unwrap();
            if once.status.state == VmState::Failed
                && keep.status.restarts == 1
                && keep.status.state == VmState::Running
            {
                let exit = once.status.last_exit.unwrap();
                assert_eq!(exit.signal, Some(libc::SIGKILL));
                assert!(exit.reason.contains("killed by signal 9"), "{}", exit.reason);
                let new_pid = keep.status.pid.unwrap();
                assert_ne!(new_pid, pids[0]);
                assert!(pid_alive(new_pid));
                break;
            }
            assert!(Instant::now() < deadline, "once: {:?}\nkeep: {:?}", once.status, keep.status);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}

async fn futures_pids(client: &Client, names: &[&str]) -> Vec<u32> {
    let mut pids = Vec::new();
    for name in names {
        let vm: Vm = client.get(&format!("/v1/vms/{name}")).await.unwrap();
        pids.push(vm.status.pid.unwrap());
    }
    pids
}

/// 50 VMs created and started at once through the API; all run, each its own process.
#[test]
fn fifty_vms_start_concurrently() {
    if !common::kvm_available() {
        return;
    }
    let daemon = Daemon::start();
    let client = daemon.client();
    multi_thread().block_on(async {
        let names: Vec<String> = (0..50).map(|i| format!("vm-{i:02}")).collect();
        let mut tasks = Vec::new();
        for name in &names {
            let (client, name) = (client.clone(), name.clone());
            tasks.push(tokio::spawn(async move {
                let _: Vm = client.post("/v1/vms", &spec(&name)).await?;
                let op: Operation = client.post(&format!("/v1/vms/{name}/start"), &()).await?;
                Ok::<_, ClientError>(wait_op(&client, &op).await)
            }));
        }
        for task in tasks {
            let op = task.await.unwrap().unwrap();
            assert_eq!(op.state, OperationState::Succeeded, "{op:?}");
        }
        let vms: Vec<Vm> = client.get("/v1/vms").await.unwrap();
        assert_eq!(vms.len(), 50);
        let mut pids: Vec<u32> = vms.iter().map(|v| v.status.pid.expect("running")).collect();
        pids.sort_unstable();
        pids.dedup();
        assert_eq!(pids.len(), 50);
        let mut real = vmm_pids(&daemon.data());
        real.sort_unstable();
        assert_eq!(pids, real);
        let mut stops = Vec::new();
        for name in &names {
            let client = client.clone();
            let name = name.clone();
            stops.push(tokio::spawn(async move {
                let op: Operation =
                    client.post(&format!("/v1/vms/{name}/stop?force=true"), &()).await.unwrap();
                wait_op(&client, &op).await
            }));
        }
        for stop in stops {
            assert_eq!(stop.await.unwrap().state, OperationState::Succeeded);
        }
        assert!(vmm_pids(&daemon.data()).is_empty());
    });
}

/// Every response kind checked against the OpenAPI document the daemon serves, by Python's
/// jsonschema (a validator that is not ours).
#[test]
fn responses_match_the_served_openapi_document() {
    if !common::kvm_available() {
        return;
    }
    if !common::daemon::python_jsonschema() {
        return;
    }
    let daemon = Daemon::start();
    let client = daemon.client();
    let samples = rt().block_on(async {
        let mut samples = Vec::new();
        let mut take = |schema: &str, value: serde_json::Value| {
            samples.push(serde_json::json!({ "schema": schema, "value": value }));
        };
        let (_, doc) = status_code(&client, "GET", "/openapi.json", None).await;
        let mut full = spec("doc");
        full["labels"] = serde_json::json!({"tier": "web"});
        full["restart"] = "always".into();
        let (status, vm) = status_code(&client, "POST", "/v1/vms", Some(&full.to_string())).await;
        assert_eq!(status, 201);
        take("Vm", vm);
        take("VmSpec", full);
        let (_, op) = status_code(&client, "POST", "/v1/vms/doc/start", None).await;
        take("Operation", op.clone());
        let (_, done) =
            status_code(&client, "GET", &format!("/v1/operations/{}/wait", op["id"]), None).await;
        take("Operation", done);
        let (_, running) = status_code(&client, "GET", "/v1/vms/doc", None).await;
        take("Vm", running);
        let (_, host) = status_code(&client, "GET", "/v1/host", None).await;
        take("HostInfo", host);
        let (_, stop) = status_code(&client, "POST", "/v1/vms/doc/stop?force=true", None).await;
        let (_, stopped) =
            status_code(&client, "GET", &format!("/v1/operations/{}/wait", stop["id"]), None).await;
        take("Operation", stopped);
        let (_, after) = status_code(&client, "GET", "/v1/vms/doc", None).await;
        take("Vm", after);
        for (method, path, body) in [
            ("POST", "/v1/vms", Some(r#"{"name": "A"}"#)),
            ("GET", "/v1/vms/none", None),
            ("POST", "/v1/vms/doc/stop", None),
            ("PUT", "/v1/host", None),
        ] {
            let (_, error) = status_code(&client, method, path, body).await;
            take("ApiError", error);
        }
        (doc, samples)
    });
    common::daemon::check_openapi(samples.0, samples.1, 12);
}

/// CPU time of a process (user + system), in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3, utime 14 and stime 15 (1-based).
    fields.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
        + fields.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0)
}

/// A VM whose guest spins (it polls for the power button) is held near its CPU quota by the
/// kernel, through its cgroup; its memory limit is set there too.
#[test]
fn the_cpu_quota_holds_a_busy_guest() {
    if !common::kvm_available() {
        return;
    }
    if !std::path::Path::new("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").exists()
        && !std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
    {
        assert!(!common::env_flag("VANGUARD_REQUIRE_KVM"), "no cgroup cpu controller here");
        println!("skipping: no cgroup cpu controller");
        return;
    }
    let daemon = Daemon::start();
    let client = daemon.client();
    let name = format!("quota-{}", std::process::id());
    let pid = rt().block_on(async {
        let host: api::HostInfo = client.get("/v1/host").await.unwrap();
        assert!(host.cgroups.starts_with("cgroup v"), "{}", host.cgroups);
        let mut limited = spec(&name);
        limited["limits"] = serde_json::json!({ "cpu_quota_percent": 20, "memory_max_mib": 200 });
        let _: Vm = client.post("/v1/vms", &limited).await.unwrap();
        let op: Operation = client.post(&format!("/v1/vms/{name}/start"), &()).await.unwrap();
        assert_eq!(wait_op(&client, &op).await.state, OperationState::Succeeded);
        let vm: Vm = client.get(&format!("/v1/vms/{name}")).await.unwrap();
        vm.status.pid.unwrap()
    });
    // The process is in its cgroup, with the limits.
    let v1 = std::path::Path::new("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").exists();
    let (cpu_dir, mem_dir) = if v1 {
        (
            PathBuf::from(format!("/sys/fs/cgroup/cpu/vanguard/{name}")),
            PathBuf::from(format!("/sys/fs/cgroup/memory/vanguard/{name}")),
        )
    } else {
        let dir = PathBuf::from(format!("/sys/fs/cgroup/vanguard/{name}"));
        (dir.clone(), dir)
    };
    let procs = std::fs::read_to_string(cpu_dir.join("cgroup.procs")).unwrap();
    assert!(procs.lines().any(|l| l.trim() == pid.to_string()), "{pid} not in {procs}");
    if v1 {
        assert_eq!(
            std::fs::read_to_string(cpu_dir.join("cpu.cfs_quota_us")).unwrap().trim(),
            "20000"
        );
        let limit = std::fs::read_to_string(mem_dir.join("memory.limit_in_bytes")).unwrap();
        assert_eq!(limit.trim(), (200u64 << 20).to_string());
    } else {
        assert_eq!(
            std::fs::read_to_string(cpu_dir.join("cpu.max")).unwrap().trim(),
            "20000 100000"
        );
        let limit = std::fs::read_to_string(mem_dir.join("memory.max")).unwrap();
        assert_eq!(limit.trim(), (200u64 << 20).to_string());
    }
    // Over two seconds the spinning guest gets about a fifth of a CPU.
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    std::thread::sleep(Duration::from_millis(300));
    let (t0, c0) = (Instant::now(), cpu_ticks(pid));
    std::thread::sleep(Duration::from_secs(2));
    let used = (cpu_ticks(pid) - c0) as f64 / hz / t0.elapsed().as_secs_f64();
    assert!((0.10..=0.30).contains(&used), "the VM used {used:.2} CPUs under a 20% quota");
    println!("a spinning guest under a 20% quota used {:.0}% of a CPU", used * 100.0);
    rt().block_on(async {
        let op: Operation =
            client.post(&format!("/v1/vms/{name}/stop?force=true"), &()).await.unwrap();
        wait_op(&client, &op).await;
    });
    assert!(!cpu_dir.exists(), "the cgroup is removed when the VM stops");
}

/// The TCP listener: TLS only, and a valid bearer token on every request (401 and nothing
/// else otherwise); tokens made, listed and revoked through the CLI.
#[test]
fn tcp_needs_tls_and_a_token_that_was_not_revoked() {
    if !common::kvm_available() {
        return;
    }
    if !common::daemon::openssl_available() {
        return;
    }
    let dir = common::TempDir::new("daemon-tls");
    let (ca, cert, key) = certificates(dir.path());
    let daemon = Daemon::start_with(Some((cert, key)));
    let socket = daemon.socket();
    let addr = daemon.tcp.clone().unwrap();
    let cli = |args: &[&str]| {
        Command::new(common::BIN).args(args).stdin(Stdio::null()).output().expect("the CLI")
    };
    let unix = format!("unix:{}", socket.display());
    let out = cli(&["token", "create", "ci", "--remote", &unix]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(token.starts_with("vgt_"), "{token}");
    let tcp = format!("tcp:{addr}");
    let ca_s = ca.to_str().unwrap();

    let rt = rt();
    rt.block_on(async {
        let with = Client::tls(&addr, &ca, Some(token.clone())).unwrap();
        let vms: Vec<Vm> = with.get("/v1/vms").await.unwrap();
        assert!(vms.is_empty());
        for bad in [None, Some("vgt_0000".to_string()), Some(format!("{token}x"))] {
            let client = Client::tls(&addr, &ca, bad.clone()).unwrap();
            let (status, body) = client.raw("GET", "/v1/vms", None).await.unwrap();
            assert_eq!(status, 401, "{bad:?}");
            let error: api::ApiError = serde_json::from_slice(&body).unwrap();
            assert!(error.error.contains("token") || error.error.contains("Bearer"), "{error:?}");
            // Nothing else is reachable either: not even the OpenAPI document.
            assert_eq!(client.raw("GET", "/openapi.json", None).await.unwrap().0, 401);
        }
    });
    // Plain HTTP to the TLS port gets no answer.
    let mut plain = std::net::TcpStream::connect(&addr).unwrap();
    plain.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    use std::io::{Read, Write};
    plain.write_all(b"GET /v1/vms HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut reply = Vec::new();
    let _ = plain.read_to_end(&mut reply);
    assert!(!String::from_utf8_lossy(&reply).contains("HTTP/1.1 200"), "{reply:?}");

    // The CLI over TCP, then the token revoked.
    let out = cli(&["host", "info", "--remote", &tcp, "--ca-cert", ca_s, "--token", &token]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = cli(&["token", "list", "--remote", &unix]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("ci "));
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&token), "the secret is not listed");
    assert!(cli(&["token", "revoke", "ci", "--remote", &unix]).status.success());
    let out = cli(&["vm", "list", "--remote", &tcp, "--ca-cert", ca_s, "--token", &token]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "vanguard: error: the token is not valid (unknown or revoked)"
    );
    drop(daemon);
}

/// The serial console through the API and the CLI: input typed into the guest's `echo`
/// scenario comes back in the live output; `vm console` detaches on Ctrl-]; `vm logs --follow`
/// ends when the VM does.
#[test]
fn the_console_can_be_attached_typed_into_and_followed() {
    if !common::kvm_available() {
        return;
    }
    let daemon = Daemon::start();
    let client = daemon.client();
    let rt = multi_thread();
    let mut echo = spec("echo");
    echo["boot"]["cmdline"] = "console=ttyS0 echo".into();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    rt.block_on(async {
        let _: Vm = client.post("/v1/vms", &echo).await.unwrap();
        let op: Operation = client.post("/v1/vms/echo/start", &()).await.unwrap();
        assert_eq!(wait_op(&client, &op).await.state, OperationState::Succeeded);
        let (status, _) = status_code(&client, "POST", "/v1/vms/none/console", Some("x")).await;
        assert_eq!(status, 404);
    });
    let sink = seen.clone();
    let follower = client.clone();
    let follow = rt.spawn(async move {
        follower
            .bytes("/v1/vms/echo/console?follow=true", |data| {
                sink.lock().unwrap().extend_from_slice(data);
                true
            })
            .await
    });
    let wait_for = |text: &str| {
        let start = Instant::now();
        while !String::from_utf8_lossy(&seen.lock().unwrap()).contains(text) {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "no {text:?} in {:?}",
                String::from_utf8_lossy(&seen.lock().unwrap())
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for("echo: ready");
    rt.block_on(client.post_bytes("/v1/vms/echo/console", b"typed through the API\n".to_vec()))
        .unwrap();
    wait_for("echo: typed through the API");

    // The CLI: keys from stdin, Ctrl-] detaches, the VM keeps running.
    let mut cli = Command::new(common::BIN)
        .args(["vm", "console", "echo"])
        .env("VANGUARD_REMOTE", format!("unix:{}", daemon.socket().display()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    cli.stdin.take().unwrap().write_all(b"from the cli\n\x1d").unwrap();
    let out = cli.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("echo: from the cli"), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("[detached from echo]"));
    wait_for("echo: from the cli");
    let vm: Vm = rt.block_on(client.get("/v1/vms/echo")).unwrap();
    assert_eq!(vm.status.state, VmState::Running, "detaching leaves the VM running");

    // `quit` ends the scenario; the guest powers off; the follow stream and `logs -f` end.
    let logs = Command::new(common::BIN)
        .args(["vm", "logs", "echo", "--follow"])
        .env("VANGUARD_REMOTE", format!("unix:{}", daemon.socket().display()))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    rt.block_on(client.post_bytes("/v1/vms/echo/console", b"quit\n".to_vec())).unwrap();
    wait_for("vanguard-guest: done, powering off");
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(20), follow).await })
        .expect("the follow stream ends with the VM")
        .unwrap()
        .unwrap();
    let logs = logs.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&logs.stdout).contains("echo: done"), "{logs:?}");
    let vm: Vm = rt.block_on(client.get("/v1/vms/echo")).unwrap();
    assert_eq!(vm.status.state, VmState::Stopped);
    let (status, _) =
        rt.block_on(status_code(&client, "POST", "/v1/vms/echo/console", Some("late\n")));
    assert_eq!(status, 409, "no input to a stopped VM");
}

/// The QEMU driver: Debian's kernel and the busybox initramfs on QEMU (TCG here, where KVM has
/// no hardware virtualization), started through the API; its console is typed into over the
/// API; it powers off by itself (stopped, status 0); a graceful stop it ignores ends in a kill.
#[test]
fn qemu_runs_linux_through_the_daemon() {
    if !common::kvm_available()
        || !common::linux_qemu::tool_available("qemu-system-x86_64", "--version", "qemu-system-x86")
    {
        return;
    }
    let Some(guest) = common::linux_qemu::linux_guest() else { return };
    let daemon = Daemon::start();
    let client = daemon.client();
    let rt = multi_thread();
    // A qcow2 disk made by qemu-img from known bytes: Linux must read those bytes through it.
    let raw = daemon.dir.path().join("disk.raw");
    let data = common::image(1 << 20, 0x7163_6f77);
    std::fs::write(&raw, &data).unwrap();
    let qcow2 = daemon.dir.path().join("disk.qcow2");
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow2)
        .output()
        .expect("qemu-img runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let disk_md5 = common::net::md5_hex(&data);
    // A NIC on a TAP, where the test can make one.
    let tap = common::net::net_available().then(common::net::Tap::create);
    let nics: Vec<serde_json::Value> = tap
        .iter()
        .map(|t| serde_json::json!({ "tap": t.name, "mac": "52:54:00:71:65:6d" }))
        .collect();
    let linux = serde_json::json!({
        "name": "linux",
        "hypervisor": "qemu",
        "memory_mib": 256,
        "boot": {
            "kernel": guest.vmlinuz,
            "initrd": guest.initramfs,
            "cmdline": "console=ttyS0 panic=-1 vanguard.shell",
        },
        "disks": [ { "path": qcow2, "format": "qcow2" } ],
        "nics": nics,
    });
    let console = |client: &Client| -> String {
        let (_, bytes) = rt.block_on(client.raw("GET", "/v1/vms/linux/console", None)).unwrap();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    let wait_console = |text: &str| {
        let start = Instant::now();
        while !console(&client).contains(text) {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "no {text:?} in\n{}",
                console(&client)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    rt.block_on(async {
        let host: api::HostInfo = client.get("/v1/host").await.unwrap();
        let qemu = host.drivers.iter().find(|d| d.name == "qemu").expect("a qemu driver");
        assert!(qemu.available, "{qemu:?}");
        let _: Vm = client.post("/v1/vms", &linux).await.unwrap();
        let op: Operation = client.post("/v1/vms/linux/start", &()).await.unwrap();
        let done = wait_op(&client, &op).await;
        assert_eq!(done.state, OperationState::Succeeded, "{done:?}");
    });
    let vm: Vm = rt.block_on(client.get("/v1/vms/linux")).unwrap();
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", vm.status.pid.unwrap())).unwrap();
    assert!(String::from_utf8_lossy(&cmdline).contains("qemu-system-x86_64"));
    wait_console("VANGUARD-LINUX-INIT: reached init");
    wait_console("VANGUARD-LINUX-INIT: shell");
    std::thread::sleep(Duration::from_millis(500));
    let type_line = |line: &str| {
        rt.block_on(client.post_bytes("/v1/vms/linux/console", format!("{line}\n").into_bytes()))
            .unwrap();
    };
    type_line("md5sum /dev/vda");
    wait_console(&format!("{disk_md5}  /dev/vda"));
    if let Some(tap) = &tap {
        let (host, guest) = (tap.host_ip(), tap.guest_ip());
        type_line(&format!(
            "ip link set eth0 up; ip addr add {guest}/24 dev eth0; ping -c 2 -W 5 {host}"
        ));
        wait_console("2 packets transmitted, 2 packets received");
        let neigh = common::net::ip(&["neigh", "show", &guest.to_string(), "dev", &tap.name]);
        assert!(String::from_utf8_lossy(&neigh.stdout).contains("52:54:00:71:65:6d"));
    }
    // Paused (QMP stop), the shell does not run what is typed; resumed (QMP cont), it does.
    rt.block_on(async {
        let op: Operation = client.post("/v1/vms/linux/pause", &()).await.unwrap();
        assert_eq!(wait_op(&client, &op).await.state, OperationState::Succeeded);
        let vm: Vm = client.get("/v1/vms/linux").await.unwrap();
        assert_eq!(vm.status.state, VmState::Paused);
        client
            .post_bytes("/v1/vms/linux/console", b"echo paused-$((6*7))\n".to_vec())
            .await
            .unwrap();
    });
    std::thread::sleep(Duration::from_secs(1));
    assert!(!console(&client).contains("paused-42"), "a paused guest ran a command");
    rt.block_on(async {
        let op: Operation = client.post("/v1/vms/linux/resume", &()).await.unwrap();
        assert_eq!(wait_op(&client, &op).await.state, OperationState::Succeeded);
    });
    wait_console("paused-42");
    // Leave the shell: /init powers off, QEMU exits 0, the VM is stopped.
    std::thread::sleep(Duration::from_millis(500));
    rt.block_on(client.post_bytes("/v1/vms/linux/console", b"exit\n".to_vec())).unwrap();
    wait_console("VANGUARD-LINUX-INIT: poweroff");
    let start = Instant::now();
    loop {
        let vm: Vm = rt.block_on(client.get("/v1/vms/linux")).unwrap();
        if vm.status.state == VmState::Stopped {
            assert_eq!(vm.status.last_exit.unwrap().code, Some(0));
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{:?}", vm.status);
        std::thread::sleep(Duration::from_millis(100));
    }
    // Again; the power button (QMP system_powerdown) is ignored by a shell, so the timeout kills.
    rt.block_on(async {
        let op: Operation = client.post("/v1/vms/linux/start", &()).await.unwrap();
        assert_eq!(wait_op(&client, &op).await.state, OperationState::Succeeded);
    });
    wait_console("VANGUARD-LINUX-INIT: shell");
    rt.block_on(async {
        let op: Operation = client.post("/v1/vms/linux/stop?timeout=2", &()).await.unwrap();
        let done = wait_op(&client, &op).await;
        assert_eq!(
            (done.state, done.progress.as_str()),
            (OperationState::Succeeded, "killed after the timeout"),
            "{done:?}"
        );
    });
}

/// Clock ticks (1/100 s usually) of CPU a process used over `span`.
fn ticks_over(pid: u32, span: Duration) -> u64 {
    let c0 = cpu_ticks(pid);
    std::thread::sleep(span);
    cpu_ticks(pid) - c0
}

/// Whether a process uses `ticks` clock ticks of CPU within `within` (a spinning guest does as
/// soon as the host's other work lets it).
fn uses_cpu(pid: u32, ticks: u64, within: Duration) -> bool {
    let (start, c0) = (Instant::now(), cpu_ticks(pid));
    while start.elapsed() < within {
        if cpu_ticks(pid) - c0 >= ticks {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Pause and resume through the CLI and the API: a paused VM's spinning guest uses no CPU
/// (the kernel's own count for the VMM process), stays paused across a kill -9 of the daemon,
/// runs again when resumed; conflicting requests get 409; a graceful stop of a paused VM
/// resumes it so the guest sees the power button.
#[test]
fn pause_and_resume_stop_and_restart_the_guest_cpu() {
    if !common::kvm_available() {
        return;
    }
    let mut daemon = Daemon::start();
    let client = daemon.client();
    let rt = multi_thread();
    // Subscribed before anything happens, so the stream sees every event.
    let events = Events::watch(&client);
    let pid = rt.block_on(async {
        let _: Vm = client.post("/v1/vms", &spec("p1")).await.unwrap();
        let (status, body) = status_code(&client, "POST", "/v1/vms/p1/pause", None).await;
        assert_eq!(status, 409, "{body}");
        assert_eq!(body["error"], "'p1' is stopped (not running)");
        let op: Operation = client.post("/v1/vms/p1/start", &()).await.unwrap();
        assert_eq!(wait_op(&client, &op).await.state, OperationState::Succeeded);
        let (status, body) = status_code(&client, "POST", "/v1/vms/p1/resume", None).await;
        assert_eq!(status, 409, "{body}");
        assert_eq!(body["error"], "'p1' is running (not paused)");
        let vm: Vm = client.get("/v1/vms/p1").await.unwrap();
        vm.status.pid.unwrap()
    });
    // The guest spins: it uses CPU whenever the host lets it (other tests run alongside, so
    // only "some" is certain); paused, its vCPU thread sleeps and the process uses none.
    assert!(uses_cpu(pid, 5, Duration::from_secs(20)), "the running guest used no CPU");

    let out = daemon.cli(&["vm", "pause", "p1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = daemon.cli(&["vm", "show", "p1", "--output", "json"]);
    let vm: Vm = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(vm.status.state, VmState::Paused);
    let paused = ticks_over(pid, Duration::from_secs(1));
    assert!(paused <= 1, "the paused guest used {paused} ticks in 1 s");
    let out = daemon.cli(&["vm", "pause", "p1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("'p1' is paused (not running)"));

    // A daemon killed and started again finds the VM paused, and can resume it.
    daemon.kill9();
    daemon.spawn();
    rt.block_on(async {
        let vm: Vm = client.get("/v1/vms/p1").await.unwrap();
        assert_eq!(vm.status.state, VmState::Paused);
        assert_eq!(vm.status.pid, Some(pid));
    });
    let out = daemon.cli(&["vm", "resume", "p1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(uses_cpu(pid, 5, Duration::from_secs(20)), "the resumed guest used no CPU");

    // Paused again, then a graceful stop: resumed, the guest takes the power button.
    rt.block_on(async {
        let op: Operation = client.post("/v1/vms/p1/pause", &()).await.unwrap();
        assert_eq!(wait_op(&client, &op).await.state, OperationState::Succeeded);
        let op: Operation = client.post("/v1/vms/p1/stop?timeout=20", &()).await.unwrap();
        let done = wait_op(&client, &op).await;
        assert_eq!(done.state, OperationState::Succeeded, "{done:?}");
        assert_eq!(done.progress, "the guest shut down");
        let vm: Vm = client.get("/v1/vms/p1").await.unwrap();
        assert_eq!(vm.status.state, VmState::Stopped);
        // Watched through a pidfd since the daemon's restart: the status is not known.
        let exit = vm.status.last_exit.unwrap();
        assert!(exit.reason.starts_with("stopped"), "{exit:?}");
    });
    let console = String::from_utf8_lossy(&daemon.cli(&["vm", "logs", "p1"]).stdout).to_string();
    assert!(console.contains("powerbutton: pressed"), "{console}");
    assert!(!pid_alive(pid));
    let kinds: Vec<String> =
        events.kinds("p1").into_iter().filter(|k| k.starts_with("vm.")).collect();
    // The second daemon's stream is another subscription: only the first one's events here.
    assert_eq!(kinds[..4], ["vm.created", "vm.starting", "vm.running", "vm.paused"], "{kinds:?}");
}

/// YAML specs: `vm create -f NAME.yaml` through the CLI, and `POST /v1/vms` with
/// `Content-Type: application/yaml` from curl; the VM they define is the same as from JSON;
/// mistakes in YAML are 400s that name the line or the field.
#[test]
fn yaml_specs_through_the_cli_and_the_api() {
    if !common::kvm_available() || !common::linux_qemu::tool_available("curl", "--version", "curl")
    {
        return;
    }
    let daemon = Daemon::start();
    let file = daemon.dir.path().join("y1.yaml");
    std::fs::write(
        &file,
        "# a VM in YAML\nname: y1\ncpus: 2\nmemory_mib: 64\nboot:\n  cmdline: console=ttyS0 powerbutton\n\
         restart: on-failure\nlabels:\n  tier: web\n",
    )
    .unwrap();
    let out = daemon.cli(&["vm", "create", "-f", file.to_str().unwrap(), "--start"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = daemon.cli(&["vm", "show", "y1", "--output", "json"]);
    let vm: Vm = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((vm.spec.cpus, vm.spec.memory_mib), (2, 64));
    assert_eq!(vm.spec.restart, api::RestartPolicy::OnFailure);
    assert_eq!(vm.spec.labels.get("tier").map(String::as_str), Some("web"));
    assert_eq!(vm.status.state, VmState::Running);

    let curl = |body: &str| -> (u16, serde_json::Value) {
        let out = Command::new("curl")
            .args(["-s", "-S", "--max-time", "10", "-w", "\n%{http_code}"])
            .arg("--unix-socket")
            .arg(daemon.socket())
            .args(["-H", "Content-Type: application/yaml", "--data-binary", body])
            .arg("http://vanguard/v1/vms")
            .output()
            .expect("curl runs");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').expect("a status");
        (code.parse().unwrap(), serde_json::from_str(body).unwrap_or_default())
    };
    let (status, body) = curl("name: y2\nmemory_mib: 96\nboot: {cmdline: console=ttyS0 hello}\n");
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["spec"]["memory_mib"], 96);
    assert_eq!(body["spec"]["boot"]["cmdline"], "console=ttyS0 hello");
    let (status, body) = curl("name: y3\nmemroy_mib: 64\n");
    assert_eq!(status, 400, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(error.starts_with("invalid VM spec: unknown field `memroy_mib`"), "{error}");
    let (status, body) = curl("name: y3\nmemory_mib: 1\n");
    assert_eq!((status, body["field"].as_str()), (400, Some("memory_mib")), "{body}");
    let (status, body) = curl("name: [y3\n");
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("line 1"), "{body}");
    // The CLI names the file.
    let bad = daemon.dir.path().join("bad.yml");
    std::fs::write(&bad, "name: y4\ncpus: many\n").unwrap();
    let out = daemon.cli(&["vm", "create", "-f", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{}: invalid VM spec: cpus: invalid type", bad.display())),
        "{stderr}"
    );
}

/// The websocket console (`GET /v1/vms/{name}/console/ws`) with a peer client: Python's
/// `websockets` types into an `echo` guest and sees its answers and the close when the guest
/// powers off (tests/console_ws.py). Requests that cannot attach get JSON errors.
#[test]
fn the_websocket_console_works_with_a_peer_client() {
    if !common::kvm_available() {
        return;
    }
    let python = std::env::var("VANGUARD_PYTHON").unwrap_or_else(|_| "python3".into());
    let has_websockets = Command::new(&python)
        .args(["-c", "import websockets"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_websockets {
        assert!(
            !common::env_flag("VANGUARD_REQUIRE_KVM"),
            "{python} has no websockets module (Debian: python3-websockets)"
        );
        println!("skipping: {python} has no websockets module (Debian: python3-websockets)");
        return;
    }
    let daemon = Daemon::start();
    let client = daemon.client();
    let mut echo = spec("wsecho");
    echo["boot"]["cmdline"] = "console=ttyS0 echo".into();
    rt().block_on(async {
        let _: Vm = client.post("/v1/vms", &echo).await.unwrap();
        let (status, body) = status_code(&client, "GET", "/v1/vms/wsecho/console/ws", None).await;
        assert_eq!((status, &body["error"]), (409, &"'wsecho' is not running".into()));
        let (status, _) = status_code(&client, "GET", "/v1/vms/none/console/ws", None).await;
        assert_eq!(status, 404);
        let op: Operation = client.post("/v1/vms/wsecho/start", &()).await.unwrap();
        assert_eq!(wait_op(&client, &op).await.state, OperationState::Succeeded);
        let (status, body) = status_code(&client, "GET", "/v1/vms/wsecho/console/ws", None).await;
        assert_eq!(status, 400, "{body}");
        assert!(body["error"].as_str().unwrap().starts_with("not a websocket request"), "{body}");
    });
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/console_ws.py");
    let out =
        Command::new(&python).arg(script).arg(daemon.socket()).arg("wsecho").output().unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("websocket console: ok"));
    rt().block_on(async {
        let vm: Vm = client.get("/v1/vms/wsecho").await.unwrap();
        assert_eq!(vm.status.state, VmState::Stopped);
    });
}

/// The qemu driver boots OVMF for `boot.firmware: uefi`: its boot manager reports on the
/// serial console, and the VM has a variable store of its own. The Vanguard driver refuses
/// the field.
#[test]
fn qemu_boots_uefi_firmware() {
    if !common::kvm_available()
        || !common::linux_qemu::tool_available("qemu-system-x86_64", "--version", "qemu-system-x86")
    {
        return;
    }
    if daemon::hypervisor::ovmf().is_none() {
        assert!(!common::env_flag("VANGUARD_REQUIRE_TOOLS"), "no OVMF (Debian package ovmf)");
        println!("skipping: no OVMF firmware (Debian package ovmf)");
        return;
    }
    let daemon = Daemon::start();
    let client = daemon.client();
    let disk = daemon.dir.path().join("blank.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let rt = multi_thread();
    rt.block_on(async {
        let mut refused = spec("efi-vanguard");
        refused["boot"]["firmware"] = "uefi".into();
        let (status, body) =
            status_code(&client, "POST", "/v1/vms", Some(&refused.to_string())).await;
        assert_eq!((status, body["field"].as_str()), (400, Some("boot.firmware")), "{body}");
        let efi = serde_json::json!({
            "name": "efi",
            "hypervisor": "qemu",
            "memory_mib": 256,
            "boot": { "firmware": "uefi" },
            "disks": [ { "path": disk } ],
        });
        let _: Vm = client.post("/v1/vms", &efi).await.unwrap();
        let op: Operation = client.post("/v1/vms/efi/start", &()).await.unwrap();
        assert_eq!(wait_op(&client, &op).await.state, OperationState::Succeeded);
    });
    let start = Instant::now();
    loop {
        let (_, bytes) = rt.block_on(client.raw("GET", "/v1/vms/efi/console", None)).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        if text.contains("BdsDxe") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "no OVMF boot manager in\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(daemon.data().join("vms/efi/OVMF_VARS.fd").is_file());
    let vm: Vm = rt.block_on(client.get("/v1/vms/efi")).unwrap();
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", vm.status.pid.unwrap())).unwrap();
    assert!(String::from_utf8_lossy(&cmdline).contains("if=pflash"));
    rt.block_on(async {
        let op: Operation = client.post("/v1/vms/efi/stop?force=true", &()).await.unwrap();
        assert_eq!(wait_op(&client, &op).await.state, OperationState::Succeeded);
    });
}
