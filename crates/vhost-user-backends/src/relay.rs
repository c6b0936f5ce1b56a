//! A relay between a frontend's connection and the vhost crate's request handler, for one
//! ordering the crate refuses.
//!
//! QEMU's virtio-net (7.2, Debian 12's) sends `VHOST_USER_SET_VRING_ENABLE` when the driver
//! sets its feature bits, well before it acks the virtio features to the backend
//! (`VHOST_USER_SET_FEATURES`, at DRIVER_OK), and needs `VHOST_USER_F_PROTOCOL_FEATURES`
//! offered to send it at all (without it, starting the device fails with EINVAL). The vhost
//! crate's handler treats a SET_VRING_ENABLE before PROTOCOL_FEATURES is acked as a protocol
//! error and drops the connection. The spec asks frontends to send it only once the feature is
//! negotiated, so QEMU is the one out of line (it even restores the rings' enable state just
//! before, not after, SET_FEATURES when it starts the device).
//!
//! So the daemon accepts the frontend itself and passes its messages on to the handler over a
//! private socket pair, file descriptors included (`SCM_RIGHTS`), with one change: a
//! SET_VRING_ENABLE that comes while the last SET_FEATURES (if any) lacked PROTOCOL_FEATURES
//! is answered here (when the frontend asked for a reply) and its vring's state remembered;
//! right after the SET_FEATURES that acks PROTOCOL_FEATURES, the remembered state of each
//! vring goes to the handler as SET_VRING_ENABLE messages of its own (no reply asked), so the
//! handler sees what the frontend meant, in an order it accepts. Replies go back unchanged. Only the control messages pass here; the rings, their eventfds and guest
//! memory are shared directly between frontend and backend.

use std::io::{self, Write};
use std::net::Shutdown;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// A vhost-user message header: request, flags, payload size (each le32).
const HEADER: usize = 12;
/// The largest payload passed on (the vhost crate's own limit is the same 4 KiB).
const MAX_PAYLOAD: usize = 4096;
/// The most descriptors one message may carry.
const MAX_FDS: usize = 32;
const SET_FEATURES: u32 = 2;
const SET_VRING_ENABLE: u32 = 18;
/// `VHOST_USER_F_PROTOCOL_FEATURES` in SET_FEATURES' payload.
const PROTOCOL_FEATURES: u64 = 1 << 30;
/// Header flags: protocol version 1, a reply, a reply wanted.
const VERSION_1: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

