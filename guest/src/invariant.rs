//! How a broken invariant is reported: a panic whose message starts with `invariant violated:`
//! and ends with the number of the invariant in design.md section 4, so that a verdict names
//! what broke.
//!
//! The guest-side invariants, and where they are checked:
//! 1. NMI handling never nests: `do_nmi` is never entered while it runs, nor for an NMI that
//!    interrupted NMI handling (its interrupted RSP on the NMI stack) (`nmi::handler`).
//! 2. The interrupted context is restored exactly: registers, RSP, RFLAGS and CR2 in the
//!    workload loop (`workload::checked`); CR2 and DR7 are restored by `do_nmi`.
//! 3. Stack discipline: IST guard words (`tss`), and the running iteration's saved registers
//!    and final return frame against a shadow copy (`nmi::checks`).
//! 4. No lost NMI: every delivery is followed by an iteration start, and iterations never
//!    outnumber deliveries (`nmi::checks`, with a delivery count kept by every entry).
//! 5. `do_nmi`'s `regs` stay the interrupted context from the iteration's start to its end
//!    (`nmi::checks`, the same shadow copy).
//! 6. No unexpected exception or double fault; an exception's frame is intact when its handler
//!    ends; the #PF handler sees the CR2 of its own fault (`exceptions`, `user::traps`).
//!
//! 7 to 9 are the host's. Two more for the user-mode half (design.md section 3b):
//! 10. Privilege integrity: every return to ring 3 has a user CS, a user SS and a user RIP,
//!     and ring 3 is entered from on the segments it was returned to (`user`); no user RIP
//!     runs with a kernel CS (the user workload checks the privilege level of CS and SS); no
//!     kernel RIP runs at CPL3 and ring 3 touches no kernel memory (a #PF from ring 3,
//!     `user::traps`).
//! 11. GS integrity: kernel code runs on the kernel's GS base (checked by the system-call
//!     handler, exceptions from ring 3 and `do_nmi` for NMIs from ring 3, `percpu`), user code
//!     on the user's (the user workload checks `gs:[0]`).
//! 12. Flag hygiene: the kernel's C code runs with DF = 0, whatever the interrupted code had
//!     (the ABI's rule; SYSCALL's SFMASK and the entries' `cld` are there for it), and the
//!     system-call handler also with AC and NT clear, which SFMASK must clear too (AC would
//!     switch SMAP off; NT makes the kernel's next IRET raise #GP). Checked where the C code
//!     starts: `do_syscall`, `exception_dispatch` (both paths), `do_nmi` ([`check_flags`]).

use core::arch::asm;
use core::fmt;

use nmifuzz_abi::user_flag;

use crate::panic::fail;

/// Invariant 12 where the C code called by `place` starts: DF clear, and `also` (a set of
/// [`user_flag`] bits) clear too. Out of line: the caller's flags are what the entry left.
#[inline(never)]
#[track_caller]
pub fn check_flags(place: &str, also: u32) {
    let rflags: u64;
    // SAFETY: reads RFLAGS through the stack, which the caller is running on.
    unsafe { asm!("pushfq", "pop {}", out(reg) rflags, options(preserves_flags)) };
    let set = rflags & u64::from(user_flag::DF | also);
    if set != 0 {
        violated(
            12,
            format_args!(
                "{place} runs with RFLAGS {rflags:#x}: {} set, which the entry must clear",
                flag_names(set)
            ),
        );
    }
}

/// The names of the [`user_flag`] bits in `bits`, as `DF+AC`.
fn flag_names(bits: u64) -> &'static str {
    const DF: u64 = user_flag::DF as u64;
    const AC: u64 = user_flag::AC as u64;
    const NT: u64 = user_flag::NT as u64;
    match bits & (DF | AC | NT) {
        DF => "DF",
        AC => "AC",
        NT => "NT",
        x if x == DF | AC => "DF+AC",
        x if x == DF | NT => "DF+NT",
        x if x == AC | NT => "AC+NT",
        _ => "DF+AC+NT",
    }
}

/// Panics with `message` as a violation of invariant `number`; the location and the recorded
/// RIP are the caller's (always inlined, so that [`fail!`] takes the caller's RIP).
#[inline(always)]
#[track_caller]
pub fn violated(number: u8, message: fmt::Arguments) -> ! {
    fail!("invariant violated: {message} [invariant {number}]")
}
