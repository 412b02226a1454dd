//! Execution modes: how the guest is moved between the boundaries that matter.
//!
//! Both modes keep the same books ([`super::books`]) and the same oracles, and stop at the
//! same boundaries wherever an NMI is pending or handled; they differ only in how they get
//! from one injection to the next while nothing is under way:
//!
//! - [`Mode::Stepped`] single-steps every instruction from the snapshot to the last injection,
//!   so it counts every retired instruction and reaches `after: N` points exactly. It is the
//!   reference: `replay --trace`, `tmin` and the sweep's measurement runs use it.
//! - [`Mode::Fast`] free-runs while no NMI is pending or handled and the next injection waits
//!   for a symbolic point. The point is a hardware execute breakpoint; each hit is a stop where
//!   the hit is counted as the stepped engine counts it. At the point's occurrence (and for its
//!   `extra` instructions), while any NMI is pending or latched (so that a latched NMI is still
//!   delivered at the hardware boundary, right after the unblocking IRETQ the engine performs
//!   itself), while any interrupted context is open (so that the return-integrity oracle sees
//!   every IRETQ), and until a delivery's `do_nmi` iteration starts, it steps exactly like the
//!   stepped engine. An `after: N` injection is counted in stepped instructions, so the fast
//!   mode steps towards it too: it is exact for every plan, and fast for symbolic ones.
//!
//! # Debug registers while the fast mode free-runs
//! DR0 holds the awaited point and DR1 the start of a `do_nmi` iteration (an iteration
//! without an NMI being handled is a lost-NMI finding the stepped engine would see at its stop;
//! the fast mode must stop there too). DR2 and DR3 are free. While stepping, the engine's usual
//! breakpoints on the #BP, #UD and #PF entries take DR0-DR2; a point on one of those entries
//! is reached by its free-running breakpoint, as any other address.

use serde::{Deserialize, Serialize};

use super::books::Books;
use super::cursor::Cursor;

/// How an execution moves the guest (see the module documentation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Single-step everything up to the last injection: the reference.
    #[default]
    Stepped,
    /// Free-run to hardware breakpoints between injections; step where NMIs are handled.
    Fast,
}

/// DR6.B0-B3 of the breakpoints the fast mode sets while free-running.
pub(super) const FREE_RUN_BREAKPOINTS: u64 = 0b11;

impl Mode {
    /// Whether the guest must be single-stepped from the current boundary on; `iretq_traps`
    /// says whether the host lets IRETQ traps stop a free run ([`super::traps`]).
    pub(super) fn wants_stepping(
        self,
        cursor: &Cursor<'_>,
        books: &Books,
        iretq_traps: bool,
    ) -> bool {
        match self {
            Self::Stepped => books.busy() || cursor.pending(),
            Self::Fast => cursor.counting() || (books.busy() && !iretq_traps),
        }
    }

    /// The hardware breakpoints while free-running: for the fast mode, the awaited point, and
    /// `iteration` while an injection is left or NMIs are under way (the stepped engine sees
    /// every iteration start then); none for the stepped engine.
    pub(super) fn free_run_breakpoints(
        self,
        cursor: &Cursor<'_>,
        books: &Books,
        iteration: u64,
    ) -> [Option<u64>; 4] {
        match self {
            Self::Fast => {
                let watch_iterations = cursor.pending() || books.busy();
                [cursor.awaited_point(), watch_iterations.then_some(iteration), None, None]
            }
            Self::Stepped => [None; 4],
        }
    }

    /// Whether a free run sets the IRETQ traps ([`super::traps`]): the fast mode does while
    /// NMIs are under way, where the host lets traps stop it.
    pub(super) fn free_run_traps(self, books: &Books, iretq_traps: bool) -> bool {
        self == Self::Fast && iretq_traps && books.busy()
    }
}
