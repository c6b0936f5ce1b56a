//! Snapshots of a running VM: what is captured (every vCPU's KVM state, the in-kernel
//! interrupt controllers, PIT and clock, the legacy devices, guest memory), how it is written
//! into a snapshot directory, and how a new process reads it back. The container (header,
//! versioned sections, checksum) is the `snapshot` crate; docs/snapshot.md specifies every
//! section.
//!
//! A snapshot directory holds `state` (the sections) and `memory` (guest RAM, the ranges of the
//! `machine` section one after another; pages that were zero are holes). A full snapshot writes
//! both to temporary names and renames them into place; an incremental one removes `state`,
//! writes only the pages KVM's dirty log reports into `memory`, then writes `state` again, so an
//! interrupted snapshot leaves no `state` rather than one that disagrees with `memory`.

use crate::control::ControlError;
use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_userspace_memory_region, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use snapshot::{Decoder, Encoder, Section, SnapshotError, Writer, FLAG_REQUIRED};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use zerocopy::{FromBytes, IntoBytes};

/// The state file in a snapshot directory.
pub const STATE_FILE: &str = "state";
/// The guest memory file in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";

const PAGE: usize = 4096;

const MACHINE: &str = "machine";
const VCPU: &str = "vcpu";
const KVM_VM: &str = "kvm-vm";
const SERIAL: &str = "serial";
const I8042: &str = "i8042";
const ACPI_PM: &str = "acpi-pm";
const PCI: &str = "pci";
const VIRTIO: &str = "virtio";

/// The version of the `machine` section this Vanguard writes (2: with virtio devices).
pub(crate) const MACHINE_VERSION: u16 = 2;

/// Every section this Vanguard reads, with the newest version it reads (and writes).
const KNOWN: &[(&str, u16)] = &[
    (MACHINE, MACHINE_VERSION),
    (VCPU, 1),
    (KVM_VM, 1),
    (SERIAL, 1),
    (I8042, 1),
    (ACPI_PM, 1),
    (PCI, 1),
    (VIRTIO, 1),
];

/// Why a snapshot or a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotFailure {
    /// The state file is not one this Vanguard reads.
    #[error("{path}: {source}")]
    Format {
        /// The state file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: SnapshotError,
    },
    /// A file could not be read or written.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
    /// This VM cannot be snapshotted (yet), or not this way.
    #[error("cannot snapshot this VM: {0}")]
    Unsupported(String),
    /// The snapshot does not fit this host or this Vanguard.
    #[error("cannot restore the snapshot here: {0}")]
    Incompatible(String),
    /// A KVM call failed.
    #[error("KVM refused to {what}: {source}")]
    Kvm {
        /// What was being done.
        what: String,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The VM's state does not allow it.
    #[error("{0}")]
    Control(#[from] ControlError),
    /// A live migration failed (the source resumed, the destination discarded the VM).
    #[error("migration failed: {0}")]
    Migration(String),
}

fn kvm(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotFailure {
    let what = what.into();
    move |source| SnapshotFailure::Kvm { what, source }
}

fn io<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> SnapshotFailure + 'a {
    move |source| SnapshotFailure::Io { what, path: path.to_path_buf(), source }
}

/// One vCPU's KVM state.
pub(crate) struct VcpuState {
    cpuid: Vec<kvm_cpuid_entry2>,
    mp_state: kvm_mp_state,
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: Box<kvm_xsave>,
    xcrs: kvm_xcrs,
    debugregs: kvm_debugregs,
    lapic: kvm_lapic_state,
    events: kvm_vcpu_events,
    msrs: Vec<(u32, u64)>,
    tsc_khz: u32,
}

fn raw<T: IntoBytes + zerocopy::Immutable>(e: &mut Encoder, value: &T) {
    e.bytes(value.as_bytes());
}

fn unraw<T: FromBytes>(d: &mut Decoder<'_>, what: &str) -> Result<T, SnapshotError> {
    let bytes = d.exact(std::mem::size_of::<T>(), what)?;
    T::read_from_bytes(bytes).map_err(|_| d.malformed(format!("{what} does not decode")))
}

/// Reads every MSR of `indices` that KVM returns for this vCPU: KVM_GET_MSRS stops at the
/// first index it refuses, which is then left out.
fn read_msrs(vcpu: &VcpuFd, cpu: u8, indices: &[u32]) -> Result<Vec<(u32, u64)>, SnapshotFailure> {
    let mut wanted: Vec<u32> = indices.to_vec();
    loop {
        let entries: Vec<kvm_bindings::kvm_msr_entry> = wanted
            .iter()
            .map(|&index| kvm_bindings::kvm_msr_entry { index, ..Default::default() })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|_| SnapshotFailure::Unsupported("too many MSRs".into()))?;
        let read = vcpu.get_msrs(&mut msrs).map_err(kvm(format!("read vCPU {cpu}'s MSRs")))?;
        if read == wanted.len() {
            return Ok(msrs.as_slice().iter().map(|m| (m.index, m.data)).collect());
        }
        wanted.remove(read);
    }
}

/// Captures the state of a parked vCPU, on its own thread. First lets KVM finish the
/// instruction of the last exit (an IN's value reaches RAX only at the next KVM_RUN): with
/// immediate_exit set, KVM_RUN completes it and returns without entering the guest.
pub(crate) fn capture_vcpu(
    vcpu: &mut VcpuFd,
    cpu: u8,
    msr_indices: &[u32],
) -> Result<VcpuState, SnapshotFailure> {
    vcpu.set_kvm_immediate_exit(1);
    let completed = vcpu.run().map(|_| ());
    vcpu.set_kvm_immediate_exit(0);
    match completed {
        Err(e) if e.errno() == libc::EINTR => {}
        Ok(()) => {}
        Err(e) => return Err(kvm(format!("complete vCPU {cpu}'s last exit"))(e)),
    }
    let what = |w: &str| format!("read vCPU {cpu}'s {w}");
    Ok(VcpuState {
        cpuid: vcpu
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm(what("CPUID")))?
            .as_slice()
            .to_vec(),
        mp_state: vcpu.get_mp_state().map_err(kvm(what("MP state")))?,
        regs: vcpu.get_regs().map_err(kvm(what("registers")))?,
        sregs: vcpu.get_sregs().map_err(kvm(what("special registers")))?,
        xsave: Box::new(vcpu.get_xsave().map_err(kvm(what("XSAVE area")))?),
        xcrs: vcpu.get_xcrs().map_err(kvm(what("XCRs")))?,
        debugregs: vcpu.get_debug_regs().map_err(kvm(what("debug registers")))?,
        lapic: vcpu.get_lapic().map_err(kvm(what("LAPIC")))?,
        events: vcpu.get_vcpu_events().map_err(kvm(what("pending events")))?,
        msrs: read_msrs(vcpu, cpu, msr_indices)?,
        tsc_khz: vcpu.get_tsc_khz().map_err(kvm(what("TSC frequency")))?,
    })
}

