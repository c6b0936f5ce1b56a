//! The hypervisor drivers behind one trait: what process runs a VM, and how the daemon asks it
//! to press the power button, pause and resume, and what it can do on this host. The process
//! plumbing they share (files, launching, finding a process again) is in `driver.rs`.
//!
//! - [`VanguardDriver`]: Vanguard's VMM, `vanguard vmm ... --api-socket <vm dir>/vmm.sock`;
//!   the power button is SIGTERM, pause and resume go through the per-VM API socket.
//! - [`QemuDriver`]: `qemu-system-x86_64` with QMP on `<vm dir>/qmp.sock`; the power button is
//!   `system_powerdown`, pause and resume are `stop` and `cont`.

use crate::driver::{qmp, serial_args, signal, vmm_args, Invocation, VmFiles};
use api::vmm::{MigrateRequest, MigrationInfo, SnapshotInfo, SnapshotRequest, VmmInfo};
use api::{DriverInfo, VmSpec};
use std::ffi::OsString;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;

/// A boxed future, so that the trait can be used as `dyn Driver`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A hypervisor the daemon can run VMs with.
pub trait Driver: Send + Sync {
    /// The spec's name for it.
    fn hypervisor(&self) -> api::Hypervisor;
    /// Whether it can run VMs here, and how (`GET /v1/host`).
    fn info(&self) -> DriverInfo;
    /// The process that runs `spec` with its files in `files` (the reason if it cannot be made
    /// here, e.g. missing firmware).
    fn invocation(&self, spec: &VmSpec, files: &VmFiles) -> Result<Invocation, String>;
    /// Presses the VM's ACPI power button (its process is `pid`).
    fn power_button<'a>(
        &'a self,
        files: &'a VmFiles,
        pid: u32,
    ) -> BoxFuture<'a, Result<(), String>>;
    /// Stops (`pause`) or lets run the VM's vCPUs; done when the future is.
    fn set_paused<'a>(
        &'a self,
        files: &'a VmFiles,
        pause: bool,
    ) -> BoxFuture<'a, Result<(), String>>;
    /// The process that runs the VM on from snapshot directory `dir` (the machine comes from
    /// the snapshot).
    fn restore_invocation(&self, dir: &Path, files: &VmFiles) -> Result<Invocation, String> {
        let _ = (dir, files);
        Err(self.no_transfers())
    }
    /// The process that waits for a VM migrated to `from` (`tcp:IP:PORT` or `unix:PATH`) and
    /// then serves its API on `api_socket`.
    fn incoming_invocation(
        &self,
        from: &str,
        files: &VmFiles,
        api_socket: &Path,
    ) -> Result<Invocation, String> {
        let _ = (from, files, api_socket);
        Err(self.no_transfers())
    }
    /// Writes a snapshot of the running (or paused) VM.
    fn snapshot<'a>(
        &'a self,
        files: &'a VmFiles,
        request: SnapshotRequest,
    ) -> BoxFuture<'a, Result<SnapshotInfo, String>> {
        let _ = (files, request);
        Box::pin(async move { Err(self.no_transfers()) })
    }
    /// Migrates the VM to a destination VMM; the result once it runs there (the VMM here then
    /// ends), or why not (the guest runs on here).
    fn migrate<'a>(
        &'a self,
        files: &'a VmFiles,
        request: MigrateRequest,
    ) -> BoxFuture<'a, Result<MigrationInfo, String>> {
        let _ = (files, request);
        Box::pin(async move { Err(self.no_transfers()) })
    }
    /// The progress of the VM's current (or last) migration.
    fn migration<'a>(&'a self, files: &'a VmFiles) -> BoxFuture<'a, Result<MigrationInfo, String>> {
        let _ = files;
        Box::pin(async move { Err(self.no_transfers()) })
    }
    /// Stops the VM's migration in its pre-copy (the guest runs on here).
    fn cancel_migration<'a>(&'a self, files: &'a VmFiles) -> BoxFuture<'a, Result<(), String>> {
        let _ = files;
        Box::pin(async move { Err(self.no_transfers()) })
    }
    /// What the VMM says of its VM.
    fn vmm_info<'a>(&'a self, files: &'a VmFiles) -> BoxFuture<'a, Result<VmmInfo, String>> {
        let _ = files;
        Box::pin(async move { Err(self.no_transfers()) })
    }
    /// Why snapshots and migration are refused for this driver's VMs.
    fn no_transfers(&self) -> String {
        format!(
            "the {} hypervisor driver does not do snapshots or live migration (Vanguard's VMM does)",
            self.info().name
        )
    }
}

