//! Loading a kernel, an initrd and the command line into guest memory.

use crate::config::KernelImage;
use crate::error::VmmError;
use arch::boot::InitrdInfo;
use arch::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, MMIO_HOLE_START};
use linux_loader::loader::{self, bzimage::BzImage, elf::Elf, KernelLoader, KernelLoaderResult};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

/// What the loader found.
pub struct LoadedKernel {
    /// The loader's result (entry, setup header).
    pub result: KernelLoaderResult,
    /// Where the vCPU starts.
    pub entry: u64,
    /// True when the kernel is ELF and has a PVH entry.
    pub pvh: bool,
}

enum Format {
    Elf,
    BzImage,
}

fn detect(name: &str, header: &[u8]) -> Result<Format, VmmError> {
    if header.len() >= 4 && header[..4] == *b"\x7fELF" {
        return Ok(Format::Elf);
    }
    // A bzImage has "HdrS" at 0x202 (the setup header's magic).
    if header.len() >= 0x206 && header[0x202..0x206] == *b"HdrS" {
        return Ok(Format::BzImage);
    }
    let shown = header.iter().take(4).fold(String::new(), |s, b| s + &format!("{b:02x}"));
    let detail = if header.len() < 0x206 {
        format!("file is only {} bytes", header.len())
    } else {
        format!("bad magic 0x{shown}")
    };
    Err(VmmError::KernelFormat { name: name.to_string(), detail })
}

fn load_from<F: Read + Seek + vm_memory::ReadVolatile>(
    mem: &GuestMemoryMmap,
    name: &str,
    image: &mut F,
    image_len: u64,
    mem_size: u64,
) -> Result<LoadedKernel, VmmError> {
    let mut header = vec![0u8; 0x400];
    let n = read_up_to(image, &mut header)
        .map_err(|source| VmmError::KernelRead { path: name.into(), source })?;
    header.truncate(n);
    let format = detect(name, &header)?;
    // Refuse early, with a clear message, what obviously cannot fit.
    let low_ram = mem_size.min(MMIO_HOLE_START);
    if HIMEM_START.saturating_add(image_len) > low_ram {
        return Err(VmmError::KernelTooLarge {
            name: name.into(),
            needed: (HIMEM_START + image_len).div_ceil(1 << 20),
            memory: mem_size >> 20,
        });
    }
    let highmem = Some(GuestAddress(HIMEM_START));
    let result = match format {
        Format::Elf => Elf::load(mem, None, image, highmem),
        Format::BzImage => BzImage::load(mem, None, image, highmem),
    };
    let result = result.map_err(|source| match source {
        loader::Error::Elf(linux_loader::loader::elf::Error::ReadKernelImage)
        | loader::Error::Bzimage(
            linux_loader::loader::bzimage::Error::ReadBzImageCompressedKernel,
        ) => VmmError::KernelTooLarge {
            name: name.into(),
            needed: (HIMEM_START + image_len).div_ceil(1 << 20),
            memory: mem_size >> 20,
        },
        source => VmmError::KernelLoad { name: name.into(), source },
    })?;
    let (entry, pvh) = match format {
        Format::Elf => match result.pvh_boot_cap {
            loader::PvhBootCapability::PvhEntryPresent(addr) => (addr.raw_value(), true),
            _ => (elf_entry(&header), false),
        },
        // The 64-bit entry point of a bzImage is 0x200 past the protected-mode kernel.
        Format::BzImage => (result.kernel_load.raw_value() + 0x200, false),
    };
    if result.kernel_end > low_ram {
        return Err(VmmError::KernelTooLarge {
            name: name.into(),
            needed: result.kernel_end.div_ceil(1 << 20),
            memory: mem_size >> 20,
        });
    }
    Ok(LoadedKernel { result, entry, pvh })
}

fn elf_entry(header: &[u8]) -> u64 {
    header.get(0x18..0x20).map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
}

fn read_up_to<R: Read>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut total = 0;
    while total < buf.len() {
        match r.read(&mut buf[total..])? {
            0 => break,
            n => total += n,
        }
    }
    Ok(total)
}