/// Puts a saved state into a new vCPU, before it first runs. The order matters to KVM:
/// CPUID first, MSRs after the LAPIC (the TSC deadline depends on it), events last.
/// `fresh` is the CPUID a new VM on this host would give the vCPU: every CPU feature the
/// guest was shown must be one the vCPU also shows here (KVM_GET_CPUID2 after setting it;
/// on PVM hosts it reports the host processor's features, not only KVM's supported list).
pub(crate) fn restore_vcpu(
    vcpu: &VcpuFd,
    cpu: u8,
    state: &VcpuState,
    fresh: &CpuId,
) -> Result<(), SnapshotFailure> {
    let what = |w: &str| format!("set vCPU {cpu}'s {w}");
    vcpu.set_cpuid2(fresh).map_err(kvm(what("CPUID")))?;
    let here = vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(kvm(what("CPUID")))?;
    check_cpuid(cpu, &state.cpuid, here.as_slice())?;
    let cpuid = CpuId::from_entries(&state.cpuid)
        .map_err(|_| SnapshotFailure::Incompatible("too many CPUID entries".into()))?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm(what("CPUID")))?;
    let host_khz = vcpu.get_tsc_khz().map_err(kvm(what("TSC frequency")))?;
    if host_khz != state.tsc_khz {
        // As QEMU does on an incoming migration: a TSC KVM cannot scale is a warning, not a
        // refusal. The guest's kvm-clock follows the host's rate (KVM publishes it anew); only
        // a guest timing itself by raw TSC ticks sees them go faster or slower.
        if let Err(e) = vcpu.set_tsc_khz(state.tsc_khz) {
            if cpu == 0 {
                eprintln!(
                    "vanguard: warning: the guest's TSC ran at {} kHz, this host's runs at \
                     {host_khz} kHz, and KVM cannot scale it ({e}): the guest's raw TSC now \
                     ticks at this host's rate (its kvm-clock stays right)",
                    state.tsc_khz
                );
            }
        }
    }
    check_xsave(cpu, state, here.as_slice())?;
    vcpu.set_mp_state(state.mp_state).map_err(kvm(what("MP state")))?;
    vcpu.set_regs(&state.regs).map_err(kvm(what("registers")))?;
    vcpu.set_sregs(&state.sregs).map_err(kvm(what("special registers")))?;
    // SAFETY: the area is a whole kvm_xsave (4096 bytes); the VM was checked to need no more
    // (KVM_CAP_XSAVE2 at most 4096, `check_host`), so KVM reads nothing past it.
    unsafe { vcpu.set_xsave(&state.xsave) }.map_err(kvm(what("XSAVE area")))?;
    vcpu.set_xcrs(&state.xcrs).map_err(kvm(what("XCRs")))?;
    vcpu.set_debug_regs(&state.debugregs).map_err(kvm(what("debug registers")))?;
    vcpu.set_lapic(&state.lapic).map_err(kvm(what("LAPIC")))?;
    let entries: Vec<kvm_bindings::kvm_msr_entry> = state
        .msrs
        .iter()
        .map(|&(index, data)| kvm_bindings::kvm_msr_entry { index, data, ..Default::default() })
        .collect();
    let msrs = Msrs::from_entries(&entries)
        .map_err(|_| SnapshotFailure::Incompatible("too many MSRs".into()))?;
    let written = vcpu.set_msrs(&msrs).map_err(kvm(what("MSRs")))?;
    if written != entries.len() {
        let index = entries.get(written).map_or(0, |e| e.index);
        return Err(SnapshotFailure::Incompatible(format!(
            "KVM refused vCPU {cpu}'s MSR {index:#x} (written {written} of {})",
            entries.len()
        )));
    }
    vcpu.set_vcpu_events(&state.events).map_err(kvm(what("pending events")))?;
    Ok(())
}

fn encode_vcpu(cpu: u8, s: &VcpuState) -> Encoder {
    let mut e = Encoder::new();
    e.u32(u32::from(cpu)).u32(s.tsc_khz);
    e.u32(u32::try_from(s.cpuid.len()).unwrap_or(0));
    for entry in &s.cpuid {
        raw(&mut e, entry);
    }
    raw(&mut e, &s.mp_state);
    raw(&mut e, &s.regs);
    raw(&mut e, &s.sregs);
    raw(&mut e, &*s.xsave);
    raw(&mut e, &s.xcrs);
    raw(&mut e, &s.debugregs);
    raw(&mut e, &s.lapic);
    raw(&mut e, &s.events);
    e.u32(u32::try_from(s.msrs.len()).unwrap_or(0));
    for (index, value) in &s.msrs {
        e.u32(*index).u64(*value);
    }
    e
}

fn decode_vcpu(section: &Section<'_>) -> Result<(u32, VcpuState), SnapshotError> {
    let mut d = section.decoder();
    let cpu = d.u32("vCPU index")?;
    let tsc_khz = d.u32("TSC frequency")?;
    let n = d.count(4 + std::mem::size_of::<kvm_cpuid_entry2>(), "CPUID entries")?;
    let mut cpuid = Vec::with_capacity(n);
    for _ in 0..n {
        cpuid.push(unraw::<kvm_cpuid_entry2>(&mut d, "CPUID entry")?);
    }
    let state = VcpuState {
        cpuid,
        mp_state: unraw(&mut d, "MP state")?,
        regs: unraw(&mut d, "kvm_regs")?,
        sregs: unraw(&mut d, "kvm_sregs")?,
        xsave: Box::new(unraw(&mut d, "kvm_xsave")?),
        xcrs: unraw(&mut d, "kvm_xcrs")?,
        debugregs: unraw(&mut d, "kvm_debugregs")?,
        lapic: unraw(&mut d, "kvm_lapic_state")?,
        events: unraw(&mut d, "kvm_vcpu_events")?,
        msrs: {
            let n = d.count(12, "MSRs")?;
            let mut msrs = Vec::with_capacity(n);
            for _ in 0..n {
                msrs.push((d.u32("MSR index")?, d.u64("MSR value")?));
            }
            msrs
        },
        tsc_khz,
    };
    d.finish()?;
    Ok((cpu, state))
}

/// The in-kernel devices' state: both PICs, the IOAPIC, the PIT and the kvm-clock.
#[derive(Clone)]
pub(crate) struct KvmVmState {
    chips: [kvm_irqchip; 3],
    pit: kvm_pit_state2,
    clock: kvm_clock_data,
}

const CHIP_IDS: [u32; 3] = [KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC];

fn capture_kvm_vm(vm: &VmFd) -> Result<KvmVmState, SnapshotFailure> {
    let mut chips = [kvm_irqchip::default(); 3];
    for (chip, id) in chips.iter_mut().zip(CHIP_IDS) {
        chip.chip_id = id;
        vm.get_irqchip(chip).map_err(kvm(format!("read irqchip {id}")))?;
    }
    Ok(KvmVmState {
        chips,
        pit: vm.get_pit2().map_err(kvm("read the PIT"))?,
        clock: vm.get_clock().map_err(kvm("read the kvm-clock"))?,
    })
}

/// Puts the in-kernel devices' state back (after they were created, before any vCPU runs).
pub(crate) fn restore_kvm_vm(vm: &VmFd, s: &KvmVmState) -> Result<(), SnapshotFailure> {
    vm.set_pit2(&s.pit).map_err(kvm("set the PIT"))?;
    let clock = kvm_clock_data { clock: s.clock.clock, ..Default::default() };
    vm.set_clock(&clock).map_err(kvm("set the kvm-clock"))?;
    for chip in &s.chips {
        vm.set_irqchip(chip).map_err(kvm(format!("set irqchip {}", chip.chip_id)))?;
    }
    Ok(())
}