/// Both drivers, by hypervisor.
pub struct Drivers {
    vanguard: VanguardDriver,
    qemu: QemuDriver,
}

impl Drivers {
    /// The drivers, Vanguard's VMM being the binary `exe`.
    pub fn new(exe: PathBuf) -> Drivers {
        Drivers { vanguard: VanguardDriver { exe }, qemu: QemuDriver }
    }

    /// The driver of `hypervisor`.
    pub fn get(&self, hypervisor: api::Hypervisor) -> &dyn Driver {
        match hypervisor {
            api::Hypervisor::Vanguard => &self.vanguard,
            api::Hypervisor::Qemu => &self.qemu,
        }
    }

    /// Every driver.
    pub fn all(&self) -> [&dyn Driver; 2] {
        [&self.vanguard, &self.qemu]
    }
}

/// Vanguard's VMM.
pub struct VanguardDriver {
    exe: PathBuf,
}

impl Driver for VanguardDriver {
    fn hypervisor(&self) -> api::Hypervisor {
        api::Hypervisor::Vanguard
    }

    fn info(&self) -> DriverInfo {
        let kvm = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm");
        let (available, detail) = match kvm {
            Err(e) => (false, format!("/dev/kvm: {e}")),
            Ok(_) if Path::new("/sys/module/kvm_pvm").exists() => (
                true,
                "KVM without hardware virtualization (PVM): guest ring 0 is emulated".to_string(),
            ),
            Ok(_) => (true, "KVM".to_string()),
        };
        DriverInfo { name: "vanguard".into(), available, detail }
    }

    fn invocation(&self, spec: &VmSpec, files: &VmFiles) -> Result<Invocation, String> {
        let mut args = vmm_args(spec, &files.console());
        args.extend(["--api-socket".into(), files.api_socket().into()]);
        Ok(Invocation { program: self.exe.clone(), args, stdout_is_console: false, qmp: None })
    }

    fn power_button<'a>(&'a self, _: &'a VmFiles, pid: u32) -> BoxFuture<'a, Result<(), String>> {
        // The VMM presses the button on SIGTERM.
        Box::pin(async move { signal(pid, libc::SIGTERM).map_err(|e| format!("SIGTERM: {e}")) })
    }

    fn set_paused<'a>(
        &'a self,
        files: &'a VmFiles,
        pause: bool,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let path = if pause { "/v1/vm/pause" } else { "/v1/vm/resume" };
            vmm_call::<serde_json::Value>(files, "PUT", path, None).await.map(|_| ())
        })
    }

    fn restore_invocation(&self, dir: &Path, files: &VmFiles) -> Result<Invocation, String> {
        Ok(self.machine_from("--restore", dir.into(), files, &files.api_socket()))
    }

    fn incoming_invocation(
        &self,
        from: &str,
        files: &VmFiles,
        api_socket: &Path,
    ) -> Result<Invocation, String> {
        Ok(self.machine_from("--migrate-from", from.into(), files, api_socket))
    }

    fn snapshot<'a>(
        &'a self,
        files: &'a VmFiles,
        request: SnapshotRequest,
    ) -> BoxFuture<'a, Result<SnapshotInfo, String>> {
        Box::pin(async move {
            let body = serde_json::to_vec(&request).map_err(|e| e.to_string())?;
            vmm_call(files, "PUT", "/v1/vm/snapshot", Some(body)).await
        })
    }

    fn migrate<'a>(
        &'a self,
        files: &'a VmFiles,
        request: MigrateRequest,
    ) -> BoxFuture<'a, Result<MigrationInfo, String>> {
        Box::pin(async move {
            let body = serde_json::to_vec(&request).map_err(|e| e.to_string())?;
            vmm_call(files, "PUT", "/v1/vm/migrate", Some(body)).await
        })
    }

    fn migration<'a>(&'a self, files: &'a VmFiles) -> BoxFuture<'a, Result<MigrationInfo, String>> {
        Box::pin(vmm_call(files, "GET", "/v1/vm/migration", None))
    }

    fn cancel_migration<'a>(&'a self, files: &'a VmFiles) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            vmm_call::<serde_json::Value>(files, "PUT", "/v1/vm/migration/cancel", None)
                .await
                .map(|_| ())
        })
    }

    fn vmm_info<'a>(&'a self, files: &'a VmFiles) -> BoxFuture<'a, Result<VmmInfo, String>> {
        Box::pin(vmm_call(files, "GET", "/v1/vm", None))
    }
}

