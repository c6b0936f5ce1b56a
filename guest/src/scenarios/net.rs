//! `net=<guest-ip>,<host-ip>[,<count>]`: a tiny IPv4 host on the first virtio-net device
//! (`vanguard run --net tap=...`), driven by polling: receive queue 0 keeps 64 buffers posted,
//! transmit queue 1 has 32 buffers and is notified every 8 frames or when the host has nothing
//! more to send. The same host carries the `tcp` scenario (`tcp.rs`). It answers ARP requests for `<guest-ip>` and
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
const RX_BUFFERS: usize = 64;
pub(super) const BUFFER_LEN: usize = 2048;
/// Transmit buffers, and how many frames are posted before the device is notified.
const TX_BUFFERS: usize = 32;
const TX_BATCH: usize = 8;
/// The largest frame handled: Ethernet header and a 1500-byte payload.
pub(super) const MAX_FRAME: usize = 1514;
/// How long the scenario may take, and how often it asks for the host's MAC address, in TSC
/// cycles (about 10 s and 1 s at 2.5 GHz).
const DEADLINE: u64 = 25_000_000_000;
const ARP_RETRY: u64 = 2_500_000_000;
/// The MAC address used if the device has none in its configuration space.
const DEFAULT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const HELLO_PORT: u16 = 5555;
const ECHO_PORT: u16 = 7;

pub(super) const ETH_HLEN: usize = 14;
pub(super) const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const IP_ICMP: u8 = 1;
pub(super) const IP_TCP: u8 = 6;
const IP_UDP: u8 = 17;

#[repr(C, align(4096))]
struct Buffers {
    rx: [[u8; BUFFER_LEN]; RX_BUFFERS],
    tx: [[u8; BUFFER_LEN]; TX_BUFFERS],
}
static mut BUFFERS: Buffers =
    Buffers { rx: [[0; BUFFER_LEN]; RX_BUFFERS], tx: [[0; BUFFER_LEN]; TX_BUFFERS] };

fn rx_buffer(slot: usize) -> u64 {
    // SAFETY: only the address is taken; the slot is below RX_BUFFERS.
    unsafe { core::ptr::addr_of_mut!(BUFFERS.rx[slot]) as u64 }
}

fn tx_buffer(slot: usize) -> u64 {
    // SAFETY: only the address is taken; the slot is below TX_BUFFERS.
    unsafe { core::ptr::addr_of_mut!(BUFFERS.tx[slot]) as u64 }
}

/// An IPv4 address, printed dotted.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) struct Ip(pub(super) [u8; 4]);

impl fmt::Display for Ip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d] = self.0;
        write!(f, "{a}.{b}.{c}.{d}")
    }
}

impl Ip {
    pub(super) fn parse(text: &str) -> Option<Ip> {
        let mut ip = [0u8; 4];
        let mut parts = text.split('.');
        for byte in &mut ip {
            *byte = parts.next()?.parse().ok()?;
        }
        parts.next().is_none().then_some(Ip(ip))
    }
}

