//! virtio devices through the test guest's polling virtio-mmio driver (docs/test-guest.md).

mod common;

use common::guest;

/// `--rng` attaches virtio-rng at the first virtio-mmio window; the guest finds it from the
/// command line, negotiates, and reads two different 64-byte draws.
#[test]
fn rng_over_virtio_mmio() {
    if !common::kvm_available() {
        return;
    }
    for cpus in ["1", "2"] {
        let out = guest("console=ttyS0 hello rng", &["--rng", "--cpus", cpus]).run();
        out.assert_clean_exit();
        out.assert_line("cmdline: console=ttyS0 hello rng virtio_mmio.device=4K@0xd0000000:16");
        out.assert_line("rng: read 64 + 64 bytes from virtio-rng at 0xd0000000: ok");
        out.assert_line("vanguard-guest: done, powering off");
    }
}

/// Without `--rng` there is no device: the scenario fails and so does the VM.
#[test]
fn rng_scenario_without_a_device_fails() {
    if !common::kvm_available() {
        return;
    }
    let out = guest("console=ttyS0 rng", &[]).run();
    assert_eq!(out.code(), Some(1), "{}", out.report());
    out.assert_line("rng: FAILED: no such virtio-mmio device on the command line");
    out.assert_line("vanguard-guest: 1 scenario(s) FAILED");
}

/// Two draws through two VMs differ too (the bytes come from the host, not a fixed seed).
#[test]
fn rng_bytes_differ_between_vms() {
    if !common::kvm_available() {
        return;
    }
    let first_line =
        |out: &common::Outcome| out.line_starting("rng: first bytes from ").to_string();
    let a = guest("console=ttyS0 rng", &["--rng"]).run();
    let b = guest("console=ttyS0 rng", &["--rng"]).run();
    a.assert_clean_exit();
    b.assert_clean_exit();
    assert_ne!(first_line(&a), first_line(&b));
}