impl VanguardDriver {
    /// `vanguard vmm FLAG VALUE` with the VM's console and `api_socket`: a VMM that takes
    /// the machine from a snapshot (`--restore DIR`) or a source (`--migrate-from ADDRESS`),
    /// so nothing of the spec is passed.
    fn machine_from(
        &self,
        flag: &str,
        value: OsString,
        files: &VmFiles,
        api_socket: &Path,
    ) -> Invocation {
        let mut args: Vec<OsString> = vec!["vmm".into(), flag.into(), value];
        args.extend(serial_args(&files.console()));
        args.extend(["--api-socket".into(), api_socket.into()]);
        Invocation { program: self.exe.clone(), args, stdout_is_console: false, qmp: None }
    }
}

/// A request to the VMM's per-VM API socket: the answer decoded, or the VMM's reason.
async fn vmm_call<T: serde::de::DeserializeOwned>(
    files: &VmFiles,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<T, String> {
    let client = api::client::Client::unix(files.api_socket());
    let (status, body) = client
        .raw(method, path, body)
        .await
        .map_err(|e| format!("the VMM's API socket {}: {e}", files.api_socket().display()))?;
    if (200..300).contains(&status) {
        let body = if body.is_empty() { b"null".to_vec() } else { body };
        return serde_json::from_slice(&body)
            .map_err(|e| format!("unexpected answer from the VMM to {method} {path}: {e}"));
    }
    let error = serde_json::from_slice::<api::ApiError>(&body)
        .map(|e| e.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
    Err(format!("the VMM refused ({status}): {error}"))
}

/// QEMU.
pub struct QemuDriver;

/// Whether this host has hardware virtualization KVM can use to run any guest (not PVM).
pub fn hardware_virtualization() -> bool {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = cpuinfo.lines().find(|l| l.starts_with("flags")).unwrap_or_default();
    let has = flags.split_whitespace().any(|f| f == "vmx" || f == "svm");
    has && !Path::new("/sys/module/kvm_pvm").exists() && Path::new("/dev/kvm").exists()
}

/// OVMF's code and the variable-store template, where Debian's `ovmf` package puts them.
pub fn ovmf() -> Option<(PathBuf, PathBuf)> {
    [("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd"), ("OVMF_CODE.fd", "OVMF_VARS.fd")]
        .into_iter()
        .map(|(code, vars)| {
            (Path::new("/usr/share/OVMF").join(code), Path::new("/usr/share/OVMF").join(vars))
        })
        .find(|(code, vars)| code.is_file() && vars.is_file())
}

async fn qmp_command(files: &VmFiles, command: &str) -> Result<(), String> {
    let reply = qmp(&files.qmp_socket(), command).await.map_err(|e| format!("QMP: {e}"))?;
    if reply.contains("\"return\"") {
        Ok(())
    } else {
        Err(format!("QMP {command} refused: {reply}"))
    }
}

impl Driver for QemuDriver {
    fn hypervisor(&self) -> api::Hypervisor {
        api::Hypervisor::Qemu
    }

    fn info(&self) -> DriverInfo {
        let version = std::process::Command::new("qemu-system-x86_64").arg("--version").output();
        let (available, detail) = match version {
            Ok(out) if out.status.success() => {
                let first =
                    String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or("").to_string();
                let accel = if hardware_virtualization() {
                    "accel auto = KVM"
                } else {
                    "accel auto = TCG (no hardware virtualization for KVM here)"
                };
                let uefi = match ovmf() {
                    Some((code, _)) => format!("UEFI: {}", code.display()),
                    None => "no UEFI firmware (Debian package ovmf)".into(),
                };
                (true, format!("{first}; {accel}; {uefi}"))
            }
            _ => (false, "qemu-system-x86_64 not found (Debian package qemu-system-x86)".into()),
        };
        DriverInfo { name: "qemu".into(), available, detail }
    }

    /// `qemu-system-x86_64` (q35, no default devices, serial on stdio, QMP on a socket in the
    /// VM's directory, `-no-reboot` so a reset ends the process as with Vanguard).
    fn invocation(&self, spec: &VmSpec, files: &VmFiles) -> Result<Invocation, String> {
        let accel = match spec.accel {
            api::Accel::Kvm => "kvm",
            api::Accel::Tcg => "tcg",
            api::Accel::Auto if hardware_virtualization() => "kvm",
            api::Accel::Auto => "tcg",
        };
        let qmp = files.qmp_socket();
        let mut args: Vec<OsString> = vec![
            "-machine".into(),
            format!("q35,accel={accel}").into(),
            "-m".into(),
            format!("{}M", spec.memory_mib).into(),
            "-smp".into(),
            spec.cpus.to_string().into(),
            "-nodefaults".into(),
            "-display".into(),
            "none".into(),
            "-serial".into(),
            "stdio".into(),
            "-no-reboot".into(),
            "-qmp".into(),
        ];
        let mut qmp_arg = OsString::from("unix:");
        qmp_arg.push(&qmp);
        qmp_arg.push(",server=on,wait=off");
        args.push(qmp_arg);
        if spec.boot.firmware == api::Firmware::Uefi {
            let (code, template) = ovmf()
                .ok_or("boot.firmware uefi: no OVMF firmware on this host (Debian package ovmf)")?;
            // The VM's own variable store, made from the template at its first start.
            let vars = files.dir.join("OVMF_VARS.fd");
            if !vars.exists() {
                std::fs::copy(&template, &vars).map_err(|e| {
                    format!("cannot copy {} to {}: {e}", template.display(), vars.display())
                })?;
            }
            let mut code_arg = OsString::from("if=pflash,format=raw,unit=0,readonly=on,file=");
            code_arg.push(&code);
            let mut vars_arg = OsString::from("if=pflash,format=raw,unit=1,file=");
            vars_arg.push(&vars);
            args.extend(["-drive".into(), code_arg, "-drive".into(), vars_arg]);
        }
        if let Some(kernel) = &spec.boot.kernel {
            args.extend(["-kernel".into(), kernel.into()]);
        }
        if let Some(initrd) = &spec.boot.initrd {
            args.extend(["-initrd".into(), initrd.into()]);
        }
        if let Some(cmdline) = &spec.boot.cmdline {
            args.extend(["-append".into(), cmdline.into()]);
        }
        for disk in &spec.disks {
            let format = match disk.format {
                api::DiskFormat::Raw => "raw",
                api::DiskFormat::Qcow2 => "qcow2",
            };
            let mut value = format!("file={},format={format},if=virtio", disk.path);
            if disk.readonly {
                value.push_str(",readonly=on");
            }
            if let Some(serial) = &disk.serial {
                value.push_str(&format!(",serial={serial}"));
            }
            args.extend(["-drive".into(), value.into()]);
        }
        for (i, nic) in spec.nics.iter().enumerate() {
            // QEMU opens the TAP (creating it if it does not exist), with a vnet header.
            let netdev = format!("tap,id=net{i},ifname={},script=no,downscript=no", nic.tap);
            let mut device = format!("virtio-net-pci,netdev=net{i}");
            if let Some(mac) = &nic.mac {
                device.push_str(&format!(",mac={mac}"));
            }
            args.extend(["-netdev".into(), netdev.into(), "-device".into(), device.into()]);
        }
        Ok(Invocation {
            program: PathBuf::from("qemu-system-x86_64"),
            args,
            stdout_is_console: true,
            qmp: Some(qmp),
        })
    }

    fn power_button<'a>(&'a self, files: &'a VmFiles, _: u32) -> BoxFuture<'a, Result<(), String>> {
        // QEMU ends at SIGTERM without asking the guest.
        Box::pin(qmp_command(files, "system_powerdown"))
    }

    fn set_paused<'a>(
        &'a self,
        files: &'a VmFiles,
        pause: bool,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(qmp_command(files, if pause { "stop" } else { "cont" }))
    }
}
