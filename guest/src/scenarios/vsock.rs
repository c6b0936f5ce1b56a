//! `vsock=<listen-port>,<host-port>`: stream sockets over the first virtio-vsock device
//! (`vanguard run --vsock cid=N,socket=PATH`), driven by polling: receive queue 0 keeps 8
//! buffers of 4 KiB posted, transmit queue 1 sends one packet at a time, the event queue is
//! not set up. (a) It listens on `<listen-port>`: accepts one connection from the host
//! (REQUEST answered with RESPONSE), reads a line and sends it back uppercased, then shuts the
//! connection down. (b) It connects to the host's `<host-port>`, sends
//! `hello from guest cid <cid>\n`, reads the reply line and prints it. Credit: it advertises
//! 64 KiB, sends CREDIT_UPDATE as it consumes bytes, and sends only within the host's credit
//! (asking with CREDIT_REQUEST when short). Other REQUESTs are answered with RST. It ends
//! when both are done, or fails after about 10 s (25·10^9 TSC cycles).

use crate::bootinfo::BootInfo;
use crate::io;
use crate::println;
use crate::virtio::Device;
use core::fmt;

const VIRTIO_ID_VSOCK: u32 = 19;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const HEADER_LEN: usize = 44;
const RX_BUFFERS: usize = 8;
const BUFFER_LEN: usize = 4096;
const HOST_CID: u64 = 2;
const TYPE_STREAM: u16 = 1;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
/// Both SHUTDOWN flags: no more receiving, no more sending.
const SHUTDOWN_BOTH: u32 = 3;
/// The receive buffer the guest advertises per connection.
const BUF_ALLOC: u32 = 64 * 1024;
/// The guest's own port for its connection to the host.
const OUT_PORT: u32 = 49152;
/// The longest line handled.
const MAX_LINE: usize = 256;
/// How long the scenario may take, in TSC cycles (about 10 s at 2.5 GHz).
const DEADLINE: u64 = 25_000_000_000;

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

/// `virtio_vsock_hdr`.
#[derive(Clone, Copy, Default)]
struct Header {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    kind: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl Header {
    fn decode(b: &[u8]) -> Header {
        Header {
            src_cid: u64::from(le32(b, 0)) | u64::from(le32(b, 4)) << 32,
            dst_cid: u64::from(le32(b, 8)) | u64::from(le32(b, 12)) << 32,
            src_port: le32(b, 16),
            dst_port: le32(b, 20),
            len: le32(b, 24),
            kind: u16::from_le_bytes([b[28], b[29]]),
            op: u16::from_le_bytes([b[30], b[31]]),
            flags: le32(b, 32),
            buf_alloc: le32(b, 36),
            fwd_cnt: le32(b, 40),
        }
    }

    fn encode(&self, b: &mut [u8]) {
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
    }
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

/// Where a connection is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not opened yet.
    Idle,
    /// REQUEST sent, no answer yet.
    Requested,
    /// Data flows.
    Open,
    /// Shut down by the guest after its work.
    Done,
}

/// One stream connection: ports, credit both ways, the line being read, bytes to send.
struct Conn {
    state: State,
    local: u32,
    peer: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    tx_cnt: u32,
    fwd_cnt: u32,
    credit_requested: bool,
    line: [u8; MAX_LINE],
    line_len: usize,
    out: [u8; MAX_LINE],
    out_len: usize,
}

impl Conn {
    const fn new(local: u32, peer: u32) -> Conn {
        Conn {
            state: State::Idle,
            local,
            peer,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            fwd_cnt: 0,
            credit_requested: false,
            line: [0; MAX_LINE],
            line_len: 0,
            out: [0; MAX_LINE],
            out_len: 0,
        }
    }

    fn credit(&self) -> u32 {
        self.peer_buf_alloc.saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    /// Takes a packet's credit fields.
    fn update(&mut self, h: &Header) {
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = h.fwd_cnt;
        self.credit_requested = false;
    }

    /// Adds received bytes to the line; returns the line's length once it ends with '\n'.
    fn take(&mut self, data: &[u8]) -> Result<Option<usize>, &'static str> {
        let end = self.line_len + data.len();
        let dst = self.line.get_mut(self.line_len..end).ok_or("a line longer than 256 bytes")?;
        dst.copy_from_slice(data);
        self.line_len = end;
        self.fwd_cnt = self.fwd_cnt.wrapping_add(data.len() as u32);
        Ok(self.line[..end].iter().position(|b| *b == b'\n').map(|i| i + 1))
    }
}

/// The guest's side of the device.
struct Vsock {
    dev: Device,
    cid: u64,
    /// Which receive buffer each head descriptor carries.
    slot_of: [u8; crate::virtio::MAX_QUEUE_SIZE as usize],
}

impl Vsock {
    /// Sends one packet for `conn` (its ports and credit) and waits until the device took it.
    fn send(&mut self, conn: &Conn, op: u16, flags: u32, data: &[u8]) -> Result<(), &'static str> {
        self.send_to(conn.local, conn.peer, conn.fwd_cnt, op, flags, data)
    }

