//! The Vanguard driver: a VM is one `vanguard run` process, started from its spec, in a
//! process group of its own (a signal to the daemon's group does not reach it) with stdin from
//! /dev/null, stdout and stderr appended to `vmm.log` and the serial console written to
//! `console.log`, both in the VM's directory. The process outlives the daemon: a restarted
//! daemon finds it again by pid and start time.

use api::VmSpec;
use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use tokio::io::unix::AsyncFd;

/// The files of one VM, in `<data dir>/vms/<name>/`.
#[derive(Debug, Clone)]
pub struct VmFiles {
    /// The directory.
    pub dir: PathBuf,
    /// The current VMM's API socket, where it is not the default `vmm.sock` (after a
    /// same-host migration).
    api: Option<PathBuf>,
}

impl VmFiles {
    /// The files of VM `name` under `data_dir`.
    pub fn new(data_dir: &Path, name: &str) -> VmFiles {
        VmFiles { dir: data_dir.join("vms").join(name), api: None }
    }

    /// The same, with the current VMM's API socket at `api` (None: the default).
    pub fn with_api_socket(mut self, api: Option<PathBuf>) -> VmFiles {
        self.api = api;
        self
    }

    /// The directory of the VM's snapshots, one directory each.
    pub fn snapshots(&self) -> PathBuf {
        self.dir.join("snapshots")
    }

    /// The socket a same-host migration's destination VMM listens on for the stream.
    pub fn migrate_socket(&self) -> PathBuf {
        self.dir.join("migrate.sock")
    }

    /// The API socket of the destination VMM of a same-host migration: the other one of
    /// `vmm.sock` and `vmm-b.sock` than the current VMM's, so that the two processes never
    /// share a path (each removes its own when it ends).
    pub fn next_api_socket(&self) -> PathBuf {
        let default = self.dir.join("vmm.sock");
        if self.api_socket() == default {
            self.dir.join("vmm-b.sock")
        } else {
            default
        }
    }

    /// The serial console's output.
    pub fn console(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    /// The FIFO the VMM reads its serial input from (its stdin).
    pub fn console_in(&self) -> PathBuf {
        self.dir.join("console.in")
    }

    /// The per-VM API socket of Vanguard's VMM (`vanguard vmm --api-socket`): `vmm.sock`,
    /// or after a same-host migration the one the current process was started with.
    pub fn api_socket(&self) -> PathBuf {
        self.api.clone().unwrap_or_else(|| self.dir.join("vmm.sock"))
    }

    /// QEMU's QMP socket.
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }

    /// The VMM's own output (errors, its report of how the VM ended).
    pub fn vmm_log(&self) -> PathBuf {
        self.dir.join("vmm.log")
    }
}

/// The arguments of `vanguard` that run `spec` with its console in `console`.
pub fn vmm_args(spec: &VmSpec, console: &Path) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "vmm".into(),
        "--cpus".into(),
        spec.cpus.to_string().into(),
        "--memory".into(),
        format!("{}M", spec.memory_mib).into(),
    ];
    args.extend(serial_args(console));
    if let Some(kernel) = &spec.boot.kernel {
        args.extend(["--kernel".into(), kernel.into()]);
    }
    if let Some(initrd) = &spec.boot.initrd {
        args.extend(["--initrd".into(), initrd.into()]);
    }
    if let Some(cmdline) = &spec.boot.cmdline {
        args.extend(["--cmdline".into(), cmdline.into()]);
    }
    for disk in &spec.disks {
        let mut value = format!("path={}", disk.path);
        if disk.readonly {
            value.push_str(",readonly=on");
        }
        if let Some(serial) = &disk.serial {
            value.push_str(&format!(",serial={serial}"));
        }
        args.extend(["--disk".into(), value.into()]);
    }
    for nic in &spec.nics {
        let mut value = format!("tap={}", nic.tap);
        if let Some(mac) = &nic.mac {
            value.push_str(&format!(",mac={mac}"));
        }
        args.extend(["--net".into(), value.into()]);
    }
    if let Some(vsock) = &spec.vsock {
        args.extend([
            "--vsock".into(),
            format!("cid={},socket={}", vsock.cid, vsock.socket).into(),
        ]);
    }
    args
}

/// `--serial file:CONSOLE --serial-max 1M`: every VMM run of the daemon writes its console so
/// (and is found again by it, [`find_by_console`]).
pub fn serial_args(console: &Path) -> [OsString; 4] {
    let mut serial = OsString::from("file:");
    serial.push(console);
    ["--serial".into(), serial, "--serial-max".into(), CONSOLE_MAX.into()]
}

