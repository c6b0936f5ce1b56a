//! `net=<guest-ip>,<host-ip>[,<count>]`: a tiny IPv4 host on the first virtio-net device
//! (`vanguard run --net tap=...`), driven by polling: receive queue 0 keeps 16 buffers posted,
//! transmit queue 1 sends one frame at a time. It answers ARP requests for `<guest-ip>` and
//! ICMP echo requests to it, resolves `<host-ip>` with ARP and sends it one UDP datagram
//! ("vanguard-guest hello 1", port 5555 to port 5555), and echoes UDP datagrams sent to its
//! port 7. It ends when it has answered `<count>` (default 3) echo requests and echoed one
//! datagram, or fails after about 10 s (25·10^9 TSC cycles).

use crate::bootinfo::BootInfo;
use crate::io;
use crate::println;
use crate::virtio::Device;
use core::fmt;

const VIRTIO_ID_NET: u32 = 1;
const VIRTIO_NET_F_MAC: u64 = 1 << 5;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
/// `virtio_net_hdr_v1`, before every frame both ways.
const HEADER_LEN: usize = 12;
/// Receive buffers kept posted, and the size of each (a header and a 1514-byte frame fit).
const RX_BUFFERS: usize = 16;
const BUFFER_LEN: usize = 2048;
/// The largest frame handled: Ethernet header and a 1500-byte payload.
const MAX_FRAME: usize = 1514;
/// How long the scenario may take, and how often it asks for the host's MAC address, in TSC
/// cycles (about 10 s and 1 s at 2.5 GHz).
const DEADLINE: u64 = 25_000_000_000;
const ARP_RETRY: u64 = 2_500_000_000;
/// The MAC address used if the device has none in its configuration space.
const DEFAULT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const HELLO_PORT: u16 = 5555;
const ECHO_PORT: u16 = 7;

const ETH_HLEN: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const IP_ICMP: u8 = 1;
const IP_UDP: u8 = 17;

#[repr(C, align(4096))]
struct Buffers {
    rx: [[u8; BUFFER_LEN]; RX_BUFFERS],
    tx: [u8; BUFFER_LEN],
}
static mut BUFFERS: Buffers = Buffers { rx: [[0; BUFFER_LEN]; RX_BUFFERS], tx: [0; BUFFER_LEN] };

fn rx_buffer(slot: usize) -> u64 {
    // SAFETY: only the address is taken; the slot is below RX_BUFFERS.
    unsafe { core::ptr::addr_of_mut!(BUFFERS.rx[slot]) as u64 }
}

fn tx_buffer() -> u64 {
    // SAFETY: only the address is taken.
    unsafe { core::ptr::addr_of_mut!(BUFFERS.tx) as u64 }
}

/// An IPv4 address, printed dotted.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Ip([u8; 4]);

impl fmt::Display for Ip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d] = self.0;
        write!(f, "{a}.{b}.{c}.{d}")
    }
}

impl Ip {
    fn parse(text: &str) -> Option<Ip> {
        let mut ip = [0u8; 4];
        let mut parts = text.split('.');
        for byte in &mut ip {
            *byte = parts.next()?.parse().ok()?;
        }
        parts.next().is_none().then_some(Ip(ip))
    }
}

