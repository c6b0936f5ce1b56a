//! COM1: a 16550A UART (vm-superio's model) whose output goes to stdout, a file or nowhere,
//! and whose input comes from the host (stdin) through [`SerialPort::enqueue_input`].

use crate::{BusDevice, SharedIrq, VmAction};
use std::io::Write;
use vm_superio::serial::NoEvents;
pub use vm_superio::serial::SerialState;
use vm_superio::{Serial, Trigger};

/// Adapts the crate's interrupt line to vm-superio's trigger.
pub struct IrqTrigger(pub SharedIrq);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.trigger()
    }
}

/// The serial port as a bus device.
pub struct SerialPort {
    uart: Serial<IrqTrigger, NoEvents, Box<dyn Write + Send>>,
}

impl SerialPort {
    /// A UART that raises `irq` and writes what the guest sends to `out`.
    pub fn new(irq: SharedIrq, out: Box<dyn Write + Send>) -> Self {
        Self { uart: Serial::new(IrqTrigger(irq), out) }
    }

    /// Queues host input for the guest; returns how many bytes fit in the receive FIFO (the
    /// caller retries the rest later, so no input is lost).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.uart.fifo_capacity().min(bytes.len());
        if room == 0 {
            return 0;
        }
        self.uart.enqueue_raw_bytes(&bytes[..room]).unwrap_or(0)
    }

    /// Free space in the receive FIFO.
    pub fn input_room(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// The registers and the receive FIFO, for a snapshot.
    pub fn state(&self) -> SerialState {
        self.uart.state()
    }

    /// A UART in a saved state (a restored VM's), raising `irq` and writing to `out`.
    pub fn from_state(
        irq: SharedIrq,
        out: Box<dyn Write + Send>,
        state: &SerialState,
    ) -> Result<Self, String> {
        Serial::from_state(state, IrqTrigger(irq), NoEvents, out)
            .map(|uart| Self { uart })
            .map_err(|e| format!("{e:?}"))
    }
}

impl BusDevice for SerialPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(first), Ok(reg)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.uart.read(reg);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> VmAction {
        if let (Some(&value), Ok(reg)) = (data.first(), u8::try_from(offset)) {
            // An output error (a closed stdout, a full disk) must not stop the guest: the
            // guest cannot act on it, and the VMM reports output problems elsewhere.
            let _ = self.uart.write(reg, value);
        }
        VmAction::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    #[derive(Default)]
    struct CountingIrq(AtomicUsize);
    impl crate::IrqLine for CountingIrq {
        fn trigger(&self) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);
    impl Write for SharedBuf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_reaches_the_writer_and_input_the_guest() {
        let irq = Arc::new(CountingIrq::default());
        let buf = SharedBuf::default();
        let mut port = SerialPort::new(irq.clone(), Box::new(buf.clone()));
        for b in b"hi\n" {
            port.write(0, &[*b]);
        }
        assert_eq!(&*buf.0.lock().unwrap(), b"hi\n");
        // Enable the received-data interrupt, then feed input.
        port.write(1, &[0x01]);
        assert_eq!(port.enqueue_input(b"ok"), 2);
        assert!(irq.0.load(Ordering::SeqCst) >= 1);
        let mut lsr = [0u8];
        port.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut c = [0u8];
        port.read(0, &mut c);
        assert_eq!(c[0], b'o');
        port.read(0, &mut c);
        assert_eq!(c[0], b'k');
        port.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 0);
    }

    #[test]
    fn state_carries_registers_and_pending_input() {
        let mut port = SerialPort::new(Arc::new(CountingIrq::default()), Box::new(std::io::sink()));
        port.write(3, &[0x03]); // 8N1
        port.write(7, &[0x5a]); // scratch
        port.enqueue_input(b"xy");
        let state = port.state();
        let mut copy = SerialPort::from_state(
            Arc::new(CountingIrq::default()),
            Box::new(std::io::sink()),
            &state,
        )
        .unwrap();
        let mut b = [0u8];
        copy.read(7, &mut b);
        assert_eq!(b[0], 0x5a);
        copy.read(3, &mut b);
        assert_eq!(b[0], 0x03);
        copy.read(0, &mut b);
        assert_eq!(b[0], b'x');
        copy.read(0, &mut b);
        assert_eq!(b[0], b'y');
    }

    #[test]
    fn input_beyond_the_fifo_is_left_for_later() {
        let mut port = SerialPort::new(Arc::new(CountingIrq::default()), Box::new(std::io::sink()));
        let big = vec![b'x'; 1000];
        let taken = port.enqueue_input(&big);
        assert!(taken > 0 && taken < 1000);
        assert_eq!(port.input_room(), 0);
        assert_eq!(port.enqueue_input(&big), 0);
    }
}
