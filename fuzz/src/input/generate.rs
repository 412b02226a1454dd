//! The generator of the fuzzer's first inputs, and of the random baseline's (see the module
//! documentation of [`super`]).

use std::sync::Arc;

use libafl::Error;
use libafl::generators::Generator;
use libafl::state::HasRand;
use libafl_bolts::rands::Rand;
use vmm::engine::schedule::{Fault, HandlerAction, SCHEDULE_FORMAT, Schedule, Workload};

use super::{AllowedFaults, GENERATED_BUSY, NmiInput, generated_iterations, random_user_flags};
use crate::points::{Table, random_point};

/// Makes the initial inputs when the corpus is empty (see the module documentation).
pub struct ScheduleGenerator {
    variant: String,
    faults: AllowedFaults,
    table: Table,
}

impl ScheduleGenerator {
    /// A generator for `variant` whose actions use only `faults` and whose points come from
    /// `table` (the variant's instruction table).
    pub fn new(variant: &str, faults: &[Fault], table: &Table) -> Self {
        let faults = AllowedFaults::new(faults);
        Self { variant: variant.to_owned(), faults, table: Arc::clone(table) }
    }

    /// One schedule from `rand`.
    pub fn schedule<R: Rand>(&self, rand: &mut R) -> Schedule {
        // A guest without the user workload draws exactly what it drew before the gene.
        let workload = if self.table.has_user() && rand.coinflip(0.5) {
            Workload::User
        } else {
            Workload::Loop
        };
        let count = rand.between(1, 4);
        let injections =
            (0..count).map(|k| random_point(rand, &self.table, workload, k == 0)).collect();
        let actions = (0..count).map(|_| self.action(rand, workload)).collect();
        let stress_unmask = rand.coinflip(0.5);
        // Drawn last, and only for the user workload: loop schedules stay what they were.
        let user_flags = if workload == Workload::User && rand.coinflip(0.5) {
            random_user_flags(rand)
        } else {
            Vec::new()
        };
        Schedule {
            format: SCHEDULE_FORMAT,
            description: String::new(),
            variant: self.variant.clone(),
            workload,
            workload_iterations: generated_iterations(workload),
            stress_unmask,
            actions,
            injections,
            user_flags,
            origin: None,
        }
    }

    fn action<R: Rand>(&self, rand: &mut R, workload: Workload) -> HandlerAction {
        let busy = rand.between(0, GENERATED_BUSY as usize) as u32;
        let mut faults = Vec::new();
        let allowed = self.faults.of(workload);
        if !allowed.is_empty() && rand.coinflip(0.5) {
            for _ in 0..rand.between(1, 2) {
                faults.push(allowed[rand.below_or_zero(allowed.len())]);
            }
        }
        HandlerAction { busy, faults }
    }
}

impl<S: HasRand> Generator<NmiInput, S> for ScheduleGenerator {
    fn generate(&mut self, state: &mut S) -> Result<NmiInput, Error> {
        Ok(NmiInput(self.schedule(state.rand_mut())))
    }
}
