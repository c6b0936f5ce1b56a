//! Guest memory: anonymous mappings (memfds when a vhost-user backend shares them) laid out by
//! `arch::boot::ram_ranges`, registered with KVM as one memory slot per range.

use crate::error::VmmError;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{
    Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap, MmapRegion,
};

/// A memfd of `len` bytes (hugetlbfs pages with `hugepages`) for one range of shared guest
/// memory.
fn guest_memfd(len: u64, hugepages: bool) -> std::io::Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    let mut flags = libc::MFD_CLOEXEC;
    if hugepages {
        flags |= libc::MFD_HUGETLB;
    }
    // SAFETY: the name is a NUL-terminated literal; the call has no other inputs.
    let fd = unsafe { libc::memfd_create(c"vanguard-guest-ram".as_ptr(), flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(len)?;
    Ok(file)
}

/// Maps guest memory. Without `hugepages`, the mapping asks for transparent huge pages:
/// touching guest memory then costs one fault per 2 MiB instead of per 4 KiB, which matters
/// most where each fault is emulated (PVM hosts). With `hugepages`, memory comes from
/// hugetlbfs and must have been reserved by the administrator. With `shared` (a vhost-user
/// backend will map it), each range is a memfd mapped MAP_SHARED whose descriptor the regions
/// keep (`file_offset`); THP then depends on the host's shmem setting
/// (/sys/kernel/mm/transparent_hugepage/shmem_enabled: `advise` honours the same madvise).
pub fn create_guest_memory(
    size: u64,
    hugepages: bool,
    shared: bool,
) -> Result<GuestMemoryMmap, VmmError> {
    let mut regions = Vec::new();
    for (start, len) in arch::boot::ram_ranges(size)? {
        let len_usize = usize::try_from(len).map_err(|_| VmmError::MemoryAlloc {
            size: len,
            hint: "",
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        })?;
        // Hugetlb mappings reserve their pages at mmap time (no MAP_NORESERVE), so a shortage
        // is a clear error here rather than a SIGBUS on the first guest access.
        let flags = if hugepages {
            libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_HUGETLB
        } else {
            libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE
        };
        let (file, flags) = if shared {
            let file = guest_memfd(len, hugepages).map_err(|source| VmmError::MemoryAlloc {
                size: len,
                hint: if hugepages {
                    " as a hugetlbfs memfd (are enough 2 MiB pages reserved?)"
                } else {
                    " as a memfd (shared with vhost-user backends)"
                },
                source,
            })?;
            // Hugetlb pages are reserved when the memfd is mapped, as above.
            (Some(vm_memory::FileOffset::new(file, 0)), libc::MAP_SHARED)
        } else {
            (None, flags)
        };
        let mapping = MmapRegion::build(file, len_usize, libc::PROT_READ | libc::PROT_WRITE, flags)
            .map_err(|e| VmmError::MemoryAlloc {
                size: len,
                hint: if hugepages {
                    " from hugetlbfs (are enough 2 MiB pages reserved in /proc/sys/vm/nr_hugepages?)"
                } else {
                    ""
                },
                source: std::io::Error::other(e.to_string()),
            })?;
        if !hugepages {
            // SAFETY: the range is exactly the mapping just created, owned by `mapping`.
            // madvise only changes how the kernel backs it; failure is harmless.
            unsafe {
                libc::madvise(mapping.as_ptr().cast(), len_usize, libc::MADV_HUGEPAGE);
            }
        }
        let region = GuestRegionMmap::new(mapping, start).ok_or_else(|| VmmError::MemoryAlloc {
            size: len,
            hint: " (the range overflows the guest address space)",
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        })?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| VmmError::MemoryAlloc {
        size,
        hint: "",
        source: std::io::Error::other(e.to_string()),
    })
}

/// Maps guest RAM that another VMM process on this host handed over (a live migration): one
/// memfd per RAM range, each exactly that range's length, mapped shared, so that it can be
/// handed on again.
pub(crate) fn map_handed(
    ranges: &[crate::snapshot::RamRange],
    memfds: Vec<std::fs::File>,
) -> Result<GuestMemoryMmap, VmmError> {
    let bad = |size: u64, hint: &'static str, source: std::io::Error| VmmError::MemoryAlloc {
        size,
        hint,
        source,
    };
    let mut regions = Vec::with_capacity(ranges.len());
    for (range, file) in ranges.iter().zip(memfds) {
        let len = file.metadata().map_err(|e| bad(range.len, " (the handed-over memfd)", e))?.len();
        if len != range.len {
            return Err(bad(
                range.len,
                " (a handed-over memfd is not as long as its RAM range)",
                std::io::Error::from(std::io::ErrorKind::InvalidData),
            ));
        }
        let len_usize = usize::try_from(len)
            .map_err(|_| bad(len, "", std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
        let mapping = MmapRegion::build(
            Some(vm_memory::FileOffset::new(file, 0)),
            len_usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
        .map_err(|e| {
            bad(len, " (mapping a handed-over memfd)", std::io::Error::other(e.to_string()))
        })?;
        let region = GuestRegionMmap::new(mapping, vm_memory::GuestAddress(range.guest))
            .ok_or_else(|| {
                bad(len, " (the range overflows)", std::io::ErrorKind::InvalidInput.into())
            })?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions)
        .map_err(|e| bad(0, "", std::io::Error::other(e.to_string())))
}

/// Registers every region of `mem` with KVM.
pub fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), VmmError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region.get_host_address(vm_memory::MemoryRegionAddress(0)).map_err(|_| {
            VmmError::MemoryAlloc {
                size: region.len(),
                hint: "",
                source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
            }
        })?;
        let desc = kvm_userspace_memory_region {
            slot: u32::try_from(slot).unwrap_or(u32::MAX),
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the host range belongs to `mem`, which the VM keeps alive (and mapped) for
        // as long as the VM fd exists; the slot numbers are unique.
        unsafe { vm.set_user_memory_region(desc) }
            .map_err(|source| VmmError::Kvm { what: "register guest memory", source })?;
    }
    Ok(())
}
