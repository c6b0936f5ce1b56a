//! One vCPU: its initial state, and the loop on its own thread that runs it and serves its
//! exits.

use crate::error::{GuestFailure, VmmError};
use crate::regs::describe;
use crate::vm::VmOutcome;
use devices::{Bus, VmAction};
use kvm_bindings::{kvm_fpu, kvm_regs, CpuId};
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use vm_memory::GuestMemoryMmap;

/// The boot vCPU's entry state (the others wait for INIT/SIPI from the guest).
pub struct BootState {
    /// General registers.
    pub regs: kvm_regs,
    /// Whether to enter the PVH 32-bit entry rather than the 64-bit one.
    pub mode: arch::boot::EntryMode,
    /// CR3 for the 64-bit entry.
    pub cr3: u64,
}

/// What a vCPU thread reports to the VM when it stops.
pub enum VcpuReport {
    /// The guest ended the VM normally.
    Outcome(VmOutcome),
    /// The guest or the VMM failed.
    Failed(VmmError),
}

const LAPIC_LVT0: usize = 0x350;
const LAPIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

fn kvm_err(cpu: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::VcpuKvm { cpu, what, source }
}

/// Sets CPUID, MSRs, FPU, LAPIC LINT pins and, for the boot vCPU, its entry registers.
pub fn configure(
    vcpu: &VcpuFd,
    cpu: u8,
    mut cpuid: CpuId,
    num_cpus: u8,
    boot: Option<&BootState>,
) -> Result<(), VmmError> {
    arch::cpuid::configure_cpuid(
        &mut cpuid,
        &arch::cpuid::CpuTopology { cpu_index: cpu, num_cpus },
    )
    .map_err(VmmError::Cpuid)?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm_err(cpu, "set CPUID"))?;
    let msrs = arch::msr::boot_msrs().map_err(|_| VmmError::MissingCapability("MSR list"))?;
    let written = vcpu.set_msrs(&msrs).map_err(kvm_err(cpu, "set MSRs"))?;
    if written != msrs.as_slice().len() {
        return Err(VmmError::MissingCapability("setting the boot MSRs"));
    }
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(kvm_err(cpu, "set FPU"))?;
    // Wire LINT0 to the PIC (ExtINT) and LINT1 to NMI, as PC firmware does.
    let mut lapic = vcpu.get_lapic().map_err(kvm_err(cpu, "get LAPIC"))?;
    set_lapic_reg(&mut lapic, LAPIC_LVT0, APIC_MODE_EXTINT << 8);
    set_lapic_reg(&mut lapic, LAPIC_LVT1, APIC_MODE_NMI << 8);
    vcpu.set_lapic(&lapic).map_err(kvm_err(cpu, "set LAPIC"))?;
    if let Some(boot) = boot {
        let sregs = vcpu.get_sregs().map_err(kvm_err(cpu, "get special registers"))?;
        let sregs = arch::boot::boot_sregs(sregs, boot.mode, boot.cr3);
        vcpu.set_sregs(&sregs).map_err(kvm_err(cpu, "set special registers"))?;
        vcpu.set_regs(&boot.regs).map_err(kvm_err(cpu, "set registers"))?;
    }
    Ok(())
}

fn set_lapic_reg(lapic: &mut kvm_bindings::kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().iter().enumerate() {
        if let Some(slot) = lapic.regs.get_mut(offset + i) {
            *slot = i8::from_le_bytes([*byte]);
        }
    }
}

/// Runs a vCPU until the guest ends the VM, something fails, or `stop` is set (after which
/// the VM signals the thread to leave KVM_RUN).
pub struct VcpuRunner {
    /// Index (and APIC ID).
    pub cpu: u8,
    /// The vCPU.
    pub vcpu: VcpuFd,
    /// Port I/O devices.
    pub pio: Arc<Bus>,
    /// MMIO devices.
    pub mmio: Arc<Bus>,
    /// Guest memory, for crash reports.
    pub mem: Arc<GuestMemoryMmap>,
    /// Set when the VM is stopping.
    pub stop: Arc<AtomicBool>,
    /// Where the vCPU parks while the VM is paused.
    pub control: Arc<crate::control::VmControl>,
    /// This vCPU's exits, by kind.
    pub counters: Arc<crate::control::VcpuCounters>,
    /// Where to report.
    pub report: Sender<VcpuReport>,
}

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;
const KVM_SYSTEM_EVENT_CRASH: u32 = 3;

