//! Snapshots and live migration of VMs with virtio devices (docs/snapshot.md): the test guest
//! brings up a virtio-blk disk and a virtio-rng device, then keeps writing memory (the `dirty`
//! scenario) while it is saved and restored, or moved to another VMM process over TCP. The
//! guest then verifies every page, and uses the devices again through the rings it had: its
//! MD5 of the whole disk must match the host's `md5sum` of the image. Also: a restore and a
//! migration's destination refuse a disk image that is missing or changed size.

mod common;

use common::dirty::{free_tcp_port, steps, verify, wait_for_step, wait_listening};
use common::linux_qemu::tool_available;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn ready() -> bool {
    common::kvm_available() && tool_available("curl", "--version", "curl")
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// The guest: disk and rng brought up and used (each leaves its queue's indices moved on),
/// then `dirty` using the disk too, then both devices used again after `q`.
const CMDLINE: &str = "console=ttyS0 disk rng dirty=8M,20 disk rng";

/// A VM with a 4 MiB disk of random bytes and an rng; returns it once it writes memory.
fn start(dir: &Path, socket: &Path, extra: &[&str]) -> (common::Running, PathBuf) {
    let image = dir.join("disk.img");
    std::fs::write(&image, common::image(4 << 20, 7)).unwrap();
    let disk = format!("path={}", image.display());
    let mut args = vec!["--disk", &disk, "--rng", "--api-socket", socket.to_str().unwrap()];
    args.extend_from_slice(extra);
    let mut vm =
        common::guest(CMDLINE, &args).timeout(Duration::from_secs(180)).spawn_interactive();
    wait_for_step(&mut vm, 0);
    (vm, image)
}

/// The guest goes on from `before`, verifies its memory, stops `dirty` and reads the disk and
/// the rng again through the restored devices; the disk's MD5 must be the host's.
fn check_moved(mut vm: common::Running, before: u64, image: &Path) {
    let first = wait_for_step(&mut vm, 0);
    assert!(first > before, "step {first} is not past {before}");
    verify(&mut vm);
    common::dirty::stop(&mut vm);
    let out = vm.finish();
    out.assert_clean_exit();
    let md5 = common::host_md5(image);
    // Read again after the move (the first reads were the source's).
    let lines = out.stdout.lines().filter(|l| l.trim() == format!("disk0 md5 {md5}")).count();
    assert_eq!(lines, 1, "{}", out.report());
    assert_eq!(out.stdout.matches("rng: read 64 + 64 bytes").count(), 1, "{}", out.report());
}

#[test]
fn a_vm_with_a_disk_and_rng_in_use_is_saved_and_restored() {
    if !ready() {
        return;
    }
    let dir = common::TempDir::new("vsnap");
    let socket = dir.path().join("vmm.sock");
    let snap = dir.path().join("snap");
    let (mut vm, image) = start(dir.path(), &socket, &[]);
    verify(&mut vm);
    let before = *steps(&vm.stdout_so_far()).last().unwrap();
    let body = format!(r#"{{"destination":"{}"}}"#, snap.display());
    let (code, answer) = common::curl_unix(&socket, "PUT", "/v1/vm/snapshot", Some(&body));
    assert_eq!(code, 200, "{answer}");
    vm.kill_now();
    let restored = common::run_args(["--restore", snap.to_str().unwrap()])
        .timeout(Duration::from_secs(120))
        .spawn_interactive();
    check_moved(restored, before, &image);
}

#[test]
fn a_vm_with_a_disk_and_rng_in_use_moves_over_tcp() {
    if !ready() {
        return;
    }
    let dir = common::TempDir::new("vmig");
    let socket = dir.path().join("src.sock");
    let (mut src, image) = start(dir.path(), &socket, &[]);
    verify(&mut src);
    let address = format!("tcp:127.0.0.1:{}", free_tcp_port());
    let dst = common::run_args(["--migrate-from", &address])
        .timeout(Duration::from_secs(180))
        .spawn_interactive();
    wait_listening(&address);
    let before = *steps(&src.stdout_so_far()).last().unwrap();
    let body = format!(r#"{{"destination":"{address}"}}"#);
    let (code, answer) = common::curl_unix(&socket, "PUT", "/v1/vm/migrate", Some(&body));
    assert_eq!(code, 200, "{answer}");
    assert_eq!(json(&answer)["phase"], "completed", "{answer}");
    src.finish().assert_code(0).assert_stderr_contains("the VM moved to another VMM");
    check_moved(dst, before, &image);
}

#[test]
fn a_missing_or_resized_disk_image_is_refused_before_the_vm_runs() {
    if !ready() {
        return;
    }
    let dir = common::TempDir::new("vdisk");
    let socket = dir.path().join("vmm.sock");
    let snap = dir.path().join("snap");
    let (mut vm, image) = start(dir.path(), &socket, &[]);
    let body = format!(r#"{{"destination":"{}"}}"#, snap.display());
    let (code, answer) = common::curl_unix(&socket, "PUT", "/v1/vm/snapshot", Some(&body));
    assert_eq!(code, 200, "{answer}");

    // A migration's destination checks before any memory is sent; the source runs on.
    let file = std::fs::OpenOptions::new().write(true).open(&image).unwrap();
    file.set_len(5 << 20).unwrap();
    let address = format!("tcp:127.0.0.1:{}", free_tcp_port());
    let dst = common::run_args(["--migrate-from", &address])
        .timeout(Duration::from_secs(60))
        .spawn_interactive();
    wait_listening(&address);
    let body = format!(r#"{{"destination":"{address}"}}"#);
    let (code, answer) = common::curl_unix(&socket, "PUT", "/v1/vm/migrate", Some(&body));
    assert_eq!(code, 502, "{answer}");
    let why = format!("the disk image {} is 5242880 bytes, it was 4194304", image.display());
    assert!(answer.contains(&why), "{answer}");
    dst.finish().assert_code(1).assert_stderr_contains(&why);
    let seen = steps(&vm.stdout_so_far()).len();
    wait_for_step(&mut vm, seen);
    verify(&mut vm);
    vm.kill_now();

    // A restore, likewise.
    let restore_fails = |needle: &str| {
        common::run_args(["--restore", snap.to_str().unwrap(), "--serial", "none"])
            .timeout(Duration::from_secs(60))
            .run()
            .assert_code(1)
            .assert_stderr_contains(needle)
            .assert_no_panic();
    };
    restore_fails(&why);
    std::fs::remove_file(&image).unwrap();
    restore_fails(&format!("the disk image {} is not reachable here", image.display()));
}
