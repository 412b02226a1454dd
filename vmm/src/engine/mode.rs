//! Execution modes: how the guest is moved between the boundaries that matter.
//!
//! Both modes keep the same books ([`super::books`]) and the same oracles, and inject at the
//! same boundaries; they differ in how they move the guest between the stops that matter:
//!
//! - [`Mode::Stepped`] single-steps every instruction from the snapshot to the last injection,
//!   so it counts every retired instruction and reaches `after: N` points exactly. It is the
//!   reference: `replay --trace`, `tmin` and the sweep's measurement runs use it.
//! - [`Mode::Fast`] free-runs, and stops only where the books and oracles need a stop: the
//!   next symbolic point is a hardware execute breakpoint, and each hit is a stop where the hit
//!   is counted as the stepped engine counts it; while NMIs are under way, every IRETQ on the
//!   NMI paths is trapped ([`super::traps`]), so the return-integrity oracle judges each one
//!   and the engine performs or steps it, so a latched NMI still arrives right after the
//!   unblocking IRETQ; a delivery is booked at the next stop. It single-steps from a point's
//!   occurrence for its `extra` instructions, and for one instruction to move off its own
//!   breakpoint or an IRETQ it did not perform.
//!   An `after: N` injection is counted in stepped instructions, so the fast mode steps
//!   towards it too: it is exact for every plan, and fast for symbolic ones.
//!
//! # Debug registers while the fast mode free-runs
//! DR0 holds the awaited point and DR1 the start of a `do_nmi` iteration, where the books count
//! iterations (and an iteration no delivery explains is a lost-NMI finding). DR2 and DR3 are
//! free. While stepping, the engine's breakpoints on the handler entries take all four
//! ([`super::watch`]); a point on one of those entries is reached by its free-running
//! breakpoint, as any other address.

use serde::{Deserialize, Serialize};

use super::books::Books;
use super::cursor::Cursor;
use super::watch::Watches;

/// How an execution moves the guest (see the module documentation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Single-step everything up to the last injection: the reference.
    #[default]
    Stepped,
    /// Free-run to hardware breakpoints and IRETQ traps; step only where exactness needs it.
    Fast,
}

impl Mode {
    /// Whether the guest must be single-stepped from the current boundary on.
    pub(super) fn wants_stepping(self, cursor: &Cursor<'_>, books: &Books) -> bool {
        match self {
            Self::Stepped => books.busy() || cursor.pending(),
            Self::Fast => cursor.counting(),
        }
    }

    /// The hardware breakpoints while free-running: for the fast mode, the awaited point,
    /// `iteration` while an injection is left or NMIs are under way (the stepped engine sees
    /// every iteration start then), while a point is awaited, `exception_return` if the host
    /// needs it watched, and where the outermost open ring-0 NMI context resumes (see
    /// [`Watches::free_run`]); none for the stepped engine.
    pub(super) fn free_run_watches(
        self,
        cursor: &Cursor<'_>,
        books: &Books,
        iteration: u64,
        exception_return: Option<u64>,
    ) -> Watches {
        match self {
            Self::Fast => {
                let point = cursor.awaited_point();
                let watch_iterations = cursor.pending() || books.busy();
                Watches::free_run(
                    point,
                    watch_iterations.then_some(iteration),
                    exception_return.filter(|_| point.is_some()),
                    books.outermost_kernel_return(),
                )
            }
            Self::Stepped => Watches::default(),
        }
    }

    /// Whether a free run sets the IRETQ traps ([`super::traps`]): the fast mode does while
    /// NMIs are under way.
    pub(super) fn free_run_traps(self, books: &Books) -> bool {
        self == Self::Fast && books.busy()
    }
}