/// Where guest RAM is, in the guest and in the memory file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RamRange {
    pub guest: u64,
    pub len: u64,
    pub file_offset: u64,
}

/// A virtio device as its configuration describes it: what a new process builds before the
/// device's state goes in. Disks are referenced by path, not copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum VirtioDesc {
    /// A virtio-blk disk on a raw image, `size` bytes long when the VM was saved.
    Disk {
        path: PathBuf,
        size: u64,
        read_only: bool,
        direct: bool,
        serial: String,
        rate_limit: Option<String>,
    },
    /// A virtio-net device on a TAP.
    Net { tap: String, mac: [u8; 6], rate_limit: Option<String> },
    /// A virtio-rng device.
    Rng,
    /// A virtio-vsock device listening on `socket`.
    Vsock { cid: u64, socket: PathBuf },
    /// A virtio-balloon device (its current target is in its state).
    Balloon { target: u64, deflate_on_oom: bool },
}

impl VirtioDesc {
    /// The devices `config` gives the guest, in the order it numbers them (the order
    /// `Vm::build` creates them in).
    pub(crate) fn from_config(config: &crate::config::VmConfig) -> Result<Vec<Self>, String> {
        let mut out = Vec::new();
        let text = |p: &Path| {
            p.to_str().map(str::to_string).ok_or_else(|| format!("{} is not UTF-8", p.display()))
        };
        for disk in &config.disks {
            if let Some(socket) = &disk.vhost_user {
                return Err(format!(
                    "a disk is served by the vhost-user backend at {}, which holds its rings",
                    socket.display()
                ));
            }
            let size = std::fs::metadata(&disk.path)
                .map_err(|e| format!("{}: {e}", disk.path.display()))?
                .len();
            out.push(VirtioDesc::Disk {
                path: PathBuf::from(text(&disk.path)?),
                size,
                read_only: disk.read_only,
                direct: disk.direct,
                serial: disk.serial.clone(),
                rate_limit: disk.rate_limit.as_ref().map(ToString::to_string),
            });
        }
        for (index, net) in config.nets.iter().enumerate() {
            out.push(VirtioDesc::Net {
                tap: net.tap.clone(),
                mac: net.mac.unwrap_or_else(|| crate::config::NetConfig::default_mac(index)),
                rate_limit: net.rate_limit.as_ref().map(ToString::to_string),
            });
        }
        if config.rng {
            out.push(VirtioDesc::Rng);
        }
        if let Some(vsock) = &config.vsock {
            out.push(VirtioDesc::Vsock {
                cid: vsock.cid,
                socket: PathBuf::from(text(&vsock.socket)?),
            });
        }
        if let Some(balloon) = &config.balloon {
            out.push(VirtioDesc::Balloon {
                target: balloon.target,
                deflate_on_oom: balloon.deflate_on_oom,
            });
        }
        Ok(out)
    }

    /// Puts `devices` into `config`, as the command line would have.
    pub(crate) fn apply(
        devices: &[Self],
        config: &mut crate::config::VmConfig,
    ) -> Result<(), String> {
        let limit = |r: &Option<String>| -> Result<_, String> {
            r.as_deref()
                .map(|s| s.parse::<rate_limiter::RateLimiterConfig>())
                .transpose()
                .map_err(|e| format!("a rate limit: {e}"))
        };
        for device in devices {
            match device {
                VirtioDesc::Disk { path, read_only, direct, serial, rate_limit, .. } => {
                    config.disks.push(crate::config::DiskConfig {
                        path: path.clone(),
                        read_only: *read_only,
                        serial: serial.clone(),
                        rate_limit: limit(rate_limit)?,
                        direct: *direct,
                        vhost_user: None,
                    })
                }
                VirtioDesc::Net { tap, mac, rate_limit } => {
                    config.nets.push(crate::config::NetConfig {
                        tap: tap.clone(),
                        mac: Some(*mac),
                        rate_limit: limit(rate_limit)?,
                    })
                }
                VirtioDesc::Rng => config.rng = true,
                VirtioDesc::Vsock { cid, socket } => {
                    config.vsock =
                        Some(crate::config::VsockConfig { cid: *cid, socket: socket.clone() })
                }
                VirtioDesc::Balloon { target, deflate_on_oom } => {
                    config.balloon = Some(crate::config::BalloonConfig {
                        target: *target,
                        deflate_on_oom: *deflate_on_oom,
                    })
                }
            }
        }
        Ok(())
    }