/// Loads the kernel into guest memory.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    kernel: &KernelImage,
    mem_size: u64,
) -> Result<LoadedKernel, VmmError> {
    let name = kernel.to_string();
    match kernel {
        KernelImage::Path(path) => {
            let mut file = File::open(path)
                .map_err(|source| VmmError::KernelRead { path: path.clone(), source })?;
            let len = file
                .seek(SeekFrom::End(0))
                .and_then(|len| file.rewind().map(|_| len))
                .map_err(|source| VmmError::KernelRead { path: path.clone(), source })?;
            if file.metadata().is_ok_and(|m| m.is_dir()) {
                return Err(VmmError::KernelRead {
                    path: path.clone(),
                    source: std::io::Error::other("is a directory"),
                });
            }
            load_from(mem, &name, &mut file, len, mem_size)
        }
        KernelImage::Bytes { data, .. } => {
            let mut cursor = std::io::Cursor::new(*data);
            load_from(mem, &name, &mut cursor, data.len() as u64, mem_size)
        }
    }
}

/// Writes the command line; its limit is the smaller of Linux's and what the kernel's setup
/// header says it accepts.
pub fn load_cmdline(
    mem: &GuestMemoryMmap,
    cmdline: &str,
    header_limit: Option<u32>,
) -> Result<usize, VmmError> {
    let limit = header_limit
        .and_then(|l| usize::try_from(l).ok())
        .filter(|l| *l > 0)
        .map_or(CMDLINE_MAX_SIZE, |l| l.saturating_add(1).min(CMDLINE_MAX_SIZE));
    if cmdline.len() >= limit {
        return Err(VmmError::Cmdline(format!(
            "it is {} bytes long, the boot protocol allows at most {}",
            cmdline.len(),
            limit - 1
        )));
    }
    if cmdline.bytes().any(|b| b == 0) {
        return Err(VmmError::Cmdline("it contains a NUL byte".into()));
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(|e| VmmError::Cmdline(format!("cannot write it to guest memory: {e}")))?;
    Ok(bytes.len())
}

/// Loads the initrd as high as possible in low memory (below the kernel's limit), page aligned.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    mem_size: u64,
    addr_max: Option<u32>,
) -> Result<InitrdInfo, VmmError> {
    let mut file =
        File::open(path).map_err(|source| VmmError::InitrdRead { path: path.into(), source })?;
    let size =
        file.metadata().map_err(|source| VmmError::InitrdRead { path: path.into(), source })?.len();
    let max_end = addr_max
        .filter(|m| *m != 0)
        .map_or(u64::MAX, |m| u64::from(m) + 1)
        .min(mem_size.min(MMIO_HOLE_START));
    let too_large = || VmmError::InitrdTooLarge { path: path.into(), size, limit: max_end };
    let start = max_end.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if start < kernel_end || start < HIMEM_START {
        return Err(too_large());
    }
    let len = usize::try_from(size).map_err(|_| too_large())?;
    mem.read_exact_volatile_from(GuestAddress(start), &mut file, len).map_err(|e| {
        VmmError::InitrdRead { path: path.into(), source: std::io::Error::other(e.to_string()) }
    })?;
    Ok(InitrdInfo { addr: start, size })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_formats_and_names_bad_magic() {
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        assert!(matches!(detect("k", &elf), Ok(Format::Elf)));
        let mut bz = vec![0u8; 0x400];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert!(matches!(detect("k", &bz), Ok(Format::BzImage)));
        let junk = vec![0x12u8; 0x400];
        let msg = detect("/x/vmlinux", &junk).err().unwrap().to_string();
        assert_eq!(
            msg,
            "cannot load kernel /x/vmlinux: not an ELF or bzImage (bad magic 0x12121212)"
        );
        let msg = detect("k", b"ab").err().unwrap().to_string();
        assert!(msg.contains("only 2 bytes"), "{msg}");
    }

    #[test]
    fn command_line_limits() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert_eq!(load_cmdline(&mem, "console=ttyS0", None).unwrap(), 14);
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        let err = load_cmdline(&mem, &long, None).unwrap_err().to_string();
        assert!(err.contains("2048 bytes long") && err.contains("at most 2047"), "{err}");
        assert!(load_cmdline(&mem, &"y".repeat(300), Some(255)).is_err());
        assert!(load_cmdline(&mem, &"y".repeat(255), Some(255)).is_ok());
        assert!(load_cmdline(&mem, "a\0b", None).is_err());
        let back: [u8; 4] = mem.read_obj(GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&back, b"yyyy");
    }
}
