//! The virtio-pci transport (the default) through the test guest's PCI driver: the guest
//! scans bus 0 through ports 0xCF8/0xCFC, walks each function's capabilities and drives the
//! device through its BAR (docs/test-guest.md). The virtio-mmio transport stays available
//! with `--virtio-transport mmio`.

mod common;

use common::{guest, host_md5, image};

/// Two disks and an entropy device become functions 00:01.0, 00:02.0 and 00:03.0 in flag
/// order, with BAR 0 where the VMM placed it and one MSI-X vector per queue plus one; no
/// virtio-mmio word is added to the command line. Both disks read whole match md5sum, the
/// entropy device answers, on 1 and 2 vCPUs.
#[test]
fn pci_functions_in_flag_order_serve_disks_and_entropy() {
    if !common::kvm_available() {
        return;
    }
    let dir = common::TempDir::new("virtio-pci");
    let d0 = dir.file("d0.img", &image(2 << 20, 11));
    let d1 = dir.file("d1.img", &image((1 << 20) + 512 * 3, 12));
    let (m0, m1) = (host_md5(&d0), host_md5(&d1));
    for cpus in ["1", "2"] {
        let disk0 = format!("path={}", d0.display());
        let disk1 = format!("path={},readonly=on", d1.display());
        let out = guest(
            "console=ttyS0 hello virtio disk rng",
            &["--cpus", cpus, "--disk", &disk0, "--disk", &disk1, "--rng"],
        )
        .run();
        out.assert_clean_exit();
        out.assert_line("cmdline: console=ttyS0 hello virtio disk rng");
        out.assert_lines_in_order(&[
            "virtio: pci 00:01.0 type 2",
            "virtio: pci 00:01.0 bar0 0xc0000000 msix 2",
            "virtio: pci 00:02.0 type 2",
            "virtio: pci 00:02.0 bar0 0xc0008000 msix 2",
            "virtio: pci 00:03.0 type 4",
            "virtio: pci 00:03.0 bar0 0xc0010000 msix 2",
        ]);
        out.assert_line(&format!("disk0 md5 {m0}"));
        out.assert_line(&format!("disk1 md5 {m1}"));
        out.assert_stdout_contains("bytes from virtio-rng at");
        out.assert_line("vanguard-guest: done, powering off");
    }
}

/// MSI-X end to end: the guest programs a table entry (APIC 0, vector 0x41), points queue 0
/// at it, and a completed request leaves vector 0x41 pending in its local APIC (KVM delivered
/// the message through the GSI route the VMM set); masked, the next completion waits in the
/// pending-bit array instead.
#[test]
fn msix_messages_reach_the_local_apic() {
    if !common::kvm_available() {
        return;
    }
    let dir = common::TempDir::new("virtio-msix");
    let d0 = dir.file("d0.img", &image(1 << 20, 13));
    let out = guest("console=ttyS0 msix", &["--disk", &format!("path={}", d0.display())]).run();
    out.assert_clean_exit();
    out.assert_line("msix: vector 0x41 pending after queue interrupt: ok");
    out.assert_line("msix: masked vector pending in PBA: ok");
}

/// The same disk and entropy device over virtio-mmio when asked for.
#[test]
fn mmio_transport_on_request() {
    if !common::kvm_available() {
        return;
    }
    let dir = common::TempDir::new("virtio-mmio-opt");
    let d0 = dir.file("d0.img", &image(1 << 20, 14));
    let m0 = host_md5(&d0);
    let disk0 = format!("path={}", d0.display());
    let out = guest(
        "console=ttyS0 hello virtio disk",
        &["--virtio-transport", "mmio", "--disk", &disk0, "--rng"],
    )
    .run();
    out.assert_clean_exit();
    out.assert_line(
        "cmdline: console=ttyS0 hello virtio disk virtio_mmio.device=4K@0xd0000000:16 \
         virtio_mmio.device=4K@0xd0001000:17",
    );
    out.assert_line(&format!("disk0 md5 {m0}"));
    assert!(!out.stdout.contains("virtio: pci"), "{}", out.report());
}

/// A wrong transport name, and more devices than a transport has room for, are refused with
/// a line naming the problem.
#[test]
fn transport_limits_and_bad_names_are_refused() {
    if !common::kvm_available() {
        return;
    }
    let out = common::run_args(["--virtio-transport", "usb"]).run();
    assert_eq!(out.code(), Some(2), "{}", out.report());
    out.assert_stderr_contains("invalid value 'usb' for '--virtio-transport");
    let dir = common::TempDir::new("virtio-limits");
    let img = dir.file("d.img", &[0u8; 4096]);
    let disk = format!("path={},readonly=on", img.display());
    let many = |n: usize, transport: &str| {
        let mut args = vec!["--virtio-transport".to_string(), transport.to_string()];
        for _ in 0..n {
            args.push("--disk".into());
            args.push(disk.clone());
        }
        common::run_args(args).run()
    };
    let out = many(9, "mmio");
    assert_eq!(out.code(), Some(1), "{}", out.report());
    out.assert_stderr_contains("too many virtio devices: 9 asked for, at most 8");
    let out = many(32, "pci");
    assert_eq!(out.code(), Some(1), "{}", out.report());
    out.assert_stderr_contains("too many virtio devices: 32 asked for, at most 31");
}