    /// Whether this host can give the guest this device back: a disk's image must be there,
    /// as long as it was; a vsock socket must not be in use by another process.
    pub(crate) fn check_here(&self, index: usize) -> Result<(), SnapshotFailure> {
        match self {
            VirtioDesc::Disk { path, size, .. } => {
                let meta = std::fs::metadata(path).map_err(|e| {
                    SnapshotFailure::Incompatible(format!(
                        "virtio device {index}: the disk image {} is not reachable here: {e}",
                        path.display()
                    ))
                })?;
                if meta.len() != *size {
                    return Err(SnapshotFailure::Incompatible(format!(
                        "virtio device {index}: the disk image {} is {} bytes, it was {size} \
                         when the VM was saved",
                        path.display(),
                        meta.len()
                    )));
                }
                Ok(())
            }
            VirtioDesc::Vsock { socket, .. } => {
                if std::os::unix::net::UnixStream::connect(socket).is_ok() {
                    return Err(SnapshotFailure::Incompatible(format!(
                        "virtio device {index}: the vsock socket {} is in use here",
                        socket.display()
                    )));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn encode(&self, e: &mut Encoder) {
        let opt = |e: &mut Encoder, v: &Option<String>| {
            e.str(v.as_deref().unwrap_or(""));
        };
        match self {
            VirtioDesc::Disk { path, size, read_only, direct, serial, rate_limit } => {
                e.u8(1).str(&path.to_string_lossy()).u64(*size);
                e.u8(u8::from(*read_only)).u8(u8::from(*direct)).str(serial);
                opt(e, rate_limit);
            }
            VirtioDesc::Net { tap, mac, rate_limit } => {
                e.u8(2).str(tap).bytes(mac);
                opt(e, rate_limit);
            }
            VirtioDesc::Rng => {
                e.u8(3);
            }
            VirtioDesc::Vsock { cid, socket } => {
                e.u8(4).u64(*cid).str(&socket.to_string_lossy());
            }
            VirtioDesc::Balloon { target, deflate_on_oom } => {
                e.u8(5).u64(*target).u8(u8::from(*deflate_on_oom));
            }
        }
    }

    fn decode(d: &mut Decoder<'_>) -> Result<Self, SnapshotError> {
        let flag = |d: &mut Decoder<'_>, what: &str| -> Result<bool, SnapshotError> {
            match d.u8(what)? {
                0 => Ok(false),
                1 => Ok(true),
                v => Err(d.malformed(format!("{what} is {v}, not 0 or 1"))),
            }
        };
        let opt = |d: &mut Decoder<'_>, what: &str| -> Result<Option<String>, SnapshotError> {
            let v = d.str(what)?;
            Ok((!v.is_empty()).then(|| v.to_string()))
        };
        Ok(match d.u8("virtio device kind")? {
            1 => VirtioDesc::Disk {
                path: PathBuf::from(d.str("disk path")?),
                size: d.u64("disk size")?,
                read_only: flag(d, "disk read-only flag")?,
                direct: flag(d, "disk O_DIRECT flag")?,
                serial: d.str("disk serial")?.to_string(),
                rate_limit: opt(d, "disk rate limit")?,
            },
            2 => VirtioDesc::Net {
                tap: d.str("TAP name")?.to_string(),
                mac: {
                    let raw = d.bytes("MAC address")?;
                    <[u8; 6]>::try_from(raw)
                        .map_err(|_| d.malformed(format!("a MAC address of {} bytes", raw.len())))?
                },
                rate_limit: opt(d, "net rate limit")?,
            },
            3 => VirtioDesc::Rng,
            4 => VirtioDesc::Vsock {
                cid: d.u64("vsock CID")?,
                socket: PathBuf::from(d.str("vsock socket")?),
            },
            5 => VirtioDesc::Balloon {
                target: d.u64("balloon target")?,
                deflate_on_oom: flag(d, "balloon deflate-on-OOM flag")?,
            },
            k => return Err(d.malformed(format!("virtio device kind {k}"))),
        })
    }

    /// The virtio device ID.
    pub(crate) fn device_type(&self) -> u32 {
        match self {
            VirtioDesc::Disk { .. } => 2,
            VirtioDesc::Net { .. } => 1,
            VirtioDesc::Rng => 4,
            VirtioDesc::Vsock { .. } => 19,
            VirtioDesc::Balloon { .. } => 5,
        }
    }

    /// Where the kind comes in the guest's numbering (disks, nets, rng, vsock, balloon).
    fn rank(&self) -> u8 {
        match self {
            VirtioDesc::Disk { .. } => 1,
            VirtioDesc::Net { .. } => 2,
            VirtioDesc::Rng => 3,
            VirtioDesc::Vsock { .. } => 4,
            VirtioDesc::Balloon { .. } => 5,
        }
    }
}

/// The `machine` section: what a new process must build before putting state into it.
#[derive(Debug, Clone)]
pub(crate) struct MachineDesc {
    pub vcpus: u8,
    pub memory: u64,
    pub mmio_transport: bool,
    pub debug_exit: bool,
    pub boot_timer: bool,
    pub vm_id: [u8; 16],
    pub generation: u64,
    pub ranges: Vec<RamRange>,
    pub memory_file_len: u64,
    /// The virtio devices, in the guest's order.
    pub virtio: Vec<VirtioDesc>,
}

pub(crate) fn encode_machine(m: &MachineDesc) -> Encoder {
    let mut e = Encoder::new();
    e.u32(u32::from(m.vcpus)).u64(m.memory);
    e.u8(u8::from(m.mmio_transport)).u8(u8::from(m.debug_exit)).u8(u8::from(m.boot_timer));
    e.bytes(&m.vm_id).u64(m.generation);
    e.u32(u32::try_from(m.ranges.len()).unwrap_or(0));
    for r in &m.ranges {
        e.u64(r.guest).u64(r.len).u64(r.file_offset);
    }
    e.str(MEMORY_FILE).u64(m.memory_file_len);
    e.u32(u32::try_from(m.virtio.len()).unwrap_or(0));
    for device in &m.virtio {
        device.encode(&mut e);
    }
    e
}

/// Reads a `machine` section of any version (1 has no virtio devices).
pub(crate) fn decode_machine(section: &Section<'_>) -> Result<MachineDesc, SnapshotError> {
    let mut d = section.decoder();
    let vcpus = d.u32("vCPU count")?;
    let vcpus = u8::try_from(vcpus)
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| d.malformed(format!("{vcpus} vCPUs")))?;
    let memory = d.u64("memory size")?;
    let flag = |d: &mut Decoder<'_>, what: &str| -> Result<bool, SnapshotError> {
        match d.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(d.malformed(format!("{what} is {v}, not 0 or 1"))),
        }
    };
    let mmio_transport = flag(&mut d, "virtio transport")?;
    let debug_exit = flag(&mut d, "debug-exit flag")?;
    let boot_timer = flag(&mut d, "boot-timer flag")?;
    let id = d.exact(16, "VM ID")?;
    let mut vm_id = [0u8; 16];
    vm_id.copy_from_slice(id);
    let generation = d.u64("generation")?;
    let n = d.count(24, "RAM ranges")?;
    let mut ranges = Vec::with_capacity(n);
    for _ in 0..n {
        ranges.push(RamRange {
            guest: d.u64("range address")?,
            len: d.u64("range length")?,
            file_offset: d.u64("range file offset")?,
        });
    }
    let file = d.str("memory file name")?;
    if file != MEMORY_FILE {
        return Err(d.malformed(format!("memory file `{file}`, expected `{MEMORY_FILE}`")));
    }
    let memory_file_len = d.u64("memory file length")?;
    let mut virtio = Vec::new();
    if section.version == 1 {
        let count = d.u32("virtio device count")?;
        if count != 0 {
            return Err(d.malformed(format!("{count} virtio devices (version 1 has none)")));
        }
    } else {
        let n = d.count(1, "virtio devices")?;
        for _ in 0..n {
            let device = VirtioDesc::decode(&mut d)?;
            let last = virtio.last().map_or(0, VirtioDesc::rank);
            let single = matches!(
                device,
                VirtioDesc::Rng | VirtioDesc::Vsock { .. } | VirtioDesc::Balloon { .. }
            );
            if device.rank() < last || (single && device.rank() == last) {
                return Err(d.malformed("virtio devices out of order, or a single device twice"));
            }
            virtio.push(device);
        }
    }
    d.finish()?;
    let bad = |what: String| SnapshotError::Malformed { tag: MACHINE.into(), what };
    // The ranges must be the layout this Vanguard gives that much memory, and lie in the file.
    let expected = arch::boot::ram_ranges(memory).map_err(|e| bad(e.to_string()))?;
    let mut offset = 0u64;
    for (i, r) in ranges.iter().enumerate() {
        let want = expected.get(i).map(|(a, l)| (a.raw_value(), *l));
        if want != Some((r.guest, r.len)) || r.file_offset != offset {
            return Err(bad(format!(
                "RAM range {i} ({:#x}+{:#x} at file offset {:#x}) is not this machine's layout",
                r.guest, r.len, r.file_offset
            )));
        }
        offset = offset.checked_add(r.len).ok_or_else(|| bad("ranges overflow".into()))?;
    }
    if ranges.len() != expected.len() || offset != memory_file_len {
        return Err(bad("RAM ranges do not cover the memory".into()));
    }
    Ok(MachineDesc {
        vcpus,
        memory,
        mmio_transport,
        debug_exit,
        boot_timer,
        vm_id,
        generation,
        ranges,
        memory_file_len,
        virtio,
    })
}

/// Each PCI function's slot and configuration space.
pub(crate) type PciFunctions = Vec<(u8, Vec<u8>)>;

