//! The port-I/O devices the VMM emulates itself for a real kernel: a 16550 UART at 0x3f8
//! (vm-superio), whose output is the kernel's console, and a read-only CMOS clock at 0x70/0x71.
//! The PIC, IOAPIC, LAPIC and PIT live in KVM.

use std::io::{self, Write};

use vm_superio::Trigger;
use vm_superio::serial::{NoEvents, Serial};
use vmm_sys_util::eventfd::EventFd;

/// COM1's first port.
pub const SERIAL_BASE: u16 = 0x3f8;
/// COM1's ports.
pub const SERIAL_PORTS: std::ops::Range<u16> = SERIAL_BASE..SERIAL_BASE + 8;
/// COM1's IRQ (an irqfd on this GSI).
pub const SERIAL_IRQ: u32 = 4;

/// Raises the serial IRQ by writing to an eventfd registered with KVM_IRQFD.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The UART.
pub type Uart = Serial<IrqTrigger, NoEvents, Console>;

/// Longest console line kept; the rest of a longer line is dropped.
const MAX_LINE: usize = 1024;
/// Complete lines kept; older ones are dropped first.
const MAX_LINES: usize = 2000;

/// The kernel's console output, as complete lines. When `echo` is set, the bytes are copied to
/// stderr as they come (boot progress for the user).
#[derive(Default)]
pub struct Console {
    partial: Vec<u8>,
    lines: Vec<String>,
    /// Copy the output to stderr.
    pub echo: bool,
}

impl Console {
    /// The complete lines since the last [`Console::take_lines`].
    pub fn lines(&self) -> &[String] {
        &self.lines
    }

    /// Takes the complete lines, and drops a partial one: a run starts with an empty console.
    pub fn take_lines(&mut self) -> Vec<String> {
        self.partial.clear();
        std::mem::take(&mut self.lines)
    }

    fn end_of_line(&mut self) {
        let text = String::from_utf8_lossy(&self.partial).trim_end_matches('\r').to_owned();
        self.partial.clear();
        if self.lines.len() == MAX_LINES {
            self.lines.remove(0);
        }
        self.lines.push(text);
    }
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.echo {
            // A closed stderr must not stop the VM.
            let _ = io::stderr().write_all(buf);
        }
        for &b in buf {
            if b == b'\n' {
                self.end_of_line();
            } else if self.partial.len() < MAX_LINE {
                self.partial.push(b);
            }
        }
        Ok(buf.len())
    }

    /// vm-superio flushes after every byte; there is nothing to flush.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A CMOS clock that always reads the same date and time (2026-01-01 00:00:00), never shows
/// an update in progress, and ignores writes: runs must not depend on the host's clock.
/// Without it every port read returns 0xff, whose update-in-progress bit makes Linux's
/// `mc146818_avoid_UIP` spin for up to 100 ms per clock read.
#[derive(Default)]
pub struct Cmos {
    index: u8,
}

impl Cmos {
    /// The index port.
    pub const INDEX: u16 = 0x70;
    /// The data port.
    pub const DATA: u16 = 0x71;

    /// An `out` to port 0x70 or 0x71.
    pub fn write(&mut self, port: u16, value: u8) {
        if port == Self::INDEX {
            self.index = value & 0x7f; // bit 7 is the NMI mask
        }
    }

    /// An `in` from port 0x70 or 0x71.
    pub fn read(&self, port: u16) -> u8 {
        if port == Self::INDEX {
            return self.index;
        }
        match self.index {
            0x06 => 0x05, // Thursday
            0x07 | 0x08 => 0x01,
            0x09 => 0x26,
            0x0a => 0x26, // status A: 32.768 kHz base, 1024 Hz rate, update not in progress
            0x0b => 0x02, // status B: 24-hour, BCD, no interrupts
            0x0d => 0x80, // status D: valid RAM and time
            0x32 => 0x20,
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_console_splits_lines_and_a_run_starts_empty() {
        let mut console = Console::default();
        console.write_all(b"[ 0.1] Linux version 6.1\r\nhalf").unwrap();
        assert_eq!(console.lines(), ["[ 0.1] Linux version 6.1"]);
        assert_eq!(console.take_lines().len(), 1);
        console.write_all(b" line\n").unwrap();
        assert_eq!(console.lines(), [" line"], "the partial line before take_lines is dropped");
    }

    #[test]
    fn the_clock_reads_a_fixed_date() {
        let mut cmos = Cmos::default();
        cmos.write(Cmos::INDEX, 0x09 | 0x80);
        assert_eq!(cmos.read(Cmos::DATA), 0x26);
        assert_eq!(cmos.read(Cmos::INDEX), 0x09);
    }
}