/// The two threads moving messages, stopped (both sockets shut down) when dropped.
pub struct Relay {
    frontend: UnixStream,
    backend: UnixStream,
    threads: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Relays between `frontend` (the accepted connection) and `backend` (connected to the
    /// handler's listener); `log` hears about held-back messages and broken frontends.
    pub fn start(frontend: UnixStream, backend: UnixStream, log: fn(&str)) -> io::Result<Relay> {
        let (f_in, b_out) = (frontend.try_clone()?, backend.try_clone()?);
        let (b_in, f_out) = (backend.try_clone()?, frontend.try_clone()?);
        let requests =
            std::thread::Builder::new().name("vhost-user-relay".into()).spawn(move || {
                if let Err(e) = pass_requests(&f_in, &b_out, log) {
                    if e.kind() != io::ErrorKind::UnexpectedEof {
                        log(&format!("frontend connection: {e}"));
                    }
                }
                shut(&f_in, &b_out);
            })?;
        let replies =
            std::thread::Builder::new().name("vhost-user-relay".into()).spawn(move || {
                let _ = pass_replies(&b_in, &f_out);
                shut(&b_in, &f_out);
            })?;
        Ok(Relay { frontend, backend, threads: vec![requests, replies] })
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        shut(&self.frontend, &self.backend);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn shut(a: &UnixStream, b: &UnixStream) {
    let _ = a.shutdown(Shutdown::Both);
    let _ = b.shutdown(Shutdown::Both);
}

/// Receives into `buf`, taking ownership of any descriptors that come with the bytes; Ok(0)
/// at the end of the stream.
fn receive(from: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let mut raw: [RawFd; MAX_FDS] = [-1; MAX_FDS];
    let mut iov = [libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() }];
    // SAFETY: the iovec covers `buf`, exclusively borrowed for the call, and the kernel writes
    // at most its length there; `raw` has room for MAX_FDS descriptors.
    let (n, count) = unsafe { from.recv_with_fds(&mut iov, &mut raw) }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    for fd in raw.iter().take(count) {
        // SAFETY: recvmsg just gave this process these descriptors; nothing else owns them.
        fds.push(unsafe { OwnedFd::from_raw_fd(*fd) });
    }
    Ok(n)
}

/// Fills `buf` from the stream (descriptors may come with any part of it).
fn receive_exact(from: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = buf.get_mut(done..).unwrap_or_default();
        match receive(from, rest, fds) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sends `bytes` with `fds` attached to the first part.
fn send(to: &UnixStream, bytes: &[u8], fds: &[OwnedFd]) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    if fds.is_empty() {
        return (&*to).write_all(bytes);
    }
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let sent =
        to.send_with_fds(&[bytes], &raw).map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    (&*to).write_all(bytes.get(sent..).unwrap_or_default())
}

fn le32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    if let Some(slice) = bytes.get(at..at + 4) {
        word.copy_from_slice(slice);
    }
    u32::from_le_bytes(word)
}

/// The most vrings whose early enable state is kept (virtio-net's 256 queue pairs, twice).
const MAX_VRINGS: u32 = 512;

/// A SET_VRING_ENABLE message for the handler (no reply wanted).
fn vring_enable(index: u32, enable: u32) -> Vec<u8> {
    let mut message = Vec::with_capacity(HEADER + 8);
    for word in [SET_VRING_ENABLE, VERSION_1, 8, index, enable] {
        message.extend_from_slice(&word.to_le_bytes());
    }
    message
}

/// Frontend to handler: whole messages; the early SET_VRING_ENABLEs are kept back and
/// passed on (the last state of each vring) right after the SET_FEATURES that acks
/// PROTOCOL_FEATURES.
fn pass_requests(from: &UnixStream, to: &UnixStream, log: fn(&str)) -> io::Result<()> {
    let mut protocol_features_acked = false;
    let mut early: std::collections::BTreeMap<u32, u32> = std::collections::BTreeMap::new();
    let mut message = vec![0u8; HEADER + MAX_PAYLOAD];
    loop {
        let mut fds = Vec::new();
        receive_exact(from, message.get_mut(..HEADER).unwrap_or_default(), &mut fds)?;
        let (request, flags) = (le32(&message, 0), le32(&message, 4));
        let size = usize::try_from(le32(&message, 8)).unwrap_or(usize::MAX);
        if size > MAX_PAYLOAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("request {request} carries {size} bytes, more than {MAX_PAYLOAD}"),
            ));
        }
        let whole = HEADER + size;
        receive_exact(from, message.get_mut(HEADER..whole).unwrap_or_default(), &mut fds)?;
        let body = message.get(HEADER..whole).unwrap_or_default();
        match request {
            SET_VRING_ENABLE if !protocol_features_acked && size == 8 => {
                let (index, enable) = (le32(body, 0), le32(body, 4));
                if index < MAX_VRINGS {
                    early.insert(index, enable);
                }
                if flags & FLAG_NEED_REPLY != 0 {
                    let mut reply = Vec::with_capacity(HEADER + 8);
                    for word in [SET_VRING_ENABLE, VERSION_1 | FLAG_REPLY, 8] {
                        reply.extend_from_slice(&word.to_le_bytes());
                    }
                    reply.extend_from_slice(&0u64.to_le_bytes());
                    (&*from).write_all(&reply)?;
                }
                continue;
            }
            SET_FEATURES if size >= 8 => {
                let mut value = [0u8; 8];
                value.copy_from_slice(body.get(..8).unwrap_or(&[0; 8]));
                protocol_features_acked = u64::from_le_bytes(value) & PROTOCOL_FEATURES != 0;
                send(to, message.get(..whole).unwrap_or_default(), &fds)?;
                if protocol_features_acked && !early.is_empty() {
                    log(&format!(
                        "passing on {} SET_VRING_ENABLE the frontend sent before it acked the \
                         features",
                        early.len()
                    ));
                    for (index, enable) in std::mem::take(&mut early) {
                        send(to, &vring_enable(index, enable), &[])?;
                    }
                }
                continue;
            }
            _ => {}
        }
        send(to, message.get(..whole).unwrap_or_default(), &fds)?;
    }
}