/// The legacy devices' state.
#[derive(Debug, Clone)]
pub(crate) struct DeviceStates {
    pub serial: devices::legacy::SerialState,
    pub i8042: (u8, Option<u8>, Option<u8>),
    pub acpi_pm: [u16; 3],
    /// CONFIG_ADDRESS and each PCI function's configuration space (PCI transport only).
    pub pci: Option<(u32, PciFunctions)>,
    /// Each virtio device's transport and device state, in the guest's order.
    pub virtio: Vec<Vec<u8>>,
}

fn opt_u8(e: &mut Encoder, v: Option<u8>) {
    e.u8(u8::from(v.is_some())).u8(v.unwrap_or(0));
}

fn decode_opt_u8(d: &mut Decoder<'_>, what: &str) -> Result<Option<u8>, SnapshotError> {
    let present = d.u8(what)?;
    let value = d.u8(what)?;
    Ok((present != 0).then_some(value))
}

/// Everything a restore needs, read from a snapshot directory.
pub(crate) struct Restored {
    /// Where it came from (for messages and the memory file).
    pub dir: PathBuf,
    /// Guest memory already filled (a migration's); otherwise the memory file is mapped.
    pub memory: Option<GuestMemoryMmap>,
    pub machine: MachineDesc,
    pub vcpus: Vec<VcpuState>,
    pub kvm_vm: KvmVmState,
    pub devices: DeviceStates,
    /// TAP descriptors a migration's source on this host handed over, one per net device.
    pub handed_taps: Vec<File>,
}

/// Reads and checks a snapshot directory's state file.
pub(crate) fn read_snapshot(dir: &Path) -> Result<Restored, SnapshotFailure> {
    let path = dir.join(STATE_FILE);
    let bytes = std::fs::read(&path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound && dir.join(MEMORY_FILE).exists() {
            SnapshotFailure::Incompatible(format!(
                "{} has a memory file but no state file: an incremental snapshot into it was \
                 interrupted, and its memory no longer matches any state",
                dir.display()
            ))
        } else {
            SnapshotFailure::Io { what: "read the snapshot state file", path: path.clone(), source }
        }
    })?;
    parse_state(&bytes, &path, dir)
}

/// Checks and decodes a state file's bytes (`path` names them in errors).
pub(crate) fn parse_state(
    bytes: &[u8],
    path: &Path,
    dir: &Path,
) -> Result<Restored, SnapshotFailure> {
    let format = |source| SnapshotFailure::Format { path: path.to_path_buf(), source };
    let snap = snapshot::Snapshot::parse(bytes).map_err(format)?;
    snap.check_known(KNOWN).map_err(format)?;
    let machine = decode_machine(snap.one(MACHINE).map_err(format)?).map_err(format)?;
    let mut vcpus: Vec<Option<VcpuState>> = (0..machine.vcpus).map(|_| None).collect();
    for section in snap.all(VCPU) {
        let (cpu, state) = decode_vcpu(section).map_err(format)?;
        let slot = usize::try_from(cpu).ok().and_then(|c| vcpus.get_mut(c));
        match slot {
            Some(slot @ None) => *slot = Some(state),
            _ => {
                return Err(format(SnapshotError::Malformed {
                    tag: VCPU.into(),
                    what: format!("vCPU {cpu} is out of range or appears twice"),
                }))
            }
        }
    }
    let vcpus = vcpus
        .into_iter()
        .enumerate()
        .map(|(i, s)| s.ok_or_else(|| format(SnapshotError::Missing { tag: format!("vcpu {i}") })))
        .collect::<Result<Vec<_>, _>>()?;
    let kvm_vm = {
        let mut d = snap.one(KVM_VM).map_err(format)?.decoder();
        let mut chips = [kvm_irqchip::default(); 3];
        for (chip, id) in chips.iter_mut().zip(CHIP_IDS) {
            *chip = unraw(&mut d, "kvm_irqchip").map_err(format)?;
            if chip.chip_id != id {
                return Err(format(
                    d.malformed(format!("irqchip {} where {id} belongs", chip.chip_id)),
                ));
            }
        }
        let pit = unraw(&mut d, "kvm_pit_state2").map_err(format)?;
        let clock = unraw(&mut d, "kvm_clock_data").map_err(format)?;
        d.finish().map_err(format)?;
        KvmVmState { chips, pit, clock }
    };
    let devices = {
        let mut d = snap.one(SERIAL).map_err(format)?.decoder();
        let mut r = [0u8; 9];
        for (i, b) in r.iter_mut().enumerate() {
            *b = d.u8(&format!("UART register {i}")).map_err(format)?;
        }
        let in_buffer = d.bytes("UART receive FIFO").map_err(format)?.to_vec();
        d.finish().map_err(format)?;
        let serial = devices::legacy::SerialState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer,
        };
        let mut d = snap.one(I8042).map_err(format)?.decoder();
        let i8042 = (
            d.u8("control byte").map_err(format)?,
            decode_opt_u8(&mut d, "output byte").map_err(format)?,
            decode_opt_u8(&mut d, "pending command").map_err(format)?,
        );
        d.finish().map_err(format)?;
        let mut d = snap.one(ACPI_PM).map_err(format)?.decoder();
        let acpi_pm = [
            d.u16("PM1 status").map_err(format)?,
            d.u16("PM1 enable").map_err(format)?,
            d.u16("PM1 control").map_err(format)?,
        ];
        d.finish().map_err(format)?;
        let pci = match snap.all(PCI).next() {
            None => None,
            Some(section) => {
                let mut d = section.decoder();
                let address = d.u32("CONFIG_ADDRESS").map_err(format)?;
                let n = d.count(5, "PCI functions").map_err(format)?;
                let mut functions = Vec::with_capacity(n);
                for _ in 0..n {
                    let slot = d.u8("slot").map_err(format)?;
                    functions
                        .push((slot, d.bytes("configuration space").map_err(format)?.to_vec()));
                }
                d.finish().map_err(format)?;
                Some((address, functions))
            }
        };
        if pci.is_some() == machine.mmio_transport {
            return Err(format(SnapshotError::Malformed {
                tag: PCI.into(),
                what: "present without the PCI transport, or missing with it".into(),
            }));
        }
        let mut virtio: Vec<Option<Vec<u8>>> = vec![None; machine.virtio.len()];
        for section in snap.all(VIRTIO) {
            let mut d = section.decoder();
            let index = d.u32("virtio device index").map_err(format)?;
            let kind = d.u32("virtio device type").map_err(format)?;
            let state = d.bytes("virtio device state").map_err(format)?.to_vec();
            d.finish().map_err(format)?;
            let slot = usize::try_from(index).ok().and_then(|i| virtio.get_mut(i));
            let expected = usize::try_from(index)
                .ok()
                .and_then(|i| machine.virtio.get(i))
                .map(VirtioDesc::device_type);
            match slot {
                Some(slot @ None) if expected == Some(kind) => *slot = Some(state),
                _ => {
                    return Err(format(SnapshotError::Malformed {
                        tag: VIRTIO.into(),
                        what: format!(
                            "virtio device {index} (type {kind}) is not in the machine \
                             section, or appears twice"
                        ),
                    }))
                }
            }
        }
        let virtio = virtio
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                s.ok_or_else(|| format(SnapshotError::Missing { tag: format!("virtio {i}") }))
            })
            .collect::<Result<Vec<_>, _>>()?;
        DeviceStates { serial, i8042, acpi_pm, pci, virtio }
    };
    Ok(Restored {
        dir: dir.to_path_buf(),
        memory: None,
        machine,
        vcpus,
        kvm_vm,
        devices,
        handed_taps: Vec::new(),
    })
}

