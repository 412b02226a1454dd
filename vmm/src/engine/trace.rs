//! The per-step trace of a run and its hash.
//!
//! The hash covers every stop's RIP and every event, so two runs with the same hash took the
//! same path with the same NMI history. It is computed on every run; the full trace is kept
//! only when asked for (replay), since it costs memory and time per step.

use std::fmt;

use serde::Serialize;

use crate::hash::Fnv1a;

/// How an injected NMI was taken, decided at the moment of injection from the NMI state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Injected {
    /// NMIs were unblocked and none pending: it is delivered before the next instruction.
    Delivered,
    /// NMIs were blocked (or one was already about to be delivered): it waits in the latch.
    Latched,
    /// The latch was already full: it merges with the latched one, as on hardware.
    Dropped,
}

/// Something that happened at a stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Event {
    /// The schedule's injection number `index` was made here.
    NmiInjected {
        /// Index in the schedule.
        index: usize,
        /// How it was taken.
        how: Injected,
    },
    /// A final NMI after DONE, to check that NMIs are not left blocked.
    ProbeNmiInjected,
    /// An NMI was delivered before this stop's instruction ran; `frame_rip` is the RIP the
    /// hardware frame saved.
    NmiDelivered {
        /// Interrupted RIP.
        frame_rip: u64,
    },
    /// The guest entered the handler of exception `vector` (seen at a handler-entry stop).
    Exception {
        /// The vector.
        vector: u8,
    },
    /// An IRETQ returned to `target`; `emulated` if the VMM performed it.
    Iretq {
        /// Return RIP.
        target: u64,
        /// Whether the VMM performed it.
        emulated: bool,
    },
    /// A `sysretq` returned to ring 3 at `target`.
    Sysretq {
        /// Return RIP (RCX).
        target: u64,
    },
    /// The IRETQ here would return to `target` without resuming the context its NMI
    /// interrupted: the run ends with a wrong-return verdict.
    WrongReturn {
        /// Return RIP.
        target: u64,
    },
    /// A `do_nmi` iteration started.
    NmiIteration,
    /// The guest reported through port I/O.
    Report {
        /// The report code.
        code: u32,
    },
    /// Nothing was left to watch: the VMM stopped single-stepping.
    FreeRun,
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NmiInjected { index, how } => write!(f, "NMI #{index} injected ({how:?})"),
            Self::ProbeNmiInjected => write!(f, "probe NMI injected"),
            Self::NmiDelivered { frame_rip } => {
                write!(f, "NMI delivered (frame RIP {frame_rip:#x})")
            }
            Self::Exception { vector } => write!(f, "exception vector {vector}"),
            Self::Iretq { target, emulated: true } => write!(f, "IRETQ to {target:#x} (emulated)"),
            Self::Iretq { target, emulated: false } => write!(f, "IRETQ to {target:#x}"),
            Self::Sysretq { target } => write!(f, "SYSRET to {target:#x}"),
            Self::WrongReturn { target } => {
                write!(f, "WRONG RETURN: IRETQ to {target:#x} resumes no interrupted context")
            }
            Self::NmiIteration => write!(f, "do_nmi iteration"),
            Self::Report { code } => write!(f, "report {code}"),
            Self::FreeRun => write!(f, "free run from here"),
        }
    }
}

/// One stop of a run: the boundary before the instruction at `rip`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Step {
    /// Instructions retired before this boundary.
    pub index: u64,
    /// The next instruction.
    pub rip: u64,
    /// NMI nesting depth (interrupted contexts not yet returned to).
    pub depth: u32,
    /// The variant's "NMI executing" variable, if it has one.
    pub nmi_executing: Option<u64>,
    /// What happened here.
    pub events: Vec<Event>,
}

/// Accumulates the trace hash and, optionally, the steps.
pub struct Recorder {
    hash: Fnv1a,
    keep: bool,
    steps: Vec<Step>,
}

impl Recorder {
    /// A recorder that keeps the steps if `keep`.
    pub fn new(keep: bool) -> Self {
        Self { hash: Fnv1a::new(), keep, steps: Vec::new() }
    }

    fn mix(&mut self, value: u64) {
        self.hash.write(&value.to_le_bytes());
    }

    /// Records a stop.
    pub fn stop(&mut self, index: u64, rip: u64, depth: u32, nmi_executing: Option<u64>) {
        self.mix(rip);
        if self.keep {
            self.steps.push(Step { index, rip, depth, nmi_executing, events: Vec::new() });
        }
    }

    /// Records an event at the latest stop.
    pub fn event(&mut self, event: Event) {
        // A fixed encoding, so hashes stay comparable across builds.
        let (tag, a, b) = match event {
            Event::NmiInjected { index, how } => (1, index as u64, how as u64),
            Event::ProbeNmiInjected => (2, 0, 0),
            Event::NmiDelivered { frame_rip } => (3, frame_rip, 0),
            Event::Exception { vector } => (4, vector.into(), 0),
            Event::Iretq { target, emulated } => (5, target, emulated.into()),
            Event::NmiIteration => (6, 0, 0),
            Event::Report { code } => (7, code.into(), 0),
            Event::FreeRun => (8, 0, 0),
            Event::WrongReturn { target } => (9, target, 0),
            Event::Sysretq { target } => (10, target, 0),
        };
        for value in [tag, a, b] {
            self.mix(value);
        }
        if let Some(step) = self.steps.last_mut() {
            step.events.push(event);
        }
    }

    /// The hash so far.
    pub fn hash(&self) -> u64 {
        self.hash.finish()
    }

    /// The kept steps.
    pub fn into_steps(self) -> Vec<Step> {
        self.steps
    }
}
