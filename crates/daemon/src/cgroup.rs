//! Each VM's process in a cgroup of its own, `vanguard/<name>`, whose limits the kernel enforces:
//! CPU quota and weight, memory. cgroup v2 where the host has it (one hierarchy, `cpu.max`,
//! `cpu.weight`, `memory.max`), v1 otherwise (the `cpu` and `memory` hierarchies,
//! `cpu.cfs_quota_us`, `cpu.shares`, `memory.limit_in_bytes`). The VMM enters its cgroups itself,
//! between fork and exec, so no instruction of it runs outside them.

use api::Limits;
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The CFS period the quota is a share of (100 ms, the kernel's default).
const PERIOD_US: u64 = 100_000;

/// The cgroup hierarchies of this host.
#[derive(Debug, Clone)]
pub enum Cgroups {
    /// cgroup v2, mounted at this directory, with the cpu and memory controllers.
    V2(PathBuf),
    /// cgroup v1: the cpu and the memory hierarchies.
    V1 {
        /// The cpu hierarchy.
        cpu: PathBuf,
        /// The memory hierarchy.
        memory: PathBuf,
    },
    /// Neither can be used; why.
    Unavailable(String),
}

fn write(path: &Path, value: &str) -> io::Result<()> {
    std::fs::write(path, value)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

impl Cgroups {
    /// Finds the hierarchies under `root` (normally /sys/fs/cgroup).
    pub fn detect(root: &Path) -> Cgroups {
        let controllers =
            std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
        let words: Vec<&str> = controllers.split_whitespace().collect();
        if words.contains(&"cpu") && words.contains(&"memory") {
            return Cgroups::V2(root.to_path_buf());
        }
        let (cpu, memory) = (root.join("cpu"), root.join("memory"));
        if cpu.join("cpu.cfs_quota_us").exists() && memory.join("memory.limit_in_bytes").exists() {
            return Cgroups::V1 { cpu, memory };
        }
        Cgroups::Unavailable(format!(
            "no cgroup v2 with cpu and memory at {0}, and no v1 cpu and memory hierarchies under it",
            root.display()
        ))
    }

    /// In words, for the host endpoint.
    pub fn describe(&self) -> String {
        match self {
            Cgroups::V2(root) => format!("cgroup v2 ({})", root.display()),
            Cgroups::V1 { .. } => "cgroup v1 (cpu, memory)".into(),
            Cgroups::Unavailable(why) => format!("unavailable: {why}"),
        }
    }

    /// The directories of VM `name`'s cgroup, one per hierarchy.
    pub fn dirs(&self, name: &str) -> Vec<PathBuf> {
        match self {
            Cgroups::V2(root) => vec![root.join("vanguard").join(name)],
            Cgroups::V1 { cpu, memory } => {
                vec![cpu.join("vanguard").join(name), memory.join("vanguard").join(name)]
            }
            Cgroups::Unavailable(_) => Vec::new(),
        }
    }

    /// Creates (or reuses) VM `name`'s cgroup with `limits` (absent ones lifted); returns the
    /// `cgroup.procs` files the VMM must join.
    pub fn prepare(&self, name: &str, limits: &Limits) -> io::Result<Vec<CString>> {
        let quota = limits.cpu_quota_percent.map(|p| u64::from(p) * PERIOD_US / 100);
        let memory = limits.memory_max_mib.map(|m| m.saturating_mul(1 << 20));
        match self {
            Cgroups::Unavailable(why) => {
                if *limits != Limits::default() {
                    return Err(io::Error::other(format!("cannot enforce limits: cgroups {why}")));
                }
                return Ok(Vec::new());
            }
            Cgroups::V2(root) => {
                let parent = root.join("vanguard");
                std::fs::create_dir_all(&parent)?;
                write(&root.join("cgroup.subtree_control"), "+cpu +memory")?;
                write(&parent.join("cgroup.subtree_control"), "+cpu +memory")?;
                let dir = parent.join(name);
                std::fs::create_dir_all(&dir)?;
                let max = quota.map_or("max".to_string(), |q| q.to_string());
                write(&dir.join("cpu.max"), &format!("{max} {PERIOD_US}"))?;
                write(&dir.join("cpu.weight"), &limits.cpu_weight.unwrap_or(100).to_string())?;
                write(&dir.join("memory.max"), &memory.map_or("max".into(), |m| m.to_string()))?;
            }
            Cgroups::V1 { cpu, memory: mem } => {
                let cpu_dir = cpu.join("vanguard").join(name);
                let mem_dir = mem.join("vanguard").join(name);
                std::fs::create_dir_all(&cpu_dir)?;
                std::fs::create_dir_all(&mem_dir)?;
                write(&cpu_dir.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
                write(
                    &cpu_dir.join("cpu.cfs_quota_us"),
                    &quota.map_or("-1".into(), |q| q.to_string()),
                )?;
                // v2's weight 100 is v1's 1024 shares.
                let shares = u64::from(limits.cpu_weight.unwrap_or(100)) * 1024 / 100;
                write(&cpu_dir.join("cpu.shares"), &shares.max(2).to_string())?;
                write(
                    &mem_dir.join("memory.limit_in_bytes"),
                    &memory.map_or("-1".into(), |m| m.to_string()),
                )?;
            }
        }
        self.dirs(name)
            .iter()
            .map(|dir| {
                CString::new(dir.join("cgroup.procs").as_os_str().as_bytes())
                    .map_err(|_| io::Error::other("a cgroup path holds a NUL"))
            })
            .collect()
    }

    /// Removes VM `name`'s cgroup (empty once its process is gone); errors are ignored.
    pub fn remove(&self, name: &str) {
        for dir in self.dirs(name) {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Moves the calling process into each cgroup of `procs`; for the child between fork and exec,
/// so it only makes system calls (open, write, close) on paths prepared before the fork.
pub fn join_in_child(procs: &[CString]) -> io::Result<()> {
    for path in procs {
        // SAFETY: `path` is a NUL-terminated string that lives for the call; open, write and
        // close are async-signal-safe and touch no memory but the two-byte buffer.
        unsafe {
            let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // "0" names the writing process.
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if n != 1 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_v1_and_v2_layouts_and_refuses_limits_without_either() {
        let dir = std::env::temp_dir().join(format!("vanguard-cg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("cpu")).unwrap();
        std::fs::create_dir_all(dir.join("memory")).unwrap();
        assert!(matches!(Cgroups::detect(&dir), Cgroups::Unavailable(_)));
        std::fs::write(dir.join("cpu/cpu.cfs_quota_us"), "-1").unwrap();
        std::fs::write(dir.join("memory/memory.limit_in_bytes"), "0").unwrap();
        let v1 = Cgroups::detect(&dir);
        assert!(matches!(v1, Cgroups::V1 { .. }), "{v1:?}");
        assert_eq!(v1.dirs("a").len(), 2);
        std::fs::write(dir.join("cgroup.controllers"), "cpuset cpu io memory pids").unwrap();
        assert!(matches!(Cgroups::detect(&dir), Cgroups::V2(_)));
        let none = Cgroups::Unavailable("test".into());
        assert!(none.prepare("a", &Limits::default()).unwrap().is_empty());
        let limited = Limits { cpu_quota_percent: Some(50), ..Limits::default() };
        assert!(none.prepare("a", &limited).unwrap_err().to_string().contains("cannot enforce"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