/// Checks, before anything is built, that the XSAVE area fits what Vanguard restores.
pub(crate) fn check_host(kvm: &Kvm) -> Result<(), SnapshotFailure> {
    let xsave2 = kvm.check_extension_int(Cap::Xsave2);
    if usize::try_from(xsave2).unwrap_or(0) > std::mem::size_of::<kvm_xsave>() {
        return Err(SnapshotFailure::Incompatible(format!(
            "this host's XSAVE area is {xsave2} bytes; Vanguard restores 4096"
        )));
    }
    Ok(())
}

/// Fails naming the first CPU feature the snapshot's vCPU was shown and this host's is not.
pub(crate) fn check_cpuid(
    cpu: u8,
    saved: &[kvm_cpuid_entry2],
    here: &[kvm_cpuid_entry2],
) -> Result<(), SnapshotFailure> {
    // (leaf, subleaf, register name, register, bits that change at run time: OSXSAVE, OSPKE)
    type Reg = fn(&kvm_cpuid_entry2) -> u32;
    // Leaf 0xd subleaf 0 EAX/EDX: the XSAVE state components (XCR0 bits) the guest may enable.
    let checks: [(u32, u32, &str, Reg, u32); 8] = [
        (1, 0, "ecx", |e| e.ecx, 1 << 27),
        (1, 0, "edx", |e| e.edx, 0),
        (7, 0, "ebx", |e| e.ebx, 0),
        (7, 0, "ecx", |e| e.ecx, 1 << 4),
        (0xd, 0, "eax", |e| e.eax, 0),
        (0xd, 0, "edx", |e| e.edx, 0),
        (0x8000_0001, 0, "ecx", |e| e.ecx, 0),
        (0x8000_0001, 0, "edx", |e| e.edx, 0),
    ];
    let find = |entries: &[kvm_cpuid_entry2], leaf: u32, sub: u32| {
        entries.iter().find(|e| e.function == leaf && e.index == sub).copied()
    };
    for (leaf, sub, name, reg, ignored) in checks {
        let Some(saved) = find(saved, leaf, sub) else { continue };
        let host = find(here, leaf, sub).map_or(0, |e| reg(&e));
        let missing = reg(&saved) & !host & !ignored;
        if missing != 0 {
            return Err(SnapshotFailure::Incompatible(format!(
                "vCPU {cpu} was shown CPUID leaf {leaf:#x} {name} bits {missing:#010x}, which \
                 this host does not offer"
            )));
        }
    }
    Ok(())
}

/// The XSAVE components the saved area holds (its header's XSTATE_BV, bytes 512..520) and the
/// XCR0 the guest had enabled must all be ones this host's vCPU supports (CPUID leaf 0xd
/// subleaf 0), or KVM refuses the area with a bare EINVAL.
fn check_xsave(
    cpu: u8,
    state: &VcpuState,
    here: &[kvm_cpuid_entry2],
) -> Result<(), SnapshotFailure> {
    let supported = here
        .iter()
        .find(|e| e.function == 0xd && e.index == 0)
        .map_or(0b11, |e| u64::from(e.eax) | u64::from(e.edx) << 32);
    let header = u64::from(state.xsave.region[128]) | u64::from(state.xsave.region[129]) << 32;
    let xcr0 = state.xcrs.xcrs.iter().take(state.xcrs.nr_xcrs as usize).find(|x| x.xcr == 0);
    for (what, bits) in
        [("XSAVE area holds", header), ("XCR0 enables", xcr0.map_or(0, |x| x.value))]
    {
        let missing = bits & !supported;
        if missing != 0 {
            return Err(SnapshotFailure::Incompatible(format!(
                "vCPU {cpu}'s saved {what} state components {missing:#x} (XCR0 bits), which \
                 this host does not offer (it supports {supported:#x})"
            )));
        }
    }
    Ok(())
}

/// Maps the snapshot's memory file privately: nothing is read until the guest touches a page,
/// and the guest's writes never reach the file.
pub(crate) fn map_memory(
    restored: &Restored,
) -> Result<(GuestMemoryMmap, (u64, u64)), SnapshotFailure> {
    let path = restored.dir.join(MEMORY_FILE);
    let file = File::open(&path).map_err(io("open the snapshot memory file", &path))?;
    let meta = file.metadata().map_err(io("read the size of", &path))?;
    if meta.len() != restored.machine.memory_file_len {
        return Err(SnapshotFailure::Incompatible(format!(
            "{} is {} bytes; the state file says {}",
            path.display(),
            meta.len(),
            restored.machine.memory_file_len
        )));
    }
    let mut regions = Vec::new();
    for r in &restored.machine.ranges {
        let len = usize::try_from(r.len)
            .map_err(|_| SnapshotFailure::Incompatible("range too large".into()))?;
        let fd = file.try_clone().map_err(io("duplicate the descriptor of", &path))?;
        let mapping = vm_memory::MmapRegion::build(
            Some(vm_memory::FileOffset::new(fd, r.file_offset)),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| SnapshotFailure::Io {
            what: "map",
            path: path.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let region = vm_memory::GuestRegionMmap::new(mapping, vm_memory::GuestAddress(r.guest))
            .ok_or_else(|| SnapshotFailure::Incompatible("a RAM range overflows".into()))?;
        regions.push(region);
    }
    let mem = GuestMemoryMmap::from_regions(regions)
        .map_err(|e| SnapshotFailure::Incompatible(e.to_string()))?;
    Ok((mem, (meta.dev(), meta.ino())))
}

/// What a snapshot did.
#[derive(Debug, Clone)]
pub struct SnapshotReport {
    /// Where it went.
    pub dir: PathBuf,
    /// Only dirty pages were written.
    pub incremental: bool,
    /// Bytes of guest memory written (holes and clean pages not counted).
    pub memory_bytes_written: u64,
    /// Size of the state file.
    pub state_bytes: u64,
    /// How long the guest was stopped for it (zero if it was paused already).
    pub downtime: Duration,
    /// From the request to the answer.
    pub total: Duration,
}

/// Handles on everything a snapshot reads, kept by the VM's control once it runs.
pub(crate) struct Machine {
    pub vm: Arc<VmFd>,
    pub mem: Arc<GuestMemoryMmap>,
    pub msr_indices: Vec<u32>,
    pub serial: Arc<Mutex<devices::legacy::SerialPort>>,
    pub i8042: Arc<Mutex<devices::legacy::I8042>>,
    pub power: Arc<Mutex<devices::legacy::AcpiPm>>,
    pub pci: Option<(Arc<pci::PciRoot>, Arc<Mutex<pci::root::ConfigIo>>)>,
    /// Each virtio device's transport, in the guest's order (as `desc.virtio`).
    pub transports: Vec<Arc<Mutex<dyn virtio_devices::state::TransportState>>>,
    /// Guest pages the virtio devices wrote (KVM's dirty log has only the vCPUs' writes).
    pub device_dirty: Arc<virtio_devices::state::DirtyPages>,
    /// Why this VM cannot be snapshotted, if it cannot (a vhost-user disk, a path that is
    /// not UTF-8).
    pub unsupported: Option<String>,
    pub desc: MachineDesc,
    /// (device, inode) of the memory file a restored VM's RAM maps.
    pub backing: Option<(u64, u64)>,
    pub tracking: Mutex<Tracking>,
    /// The CPUID vCPU 0 shows the guest (KVM_GET_CPUID2 once configured).
    pub cpuid0: Arc<Mutex<Option<Vec<kvm_cpuid_entry2>>>>,
}

/// Dirty-page logging and the last snapshot this process wrote, which an incremental snapshot
/// builds on.
#[derive(Default)]
pub(crate) struct Tracking {
    logging: bool,
    last: Option<(PathBuf, u64)>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A fresh VM's identity: 16 random bytes (a snapshot's lineage, for incremental snapshots).
pub(crate) fn new_vm_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    if let Ok(mut f) = File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut id);
    }
    id
}

