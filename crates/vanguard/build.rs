//! Builds the test guest (guest/) with the same rustc that builds Vanguard, for the host's own
//! x86_64-unknown-linux-gnu target, as a freestanding static ELF with its own linker script,
//! so the binary can embed it as the default guest. No extra rustup target is needed.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let guest = manifest.join("../../guest").canonicalize().expect("guest/ exists next to crates/");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let output = out.join("vanguard-guest");
    println!("cargo:rerun-if-changed={}", guest.display());
    let status = Command::new(rustc)
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTC_WRAPPER")
        .args(["--edition", "2021", "--crate-type", "bin", "--crate-name", "vanguard_guest"])
        .args(["--target", "x86_64-unknown-linux-gnu"])
        .args(["-C", "opt-level=2", "-C", "panic=abort", "-C", "relocation-model=static"])
        .args(["-C", "debuginfo=0", "-C", "strip=symbols"])
        // Cargo hides build-script output, so a warning in the guest would go unseen.
        .args(["-D", "warnings"])
        .args([
            "-C",
            "link-arg=-nostartfiles",
            "-C",
            "link-arg=-nostdlib",
            "-C",
            "link-arg=-static",
        ])
        .args(["-C", "link-arg=-Wl,--build-id=none", "-C", "link-arg=-Wl,-n"])
        .arg("-C")
        .arg(format!("link-arg=-Wl,-T,{}", guest.join("linker.ld").display()))
        .arg(guest.join("src/main.rs"))
        .arg("-o")
        .arg(&output)
        .status()
        .expect("cannot run rustc to build the test guest");
    assert!(status.success(), "building the test guest failed");
    println!("cargo:rustc-env=VANGUARD_GUEST_PATH={}", output.display());
}
