//! The panic handler: records why and where into the mailbox, reports PANIC and halts.
//!
//! `PanicRecord::rip` says where the panic is, as an address:
//! - for a panic about an exception ([`exception`]), the faulting RIP;
//! - for the guest's own panics ([`fail!`], and so every `invariant::violated`), the RIP of the
//!   panic site itself, taken there with `lea`;
//! - for a panic raised inside `core` (an index out of bounds), the panic handler's own RIP. The
//!   caller's address is not recoverable: `core::panicking` is prebuilt without frame pointers.
//!   The location (file, line, column) says where.

use core::arch::asm;
use core::fmt::{self, Write as _};
use core::panic::PanicInfo;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use nmifuzz_abi::{PANIC_FILE_LEN, PANIC_MESSAGE_LEN, PanicRecord};

use crate::mailbox;

/// Set by the first panic; a panic while recording one goes straight to the report.
static PANICKING: AtomicBool = AtomicBool::new(false);
/// The address the panic being raised is about; 0 until a panic site or [`exception`] sets it.
static PANIC_RIP: AtomicU64 = AtomicU64::new(0);

/// `panic!` that records the RIP of its own site in the panic record.
macro_rules! fail {
    ($($arg:tt)*) => {{
        $crate::panic::note_rip($crate::panic::here());
        panic!($($arg)*)
    }};
}
pub(crate) use fail;

/// The address of this instruction in the caller (always inlined).
#[inline(always)]
pub fn here() -> u64 {
    let rip: u64;
    // SAFETY: `lea` only computes an address into a register.
    unsafe { asm!("lea {}, [rip]", out(reg) rip, options(nomem, nostack, preserves_flags)) };
    rip
}

/// Makes `rip` the address the next panic record reports.
#[inline(always)]
pub fn note_rip(rip: u64) {
    PANIC_RIP.store(rip, Ordering::Relaxed);
}

/// Panics about an exception taken at `rip`, with `message`; the record's `rip` is `rip`.
#[track_caller]
pub fn exception(rip: u64, message: fmt::Arguments) -> ! {
    note_rip(rip);
    panic!("{message}")
}

#[panic_handler]
fn on_panic(info: &PanicInfo) -> ! {
    if !PANICKING.swap(true, Ordering::Relaxed) {
        mailbox::record_panic(&record(info));
    }
    mailbox::panicked()
}

/// The mailbox record for `info`.
fn record(info: &PanicInfo) -> PanicRecord {
    let mut message = Truncating::<PANIC_MESSAGE_LEN>::new();
    // Truncating::write_str never fails; a failing Display impl only cuts the message short.
    let _ = write!(message, "{}", info.message());
    let mut file = Truncating::<PANIC_FILE_LEN>::new();
    let (mut line, mut column) = (0, 0);
    if let Some(location) = info.location() {
        let _ = file.write_str(location.file());
        (line, column) = (location.line(), location.column());
    }
    let rip = match PANIC_RIP.load(Ordering::Relaxed) {
        // A panic from inside `core`, whose site nothing recorded: here is as close as it gets.
        0 => here(),
        rip => rip,
    };
    PanicRecord {
        rip,
        line,
        column,
        file_len: file.len as u32,
        message_len: message.len as u32,
        file: file.buf,
        message: message.buf,
    }
}

/// A fixed buffer that keeps what fits and drops the rest, cutting only at a UTF-8 character
/// boundary, so the kept bytes stay valid UTF-8 and writing never fails or panics.
struct Truncating<const N: usize> {
    buf: [u8; N],
    len: usize,
    /// Something was dropped: later, shorter pieces must not be appended after the gap.
    full: bool,
}

impl<const N: usize> Truncating<N> {
    fn new() -> Self {
        Self { buf: [0; N], len: 0, full: false }
    }
}

impl<const N: usize> fmt::Write for Truncating<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if self.full {
            return Ok(());
        }
        let mut take = s.len().min(N - self.len);
        if take < s.len() {
            self.full = true;
            while !s.is_char_boundary(take) {
                take -= 1;
            }
        }
        self.buf[self.len..self.len + take].copy_from_slice(&s.as_bytes()[..take]);
        self.len += take;
        Ok(())
    }
}
