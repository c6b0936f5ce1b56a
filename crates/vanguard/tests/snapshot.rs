//! Snapshots (docs/snapshot.md): a running guest that keeps writing memory (the `dirty`
//! scenario) is saved through the per-VM API (`PUT /v1/vm/snapshot`, spoken to by curl), its
//! VMM killed, and a new `vanguard vmm --restore DIR` process runs it on: the guest checks every
//! page it wrote against its step counter, and the counter goes on from where it was. Also:
//! incremental snapshots (only dirty pages), the errors a damaged or refused snapshot gives, and
//! the golden snapshots of earlier format versions, which every later Vanguard must restore.

mod common;

use common::linux_qemu::tool_available;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

fn ready() -> bool {
    common::kvm_available() && tool_available("curl", "--version", "curl")
}

use common::dirty::{steps, wait_for_step};

/// Asks the guest to verify every page; returns the step it verified at.
fn verify(vm: &mut common::Running) -> u64 {
    common::dirty::verified_step(&common::dirty::verify(vm))
}

fn snapshot(socket: &Path, dir: &Path, incremental: bool) -> serde_json::Value {
    let body = format!(r#"{{"destination":"{}","incremental":{incremental}}}"#, dir.display());
    let (code, answer) = common::curl_unix(socket, "PUT", "/v1/vm/snapshot", Some(&body));
    assert_eq!(code, 200, "{answer}");
    let info = json(&answer);
    assert_eq!(info["incremental"], incremental);
    assert!(info["state_bytes"].as_u64().unwrap() > 1000, "{info}");
    info
}

/// Starts the test guest's `dirty` scenario with an API socket; returns it once it writes.
fn start_dirty(cpus: u8, arg: &str, socket: &Path) -> common::Running {
    start_guest(cpus, "128M", &format!("dirty={arg}"), socket, Duration::from_secs(120))
}

/// Starts a guest of `memory` running `scenarios` (among them `dirty`) with an API socket and
/// a time limit; returns it once the dirty scenario writes.
fn start_guest(
    cpus: u8,
    memory: &str,
    scenarios: &str,
    socket: &Path,
    limit: Duration,
) -> common::Running {
    let cpus = cpus.to_string();
    let mut vm = common::guest(
        &format!("console=ttyS0 {scenarios}"),
        &["--cpus", &cpus, "--memory", memory, "--api-socket", socket.to_str().unwrap()],
    )
    .timeout(limit)
    .spawn_interactive();
    vm.wait_for_stdout("dirty: writing");
    wait_for_step(&mut vm, 0);
    vm
}

fn restore(dir: &Path) -> common::Running {
    common::run_args(["--restore", dir.to_str().unwrap()])
        .timeout(Duration::from_secs(120))
        .spawn_interactive()
}

/// Verifies the restored guest, checks its counter went on from `before`, and stops it;
/// returns what it printed, through its clean exit.
fn check_restored(mut vm: common::Running, before: u64) -> common::Outcome {
    let first = wait_for_step(&mut vm, 0);
    assert!(first > before, "the restored guest's step {first} is not past {before}");
    let verified = verify(&mut vm);
    assert!(verified >= first, "verified at {verified}, before step {first}");
    vm.write_stdin(b"q");
    vm.wait_for_stdout("dirty: stopped at step");
    let out = vm.finish();
    out.assert_clean_exit();
    out
}

fn save_and_restore(cpus: u8) {
    let dir = common::TempDir::new("snapshot");
    let socket = dir.path().join("vmm.sock");
    let snap = dir.path().join("snap");
    let mut vm = start_dirty(cpus, "32M", &socket);
    verify(&mut vm);
    // The last step printed before the request: the snapshot is taken after it (the source
    // resumes afterwards and prints on, steps the restored guest will print again).
    let printed = steps(&vm.stdout_so_far());
    let before = *printed.last().expect("steps before the snapshot");
    let info = snapshot(&socket, &snap, false);
    // 32 MiB written by the guest, plus its own image; zero pages are holes.
    let written = info["memory_bytes_written"].as_u64().unwrap();
    assert!((32 << 20..40 << 20).contains(&written), "{info}");
    let meta = std::fs::metadata(snap.join("memory")).unwrap();
    assert_eq!(meta.len(), 128 << 20, "the memory file spans guest RAM");
    // The source runs on after the snapshot, then dies without a word.
    wait_for_step(&mut vm, printed.len());
    vm.kill_now();
    check_restored(restore(&snap), before);
    // The snapshot is not consumed: restoring it again gives the same guest again.
    check_restored(restore(&snap), before);
}

#[test]
fn a_guest_writing_memory_is_saved_and_restored_1_vcpu() {
    if ready() {
        save_and_restore(1);
    }
}

#[test]
fn a_guest_writing_memory_is_saved_and_restored_4_vcpus() {
    if ready() {
        save_and_restore(4);
    }
}

/// A 4 GiB guest (two RAM ranges, below and above the 4 GiB boundary) with `mem` written all
/// over and the dirty scenario going, saved and restored: the dirty region verifies, and then
/// `memcheck` finds every other word `mem` wrote, in both ranges.
#[test]
fn a_4_gib_guest_with_2_vcpus_is_saved_and_restored() {
    if !ready() {
        return;
    }
    let dir = common::TempDir::new("snapshot-4g");
    let socket = dir.path().join("vmm.sock");
    let snap = dir.path().join("snap");
    let mut vm = start_guest(2, "4G", "mem dirty=32M memcheck", &socket, Duration::from_secs(240));
    verify(&mut vm);
    let before = *steps(&vm.stdout_so_far()).last().expect("steps before the snapshot");
    let info = snapshot(&socket, &snap, false);
    let written = info["memory_bytes_written"].as_u64().unwrap();
    assert!(written >= 4000 << 20, "nearly all 4 GiB is non-zero: {info}");
    vm.kill_now();
    let out = check_restored(restore(&snap), before);
    let line = out.stdout.lines().find(|l| l.contains("memcheck:")).unwrap_or("");
    println!("{}", line.trim());
    assert!(line.contains("in 2 ranges") && line.trim_end().ends_with(": ok"), "{}", out.report());
}

#[test]
fn incremental_snapshot_writes_only_dirty_pages() {
    if !ready() {
        return;
    }
    let dir = common::TempDir::new("snapshot-incr");
    let socket = dir.path().join("vmm.sock");
    let snap = dir.path().join("snap");
    // 4 MiB/s over a 64 MiB region (filled once at full speed first): a second's dirt is a
    // small part of what a full snapshot writes.
    let vm = start_dirty(2, "64M,4", &socket);
    // Before any full snapshot there is nothing to build on.
    let body = format!(r#"{{"destination":"{}","incremental":true}}"#, snap.display());
    let (code, answer) = common::curl_unix(&socket, "PUT", "/v1/vm/snapshot", Some(&body));
    assert_eq!(code, 409, "{answer}");
    assert!(answer.contains("needs a snapshot of this VM"), "{answer}");

    let full = snapshot(&socket, &snap, false);
    let full_bytes = full["memory_bytes_written"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let incr = snapshot(&socket, &snap, true);
    let incr_bytes = incr["memory_bytes_written"].as_u64().unwrap();
    // About 6 MiB dirtied in 1.5 s (less if the host starved the guest), never the whole.
    assert!(incr_bytes > 0 && incr_bytes < 16 << 20, "incremental wrote {incr_bytes} bytes");
    assert!(full_bytes > 64 << 20, "the full snapshot wrote {full_bytes} bytes");
    // A second incremental on top of the first.
    std::thread::sleep(Duration::from_millis(500));
    let before = *steps(&vm.stdout_so_far()).last().unwrap();
    let again = snapshot(&socket, &snap, true);
    assert!(again["memory_bytes_written"].as_u64().unwrap() < 16 << 20, "{again}");
    vm.kill_now();
    check_restored(restore(&snap), before);
}

#[test]
fn a_restored_vm_is_snapshotted_again_over_its_own_snapshot() {
    if !ready() {
        return;
    }
    let dir = common::TempDir::new("snapshot-chain");
    let (s1, s2) = (dir.path().join("s1.sock"), dir.path().join("s2.sock"));
    let (first, second) = (dir.path().join("first"), dir.path().join("second"));
    let vm = start_dirty(1, "16M", &s1);
    let before = *steps(&vm.stdout_so_far()).last().unwrap();
    snapshot(&s1, &first, false);
    vm.kill_now();
    let mut vm = common::run_args([
        "--restore",
        first.to_str().unwrap(),
        "--api-socket",
        s2.to_str().unwrap(),
    ])
    .timeout(Duration::from_secs(120))
    .spawn_interactive();
    wait_for_step(&mut vm, 0);
    // An incremental snapshot builds only on what this process wrote: not on the snapshot it
    // was restored from (whose memory file its RAM maps).
    let body = format!(r#"{{"destination":"{}","incremental":true}}"#, first.display());
    let (code, answer) = common::curl_unix(&s2, "PUT", "/v1/vm/snapshot", Some(&body));
    assert_eq!(code, 409, "{answer}");
    // A full snapshot into the directory it was restored from replaces the files by rename:
    // the running VM keeps its private mapping of the old memory file.
    let mid = *steps(&vm.stdout_so_far()).last().unwrap();
    assert!(mid > before);
    snapshot(&s2, &first, false);
    snapshot(&s2, &first, true);
    snapshot(&s2, &second, false);
    verify(&mut vm);
    vm.kill_now();
    check_restored(restore(&second), mid);
    check_restored(restore(&first), mid);
}

fn restore_fails(dir: &Path, needle: &str) {
    let out = common::run_args(["--restore", dir.to_str().unwrap(), "--serial", "none"])
        .timeout(Duration::from_secs(60))
        .run();
    out.assert_code(1).assert_stderr_contains(needle).assert_no_panic();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for name in ["state", "memory"] {
        // cp keeps the memory file sparse.
        let ok = std::process::Command::new("cp")
            .args(["--sparse=always"])
            .arg(from.join(name))
            .arg(to.join(name))
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }
}

#[test]
fn damaged_or_refused_snapshots_give_clear_errors() {
    if !ready() {
        return;
    }
    let dir = common::TempDir::new("snapshot-bad");
    let socket = dir.path().join("vmm.sock");
    let snap = dir.path().join("snap");
    let vm = start_dirty(1, "8M", &socket);
    // Malformed requests.
    let (code, answer) =
        common::curl_unix(&socket, "PUT", "/v1/vm/snapshot", Some(r#"{"dest":"/tmp/x"}"#));
    assert_eq!(code, 400, "{answer}");
    assert!(answer.contains("unknown field `dest`"), "{answer}");
    let (code, _) = common::curl_unix(&socket, "GET", "/v1/vm/snapshot", None);
    assert_eq!(code, 405);
    let (code, answer) = common::curl_unix(
        &socket,
        "PUT",
        "/v1/vm/snapshot",
        Some(r#"{"destination":"/proc/no/such/dir"}"#),
    );
    assert_eq!(code, 500, "{answer}");
    assert!(answer.contains("/proc/no/such/dir"), "{answer}");
    snapshot(&socket, &snap, false);
    vm.kill_now();

    // One flipped byte in the state file.
    let bad = dir.path().join("flipped");
    copy_dir(&snap, &bad);
    let mut state = std::fs::read(bad.join("state")).unwrap();
    let middle = state.len() / 2;
    state[middle] ^= 0x01;
    std::fs::write(bad.join("state"), &state).unwrap();
    restore_fails(&bad, "is corrupt: CRC-32");
    // A state file from a newer format.
    let newer = dir.path().join("newer");
    copy_dir(&snap, &newer);
    let mut state = std::fs::read(newer.join("state")).unwrap();
    state[8] = 99;
    std::fs::write(newer.join("state"), &state).unwrap();
    restore_fails(&newer, "format version 99 is newer than this Vanguard reads");
    // A memory file cut short.
    let short = dir.path().join("short");
    copy_dir(&snap, &short);
    let f = std::fs::OpenOptions::new().write(true).open(short.join("memory")).unwrap();
    f.set_len(64 << 20).unwrap();
    restore_fails(&short, "the state file says 134217728");
    // A memory file without its state: an interrupted incremental snapshot.
    let orphan = dir.path().join("orphan");
    copy_dir(&snap, &orphan);
    std::fs::remove_file(orphan.join("state")).unwrap();
    restore_fails(&orphan, "was interrupted");
    // No snapshot at all.
    restore_fails(&dir.path().join("none"), "read the snapshot state file");
    // The machine comes from the snapshot: options that describe one are refused.
    let out = common::run_args(["--restore", snap.to_str().unwrap(), "--cpus", "2"]).run();
    out.assert_code(2).assert_stderr_contains("--cpus");
}

/// The golden snapshots: `tests/golden/snapshot-v<N>/` hold a state file and the gzipped
/// memory file of the `dirty` guest (1 vCPU, 128 MiB, a 256 KiB region) as written by the
/// Vanguard of format version N. Every later Vanguard must restore them, and the guest must
/// find its memory intact. `VANGUARD_WRITE_GOLDEN=1` writes the current version's if absent.
#[test]
fn golden_snapshots_of_every_format_version_restore() {
    if !ready() {
        return;
    }
    let golden_root = common::repo_root().join("crates/vanguard/tests/golden");
    // Container version 1, machine section version 2 (virtio devices), one per CPU vendor: a
    // golden holds its writer's CPUID, which a CPU of the other vendor lacks bits of.
    let current = golden_root.join(format!("snapshot-v1-machine2-{}", cpu_vendor()));
    if common::env_flag("VANGUARD_WRITE_GOLDEN") && !current.exists() {
        write_golden(&current);
    }
    let (mut found, mut restored) = (0, 0);
    for entry in std::fs::read_dir(&golden_root).expect("tests/golden exists") {
        let golden = entry.unwrap().path();
        if !golden.file_name().unwrap().to_string_lossy().starts_with("snapshot-v") {
            continue;
        }
        found += 1;
        let work = common::TempDir::new("golden");
        let dir = work.path().join("snap");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(golden.join("state"), dir.join("state")).unwrap();
        let memory = std::fs::File::create(dir.join("memory")).unwrap();
        let ok = std::process::Command::new("gzip")
            .arg("-dc")
            .arg(golden.join("memory.gz"))
            .stdout(memory)
            .status()
            .expect("gzip runs")
            .success();
        assert!(ok, "gzip -dc {}", golden.display());
        let before: u64 = std::fs::read_to_string(golden.join("step"))
            .expect("the golden's last printed step")
            .trim()
            .parse()
            .unwrap();
        eprintln!("restoring {}", golden.display());
        let mut vm = restore(&dir);
        // A golden holds the CPUID of the machine that wrote it: a host whose CPU lacks one
        // of those features refuses it (rightly), naming the bits.
        let start = Instant::now();
        while steps(&vm.stdout_so_far()).is_empty() && !vm.has_exited() {
            assert!(start.elapsed() < Duration::from_secs(30), "{} did not run", golden.display());
            std::thread::sleep(Duration::from_millis(20));
        }
        if steps(&vm.stdout_so_far()).is_empty() {
            let out = vm.finish();
            assert!(out.stderr.contains("which this host does not offer"), "{}", out.report());
            println!(
                "skipping golden {}: written on a CPU with features this one lacks: {}",
                golden.display(),
                out.stderr.trim()
            );
            continue;
        }
        check_restored(vm, before);
        restored += 1;
    }
    assert!(found >= 1, "no golden snapshot in {}", golden_root.display());
    assert!(restored >= 1, "no golden snapshot in {} restores on this CPU", golden_root.display());
}

/// `intel`, `amd` or `other`, from /proc/cpuinfo's vendor_id.
fn cpu_vendor() -> &'static str {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if info.contains("GenuineIntel") {
        "intel"
    } else if info.contains("AuthenticAMD") {
        "amd"
    } else {
        "other"
    }
}

fn write_golden(to: &PathBuf) {
    let work = common::TempDir::new("golden-write");
    let socket = work.path().join("vmm.sock");
    let snap = work.path().join("snap");
    // With a virtio-rng device the driver has brought up, so that the golden holds a
    // `virtio` section with a running queue.
    let mut vm = common::guest(
        "console=ttyS0 rng dirty=256K,1 rng",
        &["--rng", "--api-socket", socket.to_str().unwrap()],
    )
    .timeout(Duration::from_secs(120))
    .spawn_interactive();
    vm.wait_for_stdout("dirty: writing");
    wait_for_step(&mut vm, 0);
    verify(&mut vm);
    let before = *steps(&vm.stdout_so_far()).last().unwrap();
    snapshot(&socket, &snap, false);
    vm.kill_now();
    std::fs::create_dir_all(to).unwrap();
    std::fs::copy(snap.join("state"), to.join("state")).unwrap();
    let out = std::fs::File::create(to.join("memory.gz")).unwrap();
    let ok = std::process::Command::new("gzip")
        .args(["-9", "-c"])
        .arg(snap.join("memory"))
        .stdout(out)
        .status()
        .unwrap()
        .success();
    assert!(ok);
    std::fs::write(to.join("step"), format!("{before}\n")).unwrap();
    eprintln!("wrote the golden snapshot {}", to.display());
}
