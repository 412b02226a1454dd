//! What the engine reports about NMI states as it goes: at every injection, delivery,
//! handler-entry stop and IRETQ it sees, the state of NMI handling. The engine only reports;
//! what counts as new (the fuzzer's coverage) is decided by whoever observes.

use super::trace::Injected;

/// The moment an [`NmiState`] was seen at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Moment {
    /// An NMI of the schedule was injected at the stop before `rip`, and taken as `how`.
    Injected {
        /// Delivered, latched or dropped.
        how: Injected,
    },
    /// An NMI was delivered; `rip` is the RIP its hardware frame saved (where it struck).
    Delivered,
    /// The guest is at the entry of the handler of exception `vector` (a stop of the stepped
    /// engine; the fast mode sees it only while stepping).
    HandlerEntry {
        /// The vector.
        vector: u8,
    },
    /// The IRETQ at `rip` returns to `target` (judged by the return-integrity oracle while
    /// NMI contexts are open).
    Iretq {
        /// Return RIP.
        target: u64,
    },
}

/// The state of NMI handling at a [`Moment`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NmiState {
    /// What happened.
    pub moment: Moment,
    /// Where the guest was (for a delivery, where the NMI struck).
    pub rip: u64,
    /// NMI nesting depth (open interrupted contexts), after a delivery counting it.
    pub depth: u32,
    /// The variant's "NMI executing" variable, if it has one.
    pub nmi_executing: Option<u64>,
    /// NMIs injected and not yet delivered (after an injection counting it).
    pub undelivered: u64,
}

/// Receives the engine's [`NmiState`]s.
pub trait NmiObserver {
    /// Called at each moment, in execution order.
    fn observe(&mut self, state: &NmiState);
}

/// An observer that keeps nothing.
impl NmiObserver for () {
    fn observe(&mut self, _: &NmiState) {}
}
