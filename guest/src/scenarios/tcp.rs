//! `tcp=<guest-ip>,<host-ip>,<port>,send:<bytes>|recv`: one TCP connection from the guest to
//! `<host-ip>:<port>` over the first virtio-net device, on the small IPv4 host of `net.rs`,
//! with a checksum checked at both ends.
//!
//! - `send:<bytes>`: the guest sends `<bytes>` bytes of a pattern (each 8-byte word at offset
//!   `8·w` is a mix of `w`, see `pattern`), then FIN; the host answers with the MD5 of what it
//!   received, as 32 hex digits, and FIN. The guest compares it with the MD5 of what it sent.
//! - `recv`: the host sends any bytes, then FIN; the guest answers with their MD5 (32 hex
//!   digits) and FIN, and the host compares.
//!
//! The TCP is minimal but real: SYN with an MSS option, sequence numbers relative to the
//! initial ones, a send window of the peer's advertised window (at most 64 KiB, no window
//! scaling), go-back-N retransmission from the first unacknowledged byte after three duplicate
//! ACKs or a silent ~100 ms, in-order receive only (a segment past a gap is answered with a
//! duplicate ACK), an ACK after each batch of received frames, TCP checksums computed and
//! checked. No congestion control beyond the window: the peer is the host, one TAP away.

use super::net::{
    be16, fold, put16, sum, Host, Ip, TcpSegment, BUFFER_LEN, ETHERTYPE_IPV4, ETH_HLEN, IP_TCP,
};
use crate::bootinfo::BootInfo;
use crate::io;
use crate::md5::Md5;
use crate::println;

/// Payload bytes per segment: a 1500-byte IP packet less 40 bytes of headers.
const MSS: usize = 1460;
/// The most bytes in flight, whatever the peer's window.
const MAX_IN_FLIGHT: u64 = 64 * 1024;
/// The window the guest advertises (it consumes in-order data as it arrives).
const RECEIVE_WINDOW: u16 = 65_535;
/// TSC cycles without progress before unacknowledged data is sent again (~100 ms at
/// 2.5 GHz), and before the whole scenario gives up (~4 min).
const RTO: u64 = 250_000_000;
const DEADLINE: u64 = 600_000_000_000;
/// Frames handled per pass before the guest sends what the window allows.
const RX_BURST: usize = 32;

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;

