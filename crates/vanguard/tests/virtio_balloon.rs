//! virtio-balloon through the test guest's `balloon` scenario: memory the guest gives back
//! is really returned to the host (the VMM's RSS drops by about as much) and the guest then
//! reads those pages as zeros.

mod common;

/// The VMM process's resident set, in KiB, from /proc.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// A 64 MiB balloon on both transports: after the guest fills 64 MiB and inflates the
/// balloon over it, the VMM's RSS is at least 56 MiB smaller, and the pages read as zero;
/// deflated, they hold data again.
#[test]
fn inflating_returns_memory_to_the_host() {
    if !common::kvm_available() {
        return;
    }
    for transport in ["pci", "mmio"] {
        let mut vm = common::guest(
            "console=ttyS0 balloon",
            &["--balloon", "size=64M", "--memory", "256M", "--virtio-transport", transport],
        )
        .spawn_interactive();
        vm.wait_for_stdout("balloon: filled 16384 pages at ");
        let before = rss_kib(vm.pid());
        vm.write_stdin(b"x");
        vm.wait_for_stdout("balloon: inflated 16384 pages; they read back as zero: ok");
        let after = rss_kib(vm.pid());
        vm.write_stdin(b"x");
        let out = vm.finish();
        out.assert_clean_exit();
        out.assert_line("balloon: deflated 16384 pages; they hold data again: ok");
        assert!(
            before >= after + 56 * 1024,
            "{transport}: RSS {before} KiB before inflating, {after} KiB after: expected a drop of at least 56 MiB"
        );
    }
}

/// Without a target the scenario refuses to run, and bad flags are refused by the CLI.
#[test]
fn balloon_needs_a_target_and_valid_options() {
    if !common::kvm_available() {
        return;
    }
    let out = common::guest("console=ttyS0 balloon", &["--balloon"]).run();
    assert_eq!(out.code(), Some(1), "{}", out.report());
    out.assert_line("balloon: FAILED: the host asked for no pages (use --balloon size=SIZE)");
    for (flag, message) in [
        ("size=lots", "balloon invalid size 'lots'"),
        ("colour=red", "invalid balloon option 'colour=red'"),
        ("deflate_on_oom=maybe", "invalid deflate_on_oom 'maybe'"),
    ] {
        let out = common::run_args(["--balloon", flag]).run();
        assert_eq!(out.code(), Some(2), "{flag}: {}", out.report());
        out.assert_stderr_contains(message);
    }
}