fn sync_dir(dir: &Path) -> Result<(), SnapshotFailure> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io("sync the directory", dir))
}

fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(16).all(|c| u128::from_ne_bytes(c.try_into().unwrap_or([1; 16])) == 0)
}

impl Machine {
    fn region_bytes(&self, index: usize) -> Option<&[u8]> {
        let region = self.mem.iter().nth(index)?;
        let host = region.get_host_address(vm_memory::MemoryRegionAddress(0)).ok()?;
        let len = usize::try_from(region.len()).ok()?;
        // SAFETY: the region is mapped for as long as `self.mem` lives (borrowed by the
        // returned slice). Every vCPU is parked and every virtio device quiesced
        // (`quiesce_devices`), so nothing writes guest memory while the slice is read.
        Some(unsafe { std::slice::from_raw_parts(host, len) })
    }

    /// Turns dirty-page logging on (once) and clears the log: what the guest writes from now
    /// on shows in [`Machine::dirty_bitmaps`]. An incremental snapshot can no longer build on
    /// the last one (its log is gone).
    pub(crate) fn restart_dirty_log(&self) -> Result<(), SnapshotFailure> {
        let mut tracking = lock(&self.tracking);
        if !tracking.logging {
            self.set_dirty_logging()?;
            tracking.logging = true;
        }
        tracking.last = None;
        self.dirty_bitmaps()?;
        Ok(())
    }

    /// A state file of the paused VM (its vCPUs' state already captured).
    pub(crate) fn state_bytes(&self, vcpus: &[VcpuState]) -> Result<Vec<u8>, SnapshotFailure> {
        let kvm_vm = capture_kvm_vm(&self.vm)?;
        let devices = self.devices()?;
        self.state_file(self.desc.generation, vcpus, &kvm_vm, &devices).map_err(|source| {
            SnapshotFailure::Format { path: PathBuf::from("(migration state)"), source }
        })
    }

    /// Fails for what a snapshot or migration cannot carry.
    pub(crate) fn check_supported(&self) -> Result<(), SnapshotFailure> {
        match &self.unsupported {
            Some(why) => Err(SnapshotFailure::Unsupported(why.clone())),
            None => Ok(()),
        }
    }

    /// Stops every virtio device's worker (the vCPUs are parked): from here until
    /// [`Machine::resume_devices`] nothing but this thread touches guest memory or the rings.
    pub(crate) fn quiesce_devices(&self) {
        for t in &self.transports {
            devices::bus::lock(t).quiesce();
        }
    }

    /// Lets the virtio devices run again.
    pub(crate) fn resume_devices(&self) {
        for t in &self.transports {
            devices::bus::lock(t).resume();
        }
    }

    fn virtio_states(&self) -> Result<Vec<Vec<u8>>, SnapshotFailure> {
        self.transports
            .iter()
            .enumerate()
            .map(|(i, t)| {
                devices::bus::lock(t).save().map_err(|e| {
                    SnapshotFailure::Unsupported(format!("virtio device {i}'s state: {e}"))
                })
            })
            .collect()
    }

