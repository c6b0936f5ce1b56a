//! virtio-blk (device ID 2) on a raw image file: read, write, flush, get-id, discard and
//! write-zeroes; read-only disks refuse every write with an I/O error and never open the file
//! for writing. Requests move through a fixed-size bounce buffer, so a guest's lengths never
//! size an allocation, and every sector range is checked against the disk's end.
//!
//! With [`Block::with_direct_io`] the image is read and written with `O_DIRECT`, bypassing the
//! host's page cache. Direct I/O wants buffer addresses, lengths and file offsets aligned (to
//! what `statx` reports as the file's `STATX_DIOALIGN`, or else 4096 for memory and 512, or 4096
//! if the file system refuses 512, for offsets); guest buffers that are not go through one
//! aligned bounce buffer per device, with read-modify-write of partial blocks, so no valid
//! request fails for its alignment.
//!
//! Every disk has a rate limiter, unlimited unless configured; [`Block::rate_limit_handle`]
//! changes its limits while the VM runs, from any thread.
//!
//! Requests are served on the device's worker thread (see `transport`), off the vCPU threads.

use crate::{DeviceError, VirtioDevice, VIRTIO_F_VERSION_1};
use rate_limiter::{RateLimiter, RateLimiterConfig, RateLimiterHandle, TokenType};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use virtio_queue::Queue;
use vm_memory::{GuestMemoryMmap, VolatileSlice};

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
/// Size of a direct-I/O disk's aligned bounce buffer: the most bytes it moves per system call
/// for guest buffers that cannot go to the file directly.
const DIRECT_BUFFER: usize = 1 << 20;
/// The least alignment of that buffer, and the memory alignment assumed for direct I/O when the
/// file system does not report its own.
const PAGE: usize = 4096;

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
    /// The image's file system refuses `O_DIRECT` (or reports no direct I/O for the file).
    #[error("disk {path}: the file system does not support direct I/O (direct=on)")]
    DirectIoUnsupported {
        /// The image.
        path: PathBuf,
    },
    /// Direct I/O moves whole sectors: the image must be made of them.
    #[error(
        "disk {path}: size {size} bytes is not a multiple of 512, which direct I/O (direct=on) \
         needs"
    )]
    DirectIoSize {
        /// The image.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
    },
    /// The file system asks for a direct-I/O alignment this device cannot serve (not a power of
    /// two, or larger than its 1 MiB bounce buffer).
    #[error(
        "disk {path}: unsupported direct I/O alignment (memory {mem_align}, file offsets \
         {offset_align}) (direct=on)"
    )]
    DirectIoAlignment {
        /// The image.
        path: PathBuf,
        /// Required alignment of buffer addresses.
        mem_align: u64,
        /// Required alignment of file offsets and lengths.
        offset_align: u64,
    },
}

/// A heap buffer whose first byte is aligned for direct I/O. Over-allocated by the alignment
/// and used from the first aligned byte on, so it needs no unsafe allocation code; the heap
/// block never moves, so the alignment holds for the buffer's life.
struct AlignedBuffer {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuffer {
    /// `len` zeroed bytes starting at a multiple of `align` (a power of two).
    fn new(len: usize, align: usize) -> Option<AlignedBuffer> {
        let storage = vec![0u8; len.checked_add(align)?];
        let start = storage.as_ptr().align_offset(align);
        (start < align).then_some(AlignedBuffer { storage, start, len })
    }