/// The value after `flag` on the command line of process `pid` (e.g. its `--api-socket`).
pub fn arg_of(pid: u32, flag: &str) -> Option<PathBuf> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let mut args = cmdline.split(|&b| b == 0);
    args.by_ref().find(|a| *a == flag.as_bytes())?;
    let value = args.next().filter(|v| !v.is_empty())?;
    Some(PathBuf::from(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(value)))
}

/// Whether a migration destination listens at `address` (`unix:PATH` or `tcp:HOST:PORT`),
/// looked up without connecting (the VMM takes exactly one connection): the socket file, or a
/// TCP socket listening on the port in /proc/net/tcp or tcp6.
pub fn listening(address: &str) -> bool {
    if let Some(path) = address.strip_prefix("unix:") {
        return std::fs::symlink_metadata(path).is_ok();
    }
    let Some(port) = address.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()) else {
        return false;
    };
    let wanted = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|table| {
        std::fs::read_to_string(table).unwrap_or_default().lines().skip(1).any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local address, remote address, state (0A: LISTEN)
            fields.len() > 3 && fields[1].ends_with(&wanted) && fields[3] == "0A"
        })
    })
}

/// Checks that the host files a spec names exist (the field at fault, and why, if not).
pub fn check_files(spec: &VmSpec) -> Result<(), api::SpecError> {
    let mut files: Vec<(String, &str)> = Vec::new();
    if let Some(kernel) = &spec.boot.kernel {
        files.push(("boot.kernel".into(), kernel));
    }
    if let Some(initrd) = &spec.boot.initrd {
        files.push(("boot.initrd".into(), initrd));
    }
    for (i, disk) in spec.disks.iter().enumerate() {
        files.push((format!("disks[{i}].path"), &disk.path));
    }
    for (field, path) in files {
        match std::fs::metadata(path) {
            Ok(meta) if meta.is_file() || meta.file_type().is_symlink() => {}
            Ok(_) => return Err(api::SpecError { field, reason: format!("{path} is not a file") }),
            Err(e) => return Err(api::SpecError { field, reason: format!("{path}: {e}") }),
        }
    }
    Ok(())
}

/// The most console output kept per VM: this much in `console.log`, as much again in
/// `console.log.1`.
pub const CONSOLE_MAX: &str = "1M";

/// The console input FIFO at `path` (made if absent), opened for reading and writing: the VMM
/// reads its serial input from it, and since it holds a writing end itself it never sees an
/// end of file, whoever writes (the daemon, or a daemon restarted later) comes and goes.
fn console_input(path: &Path) -> io::Result<std::fs::File> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::other("a NUL in the console path"))?;
    // SAFETY: mkfifo reads the NUL-terminated path, valid for the call.
    if unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) } != 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::AlreadyExists {
            return Err(e);
        }
    }
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new().read(true).write(true).custom_flags(libc::O_CLOEXEC).open(path)
}

/// Writes `bytes` to a running VM's console input FIFO (without blocking: a full FIFO, 64 KiB
/// the guest has not read, is an error).
pub fn write_console(files: &VmFiles, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut fifo =
        OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(files.console_in())?;
    fifo.write_all(bytes)
}

/// A started VMM process.
pub struct Launched {
    /// Its pid.
    pub pid: u32,
    /// Its start time (see [`proc_start_time`]).
    pub proc_start: Option<u64>,
    /// The child, to wait on.
    pub child: tokio::process::Child,
    /// How to tell it runs.
    pub ready: Ready,
}

/// How a started VM says it runs.
pub enum Ready {
    /// Vanguard's VMM: the read end of its ready pipe, one byte once every vCPU runs (or the
    /// end of the stream if the process ends first).
    Pipe(tokio::net::unix::pipe::Receiver),
    /// QEMU: its QMP socket answers and says the VM is running.
    Qmp(PathBuf),
}

/// What to run for a VM: the program, its arguments, where its serial output goes (a file
/// the VMM writes itself, or QEMU's stdout), how it says it runs.
pub struct Invocation {
    /// The program.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// QEMU writes the serial console to its stdout: this file then.
    pub stdout_is_console: bool,
    /// Whether it takes `--ready-fd` (Vanguard's VMM) or has a QMP socket (QEMU).
    pub qmp: Option<PathBuf>,
}