/// A MAC address, printed with colons.
struct Mac([u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn put16(b: &mut [u8], at: usize, value: u16) {
    b[at..at + 2].copy_from_slice(&value.to_be_bytes());
}

/// Adds `data` to a ones'-complement sum of 16-bit big-endian words (RFC 1071).
fn sum(data: &[u8], mut acc: u64) -> u64 {
    for pair in data.chunks(2) {
        let hi = u64::from(pair[0]) << 8;
        acc += hi | pair.get(1).map_or(0, |lo| u64::from(*lo));
    }
    acc
}

/// Folds a sum into its 16-bit ones' complement: the checksum to store (or 0 if the data,
/// checksum included, is intact).
fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// The IPv4 header checksum of `header` (its checksum field taken as zero).
fn ip_checksum(header: &mut [u8]) {
    put16(header, 10, 0);
    let c = fold(sum(header, 0));
    put16(header, 10, c);
}

/// The UDP checksum over the pseudo-header and `udp` (its checksum field taken as zero).
fn udp_checksum(src: Ip, dst: Ip, udp: &mut [u8]) {
    put16(udp, 6, 0);
    let mut acc = sum(&src.0, 0);
    acc = sum(&dst.0, acc);
    acc += u64::from(IP_UDP) + udp.len() as u64;
    let c = match fold(sum(udp, acc)) {
        0 => 0xffff,
        c => c,
    };
    put16(udp, 6, c);
}

/// Writes text into a byte buffer.
struct Cursor<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl fmt::Write for Cursor<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        self.buf.get_mut(self.len..end).ok_or(fmt::Error)?.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// The guest's side of the network.
struct Host {
    dev: Device,
    mac: [u8; 6],
    ip: Ip,
    peer: Ip,
    peer_mac: Option<[u8; 6]>,
    /// Which receive buffer each head descriptor carries.
    slot_of: [u8; crate::virtio::MAX_QUEUE_SIZE as usize],
    ip_id: u16,
    pings: u64,
    echoed: bool,
}

impl Host {
    /// Sends one Ethernet frame (header added here) and waits until the device took it.
    fn send(&mut self, frame: &[u8]) -> Result<(), &'static str> {
        let len = frame.len();
        if len > MAX_FRAME {
            return Err("frame too long");
        }
        // SAFETY: the transmit buffer is not with the device (one frame at a time, and
        // `submit_to` waits until the device used it).
        unsafe {
            let tx = core::ptr::addr_of_mut!(BUFFERS.tx) as *mut u8;
            core::ptr::write_bytes(tx, 0, HEADER_LEN);
            core::ptr::copy_nonoverlapping(frame.as_ptr(), tx.add(HEADER_LEN), len);
        }
        self.dev.submit_to(TX_QUEUE, &[(tx_buffer(), (HEADER_LEN + len) as u32, false)])?;
        Ok(())
    }

    /// Makes receive buffer `slot` available again.
    fn post_rx(&mut self, slot: usize) -> Result<(), &'static str> {
        let head = self.dev.post_to(RX_QUEUE, &[(rx_buffer(slot), BUFFER_LEN as u32, true)])?;
        self.slot_of[usize::from(head)] = slot as u8;
        Ok(())
    }

    /// An Ethernet header to `dst` of `ethertype`, at the start of `frame`.
    fn ethernet(&self, frame: &mut [u8], dst: [u8; 6], ethertype: u16) {
        frame[0..6].copy_from_slice(&dst);
        frame[6..12].copy_from_slice(&self.mac);
        put16(frame, 12, ethertype);
    }

    /// Sends an ARP request (`target` is None: who has the host's address) or a reply to
    /// `target` (its MAC and IP address).
    fn arp(&mut self, target: Option<([u8; 6], Ip)>) -> Result<(), &'static str> {
        let mut f = [0u8; 60];
        let (dst, op, tha, tpa) = match target {
            None => ([0xff; 6], 1, [0; 6], self.peer),
            Some((mac, ip)) => (mac, 2, mac, ip),
        };
        self.ethernet(&mut f, dst, ETHERTYPE_ARP);
        f[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, op]);
        f[22..28].copy_from_slice(&self.mac);
        f[28..32].copy_from_slice(&self.ip.0);
        f[32..38].copy_from_slice(&tha);
        f[38..42].copy_from_slice(&tpa.0);
        self.send(&f)
    }

    /// Sends "vanguard-guest hello <n>" to the host's port 5555.
    fn hello(&mut self, mac: [u8; 6], n: u64) -> Result<(), &'static str> {
        let mut f = [0u8; 128];
        let mut text = Cursor { buf: &mut f[42..], len: 0 };
        fmt::Write::write_fmt(&mut text, format_args!("vanguard-guest hello {n}"))
            .map_err(|_| "hello too long")?;
        let payload = text.len;
        self.ethernet(&mut f, mac, ETHERTYPE_IPV4);
        let udp_len = 8 + payload;
        self.ip_header(&mut f[14..34], IP_UDP, 20 + udp_len, self.peer);
        let udp = &mut f[34..34 + udp_len];
        put16(udp, 0, HELLO_PORT);
        put16(udp, 2, HELLO_PORT);
        put16(udp, 4, udp_len as u16);
        udp_checksum(self.ip, self.peer, udp);
        self.send(&f[..34 + udp_len])
    }

    /// A 20-byte IPv4 header from this host to `dst`.
    fn ip_header(&mut self, h: &mut [u8], protocol: u8, total: usize, dst: Ip) {
        self.ip_id = self.ip_id.wrapping_add(1);
        h[0] = 0x45;
        h[1] = 0;
        put16(h, 2, total as u16);
        put16(h, 4, self.ip_id);
        put16(h, 6, 0x4000); // don't fragment
        h[8] = 64;
        h[9] = protocol;
        h[12..16].copy_from_slice(&self.ip.0);
        h[16..20].copy_from_slice(&dst.0);
        ip_checksum(h);
    }

    /// Handles one received frame (without its virtio header).
    fn receive(&mut self, frame: &[u8]) -> Result<(), &'static str> {
        if frame.len() < ETH_HLEN {
            return Ok(());
        }
        match be16(frame, 12) {
            ETHERTYPE_ARP => self.receive_arp(frame),
            ETHERTYPE_IPV4 => self.receive_ipv4(frame),
            _ => Ok(()),
        }
    }

    fn receive_arp(&mut self, f: &[u8]) -> Result<(), &'static str> {
        // Ethernet, IPv4, 6-byte and 4-byte addresses.
        if f.len() < 42 || f[14..20] != [0, 1, 8, 0, 6, 4] {
            return Ok(());
        }
        let op = be16(f, 20);
        let mut sha = [0u8; 6];
        sha.copy_from_slice(&f[22..28]);
        let spa = Ip([f[28], f[29], f[30], f[31]]);
        let tpa = Ip([f[38], f[39], f[40], f[41]]);
        if spa == self.peer && self.peer_mac.is_none() {
            println!("net: arp: {} is at {}", spa, Mac(sha));
            self.peer_mac = Some(sha);
        }
        if op == 1 && tpa == self.ip {
            self.arp(Some((sha, spa)))?;
            println!("net: arp reply to {spa}");
        }
        Ok(())
    }

    fn receive_ipv4(&mut self, f: &[u8]) -> Result<(), &'static str> {
        let ip = &f[ETH_HLEN..];
        if ip.len() < 20 || ip[0] >> 4 != 4 {
            return Ok(());
        }
        let ihl = usize::from(ip[0] & 15) * 4;
        let total = usize::from(be16(ip, 2));
        if ihl < 20 || total < ihl || total > ip.len() || fold(sum(&ip[..ihl], 0)) != 0 {
            return Ok(());
        }
        // Fragments (more-fragments set, or an offset) are not reassembled.
        if be16(ip, 6) & 0x3fff != 0 || ip[16..20] != self.ip.0 {
            return Ok(());
        }
        let src = Ip([ip[12], ip[13], ip[14], ip[15]]);
        let mut dst_mac = [0u8; 6];
        dst_mac.copy_from_slice(&f[6..12]);
        let payload = &ip[ihl..total];
        match ip[9] {
            IP_ICMP => self.receive_icmp(dst_mac, src, payload),
            IP_UDP => self.receive_udp(dst_mac, src, payload),
            _ => Ok(()),
        }
    }

    fn receive_icmp(&mut self, mac: [u8; 6], src: Ip, icmp: &[u8]) -> Result<(), &'static str> {
        // An echo request (type 8, code 0) with an intact checksum.
        if icmp.len() < 8 || icmp[0] != 8 || icmp[1] != 0 || fold(sum(icmp, 0)) != 0 {
            return Ok(());
        }
        if ETH_HLEN + 20 + icmp.len() > MAX_FRAME {
            return Ok(());
        }
        let mut f = [0u8; MAX_FRAME];
        let len = ETH_HLEN + 20 + icmp.len();
        self.ethernet(&mut f, mac, ETHERTYPE_IPV4);
        self.ip_header(&mut f[14..34], IP_ICMP, 20 + icmp.len(), src);
        let reply = &mut f[34..len];
        reply.copy_from_slice(icmp);
        reply[0] = 0; // echo reply
        put16(reply, 2, 0);
        let c = fold(sum(reply, 0));
        put16(reply, 2, c);
        self.send(&f[..len])?;
        self.pings += 1;
        println!("net: icmp echo reply to {src} seq {}", be16(icmp, 6));
        Ok(())
    }

    fn receive_udp(&mut self, mac: [u8; 6], src: Ip, udp: &[u8]) -> Result<(), &'static str> {
        if udp.len() < 8 || be16(udp, 2) != ECHO_PORT {
            return Ok(());
        }
        let len = usize::from(be16(udp, 4));
        if len < 8 || len > udp.len() || ETH_HLEN + 20 + len > MAX_FRAME {
            return Ok(());
        }
        let port = be16(udp, 0);
        let mut f = [0u8; MAX_FRAME];
        self.ethernet(&mut f, mac, ETHERTYPE_IPV4);
        self.ip_header(&mut f[14..34], IP_UDP, 20 + len, src);
        let reply = &mut f[34..34 + len];
        reply.copy_from_slice(&udp[..len]);
        put16(reply, 0, ECHO_PORT);
        put16(reply, 2, port);
        udp_checksum(self.ip, src, reply);
        self.send(&f[..34 + len])?;
        self.echoed = true;
        println!("net: udp echoed {} bytes to {src}:{port}", len - 8);
        Ok(())
    }
}