    fn set_dirty_logging(&self) -> Result<(), SnapshotFailure> {
        for (slot, region) in self.mem.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| SnapshotFailure::Unsupported(e.to_string()))?;
            let desc = kvm_userspace_memory_region {
                slot: u32::try_from(slot).unwrap_or(u32::MAX),
                flags: KVM_MEM_LOG_DIRTY_PAGES,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the same slot, addresses and host mapping as registered at build time
            // (`memory::register_memory`); only the flags change.
            unsafe { self.vm.set_user_memory_region(desc) }
                .map_err(kvm("turn on dirty-page logging"))?;
        }
        self.device_dirty.set_enabled(true);
        Ok(())
    }

    /// Per memory slot, the bitmap of pages written since the last call (and clears it):
    /// KVM's log of what the vCPUs wrote, and what the virtio devices wrote.
    pub(crate) fn dirty_bitmaps(&self) -> Result<Vec<Vec<u64>>, SnapshotFailure> {
        let mut maps = self
            .mem
            .iter()
            .enumerate()
            .map(|(slot, region)| {
                self.vm
                    .get_dirty_log(
                        u32::try_from(slot).unwrap_or(u32::MAX),
                        usize::try_from(region.len()).unwrap_or(0),
                    )
                    .map_err(kvm("read the dirty-page log"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        for (map, devices) in maps.iter_mut().zip(self.device_dirty.take()) {
            for (word, d) in map.iter_mut().zip(devices) {
                *word |= d;
            }
        }
        Ok(maps)
    }

    fn devices(&self) -> Result<DeviceStates, SnapshotFailure> {
        Ok(DeviceStates {
            serial: devices::bus::lock(&self.serial).state(),
            i8042: devices::bus::lock(&self.i8042).state(),
            acpi_pm: devices::bus::lock(&self.power).state(),
            pci: self
                .pci
                .as_ref()
                .map(|(root, io)| (devices::bus::lock(io).address(), root.save_config())),
            virtio: self.virtio_states()?,
        })
    }

    fn state_file(
        &self,
        generation: u64,
        vcpus: &[VcpuState],
        kvm_vm: &KvmVmState,
        dev: &DeviceStates,
    ) -> Result<Vec<u8>, SnapshotError> {
        let mut w = Writer::new();
        let desc = MachineDesc { generation, ..self.desc.clone() };
        w.section(MACHINE, MACHINE_VERSION, FLAG_REQUIRED, &encode_machine(&desc).0)?;
        for (cpu, s) in (0u8..).zip(vcpus) {
            w.section(VCPU, 1, FLAG_REQUIRED, &encode_vcpu(cpu, s).0)?;
        }
        let mut e = Encoder::new();
        for chip in &kvm_vm.chips {
            raw(&mut e, chip);
        }
        raw(&mut e, &kvm_vm.pit);
        raw(&mut e, &kvm_vm.clock);
        w.section(KVM_VM, 1, FLAG_REQUIRED, &e.0)?;
        let s = &dev.serial;
        let mut e = Encoder::new();
        for b in [
            s.baud_divisor_low,
            s.baud_divisor_high,
            s.interrupt_enable,
            s.interrupt_identification,
            s.line_control,
            s.line_status,
            s.modem_control,
            s.modem_status,
            s.scratch,
        ] {
            e.u8(b);
        }
        e.bytes(&s.in_buffer);
        w.section(SERIAL, 1, FLAG_REQUIRED, &e.0)?;
        let mut e = Encoder::new();
        e.u8(dev.i8042.0);
        opt_u8(&mut e, dev.i8042.1);
        opt_u8(&mut e, dev.i8042.2);
        w.section(I8042, 1, FLAG_REQUIRED, &e.0)?;
        let mut e = Encoder::new();
        for r in dev.acpi_pm {
            e.u16(r);
        }
        w.section(ACPI_PM, 1, FLAG_REQUIRED, &e.0)?;
        if let Some((address, functions)) = &dev.pci {
            let mut e = Encoder::new();
            e.u32(*address).u32(u32::try_from(functions.len()).unwrap_or(0));
            for (slot, bytes) in functions {
                e.u8(*slot).bytes(bytes);
            }
            w.section(PCI, 1, FLAG_REQUIRED, &e.0)?;
        }
        for ((index, state), desc) in (0u32..).zip(&dev.virtio).zip(&self.desc.virtio) {
            let mut e = Encoder::new();
            e.u32(index).u32(desc.device_type()).bytes(state);
            w.section(VIRTIO, 1, FLAG_REQUIRED, &e.0)?;
        }
        Ok(w.finish())
    }

    /// Writes a snapshot of the paused VM (its vCPUs' state already captured) into `dir`;
    /// returns (memory bytes written, state bytes).
    pub(crate) fn write(
        &self,
        dir: &Path,
        incremental: bool,
        vcpus: &[VcpuState],
    ) -> Result<(u64, u64), SnapshotFailure> {
        self.check_supported()?;
        let mut tracking = lock(&self.tracking);
        std::fs::create_dir_all(dir).map_err(io("create the snapshot directory", dir))?;
        let canonical = dir.canonicalize().map_err(io("resolve", dir))?;
        let kvm_vm = capture_kvm_vm(&self.vm)?;
        let devices = self.devices()?;
        let state_path = canonical.join(STATE_FILE);
        let memory_path = canonical.join(MEMORY_FILE);
        let generation;
        let written = if incremental {
            let previous = match &tracking.last {
                Some((last_dir, gen)) if *last_dir == canonical && tracking.logging => *gen,
                _ => {
                    return Err(SnapshotFailure::Unsupported(format!(
                        "an incremental snapshot needs a snapshot of this VM written by this \
                         process into {} first",
                        canonical.display()
                    )))
                }
            };
            let on_disk = read_snapshot(&canonical)?;
            if on_disk.machine.vm_id != self.desc.vm_id || on_disk.machine.generation != previous {
                return Err(SnapshotFailure::Unsupported(format!(
                    "{} holds another snapshot than the one this VM last wrote there",
                    canonical.display()
                )));
            }
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&memory_path)
                .map_err(io("open", &memory_path))?;
            let meta = file.metadata().map_err(io("read", &memory_path))?;
            if self.backing == Some((meta.dev(), meta.ino())) {
                return Err(SnapshotFailure::Unsupported(format!(
                    "{} backs this restored VM's memory; write a full snapshot elsewhere first",
                    memory_path.display()
                )));
            }
            let bitmaps = self.dirty_bitmaps()?;
            // From here the directory's memory changes: no state file may claim it.
            std::fs::remove_file(&state_path)
                .map_err(io("remove the old state file", &state_path))?;
            let mut total = 0u64;
            for (index, (bitmap, range)) in bitmaps.iter().zip(&self.desc.ranges).enumerate() {
                let bytes = self.region_bytes(index).unwrap_or(&[]);
                total +=
                    write_pages(&file, &memory_path, bytes, range.file_offset, false, |page| {
                        bitmap.get(page / 64).is_some_and(|w| w & (1 << (page % 64)) != 0)
                    })?;
            }
            file.sync_data().map_err(io("sync", &memory_path))?;
            generation = previous + 1;
            total
        } else {
            if !tracking.logging {
                self.set_dirty_logging()?;
                tracking.logging = true;
            }
            // Pages written before now are in this snapshot: start the log afresh.
            self.dirty_bitmaps()?;
            let tmp = canonical.join(format!("{MEMORY_FILE}.tmp"));
            let file = File::create(&tmp).map_err(io("create", &tmp))?;
            let mut total = 0u64;
            for (index, range) in self.desc.ranges.iter().enumerate() {
                let bytes = self.region_bytes(index).unwrap_or(&[]);
                total += write_pages(&file, &tmp, bytes, range.file_offset, true, |_| true)?;
            }
            // Sized after the writes: trailing zero pages are a hole too.
            file.set_len(self.desc.memory_file_len).map_err(io("size", &tmp))?;
            file.sync_data().map_err(io("sync", &tmp))?;
            std::fs::rename(&tmp, &memory_path).map_err(io("rename into place", &tmp))?;
            generation = self.desc.generation + 1;
            total
        };
        let state = self
            .state_file(generation, vcpus, &kvm_vm, &devices)
            .map_err(|source| SnapshotFailure::Format { path: state_path.clone(), source })?;
        let tmp = canonical.join(format!("{STATE_FILE}.tmp"));
        let mut file = File::create(&tmp).map_err(io("create", &tmp))?;
        file.write_all(&state).map_err(io("write", &tmp))?;
        file.sync_data().map_err(io("sync", &tmp))?;
        std::fs::rename(&tmp, &state_path).map_err(io("rename into place", &tmp))?;
        sync_dir(&canonical)?;
        tracking.last = Some((canonical, generation));
        Ok((written, state.len() as u64))
    }
}

/// Writes the pages of `bytes` that `wanted` selects at `base` in `file`, coalescing
/// neighbours into one write; into a `fresh` (sparse, all-zero) file, zero pages are left as
/// holes. Returns the bytes written.
fn write_pages(
    file: &File,
    path: &Path,
    bytes: &[u8],
    base: u64,
    fresh: bool,
    wanted: impl Fn(usize) -> bool,
) -> Result<u64, SnapshotFailure> {
    let pages = bytes.len() / PAGE;
    let mut written = 0u64;
    let mut run: Option<usize> = None;
    let flush = |start: usize, end: usize| -> Result<u64, SnapshotFailure> {
        let chunk = &bytes[start * PAGE..end * PAGE];
        file.write_all_at(chunk, base + (start * PAGE) as u64).map_err(io("write", path))?;
        Ok(chunk.len() as u64)
    };
    for page in 0..=pages {
        let take = page < pages
            && wanted(page)
            && !(fresh && is_zero(&bytes[page * PAGE..(page + 1) * PAGE]));
        match (take, run) {
            (true, None) => run = Some(page),
            (false, Some(start)) => {
                written += flush(start, page)?;
                run = None;
            }
            _ => {}
        }
        // Bound each write to 8 MiB.
        if let Some(start) = run {
            if page + 1 - start >= 2048 {
                written += flush(start, page + 1)?;
                run = None;
            }
        }
    }
    Ok(written)
}
