//! Snapshots, restore and live migration through `vanguard serve` (docs/api.md): real daemons,
//! the real CLI, real VMMs under KVM running the test guest's `dirty` scenario, which keeps
//! writing memory and, on `v` typed on its console, checks every page it wrote. Whatever the
//! daemon does with the VM's state, the guest must find its memory as it left it.

mod common;

use api::client::Client;
use api::{Operation, OperationState, SnapshotEntry, Vm, VmState};
use common::daemon::{certificates, pid_alive, status_code, vmm_pids, wait_op, Daemon, Events};
use serde_json::Value;
use std::time::{Duration, Instant};

/// 8 MiB rewritten at 4 MiB/s: a step line about every 250 ms.
fn dirty_spec(name: &str) -> Value {
    serde_json::json!({ "name": name, "memory_mib": 64, "boot": { "cmdline": "console=ttyS0 dirty=8M,4" } })
}

async fn console(client: &Client, name: &str) -> String {
    let (status, bytes) =
        client.raw("GET", &format!("/v1/vms/{name}/console"), None).await.unwrap();
    assert_eq!(status, 200, "console of {name}");
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Waits until the guest of `name` prints a step above `above`; that step.
async fn step_above(client: &Client, name: &str, above: u64) -> u64 {
    let start = Instant::now();
    loop {
        let text = console(client, name).await;
        if let Some(&step) = common::dirty::steps(&text).last().filter(|&&s| s > above) {
            return step;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "no step above {above}:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The first step the guest of `name` prints (in its current console).
async fn first_step(client: &Client, name: &str) -> u64 {
    step_above(client, name, 0).await;
    common::dirty::steps(&console(client, name).await)[0]
}

/// Types `v` on the guest's console and waits for its verdict on every page: it must be ok.
async fn verify(client: &Client, name: &str) {
    let verified = |text: &str| text.lines().filter(|l| l.contains("dirty: verified")).count();
    let before = verified(&console(client, name).await);
    client.post_bytes(&format!("/v1/vms/{name}/console"), b"v".to_vec()).await.unwrap();
    let start = Instant::now();
    loop {
        let text = console(client, name).await;
        assert!(!text.contains("dirty: FAILED"), "the guest found a wrong page:\n{text}");
        let whole = &text[..text.rfind('\n').unwrap_or(0)];
        if verified(whole) > before {
            let last = whole.lines().rfind(|l| l.contains("dirty: verified")).unwrap();
            assert!(last.trim().ends_with(": ok"), "{last}");
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "no verification:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn vm(client: &Client, name: &str) -> Vm {
    client.get(&format!("/v1/vms/{name}")).await.unwrap()
}

/// Creates and starts a `dirty` VM; its pid once the guest writes.
async fn start_dirty(client: &Client, name: &str) -> u32 {
    let _: Vm = client.post("/v1/vms", &dirty_spec(name)).await.unwrap();
    let op: Operation = client.post(&format!("/v1/vms/{name}/start"), &()).await.unwrap();
    assert_eq!(wait_op(client, &op).await.state, OperationState::Succeeded);
    step_above(client, name, 0).await;
    vm(client, name).await.status.pid.unwrap()
}

/// POSTs `body` to `path`, waits for the operation; it must succeed.
async fn succeed(client: &Client, path: &str, body: &Value) -> Operation {
    let op: Operation = client.post(path, body).await.unwrap();
    let done = wait_op(client, &op).await;
    assert_eq!(done.state, OperationState::Succeeded, "{path}: {done:?}");
    done
}

fn sample(samples: &mut Vec<Value>, schema: &str, value: Value) {
    samples.push(serde_json::json!({ "schema": schema, "value": value }));
}

/// Checks the answers collected against the daemon's OpenAPI document (when python3 has
/// jsonschema).
fn check_samples(client: &Client, samples: Vec<Value>) {
    if !common::daemon::python_jsonschema() {
        return;
    }
    let doc = common::daemon::rt().block_on(status_code(client, "GET", "/openapi.json", None)).1;
    let paths = doc["paths"].as_object().unwrap();
    for path in [
        "/v1/vms/{name}/snapshots",
        "/v1/vms/{name}/snapshots/{snapshot}",
        "/v1/vms/{name}/restore",
        "/v1/vms/{name}/migrate",
        "/v1/vms/{name}/migration/cancel",
        "/v1/migrations/incoming",
        "/v1/migrations/incoming/{name}",
    ] {
        assert!(paths.contains_key(path), "{path} is not in the OpenAPI document");
    }
    let count = samples.len();
    common::daemon::check_openapi(doc, samples, count);
}

/// Snapshot a running guest, let it run on, restore it: it goes back to the snapshot's step
/// and finds every page as it was then. Incremental snapshots, listing, deleting, bad names,
/// and the states that refuse.
#[test]
fn snapshots_and_restore_through_the_daemon() {
    if !common::kvm_available() {
        return;
    }
    let daemon = Daemon::start();
    let client = daemon.client();
    let events = Events::watch(&client);
    let mut samples = Vec::new();
    let rt = common::daemon::rt();
    rt.block_on(async {
        let pid = start_dirty(&client, "snap").await;
        let before = step_above(&client, "snap", 0).await;
        let (status, op) = status_code(
            &client,
            "POST",
            "/v1/vms/snap/snapshots",
            Some(r#"{"name": "s1"}"#),
        )
        .await;
        assert_eq!(status, 202, "{op}");
        sample(&mut samples, "Operation", op.clone());
        let op: Operation = serde_json::from_value(op).unwrap();
        let done = wait_op(&client, &op).await;
        assert_eq!(done.state, OperationState::Succeeded, "{done:?}");
        assert!(done.progress.contains("snapshot 's1' written"), "{}", done.progress);
        sample(&mut samples, "Operation", serde_json::to_value(&done).unwrap());
        let at_snapshot = *common::dirty::steps(&console(&client, "snap").await).last().unwrap();
        assert_eq!(vm(&client, "snap").await.status.pid, Some(pid), "the VM ran on");

        // It runs on, well past the snapshot.
        let ran_on = step_above(&client, "snap", at_snapshot + 2000).await;
        verify(&client, "snap").await;

        // A full snapshot, then an incremental one into it by the same VMM.
        succeed(&client, "/v1/vms/snap/snapshots", &serde_json::json!({"name": "s2"})).await;
        let inc = serde_json::json!({"name": "s2", "incremental": true});
        let done = succeed(&client, "/v1/vms/snap/snapshots", &inc).await;
        assert!(done.progress.contains("(incremental)"), "{}", done.progress);
        let (status, list) = status_code(&client, "GET", "/v1/vms/snap/snapshots", None).await;
        assert_eq!(status, 200);
        for entry in list.as_array().unwrap() {
            sample(&mut samples, "SnapshotEntry", entry.clone());
        }
        let list: Vec<SnapshotEntry> = serde_json::from_value(list).unwrap();
        let names: Vec<&str> = list.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["s1", "s2"]);
        assert!(list.iter().all(|s| s.complete && s.size_bytes > 0 && s.created_at.is_some()));
        let (g1, g2) = (list[0].generation.unwrap(), list[1].generation.unwrap());
        assert!(g2 > g1, "generations {g1} then {g2}: s2 was written later");

        // Restore s1 while the VM runs: a new VMM, the guest back at the snapshot's step.
        let restored = succeed(&client, "/v1/vms/snap/restore", &serde_json::json!({"snapshot": "s1"})).await;
        sample(&mut samples, "Operation", serde_json::to_value(&restored).unwrap());
        let now = vm(&client, "snap").await;
        assert_eq!(now.status.state, VmState::Running);
        let new_pid = now.status.pid.unwrap();
        assert_ne!(new_pid, pid);
        assert!(!pid_alive(pid), "the old VMM was killed");
        assert_eq!(vmm_pids(&daemon.data()), vec![new_pid]);
        let first = first_step(&client, "snap").await;
        assert!(
            first >= before && first < ran_on,
            "restored at step {first}: the snapshot was taken between {before} and {at_snapshot}, the guest had reached {ran_on}"
        );
        verify(&client, "snap").await;

        // This VMM never wrote s1: an incremental snapshot has nothing to build on.
        let op: Operation = client
            .post("/v1/vms/snap/snapshots", &serde_json::json!({"name": "s1", "incremental": true}))
            .await
            .unwrap();
        let done = wait_op(&client, &op).await;
        assert_eq!(done.state, OperationState::Failed, "{done:?}");
        sample(&mut samples, "Operation", serde_json::to_value(&done).unwrap());

        // Delete s2; again is 404.
        assert_eq!(status_code(&client, "DELETE", "/v1/vms/snap/snapshots/s2", None).await.0, 204);
        let (status, error) = status_code(&client, "DELETE", "/v1/vms/snap/snapshots/s2", None).await;
        assert_eq!(status, 404, "{error}");
        sample(&mut samples, "ApiError", error);
        let list: Vec<SnapshotEntry> = client.get("/v1/vms/snap/snapshots").await.unwrap();
        assert_eq!(list.len(), 1);

        // Names that are not one plain directory: 400 naming the field.
        let long = "x".repeat(65);
        for bad in ["", "a/b", "..", ".", ".hidden", "sp ace", long.as_str()] {
            let body = serde_json::json!({ "name": bad }).to_string();
            let (status, error) =
                status_code(&client, "POST", "/v1/vms/snap/snapshots", Some(&body)).await;
            assert_eq!((status, error["field"].as_str()), (400, Some("name")), "{bad:?}: {error}");
            sample(&mut samples, "ApiError", error);
            let body = serde_json::json!({ "snapshot": bad }).to_string();
            let (status, error) =
                status_code(&client, "POST", "/v1/vms/snap/restore", Some(&body)).await;
            assert_eq!((status, error["field"].as_str()), (400, Some("snapshot")), "{bad:?}: {error}");
        }
        let (status, error) =
            status_code(&client, "POST", "/v1/vms/snap/snapshots", Some(r#"{"nam": "x"}"#)).await;
        assert_eq!(status, 400, "{error}");
        let (status, error) =
            status_code(&client, "POST", "/v1/vms/snap/restore", Some(r#"{"snapshot": "nope"}"#)).await;
        assert_eq!(status, 404, "{error}");
        assert!(error["error"].as_str().unwrap().contains("no snapshot 'nope'"), "{error}");

        // A stopped VM: no snapshot (409 naming its state), but a restore starts it.
        let op: Operation = client.post("/v1/vms/snap/stop?force=true", &()).await.unwrap();
        wait_op(&client, &op).await;
        let (status, error) =
            status_code(&client, "POST", "/v1/vms/snap/snapshots", Some(r#"{"name": "s3"}"#)).await;
        assert_eq!(status, 409, "{error}");
        assert!(error["error"].as_str().unwrap().contains("stopped"), "{error}");
        sample(&mut samples, "ApiError", error);
        succeed(&client, "/v1/vms/snap/restore", &serde_json::json!({"snapshot": "s1"})).await;
        assert_eq!(vm(&client, "snap").await.status.state, VmState::Running);
        let first = first_step(&client, "snap").await;
        assert!(first >= before && first < ran_on, "restored at step {first}");
        verify(&client, "snap").await;
        sample(&mut samples, "Vm", serde_json::to_value(vm(&client, "snap").await).unwrap());
    });
    let kinds = events.kinds("snap");
    for kind in ["vm.snapshotted", "vm.restored", "vm.snapshot-deleted"] {
        assert!(kinds.iter().any(|k| k == kind), "no {kind} in {kinds:?}");
    }
    check_samples(&client, samples);
}

/// `vanguard vm migrate NAME`: the VM moves to a fresh VMM process on this host (its pid
/// changes, the guest verifies, its steps go on); the daemon restarted afterwards finds the
/// new process and reaches it on its new API socket; a second move goes back to the first
/// socket.
#[test]
fn same_host_migration_through_the_cli() {
    if !common::kvm_available() {
        return;
    }
    let mut daemon = Daemon::start();
    let client = daemon.client();
    let rt = common::daemon::rt();
    let mut samples = Vec::new();
    let (old_pid, before) = rt.block_on(async {
        let pid = start_dirty(&client, "mover").await;
        (pid, step_above(&client, "mover", 0).await)
    });
    // Slowed down, so that the progress shows.
    let out = daemon.cli(&["vm", "migrate", "mover", "--bandwidth-mib-s", "16"]);
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("migrate mover: moved to VMM process"), "{stdout}");
    assert!(stdout.contains("total ") && stdout.contains("downtime "), "{stdout}");
    assert!(stderr.contains("] ") && stderr.contains("precopy pass"), "no progress: {stderr}");
    let new_pid = rt.block_on(async {
        let now = vm(&client, "mover").await;
        assert_eq!(now.status.state, VmState::Running);
        let new_pid = now.status.pid.unwrap();
        assert_ne!(new_pid, old_pid);
        let start = Instant::now();
        while pid_alive(old_pid) {
            assert!(start.elapsed() < Duration::from_secs(10), "the source VMM did not end");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(vmm_pids(&daemon.data()), vec![new_pid]);
        assert!(first_step(&client, "mover").await >= before, "the guest's counter went on");
        verify(&client, "mover").await;
        // Pause and resume reach the new process (on its own API socket).
        succeed(&client, "/v1/vms/mover/pause", &Value::Null).await;
        assert_eq!(vm(&client, "mover").await.status.state, VmState::Paused);
        succeed(&client, "/v1/vms/mover/resume", &Value::Null).await;
        new_pid
    });

    // A restarted daemon finds the moved VM running and reaches its VMM.
    daemon.kill9();
    daemon.spawn();
    rt.block_on(async {
        let now = vm(&client, "mover").await;
        assert_eq!((now.status.state, now.status.pid), (VmState::Running, Some(new_pid)));
        succeed(&client, "/v1/vms/mover/pause", &Value::Null).await;
        succeed(&client, "/v1/vms/mover/resume", &Value::Null).await;
        // And moves it again, through the API this time.
        let (status, op) = status_code(&client, "POST", "/v1/vms/mover/migrate", Some("{}")).await;
        assert_eq!(status, 202, "{op}");
        sample(&mut samples, "Operation", op.clone());
        let op: Operation = serde_json::from_value(op).unwrap();
        let done = wait_op(&client, &op).await;
        assert_eq!(done.state, OperationState::Succeeded, "{done:?}");
        let info = done.migration.clone().expect("the migration's figures");
        assert_eq!(info.phase, "completed");
        assert!(info.bytes_sent >= 8 << 20, "{info:?}");
        sample(&mut samples, "Operation", serde_json::to_value(&done).unwrap());
        let third = vm(&client, "mover").await.status.pid.unwrap();
        assert_ne!(third, new_pid);
        verify(&client, "mover").await;
        succeed(&client, "/v1/vms/mover/pause", &Value::Null).await;
        succeed(&client, "/v1/vms/mover/resume", &Value::Null).await;
        // No migration under way: nothing to cancel.
        let (status, error) =
            status_code(&client, "POST", "/v1/vms/mover/migration/cancel", None).await;
        assert_eq!(status, 409, "{error}");
        sample(&mut samples, "ApiError", error);
    });
    check_samples(&client, samples);
}

/// Two daemons on this host, the destination listening on TLS with a token: a migration the
/// destination refuses (it has a VM of that name) leaves the source running; then the VM moves
/// (`vanguard vm migrate --to`), is gone from the source and runs at the destination, where the
/// guest verifies. The incoming route answers and is cancelled as the API says.
#[test]
fn migration_between_two_daemons() {
    if !common::kvm_available() || !common::daemon::openssl_available() {
        return;
    }
    let certs = common::TempDir::new("migrate-tls");
    let (ca, cert, key) = certificates(certs.path());
    let dst = Daemon::start_with(Some((cert, key)));
    let out = dst.cli(&["token", "create", "mover"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let to = format!("tcp:{}", dst.tcp.as_ref().unwrap());
    let src = Daemon::start();
    let (src_client, dst_client) = (src.client(), dst.client());
    let rt = common::daemon::rt();
    let mut samples = Vec::new();
    let pid = rt.block_on(async {
        let _: Vm = dst_client.post("/v1/vms", &dirty_spec("traveller")).await.unwrap();
        start_dirty(&src_client, "traveller").await
    });
    let migrate = |src: &Daemon| {
        src.cli(&[
            "vm",
            "migrate",
            "traveller",
            "--to",
            &to,
            "--to-token",
            &token,
            "--to-ca-cert",
            ca.to_str().unwrap(),
        ])
    };

    // Refused: the destination has a VM of that name.
    let out = migrate(&src);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("a VM named 'traveller' exists"), "{stderr}");
    rt.block_on(async {
        let still = vm(&src_client, "traveller").await;
        assert_eq!((still.status.state, still.status.pid), (VmState::Running, Some(pid)));
        let step = *common::dirty::steps(&console(&src_client, "traveller").await).last().unwrap();
        step_above(&src_client, "traveller", step).await;
        let theirs = vm(&dst_client, "traveller").await;
        assert_eq!(theirs.status.state, VmState::Stopped, "the destination's own VM is untouched");
        dst_client.delete("/v1/vms/traveller").await.unwrap();
    });

    // Moved.
    let before = rt.block_on(step_above(&src_client, "traveller", 0));
    let out = migrate(&src);
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains(&format!("moved to {to}")), "{stdout}");
    rt.block_on(async {
        let (status, error) = status_code(&src_client, "GET", "/v1/vms/traveller", None).await;
        assert_eq!(status, 404, "the source no longer has it: {error}");
        assert!(!src.data().join("vms/traveller").exists(), "its files are gone");
        assert!(vmm_pids(&src.data()).is_empty());
        assert!(!pid_alive(pid));
        let there = vm(&dst_client, "traveller").await;
        assert_eq!(there.status.state, VmState::Running);
        assert_eq!(vmm_pids(&dst.data()), vec![there.status.pid.unwrap()]);
        sample(&mut samples, "Vm", serde_json::to_value(&there).unwrap());
        assert!(first_step(&dst_client, "traveller").await >= before);
        verify(&dst_client, "traveller").await;
        let ops: Vec<Operation> = dst_client.get("/v1/operations").await.unwrap();
        let incoming = ops.iter().find(|o| o.kind == api::OperationKind::Incoming).unwrap();
        assert_eq!(incoming.state, OperationState::Succeeded, "{incoming:?}");

        // The incoming route itself: the address to send to, then cancelled (the VM goes).
        let body = serde_json::json!({ "name": "ghost", "spec": dirty_spec("ghost") }).to_string();
        let (status, accepted) =
            status_code(&dst_client, "POST", "/v1/migrations/incoming", Some(&body)).await;
        assert_eq!(status, 201, "{accepted}");
        assert!(accepted["address"].as_str().unwrap().starts_with("tcp:127.0.0.1:"), "{accepted}");
        assert_eq!(accepted["vm"]["status"]["state"], "incoming");
        sample(&mut samples, "IncomingAccepted", accepted);
        let (status, error) =
            status_code(&dst_client, "POST", "/v1/migrations/incoming", Some(&body)).await;
        assert_eq!(status, 409, "{error}");
        sample(&mut samples, "ApiError", error);
        let (status, _) =
            status_code(&dst_client, "DELETE", "/v1/migrations/incoming/ghost", None).await;
        assert_eq!(status, 204);
        assert_eq!(status_code(&dst_client, "GET", "/v1/vms/ghost", None).await.0, 404);
        assert!(!dst.data().join("vms/ghost").exists());
        let (status, error) =
            status_code(&dst_client, "DELETE", "/v1/migrations/incoming/traveller", None).await;
        assert_eq!(status, 409, "a VM that arrived is not incoming: {error}");
    });
    check_samples(&dst_client, samples);
}

/// A migration cancelled in its pre-copy (`vanguard vm cancel-migration`): the operation fails
/// with the VMM's reason, the VM runs on in its VMM, the destination process is gone, and the
/// guest verifies.
#[test]
fn a_cancelled_migration_leaves_the_vm_where_it_was() {
    if !common::kvm_available() {
        return;
    }
    let daemon = Daemon::start();
    let client = daemon.client();
    let rt = common::daemon::rt();
    let pid = rt.block_on(start_dirty(&client, "stay"));
    // 1 MiB/s: the pre-copy of 8 MiB takes seconds.
    let op: Operation = rt
        .block_on(client.post("/v1/vms/stay/migrate", &serde_json::json!({"bandwidth_mib_s": 1})))
        .unwrap();
    rt.block_on(async {
        let start = Instant::now();
        loop {
            let now: Operation = client.get(&format!("/v1/operations/{}", op.id)).await.unwrap();
            if now.migration.as_ref().is_some_and(|m| m.phase == "precopy") {
                break;
            }
            assert_eq!(now.state, OperationState::Running, "{now:?}");
            assert!(start.elapsed() < Duration::from_secs(20), "no pre-copy: {now:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let out = daemon.cli(&["vm", "cancel-migration", "stay"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    rt.block_on(async {
        let done = wait_op(&client, &op).await;
        assert_eq!(done.state, OperationState::Failed, "{done:?}");
        assert!(done.error.as_deref().unwrap().contains("the migration failed"), "{done:?}");
        let now = vm(&client, "stay").await;
        assert_eq!((now.status.state, now.status.pid), (VmState::Running, Some(pid)));
        let start = Instant::now();
        while vmm_pids(&daemon.data()) != vec![pid] {
            assert!(start.elapsed() < Duration::from_secs(10), "the destination VMM is left");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let step = *common::dirty::steps(&console(&client, "stay").await).last().unwrap();
        step_above(&client, "stay", step).await;
        verify(&client, "stay").await;
        // It can still be paused through its own socket, and moved.
        succeed(&client, "/v1/vms/stay/pause", &Value::Null).await;
        succeed(&client, "/v1/vms/stay/resume", &Value::Null).await;
        succeed(&client, "/v1/vms/stay/migrate", &serde_json::json!({})).await;
        verify(&client, "stay").await;
    });
}
