//! TAP devices for the network tests: whether they can run here, and TAPs on free subnets that
//! are deleted whatever happens.

use std::io::Write;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Whether the network tests can run here; prints why not (or fails under
/// VANGUARD_REQUIRE_KVM=1).
pub fn net_available() -> bool {
    if !super::kvm_available() {
        return false;
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let cap_net_admin = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 12) != 0);
    let why = if !Path::new("/dev/net/tun").exists() {
        "/dev/net/tun does not exist"
    } else if !cap_net_admin {
        "no CAP_NET_ADMIN to create TAP devices (run as root)"
    } else if Command::new("ip").arg("-V").output().is_err() {
        "no `ip` command (iproute2)"
    } else {
        return true;
    };
    if super::env_flag("VANGUARD_REQUIRE_KVM") {
        panic!("{why}, and VANGUARD_REQUIRE_KVM=1 makes that a failure");
    }
    println!("skipping: {why}");
    false
}

/// Whether `ping` is here; if not, says so (or fails under VANGUARD_REQUIRE_TOOLS=1).
pub fn ping_available() -> bool {
    if Command::new("ping").arg("-V").output().is_ok() {
        return true;
    }
    if super::env_flag("VANGUARD_REQUIRE_TOOLS") {
        panic!("no `ping` (iputils-ping), and VANGUARD_REQUIRE_TOOLS=1 makes that a failure");
    }
    println!("skipping the ping part: no `ping` (iputils-ping)");
    false
}

/// Runs `ip ARGS`; fails the test with its output if it fails.
pub fn ip(args: &[&str]) -> Output {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// A TAP name no interface has: `vg<pid><n>` (at most 15 bytes).
pub fn tap_name() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    loop {
        let name = format!("vg{}{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        assert!(name.len() <= 15, "{name}");
        if !link_exists(&name) {
            return name;
        }
    }
}

/// A /24 under 192.168.0.0/16 that no interface has an address in and no other test of this
/// process took: 192.168.<x>.0/24. The search starts from the pid, so that two test processes
/// rarely look at the same ones.
pub fn take_subnet() -> u8 {
    static TAKEN: Mutex<Vec<u8>> = Mutex::new(Vec::new());
    let mut taken = TAKEN.lock().unwrap_or_else(|e| e.into_inner());
    let addresses = String::from_utf8_lossy(&ip(&["-4", "-o", "addr", "show"]).stdout).to_string();
    let start = std::process::id() as usize;
    let x = (0..150)
        .map(|i| u8::try_from(100 + (start + i * 7) % 150).unwrap())
        .find(|x| !taken.contains(x) && !addresses.contains(&format!(" 192.168.{x}.")))
        .expect("a free 192.168.x.0/24");
    taken.push(x);
    x
}

/// A TAP interface, deleted when dropped (on every path, panics included).
pub struct Tap {
    pub name: String,
    subnet: Option<u8>,
}

impl Tap {
    /// A TAP made with `ip tuntap add`, with 192.168.<x>.1/24 on a free subnet, and up.
    pub fn create() -> Tap {
        let mut tap = Tap { name: tap_name(), subnet: None };
        ip(&["tuntap", "add", "dev", &tap.name, "mode", "tap"]);
        tap.configure();
        tap
    }

    /// A name for the VMM to create the TAP with; the guard deletes it if it outlives the VMM.
    pub fn missing() -> Tap {
        Tap { name: tap_name(), subnet: None }
    }

    /// Gives the TAP 192.168.<x>.1/24 on a free subnet and brings it up.
    pub fn configure(&mut self) {
        self.configure_on(take_subnet());
    }

    /// Gives the TAP 192.168.<x>.1/24 and brings it up.
    pub fn configure_on(&mut self, x: u8) {
        ip(&["addr", "add", &format!("192.168.{x}.1/24"), "dev", &self.name]);
        ip(&["link", "set", "dev", &self.name, "up"]);
        self.subnet = Some(x);
    }

    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(192, 168, self.subnet.expect("configured"), 1)
    }

    pub fn guest_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(192, 168, self.subnet.expect("configured"), 2)
    }

    pub fn mac(&self) -> String {
        let path = Path::new("/sys/class/net").join(&self.name).join("address");
        std::fs::read_to_string(path).expect("the TAP's address").trim().to_string()
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        if link_exists(&self.name) {
            let _ = Command::new("ip").args(["link", "del", "dev", &self.name]).output();
        }
    }
}

/// `ping -c <count> -W 2 <ip>`; fails the test unless every echo came back.
pub fn ping(ip: Ipv4Addr, count: u32) {
    let out = Command::new("ping")
        .args(["-c", &count.to_string(), "-W", "2", &ip.to_string()])
        .output()
        .expect("run ping");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(&format!("{count} received")),
        "ping {ip}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The MD5 of `bytes` as the host's `md5sum` computes it (32 hex digits).
pub fn md5_hex(bytes: &[u8]) -> String {
    let mut child = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("md5sum runs");
    child.stdin.take().expect("stdin").write_all(bytes).expect("feed md5sum");
    let out = child.wait_with_output().expect("md5sum ends");
    String::from_utf8_lossy(&out.stdout).split(' ').next().unwrap_or_default().to_string()
}

/// The next connection on `listener`, in blocking mode; panics after `within`.
pub fn accept_within(listener: &TcpListener, within: Duration) -> TcpStream {
    let deadline = Instant::now() + within;
    listener.set_nonblocking(true).unwrap();
    let conn = loop {
        match listener.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "nobody connected within {within:?}");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    conn.set_nonblocking(false).unwrap();
    conn
}
