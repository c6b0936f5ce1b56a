//! virtio-rng (device ID 4): one queue whose device-writable buffers the device fills with
//! bytes from the host's getrandom(2).

use crate::{DeviceError, VirtioDevice, VIRTIO_F_VERSION_1};
use std::io::Write;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

/// The virtio device ID of an entropy source.
pub const VIRTIO_ID_RNG: u32 = 4;
/// Queue size offered.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes served per request: a hostile driver may describe gigabytes.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// The entropy device.
pub struct Rng {
    /// Bytes handed to the guest so far.
    pub bytes_served: u64,
    /// Where getrandom writes before the bytes go to the guest; allocated once.
    random: Box<[u8]>,
}

impl Default for Rng {
    fn default() -> Self {
        Rng { bytes_served: 0, random: vec![0u8; MAX_REQUEST_BYTES].into_boxed_slice() }
    }
}

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: getrandom writes at most rest.len() bytes into the slice it is given.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        filled += n.unsigned_abs();
    }
    Ok(())
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn process_queue(
        &mut self,
        mem: &GuestMemoryMmap,
        index: u16,
        queue: &mut Queue,
    ) -> Result<bool, DeviceError> {
        let (random, bytes_served) = (&mut self.random, &mut self.bytes_served);
        crate::drain_queue(mem, index, queue, |chain| {
            // A chain the device cannot write (read-only buffers, addresses outside guest
            // memory, lengths that overflow) is returned with nothing written.
            let written = match chain.writer(mem) {
                Ok(mut writer) => {
                    let want = writer.available_bytes().min(MAX_REQUEST_BYTES);
                    match getrandom(&mut random[..want]) {
                        Ok(()) => writer.write(&random[..want]).unwrap_or(0),
                        Err(_) => 0,
                    }
                }
                Err(_) => 0,
            };
            *bytes_served += written as u64;
            Some(u32::try_from(written).unwrap_or(0))
        })
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
    }

    fn used_len(vq: &MockSplitQueue<'_, GuestMemoryMmap>, mem: &GuestMemoryMmap, i: u64) -> u32 {
        // Used ring: flags (2), idx (2), then 8-byte elements {id: u32, len: u32}.
        mem.read_obj(vq.used_addr().unchecked_add(4 + 8 * i + 4)).unwrap()
    }

    #[test]
    fn fills_writable_buffers_with_random_bytes() {
        let mem = mem();
        let vq = MockSplitQueue::new(&mem, 16);
        let descs =
            [RawDescriptor::from(Descriptor::new(0x10_0000, 64, VRING_DESC_F_WRITE as u16, 0))];
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let mut rng = Rng::default();
        assert!(rng.process_queue(&mem, 0, &mut q).unwrap());
        assert_eq!(used_len(&vq, &mem, 0), 64);
        let mut out = [0u8; 64];
        mem.read_slice(&mut out, GuestAddress(0x10_0000)).unwrap();
        assert!(out.iter().any(|b| *b != 0), "64 random bytes are not all zero");
        assert_eq!(rng.bytes_served, 64);
    }

    #[test]
    fn read_only_and_out_of_memory_buffers_get_nothing() {
        let mem = mem();
        let vq = MockSplitQueue::new(&mem, 16);
        let descs = [
            // Device-readable: the rng has nothing to write into.
            RawDescriptor::from(Descriptor::new(0x10_0000, 64, 0, 0)),
            // Writable, but beyond guest memory.
            RawDescriptor::from(Descriptor::new(0x4000_0000, 64, VRING_DESC_F_WRITE as u16, 0)),
        ];
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let mut rng = Rng::default();
        assert!(rng.process_queue(&mem, 0, &mut q).unwrap());
        assert_eq!(used_len(&vq, &mem, 0), 0);
        assert_eq!(used_len(&vq, &mem, 1), 0);
        assert_eq!(rng.bytes_served, 0);
    }

    #[test]
    fn huge_requests_are_capped() {
        let mem = mem();
        let vq = MockSplitQueue::new(&mem, 16);
        let descs = [RawDescriptor::from(Descriptor::new(
            0x10_0000,
            0x80_0000,
            VRING_DESC_F_WRITE as u16,
            0,
        ))];
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let mut rng = Rng::default();
        rng.process_queue(&mem, 0, &mut q).unwrap();
        assert_eq!(used_len(&vq, &mem, 0), MAX_REQUEST_BYTES as u32);
    }

    #[test]
    fn a_looping_chain_ends() {
        let mem = mem();
        let vq = MockSplitQueue::new(&mem, 16);
        // Descriptor 0 chains to itself forever.
        let desc = Descriptor::new(0x10_0000, 16, (VRING_DESC_F_WRITE | 1) as u16, 0);
        vq.desc_table().store(0, RawDescriptor::from(desc)).unwrap();
        vq.avail().ring().ref_at(0).unwrap().store(0u16);
        vq.avail().idx().store(1u16);
        let mut q: Queue = vq.create_queue().unwrap();
        let mut rng = Rng::default();
        // Must return (the chain iterator stops after queue-size descriptors).
        let _ = rng.process_queue(&mem, 0, &mut q);
        assert!(rng.bytes_served <= 16 * 16);
    }
}
