//! Opt-in devices for tests and benchmarks: a port that ends the VM with a status the guest
//! chooses, and a port the guest writes once it reaches its payload, which timestamps the boot.

use crate::{BusDevice, VmAction};
use std::time::Instant;

/// Debug exit: a write of N ends the VM, and `vanguard run` exits with status N.
#[derive(Debug, Default)]
pub struct DebugExit;

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, data: &[u8]) -> VmAction {
        data.first().map_or(VmAction::None, |code| VmAction::DebugExit(*code))
    }
}

/// Boot timer: the first write records when the guest reached its payload and reports it
/// through the callback given at creation (the VMM prints it).
pub struct BootTimer {
    start: Instant,
    fired: bool,
    report: Box<dyn FnMut(std::time::Duration) + Send>,
}

impl BootTimer {
    /// A timer counting from `start` (the VMM's process start).
    pub fn new(start: Instant, report: Box<dyn FnMut(std::time::Duration) + Send>) -> Self {
        Self { start, fired: false, report }
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) -> VmAction {
        if !self.fired {
            self.fired = true;
            (self.report)(self.start.elapsed());
        }
        VmAction::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn debug_exit_carries_the_status() {
        assert_eq!(DebugExit.write(0, &[7]), VmAction::DebugExit(7));
        assert_eq!(DebugExit.write(0, &[]), VmAction::None);
    }

    #[test]
    fn boot_timer_reports_once() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let mut t = BootTimer::new(Instant::now(), Box::new(move |d| s.lock().unwrap().push(d)));
        t.write(0, &[1]);
        t.write(0, &[1]);
        assert_eq!(seen.lock().unwrap().len(), 1);
    }
}
