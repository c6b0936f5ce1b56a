//! A baseline for benchmarks: the same VM as [`crate::Vm`] builds, run by the barest loop
//! possible — KVM_RUN, answer the exit without any device model, repeat. Comparing a guest
//! workload under this loop and under the real VMM shows what Vanguard's exit handling costs.

use crate::config::VmConfig;
use crate::error::VmmError;
use crate::vcpu;
use crate::vm::Vm;
use arch::layout::{COM1_PORT, PM1A_CNT_PORT};
use kvm_ioctls::VcpuExit;

/// Runs a single-vCPU VM with the bare loop until the guest writes the ACPI power-off port;
/// returns the bytes the guest wrote to the serial data port.
pub fn bare_exit_loop(config: &VmConfig) -> Result<Vec<u8>, VmmError> {
    let built = Vm::build(config, None)?;
    let cpu = 0;
    let vcpu = built.vm.create_vcpu(0).map_err(crate::vm::kvm_call("create vCPU"))?;
    vcpu::configure(&vcpu, cpu, built.cpuid.clone(), 1, Some(&built.boot))?;
    let mut vcpu = vcpu;
    let mut serial = Vec::new();
    loop {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                if port == COM1_PORT {
                    serial.extend_from_slice(data);
                } else if port == PM1A_CNT_PORT {
                    return Ok(serial);
                }
            }
            Ok(VcpuExit::IoIn(_, data)) => data.fill(0),
            Ok(VcpuExit::MmioRead(_, data)) => data.fill(0),
            Ok(VcpuExit::MmioWrite(..)) => {}
            Ok(other) => {
                return Err(VmmError::Guest(crate::GuestFailure::UnexpectedExit {
                    cpu,
                    exit: format!("{other:?} in the bare benchmark loop"),
                    registers: String::new(),
                }))
            }
            Err(e) if e.errno() == libc::EINTR => {}
            Err(source) => return Err(VmmError::VcpuKvm { cpu, what: "run", source }),
        }
    }
}
