//! virtio-blk (device ID 2) on a raw image file: read, write, flush, get-id, discard and
//! write-zeroes; read-only disks refuse every write with an I/O error and never open the file
//! for writing. Requests move through a fixed-size bounce buffer, so a guest's lengths never
//! size an allocation, and every sector range is checked against the disk's end.
//!
//! Requests are served on the device's worker thread (see `mmio`), off the vCPU threads.

use crate::{DeviceError, VirtioDevice, VIRTIO_F_VERSION_1};
use rate_limiter::{RateLimiter, RateLimiterConfig, TokenType};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

/// The virtio device ID of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Queue size offered.
pub const QUEUE_SIZE: u16 = 256;
/// Bytes per sector in the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;

const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;

const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const VIRTIO_BLK_T_GET_ID: u32 = 8;
const VIRTIO_BLK_T_DISCARD: u32 = 11;
const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

const VIRTIO_BLK_S_OK: u8 = 0;
const VIRTIO_BLK_S_IOERR: u8 = 1;
const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Length of the device ID returned by GET_ID.
pub const ID_BYTES: usize = 20;
/// Bounce buffer size: the most bytes moved per read/write system call.
const CHUNK: usize = 128 * 1024;
/// Segments per request advertised (and most discard/write-zeroes ranges accepted).
const SEG_MAX: u32 = 128;
/// Largest discard/write-zeroes range, in sectors (1 GiB).
const MAX_ZERO_SECTORS: u32 = 1 << 21;

/// A bounce buffer for moving `len` bytes: at most `CHUNK`, never sized by the guest alone.
fn bounce_buffer(len: u64) -> Vec<u8> {
    vec![0u8; CHUNK.min(usize::try_from(len).unwrap_or(CHUNK))]
}

/// Calls `step(done, n)` for consecutive pieces of at most `chunk` bytes covering `len`.
fn in_chunks(
    len: u64,
    chunk: usize,
    mut step: impl FnMut(u64, usize) -> Result<(), RequestError>,
) -> Result<(), RequestError> {
    let mut done = 0u64;
    while done < len {
        let n = usize::try_from((len - done).min(chunk as u64)).unwrap_or(chunk);
        step(done, n)?;
        done += n as u64;
    }
    Ok(())
}

/// Errors opening a disk.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image cannot be opened.
    #[error("cannot open disk image {path}")]
    Open {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The rate limit cannot be set up.
    #[error("invalid disk rate limit: {0}")]
    RateLimit(String),
    /// The serial is longer than the 20 bytes GET_ID returns.
    #[error("disk serial '{0}' is longer than 20 bytes")]
    SerialTooLong(String),
}

/// A virtio-blk device.
pub struct Block {
    limiter: Option<RateLimiter>,
    file: File,
    capacity_sectors: u64,
    read_only: bool,
    id: [u8; ID_BYTES],
    config: [u8; 60],
}

/// What went wrong with one request; becomes its status byte.
enum RequestError {
    Io,
    Unsupported,
}

