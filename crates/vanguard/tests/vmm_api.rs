//! The per-VM API (`vanguard vmm --api-socket PATH`, docs/api.md), spoken to by curl: a guest
//! that polls the ACPI power-button status by port I/O (the `powerbutton` scenario) makes
//! I/O exits as long as it runs, so the exit counters in /metrics show whether its vCPU runs.
//! Paused, the counters stand still; resumed, they move again; the power button pressed
//! through the API ends the guest cleanly; the socket is gone afterwards.

mod common;

use common::linux_qemu::tool_available;
use std::path::Path;
use std::time::Duration;

/// `curl` on the Unix socket: (HTTP status, body).
fn curl(socket: &Path, method: &str, path: &str) -> (u16, String) {
    common::curl_unix(socket, method, path, None)
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// Whether vCPU 0's I/O exits pass `count` within 20 s (a running guest's do as soon as the
/// host lets its vCPU run).
fn exits_pass(socket: &Path, count: u64) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        if io_exits(socket) > count {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// vCPU 0's port I/O exits, from /metrics.
fn io_exits(socket: &Path) -> u64 {
    let (code, body) = curl(socket, "GET", "/metrics");
    assert_eq!(code, 200, "{body}");
    let line = body
        .lines()
        .find(|l| l.starts_with("vanguard_vmm_vcpu_exits_total{vcpu=\"0\",kind=\"io\"}"))
        .unwrap_or_else(|| panic!("no I/O exit counter in\n{body}"));
    line.rsplit(' ').next().and_then(|v| v.parse().ok()).expect("a count")
}

#[test]
fn pause_resume_and_power_button_through_the_vmm_socket() {
    if !common::kvm_available() || !tool_available("curl", "--version", "curl") {
        return;
    }
    let dir = common::TempDir::new("vmm-api");
    let socket = dir.path().join("vmm.sock");
    let mut vm =
        common::guest("console=ttyS0 powerbutton", &["--api-socket", socket.to_str().unwrap()])
            .spawn_interactive();
    vm.wait_for_stdout("powerbutton: waiting");
    let mode = std::fs::metadata(&socket).expect("the socket exists");
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777, 0o600);

    let (code, body) = curl(&socket, "GET", "/v1/vm");
    assert_eq!(code, 200, "{body}");
    let info = json(&body);
    assert_eq!(info["state"], "running");
    assert_eq!(info["vcpus"], 1);
    assert_eq!(info["memory_mib"], 128);
    assert_eq!(info["pid"], vm.pid());

    // Running: the guest's polling makes I/O exits.
    let before = io_exits(&socket);
    assert!(exits_pass(&socket, before), "a running guest made no I/O exits");

    let (code, body) = curl(&socket, "PUT", "/v1/vm/pause");
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["state"], "paused");
    let paused = io_exits(&socket);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(io_exits(&socket), paused, "a paused vCPU exited to the VMM");
    // Pausing again changes nothing; the power button is refused while paused.
    assert_eq!(curl(&socket, "PUT", "/v1/vm/pause").0, 200);
    let (code, body) = curl(&socket, "PUT", "/v1/vm/shutdown");
    assert_eq!(code, 409, "{body}");
    assert!(json(&body)["error"].as_str().unwrap().contains("resume it first"), "{body}");

    let (code, body) = curl(&socket, "PUT", "/v1/vm/resume");
    assert_eq!(code, 200, "{body}");
    let info = json(&body);
    assert_eq!(info["state"], "running");
    assert!(info["paused_ms"].as_u64().unwrap() >= 300, "{body}");
    assert!(exits_pass(&socket, paused), "the resumed guest made no I/O exits");
    let (_, metrics) = curl(&socket, "GET", "/metrics");
    assert!(metrics.contains("\nvanguard_vmm_paused 0\n"), "{metrics}");
    assert!(metrics.contains("# TYPE vanguard_vmm_vcpu_exits_total counter"), "{metrics}");

    // Wrong methods and paths get JSON errors.
    let (code, body) = curl(&socket, "GET", "/v1/vm/pause");
    assert_eq!(code, 405, "{body}");
    assert!(json(&body)["error"].as_str().unwrap().contains("takes PUT"));
    let (code, body) = curl(&socket, "GET", "/v1/nothing");
    assert_eq!(code, 404, "{body}");

    let (code, body) = curl(&socket, "PUT", "/v1/vm/shutdown");
    assert_eq!(code, 202, "{body}");
    let out = vm.finish();
    out.assert_clean_exit();
    out.assert_lines_in_order(&["powerbutton: pressed", "vanguard-guest: done, powering off"]);
    assert!(!socket.exists(), "the socket outlived the VMM");
}

/// A socket another VMM is serving is refused with a clear error; a stale one is replaced.
#[test]
fn a_socket_in_use_is_refused_and_a_stale_one_replaced() {
    if !common::kvm_available() {
        return;
    }
    let dir = common::TempDir::new("vmm-api-busy");
    let socket = dir.path().join("vmm.sock");
    let arg = socket.to_str().unwrap();
    let mut first =
        common::guest("console=ttyS0 powerbutton", &["--api-socket", arg]).spawn_interactive();
    first.wait_for_stdout("powerbutton: waiting");
    let out = common::guest("console=ttyS0 hello", &["--api-socket", arg]).run();
    assert_eq!(out.code(), Some(1), "{}", out.report());
    out.assert_stderr_contains(&format!(
        "vanguard: error: cannot listen on API socket {arg}: another process is listening there"
    ));
    out.assert_no_panic();
    first.kill_now();
    assert!(socket.exists(), "a killed VMM cannot remove its socket");
    let out = common::guest("console=ttyS0 hello", &["--api-socket", arg]).run();
    out.assert_clean_exit();
    assert!(!socket.exists());
}
