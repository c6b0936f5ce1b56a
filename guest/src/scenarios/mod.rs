//! The scenarios a command line can ask for, run in the order given. Each scenario is a small
//! module with `run(info, argument) -> bool`; adding one is a module, a line in `SCENARIOS`, and
//! an entry in docs/test-guest.md (a stable interface).

use crate::bootinfo::BootInfo;
use crate::{io, println};

mod balloon;
mod devices;
mod dirty;
mod disk;
mod echo;
mod exit;
mod fault;
mod hello;
mod mem;
mod msix;
mod net;
mod pio;
mod powerbutton;
mod reboot;
mod rng;
mod smp;
mod tcp;
mod vsock;

/// A scenario's entry point: the boot information and the text after `=`, if any.
type Scenario = fn(&BootInfo, Option<&str>) -> bool;

/// Every scenario, by the word that runs it.
const SCENARIOS: &[(&str, Scenario)] = &[
    ("hello", hello::run),
    ("smp", smp::run),
    ("mem", mem::run),
    ("memcheck", mem::run_check),
    ("dirty", dirty::run),
    ("disk", disk::run),
    ("diskwrite", disk::run_write),
    ("diskbench", disk::run_bench),
    ("echo", echo::run),
    ("exit", exit::run),
    ("pio", pio::run),
    ("powerbutton", powerbutton::run),
    ("rng", rng::run),
    ("net", net::run),
    ("tcp", tcp::run),
    ("balloon", balloon::run),
    ("vsock", vsock::run),
    ("virtio", devices::run),
    ("msix", msix::run),
    ("reboot", reboot::run),
    ("fault", fault::run),
];

/// Runs every scenario word on the command line; words that are not scenarios (console=...,
/// anything meant for Linux) are ignored.
pub fn run_all(info: &BootInfo) {
    let mut failed = 0;
    for word in info.words() {
        let (name, arg) = match word.split_once('=') {
            Some((n, a)) => (n, Some(a)),
            None => (word, None),
        };
        let Some((_, scenario)) = SCENARIOS.iter().find(|(n, _)| *n == name) else { continue };
        if !scenario(info, arg) {
            failed += 1;
        }
    }
    if failed > 0 {
        println!("vanguard-guest: {failed} scenario(s) FAILED");
        io::crash();
    }
}

/// Reports an argument a scenario cannot use; returns false (a failed scenario).
fn bad(name: &str, arg: Option<&str>) -> bool {
    println!("vanguard-guest: cannot parse '{name}={}'", arg.unwrap_or(""));
    false
}

/// A scenario's optional numeric argument: `default` if absent, None (reported) if malformed.
fn number_arg(name: &str, arg: Option<&str>, default: u64) -> Option<u64> {
    match arg {
        None => Some(default),
        Some(text) => text.parse().ok().or_else(|| {
            bad(name, arg);
            None
        }),
    }
}