    fn send_to(
        &mut self,
        local: u32,
        peer: u32,
        fwd_cnt: u32,
        op: u16,
        flags: u32,
        data: &[u8],
    ) -> Result<(), &'static str> {
        if HEADER_LEN + data.len() > BUFFER_LEN {
            return Err("packet too long");
        }
        let header = Header {
            src_cid: self.cid,
            dst_cid: HOST_CID,
            src_port: local,
            dst_port: peer,
            len: data.len() as u32,
            kind: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt,
        };
        // SAFETY: the transmit buffer is not with the device (one packet at a time, and
        // `submit_to` waits until the device used it).
        let tx = unsafe { &mut *core::ptr::addr_of_mut!(BUFFERS.tx) };
        header.encode(&mut tx[..HEADER_LEN]);
        tx[HEADER_LEN..HEADER_LEN + data.len()].copy_from_slice(data);
        self.dev.submit_to(TX_QUEUE, &[(tx_buffer(), (HEADER_LEN + data.len()) as u32, false)])?;
        Ok(())
    }

    /// Sends `conn`'s pending bytes if the host's credit allows; asks for credit otherwise.
    /// Returns how many bytes went.
    fn flush(&mut self, conn: &mut Conn) -> Result<usize, &'static str> {
        let len = conn.out_len;
        if len == 0 || conn.state != State::Open {
            return Ok(0);
        }
        if (conn.credit() as usize) < len {
            if !conn.credit_requested {
                self.send(conn, OP_CREDIT_REQUEST, 0, &[])?;
                conn.credit_requested = true;
            }
            return Ok(0);
        }
        let out = conn.out;
        self.send(conn, OP_RW, 0, &out[..len])?;
        conn.tx_cnt = conn.tx_cnt.wrapping_add(len as u32);
        conn.out_len = 0;
        Ok(len)
    }

    /// Makes receive buffer `slot` available again.
    fn post_rx(&mut self, slot: usize) -> Result<(), &'static str> {
        let head = self.dev.post_to(RX_QUEUE, &[(rx_buffer(slot), BUFFER_LEN as u32, true)])?;
        self.slot_of[usize::from(head)] = slot as u8;
        Ok(())
    }
}

/// Runs the scenario.
pub fn run(info: &BootInfo, arg: Option<&str>) -> bool {
    let mut parts = arg.unwrap_or("").split(',');
    let listen = parts.next().and_then(|p| p.parse::<u32>().ok());
    let host = parts.next().and_then(|p| p.parse::<u32>().ok());
    let (Some(listen), Some(host), None) = (listen, host, parts.next()) else {
        return super::bad("vsock", arg);
    };
    match serve(info, listen, host) {
        Ok(()) => {
            println!("vsock: done");
            true
        }
        Err(reason) => {
            println!("vsock: FAILED: {reason}");
            false
        }
    }
}

