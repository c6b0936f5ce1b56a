//! virtio-vsock with its host side on Unix sockets (Firecracker's convention), against the
//! test guest's `vsock` scenario (docs/test-guest.md), over virtio-pci and virtio-mmio: the
//! guest connects to the host (`DIR/v.sock_5000`, which the test listens on) and says hello;
//! the test connects to the guest through `DIR/v.sock` with `CONNECT 1234`, and the guest
//! echoes a line uppercased. A CONNECT to a port nobody listens on is closed; bad `--vsock`
//! flags and a socket in use are clear errors.

mod common;

use common::guest;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

/// Connects to the VMM's socket once it exists.
fn connect(path: &Path) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match UnixStream::connect(path) {
            Ok(stream) => {
                stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                return stream;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "cannot connect to {}: {e}", path.display());
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn read_line(reader: &mut BufReader<UnixStream>) -> String {
    let mut line = String::new();
    reader.read_line(&mut line).expect("a line");
    line
}

fn round_trip(transport: &str) {
    if !common::kvm_available() {
        return;
    }
    let dir = common::TempDir::new("vsock");
    let socket = dir.path().join("v.sock");
    // Guest to host: the test listens first, answers the guest's hello.
    let listener = UnixListener::bind(dir.path().join("v.sock_5000")).unwrap();
    let host_side = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let hello = read_line(&mut reader);
        (&stream).write_all(b"hi guest, this is the host\n").unwrap();
        hello
    });
    let vsock = format!("cid=3,socket={}", socket.display());
    let vm = guest(
        "console=ttyS0 vsock=1234,5000",
        &["--virtio-transport", transport, "--vsock", &vsock],
    )
    .spawn_interactive();

    // A port nobody listens on in the guest: the connection is closed, no OK.
    let mut refused = connect(&socket);
    refused.write_all(b"CONNECT 4321\n").unwrap();
    let mut rest = Vec::new();
    refused.read_to_end(&mut rest).expect("EOF, not a timeout");
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));

    // Host to guest.
    let stream = connect(&socket);
    (&stream).write_all(b"CONNECT 1234\n").unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let ok = read_line(&mut reader);
    let port: u32 = ok
        .strip_prefix("OK ")
        .and_then(|p| p.strip_suffix('\n'))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("expected OK <port>, got {ok:?}"));
    (&stream).write_all(b"echo me, guest\n").unwrap();
    assert_eq!(read_line(&mut reader), "ECHO ME, GUEST\n");
    // The guest shut its side down after the echo.
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "");

    let hello = host_side.join().unwrap();
    assert_eq!(hello, "hello from guest cid 3\n");
    let out = vm.finish();
    out.assert_clean_exit();
    let base = if transport == "mmio" { "0xd0000000" } else { "0x" };
    let up = out.line_starting("vsock: up, cid 3, virtio-vsock at ");
    assert!(up.contains(base), "{}", out.report());
    out.assert_lines_in_order(&[
        &format!("vsock: accepted 1234 from host port {port}"),
        "vsock: echoed 15 bytes",
        "vsock: done",
    ]);
    out.assert_lines_in_order(&[
        "vsock: connected to host port 5000",
        "vsock: host said hi guest, this is the host",
        "vsock: done",
    ]);
    assert!(!socket.exists(), "the VMM left its socket behind");
}

#[test]
fn both_directions_over_virtio_pci() {
    round_trip("pci");
}

#[test]
fn both_directions_over_virtio_mmio() {
    round_trip("mmio");
}

/// Bad `--vsock` flags are refused before anything starts (exit status 2).
#[test]
fn bad_vsock_options_are_refused() {
    for (flag, message) in [
        ("socket=/tmp/x.sock", "a vsock device needs cid=N"),
        ("cid=3", "a vsock device needs socket=PATH"),
        ("cid=2,socket=/tmp/x.sock", "invalid vsock cid 2: use 3 to 4294967294"),
        ("cid=4294967295,socket=/tmp/x.sock", "invalid vsock cid 4294967295"),
        ("cid=three,socket=/tmp/x.sock", "invalid vsock cid 'three': not a number"),
        ("cid=3,socket=", "invalid vsock option 'socket='"),
        ("cid=3,port=5", "invalid vsock option 'port=5': use cid= or socket="),
        ("cid", "invalid vsock option 'cid': expected KEY=VALUE"),
    ] {
        let out = common::run_args(["--vsock", flag]).run();
        assert_eq!(out.code(), Some(2), "{flag}: {}", out.report());
        out.assert_stderr_contains(message);
    }
}

/// A socket path another process accepts on, or a file that is not a socket, stop the VM
/// before it starts (exit status 1) and are left alone.
#[test]
fn a_socket_in_use_is_a_clear_error() {
    if !common::kvm_available() {
        return;
    }
    let dir = common::TempDir::new("vsock-busy");
    let socket = dir.path().join("v.sock");
    let _listener = UnixListener::bind(&socket).unwrap();
    let vsock = format!("cid=3,socket={}", socket.display());
    let out = guest("console=ttyS0", &["--vsock", &vsock]).run();
    out.assert_code(1).assert_no_panic();
    out.assert_stderr_contains(&format!(
        "vanguard: error: cannot attach vsock device: vsock socket {} is in use",
        socket.display()
    ));
    assert!(socket.exists());
    let file = dir.file("plain", b"data");
    let vsock = format!("cid=3,socket={}", file.display());
    let out = guest("console=ttyS0", &["--vsock", &vsock]).run();
    out.assert_code(1);
    out.assert_stderr_contains("exists and is not a socket");
    assert_eq!(std::fs::read(&file).unwrap(), b"data");
}
