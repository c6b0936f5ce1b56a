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
        format!("not an ELF or bzImage (file is only {} bytes)", header.len())
    } else {
        format!("not an ELF or bzImage (bad magic 0x{shown})")
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
    let low_ram = mem_size.min(MMIO_HOLE_START);
    match format {
        Format::Elf => check_elf_segments(name, image, image_len, low_ram, mem_size)?,
        Format::BzImage => {
            check_bzimage_size(name, &header, image_len)?;
            // The whole file past the setup sectors is copied to 1 MiB.
            if HIMEM_START.saturating_add(image_len) > low_ram {
                return Err(VmmError::KernelTooLarge {
                    name: name.into(),
                    needed: (HIMEM_START + image_len).div_ceil(1 << 20),
                    memory: mem_size >> 20,
                });
            }
        }
    }
    let highmem = Some(GuestAddress(HIMEM_START));
    let result = match format {
        Format::Elf => Elf::load(mem, None, image, highmem),
        Format::BzImage => BzImage::load(mem, None, image, highmem),
    };
    // Sizes and truncation were checked above, so what the loader still rejects is reported
    // in its own words.
    let result = result.map_err(|source| VmmError::KernelLoad { name: name.into(), source })?;
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

fn truncated(name: &str, detail: String) -> VmmError {
    VmmError::KernelFormat { name: name.into(), detail }
}

/// Checks an ELF's loadable segments against the file (truncation) and guest memory (size),
/// so that each failure gets its own message.
fn check_elf_segments<F: Read + Seek>(
    name: &str,
    image: &mut F,
    image_len: u64,
    low_ram: u64,
    mem_size: u64,
) -> Result<(), VmmError> {
    const PT_LOAD: u32 = 1;
    let mut ehdr = [0u8; 64];
    image.rewind().and_then(|_| image.read_exact(&mut ehdr)).map_err(|_| {
        truncated(name, format!("ELF file is {image_len} bytes, shorter than its 64-byte header"))
    })?;
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]));
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
    if ehdr[4] != 2 || ehdr[5] != 1 {
        return Err(truncated(
            name,
            "not a 64-bit little-endian ELF (only x86-64 kernels boot)".into(),
        ));
    }
    let (phoff, phentsize, phnum) = (u64_at(&ehdr, 32), u16_at(&ehdr, 54), u16_at(&ehdr, 56));
    if usize::from(phentsize) < 56 {
        return Err(truncated(name, format!("ELF program header size {phentsize} is too small")));
    }
    u64::from(phentsize)
        .checked_mul(u64::from(phnum))
        .and_then(|len| len.checked_add(phoff))
        .filter(|end| *end <= image_len)
        .ok_or_else(|| {
            truncated(
                name,
                format!("ELF program headers lie beyond the end of the {image_len}-byte file"),
            )
        })?;
    let mut highest = 0u64;
    for i in 0..u64::from(phnum) {
        let mut ph = [0u8; 56];
        image
            .seek(SeekFrom::Start(phoff + i * u64::from(phentsize)))
            .and_then(|_| image.read_exact(&mut ph))
            .map_err(|_| truncated(name, format!("cannot read ELF program header {i}")))?;
        if u32_at(&ph, 0) != PT_LOAD {
            continue;
        }
        let (offset, paddr, filesz, memsz) =
            (u64_at(&ph, 8), u64_at(&ph, 24), u64_at(&ph, 32), u64_at(&ph, 40));
        let file_end = offset.saturating_add(filesz);
        if file_end > image_len {
            return Err(truncated(
                name,
                format!("truncated: segment {i} needs bytes up to {file_end} but the file has {image_len}"),
            ));
        }
        highest = highest.max(paddr.saturating_add(memsz.max(filesz)));
    }
    if highest > low_ram {
        return Err(VmmError::KernelTooLarge {
            name: name.into(),
            needed: highest.div_ceil(1 << 20),
            memory: mem_size >> 20,
        });
    }
    image.rewind().map_err(|source| VmmError::KernelRead { path: name.into(), source })
}

/// A bzImage says how long its protected-mode part is; a shorter file is truncated.
fn check_bzimage_size(name: &str, header: &[u8], image_len: u64) -> Result<(), VmmError> {
    let setup_sects = match header.get(0x1f1) {
        Some(0) | None => 4,
        Some(n) => u64::from(*n),
    };
    let syssize = header
        .get(0x1f4..0x1f8)
        .map_or(0, |b| u64::from(u32::from_le_bytes(b.try_into().unwrap_or([0; 4]))));
    let expected = (setup_sects + 1) * 512 + syssize * 16;
    if image_len < expected {
        return Err(truncated(
            name,
            format!("truncated bzImage: its header describes {expected} bytes but the file has {image_len}"),
        ));
    }
    Ok(())
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
