//! virtio-net on a real TAP, against the host's real network stack: the test guest's `net`
//! scenario (docs/test-guest.md) answers the host's ARP and `ping`, says hello over UDP and
//! echoes a datagram, over virtio-pci (the default) and virtio-mmio.
//!
//! Each test makes its own TAP (`vg<pid><n>`) with `ip tuntap add` on its own /24 and deletes
//! it whatever happens (a guard). The tests need /dev/net/tun, CAP_NET_ADMIN and `ip`; without
//! them they are skipped with the reason, unless `VANGUARD_REQUIRE_KVM=1` makes that a
//! failure. Without `ping` the guest is not pinged (skipped, or a failure under
//! `VANGUARD_REQUIRE_TOOLS=1`).

mod common;

use common::guest;
use common::net::{
    accept_within, ip, link_exists, md5_hex, net_available, ping, ping_available, take_subnet, Tap,
};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpListener, UdpSocket};
use std::time::Duration;

/// Sends a datagram to the guest's port 7 from `socket` and checks it comes back the same,
/// from port 7.
fn udp_echo(socket: &UdpSocket, guest: Ipv4Addr, payload: &[u8]) {
    socket.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    socket.send_to(payload, SocketAddrV4::new(guest, 7)).unwrap();
    let mut buf = [0u8; 2048];
    let (n, from) = socket.recv_from(&mut buf).expect("the guest's echo");
    assert_eq!(from, SocketAddrV4::new(guest, 7).into());
    assert_eq!(&buf[..n], payload);
}

/// The whole conversation on a TAP the test made: the guest resolves the host and says
/// hello; the host (made to ARP for the guest) pings it three times; a datagram to its port
/// 7 comes back identical; the guest then powers off cleanly.
fn round_trip(extra: &[&str], mac: Option<&str>, base: &str) {
    let tap = Tap::create();
    let (host, guest_ip) = (tap.host_ip(), tap.guest_ip());
    let pings = if ping_available() { 3 } else { 0 };
    // Bound before the guest starts, so that its hello cannot arrive first.
    let socket = UdpSocket::bind(SocketAddrV4::new(host, 5555)).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let net = match mac {
        Some(mac) => format!("tap={},mac={mac}", tap.name),
        None => format!("tap={}", tap.name),
    };
    let mut args = vec!["--net", net.as_str()];
    args.extend_from_slice(extra);
    let cmdline = format!("console=ttyS0 net={guest_ip},{host},{pings}");
    let vm = guest(&cmdline, &args).spawn_interactive();

    let mut buf = [0u8; 256];
    let (n, from) = socket.recv_from(&mut buf).expect("the guest's hello");
    assert_eq!(&buf[..n], b"vanguard-guest hello 1");
    assert_eq!(from, SocketAddrV4::new(guest_ip, 5555).into());
    if pings > 0 {
        // The host learnt the guest's address from its ARP request: forget it, so that the
        // host has to ask, and the guest to answer.
        ip(&["neigh", "flush", "dev", &tap.name]);
        ping(guest_ip, pings);
        let neigh = ip(&["neigh", "show", &guest_ip.to_string(), "dev", &tap.name]);
        let expected = mac.unwrap_or("52:54:00:12:34:56");
        assert!(
            String::from_utf8_lossy(&neigh.stdout).contains(expected),
            "the host's neighbour entry for the guest: {}",
            String::from_utf8_lossy(&neigh.stdout)
        );
    }
    let payload = format!("vanguard echo from the host through {}", tap.name);
    udp_echo(&socket, guest_ip, payload.as_bytes());

    let out = vm.finish();
    out.assert_clean_exit();
    let mac = mac.unwrap_or("52:54:00:12:34:56");
    out.assert_line(&format!("net: up, mac {mac}, ip {guest_ip}, virtio-net at {base}"));
    out.assert_lines_in_order(&[
        &format!("net: arp: {host} is at {}", tap.mac()),
        &format!("net: udp sent to {host}:5555"),
    ]);
    let mut answers: Vec<String> =
        (1..=pings).map(|seq| format!("net: icmp echo reply to {host} seq {seq}")).collect();
    if pings > 0 {
        out.assert_line(&format!("net: arp reply to {host}"));
    }
    answers.push(format!("net: udp echoed {} bytes to {host}:5555", payload.len()));
    answers.push(format!("net: answered {pings} echo requests and echoed a datagram: ok"));
    answers.push("vanguard-guest: done, powering off".to_string());
    let answers: Vec<&str> = answers.iter().map(String::as_str).collect();
    out.assert_lines_in_order(&answers);
}

#[test]
fn ping_and_udp_over_virtio_pci() {
    if !net_available() {
        return;
    }
    round_trip(&[], None, "0xc0000000");
}

/// virtio-mmio, with a MAC address of the user's choosing, which the host sees on the wire.
#[test]
fn ping_and_udp_over_virtio_mmio_with_a_chosen_mac() {
    if !net_available() {
        return;
    }
    round_trip(&["--virtio-transport", "mmio"], Some("52:54:00:ab:cd:ef"), "0xd0000000");
}