impl Block {
    /// Opens `path` (read-only if `read_only`) as a disk whose GET_ID answers `serial`.
    pub fn open(path: &Path, read_only: bool, serial: &str) -> Result<Block, BlockError> {
        if serial.len() > ID_BYTES {
            return Err(BlockError::SerialTooLong(serial.to_string()));
        }
        let open_err = |source| BlockError::Open { path: path.to_path_buf(), source };
        let file = OpenOptions::new().read(true).write(!read_only).open(path).map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        if meta.is_dir() {
            return Err(open_err(std::io::Error::other("is a directory")));
        }
        let capacity_sectors = meta.len() / SECTOR_SIZE;
        let mut id = [0u8; ID_BYTES];
        id[..serial.len()].copy_from_slice(serial.as_bytes());
        let mut config = [0u8; 60];
        config[0..8].copy_from_slice(&capacity_sectors.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        config[20..24].copy_from_slice(&512u32.to_le_bytes()); // blk_size: SECTOR_SIZE
        config[34..36].copy_from_slice(&1u16.to_le_bytes()); // num_queues
        config[36..40].copy_from_slice(&MAX_ZERO_SECTORS.to_le_bytes()); // max_discard_sectors
        config[40..44].copy_from_slice(&SEG_MAX.to_le_bytes()); // max_discard_seg
        config[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
        config[48..52].copy_from_slice(&MAX_ZERO_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        config[52..56].copy_from_slice(&SEG_MAX.to_le_bytes()); // max_write_zeroes_seg
        config[56] = 1; // write_zeroes_may_unmap
        Ok(Block { limiter: None, file, capacity_sectors, read_only, id, config })
    }

    /// Limits the disk's bandwidth and operations (each request counts as one operation and
    /// its buffers' total length in bytes).
    pub fn with_rate_limit(mut self, config: &RateLimiterConfig) -> Result<Block, BlockError> {
        self.limiter =
            Some(RateLimiter::new(config).map_err(|e| BlockError::RateLimit(e.to_string()))?);
        Ok(self)
    }

    /// The disk's size in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// Checks that `len` bytes from `sector` lie on the disk; returns the byte offset.
    fn range(&self, sector: u64, len: u64) -> Result<u64, RequestError> {
        let start = sector.checked_mul(SECTOR_SIZE).ok_or(RequestError::Io)?;
        let end = start.checked_add(len).ok_or(RequestError::Io)?;
        if end > self.capacity_sectors * SECTOR_SIZE {
            return Err(RequestError::Io);
        }
        Ok(start)
    }

    fn read_into<W: Write>(&self, offset: u64, len: u64, out: &mut W) -> Result<(), RequestError> {
        let mut buf = bounce_buffer(len);
        in_chunks(len, buf.len(), |done, n| {
            self.file.read_exact_at(&mut buf[..n], offset + done).map_err(|_| RequestError::Io)?;
            out.write_all(&buf[..n]).map_err(|_| RequestError::Io)
        })
    }

    fn write_from<R: Read>(
        &self,
        offset: u64,
        len: u64,
        input: &mut R,
    ) -> Result<(), RequestError> {
        let mut buf = bounce_buffer(len);
        in_chunks(len, buf.len(), |done, n| {
            input.read_exact(&mut buf[..n]).map_err(|_| RequestError::Io)?;
            self.file.write_all_at(&buf[..n], offset + done).map_err(|_| RequestError::Io)
        })
    }

    /// Zeroes (and, where the file system can, deallocates) a byte range.
    fn zero(&self, offset: u64, len: u64) -> Result<(), RequestError> {
        let (Ok(off), Ok(length)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(RequestError::Io);
        };
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate on our own file descriptor with a checked range; no memory is
        // passed.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, length) };
        if rc == 0 {
            return Ok(());
        }
        // File systems without hole punching: write zeros.
        let zeros = bounce_buffer(len);
        in_chunks(len, zeros.len(), |done, n| {
            self.file.write_all_at(&zeros[..n], offset + done).map_err(|_| RequestError::Io)
        })
    }

    /// Serves one request of `kind` at `sector`: `readable` bytes of payload follow the
    /// header in `reader`, `writable` bytes of data buffer precede the status in `writer`.
    fn serve<R: Read, W: Write>(
        &mut self,
        kind: u32,
        sector: u64,
        reader: &mut R,
        readable: u64,
        writer: &mut W,
        writable: u64,
    ) -> Result<(), RequestError> {
        match kind {
            VIRTIO_BLK_T_IN => {
                let offset = self.range(sector, writable)?;
                self.read_into(offset, writable, writer)
            }
            VIRTIO_BLK_T_OUT if self.read_only => Err(RequestError::Io),
            VIRTIO_BLK_T_OUT => {
                let offset = self.range(sector, readable)?;
                self.write_from(offset, readable, reader)
            }
            VIRTIO_BLK_T_FLUSH if self.read_only => Ok(()),
            VIRTIO_BLK_T_FLUSH => self.file.sync_all().map_err(|_| RequestError::Io),
            VIRTIO_BLK_T_GET_ID => {
                let n = usize::try_from(writable.min(ID_BYTES as u64)).unwrap_or(ID_BYTES);
                writer.write_all(&self.id[..n]).map_err(|_| RequestError::Io)
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES if self.read_only => {
                Err(RequestError::Io)
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => self.zero_ranges(reader, readable),
            _ => Err(RequestError::Unsupported),
        }
    }

    /// DISCARD and WRITE_ZEROES payloads: {sector u64, num_sectors u32, flags u32} each.
    fn zero_ranges<R: Read>(&self, reader: &mut R, readable: u64) -> Result<(), RequestError> {
        if !readable.is_multiple_of(16) || readable / 16 > u64::from(SEG_MAX) || readable == 0 {
            return Err(RequestError::Io);
        }
        for _ in 0..readable / 16 {
            let mut seg = [0u8; 16];
            reader.read_exact(&mut seg).map_err(|_| RequestError::Io)?;
            let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or([0; 8]));
            let count = u32::from_le_bytes(seg[8..12].try_into().unwrap_or([0; 4]));
            let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or([0; 4]));
            if count > MAX_ZERO_SECTORS || flags & !1 != 0 {
                return Err(RequestError::Unsupported);
            }
            let len = u64::from(count) * SECTOR_SIZE;
            let offset = self.range(sector, len)?;
            self.zero(offset, len)?;
        }
        Ok(())
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f =
            VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH;
        if self.read_only {
            f |= VIRTIO_BLK_F_RO;
        } else {
            f |= VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }

    fn timer_fd(&self) -> Option<std::os::fd::RawFd> {
        self.limiter.as_ref().map(|l| l.as_raw_fd())
    }

    fn timer_fired(&mut self) {
        if let Some(limiter) = &mut self.limiter {
            // Ok(false) is a spurious wake-up; errors leave the limiter to unblock on its
            // deadline at the next request.
            let _ = limiter.event_handler();
        }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Ok(start) = usize::try_from(offset) else { return };
        if let Some(src) = self.config.get(start..) {
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
    }

    fn process_queue(
        &mut self,
        mem: &GuestMemoryMmap,
        index: u16,
        queue: &mut Queue,
    ) -> Result<bool, DeviceError> {
        crate::drain_queue(mem, index, queue, |chain| {
            if let Some(limiter) = &mut self.limiter {
                let bytes =
                    chain.clone().fold(0u64, |sum, d| sum.saturating_add(u64::from(d.len())));
                let allowed = limiter.consume(1, TokenType::Ops)
                    && (limiter.consume(bytes, TokenType::Bytes) || {
                        limiter.manual_replenish(1, TokenType::Ops);
                        false
                    });
                if !allowed {
                    // Leave the request on the ring; the limiter's timer brings the worker back.
                    return None;
                }
            }
            Some(self.handle_chain(mem, chain))
        })
    }
}

impl Block {
    /// Reads or writes straight between the file and guest memory, for chains laid out as
    /// Linux lays them out: a 16-byte header, data buffers all in one direction, a 1-byte
    /// status. Returns None (nothing done) for any other shape, which the general path serves.
    fn fast_path(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: &virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    ) -> Option<u32> {
        use vm_memory::{Bytes, GuestMemoryBackend};
        let descs: Vec<_> = chain.clone().collect();
        let (head, rest) = descs.split_first()?;
        let (status, data) = rest.split_last()?;
        if data.is_empty() || head.len() != 16 || head.is_write_only() {
            return None;
        }
        if status.len() != 1 || !status.is_write_only() {
            return None;
        }
        let header: [u8; 16] = mem.read_obj(head.addr()).ok()?;
        let kind = u32::from_le_bytes(header[0..4].try_into().ok()?);
        let sector = u64::from_le_bytes(header[8..16].try_into().ok()?);
        let write = match kind {
            VIRTIO_BLK_T_IN => false,
            VIRTIO_BLK_T_OUT if !self.read_only => true,
            _ => return None,
        };
        // Every data buffer: the right direction, and one contiguous piece of guest memory.
        let mut slices = Vec::with_capacity(data.len());
        let mut total = 0u64;
        for d in data {
            if d.is_write_only() == write {
                return None;
            }
            slices.push(mem.get_slice(d.addr(), usize::try_from(d.len()).ok()?).ok()?);
            total = total.checked_add(u64::from(d.len()))?;
        }
        let mut result = self.range(sector, total);
        if let Ok(mut offset) = result {
            for slice in &slices {
                let guard = slice.ptr_guard_mut();
                let (ptr, len) = (guard.as_ptr(), slice.len());
                let mut done = 0usize;
                while done < len && result.is_ok() {
                    let Ok(at) = i64::try_from(offset + done as u64) else {
                        result = Err(RequestError::Io);
                        break;
                    };
                    // SAFETY: `ptr..ptr+len` is guest memory validated by get_slice above and
                    // kept mapped for the VM's life; the kernel reads or writes at most
                    // `len - done` bytes there.
                    let n = unsafe {
                        if write {
                            libc::pwrite(
                                self.file.as_raw_fd(),
                                ptr.add(done).cast(),
                                len - done,
                                at,
                            )
                        } else {
                            libc::pread(self.file.as_raw_fd(), ptr.add(done).cast(), len - done, at)
                        }
                    };
                    match usize::try_from(n) {
                        Ok(n) if n > 0 => done += n,
                        _ => result = Err(RequestError::Io),
                    }
                }
                offset += len as u64;
            }
        }
        let status_byte = match result {
            Ok(_) => VIRTIO_BLK_S_OK,
            Err(_) => VIRTIO_BLK_S_IOERR,
        };
        mem.write_obj(status_byte, status.addr()).ok()?;
        let to_guest = if write || status_byte != VIRTIO_BLK_S_OK { 0 } else { total };
        u32::try_from(to_guest + 1).ok()
    }

    /// Parses and serves one chain; returns the used length. A chain too malformed to carry
    /// a status byte is returned with length 0 (the driver sees no status).
    fn handle_chain(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    ) -> u32 {
        if let Some(used) = self.fast_path(mem, &chain) {
            return used;
        }
        let chain_for_order = chain.clone();
        let (Ok(mut reader), Ok(mut writer)) = (chain.clone().reader(mem), chain.writer(mem))
        else {
            return 0;
        };
        let writable = writer.available_bytes();
        // The status byte is the last writable byte.
        let Some(data_len) = writable.checked_sub(1) else { return 0 };
        let Ok(mut status_writer) = writer.split_at(data_len) else { return 0 };
        // Device-readable buffers must all come before device-writable ones (2.7.4.2).
        let mut seen_writable = false;
        let mut misordered = false;
        for desc in chain_for_order {
            if desc.is_write_only() {
                seen_writable = true;
            } else if seen_writable {
                misordered = true;
            }
        }
        let mut header = [0u8; 16];
        let status = if misordered || reader.read_exact(&mut header).is_err() {
            VIRTIO_BLK_S_IOERR
        } else {
            let kind = u32::from_le_bytes(header[0..4].try_into().unwrap_or([0xff; 4]));
            let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or([0; 8]));
            let readable = reader.available_bytes() as u64;
            match self.serve(kind, sector, &mut reader, readable, &mut writer, data_len as u64) {
                Ok(()) => VIRTIO_BLK_S_OK,
                Err(RequestError::Io) => VIRTIO_BLK_S_IOERR,
                Err(RequestError::Unsupported) => VIRTIO_BLK_S_UNSUPP,
            }
        };
        let wrote_status = status_writer.write_all(&[status]).is_ok();
        let total = writer.bytes_written() + usize::from(wrote_status);
        u32::try_from(total).unwrap_or(0)
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};

    const HEADER: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;
    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;

    struct Disk {
        path: PathBuf,
    }
    impl Disk {
        /// A 1 MiB image whose byte i is (i / 512 + i) as u8.
        fn new(tag: &str) -> Disk {
            let path =
                std::env::temp_dir().join(format!("vanguard-blk-{}-{tag}", std::process::id()));
            let bytes: Vec<u8> = (0..1u64 << 20).map(|i| (i / 512 + i) as u8).collect();
            std::fs::write(&path, bytes).unwrap();
            Disk { path }
        }
        fn bytes(&self) -> Vec<u8> {
            std::fs::read(&self.path).unwrap()
        }
    }
    impl Drop for Disk {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
    }

    /// Sends one chain of (addr, len, flags) descriptors; returns (status byte, used length).
    fn request(dev: &mut Block, mem: &GuestMemoryMmap, descs: &[(u64, u32, u16)]) -> (u8, u32) {
        let vq = MockSplitQueue::new(mem, 16);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, (a, l, f))| RawDescriptor::from(Descriptor::new(*a, *l, *f, i as u16 + 1)))
            .collect();
        vq.add_desc_chains(&raw, 0).unwrap();
        mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(dev.process_queue(mem, 0, &mut q).unwrap());
        let len: u32 = mem.read_obj(vq.used_addr().unchecked_add(8)).unwrap();
        (mem.read_obj(GuestAddress(STATUS)).unwrap(), len)
    }

    fn header(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
        mem.write_obj(kind, GuestAddress(HEADER)).unwrap();
        mem.write_obj(0u32, GuestAddress(HEADER + 4)).unwrap();
        mem.write_obj(sector, GuestAddress(HEADER + 8)).unwrap();
    }

    fn io(
        mem: &GuestMemoryMmap,
        dev: &mut Block,
        kind: u32,
        sector: u64,
        len: u32,
        data_flags: u16,
    ) -> (u8, u32) {
        header(mem, kind, sector);
        request(dev, mem, &[(HEADER, 16, NEXT), (DATA, len, data_flags | NEXT), (STATUS, 1, WRITE)])
    }

    #[test]
    fn reads_what_the_image_holds() {
        let disk = Disk::new("read");
        let mut dev = Block::open(&disk.path, false, "s").unwrap();
        assert_eq!(dev.capacity_sectors(), 2048);
        let mem = mem();
        assert_eq!(io(&mem, &mut dev, VIRTIO_BLK_T_IN, 3, 8192, WRITE), (VIRTIO_BLK_S_OK, 8193));
        let mut got = vec![0u8; 8192];
        mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(got, disk.bytes()[3 * 512..3 * 512 + 8192]);
    }

    #[test]
    fn writes_land_in_the_file() {
        let disk = Disk::new("write");
        let mut dev = Block::open(&disk.path, false, "s").unwrap();
        let mem = mem();
        mem.write_slice(&[0x5a; 1024], GuestAddress(DATA)).unwrap();
        assert_eq!(io(&mem, &mut dev, VIRTIO_BLK_T_OUT, 10, 1024, 0), (VIRTIO_BLK_S_OK, 1));
        let bytes = disk.bytes();
        assert!(bytes[5120..6144].iter().all(|b| *b == 0x5a));
        assert_eq!(bytes[6144], (6144u64 / 512 + 6144) as u8, "neighbours untouched");
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(
            request(&mut dev, &mem, &[(HEADER, 16, NEXT), (STATUS, 1, WRITE)]).0,
            VIRTIO_BLK_S_OK
        );
    }

    #[test]
    fn read_only_disks_refuse_writes_and_keep_the_file() {
        let disk = Disk::new("ro");
        let before = disk.bytes();
        let mut dev = Block::open(&disk.path, true, "s").unwrap();
        assert_ne!(dev.features() & VIRTIO_BLK_F_RO, 0);
        let mem = mem();
        mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
        assert_eq!(io(&mem, &mut dev, VIRTIO_BLK_T_OUT, 0, 512, 0).0, VIRTIO_BLK_S_IOERR);
        mem.write_slice(&[0u8; 16], GuestAddress(DATA)).unwrap();
        assert_eq!(io(&mem, &mut dev, VIRTIO_BLK_T_WRITE_ZEROES, 0, 16, 0).0, VIRTIO_BLK_S_IOERR);
        assert_eq!(disk.bytes(), before);
        assert_eq!(io(&mem, &mut dev, VIRTIO_BLK_T_IN, 0, 512, WRITE).0, VIRTIO_BLK_S_OK);
    }

    #[test]
    fn ranges_past_the_end_fail() {
        let disk = Disk::new("end");
        let mut dev = Block::open(&disk.path, false, "s").unwrap();
        let mem = mem();
        assert_eq!(io(&mem, &mut dev, VIRTIO_BLK_T_IN, 2047, 1024, WRITE).0, VIRTIO_BLK_S_IOERR);
        assert_eq!(io(&mem, &mut dev, VIRTIO_BLK_T_IN, 2047, 512, WRITE).0, VIRTIO_BLK_S_OK);
        assert_eq!(io(&mem, &mut dev, VIRTIO_BLK_T_IN, u64::MAX, 512, WRITE).0, VIRTIO_BLK_S_IOERR);
        assert_eq!(
            io(&mem, &mut dev, VIRTIO_BLK_T_OUT, u64::MAX / 512, 512, 0).0,
            VIRTIO_BLK_S_IOERR
        );
    }

    #[test]
    fn get_id_returns_the_serial() {
        let disk = Disk::new("id");
        let mut dev = Block::open(&disk.path, false, "vanguard-disk-0").unwrap();
        let mem = mem();
        assert_eq!(io(&mem, &mut dev, VIRTIO_BLK_T_GET_ID, 0, 20, WRITE), (VIRTIO_BLK_S_OK, 21));
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..15], b"vanguard-disk-0");
        assert!(Block::open(&disk.path, false, &"x".repeat(21)).is_err());
    }