fn suberror_meaning(suberror: u32) -> &'static str {
    match suberror {
        1 => "the instruction emulator could not emulate an instruction",
        2 => "a simultaneous exception while delivering an event",
        3 => "delivery of an event failed",
        4 => "unexpected exit reason",
        _ => "unknown",
    }
}

impl VcpuRunner {
    fn registers(&self) -> String {
        match (self.vcpu.get_regs(), self.vcpu.get_sregs()) {
            (Ok(regs), Ok(sregs)) => describe(&self.mem, &regs, &sregs),
            _ => "  (registers unavailable)".to_string(),
        }
    }

    fn action(&self, action: VmAction) -> Option<VcpuReport> {
        match action {
            VmAction::None => None,
            VmAction::PowerOff => Some(VcpuReport::Outcome(VmOutcome::PowerOff)),
            VmAction::Reset => Some(VcpuReport::Outcome(VmOutcome::Reset)),
            VmAction::DebugExit(code) => Some(VcpuReport::Outcome(VmOutcome::DebugExit(code))),
        }
    }

    /// The run loop; returns when the vCPU is done.
    pub fn run(mut self) {
        let cpu = self.cpu;
        let report = loop {
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            self.control.checkpoint(usize::from(cpu), &mut self.vcpu);
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            let exit = match self.vcpu.run() {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.vcpu.set_kvm_immediate_exit(0);
                    self.counters.other.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                Err(source) => {
                    break VcpuReport::Failed(VmmError::VcpuKvm { cpu, what: "run", source })
                }
            };
            let counter = match exit {
                VcpuExit::IoOut(..) | VcpuExit::IoIn(..) => &self.counters.io,
                VcpuExit::MmioRead(..) | VcpuExit::MmioWrite(..) => &self.counters.mmio,
                _ => &self.counters.other,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            let failure = match exit {
                VcpuExit::IoOut(port, data) => match self.pio.write(u64::from(port), data) {
                    Some(action) => match self.action(action) {
                        Some(r) => break r,
                        None => continue,
                    },
                    None => continue,
                },
                VcpuExit::IoIn(port, data) => {
                    self.pio.read(u64::from(port), data);
                    continue;
                }
                VcpuExit::MmioRead(addr, data) => {
                    self.mmio.read(addr, data);
                    continue;
                }
                VcpuExit::MmioWrite(addr, data) => match self.mmio.write(addr, data) {
                    Some(action) => match self.action(action) {
                        Some(r) => break r,
                        None => continue,
                    },
                    None => continue,
                },
                VcpuExit::Intr | VcpuExit::IrqWindowOpen => continue,
                VcpuExit::SystemEvent(kind, _) => match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => break VcpuReport::Outcome(VmOutcome::PowerOff),
                    KVM_SYSTEM_EVENT_RESET => break VcpuReport::Outcome(VmOutcome::Reset),
                    KVM_SYSTEM_EVENT_CRASH => GuestFailure::UnexpectedExit {
                        cpu,
                        exit: "system event: guest crash".into(),
                        registers: self.registers(),
                    },
                    other => GuestFailure::UnexpectedExit {
                        cpu,
                        exit: format!("system event {other}"),
                        registers: self.registers(),
                    },
                },
                VcpuExit::Shutdown => {
                    GuestFailure::TripleFault { cpu, registers: self.registers() }
                }
                VcpuExit::InternalError => {
                    // SAFETY: for KVM_EXIT_INTERNAL_ERROR the kernel filled the `internal`
                    // member of the exit union.
                    let suberror =
                        unsafe { self.vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
                    GuestFailure::InternalError {
                        cpu,
                        suberror,
                        what: suberror_meaning(suberror),
                        registers: self.registers(),
                    }
                }
                VcpuExit::FailEntry(reason, _) => {
                    GuestFailure::FailEntry { cpu, reason, registers: self.registers() }
                }
                other => GuestFailure::UnexpectedExit {
                    cpu,
                    exit: format!("{other:?}"),
                    registers: self.registers(),
                },
            };
            break VcpuReport::Failed(VmmError::Guest(failure));
        };
        // The receiver is gone only if the VM already stopped; nothing to tell then.
        let _ = self.report.send(report);
    }
}
