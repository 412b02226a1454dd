//! Console output for humans: one `out dx, al` per byte to the host's console port
//! ([`port::CONSOLE`], the legacy COM1 data register).
//!
//! Each byte is a VM exit (~8 µs on the kvm_pvm host), so only boot prints; nothing on a run's
//! path does, and nothing in NMI or exception context.

use core::arch::asm;
use core::fmt;

use nmifuzz_abi::port;

/// A [`fmt::Write`] sink that sends every byte to the console port.
pub struct Console;

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for byte in s.bytes() {
            // SAFETY: `out` to the console port exits to the host and touches no guest memory,
            // stack or flags.
            unsafe {
                asm!(
                    "out dx, al",
                    in("dx") port::CONSOLE,
                    in("al") byte,
                    options(nomem, nostack, preserves_flags)
                );
            }
        }
        Ok(())
    }
}

/// One exit through the ping port, which the host ignores (`Workload::Ping`).
pub fn ping() {
    // SAFETY: `out` to the ping port exits to the host and touches no guest memory, stack or
    // flags.
    unsafe {
        asm!("out dx, al", in("dx") port::PING, in("al") 0u8, options(nomem, nostack, preserves_flags));
    }
}

/// `println!` for the console: formats its arguments and a newline to [`Console`].
macro_rules! kprintln {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        // Console::write_str never fails; a failing Display impl would only cut the line short.
        let _ = writeln!($crate::console::Console, $($arg)*);
    }};
}

pub(crate) use kprintln;
