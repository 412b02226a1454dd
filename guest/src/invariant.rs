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

use core::fmt;

use crate::panic::fail;

/// Panics with `message` as a violation of invariant `number`; the location and the recorded
/// RIP are the caller's (always inlined, so that [`fail!`] takes the caller's RIP).
#[inline(always)]
#[track_caller]
pub fn violated(number: u8, message: fmt::Arguments) -> ! {
    fail!("invariant violated: {message} [invariant {number}]")
}
