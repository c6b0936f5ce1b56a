//! The serial console on a terminal: `vanguard run` with a pseudo-terminal as stdin puts it in
//! raw mode (keys, Ctrl-C included, reach the guest), stops the VM on Ctrl-A x, and restores
//! the terminal afterwards.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn open_pty() -> (File, OwnedFd) {
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two descriptors into the integers passed; the name, termios and
    // window-size arguments may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty failed: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just created by openpty and are owned by nothing else.
    unsafe { (File::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
}

fn canonical(fd: &OwnedFd) -> bool {
    // SAFETY: termios is plain data that tcgetattr fills; fd is an open terminal.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
    t.c_lflag & libc::ICANON != 0
}

/// Reads from the terminal until `needle` appears or `timeout` passes.
fn read_until(master: &mut File, seen: &mut String, needle: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !seen.contains(needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "timed out waiting for {needle:?}; terminal showed:\n{seen}");
        let mut pfd = libc::pollfd { fd: master.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(1000) as i32) };
        if ready > 0 {
            let mut buf = [0u8; 4096];
            match master.read(&mut buf) {
                Ok(n) if n > 0 => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
}

#[test]
fn terminal_console_is_raw_and_ctrl_a_x_quits() {
    if !common::kvm_available() {
        return;
    }
    let (mut master, slave) = open_pty();
    assert!(canonical(&slave), "a new pty starts in canonical mode");
    let mut child = Command::new(common::BIN)
        .args(["run", "--cmdline", "console=ttyS0 echo"])
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave.try_clone().unwrap()))
        .spawn()
        .expect("start vanguard");
    let mut seen = String::new();
    read_until(&mut master, &mut seen, "echo: ready", Duration::from_secs(30));
    assert!(!canonical(&slave), "the console must be raw while the VM runs");
    // Ctrl-C (0x03) is a byte for the guest, not a signal for the VMM; CR ends the line as a
    // terminal's Enter key does.
    master.write_all(b"hi\x03there\r").unwrap();
    read_until(&mut master, &mut seen, "echo: hi\u{3}there", Duration::from_secs(30));
    master.write_all(b"\x01x").unwrap();
    read_until(&mut master, &mut seen, "VM stopped from the console", Duration::from_secs(30));
    let status = child.wait().expect("wait for vanguard");
    assert!(status.success(), "exit status {status}; terminal showed:\n{seen}");
    assert!(canonical(&slave), "the terminal's settings must be restored");
}
