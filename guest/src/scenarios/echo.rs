//! `echo`: echoes serial input lines until `quit`.

use crate::bootinfo::BootInfo;
use crate::{io, println};

/// Runs the scenario.
pub fn run(_info: &BootInfo, _arg: Option<&str>) -> bool {
    println!("echo: ready");
    let mut line = [0u8; 256];
    loop {
        let mut len = 0;
        loop {
            let b = io::serial_read_byte();
            if b == b'\n' || b == b'\r' {
                break;
            }
            if len < line.len() {
                line[len] = b;
                len += 1;
            }
        }
        if len == 0 {
            continue;
        }
        let text = core::str::from_utf8(&line[..len]).unwrap_or("<not utf-8>");
        if text == "quit" {
            println!("echo: done");
            return true;
        }
        println!("echo: {text}");
    }
}