/// Byte `offset` of the `send` pattern: byte `offset % 8` (little-endian) of a mix of the
/// 8-byte word index, so that a misplaced or repeated segment changes the MD5.
fn pattern(offset: u64) -> u8 {
    let mut v = (offset / 8 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    v ^= v >> 29;
    v.to_le_bytes()[(offset % 8) as usize]
}

/// What the guest sends.
enum Outgoing {
    /// `send`: this many bytes of `pattern`.
    Pattern(u64),
    /// `recv`: nothing until the peer's FIN, then the MD5 of what came (32 hex digits).
    Digest(Option<[u8; 32]>),
}

impl Outgoing {
    /// The stream's length, once it is known.
    fn len(&self) -> Option<u64> {
        match self {
            Outgoing::Pattern(n) => Some(*n),
            Outgoing::Digest(d) => d.map(|d| d.len() as u64),
        }
    }

    fn fill(&self, offset: u64, out: &mut [u8]) {
        match self {
            Outgoing::Pattern(_) => {
                for (i, b) in out.iter_mut().enumerate() {
                    *b = pattern(offset + i as u64);
                }
            }
            Outgoing::Digest(d) => {
                let d = d.as_ref().map_or(&[][..], |d| &d[..]);
                out.copy_from_slice(&d[offset as usize..offset as usize + out.len()]);
            }
        }
    }
}

/// One connection's state. Offsets count from the initial sequence numbers: the SYN is offset
/// 0 each way, data starts at 1, a FIN takes the offset after the data.
struct Conn {
    peer: Ip,
    /// The guest's port and initial send sequence number, both taken from the TSC so that
    /// connections one after another do not look alike to the host.
    local_port: u16,
    iss: u32,
    remote_port: u16,
    out: Outgoing,
    /// The first unacknowledged offset, the next to send, the highest sent.
    snd_una: u64,
    snd_nxt: u64,
    snd_max: u64,
    snd_wnd: u64,
    dup_acks: u32,
    /// When the last new acknowledgement came (or the last retransmission).
    last_progress: u64,
    /// The peer's initial sequence number, once the SYN-ACK came, and the next offset wanted.
    irs: Option<u32>,
    rcv_nxt: u64,
    peer_fin: bool,
    ack_due: bool,
    /// What came: its MD5, its length, and the first 32 bytes (the digest, in `send` mode).
    received: Md5,
    received_len: u64,
    head: [u8; 32],
    /// The MD5 of the pattern, as far as it was first sent.
    sent: Md5,
    hashed: u64,
    retransmits: u64,
}

/// Runs the scenario.
pub fn run(info: &BootInfo, arg: Option<&str>) -> bool {
    let mut parts = arg.unwrap_or("").split(',');
    let ip = parts.next().and_then(Ip::parse);
    let peer = parts.next().and_then(Ip::parse);
    let port = parts.next().and_then(|p| p.parse::<u16>().ok()).filter(|p| *p != 0);
    let out = match parts.next() {
        Some("recv") => Some(Outgoing::Digest(None)),
        Some(mode) => mode
            .strip_prefix("send:")
            .and_then(|n| n.parse::<u64>().ok())
            .filter(|n| *n < 1 << 31)
            .map(Outgoing::Pattern),
        None => None,
    };
    let (Some(ip), Some(peer), Some(port), Some(out), None) = (ip, peer, port, out, parts.next())
    else {
        return super::bad("tcp", arg);
    };
    match connect(info, ip, peer, port, out) {
        Ok(()) => true,
        Err(why) => {
            println!("tcp: FAILED: {why}");
            false
        }
    }
}

fn connect(
    info: &BootInfo,
    ip: Ip,
    peer: Ip,
    port: u16,
    out: Outgoing,
) -> Result<(), &'static str> {
    let sending = matches!(out, Outgoing::Pattern(_));
    let mut host = Host::open(info, ip, peer)?;
    let start = io::rdtsc();
    let mut frame = [0u8; BUFFER_LEN];
    let mut conn = Conn {
        peer,
        local_port: 40_000 + (start % 20_000) as u16,
        iss: (start >> 4) as u32,
        remote_port: port,
        out,
        snd_una: 0,
        snd_nxt: 0,
        snd_max: 0,
        snd_wnd: 1,
        dup_acks: 0,
        last_progress: start,
        irs: None,
        rcv_nxt: 0,
        peer_fin: false,
        ack_due: false,
        received: Md5::new(),
        received_len: 0,
        head: [0; 32],
        sent: Md5::new(),
        hashed: 0,
        retransmits: 0,
    };
    let mut connected_at = 0;
    loop {
        let now = io::rdtsc();
        if now - start > DEADLINE {
            return Err("timed out");
        }
        host.resolve(now)?;
        let Some(mac) = host.peer_mac else {
            if let Some(len) = host.next_frame(&mut frame)? {
                host.receive(&frame[..len])?;
            }
            continue;
        };
        for _ in 0..RX_BURST {
            let Some(len) = host.next_frame(&mut frame)? else { break };
            if let Some(seg) = host.receive(&frame[..len])? {
                let was_connected = conn.irs.is_some();
                conn.segment(&frame, &seg, now)?;
                if !was_connected && conn.irs.is_some() {
                    connected_at = io::rdtsc();
                    println!("tcp: connected to {peer}:{port} from {ip}:{}", conn.local_port);
                }
            }
        }
        if conn.peer_fin {
            if let Outgoing::Digest(digest @ None) = &mut conn.out {
                *digest = Some(conn.received.clone().hex());
            }
        }
        if conn.irs.is_none() {
            // SYN, and again after each RTO without an answer.
            if conn.snd_max == 0 || now - conn.last_progress > RTO {
                conn.send_segment(&mut host, mac, 0, SYN, 0)?;
                conn.snd_nxt = 1;
                conn.snd_max = 1;
                conn.last_progress = now;
            }
        } else {
            if conn.snd_una < conn.snd_max && now - conn.last_progress > RTO {
                conn.snd_nxt = conn.snd_una;
                conn.last_progress = now;
                conn.retransmits += 1;
            }
            conn.transmit(&mut host, mac)?;
            if conn.ack_due {
                conn.send_segment(&mut host, mac, conn.snd_nxt, ACK, 0)?;
            }
        }
        host.flush();
        if conn.finished() {
            break;
        }
    }
    let cycles = io::rdtsc() - connected_at;
    if sending {
        let sent = conn.sent.hex();
        let len = conn.out.len().unwrap_or(0);
        println!(
            "tcp: sent {len} bytes, md5 {}, in {cycles} TSC cycles, {} retransmissions",
            core::str::from_utf8(&sent).unwrap_or("?"),
            conn.retransmits
        );
        if conn.received_len != 32 || conn.head != sent {
            println!(
                "tcp: the host's md5 is {}",
                core::str::from_utf8(&conn.head[..conn.received_len.min(32) as usize])
                    .unwrap_or("not text")
            );
            return Err("the host's md5 differs from the guest's");
        }
        println!("tcp: the host's md5 matches: ok");
    } else {
        let digest = conn.received.hex();
        println!(
            "tcp: received {} bytes, md5 {}, in {cycles} TSC cycles",
            conn.received_len,
            core::str::from_utf8(&digest).unwrap_or("?")
        );
        println!("tcp: md5 sent to the host: ok");
    }
    Ok(())
}