/// Runs the scenario.
pub fn run(info: &BootInfo, arg: Option<&str>) -> bool {
    let mut parts = arg.unwrap_or("").split(',');
    let ip = parts.next().and_then(Ip::parse);
    let peer = parts.next().and_then(Ip::parse);
    let count = match parts.next() {
        None => Some(3),
        Some(n) => n.parse::<u64>().ok(),
    };
    let (Some(ip), Some(peer), Some(count), None) = (ip, peer, count, parts.next()) else {
        return super::bad("net", arg);
    };
    match serve(info, ip, peer, count) {
        Ok(()) => {
            println!("net: answered {count} echo requests and echoed a datagram: ok");
            true
        }
        Err(why) => {
            println!("net: FAILED: {why}");
            false
        }
    }
}

/// Why the scenario failed.
enum Failure {
    /// The driver or the device failed.
    Driver(&'static str),
    /// The deadline passed first.
    TimedOut { pings: u64, count: u64, echoed: bool, resolved: bool },
}

impl From<&'static str> for Failure {
    fn from(why: &'static str) -> Failure {
        Failure::Driver(why)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Driver(why) => f.write_str(why),
            Failure::TimedOut { pings, count, echoed, resolved } => write!(
                f,
                "timed out: {pings} of {count} echo requests answered, {} datagram echoed, \
                 host address {}",
                if *echoed { "a" } else { "no" },
                if *resolved { "resolved" } else { "not resolved" }
            ),
        }
    }
}