/// Handler to frontend: bytes and descriptors as they come.
fn pass_replies(from: &UnixStream, to: &UnixStream) -> io::Result<()> {
    let mut buf = vec![0u8; HEADER + MAX_PAYLOAD];
    loop {
        let mut fds = Vec::new();
        match receive(from, &mut buf, &mut fds) {
            Ok(0) => return Ok(()),
            Ok(n) => send(to, buf.get(..n).unwrap_or_default(), &fds)?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use vmm_sys_util::eventfd::EventFd;

    fn message(request: u32, flags: u32, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        for word in [request, flags, u32::try_from(body.len()).unwrap()] {
            m.extend_from_slice(&word.to_le_bytes());
        }
        m.extend_from_slice(body);
        m
    }

    fn read_message(from: &mut UnixStream) -> Vec<u8> {
        let mut header = [0u8; HEADER];
        from.read_exact(&mut header).unwrap();
        let mut body = vec![0u8; le32(&header, 8) as usize];
        from.read_exact(&mut body).unwrap();
        [header.to_vec(), body].concat()
    }

    #[test]
    fn early_vring_enables_are_held_back_and_the_rest_passes_with_descriptors() {
        let (frontend, relay_front) = UnixStream::pair().unwrap();
        let (relay_back, mut handler) = UnixStream::pair().unwrap();
        let relay = Relay::start(relay_front, relay_back, |_| {}).unwrap();
        let mut frontend_r = frontend.try_clone().unwrap();

        let enable = |index: u32, on: u32| {
            let mut body = index.to_le_bytes().to_vec();
            body.extend_from_slice(&on.to_le_bytes());
            body
        };
        // Kept back: before any SET_FEATURES; the one asking for a reply gets one from here.
        (&frontend).write_all(&message(SET_VRING_ENABLE, VERSION_1, &enable(0, 1))).unwrap();
        (&frontend)
            .write_all(&message(SET_VRING_ENABLE, VERSION_1 | FLAG_NEED_REPLY, &enable(1, 1)))
            .unwrap();
        let reply = read_message(&mut frontend_r);
        assert_eq!(reply, message(SET_VRING_ENABLE, VERSION_1 | FLAG_REPLY, &0u64.to_le_bytes()));
        // SET_FEATURES without PROTOCOL_FEATURES: passed on, the enables still kept back, and
        // the last state of each vring counts.
        let features = |v: u64| message(SET_FEATURES, VERSION_1, &v.to_le_bytes());
        (&frontend).write_all(&features(1 << 32)).unwrap();
        (&frontend).write_all(&message(SET_VRING_ENABLE, VERSION_1, &enable(1, 0))).unwrap();
        // With it: passed on, then the kept states, in vring order; later enables and the
        // kick eventfd that comes with SET_VRING_KICK (12) pass as they come.
        (&frontend).write_all(&features((1 << 32) | PROTOCOL_FEATURES)).unwrap();
        (&frontend).write_all(&message(SET_VRING_ENABLE, VERSION_1, &enable(1, 1))).unwrap();
        let kick = EventFd::new(0).unwrap();
        let set_kick = message(12, VERSION_1, &0u64.to_le_bytes());
        frontend.send_with_fds(&[&set_kick[..]], &[kick.as_raw_fd()]).unwrap();

        assert_eq!(read_message(&mut handler), features(1 << 32));
        assert_eq!(read_message(&mut handler), features((1 << 32) | PROTOCOL_FEATURES));
        assert_eq!(read_message(&mut handler), message(SET_VRING_ENABLE, VERSION_1, &enable(0, 1)));
        assert_eq!(read_message(&mut handler), message(SET_VRING_ENABLE, VERSION_1, &enable(1, 0)));
        assert_eq!(read_message(&mut handler), message(SET_VRING_ENABLE, VERSION_1, &enable(1, 1)));
        let mut got = vec![0u8; set_kick.len()];
        let mut fds = Vec::new();
        receive_exact(&handler, &mut got, &mut fds).unwrap();
        assert_eq!(got, set_kick);
        assert_eq!(fds.len(), 1, "the eventfd came through");
        let mut passed = std::fs::File::from(fds.pop().unwrap());
        passed.write_all(&5u64.to_le_bytes()).unwrap();
        assert_eq!(kick.read().unwrap(), 5, "it is the same eventfd");

        // Replies pass back unchanged.
        let answer = message(1, VERSION_1 | FLAG_REPLY, &7u64.to_le_bytes());
        handler.write_all(&answer).unwrap();
        assert_eq!(read_message(&mut frontend_r), answer);

        // An oversized message ends the relay: both sides see the end.
        (&frontend).write_all(&[3, 0, 0, 0, 1, 0, 0, 0, 0xff, 0xff, 0, 0]).unwrap();
        let mut byte = [0u8; 1];
        assert_eq!(handler.read(&mut byte).unwrap(), 0);
        drop(relay);
    }
}