/// Sends `command` over QMP at `socket` (after the capabilities handshake); the reply line.
pub async fn qmp(socket: &Path, command: &str) -> io::Result<String> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let stream = tokio::net::UnixStream::connect(socket).await?;
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    qmp_reply(&mut lines).await?; // the greeting
    write.write_all(b"{\"execute\": \"qmp_capabilities\"}\n").await?;
    qmp_reply(&mut lines).await?;
    write.write_all(format!("{{\"execute\": \"{command}\"}}\n").as_bytes()).await?;
    qmp_reply(&mut lines).await
}

/// The next QMP line that is a greeting or an answer (asynchronous events are skipped).
async fn qmp_reply(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>>,
) -> io::Result<String> {
    loop {
        let line = lines.next_line().await?.ok_or(io::ErrorKind::UnexpectedEof)?;
        if line.contains("\"return\"") || line.contains("\"error\"") || line.contains("\"QMP\"") {
            return Ok(line);
        }
    }
}

/// The descriptor number the VMM gets its ready pipe on (`vanguard run --ready-fd 3`).
const READY_FD: i32 = 3;

/// Starts `invocation` for the VM whose files are `files`, in the cgroups whose
/// `cgroup.procs` files are `cgroups` (see [`crate::cgroup`]).
pub fn launch(
    invocation: &Invocation,
    files: &VmFiles,
    cgroups: Vec<std::ffi::CString>,
) -> io::Result<Launched> {
    std::fs::create_dir_all(&files.dir)?;
    let log = OpenOptions::new().create(true).append(true).open(files.vmm_log())?;
    let stdout = if invocation.stdout_is_console {
        std::fs::File::create(files.console())?
    } else {
        log.try_clone()?
    };
    let mut command = tokio::process::Command::new(&invocation.program);
    command
        .args(&invocation.args)
        .stdin(Stdio::from(console_input(&files.console_in())?))
        .stdout(stdout)
        .stderr(log)
        .process_group(0)
        .kill_on_drop(false);
    let mut pipe = None;
    if invocation.qmp.is_none() {
        // Both ends close-on-exec: the child gets its end as descriptor 3 (dup2 clears the
        // flag on the copy only), so VMMs started at the same time never inherit each other's
        // pipes.
        let mut fds = [0i32; 2];
        // SAFETY: pipe2 writes two descriptors into the array, which has room for them.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 just returned these two descriptors; each is owned once, here.
        let ends = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        command.arg("--ready-fd").arg(READY_FD.to_string());
        pipe = Some(ends);
    }
    let write_raw = pipe.as_ref().map(|(_, w)| std::os::fd::AsRawFd::as_raw_fd(w));
    // SAFETY: between fork and exec the closure only makes async-signal-safe system calls:
    // dup2 on a descriptor that stays open in the parent until spawn returns, and the cgroup
    // writes of `join_in_child` on paths prepared before the fork.
    unsafe {
        command.pre_exec(move || {
            if let Some(write_raw) = write_raw {
                if libc::dup2(write_raw, READY_FD) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            crate::cgroup::join_in_child(&cgroups)
        });
    }
    if let Some(qmp) = &invocation.qmp {
        let _ = std::fs::remove_file(qmp);
    }
    let child = command.spawn()?;
    let pid = child.id().ok_or_else(|| io::Error::other("the VMM exited at once"))?;
    let ready = match (pipe, &invocation.qmp) {
        (Some((read_end, write_end)), _) => {
            // The parent's copy of the write end goes, so the read end sees the end of the
            // stream when the child's copy closes (written and closed, or the process gone).
            drop(write_end);
            Ready::Pipe(tokio::net::unix::pipe::Receiver::from_owned_fd(read_end)?)
        }
        (None, Some(qmp)) => Ready::Qmp(qmp.clone()),
        (None, None) => return Err(io::Error::other("no way to tell the VM runs")),
    };
    Ok(Launched { pid, proc_start: proc_start_time(pid), child, ready })
}

/// Waits until the VM runs: true, or false if its process ended first (the caller watches
/// the process; for QEMU this polls QMP every 20 ms until `query-status` says running).
pub async fn wait_ready(ready: &mut Ready) -> bool {
    use tokio::io::AsyncReadExt;
    match ready {
        Ready::Pipe(pipe) => {
            let mut byte = [0u8; 1];
            matches!(pipe.read(&mut byte).await, Ok(1))
        }
        Ready::Qmp(socket) => {
            for _ in 0..3000 {
                if let Ok(reply) = qmp(socket, "query-status").await {
                    if reply.contains("\"running\"") {
                        return true;
                    }
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            false
        }
    }
}

/// Field 22 of /proc/PID/stat (the start time in clock ticks since boot), which with the pid
/// names one process for the host's uptime.
pub fn proc_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields resume after the
    // last ')'.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether `pid` is still the process that started at `start` (and not a zombie).
pub fn same_process(pid: u32, start: Option<u64>) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    let state =
        stat.rfind(')').and_then(|i| stat.get(i + 1..)).and_then(|r| r.split_whitespace().next());
    if state == Some("Z") || state == Some("X") {
        return false;
    }
    start.is_some() && proc_start_time(pid) == start
}

/// The live process whose command line writes its serial console to `console` (each VM's
/// console path is its own), with its start time: how a restarted daemon finds a VMM whose pid
/// it never got to store.
pub fn find_by_console(console: &Path) -> Option<(u32, Option<u64>)> {
    let mut wanted = OsString::from("file:");
    wanted.push(console);
    let wanted = wanted.into_encoded_bytes();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        if cmdline.split(|&b| b == 0).any(|arg| arg == wanted.as_slice()) {
            let start = proc_start_time(pid);
            if same_process(pid, start) {
                return Some((pid, start));
            }
        }
    }
    None
}

/// Sends `signal` to `pid`.
pub fn signal(pid: u32, signal: libc::c_int) -> io::Result<()> {
    let pid =
        libc::pid_t::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(pid, signal) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Waits until process `pid` (not a child of this daemon: one it found again after a restart)
/// ends, through a pidfd.
pub async fn wait_foreign(pid: u32) -> io::Result<()> {
    let pid =
        libc::pid_t::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        // ESRCH: it has already gone.
        return if e.raw_os_error() == Some(libc::ESRCH) { Ok(()) } else { Err(e) };
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("pidfd out of range"))?;
    // SAFETY: the descriptor was just returned by pidfd_open and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `fd` is an OwnedFd: it stays open, and as_raw_fd returns the same descriptor,
    // for as long as the AsyncFd owns it.
    let watched = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|e| io::Error::other(e.to_string()))?;
    // A pidfd becomes readable when the process exits.
    let _guard = watched.readable().await?;
    Ok(())
}

