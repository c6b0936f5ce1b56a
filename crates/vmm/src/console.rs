//! The serial console on the host side: this process's stdin feeds the guest's UART.
//!
//! When stdin is a terminal it is put in raw mode for the life of the VM, so keys (Ctrl-C
//! included) go to the guest as typed, and the escape sequence Ctrl-A x stops the VM (Ctrl-A
//! Ctrl-A sends one Ctrl-A). The terminal's settings are restored when the VM ends, including
//! when a second SIGTERM ends the process at once. Piped stdin is passed through byte for byte.

use devices::legacy::SerialPort;
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// The escape key: Ctrl-A.
const ESCAPE: u8 = 0x01;
/// After the escape key, stops the VM.
const QUIT: u8 = b'x';

/// Set when the user asked, from the console, to stop the VM.
pub static QUIT_REQUESTED: AtomicBool = AtomicBool::new(false);

/// The terminal settings to restore, kept where a signal handler can reach them.
static SAVED: OnceLock<libc::termios> = OnceLock::new();

/// Restores the terminal (if raw mode was set). Async-signal-safe: tcsetattr is, and the
/// settings were stored before any signal handler could run this.
pub fn restore_terminal() {
    if let Some(saved) = SAVED.get() {
        // SAFETY: tcsetattr only reads the termios passed; fd 0 is this process's stdin.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, saved) };
    }
}

/// Raw mode on stdin while alive; restores the terminal when dropped.
pub struct RawTerminal(());

impl RawTerminal {
    /// Puts stdin in raw mode if it is a terminal; None otherwise (or if it cannot be done).
    pub fn enable() -> Option<RawTerminal> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it completely on success.
        let mut original: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd 0 is a terminal (checked above) and `original` is writable.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut original) } != 0 {
            return None;
        }
        let _ = SAVED.set(original);
        let mut raw = original;
        raw.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ISIG | libc::IEXTEN);
        raw.c_iflag &= !(libc::IXON | libc::ICRNL | libc::INLCR | libc::BRKINT | libc::ISTRIP);
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        // SAFETY: as above; `raw` is a valid termios derived from the current settings.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(RawTerminal(()))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// Splits console input into bytes for the guest and an optional quit request, keeping the
/// escape state across reads.
#[derive(Default)]
pub struct EscapeFilter {
    after_escape: bool,
}

impl EscapeFilter {
    /// Filters `input` into `out`; returns true if the quit sequence was typed.
    pub fn filter(&mut self, input: &[u8], out: &mut Vec<u8>) -> bool {
        for &b in input {
            if self.after_escape {
                self.after_escape = false;
                match b {
                    QUIT => return true,
                    ESCAPE => out.push(ESCAPE),
                    other => out.extend_from_slice(&[ESCAPE, other]),
                }
            } else if b == ESCAPE {
                self.after_escape = true;
            } else {
                out.push(b);
            }
        }
        false
    }
}

/// Feeds stdin to the serial port, holding back what the receive FIFO has no room for rather
/// than dropping it. With a terminal, watches for the quit sequence.
pub fn spawn_stdin_reader(
    serial: Arc<Mutex<SerialPort>>,
    interactive: bool,
) -> std::io::Result<()> {
    std::thread::Builder::new().name("serial-in".into()).spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 64];
        let mut filter = EscapeFilter::default();
        let mut pending = Vec::new();
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            pending.clear();
            if interactive {
                if filter.filter(&buf[..n], &mut pending) {
                    QUIT_REQUESTED.store(true, Ordering::Release);
                    return;
                }
            } else {
                pending.extend_from_slice(&buf[..n]);
            }
            let mut rest = &pending[..];
            while !rest.is_empty() {
                let taken = devices::bus::lock(&serial).enqueue_input(rest);
                rest = &rest[taken..];
                if !rest.is_empty() {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences() {
        let mut f = EscapeFilter::default();
        let mut out = Vec::new();
        assert!(!f.filter(b"ls\r", &mut out));
        assert_eq!(out, b"ls\r");
        out.clear();
        // Ctrl-A Ctrl-A sends one Ctrl-A; Ctrl-A and another key send both.
        assert!(!f.filter(&[ESCAPE, ESCAPE, b'a', ESCAPE, b'c'], &mut out));
        assert_eq!(out, [ESCAPE, b'a', ESCAPE, b'c']);
        out.clear();
        // The sequence may be split across reads.
        assert!(!f.filter(&[b'z', ESCAPE], &mut out));
        assert!(f.filter(b"x", &mut out));
        assert_eq!(out, b"z");
    }
}

/// A console log file that keeps at most about `max` bytes on disk: when a write would pass
/// `max`, the file becomes `<path>.1` (replacing the previous one) and a new one starts. So the
/// newest output is always in `<path>`, and at most twice `max` bytes are kept.
pub struct RotatingFile {
    path: std::path::PathBuf,
    file: std::fs::File,
    written: u64,
    max: u64,
}

impl RotatingFile {
    /// Creates (truncates) `path`.
    pub fn create(path: &std::path::Path, max: u64) -> std::io::Result<RotatingFile> {
        Ok(RotatingFile {
            path: path.to_path_buf(),
            file: std::fs::File::create(path)?,
            written: 0,
            max: max.max(1),
        })
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let mut old = self.path.clone().into_os_string();
        old.push(".1");
        std::fs::rename(&self.path, &old)?;
        self.file = std::fs::File::create(&self.path)?;
        self.written = 0;
        Ok(())
    }
}

impl std::io::Write for RotatingFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.written > 0 && self.written.saturating_add(buf.len() as u64) > self.max {
            self.rotate()?;
        }
        let n = self.file.write(buf)?;
        self.written = self.written.saturating_add(n as u64);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod rotating_tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_rotating_file_keeps_the_newest_output_within_its_bound() {
        let dir = std::env::temp_dir().join(format!("vanguard-rot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.log");
        let mut file = RotatingFile::create(&path, 100).unwrap();
        for i in 0..50 {
            file.write_all(format!("line {i:04}\n").as_bytes()).unwrap();
        }
        let now = std::fs::read_to_string(&path).unwrap();
        let old = std::fs::read_to_string(dir.join("console.log.1")).unwrap();
        assert!(now.len() <= 100 && old.len() <= 100, "{} {}", now.len(), old.len());
        assert!(now.ends_with("line 0049\n"), "{now}");
        assert!(format!("{old}{now}").contains("line 0040\nline 0041"), "continuous");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
