//! Checking a [`VmSpec`] before anything is stored or started: each problem names the field
//! (`disks[1].path`) and the reason, which the API returns as a 400.

use crate::VmSpec;
use std::path::Path;

/// What is wrong with a spec, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct SpecError {
    /// The field, as a path into the JSON (`nics[0].mac`).
    pub field: String,
    /// Why.
    pub reason: String,
}

fn bad(field: impl Into<String>, reason: impl Into<String>) -> Result<(), SpecError> {
    Err(SpecError { field: field.into(), reason: reason.into() })
}

/// The longest kernel command line (x86's COMMAND_LINE_SIZE, less its NUL).
pub const MAX_CMDLINE: usize = 2047;
/// Most devices of one kind (PCI slots 1 to 31 hold every virtio device).
pub const MAX_DEVICES: usize = 16;
/// Guest memory limits in MiB.
pub const MIN_MEMORY_MIB: u64 = 16;
/// 1 TiB.
pub const MAX_MEMORY_MIB: u64 = 1 << 20;

/// Whether `name` is a VM name: 1 to 63 of `[a-z0-9-]`, starting and ending with a letter or
/// digit (it becomes a directory name and part of URLs).
pub fn check_name(name: &str) -> Result<(), SpecError> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    if name.is_empty() || name.len() > 63 {
        return bad("name", "must be 1 to 63 characters");
    }
    if !name.chars().all(ok_char) {
        return bad("name", "may hold only lowercase letters, digits and '-'");
    }
    if name.starts_with('-') || name.ends_with('-') {
        return bad("name", "must start and end with a letter or digit");
    }
    Ok(())
}

fn check_path(field: &str, path: &str) -> Result<(), SpecError> {
    if path.is_empty() || !Path::new(path).is_absolute() {
        return bad(field, format!("'{path}' is not an absolute path"));
    }
    if path.contains('\0') || path.contains(',') {
        return bad(field, "may not contain NUL or ','");
    }
    Ok(())
}

fn check_tap(field: &str, tap: &str) -> Result<(), SpecError> {
    if tap.is_empty() || tap.len() > 15 {
        return bad(field, "a TAP name is 1 to 15 bytes");
    }
    if tap == "." || tap == ".." || tap.bytes().any(|b| b"/:%,=".contains(&b) || b <= b' ') {
        return bad(field, format!("'{tap}' is not an interface name"));
    }
    Ok(())
}

fn check_mac(field: &str, mac: &str) -> Result<(), SpecError> {
    let parts: Vec<&str> = mac.split(':').collect();
    let hex = |p: &&str| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit());
    if parts.len() != 6 || !parts.iter().all(hex) {
        return bad(field, format!("'{mac}' is not a MAC address (like 52:54:00:12:34:56)"));
    }
    let first = u8::from_str_radix(parts[0], 16).unwrap_or(1);
    if first & 1 != 0 {
        return bad(field, format!("'{mac}' is a multicast address"));
    }
    Ok(())
}

/// How a spec is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecFormat {
    /// JSON (`application/json`, `.json`).
    Json,
    /// YAML (`application/yaml`, `.yaml`, `.yml`): the same fields, as YAML 1.2.
    Yaml,
}

impl SpecFormat {
    /// The format a request's `Content-Type` names: YAML for `application/yaml`,
    /// `application/x-yaml` and `text/yaml` (parameters ignored), JSON otherwise.
    pub fn from_content_type(content_type: Option<&str>) -> SpecFormat {
        let mime = content_type.unwrap_or("").split(';').next().unwrap_or("").trim();
        let yaml = ["application/yaml", "application/x-yaml", "text/yaml"];
        if yaml.iter().any(|y| mime.eq_ignore_ascii_case(y)) {
            SpecFormat::Yaml
        } else {
            SpecFormat::Json
        }
    }

    /// The format a file's name says: YAML for `.yaml` and `.yml`, JSON otherwise.
    pub fn from_path(path: &std::path::Path) -> SpecFormat {
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml") => {
                SpecFormat::Yaml
            }
            _ => SpecFormat::Json,
        }
    }
}

/// Reads a spec written in `format`; the error says where the text is wrong and why (an
/// unknown field, a value of the wrong type, bad syntax), prefixed with "invalid VM spec".
pub fn parse(text: &[u8], format: SpecFormat) -> Result<VmSpec, String> {
    let parsed = match format {
        SpecFormat::Json => serde_json::from_slice(text).map_err(|e| e.to_string()),
        SpecFormat::Yaml => serde_yaml_ng::from_slice(text).map_err(|e| e.to_string()),
    };
    parsed.map_err(|e| format!("invalid VM spec: {e}"))
}

