//! Bad inputs to `vanguard run`: each must end the process with a non-zero status and one line
//! on stderr that names the problem, never with a panic or a signal.

mod common;

use common::{guest, run_args, Outcome, TempDir, Vanguard};
use std::path::{Path, PathBuf};

/// Runs `vm`, which must fail: exit status 1, nothing on stdout (no guest ran), exactly one line
/// on stderr, starting `vanguard: error: ` and containing every one of `needles`.
#[track_caller]
fn assert_error(vm: Vanguard, needles: &[&str]) -> Outcome {
    let out = vm.run();
    out.assert_no_panic();
    out.assert_code(1);
    let lines = out.stderr_lines();
    assert_eq!(lines.len(), 1, "expected exactly one line on stderr\n{}", out.report());
    assert!(
        lines[0].starts_with("vanguard: error: "),
        "the line starts with `vanguard: error: `\n{}",
        out.report()
    );
    for needle in needles {
        out.assert_stderr_contains(needle);
    }
    assert!(out.stdout.is_empty(), "no guest output expected\n{}", out.report());
    out
}

/// A usage error caught by the argument parser: exit status 2, one `error:` line naming the
/// option and the value (clap adds a blank line and a hint to try --help).
#[track_caller]
fn assert_usage_error(args: &[&str], needles: &[&str]) {
    let out = run_args(args).run();
    out.assert_no_panic();
    out.assert_code(2);
    let errors: Vec<&str> =
        out.stderr_lines().into_iter().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "expected one error line\n{}", out.report());
    assert!(errors[0].starts_with("error: invalid value"), "\n{}", out.report());
    for needle in needles {
        out.assert_stderr_contains(needle);
    }
    assert!(out.stdout.is_empty(), "\n{}", out.report());
}

/// The message does not say the same thing twice (an error's cause printed again as part of
/// the chain of causes): no two consecutive `: `-separated clauses appear twice.
#[track_caller]
fn assert_not_repetitive(out: &Outcome) {
    let line = out.stderr_lines()[0];
    let clauses: Vec<&str> = line.split(": ").collect();
    let pairs: Vec<(&str, &str)> = clauses.windows(2).map(|w| (w[0], w[1])).collect();
    for (i, pair) in pairs.iter().enumerate() {
        assert!(
            !pairs[i + 1..].contains(pair),
            "the message repeats \"{}: {}\"\n{}",
            pair.0,
            pair.1,
            out.report()
        );
    }
}

fn kernel(path: &Path) -> Vanguard {
    run_args(["--kernel".as_ref(), path.as_os_str()])
}

// ------------------------------------------------------------------ /dev/kvm --

#[test]
fn kvm_device_that_is_not_kvm() {
    assert_error(
        run_args::<_, &str>([]).env("VANGUARD_KVM_DEVICE", "/dev/null"),
        &["/dev/null is not a KVM device"],
    );
}

#[test]
fn missing_kvm_device() {
    assert_error(
        run_args::<_, &str>([]).env("VANGUARD_KVM_DEVICE", "/nonexistent/vanguard-test/kvm"),
        &["cannot open /nonexistent/vanguard-test/kvm", "does not exist", "kvm module"],
    );
}

/// A device node this user may not open. Root ignores file modes, so as root the VMM runs as
/// `nobody` against a mode-000 file.
#[test]
fn kvm_device_permission_denied() {
    let dir = TempDir::new("kvm-perm");
    let node = dir.file("kvm", b"");
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .unwrap();
    std::fs::set_permissions(&node, std::os::unix::fs::PermissionsExt::from_mode(0o000)).unwrap();
    let mut vm = run_args::<_, &str>([]).env("VANGUARD_KVM_DEVICE", &node);
    if common::is_root() {
        // The binary and its directories must be reachable by nobody; check before relying on it.
        let reachable = std::process::Command::new(common::BIN)
            .arg("--version")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .uid_nobody()
            .status()
            .is_ok_and(|s| s.success());
        if !reachable {
            println!(
                "skipping: running as root, and user nobody (65534) cannot run {} to get EACCES",
                common::BIN
            );
            return;
        }
        vm = vm.uid(NOBODY);
    }
    assert_error(vm, &["cannot open ", "/kvm: permission denied", "'kvm' group"]);
}

const NOBODY: u32 = 65534;

trait UidNobody {
    fn uid_nobody(&mut self) -> &mut Self;
}

