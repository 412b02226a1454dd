//! The fuzzer's input, a [`Schedule`], with its generator and its structure-aware mutators.
//!
//! # Limits the fuzzer keeps to
//! Schedules the fuzzer makes stay far inside the schedule format's limits
//! ([`Schedule::validate`]: `SCHEDULE_MAX_*`) and inside the engine's budgets
//! ([`RunOptions::default`](vmm::engine::RunOptions): 1,000,000 stepped instructions per run,
//! and 5,000 in NMI context beyond the busy work the script asks for), so that exhausting a
//! budget means a looping guest and never a long schedule:
//! - at most [`FUZZER_MAX_INJECTIONS`] injections and [`FUZZER_MAX_ACTIONS`] handler actions;
//! - `after` (and a symbolic point's `extra`) at most [`FUZZER_MAX_DELAY`] instructions: the
//!   default workload loop is about 1,000 stepped instructions long, so later NMIs never arrive;
//! - `busy` at most [`FUZZER_MAX_BUSY`], at most [`FUZZER_MAX_FAULTS`] faults per action.
//!
//! # The generator (also the random baseline of evaluations)
//! [`ScheduleGenerator`] draws, independently and uniformly:
//! - the workload, a gene: the user workload with probability 1/2 if the guest has it
//!   ([`Points::has_user`](crate::points::Points::has_user)), the loop otherwise; the loop
//!   runs its default length (`workload_iterations: 0`), the user workload
//!   [`GENERATED_USER_ITERATIONS`];
//! - 1 to 4 injections, each a symbolic point of the guest's instruction table
//!   ([`crate::points`]): the first where the workload runs (in the workload loop; for the
//!   user workload half the time at a ring-3 point, half the time in a SYSCALL gap, the
//!   entry's user path or the return to user), the others anywhere in the table (the entry,
//!   `do_nmi`, the exception paths, the workload, the places around ring 3); occurrence 1 to
//!   3, and a quarter of the time 1 or 2 `extra` instructions. Symbolic points are what the
//!   fast mode runs without stepping;
//! - one handler action per injection, each with `busy` in `0..=16` ([`GENERATED_BUSY`]) and,
//!   with probability 1/2, 1 or 2 faults drawn from the allowed faults (none otherwise; by
//!   default the exceptions, and for the user workload `revoke-cs`, which does nothing to an
//!   NMI that interrupted ring 0);
//! - the stress option (`stress_unmask`) with probability 1/2;
//! - for the user workload, with probability 1/2, 1 to 3 sets of user
//!   RFLAGS bits ([`random_user_flags`]: one or two of the arithmetic flags, DF, AC and NT
//!   each), set before the system calls and points in turn;
//! - the campaign's variant.
//!
//! The variant is fixed per campaign: no mutator reads or writes it. [`ToggleWorkload`] flips
//! the workload gene, [`ChangeUserFlags`] the user flags.
//!
//! # Layout
//! - this file: the input type, the fuzzer's limits and the faults a campaign allows;
//! - [`generate`]: the generator;
//! - [`mutate`]: the structure-aware mutators and [`nmi_mutations!`](crate::nmi_mutations),
//!   the list havoc draws from (the symbolic-point mutators live in [`crate::points`]);
//! - [`flags`]: the user flags, drawn and mutated.

mod flags;
mod generate;
mod mutate;
#[cfg(test)]
mod tests;

use std::hash::Hash;
use std::path::Path;

use libafl::Error;
use libafl::corpus::CorpusId;
use libafl::inputs::Input;
use libafl_bolts::HasLen;
use serde::{Deserialize, Serialize};
use vmm::engine::schedule::{Fault, Schedule, Workload};

pub use self::flags::{ChangeUserFlags, random_user_flags};
pub use self::generate::ScheduleGenerator;
pub use self::mutate::{
    ChangeBusy, ChangeFaults, DuplicateInjection, InsertInjection, InsertOrRemoveAction,
    RemoveInjection, ShiftDelayLarge, ShiftDelaySmall, SpliceSchedules, ToggleWorkload,
};
use crate::store;

/// Most injections in a schedule the fuzzer makes.
pub const FUZZER_MAX_INJECTIONS: usize = 16;
/// Most handler actions in a schedule the fuzzer makes.
pub const FUZZER_MAX_ACTIONS: usize = 8;
/// Largest `after`/`extra` the mutators set, in instructions.
pub const FUZZER_MAX_DELAY: u64 = 2_000;
/// Largest `busy` the mutators set.
pub const FUZZER_MAX_BUSY: u32 = 64;
/// Most faults in one handler action the fuzzer makes.
pub const FUZZER_MAX_FAULTS: usize = 3;
/// The generator's largest `busy`.
pub const GENERATED_BUSY: u32 = 16;
/// Iterations of the user workload in the schedules the fuzzer makes: each point is reached
/// once per iteration, so the generator's occurrences (1 to 3) all come.
pub const GENERATED_USER_ITERATIONS: u32 = 3;

/// The `workload_iterations` the fuzzer gives a schedule of `workload`.
pub fn generated_iterations(workload: Workload) -> u32 {
    match workload {
        Workload::Loop => 0,
        Workload::User => GENERATED_USER_ITERATIONS,
    }
}

/// The input: a schedule. JSON on disk (the reproducer format `nmifuzz replay` reads),
/// postcard inside LibAFL (the schedule types are externally tagged and skip no field).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NmiInput(pub Schedule);

impl Input for NmiInput {
    fn to_file<P: AsRef<Path>>(&self, path: P) -> Result<(), Error> {
        store::write_atomic(path.as_ref(), self.0.to_json().as_bytes()).map_err(Error::from)
    }

    fn from_file<P: AsRef<Path>>(path: P) -> Result<Self, Error> {
        Schedule::load(path.as_ref()).map(Self).map_err(|e| Error::serialize(e.to_string()))
    }

    fn generate_name(&self, _id: Option<CorpusId>) -> String {
        store::corpus_name(&self.0)
    }
}

/// The length LibAFL's schedulers prefer short inputs by: the number of injections.
impl HasLen for NmiInput {
    fn len(&self) -> usize {
        self.0.injections.len()
    }
}

/// The faults a campaign allows, and of those the ones that do something to each workload:
/// `revoke-cs` does nothing to an NMI that interrupted ring 0, so loop schedules never draw it.
#[derive(Clone, Debug)]
pub struct AllowedFaults {
    all: Vec<Fault>,
    ring0: Vec<Fault>,
}

impl AllowedFaults {
    /// The faults of `faults` that each workload may use.
    pub fn new(faults: &[Fault]) -> Self {
        let ring0 = faults.iter().copied().filter(|f| *f != Fault::RevokeCs).collect();
        Self { all: faults.to_vec(), ring0 }
    }

    /// The allowed faults that do something to an NMI of `workload`.
    pub fn of(&self, workload: Workload) -> &[Fault] {
        match workload {
            Workload::Loop => &self.ring0,
            Workload::User => &self.all,
        }
    }
}