/// TCP between the test guest's own small TCP (`tcp` scenario) and the host's: 6 MiB from the
/// guest, whose MD5 (the host's md5sum) the host sends back and the guest compares with its
/// own; then 5 MiB of other bytes from the host, whose MD5 the guest sends back and the test
/// compares with md5sum's. Two connections, one after the other, over virtio-pci.
#[test]
fn tcp_both_ways_with_md5_at_both_ends() {
    if !net_available() {
        return;
    }
    const GUEST_BYTES: usize = 6 << 20;
    const HOST_BYTES: usize = 5 << 20;
    let tap = Tap::create();
    let (host, guest_ip) = (tap.host_ip(), tap.guest_ip());
    let listener = TcpListener::bind((host, 0)).expect("listen on the TAP's address");
    let port = listener.local_addr().unwrap().port();
    let cmdline = format!(
        "console=ttyS0 tcp={guest_ip},{host},{port},send:{GUEST_BYTES} \
         tcp={guest_ip},{host},{port},recv"
    );
    let vm = guest(&cmdline, &["--net", &format!("tap={}", tap.name)]).spawn_interactive();

    let mut conn = accept_within(&listener, Duration::from_secs(60));
    assert_eq!(conn.peer_addr().unwrap().ip(), guest_ip);
    conn.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut received = Vec::new();
    conn.read_to_end(&mut received).expect("the guest's bytes, then its FIN");
    assert_eq!(received.len(), GUEST_BYTES);
    let guest_md5 = md5_hex(&received);
    conn.write_all(guest_md5.as_bytes()).unwrap();
    drop(conn);

    let data = common::image(HOST_BYTES, 0x7463_7021);
    let mut conn = accept_within(&listener, Duration::from_secs(60));
    conn.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    conn.write_all(&data).expect("send to the guest");
    conn.shutdown(Shutdown::Write).unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).expect("the guest's md5, then its FIN");
    let host_md5 = md5_hex(&data);
    assert_eq!(answer, host_md5, "the guest's md5 of what the host sent");

    let out = vm.finish();
    out.assert_clean_exit();
    let sent = out.line_starting("tcp: sent ");
    assert!(
        sent.starts_with(&format!("tcp: sent {GUEST_BYTES} bytes, md5 {guest_md5}, in ")),
        "{sent}"
    );
    let got = out.line_starting("tcp: received ");
    assert!(got.starts_with(&format!("tcp: received {HOST_BYTES} bytes, md5 {host_md5}, in ")));
    out.assert_lines_in_order(&[
        "tcp: the host's md5 matches: ok",
        "tcp: md5 sent to the host: ok",
        "vanguard-guest: done, powering off",
    ]);
}

/// A TAP that does not exist is created by the VMM (a TAP with a virtio-net header), works
/// once the host configures it while the guest runs, and is gone when the VMM exits.
#[test]
fn the_vmm_creates_a_missing_tap_for_its_lifetime() {
    if !net_available() {
        return;
    }
    let mut tap = Tap::missing();
    // The subnet is chosen now, for the guest's command line, and configured later.
    let x = take_subnet();
    let (host, guest_ip) = (Ipv4Addr::new(192, 168, x, 1), Ipv4Addr::new(192, 168, x, 2));
    let pings = if ping_available() { 1 } else { 0 };
    let cmdline = format!("console=ttyS0 net={guest_ip},{host},{pings}");
    let mut vm = guest(&cmdline, &["--net", &format!("tap={}", tap.name)]).spawn_interactive();
    vm.wait_for_stdout("net: up");
    assert!(link_exists(&tap.name), "the VMM did not create {}", tap.name);
    let flags = std::fs::read_to_string(format!("/sys/class/net/{}/tun_flags", tap.name)).unwrap();
    let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap();
    // IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, not persistent (IFF_PERSIST 0x800).
    assert_eq!(flags & 0x5802, 0x5002, "tun_flags {flags:#x}");
    tap.configure_on(x);
    if pings > 0 {
        ping(guest_ip, pings);
    }
    let socket = UdpSocket::bind(SocketAddrV4::new(host, 0)).unwrap();
    udp_echo(&socket, guest_ip, b"to a TAP the VMM made");
    let out = vm.finish();
    out.assert_clean_exit();
    out.assert_line(&format!("net: answered {pings} echo requests and echoed a datagram: ok"));
    assert!(!link_exists(&tap.name), "{} outlived the VMM", tap.name);
}

/// An interface that exists but is not a TAP is refused with the TAP's name and the reason.
#[test]
fn an_interface_that_is_not_a_tap_is_a_clear_error() {
    if !net_available() {
        return;
    }
    let out = common::run_args(["--net", "tap=lo"]).run();
    assert_eq!(out.code(), Some(1), "{}", out.report());
    out.assert_stderr_contains(
        "vanguard: error: cannot attach network device: cannot open TAP device lo: TUNSETIFF (an \
         interface of that name exists and is not a TAP, or has other flags): Invalid argument",
    );
    out.assert_no_panic();
}

/// Bad `--net` flags are refused before anything starts (exit status 2) with a line that
/// names the problem.
#[test]
fn bad_net_options_are_refused() {
    for (flag, message) in [
        ("mac=52:54:00:00:00:01", "a network device needs tap=NAME"),
        ("tap", "invalid net option 'tap': expected KEY=VALUE"),
        ("tap=", "invalid TAP name '': empty"),
        ("tap=much-too-long-name", "invalid TAP name 'much-too-long-name': longer than 15 bytes"),
        ("tap=a/b", "invalid TAP name 'a/b': contains"),
        ("tap=vg0,mac=52:54:00:00:00", "invalid mac '52:54:00:00:00'"),
        ("tap=vg0,mac=52:54:00:00:00:0g", "invalid mac '52:54:00:00:00:0g'"),
        ("tap=vg0,mac=01:00:5e:00:00:01", "a multicast address"),
        ("tap=vg0,queues=2", "invalid net option 'queues=2'"),
        ("tap=vg0,bandwidth=fast", "invalid net rate limit: bandwidth: invalid amount 'fast'"),
        ("tap=vg0,ops_burst=10", "invalid net rate limit"),
    ] {
        let out = common::run_args(["--net", flag]).run();
        assert_eq!(out.code(), Some(2), "{flag}: {}", out.report());
        out.assert_stderr_contains(message);
    }
}