fn serve(info: &BootInfo, ip: Ip, peer: Ip, count: u64) -> Result<(), Failure> {
    let found = Device::find_nth(info, VIRTIO_ID_NET, 0)?;
    let dev = Device::open_with(&found, 2, VIRTIO_NET_F_MAC)?;
    let mut mac = DEFAULT_MAC;
    if dev.offered_features() & VIRTIO_NET_F_MAC != 0 {
        for (i, byte) in mac.iter_mut().enumerate() {
            *byte = dev.config8(i as u64);
        }
    }
    println!("net: up, mac {}, ip {ip}, virtio-net at {:#x}", Mac(mac), dev.base());
    let mut host = Host {
        dev,
        mac,
        ip,
        peer,
        peer_mac: None,
        slot_of: [0; crate::virtio::MAX_QUEUE_SIZE as usize],
        ip_id: 0,
        pings: 0,
        echoed: false,
    };
    for slot in 0..RX_BUFFERS {
        host.post_rx(slot)?;
    }
    host.dev.notify_queue(RX_QUEUE);
    let start = io::rdtsc();
    let mut next_arp = start;
    let mut hello_sent = false;
    let mut frame = [0u8; BUFFER_LEN];
    while host.pings < count || !host.echoed {
        let now = io::rdtsc();
        if now - start > DEADLINE {
            return Err(Failure::TimedOut {
                pings: host.pings,
                count,
                echoed: host.echoed,
                resolved: host.peer_mac.is_some(),
            });
        }
        match host.peer_mac {
            None if now >= next_arp => {
                host.arp(None)?;
                next_arp = now + ARP_RETRY;
            }
            Some(mac) if !hello_sent => {
                host.hello(mac, 1)?;
                hello_sent = true;
                println!("net: udp sent to {peer}:{HELLO_PORT}");
            }
            _ => {}
        }
        let Some((head, len)) = host.dev.poll_queue(RX_QUEUE)? else {
            core::hint::spin_loop();
            continue;
        };
        let slot = usize::from(host.slot_of[usize::from(head)]);
        let len = (len as usize).min(BUFFER_LEN);
        // SAFETY: the device used the buffer and no longer writes it until it is posted again.
        unsafe {
            let src = core::ptr::addr_of!(BUFFERS.rx[slot]) as *const u8;
            core::ptr::copy_nonoverlapping(src, frame.as_mut_ptr(), len);
        }
        host.post_rx(slot)?;
        host.dev.notify_queue(RX_QUEUE);
        if len > HEADER_LEN {
            host.receive(&frame[HEADER_LEN..len])?;
        }
    }
    Ok(())
}