impl UidNobody for std::process::Command {
    fn uid_nobody(&mut self) -> &mut Self {
        use std::os::unix::process::CommandExt;
        self.uid(NOBODY).gid(NOBODY)
    }
}

// -------------------------------------------------------------------- kernel --

#[test]
fn kernel_does_not_exist() {
    if !common::kvm_available() {
        return;
    }
    assert_error(
        kernel(Path::new("/nonexistent/vmlinux")),
        &["cannot read kernel /nonexistent/vmlinux", "No such file or directory"],
    );
}

#[test]
fn kernel_is_a_directory() {
    if !common::kvm_available() {
        return;
    }
    let dir = TempDir::new("kernel-dir");
    let shown = dir.path().display().to_string();
    assert_error(kernel(dir.path()), &[&format!("cannot read kernel {shown}"), "is a directory"]);
}

#[test]
fn kernel_is_random_bytes() {
    if !common::kvm_available() {
        return;
    }
    let dir = TempDir::new("kernel-random");
    // Deterministic noise (xorshift), well past the bzImage header.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let data: Vec<u8> = (0..65536)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect();
    let path = dir.file("random.bin", &data);
    assert_error(kernel(&path), &["cannot load kernel", "random.bin", "not an ELF or bzImage"]);
}

#[test]
fn kernel_is_empty() {
    if !common::kvm_available() {
        return;
    }
    let dir = TempDir::new("kernel-empty");
    let path = dir.file("empty", b"");
    assert_error(kernel(&path), &["cannot load kernel", "not an ELF or bzImage", "0 bytes"]);
}

/// An ELF64 x86-64 executable header whose one PT_LOAD segment (64 KiB at file offset 0x1000,
/// loaded at 16 MiB) lies past the end of the file.
fn truncated_elf() -> Vec<u8> {
    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\x00");
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
    elf.extend_from_slice(&1u32.to_le_bytes()); // EV_CURRENT
    elf.extend_from_slice(&0x100_0000u64.to_le_bytes()); // e_entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for half in [64u16, 56, 1, 64, 0, 0] {
        // e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
        elf.extend_from_slice(&half.to_le_bytes());
    }
    assert_eq!(elf.len(), 64);
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
    for word in [0x1000u64, 0x100_0000, 0x100_0000, 0x1_0000, 0x1_0000, 0x1000] {
        // p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
        elf.extend_from_slice(&word.to_le_bytes());
    }
    elf
}

/// The segment data is missing: the message must say the file is bad, not blame memory size.
#[test]
fn kernel_is_a_truncated_elf() {
    if !common::kvm_available() {
        return;
    }
    let dir = TempDir::new("kernel-truncated");
    let path = dir.file("truncated.elf", &truncated_elf());
    let out = assert_error(kernel(&path), &["cannot load kernel", "truncated.elf"]);
    assert!(
        !out.stderr.contains("guest memory"),
        "a truncated file is not a memory shortage (128 MiB is plenty for a 64 KiB segment)\n{}",
        out.report()
    );
    assert_not_repetitive(&out);
}

/// The first 200 bytes of a real ELF program: a header whose segments are missing.
#[test]
fn kernel_is_the_start_of_a_program() {
    if !common::kvm_available() {
        return;
    }
    let Ok(program) = std::fs::read("/bin/true") else {
        println!("skipping: no /bin/true to take an ELF header from");
        return;
    };
    let dir = TempDir::new("kernel-head");
    let path = dir.file("head.elf", &program[..200.min(program.len())]);
    let out = assert_error(kernel(&path), &["cannot load kernel", "head.elf"]);
    assert_not_repetitive(&out);
}

/// A setup header with the bzImage magic but nothing valid after it.
#[test]
fn kernel_is_a_broken_bzimage() {
    if !common::kvm_available() {
        return;
    }
    let mut data = vec![0u8; 4096];
    data[0x1f1] = 4; // setup_sects
    data[0x202..0x206].copy_from_slice(b"HdrS");
    let dir = TempDir::new("kernel-bz");
    let path = dir.file("broken.bzimage", &data);
    let out = assert_error(kernel(&path), &["cannot load kernel", "broken.bzimage"]);
    assert_not_repetitive(&out);
}

fn linux_vmlinux() -> Option<PathBuf> {
    let path = common::repo_root().join("build/linux-guest/vmlinux");
    path.is_file().then_some(path)
}

