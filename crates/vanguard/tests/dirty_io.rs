//! The test guest's `dirty` scenario with its device words (docs/test-guest.md), in a plain
//! run without snapshots: `disk` keeps disk0 busy (each step's page written to the disk, another
//! page read back into the readback region) and `net:` sends a UDP datagram every 64 steps. The
//! snapshot and migration tests use these while the VM is saved or moved; here the guest's own
//! verification and the host's view (the disk image, the datagrams) are checked as they are
//! without any of that.

mod common;

use common::net::{net_available, ping, ping_available, Tap};
use std::net::{SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PAGE: usize = 4096;

/// The `dirty` scenario's pattern: word `i` (from 1) of `page` as step `step` writes it (word
/// 0 is the step).
fn word(page: u64, step: u64, i: u64) -> u64 {
    let x = (page << 32 ^ step).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ i.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^ (x >> 31)
}

/// Whole lines printed so far.
fn lines(vm: &common::Running) -> Vec<String> {
    let out = vm.stdout_so_far();
    let out = &out[..out.rfind('\n').unwrap_or(0)];
    out.lines().map(|l| l.trim().to_string()).collect()
}

/// Waits until a whole line starts with `prefix`; fails on `dirty: FAILED` or after 60 s.
fn wait_line(vm: &mut common::Running, prefix: &str, after: usize) -> String {
    let start = Instant::now();
    loop {
        let all = lines(vm);
        assert!(
            !all.iter().any(|l| l.contains("FAILED")),
            "the guest failed:\n{}",
            vm.stdout_so_far()
        );
        if let Some(l) = all.iter().filter(|l| l.starts_with(prefix)).nth(after) {
            return l.clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no `{prefix}` line in 60 s:\n{}",
            vm.stdout_so_far()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The number after `key` in `line`.
fn number_after(line: &str, key: &str) -> u64 {
    let rest = line.split(key).nth(1).unwrap_or_else(|| panic!("no `{key}` in {line}"));
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().unwrap_or_else(|_| panic!("no number after `{key}` in {line}"))
}

/// `dirty=4M,0,disk` on a 16 MiB image: verified twice, stopped; then every page of the
/// region on the disk holds the pattern of the last step that wrote it, and the rest of the
/// image is untouched.
#[test]
fn dirty_disk_writes_every_page_to_the_disk_and_reads_back() {
    if !common::kvm_available() {
        return;
    }
    const PAGES: u64 = 1024;
    let dir = common::TempDir::new("dirty-disk");
    let original = common::image(16 << 20, 0x6469_7274);
    let disk = dir.file("disk.img", &original);
    let disk_arg = format!("path={}", disk.display());
    let mut vm = common::guest("console=ttyS0 dirty=4M,0,disk", &["--disk", &disk_arg])
        .timeout(Duration::from_secs(120))
        .spawn_interactive();
    wait_line(&mut vm, "dirty: writing 1024 pages (4 MiB) at 0x", 0);
    wait_line(&mut vm, "dirty: disk0 virtio-blk at 0x", 0);
    wait_line(&mut vm, "dirty: step ", 0);
    for n in 0..2 {
        vm.write_stdin(b"v");
        let line = wait_line(&mut vm, "dirty: verified", n);
        assert!(
            line.starts_with("dirty: verified 1024 pages, disk 1024 pages, readback "),
            "{line}"
        );
        assert!(line.ends_with(": ok"), "{line}");
        let step = number_after(&line, "at step ");
        let readback = number_after(&line, "readback ");
        // Steps N/2+1 .. 3N/2 read back every page once.
        assert!(step >= PAGES + PAGES / 2, "{line}");
        assert_eq!(readback, PAGES, "{line}");
    }
    vm.write_stdin(b"q");
    let stopped = wait_line(&mut vm, "dirty: stopped at step ", 0);
    let last = number_after(&stopped, "at step ");
    vm.finish().assert_clean_exit();

    let image = std::fs::read(&disk).unwrap();
    let mut pages = image.chunks_exact(PAGE);
    for page in 0..PAGES {
        let step = last - (last - 1 - page) % PAGES;
        let data = pages.next().expect("the image holds the region");
        for (i, bytes) in (0..).zip(data.chunks_exact(8)) {
            let got = u64::from_le_bytes(bytes.try_into().unwrap());
            let want = if i == 0 { step } else { word(page, step, i) };
            assert_eq!(got, want, "disk page {page} word {i} (step {step}, last step {last})");
        }
    }
    let end = 4 << 20;
    assert!(image[end..] == original[end..], "bytes past the region changed");
}

/// `dirty=...,disk` without a disk, or with one smaller than the region, fails at start.
#[test]
fn dirty_disk_refuses_a_missing_or_small_disk() {
    if !common::kvm_available() {
        return;
    }
    let out = common::guest("console=ttyS0 dirty=4M,0,disk", &[]).run();
    out.assert_stdout_contains("dirty: FAILED: disk: no disk0");
    out.assert_stdout_contains("vanguard-guest: 1 scenario(s) FAILED");
    let dir = common::TempDir::new("dirty-small");
    let disk = dir.file("small.img", &vec![0u8; 1 << 20]);
    let disk_arg = format!("path={}", disk.display());
    let out = common::guest("console=ttyS0 dirty=4M,0,disk", &["--disk", &disk_arg]).run();
    out.assert_line(
        "dirty: FAILED: disk: disk0 has 2048 sectors (1024 KiB), smaller than the region (4096 KiB)",
    );
}

/// `dirty=4M,40,disk,net:<guest>:<host>` on a TAP and a disk: the host receives `dirty step
/// <n>` datagrams every 64 steps without a gap and pings the guest, the guest counts what it
/// sent and verifies memory, disk and readback, with both devices busy together.
#[test]
fn dirty_net_sends_a_datagram_every_64_steps_while_the_disk_works() {
    if !net_available() {
        return;
    }
    let tap = Tap::create();
    let (host, guest_ip) = (tap.host_ip(), tap.guest_ip());
    let socket = UdpSocket::bind(SocketAddrV4::new(host, 5556)).unwrap();
    let dir = common::TempDir::new("dirty-net");
    let disk = dir.file("disk.img", &vec![0u8; 4 << 20]);
    let disk_arg = format!("path={}", disk.display());
    let net_arg = format!("tap={}", tap.name);
    let cmdline = format!("console=ttyS0 dirty=4M,40,disk,net:{guest_ip}:{host}");
    let mut vm = common::guest(&cmdline, &["--disk", &disk_arg, "--net", &net_arg])
        .timeout(Duration::from_secs(120))
        .spawn_interactive();
    // Received on a thread of its own, so that the socket's buffer never overflows while the
    // test pings or waits.
    let done = Arc::new(AtomicBool::new(false));
    let received = Arc::new(Mutex::new(Vec::new()));
    let receiver = {
        let (done, received) = (done.clone(), received.clone());
        socket.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    if done.load(Ordering::Relaxed) {
                        return;
                    }
                    continue;
                };
                assert_eq!(from, SocketAddrV4::new(guest_ip, 5556).into());
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let step = text
                    .strip_prefix("dirty step ")
                    .and_then(|t| t.strip_suffix('\n'))
                    .and_then(|t| t.parse::<u64>().ok())
                    .unwrap_or_else(|| panic!("not a dirty datagram: {text:?}"));
                received.lock().unwrap().push(step);
            }
        })
    };
    let start = Instant::now();
    while received.lock().unwrap().len() < 20 {
        assert!(start.elapsed() < Duration::from_secs(30), "fewer than 20 datagrams in 30 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    if ping_available() {
        ping(guest_ip, 3);
    }
    vm.write_stdin(b"v");
    let sent = number_after(&wait_line(&mut vm, "dirty: net sent ", 0), "net sent ");
    let verified = wait_line(&mut vm, "dirty: verified", 0);
    assert!(
        verified.starts_with("dirty: verified 1024 pages, disk 1024 pages, readback 1024 pages"),
        "{verified}"
    );
    assert!(verified.ends_with(": ok"), "{verified}");
    vm.write_stdin(b"q");
    wait_line(&mut vm, "dirty: stopped at step ", 0);
    let out = vm.finish();
    out.assert_clean_exit();
    done.store(true, Ordering::Relaxed);
    receiver.join().expect("the receiving thread");
    let received = received.lock().unwrap().clone();
    assert!(
        received.len() as u64 >= sent,
        "{} received, {sent} sent: {received:?}\n{}",
        received.len(),
        out.report()
    );
    for pair in received.windows(2) {
        assert_eq!(pair[1], pair[0] + 64, "a gap or a reordering in {received:?}");
    }
    assert!(received.iter().all(|s| s % 64 == 0), "{received:?}");
    out.assert_stdout_contains(&format!("net: arp: {host} is at {}", tap.mac()));
    if ping_available() {
        out.assert_stdout_contains(&format!("net: icmp echo reply to {host} seq 3"));
    }
}