/// How a process ended, in words, and whether that is a failure.
pub fn describe_exit(status: &ExitStatus) -> (Option<i32>, Option<i32>, String, bool) {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(0), _) => (Some(0), None, "the guest powered off (exit status 0)".into(), false),
        (Some(code), _) => (Some(code), None, format!("the VMM exited with status {code}"), true),
        (None, Some(sig)) => (None, Some(sig), format!("the VMM was killed by signal {sig}"), true),
        (None, None) => (None, None, "the VMM ended".into(), true),
    }
}

/// The last `lines` lines of a file (for error messages), empty if it cannot be read.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_follow_the_spec() {
        let spec: VmSpec = serde_json::from_str(
            r#"{"name": "a", "cpus": 2, "memory_mib": 256,
                "boot": {"kernel": "/k", "cmdline": "console=ttyS0 x"},
                "disks": [{"path": "/d.img", "readonly": true, "serial": "s1"}],
                "nics": [{"tap": "t0", "mac": "52:54:00:00:00:09"}],
                "vsock": {"cid": 7, "socket": "/v.sock"}}"#,
        )
        .unwrap();
        let args: Vec<String> = vmm_args(&spec, Path::new("/data/c.log"))
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            args.join(" "),
            "vmm --cpus 2 --memory 256M --serial file:/data/c.log --serial-max 1M --kernel /k --cmdline \
             console=ttyS0 x --disk path=/d.img,readonly=on,serial=s1 --net \
             tap=t0,mac=52:54:00:00:00:09 --vsock cid=7,socket=/v.sock"
        );
    }

    #[test]
    fn this_process_is_found_again_and_others_are_not() {
        let me = std::process::id();
        let start = proc_start_time(me);
        assert!(start.is_some());
        assert!(same_process(me, start));
        assert!(!same_process(me, start.map(|s| s + 1)));
        assert!(!same_process(me, None));
        assert!(!same_process(u32::MAX - 1, start));
    }

    #[test]
    fn missing_files_name_their_field() {
        let spec: VmSpec = serde_json::from_str(
            r#"{"name": "a", "disks": [{"path": "/proc/self/stat"}, {"path": "/no/such.img"}]}"#,
        )
        .unwrap();
        let e = check_files(&spec).unwrap_err();
        assert_eq!(e.field, "disks[1].path");
        assert!(e.reason.contains("No such file"), "{e}");
    }
}