/// The Debian vmlinux (about 52 MiB loaded) cannot fit in 16 MiB.
#[test]
fn kernel_larger_than_memory() {
    if !common::kvm_available() {
        return;
    }
    let Some(vmlinux) = linux_vmlinux() else {
        println!("skipping: build/linux-guest/vmlinux not built (scripts/build-linux-guest.sh)");
        return;
    };
    let vm =
        run_args(["--kernel".as_ref(), vmlinux.as_os_str(), "--memory".as_ref(), "16M".as_ref()]);
    let out = assert_error(vm, &["cannot load kernel", "vmlinux", "16 MiB"]);
    assert!(out.stderr.contains("needs"), "the message says how much is needed\n{}", out.report());
}

// -------------------------------------------------------------------- memory --

#[test]
fn memory_too_small() {
    if !common::kvm_available() {
        return;
    }
    for size in ["8M", "1M", "0"] {
        assert_error(run_args(["--memory", size]), &["too small", "16 MiB"]);
    }
}

#[test]
fn memory_size_unparseable() {
    assert_usage_error(&["--memory", "12X"], &["--memory", "12X", "unknown unit"]);
    assert_usage_error(&["--memory", "lots"], &["--memory", "lots"]);
}

/// Huge pages that were never reserved: a clear error, not SIGBUS on the first touch.
#[test]
fn hugepages_not_reserved() {
    if !common::kvm_available() {
        return;
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| -> Option<u64> {
        meminfo.lines().find_map(|l| l.strip_prefix(name)?.split_whitespace().next()?.parse().ok())
    };
    let (Some(free), Some(size_kb)) = (field("HugePages_Free:"), field("Hugepagesize:")) else {
        println!("skipping: no huge page counters in /proc/meminfo");
        return;
    };
    let needed: u64 = 128 << 20;
    if free * size_kb * 1024 >= needed {
        println!("skipping: {free} huge pages are free, enough for a 128 MiB guest");
        return;
    }
    assert_error(run_args(["--hugepages"]), &["huge"]);
}

// ------------------------------------------------------------- vCPUs, serial --

#[test]
fn cpus_out_of_range() {
    assert_usage_error(&["--cpus", "0"], &["--cpus", "'0'", "1..=254"]);
    assert_usage_error(&["--cpus", "300"], &["--cpus", "'300'", "1..=254"]);
}

#[test]
fn serial_bogus() {
    assert_usage_error(&["--serial", "bogus"], &["--serial", "bogus", "stdio, file:PATH or none"]);
    assert_usage_error(&["--serial", "file:"], &["--serial", "file:"]);
}

#[test]
fn serial_file_cannot_be_created() {
    if !common::kvm_available() {
        return;
    }
    assert_error(
        run_args(["--serial", "file:/nonexistent/vanguard-test/console.log"]),
        &["cannot open serial output /nonexistent/vanguard-test/console.log", "No such file"],
    );
}

// ------------------------------------------------------------------- cmdline --

#[test]
fn cmdline_too_long() {
    if !common::kvm_available() {
        return;
    }
    let long = format!("console=ttyS0 hello {}", "x".repeat(2048 - 20));
    assert_eq!(long.len(), 2048);
    assert_error(guest(&long, &[]), &["command line", "2048 bytes", "at most 2047"]);
}

/// The longest accepted command line reaches the guest whole.
#[test]
fn cmdline_at_the_limit() {
    if !common::kvm_available() {
        return;
    }
    let cmdline = format!("console=ttyS0 hello {}", "y".repeat(2047 - 20));
    assert_eq!(cmdline.len(), 2047);
    let out = guest(&cmdline, &[]).run();
    out.assert_clean_exit();
    out.assert_line(&format!("cmdline: {cmdline}"));
}

// -------------------------------------------------------------------- initrd --

#[test]
fn initrd_does_not_exist() {
    if !common::kvm_available() {
        return;
    }
    assert_error(
        run_args(["--initrd", "/nonexistent/initrd.img"]),
        &["cannot read initrd /nonexistent/initrd.img", "No such file or directory"],
    );
}

#[test]
fn initrd_larger_than_memory() {
    if !common::kvm_available() {
        return;
    }
    let dir = TempDir::new("initrd-big");
    let path = dir.path().join("big.img");
    // Sparse: 200 MiB that take no disk space.
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(200 << 20))
        .expect("create the sparse initrd");
    let vm =
        run_args(["--initrd".as_ref(), path.as_os_str(), "--memory".as_ref(), "128M".as_ref()]);
    assert_error(vm, &["initrd", "big.img", "does not fit"]);
}
