//! The test guest's `dirty` scenario seen from a test: its step lines, waiting for them, and
//! its verification (docs/test-guest.md). Shared by the snapshot and migration tests.

use super::Running;
use std::path::Path;
use std::time::{Duration, Instant};

/// The `dirty: step N` numbers printed so far (whole lines only).
pub fn steps(out: &str) -> Vec<u64> {
    let out = &out[..out.rfind('\n').unwrap_or(0)];
    out.lines().filter_map(|l| l.trim().strip_prefix("dirty: step ")?.parse().ok()).collect()
}

/// Waits (up to 60 s) until the guest has printed more `dirty: step` lines than `seen`;
/// returns the last step.
pub fn wait_for_step(vm: &mut Running, seen: usize) -> u64 {
    let start = Instant::now();
    loop {
        let all = steps(&vm.stdout_so_far());
        if all.len() > seen {
            return *all.last().expect("a step");
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no new `dirty: step` line in 60 s:\n{}",
            vm.stdout_so_far()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Asks the guest to verify every page (`v`); returns its `dirty: verified` line, which must
/// end in `: ok`.
pub fn verify(vm: &mut Running) -> String {
    let before = vm.stdout_so_far().matches("dirty: verified").count();
    vm.write_stdin(b"v");
    let start = Instant::now();
    loop {
        let all = vm.stdout_so_far();
        assert!(!all.contains("dirty: FAILED"), "the guest found a wrong page:\n{all}");
        let whole = &all[..all.rfind('\n').unwrap_or(0)];
        let lines: Vec<&str> = whole.lines().filter(|l| l.contains("dirty: verified")).collect();
        if lines.len() > before {
            let line = lines[lines.len() - 1].trim();
            assert!(line.ends_with(": ok"), "{line}");
            return line.to_string();
        }
        assert!(start.elapsed() < Duration::from_secs(60), "no verification in 60 s:\n{all}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The step a `dirty: verified ... at step N...` line names.
pub fn verified_step(line: &str) -> u64 {
    let step = line
        .split("at step ")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next().and_then(|s| s.parse().ok()));
    step.unwrap_or_else(|| panic!("no step in {line}"))
}

/// Stops the scenario (`q`) and waits for its last line.
pub fn stop(vm: &mut Running) {
    vm.write_stdin(b"q");
    vm.wait_for_stdout("dirty: stopped at step");
}

/// Waits until `address` accepts connections (the destination listens).
pub fn wait_listening(address: &str) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        if let Some(path) = address.strip_prefix("unix:") {
            if Path::new(path).exists() {
                return;
            }
        } else if let Some(addr) = address.strip_prefix("tcp:") {
            // Probing a TCP listener would be taken as the migration's connection: its port
            // is bound when `ss` lists it.
            let out = std::process::Command::new("ss").args(["-Hltn"]).output();
            if let Ok(out) = out {
                let port = addr.rsplit(':').next().unwrap();
                if String::from_utf8_lossy(&out.stdout).contains(&format!(":{port} ")) {
                    return;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{address} is not listening after 20 s");
}

pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