fn serve(info: &BootInfo, listen: u32, host_port: u32) -> Result<(), &'static str> {
    let found = Device::find_nth(info, VIRTIO_ID_VSOCK, 0)?;
    let dev = Device::open_with(&found, 2, 0)?;
    let cid = u64::from(dev.config32(0)) | u64::from(dev.config32(4)) << 32;
    println!("vsock: up, cid {cid}, virtio-vsock at {:#x}", dev.base());
    let mut vs = Vsock { dev, cid, slot_of: [0; crate::virtio::MAX_QUEUE_SIZE as usize] };
    for slot in 0..RX_BUFFERS {
        vs.post_rx(slot)?;
    }
    vs.dev.notify_queue(RX_QUEUE);
    let mut accepted = Conn::new(listen, 0);
    let mut out = Conn::new(OUT_PORT, host_port);
    let start = io::rdtsc();
    let mut packet = [0u8; BUFFER_LEN];
    loop {
        if accepted.state == State::Done && out.state == State::Done {
            return Ok(());
        }
        if io::rdtsc() - start > DEADLINE {
            return Err(match (accepted.state, out.state) {
                (State::Done, _) => "timed out waiting for the host's reply",
                (_, State::Done) => "timed out waiting for the host's connection or line",
                _ => "timed out",
            });
        }
        if out.state == State::Idle {
            vs.send(&out, OP_REQUEST, 0, &[])?;
            out.state = State::Requested;
        }
        let echoed = vs.flush(&mut accepted)?;
        if echoed > 0 {
            println!("vsock: echoed {echoed} bytes");
            vs.send(&accepted, OP_SHUTDOWN, SHUTDOWN_BOTH, &[])?;
            accepted.state = State::Done;
        }
        vs.flush(&mut out)?;
        let Some((head, len)) = vs.dev.poll_queue(RX_QUEUE)? else {
            core::hint::spin_loop();
            continue;
        };
        let slot = usize::from(vs.slot_of[usize::from(head)]);
        let len = (len as usize).min(BUFFER_LEN);
        // SAFETY: the device used the buffer and no longer writes it until it is posted again.
        unsafe {
            let src = core::ptr::addr_of!(BUFFERS.rx[slot]) as *const u8;
            core::ptr::copy_nonoverlapping(src, packet.as_mut_ptr(), len);
        }
        vs.post_rx(slot)?;
        vs.dev.notify_queue(RX_QUEUE);
        if len < HEADER_LEN {
            continue;
        }
        let h = Header::decode(&packet[..HEADER_LEN]);
        let data_len = (h.len as usize).min(len - HEADER_LEN);
        let data = &packet[HEADER_LEN..HEADER_LEN + data_len];
        if h.src_cid != HOST_CID || h.dst_cid != cid || h.kind != TYPE_STREAM {
            continue;
        }
        if h.dst_port == listen && h.op == OP_REQUEST {
            if accepted.state == State::Idle {
                accepted.peer = h.src_port;
                accepted.update(&h);
                vs.send(&accepted, OP_RESPONSE, 0, &[])?;
                accepted.state = State::Open;
                println!("vsock: accepted {listen} from host port {}", h.src_port);
            } else {
                vs.send_to(listen, h.src_port, 0, OP_RST, 0, &[])?;
            }
            continue;
        }
        let conn = if h.dst_port == listen && h.src_port == accepted.peer {
            &mut accepted
        } else if h.dst_port == OUT_PORT && h.src_port == host_port {
            &mut out
        } else {
            // Nobody listens there.
            if h.op == OP_REQUEST {
                vs.send_to(h.dst_port, h.src_port, 0, OP_RST, 0, &[])?;
            }
            continue;
        };
        if conn.state == State::Done || conn.state == State::Idle {
            continue;
        }
        conn.update(&h);
        match h.op {
            OP_RESPONSE if conn.state == State::Requested => {
                conn.state = State::Open;
                println!("vsock: connected to host port {host_port}");
                let mut text = Cursor { buf: &mut conn.out, len: 0 };
                fmt::Write::write_fmt(&mut text, format_args!("hello from guest cid {cid}\n"))
                    .map_err(|_| "hello too long")?;
                conn.out_len = text.len;
            }
            OP_RST => {
                return Err(if conn.state == State::Requested {
                    "the host refused the connection (RST)"
                } else {
                    "the host reset the connection"
                });
            }
            OP_RW if conn.state == State::Open => {
                let line = conn.take(data)?;
                vs.send(conn, OP_CREDIT_UPDATE, 0, &[])?;
                let Some(n) = line else { continue };
                if h.dst_port == listen {
                    let mut upper = conn.line;
                    upper[..n].make_ascii_uppercase();
                    conn.out[..n].copy_from_slice(&upper[..n]);
                    conn.out_len = n;
                } else {
                    let text = core::str::from_utf8(&conn.line[..n - 1]).unwrap_or("<not UTF-8>");
                    println!("vsock: host said {text}");
                    vs.send(conn, OP_SHUTDOWN, SHUTDOWN_BOTH, &[])?;
                    conn.state = State::Done;
                }
            }
            OP_CREDIT_REQUEST => vs.send(conn, OP_CREDIT_UPDATE, 0, &[])?,
            OP_SHUTDOWN if conn.line_len == 0 => return Err("the host shut down before a line"),
            _ => {}
        }
    }
}