/// Checks everything in `spec` that can be checked without the host (paths are absolute, not
/// that they exist: the daemon checks that).
pub fn validate(spec: &VmSpec) -> Result<(), SpecError> {
    check_name(&spec.name)?;
    if spec.cpus == 0 || spec.cpus > 254 {
        return bad("cpus", "must be 1 to 254");
    }
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&spec.memory_mib) {
        return bad("memory_mib", format!("must be {MIN_MEMORY_MIB} to {MAX_MEMORY_MIB}"));
    }
    if let Some(kernel) = &spec.boot.kernel {
        check_path("boot.kernel", kernel)?;
    }
    if let Some(initrd) = &spec.boot.initrd {
        if spec.boot.kernel.is_none() {
            return bad("boot.initrd", "an initrd needs a kernel");
        }
        check_path("boot.initrd", initrd)?;
    }
    if let Some(cmdline) = &spec.boot.cmdline {
        if cmdline.len() > MAX_CMDLINE || cmdline.contains('\0') {
            return bad("boot.cmdline", format!("at most {MAX_CMDLINE} bytes, no NUL"));
        }
    }
    if spec.disks.len() > MAX_DEVICES {
        return bad("disks", format!("at most {MAX_DEVICES}"));
    }
    for (i, disk) in spec.disks.iter().enumerate() {
        check_path(&format!("disks[{i}].path"), &disk.path)?;
        if let Some(serial) = &disk.serial {
            if serial.len() > 20 || serial.bytes().any(|b| b == b',' || b == 0) {
                return bad(format!("disks[{i}].serial"), "at most 20 bytes, no ',' or NUL");
            }
        }
    }
    if spec.nics.len() > MAX_DEVICES {
        return bad("nics", format!("at most {MAX_DEVICES}"));
    }
    for (i, nic) in spec.nics.iter().enumerate() {
        check_tap(&format!("nics[{i}].tap"), &nic.tap)?;
        if let Some(mac) = &nic.mac {
            check_mac(&format!("nics[{i}].mac"), mac)?;
        }
        if spec.nics[..i].iter().any(|other| other.tap == nic.tap) {
            return bad(format!("nics[{i}].tap"), format!("TAP '{}' is used twice", nic.tap));
        }
    }
    if spec.hypervisor == crate::Hypervisor::Qemu {
        if spec.boot.kernel.is_none() && spec.disks.is_empty() {
            return bad("boot.kernel", "the qemu driver needs a kernel or a disk to boot");
        }
        if spec.vsock.is_some() {
            return bad("vsock", "not supported by the qemu driver yet");
        }
    } else {
        if spec.accel != crate::Accel::Auto {
            return bad("accel", "only for the qemu hypervisor (Vanguard's VMM always uses KVM)");
        }
        if spec.boot.firmware != crate::Firmware::Bios {
            return bad(
                "boot.firmware",
                "only for the qemu hypervisor (Vanguard's VMM boots a kernel directly)",
            );
        }
        if let Some(i) = spec.disks.iter().position(|d| d.format != crate::DiskFormat::Raw) {
            return bad(
                format!("disks[{i}].format"),
                "Vanguard's VMM reads raw images only (the qemu hypervisor reads qcow2)",
            );
        }
    }
    let limits = &spec.limits;
    if let Some(quota) = limits.cpu_quota_percent {
        if !(1..=25600).contains(&quota) {
            return bad("limits.cpu_quota_percent", "must be 1 to 25600");
        }
    }
    if let Some(weight) = limits.cpu_weight {
        if !(1..=10000).contains(&weight) {
            return bad("limits.cpu_weight", "must be 1 to 10000");
        }
    }
    if let Some(max) = limits.memory_max_mib {
        if max < spec.memory_mib.saturating_add(16) {
            return bad(
                "limits.memory_max_mib",
                format!("must be at least memory_mib + 16 ({})", spec.memory_mib + 16),
            );
        }
    }
    if let Some(vsock) = &spec.vsock {
        if vsock.cid < 3 || vsock.cid == u32::MAX {
            return bad("vsock.cid", "must be 3 to 4294967294");
        }
        check_path("vsock.socket", &vsock.socket)?;
    }
    for (key, value) in &spec.labels {
        let key_ok = |c: char| c.is_ascii_alphanumeric() || "._/-".contains(c);
        if key.is_empty() || key.len() > 63 || !key.chars().all(key_ok) {
            return bad(
                format!("labels.{key}"),
                "a label key is 1 to 63 of letters, digits and ._/-",
            );
        }
        if value.len() > 255 {
            return bad(format!("labels.{key}"), "a label value is at most 255 bytes");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> VmSpec {
        serde_json::from_str(json).unwrap()
    }

    fn field_of(json: &str) -> String {
        validate(&spec(json)).unwrap_err().field
    }

    #[test]
    fn defaults_and_a_minimal_spec() {
        let s = spec(r#"{"name": "web-1"}"#);
        assert_eq!((s.cpus, s.memory_mib), (1, 128));
        assert!(s.disks.is_empty() && s.boot.kernel.is_none());
        validate(&s).unwrap();
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e = serde_json::from_str::<VmSpec>(r#"{"name": "a", "memroy_mib": 5}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `memroy_mib`"), "{e}");
    }

    #[test]
    fn each_problem_names_its_field() {
        for name in ["", "Web", "a_b", "-a", "a-", &"x".repeat(64)] {
            assert_eq!(field_of(&format!(r#"{{"name": "{name}"}}"#)), "name", "{name:?}");
        }
        assert_eq!(field_of(r#"{"name": "a", "cpus": 0}"#), "cpus");
        assert_eq!(field_of(r#"{"name": "a", "cpus": 255}"#), "cpus");
        assert_eq!(field_of(r#"{"name": "a", "memory_mib": 8}"#), "memory_mib");
        assert_eq!(field_of(r#"{"name": "a", "boot": {"kernel": "vmlinux"}}"#), "boot.kernel");
        assert_eq!(field_of(r#"{"name": "a", "boot": {"initrd": "/i"}}"#), "boot.initrd");
        let long = "x".repeat(3000);
        assert_eq!(
            field_of(&format!(r#"{{"name": "a", "boot": {{"cmdline": "{long}"}}}}"#)),
            "boot.cmdline"
        );
        assert_eq!(
            field_of(r#"{"name": "a", "disks": [{"path": "/a"}, {"path": "b.img"}]}"#),
            "disks[1].path"
        );
        assert_eq!(
            field_of(r#"{"name": "a", "disks": [{"path": "/a", "serial": "x,y"}]}"#),
            "disks[0].serial"
        );
        assert_eq!(field_of(r#"{"name": "a", "nics": [{"tap": "a/b"}]}"#), "nics[0].tap");
        assert_eq!(
            field_of(r#"{"name": "a", "nics": [{"tap": "t0", "mac": "01:00:00:00:00:01"}]}"#),
            "nics[0].mac"
        );
        assert_eq!(
            field_of(r#"{"name": "a", "nics": [{"tap": "t0"}, {"tap": "t0"}]}"#),
            "nics[1].tap"
        );
        assert_eq!(field_of(r#"{"name": "a", "vsock": {"cid": 2, "socket": "/s"}}"#), "vsock.cid");
        assert_eq!(field_of(r#"{"name": "a", "labels": {"a b": "c"}}"#), "labels.a b");
        assert_eq!(field_of(r#"{"name": "a", "hypervisor": "qemu"}"#), "boot.kernel");
        assert_eq!(
            field_of(
                r#"{"name": "a", "hypervisor": "qemu", "boot": {"kernel": "/k"}, "vsock": {"cid": 3, "socket": "/s"}}"#
            ),
            "vsock"
        );
        assert_eq!(field_of(r#"{"name": "a", "boot": {"firmware": "uefi"}}"#), "boot.firmware");
        assert_eq!(
            field_of(
                r#"{"name": "a", "disks": [{"path": "/a"}, {"path": "/b", "format": "qcow2"}]}"#
            ),
            "disks[1].format"
        );
        assert_eq!(field_of(r#"{"name": "a", "accel": "tcg"}"#), "accel");
        assert_eq!(
            field_of(r#"{"name": "a", "limits": {"cpu_quota_percent": 0}}"#),
            "limits.cpu_quota_percent"
        );
        assert_eq!(
            field_of(r#"{"name": "a", "limits": {"cpu_weight": 10001}}"#),
            "limits.cpu_weight"
        );
        assert_eq!(
            field_of(r#"{"name": "a", "memory_mib": 256, "limits": {"memory_max_mib": 260}}"#),
            "limits.memory_max_mib"
        );
    }

    #[test]
    fn a_full_spec_passes() {
        let s = spec(
            r#"{"name": "db-0", "cpus": 4, "memory_mib": 4096,
                "boot": {"kernel": "/k", "initrd": "/i", "cmdline": "console=ttyS0"},
                "disks": [{"path": "/d.img", "readonly": true, "serial": "root"}],
                "nics": [{"tap": "tap0", "mac": "52:54:00:00:00:01"}],
                "vsock": {"cid": 3, "socket": "/run/v.sock"},
                "limits": {"cpu_quota_percent": 150, "cpu_weight": 200, "memory_max_mib": 4608},
                "restart": "on-failure", "labels": {"tier": "db"}}"#,
        );
        validate(&s).unwrap();
        assert_eq!(s.restart, crate::RestartPolicy::OnFailure);
    }
}
