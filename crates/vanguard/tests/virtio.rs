//! virtio devices through the test guest's polling drivers (docs/test-guest.md): over virtio-pci,
//! the default, unless a test names `--virtio-transport mmio`.

mod common;

use common::{guest, host_md5, image};

/// `--rng --virtio-transport mmio` attaches virtio-rng at the first virtio-mmio window; the guest finds it from the
/// command line, negotiates, and reads two different 64-byte draws.
#[test]
fn rng_over_virtio_mmio() {
    if !common::kvm_available() {
        return;
    }
    for cpus in ["1", "2"] {
        let out = guest(
            "console=ttyS0 hello rng",
            &["--rng", "--virtio-transport", "mmio", "--cpus", cpus],
        )
        .run();
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

/// Two disks (one read-only, sizes that are not a multiple of the guest's 64 KiB reads) read
/// whole by the guest through virtio-blk: each md5 equals the host's md5sum of the image, and
/// the images are unchanged.
#[test]
fn disks_read_whole_match_host_md5() {
    if !common::kvm_available() {
        return;
    }
    let dir = common::TempDir::new("virtio-disks");
    let d0 = dir.file("d0.img", &image(5 << 20, 1));
    let d1 = dir.file("d1.img", &image((3 << 20) + 512 * 7, 2));
    let (m0, m1) = (host_md5(&d0), host_md5(&d1));
    assert_eq!(m0.len(), 32, "md5sum output");
    for cpus in ["1", "2"] {
        let disk0 = format!("path={},serial=first", d0.display());
        let disk1 = format!("path={},readonly=on", d1.display());
        let out =
            guest("console=ttyS0 disk", &["--cpus", cpus, "--disk", &disk0, "--disk", &disk1])
                .run();
        out.assert_clean_exit();
        out.assert_line(&format!("disk0 md5 {m0}"));
        out.assert_line("disk0: 10240 sectors");
        out.assert_line(&format!("disk1 md5 {m1}"));
        out.assert_line("disk1: 6151 sectors");
    }
    assert_eq!((host_md5(&d0), host_md5(&d1)), (m0, m1));
}

/// Bad disk flags are refused with a line that names the problem.
#[test]
fn bad_disk_options_are_refused() {
    if !common::kvm_available() {
        return;
    }
    let out = common::run_args(["--disk", "path=/nonexistent/vanguard.img"]).run();
    assert_eq!(out.code(), Some(1), "{}", out.report());
    out.assert_stderr_contains(
        "cannot attach disk: cannot open disk image /nonexistent/vanguard.img",
    );
    for (flag, message) in [
        ("readonly=on", "a disk needs path=FILE"),
        ("path=/x,readonly=maybe", "invalid readonly 'maybe'"),
        ("path=/x,cache=none", "invalid disk option 'cache=none'"),
        ("path=/x,serial=123456789012345678901", "longer than 20 bytes"),
        ("path=/x,bandwidth=fast", "invalid disk rate limit: bandwidth: invalid amount 'fast'"),
        ("path=/x,ops_burst=10", "invalid disk rate limit"),
    ] {
        let out = common::run_args(["--disk", flag]).run();
        assert_eq!(out.code(), Some(2), "{flag}: {}", out.report());
        out.assert_stderr_contains(message);
    }
}

/// The guest writes its pattern over the first 300 KiB of a writable disk, flushes and
/// verifies; the host then finds exactly that pattern in the file and the rest unchanged. The
/// read-only disk refuses the writes (I/O error) and its file keeps every byte.
#[test]
fn disk_writes_land_in_the_image_and_read_only_holds() {
    if !common::kvm_available() {
        return;
    }
    let dir = common::TempDir::new("virtio-write");
    let original = image(1 << 20, 3);
    let rw = dir.file("rw.img", &original);
    let ro = dir.file("ro.img", &original);
    let out = guest(
        "console=ttyS0 diskwrite=300K",
        &[
            "--disk",
            &format!("path={}", rw.display()),
            "--disk",
            &format!("path={},readonly=on", ro.display()),
        ],
    )
    .run();
    out.assert_clean_exit();
    out.assert_line("disk0 write: wrote, flushed and verified 300 KiB: ok");
    out.assert_line("disk1 write: refused, the disk is read-only: ok");
    common::assert_diskwrite_pattern(&rw, &original, 300 << 10);
    assert!(std::fs::read(&ro).unwrap() == original, "the read-only image changed");
}

/// TSC ticks per second, measured against the monotonic clock (the guest reads the host's
/// TSC).
fn tsc_per_second() -> f64 {
    // SAFETY: rdtsc has no side effects.
    let rdtsc = || unsafe { core::arch::x86_64::_rdtsc() };
    let (c0, t0) = (rdtsc(), std::time::Instant::now());
    std::thread::sleep(std::time::Duration::from_millis(200));
    let (c1, t1) = (rdtsc(), std::time::Instant::now());
    (c1 - c0) as f64 / t1.duration_since(t0).as_secs_f64()
}

/// Seconds the guest took to read `image` whole (its own TSC measurement, so boot, power-off
/// and the rest of the host's load do not count), with the given extra disk options.
fn guest_read_seconds(image: &std::path::Path, extra: &str, tsc: f64) -> f64 {
    let out = guest("console=ttyS0 disk", &["--disk", &format!("path={}{extra}", image.display())])
        .timeout(std::time::Duration::from_secs(120))
        .run();
    out.assert_clean_exit();
    let line = out.line_starting("disk0: read in ");
    let cycles: f64 = line
        .strip_prefix("disk0: read in ")
        .and_then(|l| l.strip_suffix(" cycles"))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad timing line {line:?}\n{}", out.report()));
    cycles / tsc
}

/// Rate limits hold the measured throughput within 10% of their setting. The guest reads a
/// 6 MiB disk in 64 KiB requests and times the read itself; the bucket's initial budget,
/// which the guest gets at once, is subtracted.
#[test]
fn disk_rate_limits_hold_within_ten_percent() {
    if !common::kvm_available() {
        return;
    }
    let dir = common::TempDir::new("virtio-limit");
    const SIZE: usize = 6 << 20;
    let size = SIZE as u64;
    let disk = dir.file("limited.img", &image(SIZE, 4));
    let tsc = tsc_per_second();

    // 2 MiB/s as 200 KiB per 100 ms: the bucket holds 200 KiB to start with.
    let seconds = guest_read_seconds(&disk, ",bandwidth=200K/100ms", tsc);
    let rate = (size - (200 << 10)) as f64 / seconds;
    let target = (2u64 << 20) as f64;
    assert!(
        (rate / target - 1.0).abs() < 0.10,
        "bandwidth {rate:.0} B/s against {target} B/s (read took {seconds:.2} s)"
    );

    // 200 operations/s as 20 per 100 ms: 96 requests of 64 KiB, 20 of them from the bucket.
    let seconds = guest_read_seconds(&disk, ",ops=20/100ms", tsc);
    let rate = (96.0 - 20.0) / seconds;
    assert!(
        (rate / 200.0 - 1.0).abs() < 0.10,
        "{rate:.1} operations/s against 200 (read took {seconds:.2} s)"
    );
}

/// A scratch directory in /var/tmp, removed when dropped: images opened with `direct=on` need a
/// file system with O_DIRECT, and the default temp dir may be tmpfs.
struct VarTmpDir(std::path::PathBuf);

impl VarTmpDir {
    fn new(tag: &str) -> VarTmpDir {
        let path = std::path::Path::new("/var/tmp")
            .join(format!("vanguard-test-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        VarTmpDir(path)
    }

    fn file(&self, name: &str, data: &[u8]) -> std::path::PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }
}

impl Drop for VarTmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `direct=on` (O_DIRECT, no host page cache) serves the guest the same bytes: two disks read
/// whole (one read-only, one whose size is not a multiple of the guest's 64 KiB reads) give the
/// md5 of `md5sum`, and the guest's written pattern lands in the file with the rest unchanged.
#[test]
fn direct_io_disks_read_and_write_like_buffered_ones() {
    if !common::kvm_available() {
        return;
    }
    let dir = VarTmpDir::new("virtio-direct");
    let d0 = dir.file("d0.img", &image(5 << 20, 5));
    let d1 = dir.file("d1.img", &image((3 << 20) + 512 * 7, 6));
    let (m0, m1) = (host_md5(&d0), host_md5(&d1));
    assert_eq!(m0.len(), 32, "md5sum output");
    let disk0 = format!("path={},direct=on", d0.display());
    let disk1 = format!("path={},readonly=on,direct=on", d1.display());
    let out = guest(
        "console=ttyS0 disk",
        &["--virtio-transport", "mmio", "--disk", &disk0, "--disk", &disk1],
    )
    .run();
    out.assert_clean_exit();
    out.assert_line(&format!("disk0 md5 {m0}"));
    out.assert_line("disk0: 10240 sectors");
    out.assert_line(&format!("disk1 md5 {m1}"));
    out.assert_line("disk1: 6151 sectors");
    assert_eq!((host_md5(&d0), host_md5(&d1)), (m0, m1));

    let original = image(1 << 20, 7);
    let rw = dir.file("rw.img", &original);
    let ro = dir.file("ro.img", &original);
    let out = guest(
        "console=ttyS0 diskwrite=300K",
        &[
            "--virtio-transport",
            "mmio",
            "--disk",
            &format!("path={},direct=on", rw.display()),
            "--disk",
            &format!("path={},readonly=on,direct=on", ro.display()),
        ],
    )
    .run();
    out.assert_clean_exit();
    out.assert_line("disk0 write: wrote, flushed and verified 300 KiB: ok");
    out.assert_line("disk1 write: refused, the disk is read-only: ok");
    common::assert_diskwrite_pattern(&rw, &original, 300 << 10);
    assert!(std::fs::read(&ro).unwrap() == original, "the read-only image changed");
}

/// `direct=on` where it cannot work fails before the guest starts, with one line naming the
/// disk and the reason: a file system that refuses O_DIRECT (procfs; tmpfs before Linux 6.6),
/// an image that is not whole sectors, a bad value.
#[test]
fn direct_io_refusals_are_clear() {
    if !common::kvm_available() {
        return;
    }
    let out = common::run_args(["--disk", "path=/proc/version,readonly=on,direct=on"]).run();
    assert_eq!(out.code(), Some(1), "{}", out.report());
    out.assert_stderr_contains(
        "cannot attach disk: disk /proc/version: the file system does not support direct I/O \
         (direct=on)",
    );

    // tmpfs: refused the same way where the kernel refuses O_DIRECT there; since Linux 6.6 it
    // takes it, and the disk then reads right.
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        let path = shm.join(format!("vanguard-test-{}-direct.img", std::process::id()));
        std::fs::write(&path, image(1 << 20, 8)).unwrap();
        let md5 = host_md5(&path);
        let disk = format!("path={},direct=on", path.display());
        let out =
            guest("console=ttyS0 disk", &["--virtio-transport", "mmio", "--disk", &disk]).run();
        let _ = std::fs::remove_file(&path);
        if out.code() == Some(0) {
            out.assert_line(&format!("disk0 md5 {md5}"));
        } else {
            assert_eq!(out.code(), Some(1), "{}", out.report());
            out.assert_stderr_contains(&format!(
                "cannot attach disk: disk {}: the file system does not support direct I/O \
                 (direct=on)",
                path.display()
            ));
        }
    }

    let dir = VarTmpDir::new("virtio-direct-odd");
    let odd = dir.file("odd.img", &image(1000, 9));
    let out = common::run_args(["--disk", &format!("path={},direct=on", odd.display())]).run();
    assert_eq!(out.code(), Some(1), "{}", out.report());
    out.assert_stderr_contains(&format!(
        "disk {}: size 1000 bytes is not a multiple of 512, which direct I/O (direct=on) needs",
        odd.display()
    ));

    let out = common::run_args(["--disk", "path=/x,direct=maybe"]).run();
    assert_eq!(out.code(), Some(2), "{}", out.report());
    out.assert_stderr_contains("invalid direct 'maybe': use on or off");
}
