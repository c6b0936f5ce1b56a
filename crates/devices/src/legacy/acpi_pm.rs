//! The ACPI fixed-hardware power management block (PM1a event and control registers) that the
//! FADT points at: how a guest powers itself off (SLP_TYP=S5 with SLP_EN), and how the host
//! presses the virtual power button (PWRBTN_STS, signalled by the SCI).
//!
//! Offsets: 0..2 PM1a status, 2..4 PM1a enable, 4..6 PM1a control.

use crate::{SharedIrq, VmAction};

const PM1_STS: u64 = 0;
const PM1_EN: u64 = 2;
const PM1_CNT: u64 = 4;
/// Power button status/enable bit in PM1 status and enable.
pub const PWRBTN: u16 = 1 << 8;
/// SCI_EN: the OS has taken over from "firmware"; always reads as set since there is none.
const SCI_EN: u16 = 1;
const SLP_EN: u16 = 1 << 13;
const SLP_TYP_SHIFT: u16 = 10;
const SLP_TYP_MASK: u16 = 0x7;

/// The PM1a register block.
pub struct AcpiPm {
    status: u16,
    enable: u16,
    control: u16,
    s5_type: u16,
    sci: SharedIrq,
}

impl AcpiPm {
    /// A block that powers off when the guest enters sleep type `s5_type`, and raises `sci`.
    pub fn new(s5_type: u16, sci: SharedIrq) -> Self {
        Self { status: 0, enable: 0, control: SCI_EN, s5_type, sci }
    }

    /// Presses the power button: the guest sees PWRBTN_STS and, if it enabled the event, an SCI.
    pub fn press_power_button(&mut self) {
        self.status |= PWRBTN;
        self.update_sci();
    }

    /// PM1 status, enable and control, for a snapshot.
    pub fn state(&self) -> [u16; 3] {
        [self.status, self.enable, self.control]
    }

    /// Takes saved registers (a restored VM's) and sets the SCI line to match them.
    pub fn restore(&mut self, [status, enable, control]: [u16; 3]) {
        self.status = status;
        self.enable = enable;
        self.control = control;
        self.update_sci();
    }

    fn update_sci(&self) {
        let level = self.status & self.enable != 0;
        // The guest has no use for an error here; a lost SCI shows up as an ignored button.
        let _ = self.sci.set_level(level);
    }

    fn register(&self, offset: u64) -> Option<u16> {
        match offset {
            PM1_STS => Some(self.status),
            PM1_EN => Some(self.enable),
            PM1_CNT => Some(self.control),
            _ => None,
        }
    }
}

impl crate::BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        // Byte-granular reads of the 16-bit registers are allowed.
        let reg_offset = offset & !1;
        if let Some(value) = self.register(reg_offset) {
            let bytes = value.to_le_bytes();
            let start = (offset & 1) as usize;
            for (dst, src) in data.iter_mut().zip(&bytes[start..]) {
                *dst = *src;
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> VmAction {
        let value = match data {
            [lo] => u16::from(*lo),
            [lo, hi, ..] => u16::from_le_bytes([*lo, *hi]),
            [] => return VmAction::None,
        };
        match offset {
            // Status bits are write-one-to-clear.
            PM1_STS => {
                self.status &= !value;
                self.update_sci();
            }
            PM1_EN => {
                self.enable = value;
                self.update_sci();
            }
            PM1_CNT => {
                self.control = (value & !SLP_EN) | SCI_EN;
                let sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
                if value & SLP_EN != 0 && sleep_type == self.s5_type {
                    return VmAction::PowerOff;
                }
            }
            _ => {}
        }
        VmAction::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BusDevice;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[derive(Default)]
    struct Level(AtomicBool);
    impl crate::IrqLine for Level {
        fn trigger(&self) -> std::io::Result<()> {
            self.0.store(true, Ordering::SeqCst);
            Ok(())
        }
        fn set_level(&self, high: bool) -> std::io::Result<()> {
            self.0.store(high, Ordering::SeqCst);
            Ok(())
        }
    }

    #[test]
    fn s5_powers_off_other_sleep_states_do_not() {
        let mut pm = AcpiPm::new(5, Arc::new(Level::default()));
        assert_eq!(pm.write(4, &(3u16 << 10 | SLP_EN).to_le_bytes()), VmAction::None);
        assert_eq!(pm.write(4, &(5u16 << 10).to_le_bytes()), VmAction::None, "no SLP_EN");
        assert_eq!(pm.write(4, &(5u16 << 10 | SLP_EN).to_le_bytes()), VmAction::PowerOff);
    }

    #[test]
    fn power_button_raises_sci_until_cleared() {
        let sci = Arc::new(Level::default());
        let mut pm = AcpiPm::new(5, sci.clone());
        pm.press_power_button();
        assert!(!sci.0.load(Ordering::SeqCst), "event not enabled yet");
        pm.write(2, &PWRBTN.to_le_bytes());
        assert!(sci.0.load(Ordering::SeqCst));
        let mut sts = [0u8; 2];
        pm.read(0, &mut sts);
        assert_eq!(u16::from_le_bytes(sts) & PWRBTN, PWRBTN);
        pm.write(0, &PWRBTN.to_le_bytes());
        assert!(!sci.0.load(Ordering::SeqCst));
        pm.read(0, &mut sts);
        assert_eq!(u16::from_le_bytes(sts), 0);
        let mut cnt = [0u8; 1];
        pm.read(4, &mut cnt);
        assert_eq!(cnt[0] & 1, 1, "SCI_EN reads as set");
    }
}