/// A MAC address, printed with colons.
pub(super) struct Mac(pub(super) [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

pub(super) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

pub(super) fn put16(b: &mut [u8], at: usize, value: u16) {
    b[at..at + 2].copy_from_slice(&value.to_be_bytes());
}

/// Adds `data` to a ones'-complement sum of 16-bit big-endian words (RFC 1071).
pub(super) fn sum(data: &[u8], mut acc: u64) -> u64 {
    for pair in data.chunks(2) {
        let hi = u64::from(pair[0]) << 8;
        acc += hi | pair.get(1).map_or(0, |lo| u64::from(*lo));
    }
    acc
}

/// Folds a sum into its 16-bit ones' complement: the checksum to store (or 0 if the data,
/// checksum included, is intact).
pub(super) fn fold(mut acc: u64) -> u16 {
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
pub(super) struct Cursor<'a> {
    pub(super) buf: &'a mut [u8],
    pub(super) len: usize,
}

impl fmt::Write for Cursor<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        self.buf.get_mut(self.len..end).ok_or(fmt::Error)?.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// A TCP segment addressed to this host, as `Host::receive` finds it: the sender and where the
/// segment (header and payload) lies in the frame.
pub(super) struct TcpSegment {
    pub(super) src: Ip,
    pub(super) start: usize,
    pub(super) end: usize,
}

/// The guest's side of the network.
pub(super) struct Host {
    dev: Device,
    mac: [u8; 6],
    pub(super) ip: Ip,
    pub(super) peer: Ip,
    pub(super) peer_mac: Option<[u8; 6]>,
    /// Which receive buffer each head descriptor carries.
    slot_of: [u8; crate::virtio::MAX_QUEUE_SIZE as usize],
    /// Which transmit buffer each head descriptor carries, and the free transmit buffers.
    tx_slot_of: [u8; crate::virtio::MAX_QUEUE_SIZE as usize],
    tx_free: [u8; TX_BUFFERS],
    tx_free_count: usize,
    /// Frames posted on the transmit queue since the last notification.
    unnotified: usize,
    next_arp: u64,
    ip_id: u16,
    pings: u64,
    echoed: bool,
}

impl Host {
    /// Brings up the first virtio-net device for `ip`, talking to `peer`, with every receive
    /// buffer posted.
    pub(super) fn open(info: &BootInfo, ip: Ip, peer: Ip) -> Result<Host, &'static str> {
        let found = Device::find_nth(info, VIRTIO_ID_NET, 0)?;
        let dev = Device::open_with(&found, 2, VIRTIO_NET_F_MAC)?;
        let mut mac = DEFAULT_MAC;
        if dev.offered_features() & VIRTIO_NET_F_MAC != 0 {
            for (i, byte) in mac.iter_mut().enumerate() {
                *byte = dev.config8(i as u64);
            }
        }
        println!("net: up, mac {}, ip {ip}, virtio-net at {:#x}", Mac(mac), dev.base());
        let mut tx_free = [0u8; TX_BUFFERS];
        for (slot, free) in tx_free.iter_mut().enumerate() {
            *free = slot as u8;
        }
        let mut host = Host {
            dev,
            mac,
            ip,
            peer,
            peer_mac: None,
            slot_of: [0; crate::virtio::MAX_QUEUE_SIZE as usize],
            tx_slot_of: [0; crate::virtio::MAX_QUEUE_SIZE as usize],
            tx_free,
            tx_free_count: TX_BUFFERS,
            unnotified: 0,
            next_arp: 0,
            ip_id: 0,
            pings: 0,
            echoed: false,
        };
        for slot in 0..RX_BUFFERS {
            host.post_rx(slot)?;
        }
        host.dev.notify_queue(RX_QUEUE);
        Ok(host)
    }

    /// Takes the transmit buffers the device has used back.
    fn reclaim_tx(&mut self) -> Result<(), &'static str> {
        while let Some((head, _)) = self.dev.poll_queue(TX_QUEUE)? {
            let slot = self.tx_slot_of[usize::from(head)];
            if self.tx_free_count >= TX_BUFFERS
                || self.tx_free[..self.tx_free_count].contains(&slot)
            {
                return Err("the device used a transmit buffer twice");
            }
            self.tx_free[self.tx_free_count] = slot;
            self.tx_free_count += 1;
        }
        Ok(())
    }

    /// Queues one Ethernet frame (header added here) for the device, waiting for a free
    /// transmit buffer if all are in flight; the device is notified every TX_BATCH frames
    /// (`flush` notifies the rest).
    pub(super) fn send(&mut self, frame: &[u8]) -> Result<(), &'static str> {
        let len = frame.len();
        if len > MAX_FRAME {
            return Err("frame too long");
        }
        self.reclaim_tx()?;
        if self.tx_free_count == 0 {
            self.flush();
            let deadline = io::rdtsc() + DEADLINE;
            while self.tx_free_count == 0 {
                if io::rdtsc() > deadline {
                    return Err("the device did not use the transmit buffers");
                }
                core::hint::spin_loop();
                self.reclaim_tx()?;
            }
        }
        self.tx_free_count -= 1;
        let slot = usize::from(self.tx_free[self.tx_free_count]);
        // SAFETY: transmit buffer `slot` is free: not posted, or used by the device and
        // reclaimed; nothing else refers to it.
        unsafe {
            let tx = core::ptr::addr_of_mut!(BUFFERS.tx[slot]) as *mut u8;
            core::ptr::write_bytes(tx, 0, HEADER_LEN);
            core::ptr::copy_nonoverlapping(frame.as_ptr(), tx.add(HEADER_LEN), len);
        }
        let head =
            self.dev.post_to(TX_QUEUE, &[(tx_buffer(slot), (HEADER_LEN + len) as u32, false)])?;
        self.tx_slot_of[usize::from(head)] = slot as u8;
        self.unnotified += 1;
        if self.unnotified >= TX_BATCH {
            self.flush();
        }
        Ok(())
    }

    /// Notifies the device of frames posted since the last notification.
    pub(super) fn flush(&mut self) {
        if self.unnotified > 0 {
            self.dev.notify_queue(TX_QUEUE);
            self.unnotified = 0;
        }
    }

    /// Makes receive buffer `slot` available again.
    fn post_rx(&mut self, slot: usize) -> Result<(), &'static str> {
        let head = self.dev.post_to(RX_QUEUE, &[(rx_buffer(slot), BUFFER_LEN as u32, true)])?;
        self.slot_of[usize::from(head)] = slot as u8;
        Ok(())
    }

    /// Copies the next received frame (virtio header stripped) into `frame` and gives its
    /// buffer back to the device; None if nothing arrived.
    pub(super) fn next_frame(
        &mut self,
        frame: &mut [u8; BUFFER_LEN],
    ) -> Result<Option<usize>, &'static str> {
        let Some((head, len)) = self.dev.poll_queue(RX_QUEUE)? else { return Ok(None) };
        let slot = usize::from(self.slot_of[usize::from(head)]);
        let len = (len as usize).min(BUFFER_LEN);
        // SAFETY: the device used the buffer and no longer writes it until it is posted again.
        unsafe {
            let src = core::ptr::addr_of!(BUFFERS.rx[slot]) as *const u8;
            core::ptr::copy_nonoverlapping(src, frame.as_mut_ptr(), len);
        }
        self.post_rx(slot)?;
        self.dev.notify_queue(RX_QUEUE);
        let len = len.saturating_sub(HEADER_LEN);
        frame.copy_within(HEADER_LEN..HEADER_LEN + len, 0);
        Ok(Some(len))
    }

    /// Asks for the peer's MAC address (again every ~1 s) until it is known.
    pub(super) fn resolve(&mut self, now: u64) -> Result<(), &'static str> {
        if self.peer_mac.is_none() && now >= self.next_arp {
            self.arp(None)?;
            self.flush();
            self.next_arp = now + ARP_RETRY;
        }
        Ok(())
    }

    /// An Ethernet header to `dst` of `ethertype`, at the start of `frame`.
    pub(super) fn ethernet(&self, frame: &mut [u8], dst: [u8; 6], ethertype: u16) {
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
        let mut buf = [0u8; 64];
        let mut text = Cursor { buf: &mut buf, len: 0 };
        fmt::Write::write_fmt(&mut text, format_args!("vanguard-guest hello {n}"))
            .map_err(|_| "hello too long")?;
        let len = text.len;
        let peer = self.peer;
        self.udp(mac, peer, HELLO_PORT, HELLO_PORT, &buf[..len])
    }

    /// Sends `payload` in one UDP datagram from this host's `src_port` to `dst:dst_port`
    /// (Ethernet address `mac`), UDP checksum computed.
    fn udp(
        &mut self,
        mac: [u8; 6],
        dst: Ip,
        src_port: u16,
        dst_port: u16,
        payload: &[u8],
    ) -> Result<(), &'static str> {
        let udp_len = 8 + payload.len();
        if ETH_HLEN + 20 + udp_len > MAX_FRAME {
            return Err("datagram too long");
        }
        let mut f = [0u8; MAX_FRAME];
        self.ethernet(&mut f, mac, ETHERTYPE_IPV4);
        self.ip_header(&mut f[14..34], IP_UDP, 20 + udp_len, dst);
        let udp = &mut f[34..34 + udp_len];
        put16(udp, 0, src_port);
        put16(udp, 2, dst_port);
        put16(udp, 4, udp_len as u16);
        udp[8..].copy_from_slice(payload);
        udp_checksum(self.ip, dst, udp);
        self.send(&f[..34 + udp_len])
    }

    /// Sends `payload` in one UDP datagram from `port` to the peer's `port`, if the peer's MAC
    /// address is known (`resolve` asks for it); returns whether it was sent. The device is
    /// notified at once.
    pub(super) fn udp_to_peer(&mut self, port: u16, payload: &[u8]) -> Result<bool, &'static str> {
        let Some(mac) = self.peer_mac else { return Ok(false) };
        let peer = self.peer;
        self.udp(mac, peer, port, port, payload)?;
        self.flush();
        Ok(true)
    }

    /// Handles every frame received so far (ARP, ICMP echo, UDP echo; TCP segments are
    /// dropped), keeping the receive buffers posted, and sends what that queued.
    pub(super) fn receive_pending(&mut self) -> Result<(), &'static str> {
        let mut frame = [0u8; BUFFER_LEN];
        while let Some(len) = self.next_frame(&mut frame)? {
            self.receive(&frame[..len])?;
        }
        self.flush();
        Ok(())
    }

    /// A 20-byte IPv4 header from this host to `dst`.
    pub(super) fn ip_header(&mut self, h: &mut [u8], protocol: u8, total: usize, dst: Ip) {
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

    /// Handles one received frame (without its virtio header): answers ARP, ICMP echo and UDP
    /// echo itself, and returns a TCP segment to this host for the caller.
    pub(super) fn receive(&mut self, frame: &[u8]) -> Result<Option<TcpSegment>, &'static str> {
        if frame.len() < ETH_HLEN {
            return Ok(None);
        }
        match be16(frame, 12) {
            ETHERTYPE_ARP => self.receive_arp(frame).map(|()| None),
            ETHERTYPE_IPV4 => self.receive_ipv4(frame),
            _ => Ok(None),
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

    fn receive_ipv4(&mut self, f: &[u8]) -> Result<Option<TcpSegment>, &'static str> {
        let ip = &f[ETH_HLEN..];
        if ip.len() < 20 || ip[0] >> 4 != 4 {
            return Ok(None);
        }
        let ihl = usize::from(ip[0] & 15) * 4;
        let total = usize::from(be16(ip, 2));
        if ihl < 20 || total < ihl || total > ip.len() || fold(sum(&ip[..ihl], 0)) != 0 {
            return Ok(None);
        }
        // Fragments (more-fragments set, or an offset) are not reassembled.
        if be16(ip, 6) & 0x3fff != 0 || ip[16..20] != self.ip.0 {
            return Ok(None);
        }
        let src = Ip([ip[12], ip[13], ip[14], ip[15]]);
        let mut dst_mac = [0u8; 6];
        dst_mac.copy_from_slice(&f[6..12]);
        let payload = &ip[ihl..total];
        match ip[9] {
            IP_ICMP => self.receive_icmp(dst_mac, src, payload).map(|()| None),
            IP_UDP => self.receive_udp(dst_mac, src, payload).map(|()| None),
            IP_TCP => {
                let start = ETH_HLEN + ihl;
                Ok(Some(TcpSegment { src, start, end: ETH_HLEN + total }))
            }
            _ => Ok(None),
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
        self.udp(mac, src, ECHO_PORT, port, &udp[8..len])?;
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
    let mut host = Host::open(info, ip, peer)?;
    let start = io::rdtsc();
    let mut hello_sent = false;
    let mut frame = [0u8; BUFFER_LEN];
    while host.pings < count || !host.echoed {
        host.flush();
        let now = io::rdtsc();
        if now - start > DEADLINE {
            return Err(Failure::TimedOut {
                pings: host.pings,
                count,
                echoed: host.echoed,
                resolved: host.peer_mac.is_some(),
            });
        }
        host.resolve(now)?;
        if let (Some(mac), false) = (host.peer_mac, hello_sent) {
            host.hello(mac, 1)?;
            hello_sent = true;
            println!("net: udp sent to {peer}:{HELLO_PORT}");
        }
        match host.next_frame(&mut frame)? {
            Some(len) => {
                host.receive(&frame[..len])?;
            }
            None => core::hint::spin_loop(),
        }
    }
    host.flush();
    Ok(())
}