    fn bytes(&mut self) -> &mut [u8] {
        let end = self.start.saturating_add(self.len);
        self.storage.get_mut(self.start..end).unwrap_or_default()
    }
}

/// Reads into `buf` from file `offset` until it is full or the file ends; returns the bytes
/// read.
fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0usize;
    while let Some(rest) = buf.get_mut(done..).filter(|rest| !rest.is_empty()) {
        let at = offset.checked_add(done as u64).ok_or(std::io::ErrorKind::InvalidInput)?;
        match file.read_at(rest, at) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Sets or clears `O_DIRECT` on the image's open file.
fn set_direct(file: &File, on: bool) -> std::io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL reads the status flags of our own descriptor; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let flags = if on { flags | libc::O_DIRECT } else { flags & !libc::O_DIRECT };
    // SAFETY: F_SETFL changes only the status flags of our own descriptor.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The file's direct-I/O alignment from statx (memory, file offset), if the kernel and file
/// system report it; (0, 0) means the file does not support direct I/O.
fn statx_dio_alignment(file: &File) -> Option<(u32, u32)> {
    // SAFETY: statx is a plain C struct of integers, for which all zeroes is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: an empty path with AT_EMPTY_PATH describes our own open descriptor; the kernel
    // writes only into `stx`, which is valid and exclusively borrowed for the call.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    (rc == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0)
        .then_some((stx.stx_dio_mem_align, stx.stx_dio_offset_align))
}

/// A disk opened with `O_DIRECT`: its alignment and its bounce buffer.
struct DirectIo {
    /// Guest buffers at addresses that are multiples of this may go to the file directly.
    mem_align: usize,
    /// Direct transfers start at file offsets, and have lengths, that are multiples of this.
    offset_align: u64,
    /// The image's length: a multiple of 512 but maybe not of `offset_align`, in which case the
    /// bytes past its last whole block are written with `O_DIRECT` off.
    file_len: u64,
    buffer: AlignedBuffer,
}

impl DirectIo {
    /// Whether a guest buffer at `addr` of `len` bytes for file `offset` can go straight to the
    /// file.
    fn fits(&self, addr: usize, len: usize, offset: u64) -> bool {
        addr.is_multiple_of(self.mem_align)
            && (len as u64).is_multiple_of(self.offset_align)
            && offset.is_multiple_of(self.offset_align)
    }

    /// The stretch of whole blocks the bounce buffer holds next, for bytes `pos..end`: (its
    /// file offset, its length, the bytes asked for in it as a range of the buffer).
    fn window(&self, pos: u64, end: u64) -> Result<(u64, usize, usize, usize), RequestError> {
        let start = pos - pos % self.offset_align;
        let limit = start.checked_add(self.buffer.len as u64).ok_or(RequestError::Io)?;
        let stop = end.checked_next_multiple_of(self.offset_align).ok_or(RequestError::Io)?;
        let stop = stop.min(limit);
        let len = usize::try_from(stop - start).map_err(|_| RequestError::Io)?;
        let from = usize::try_from(pos - start).map_err(|_| RequestError::Io)?;
        let to = usize::try_from(end.min(stop) - start).map_err(|_| RequestError::Io)?;
        Ok((start, len, from, to))
    }

    /// Reads `len` bytes at file `offset` through the bounce buffer, handing them to `sink`
    /// in order, a piece at a time.
    fn read(
        &mut self,
        file: &File,
        offset: u64,
        len: u64,
        mut sink: impl FnMut(&[u8]) -> Result<(), RequestError>,
    ) -> Result<(), RequestError> {
        let end = offset.checked_add(len).ok_or(RequestError::Io)?;
        let mut pos = offset;
        while pos < end {
            let (start, size, from, to) = self.window(pos, end)?;
            let buf = self.buffer.bytes().get_mut(..size).ok_or(RequestError::Io)?;
            // The last block may be cut short by the end of the file; the bytes asked for
            // are not.
            let got = read_full_at(file, buf, start).map_err(|_| RequestError::Io)?;
            if got < to {
                return Err(RequestError::Io);
            }
            sink(buf.get(from..to).ok_or(RequestError::Io)?)?;
            pos = start + to as u64;
        }
        Ok(())
    }

    /// Writes `len` bytes at file `offset` through the bounce buffer; `source` fills each
    /// piece in order. Blocks only partly written are read first and keep their other bytes.
    fn write(
        &mut self,
        file: &File,
        offset: u64,
        len: u64,
        mut source: impl FnMut(&mut [u8]) -> Result<(), RequestError>,
    ) -> Result<(), RequestError> {
        let end = offset.checked_add(len).ok_or(RequestError::Io)?;
        let block = usize::try_from(self.offset_align).map_err(|_| RequestError::Io)?;
        let file_len = self.file_len;
        let mut pos = offset;
        while pos < end {
            let (start, size, from, to) = self.window(pos, end)?;
            let buf = self.buffer.bytes().get_mut(..size).ok_or(RequestError::Io)?;
            if from != 0 {
                let head = buf.get_mut(..block).ok_or(RequestError::Io)?;
                read_full_at(file, head, start).map_err(|_| RequestError::Io)?;
            }
            if to < size && !(from != 0 && size == block) {
                let tail_at = size - block;
                let tail = buf.get_mut(tail_at..).ok_or(RequestError::Io)?;
                read_full_at(file, tail, start + tail_at as u64).map_err(|_| RequestError::Io)?;
            }
            source(buf.get_mut(from..to).ok_or(RequestError::Io)?)?;
            let stop = start + size as u64;
            if stop <= file_len {
                file.write_all_at(buf, start).map_err(|_| RequestError::Io)?;
            } else {
                // The stretch ends in the image's last, partial block, which direct I/O cannot
                // write without growing the file: write up to the end, through the page cache.
                let keep = usize::try_from(file_len - start).map_err(|_| RequestError::Io)?;
                let data = buf.get(..keep).ok_or(RequestError::Io)?;
                set_direct(file, false).map_err(|_| RequestError::Io)?;
                let written = file.write_all_at(data, start);
                set_direct(file, true).map_err(|_| RequestError::Io)?;
                written.map_err(|_| RequestError::Io)?;
            }
            pos = start + to as u64;
        }
        Ok(())
    }
}

/// Moves a guest buffer to or from the file at `offset` with pread/pwrite straight on guest
/// memory.
fn transfer_in_place(
    file: &File,
    write: bool,
    slice: &VolatileSlice<'_>,
    offset: u64,
) -> Result<(), RequestError> {
    let guard = slice.ptr_guard_mut();
    let (ptr, len) = (guard.as_ptr(), slice.len());
    let mut done = 0usize;
    while done < len {
        let at = offset
            .checked_add(done as u64)
            .and_then(|at| i64::try_from(at).ok())
            .ok_or(RequestError::Io)?;
        // SAFETY: `ptr..ptr+len` is guest memory that `slice` (validated by get_slice) covers
        // and that stays mapped for the VM's life; the kernel reads or writes at most
        // `len - done` bytes from `ptr + done`.
        let n = unsafe {
            if write {
                libc::pwrite(file.as_raw_fd(), ptr.add(done).cast(), len - done, at)
            } else {
                libc::pread(file.as_raw_fd(), ptr.add(done).cast(), len - done, at)
            }
        };
        match usize::try_from(n) {
            Ok(n) if n > 0 => done += n,
            _ => return Err(RequestError::Io),
        }
    }
    Ok(())
}

/// A virtio-blk device.
pub struct Block {
    /// Unlimited unless configured, so that a handle can add limits later.
    limiter: RateLimiter,
    file: File,
    path: PathBuf,
    capacity_sectors: u64,
    read_only: bool,
    /// Set when the image is open with `O_DIRECT`.
    direct: Option<DirectIo>,
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
        let limiter = RateLimiter::new(&RateLimiterConfig::default())
            .map_err(|e| BlockError::RateLimit(e.to_string()))?;
        Ok(Block {
            limiter,
            file,
            path: path.to_path_buf(),
            capacity_sectors,
            read_only,
            direct: None,
            id,
            config,
        })
    }

    /// Limits the disk's bandwidth and operations (each request counts as one operation and
    /// its buffers' total length in bytes).
    pub fn with_rate_limit(mut self, config: &RateLimiterConfig) -> Result<Block, BlockError> {
        self.limiter.set_limits(config).map_err(|e| BlockError::RateLimit(e.to_string()))?;
        Ok(self)
    }

    /// A handle that changes the disk's limits while it runs, from any thread (the host
    /// daemon's hook): `handle.update(Some(limits))` replaces them (adding limits to a disk
    /// that had none), `handle.update(None)` lifts them. The device's worker applies them
    /// before its next request, and a request waiting under the old limits is retried at once.
    pub fn rate_limit_handle(&self) -> RateLimiterHandle {
        self.limiter.handle()
    }

    /// Reads and writes the image with `O_DIRECT`, bypassing the host's page cache. Fails if
    /// the file system does not support direct I/O or the image is not whole 512-byte sectors.
    pub fn with_direct_io(mut self) -> Result<Block, BlockError> {
        let path = self.path.clone();
        let unsupported = || BlockError::DirectIoUnsupported { path: path.clone() };
        let open_err = |source| BlockError::Open { path: path.clone(), source };
        match set_direct(&self.file, true) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Err(unsupported()),
            Err(e) => return Err(open_err(e)),
        }
        let file_len = self.file.metadata().map_err(open_err)?.len();
        let reported = statx_dio_alignment(&self.file);
        let (mem_align, offset_align) = match reported {
            Some((0, _) | (_, 0)) => return Err(unsupported()),
            Some((mem, offset)) => (mem as usize, u64::from(offset)),
            None => (PAGE, SECTOR_SIZE),
        };
        if !file_len.is_multiple_of(SECTOR_SIZE) {
            return Err(BlockError::DirectIoSize { path, size: file_len });
        }
        let usable = |align: u64| align.is_power_of_two() && align <= DIRECT_BUFFER as u64;
        if !usable(mem_align as u64) || !usable(offset_align) {
            return Err(BlockError::DirectIoAlignment {
                path,
                mem_align: mem_align as u64,
                offset_align,
            });
        }
        let buffer_align = PAGE.max(mem_align).max(usize::try_from(offset_align).unwrap_or(PAGE));
        let buffer = AlignedBuffer::new(DIRECT_BUFFER, buffer_align).ok_or_else(|| {
            open_err(std::io::Error::other("cannot allocate the direct I/O buffer"))
        })?;
        let mut direct = DirectIo { mem_align, offset_align, file_len, buffer };
        if reported.is_none() && file_len > 0 {
            // No reported alignment: try a sector, then a page, at the start of the image.
            let mut fits = |len: usize| match direct.buffer.bytes().get_mut(..len) {
                Some(buf) => match read_full_at(&self.file, buf, 0) {
                    Ok(_) => Ok(true),
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
                    Err(e) => Err(open_err(e)),
                },
                None => Ok(false),
            };
            if !fits(512)? {
                if !fits(PAGE)? {
                    return Err(unsupported());
                }
                direct.offset_align = PAGE as u64;
            }
        }
        self.direct = Some(direct);
        Ok(self)
    }

