//! The mutator that starts over: it replaces its input with a schedule fresh from the
//! generator, the one that makes the campaign's first inputs and the random baseline's every
//! input.
//!
//! Why a campaign needs it: its other mutators walk near the corpus, which NMI-state coverage
//! keeps small and whose scheduler favours the smallest schedules. Where a bug is shallow for
//! the generator (most random schedules of 1–4 NMIs reach it within a few hundred
//! executions), a campaign that only walks needed 1.3 to 6.7 times more executions than random
//! timing (docs/history.md, "Evaluation"). With fresh schedules among its mutations the campaign keeps the
//! generator's reach, and feedback still keeps what they find.

use std::borrow::Cow;

use libafl::Error;
use libafl::corpus::CorpusId;
use libafl::mutators::{MutationResult, Mutator};
use libafl::state::HasRand;
use libafl_bolts::Named;
use vmm::engine::schedule::Fault;

use crate::input::{NmiInput, ScheduleGenerator};
use crate::points::Table;

/// Replaces the input with a fresh generated schedule, of the input's variant.
pub struct Regenerate {
    generator: ScheduleGenerator,
}

impl Regenerate {
    /// A mutator whose schedules are those of a generator with `faults` and `table`.
    pub fn new(faults: &[Fault], table: &Table) -> Self {
        // The variant is the input's (see `mutate`), whatever the generator's.
        Self { generator: ScheduleGenerator::new("", faults, table) }
    }
}

impl Named for Regenerate {
    fn name(&self) -> &Cow<'static, str> {
        static NAME: Cow<'static, str> = Cow::Borrowed("Regenerate");
        &NAME
    }
}

impl<S: HasRand> Mutator<NmiInput, S> for Regenerate {
    fn mutate(&mut self, state: &mut S, input: &mut NmiInput) -> Result<MutationResult, Error> {
        let variant = std::mem::take(&mut input.0.variant);
        *input = NmiInput(self.generator.schedule(state.rand_mut()));
        input.0.variant = variant;
        Ok(MutationResult::Mutated)
    }
    fn post_exec(&mut self, _: &mut S, _: Option<CorpusId>) -> Result<(), Error> {
        Ok(())
    }
}