    #[test]
    fn discard_and_write_zeroes_zero_the_range() {
        let disk = Disk::new("zero");
        let mut dev = Block::open(&disk.path, false, "s").unwrap();
        let mem = mem();
        for (kind, sector) in [(VIRTIO_BLK_T_WRITE_ZEROES, 8u64), (VIRTIO_BLK_T_DISCARD, 100)] {
            let seg = [sector.to_le_bytes().as_slice(), &4u32.to_le_bytes(), &0u32.to_le_bytes()]
                .concat();
            mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
            assert_eq!(io(&mem, &mut dev, kind, 0, 16, 0).0, VIRTIO_BLK_S_OK);
            let bytes = disk.bytes();
            let start = (sector * 512) as usize;
            assert!(bytes[start..start + 2048].iter().all(|b| *b == 0));
            assert_ne!(bytes[start + 2048], 0);
        }
        // A malformed payload (not a whole segment) is an error.
        assert_eq!(io(&mem, &mut dev, VIRTIO_BLK_T_DISCARD, 0, 15, 0).0, VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn unknown_requests_are_unsupported() {
        let disk = Disk::new("unsupp");
        let mut dev = Block::open(&disk.path, false, "s").unwrap();
        let mem = mem();
        assert_eq!(io(&mem, &mut dev, 99, 0, 512, WRITE).0, VIRTIO_BLK_S_UNSUPP);
    }

    #[test]
    fn malformed_chains_never_panic() {
        let disk = Disk::new("bad");
        let before = disk.bytes();
        let mut dev = Block::open(&disk.path, false, "s").unwrap();
        let mem = mem();
        header(&mem, VIRTIO_BLK_T_IN, 0);
        // No writable descriptor: no status can be returned.
        assert_eq!(request(&mut dev, &mem, &[(HEADER, 16, 0)]).1, 0);
        // Header too short.
        assert_eq!(
            request(&mut dev, &mem, &[(HEADER, 8, NEXT), (STATUS, 1, WRITE)]).0,
            VIRTIO_BLK_S_IOERR
        );
        // Data buffer outside guest memory.
        assert_eq!(
            request(
                &mut dev,
                &mem,
                &[(HEADER, 16, NEXT), (0x4000_0000, 4096, WRITE | NEXT), (STATUS, 1, WRITE)]
            )
            .1,
            0
        );
        // A writable descriptor before a readable one: the header cannot be read whole.
        header(&mem, VIRTIO_BLK_T_OUT, 0);
        let (status, _) = request(&mut dev, &mem, &[(STATUS, 1, WRITE | NEXT), (HEADER, 16, 0)]);
        assert_eq!(status, VIRTIO_BLK_S_IOERR);
        assert_eq!(disk.bytes(), before);
    }
}
