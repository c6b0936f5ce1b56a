//! Guest memory: anonymous mappings laid out by `arch::boot::ram_ranges`, registered with KVM
//! as one memory slot per range.

use crate::error::VmmError;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{
    Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap, MmapRegion,
};

/// Maps guest memory. Without `hugepages`, the mapping asks for transparent huge pages:
/// touching guest memory then costs one fault per 2 MiB instead of per 4 KiB, which matters
/// most where each fault is emulated (PVM hosts). With `hugepages`, memory comes from
/// hugetlbfs and must have been reserved by the administrator.
pub fn create_guest_memory(size: u64, hugepages: bool) -> Result<GuestMemoryMmap, VmmError> {
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
        let mapping = MmapRegion::build(None, len_usize, libc::PROT_READ | libc::PROT_WRITE, flags)
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