impl Conn {
    /// Both FINs are through: ours acknowledged, the peer's received (and acknowledged).
    fn finished(&self) -> bool {
        let Some(len) = self.out.len() else { return false };
        self.peer_fin && !self.ack_due && self.snd_una == len + 2
    }

    /// Handles a TCP segment `Host::receive` found in `frame`.
    fn segment(&mut self, frame: &[u8], seg: &TcpSegment, now: u64) -> Result<(), &'static str> {
        let tcp = &frame[seg.start..seg.end];
        if tcp.len() < 20 || seg.src != self.peer {
            return Ok(());
        }
        if be16(tcp, 0) != self.remote_port || be16(tcp, 2) != self.local_port {
            return Ok(());
        }
        let dst = [
            frame[ETH_HLEN + 16],
            frame[ETH_HLEN + 17],
            frame[ETH_HLEN + 18],
            frame[ETH_HLEN + 19],
        ];
        if fold(pseudo_sum(seg.src, Ip(dst), tcp)) != 0 {
            return Ok(()); // a corrupt segment is dropped; the peer sends it again
        }
        let header = usize::from(tcp[12] >> 4) * 4;
        if header < 20 || header > tcp.len() {
            return Ok(());
        }
        let flags = tcp[13];
        let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
        let ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
        let window = u64::from(be16(tcp, 14));
        let payload = &tcp[header..];
        if flags & RST != 0 {
            return Err("the host reset the connection");
        }
        let irs = match self.irs {
            Some(irs) => irs,
            None => {
                // Only a SYN-ACK for our SYN opens the connection.
                if flags & (SYN | ACK) != SYN | ACK || ack != self.iss.wrapping_add(1) {
                    return Ok(());
                }
                self.irs = Some(seq);
                self.rcv_nxt = 1;
                self.snd_una = 1;
                self.snd_wnd = window;
                self.last_progress = now;
                self.ack_due = true;
                return Ok(());
            }
        };
        if flags & ACK != 0 {
            let acked = u64::from(ack.wrapping_sub(self.iss));
            if acked > self.snd_una && acked <= self.snd_max {
                self.snd_una = acked;
                self.dup_acks = 0;
                self.last_progress = now;
                if self.snd_nxt < self.snd_una {
                    self.snd_nxt = self.snd_una;
                }
            } else if acked == self.snd_una
                && window == self.snd_wnd
                && self.snd_una < self.snd_max
                && payload.is_empty()
                && flags & (SYN | FIN) == 0
            {
                self.dup_acks += 1;
                if self.dup_acks == 3 {
                    self.snd_nxt = self.snd_una;
                    self.retransmits += 1;
                }
            }
            self.snd_wnd = window;
        }
        // A retransmitted SYN-ACK (our ACK was lost) or anything else: answer with an ACK.
        let offset = u64::from(seq.wrapping_sub(irs));
        let fin = flags & FIN != 0;
        if payload.is_empty() && !fin && flags & SYN == 0 {
            return Ok(());
        }
        self.ack_due = true;
        if self.peer_fin || offset > self.rcv_nxt || flags & SYN != 0 {
            return Ok(()); // past a gap (a duplicate ACK asks again), or a repeat
        }
        let end = offset + payload.len() as u64;
        if end >= self.rcv_nxt {
            let new = &payload[(self.rcv_nxt - offset) as usize..];
            self.received.update(new);
            let at = self.received_len.min(32) as usize;
            let take = new.len().min(32 - at);
            self.head[at..at + take].copy_from_slice(&new[..take]);
            self.received_len += new.len() as u64;
            self.rcv_nxt = end;
            if fin {
                self.peer_fin = true;
                self.rcv_nxt += 1;
            }
        }
        Ok(())
    }

    /// Sends what the window allows: data from `snd_nxt`, then the FIN once all data is out.
    fn transmit(&mut self, host: &mut Host, mac: [u8; 6]) -> Result<(), &'static str> {
        let Some(len) = self.out.len() else { return Ok(()) };
        let window = self.snd_wnd.min(MAX_IN_FLIGHT);
        let fin_offset = len + 1;
        while self.snd_nxt <= fin_offset {
            let in_flight = self.snd_nxt - self.snd_una;
            if self.snd_nxt < fin_offset {
                let size = (fin_offset - self.snd_nxt).min(MSS as u64);
                if in_flight + size > window {
                    break;
                }
                let at = self.snd_nxt;
                self.send_segment(host, mac, at, ACK | PSH, size as usize)?;
                self.snd_nxt += size;
            } else {
                self.send_segment(host, mac, fin_offset, ACK | FIN, 0)?;
                self.snd_nxt = fin_offset + 1;
            }
            if self.snd_nxt > self.snd_max {
                if self.snd_max == self.snd_una {
                    self.last_progress = io::rdtsc();
                }
                self.snd_max = self.snd_nxt;
            }
        }
        Ok(())
    }

    /// Sends one segment at send offset `at` with `flags` and `size` bytes of the stream.
    fn send_segment(
        &mut self,
        host: &mut Host,
        mac: [u8; 6],
        at: u64,
        flags: u8,
        size: usize,
    ) -> Result<(), &'static str> {
        let syn = flags & SYN != 0;
        let header = if syn { 24 } else { 20 };
        let mut f = [0u8; ETH_HLEN + 20 + 24 + MSS];
        let ip_start = ETH_HLEN;
        let tcp_start = ip_start + 20;
        let total = 20 + header + size;
        host.ethernet(&mut f, mac, ETHERTYPE_IPV4);
        let (src, dst) = (host.ip, host.peer);
        host.ip_header(&mut f[ip_start..tcp_start], IP_TCP, total, dst);
        let tcp = &mut f[tcp_start..tcp_start + header + size];
        put16(tcp, 0, self.local_port);
        put16(tcp, 2, self.remote_port);
        tcp[4..8].copy_from_slice(&self.iss.wrapping_add(at as u32).to_be_bytes());
        let ack = self.irs.map_or(0, |irs| irs.wrapping_add(self.rcv_nxt as u32));
        tcp[8..12].copy_from_slice(&ack.to_be_bytes());
        tcp[12] = ((header / 4) as u8) << 4;
        tcp[13] = if self.irs.is_some() { flags | ACK } else { flags };
        put16(tcp, 14, RECEIVE_WINDOW);
        if syn {
            tcp[20..24].copy_from_slice(&[2, 4, (MSS >> 8) as u8, MSS as u8]);
        }
        if size > 0 {
            // Data offset `at` is stream byte `at - 1` (the SYN took offset 0).
            self.out.fill(at - 1, &mut tcp[header..header + size]);
            // The MD5 covers each byte once, in order, the first time it goes out.
            let first = at - 1;
            if matches!(self.out, Outgoing::Pattern(_))
                && first <= self.hashed
                && self.hashed < first + size as u64
            {
                let skip = (self.hashed - first) as usize;
                self.sent.update(&tcp[header + skip..header + size]);
                self.hashed = first + size as u64;
            }
        }
        let c = fold(pseudo_sum(src, dst, tcp));
        put16(tcp, 16, c);
        host.send(&f[..ETH_HLEN + total])?;
        self.ack_due = false;
        Ok(())
    }
}

/// The ones'-complement sum of the TCP pseudo-header and `tcp` (header and payload).
fn pseudo_sum(src: Ip, dst: Ip, tcp: &[u8]) -> u64 {
    let mut acc = sum(&src.0, 0);
    acc = sum(&dst.0, acc);
    acc += u64::from(IP_TCP) + tcp.len() as u64;
    sum(tcp, acc)
}