    /// The rate limiter's timer, which the worker waits on: always there, limits or not, since
    /// a handle may add limits, or wake the worker, later.
    pub fn timer_fd(&self) -> std::os::fd::RawFd {
        self.limiter.as_raw_fd()
    }

    /// The timer fired: Ok(false) is a spurious wake-up; errors leave the limiter to unblock
    /// on its deadline at the next request. Limits stored by a handle are applied here.
    pub fn timer_fired(&mut self) {
        let _ = self.limiter.event_handler();
    }

    /// Whether the image is open with `O_DIRECT`.
    pub fn direct_io(&self) -> bool {
        self.direct.is_some()
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

    fn read_into<W: Write>(
        &mut self,
        offset: u64,
        len: u64,
        out: &mut W,
    ) -> Result<(), RequestError> {
        if let Some(direct) = &mut self.direct {
            return direct.read(&self.file, offset, len, |piece| {
                out.write_all(piece).map_err(|_| RequestError::Io)
            });
        }
        let mut buf = bounce_buffer(len);
        in_chunks(len, buf.len(), |done, n| {
            self.file.read_exact_at(&mut buf[..n], offset + done).map_err(|_| RequestError::Io)?;
            out.write_all(&buf[..n]).map_err(|_| RequestError::Io)
        })
    }

    fn write_from<R: Read>(
        &mut self,
        offset: u64,
        len: u64,
        input: &mut R,
    ) -> Result<(), RequestError> {
        if let Some(direct) = &mut self.direct {
            return direct.write(&self.file, offset, len, |piece| {
                input.read_exact(piece).map_err(|_| RequestError::Io)
            });
        }
        let mut buf = bounce_buffer(len);
        in_chunks(len, buf.len(), |done, n| {
            input.read_exact(&mut buf[..n]).map_err(|_| RequestError::Io)?;
            self.file.write_all_at(&buf[..n], offset + done).map_err(|_| RequestError::Io)
        })
    }

    /// Zeroes (and, where the file system can, deallocates) a byte range.
    fn zero(&mut self, offset: u64, len: u64) -> Result<(), RequestError> {
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
        if let Some(direct) = &mut self.direct {
            return direct.write(&self.file, offset, len, |piece| {
                piece.fill(0);
                Ok(())
            });
        }
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
    fn zero_ranges<R: Read>(&mut self, reader: &mut R, readable: u64) -> Result<(), RequestError> {
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

    fn event_fds(&self) -> Vec<std::os::fd::RawFd> {
        vec![self.timer_fd()]
    }

    fn event_ready(&mut self, _which: usize) {
        self.timer_fired();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::read_config_bytes(&self.config, offset, data);
    }

    fn process_queue(
        &mut self,
        mem: &GuestMemoryMmap,
        index: u16,
        queue: &mut Queue,
    ) -> Result<bool, DeviceError> {
        crate::drain_queue(mem, index, queue, |chain| {
            let limiter = &mut self.limiter;
            limiter.apply_pending_updates();
            if !limiter.is_unlimited() {
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
                result = self.transfer_slice(write, slice, offset).map(|()| offset);
                if result.is_err() {
                    break;
                }
                offset += slice.len() as u64;
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

    /// Moves one guest buffer to or from the file at `offset`: in place, unless the image is
    /// open with `O_DIRECT` and the buffer is not aligned for it.
    fn transfer_slice(
        &mut self,
        write: bool,
        slice: &VolatileSlice<'_>,
        offset: u64,
    ) -> Result<(), RequestError> {
        use vm_memory::Bytes;
        let addr = slice.ptr_guard_mut().as_ptr() as usize;
        let len = slice.len();
        let Some(direct) = self.direct.as_mut().filter(|d| !d.fits(addr, len, offset)) else {
            return transfer_in_place(&self.file, write, slice, offset);
        };
        let mut done = 0usize;
        if write {
            direct.write(&self.file, offset, len as u64, |piece| {
                slice.read_slice(piece, done).map_err(|_| RequestError::Io)?;
                done += piece.len();
                Ok(())
            })
        } else {
            direct.read(&self.file, offset, len as u64, |piece| {
                slice.write_slice(piece, done).map_err(|_| RequestError::Io)?;
                done += piece.len();
                Ok(())
            })
        }
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

    /// A scratch image for direct I/O: not in the usual temp dir, which may be tmpfs.
    fn direct_disk(tag: &str, len: u64) -> Disk {
        let path = PathBuf::from("/var/tmp")
            .join(format!("vanguard-blk-direct-{}-{tag}", std::process::id()));
        let bytes: Vec<u8> = (0..len).map(|i| (i / 512 + i * 7) as u8).collect();
        std::fs::write(&path, bytes).unwrap();
        Disk { path }
    }

    /// The same image twice: one opened buffered, one with O_DIRECT.
    fn twins(tag: &str, len: u64) -> (Disk, Block, Disk, Block) {
        let buffered = direct_disk(&format!("{tag}-b"), len);
        let direct = direct_disk(&format!("{tag}-d"), len);
        let b = Block::open(&buffered.path, false, "s").unwrap();
        let d = Block::open(&direct.path, false, "s").unwrap().with_direct_io().unwrap();
        assert!(d.direct_io() && !b.direct_io());
        (buffered, b, direct, d)
    }

    fn guest_bytes(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// Runs `descs` (a header for `kind` at `sector` first) on both devices, each with its own
    /// guest memory holding the same `data` at `data_at`; checks both give the same status,
    /// used length and guest bytes, and their files the same bytes.
    #[allow(clippy::too_many_arguments)]
    fn same_on_both(
        b: &mut Block,
        d: &mut Block,
        twins: (&Disk, &Disk),
        kind: u32,
        sector: u64,
        descs: &[(u64, u32, u16)],
        data: &[u8],
        data_at: u64,
    ) -> u8 {
        let (mem_b, mem_d) = (mem(), mem());
        for (mem, dev) in [(&mem_b, &mut *b), (&mem_d, &mut *d)] {
            mem.write_slice(data, GuestAddress(data_at)).unwrap();
            header(mem, kind, sector);
            let _ = dev;
        }
        let rb = request(b, &mem_b, descs);
        let rd = request(d, &mem_d, descs);
        assert_eq!(rb, rd, "status and used length, kind {kind} sector {sector} {descs:x?}");
        for (addr, len, _) in descs {
            assert!(
                guest_bytes(&mem_b, *addr, *len as usize)
                    == guest_bytes(&mem_d, *addr, *len as usize),
                "guest bytes at {addr:#x}, kind {kind} sector {sector} {descs:x?}"
            );
        }
        assert!(twins.0.bytes() == twins.1.bytes(), "files differ after {kind} at {sector}");
        rb.0
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8).collect()
    }

    /// Reads, writes, zeroes and flushes with guest buffers at every kind of alignment give the
    /// same bytes with O_DIRECT as through the page cache: aligned buffers go straight to the
    /// file, the others through the aligned bounce buffer.
    fn direct_matches_buffered(b: &mut Block, d: &mut Block, twins: (&Disk, &Disk)) {
        let sectors = d.capacity_sectors();
        // (guest address, length, sector)
        let cases = [
            (DATA, 4096u32, 0u64),
            (DATA, 512, 1),
            (DATA + 1, 512, 3),
            (DATA + 512, 1024, 7),
            (DATA + 7, 8192 + 512, 9),
            (DATA + 4096 - 512, 3 * 4096, 17),
            (DATA + 3, (1 << 20) + 1536, 5),
            (DATA + 4096, 2 << 20, 0),
            (DATA + 9, 1536, sectors - 3),
            (DATA + 4096, 512, sectors - 1),
        ];
        for (i, (addr, len, sector)) in cases.into_iter().enumerate() {
            let descs = [(HEADER, 16, NEXT), (addr, len, WRITE | NEXT), (STATUS, 1, WRITE)];
            let status = same_on_both(b, d, twins, VIRTIO_BLK_T_IN, sector, &descs, &[], DATA);
            assert_eq!(status, VIRTIO_BLK_S_OK, "read case {i}");
            let data = pattern(len as usize, i as u8);
            let descs = [(HEADER, 16, NEXT), (addr, len, NEXT), (STATUS, 1, WRITE)];
            let status = same_on_both(b, d, twins, VIRTIO_BLK_T_OUT, sector, &descs, &data, addr);
            assert_eq!(status, VIRTIO_BLK_S_OK, "write case {i}");
        }
        // Two data buffers, one aligned and one not, in each direction.
        let descs = [
            (HEADER, 16, NEXT),
            (DATA, 4096, WRITE | NEXT),
            (DATA + 0x10_0003, 2560, WRITE | NEXT),
            (STATUS, 1, WRITE),
        ];
        same_on_both(b, d, twins, VIRTIO_BLK_T_IN, 11, &descs, &[], DATA);
        let data = pattern(0x10_0000 + 2560, 99);
        let descs = [
            (HEADER, 16, NEXT),
            (DATA, 4096, NEXT),
            (DATA + 0x10_0000, 2560, NEXT),
            (STATUS, 1, WRITE),
        ];
        same_on_both(b, d, twins, VIRTIO_BLK_T_OUT, 13, &descs, &data, DATA);
        // The general path: header and payload in one buffer (write), payload and status in
        // one (read).
        let payload = pattern(16 + 1536, 7);
        let descs = [(HEADER, 16 + 1536, NEXT), (STATUS, 1, WRITE)];
        let (mem_b, mem_d) = (mem(), mem());
        for (mem, dev) in [(&mem_b, &mut *b), (&mem_d, &mut *d)] {
            mem.write_slice(&payload, GuestAddress(HEADER)).unwrap();
            header(mem, VIRTIO_BLK_T_OUT, 21);
            assert_eq!(request(dev, mem, &descs).0, VIRTIO_BLK_S_OK);
        }
        assert!(twins.0.bytes() == twins.1.bytes());
        let descs = [(HEADER, 16, NEXT), (DATA + 5, 2048 + 1, WRITE)];
        same_on_both(b, d, twins, VIRTIO_BLK_T_IN, 20, &descs, &[], DATA);
        // Write-zeroes and flush.
        let seg =
            [9u64.to_le_bytes().as_slice(), &3u32.to_le_bytes(), &0u32.to_le_bytes()].concat();
        let descs = [(HEADER, 16, NEXT), (DATA + 1, 16, NEXT), (STATUS, 1, WRITE)];
        let status =
            same_on_both(b, d, twins, VIRTIO_BLK_T_WRITE_ZEROES, 0, &descs, &seg, DATA + 1);
        assert_eq!(status, VIRTIO_BLK_S_OK);
        let descs = [(HEADER, 16, NEXT), (STATUS, 1, WRITE)];
        assert_eq!(same_on_both(b, d, twins, VIRTIO_BLK_T_FLUSH, 0, &descs, &[], DATA), 0);
        // Past the end fails the same way.
        let descs = [(HEADER, 16, NEXT), (DATA + 1, 1024, WRITE | NEXT), (STATUS, 1, WRITE)];
        let status = same_on_both(b, d, twins, VIRTIO_BLK_T_IN, sectors - 1, &descs, &[], DATA);
        assert_eq!(status, VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn direct_io_gives_the_same_bytes_as_buffered() {
        let (buffered, mut b, direct, mut d) = twins("same", 4 << 20);
        direct_matches_buffered(&mut b, &mut d, (&buffered, &direct));
    }

    /// With 4 KiB direct-I/O blocks (as on 4Kn disks, or when the file system refuses 512),
    /// sector-sized requests are read-modify-write, and an image that ends in a partial block
    /// is written up to its end and never grows.
    #[test]
    fn direct_io_with_4k_blocks_and_a_partial_last_block() {
        let len = (2 << 20) + 1536;
        let (buffered, mut b, direct, mut d) = twins("4k", len);
        if let Some(io) = &mut d.direct {
            io.mem_align = 4096;
            io.offset_align = 4096;
        }
        direct_matches_buffered(&mut b, &mut d, (&buffered, &direct));
        assert_eq!(std::fs::metadata(&direct.path).unwrap().len(), len);
        // Still O_DIRECT after writing the tail through the page cache.
        // SAFETY: F_GETFL reads the status flags of the device's own descriptor.
        let flags = unsafe { libc::fcntl(d.file.as_raw_fd(), libc::F_GETFL) };
        assert_ne!(flags & libc::O_DIRECT, 0);
    }

    #[test]
    fn direct_io_needs_whole_sectors() {
        let disk = direct_disk("odd", 1000);
        let error = Block::open(&disk.path, false, "s").unwrap().with_direct_io().err().unwrap();
        let expected = format!(
            "disk {}: size 1000 bytes is not a multiple of 512, which direct I/O (direct=on) needs",
            disk.path.display()
        );
        assert_eq!(error.to_string(), expected);
    }

    /// A file system that refuses O_DIRECT (procfs here; tmpfs before Linux 6.6) gives one
    /// clear error.
    #[test]
    fn direct_io_refused_by_the_file_system_is_a_clear_error() {
        let error = Block::open(Path::new("/proc/version"), true, "s")
            .unwrap()
            .with_direct_io()
            .err()
            .unwrap();
        assert_eq!(
            error.to_string(),
            "disk /proc/version: the file system does not support direct I/O (direct=on)"
        );
    }

    /// tmpfs takes O_DIRECT since Linux 6.6 (and serves it from memory, as it serves
    /// everything); before, it refuses it. Either way: correct bytes, or the clear error.
    #[test]
    fn direct_io_on_tmpfs_works_or_is_refused_clearly() {
        let shm = Path::new("/dev/shm");
        if !shm.is_dir() {
            return;
        }
        let path = shm.join(format!("vanguard-blk-direct-{}", std::process::id()));
        let bytes: Vec<u8> = (0..1u64 << 20).map(|i| (i / 512 + i) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let disk = Disk { path };
        match Block::open(&disk.path, false, "s").unwrap().with_direct_io() {
            Ok(mut dev) => {
                let mem = mem();
                let descs =
                    [(HEADER, 16, NEXT), (DATA + 3, 4096, WRITE | NEXT), (STATUS, 1, WRITE)];
                header(&mem, VIRTIO_BLK_T_IN, 5);
                assert_eq!(request(&mut dev, &mem, &descs).0, VIRTIO_BLK_S_OK);
                assert!(guest_bytes(&mem, DATA + 3, 4096) == bytes[5 * 512..5 * 512 + 4096]);
            }
            Err(error) => assert_eq!(
                error.to_string(),
                format!(
                    "disk {}: the file system does not support direct I/O (direct=on)",
                    disk.path.display()
                )
            ),
        }
    }

    /// A queue the test keeps making requests available on, all reads of `len` bytes from
    /// sector 0, served by a real device.
    struct Ring<'a> {
        mem: &'a GuestMemoryMmap,
        vq: MockSplitQueue<'a, GuestMemoryMmap>,
        queue: Queue,
        next_desc: u16,
    }

    impl<'a> Ring<'a> {
        fn new(mem: &'a GuestMemoryMmap) -> Ring<'a> {
            let vq = MockSplitQueue::new(mem, 256);
            let queue = vq.create_queue().unwrap();
            header(mem, VIRTIO_BLK_T_IN, 0);
            Ring { mem, vq, queue, next_desc: 0 }
        }

        /// Makes `count` reads of `len` bytes available.
        fn push(&mut self, count: u16, len: u32) {
            for _ in 0..count {
                let n = self.next_desc;
                let raw: Vec<RawDescriptor> =
                    [(HEADER, 16, NEXT), (DATA, len, WRITE | NEXT), (STATUS, 1u32, WRITE)]
                        .iter()
                        .enumerate()
                        .map(|(i, (a, l, f))| {
                            RawDescriptor::from(Descriptor::new(*a, *l, *f, n + i as u16 + 1))
                        })
                        .collect();
                self.vq.add_desc_chains(&raw, n).unwrap();
                self.next_desc = (n + 3) % 255;
            }
        }

        /// Lets the device serve the queue; returns how many requests it has completed in all.
        fn serve(&mut self, dev: &mut Block) -> u16 {
            dev.process_queue(self.mem, 0, &mut self.queue).unwrap();
            self.used()
        }

        fn used(&self) -> u16 {
            self.mem.read_obj(self.vq.used_addr().unchecked_add(2)).unwrap()
        }
    }

    /// Waits up to `ms` for the device's timer to fire.
    fn timer_fires_within(dev: &Block, ms: i32) -> bool {
        let fd = dev.timer_fd();
        let mut pollfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: `pollfd` is a valid, exclusively borrowed array of one element for the call.
        unsafe { libc::poll(&mut pollfd, 1, ms) == 1 }
    }

    fn ops_per_day(n: u64) -> Option<RateLimiterConfig> {
        Some(format!("ops={n}/24h").parse().unwrap())
    }

    /// Through a real queue: a disk without limits gets one from its handle and throttles; a
    /// later update lifts it and wakes the waiting request; another imposes a different limit.
    #[test]
    fn rate_limits_change_while_the_device_serves_its_queue() {
        let disk = Disk::new("live-limit");
        let mut dev = Block::open(&disk.path, false, "s").unwrap();
        let handle = dev.rate_limit_handle();
        let mem = mem();
        let mut ring = Ring::new(&mem);
        ring.push(3, 512);
        assert_eq!(ring.serve(&mut dev), 3, "unlimited");

        // Imposed from another thread: one request a day.
        let remote = handle.clone();
        std::thread::spawn(move || remote.update(ops_per_day(1)).unwrap()).join().unwrap();
        ring.push(2, 512);
        assert_eq!(ring.serve(&mut dev), 4, "the second request waits");
        dev.timer_fired();
        assert_eq!(ring.serve(&mut dev), 4, "and keeps waiting");
        assert!(!timer_fires_within(&dev, 20));

        // Lifted: the timer fires at once, and the waiting request goes through.
        handle.update(None).unwrap();
        assert!(timer_fires_within(&dev, 1000), "the update did not wake the device");
        dev.timer_fired();
        assert_eq!(ring.serve(&mut dev), 5);
        ring.push(10, 512);
        assert_eq!(ring.serve(&mut dev), 15);

        // A different limit: 8 KiB a day (the bucket starts full), no ops limit.
        handle.update(Some("bandwidth=8K/24h".parse().unwrap())).unwrap();
        // Each request counts its header, data and status: 16 + 4079 + 1 = 4096 bytes.
        ring.push(4, 4079);
        assert_eq!(ring.serve(&mut dev), 17, "two 4 KiB requests fit in 8 KiB");
        assert!(!timer_fires_within(&dev, 20));
        handle.update(ops_per_day(3)).unwrap();
        assert!(timer_fires_within(&dev, 1000));
        dev.timer_fired();
        assert_eq!(ring.serve(&mut dev), 19, "bandwidth lifted, three ops a day: both go");
        ring.push(3, 512);
        assert_eq!(ring.serve(&mut dev), 20, "the third op of the day, then waiting");
    }

    /// The whole way: the device runs under the transport's worker thread, a request waits
    /// on a limit, and lifting the limit through the handle wakes the worker, which serves the
    /// request with no further notification from the driver.
    #[test]
    fn lifting_a_limit_wakes_the_worker_thread() {
        use crate::status::{ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK};
        use crate::transport::{Interrupt, NotifyRegistrar, VirtioCore};
        use std::sync::{Arc, Mutex};
        use std::time::{Duration, Instant};
        use vmm_sys_util::eventfd::EventFd;

        struct NoInterrupt;
        impl Interrupt for NoInterrupt {
            fn queue(&self, _index: u16) {}
            fn config(&self) {}
        }
        /// Keeps the queue's eventfd, to signal it as KVM would.
        #[derive(Default)]
        struct Registrar(Mutex<Option<EventFd>>);
        impl NotifyRegistrar for Registrar {
            fn register(&self, _: u64, _: Option<u32>, fd: &EventFd) -> std::io::Result<()> {
                *self.0.lock().unwrap() = Some(fd.try_clone()?);
                Ok(())
            }
            fn unregister(&self, _: u64, _: Option<u32>, _: &EventFd) -> std::io::Result<()> {
                Ok(())
            }
        }

        let disk = Disk::new("worker-limit");
        let dev = Block::open(&disk.path, false, "s").unwrap();
        let dev = dev.with_rate_limit(&ops_per_day(1).unwrap()).unwrap();
        let handle = dev.rate_limit_handle();
        let mem = mem();
        let mut ring = Ring::new(&mem);
        let registrar = Arc::new(Registrar::default());
        let mut core = VirtioCore::new(Box::new(dev), mem.clone(), Arc::new(NoInterrupt));
        core.set_notifier(registrar.clone(), vec![(0xd000_0050, None)]);
        core.set_status(ACKNOWLEDGE);
        core.set_status(ACKNOWLEDGE | DRIVER);
        core.driver_features_select = 1;
        core.set_driver_features(1); // VIRTIO_F_VERSION_1
        core.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
        core.queue_select = 0;
        core.set_queue_size(256);
        let split = |a: GuestAddress| (Some(a.0 as u32), Some((a.0 >> 32) as u32));
        for (which, addr) in
            [(0, ring.vq.desc_table_addr()), (1, ring.vq.avail_addr()), (2, ring.vq.used_addr())]
        {
            let (low, high) = split(addr);
            core.set_queue_address(which, low, high);
        }
        core.set_queue_ready(true);
        core.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        assert_eq!(core.status() & DRIVER_OK, DRIVER_OK);

        let wait_for = |ring: &Ring, n: u16| {
            let deadline = Instant::now() + Duration::from_secs(5);
            while ring.used() != n {
                assert!(Instant::now() < deadline, "{} requests served, not {n}", ring.used());
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        ring.push(2, 512);
        registrar.0.lock().unwrap().as_ref().expect("the worker's eventfd").write(1).unwrap();
        wait_for(&ring, 1);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(ring.used(), 1, "the second request waits for tomorrow");
        handle.update(None).unwrap();
        wait_for(&ring, 2);
        drop(core);
    }

    /// A configured limit is set through the same limiter, so a handle taken before still
    /// changes it; bad limits are refused by the handle and change nothing.
    #[test]
    fn rate_limit_handle_taken_before_the_limit_is_configured() {
        let disk = Disk::new("limit-order");
        let dev = Block::open(&disk.path, false, "s").unwrap();
        let handle = dev.rate_limit_handle();
        let mut dev = dev.with_rate_limit(&ops_per_day(1).unwrap()).unwrap();
        let mem = mem();
        let mut ring = Ring::new(&mem);
        ring.push(2, 512);
        assert_eq!(ring.serve(&mut dev), 1);
        let bad = RateLimiterConfig {
            bandwidth: None,
            ops: Some(rate_limiter::TokenBucketConfig {
                size: 0,
                one_time_burst: 0,
                refill_time_ms: 1000,
            }),
        };
        assert!(handle.update(Some(bad)).is_err());
        dev.timer_fired();
        assert_eq!(ring.serve(&mut dev), 1);
        handle.update(None).unwrap();
        assert_eq!(ring.serve(&mut dev), 2, "applied at the next request even unwoken");
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
