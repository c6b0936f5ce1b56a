//! A minimal i8042 keyboard controller: enough for Linux's probe to finish quickly and for a
//! guest to reset the machine by pulsing the CPU reset line (command 0xfe on port 0x64).
//! There is no keyboard behind it.

use crate::{BusDevice, VmAction};

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_TEST_PORT1: u8 = 0xab;
const CMD_RESET_CPU: u8 = 0xfe;
const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
const STATUS_COMMAND: u8 = 0x08;
const SELF_TEST_OK: u8 = 0x55;

/// The controller. Offsets: 0 is port 0x60 (data), 4 is port 0x64 (status/command).
#[derive(Debug, Default)]
pub struct I8042 {
    control: u8,
    output: Option<u8>,
    pending_command: Option<u8>,
}

impl I8042 {
    /// A controller in its power-on state.
    pub fn new() -> Self {
        Self::default()
    }

    /// The controller's state for a snapshot: (control byte, byte waiting on the data port,
    /// command waiting for its data byte).
    pub fn state(&self) -> (u8, Option<u8>, Option<u8>) {
        (self.control, self.output, self.pending_command)
    }

    /// A controller in a saved state.
    pub fn from_state(control: u8, output: Option<u8>, pending_command: Option<u8>) -> Self {
        Self { control, output, pending_command }
    }

    fn status(&self) -> u8 {
        let mut status = STATUS_SYSTEM_FLAG;
        if self.output.is_some() {
            status |= STATUS_OUTPUT_FULL;
        }
        if self.pending_command.is_some() {
            status |= STATUS_COMMAND;
        }
        status
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let value = match offset {
            0 => self.output.take().unwrap_or(0),
            4 => self.status(),
            _ => 0xff,
        };
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> VmAction {
        let Some(&value) = data.first() else { return VmAction::None };
        match offset {
            4 => match value {
                CMD_RESET_CPU => return VmAction::Reset,
                CMD_READ_CTR => self.output = Some(self.control),
                CMD_WRITE_CTR => self.pending_command = Some(value),
                CMD_SELF_TEST => self.output = Some(SELF_TEST_OK),
                CMD_TEST_PORT1 => self.output = Some(0),
                _ => {}
            },
            0 if self.pending_command.take() == Some(CMD_WRITE_CTR) => self.control = value,
            _ => {}
        }
        VmAction::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_resets() {
        let mut kbd = I8042::new();
        assert_eq!(kbd.write(4, &[0xfe]), VmAction::Reset);
        assert_eq!(kbd.write(0, &[0xfe]), VmAction::None);
    }

    #[test]
    fn control_register_round_trip_and_self_test() {
        let mut kbd = I8042::new();
        kbd.write(4, &[CMD_WRITE_CTR]);
        kbd.write(0, &[0x47]);
        kbd.write(4, &[CMD_READ_CTR]);
        let mut s = [0u8];
        kbd.read(4, &mut s);
        assert_eq!(s[0] & STATUS_OUTPUT_FULL, STATUS_OUTPUT_FULL);
        let mut d = [0u8];
        kbd.read(0, &mut d);
        assert_eq!(d[0], 0x47);
        kbd.write(4, &[CMD_SELF_TEST]);
        kbd.read(0, &mut d);
        assert_eq!(d[0], SELF_TEST_OK);
        kbd.read(4, &mut s);
        assert_eq!(s[0] & STATUS_OUTPUT_FULL, 0);
    }
}
