//! The structure-aware mutators of schedules: injections, delays, handler actions, faults,
//! crossover and the workload gene. Each keeps the fuzzer's limits ([`super`]) and never
//! touches the variant.

use std::borrow::Cow;
use std::sync::Arc;

use libafl::corpus::{Corpus, CorpusId};
use libafl::mutators::{MutationResult, Mutator};
use libafl::state::{HasCorpus, HasRand};
use libafl::{Error, random_corpus_id};
use libafl_bolts::Named;
use libafl_bolts::rands::Rand;
use vmm::engine::schedule::{Fault, HandlerAction, Injection, Workload};

use super::{
    AllowedFaults, FUZZER_MAX_ACTIONS, FUZZER_MAX_BUSY, FUZZER_MAX_DELAY, FUZZER_MAX_FAULTS,
    FUZZER_MAX_INJECTIONS, NmiInput, generated_iterations,
};
use crate::points::{MAX_EXTRA, Table, random_point};

/// Defines a unit mutator struct with its [`Named`] impl.
macro_rules! named {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        pub struct $name;
        named!(@impl $name);
    };
    (@impl $name:ident) => {
        impl Named for $name {
            fn name(&self) -> &Cow<'static, str> {
                static NAME: Cow<'static, str> = Cow::Borrowed(stringify!($name));
                &NAME
            }
        }
    };
}

/// A random index below `len`, or `None` for an empty list.
fn pick<R: Rand>(rand: &mut R, len: usize) -> Option<usize> {
    (len > 0).then(|| rand.below_or_zero(len))
}

/// The delay of an injection: `after`, or a symbolic point's `extra`.
fn delay_mut(injection: &mut Injection) -> &mut u64 {
    match injection {
        Injection::After(n) => n,
        Injection::At(point) => &mut point.extra,
    }
}

/// Picks one injection and gives its delay the value `new` computes from the old one;
/// skipped when there is no injection or the value does not change.
fn replace_delay<R: Rand>(
    rand: &mut R,
    input: &mut NmiInput,
    new: impl FnOnce(&mut R, u64) -> u64,
) -> MutationResult {
    let Some(k) = pick(rand, input.0.injections.len()) else {
        return MutationResult::Skipped;
    };
    let injection = &mut input.0.injections[k];
    // A point's extra instructions are stepped: they stay few.
    let limit = if matches!(injection, Injection::At(_)) { MAX_EXTRA } else { FUZZER_MAX_DELAY };
    let delay = delay_mut(injection);
    let value = new(rand, *delay).min(limit);
    if value == *delay {
        return MutationResult::Skipped;
    }
    *delay = value;
    MutationResult::Mutated
}

/// Adds `delta` (may be negative) to a delay, staying in `0..=FUZZER_MAX_DELAY`.
fn shift(value: u64, delta: i64) -> u64 {
    value.saturating_add_signed(delta).min(FUZZER_MAX_DELAY)
}

/// Inserts a new injection anywhere: a random point of the table (where the workload runs
/// when it comes first).
pub struct InsertInjection {
    table: Table,
}
named!(@impl InsertInjection);
impl InsertInjection {
    /// A mutator drawing points from `table`.
    pub fn new(table: &Table) -> Self {
        Self { table: Arc::clone(table) }
    }
}
impl<S: HasRand> Mutator<NmiInput, S> for InsertInjection {
    fn mutate(&mut self, state: &mut S, input: &mut NmiInput) -> Result<MutationResult, Error> {
        let injections = &mut input.0.injections;
        if injections.len() >= FUZZER_MAX_INJECTIONS {
            return Ok(MutationResult::Skipped);
        }
        let rand = state.rand_mut();
        let at = rand.below_or_zero(injections.len() + 1);
        injections.insert(at, random_point(rand, &self.table, input.0.workload, at == 0));
        Ok(MutationResult::Mutated)
    }
    fn post_exec(&mut self, _: &mut S, _: Option<CorpusId>) -> Result<(), Error> {
        Ok(())
    }
}

named!(
    /// Removes one injection (never the last one: a schedule without NMIs tests nothing).
    RemoveInjection
);
impl<S: HasRand> Mutator<NmiInput, S> for RemoveInjection {
    fn mutate(&mut self, state: &mut S, input: &mut NmiInput) -> Result<MutationResult, Error> {
        let injections = &mut input.0.injections;
        if injections.len() < 2 {
            return Ok(MutationResult::Skipped);
        }
        injections.remove(state.rand_mut().below_or_zero(injections.len()));
        Ok(MutationResult::Mutated)
    }
    fn post_exec(&mut self, _: &mut S, _: Option<CorpusId>) -> Result<(), Error> {
        Ok(())
    }
}

named!(
    /// Duplicates one injection in place: for `after`, a second NMI as far behind the first.
    DuplicateInjection
);
impl<S: HasRand> Mutator<NmiInput, S> for DuplicateInjection {
    fn mutate(&mut self, state: &mut S, input: &mut NmiInput) -> Result<MutationResult, Error> {
        let injections = &mut input.0.injections;
        if injections.len() >= FUZZER_MAX_INJECTIONS {
            return Ok(MutationResult::Skipped);
        }
        let Some(k) = pick(state.rand_mut(), injections.len()) else {
            return Ok(MutationResult::Skipped);
        };
        injections.insert(k + 1, injections[k].clone());
        Ok(MutationResult::Mutated)
    }
    fn post_exec(&mut self, _: &mut S, _: Option<CorpusId>) -> Result<(), Error> {
        Ok(())
    }
}

named!(
    /// Shifts one injection's delay by 1 to 8 instructions either way: the fine search for
    /// the exact boundary where a race opens.
    ShiftDelaySmall
);
impl<S: HasRand> Mutator<NmiInput, S> for ShiftDelaySmall {
    fn mutate(&mut self, state: &mut S, input: &mut NmiInput) -> Result<MutationResult, Error> {
        Ok(replace_delay(state.rand_mut(), input, |rand, delay| {
            let magnitude = rand.between(1, 8) as i64;
            shift(delay, if rand.coinflip(0.5) { magnitude } else { -magnitude })
        }))
    }
    fn post_exec(&mut self, _: &mut S, _: Option<CorpusId>) -> Result<(), Error> {
        Ok(())
    }
}

named!(
    /// Moves one injection's delay far: by 16 to 256 instructions either way, or to a fresh
    /// value in `0..=FUZZER_MAX_DELAY`, or to 0 (the same boundary as the previous NMI).
    ShiftDelayLarge
);
impl<S: HasRand> Mutator<NmiInput, S> for ShiftDelayLarge {
    fn mutate(&mut self, state: &mut S, input: &mut NmiInput) -> Result<MutationResult, Error> {
        Ok(replace_delay(state.rand_mut(), input, |rand, delay| match rand.below_or_zero(4) {
            0 => 0,
            1 => rand.between(0, FUZZER_MAX_DELAY as usize) as u64,
            2 => shift(delay, rand.between(16, 256) as i64),
            _ => shift(delay, -(rand.between(16, 256) as i64)),
        }))
    }
    fn post_exec(&mut self, _: &mut S, _: Option<CorpusId>) -> Result<(), Error> {
        Ok(())
    }
}

named!(
    /// Changes how long one `do_nmi` call works: busy +-1..4, or a fresh value in
    /// `0..=FUZZER_MAX_BUSY`. Adds an action when the schedule has none.
    ChangeBusy
);
impl<S: HasRand> Mutator<NmiInput, S> for ChangeBusy {
    fn mutate(&mut self, state: &mut S, input: &mut NmiInput) -> Result<MutationResult, Error> {
        let rand = state.rand_mut();
        let actions = &mut input.0.actions;
        if actions.is_empty() {
            actions.push(HandlerAction::default());
        }
        let k = rand.below_or_zero(actions.len());
        let busy = &mut actions[k].busy;
        let new = if rand.coinflip(0.7) {
            let delta = rand.between(1, 4) as i64;
            let delta = if rand.coinflip(0.5) { delta } else { -delta };
            (i64::from(*busy) + delta).clamp(0, i64::from(FUZZER_MAX_BUSY)) as u32
        } else {
            rand.between(0, FUZZER_MAX_BUSY as usize) as u32
        };
        if new == *busy {
            return Ok(MutationResult::Skipped);
        }
        *busy = new;
        Ok(MutationResult::Mutated)
    }
    fn post_exec(&mut self, _: &mut S, _: Option<CorpusId>) -> Result<(), Error> {
        Ok(())
    }
}

/// Adds, removes or replaces one fault of one action, drawing from the allowed faults
/// (by default [`Fault::ALL`]; `revoke-cs` only in user schedules). Adds an action when the
/// schedule has none.
pub struct ChangeFaults {
    faults: AllowedFaults,
}
named!(@impl ChangeFaults);
impl ChangeFaults {
    /// A mutator that adds only `faults` (an empty list: it only removes).
    pub fn new(faults: &[Fault]) -> Self {
        Self { faults: AllowedFaults::new(faults) }
    }
}
impl<S: HasRand> Mutator<NmiInput, S> for ChangeFaults {
    fn mutate(&mut self, state: &mut S, input: &mut NmiInput) -> Result<MutationResult, Error> {
        let rand = state.rand_mut();
        let allowed = self.faults.of(input.0.workload);
        let actions = &mut input.0.actions;
        if actions.is_empty() {
            if allowed.is_empty() {
                return Ok(MutationResult::Skipped);
            }
            actions.push(HandlerAction::default());
        }
        let k = rand.below_or_zero(actions.len());
        let faults = &mut actions[k].faults;
        let fresh = pick(rand, allowed.len()).map(|i| allowed[i]);
        match (rand.below_or_zero(3), fresh) {
            (0, Some(fault)) if faults.len() < FUZZER_MAX_FAULTS => {
                let at = rand.below_or_zero(faults.len() + 1);
                faults.insert(at, fault);
            }
            (1, Some(fault)) if !faults.is_empty() => {
                let at = rand.below_or_zero(faults.len());
                if faults[at] == fault {
                    return Ok(MutationResult::Skipped);
                }
                faults[at] = fault;
            }
            _ if !faults.is_empty() => {
                faults.remove(rand.below_or_zero(faults.len()));
            }
            _ => return Ok(MutationResult::Skipped),
        }
        Ok(MutationResult::Mutated)
    }
    fn post_exec(&mut self, _: &mut S, _: Option<CorpusId>) -> Result<(), Error> {
        Ok(())
    }
}

named!(
    /// Inserts a copy of one action or removes one: which `do_nmi` call does what shifts.
    InsertOrRemoveAction
);
impl<S: HasRand> Mutator<NmiInput, S> for InsertOrRemoveAction {
    fn mutate(&mut self, state: &mut S, input: &mut NmiInput) -> Result<MutationResult, Error> {
        let rand = state.rand_mut();
        let actions = &mut input.0.actions;
        if !actions.is_empty() && (actions.len() >= FUZZER_MAX_ACTIONS || rand.coinflip(0.5)) {
            actions.remove(rand.below_or_zero(actions.len()));
        } else if actions.len() < FUZZER_MAX_ACTIONS {
            let at = rand.below_or_zero(actions.len() + 1);
            let copy = pick(rand, actions.len()).map(|i| actions[i].clone()).unwrap_or_default();
            actions.insert(at, copy);
        } else {
            return Ok(MutationResult::Skipped);
        }
        Ok(MutationResult::Mutated)
    }
    fn post_exec(&mut self, _: &mut S, _: Option<CorpusId>) -> Result<(), Error> {
        Ok(())
    }
}

named!(
    /// Crossover: splices a run of 1 to 4 injections of another corpus entry in at a random
    /// place and, half the time, takes that entry's actions too.
    SpliceSchedules
);
impl<S: HasRand + HasCorpus<NmiInput>> Mutator<NmiInput, S> for SpliceSchedules {
    fn mutate(&mut self, state: &mut S, input: &mut NmiInput) -> Result<MutationResult, Error> {
        if state.corpus().count() < 2 {
            return Ok(MutationResult::Skipped);
        }
        let id = random_corpus_id!(state.corpus(), state.rand_mut());
        if *state.corpus().current() == Some(id) {
            return Ok(MutationResult::Skipped);
        }
        let other = state.corpus().cloned_input_for_id(id)?.0;
        let rand = state.rand_mut();
        let Some(from) = pick(rand, other.injections.len()) else {
            return Ok(MutationResult::Skipped);
        };
        let count = rand.between(1, (other.injections.len() - from).min(4));
        let mine = &mut input.0;
        let at = rand.below_or_zero(mine.injections.len() + 1);
        mine.injections.splice(at..at, other.injections[from..from + count].iter().cloned());
        mine.injections.truncate(FUZZER_MAX_INJECTIONS);
        if rand.coinflip(0.5) {
            mine.actions = other.actions;
            mine.actions.truncate(FUZZER_MAX_ACTIONS);
        }
        Ok(MutationResult::Mutated)
    }
    fn post_exec(&mut self, _: &mut S, _: Option<CorpusId>) -> Result<(), Error> {
        Ok(())
    }
}

/// Flips the workload gene (loop, user), when the guest has the user workload. The length
/// becomes the new workload's generated one, and a first NMI placed where the old workload
/// runs moves to where the new one does (it would never come otherwise).
pub struct ToggleWorkload {
    table: Table,
}
named!(@impl ToggleWorkload);
impl ToggleWorkload {
    /// A mutator drawing new first points from `table`.
    pub fn new(table: &Table) -> Self {
        Self { table: Arc::clone(table) }
    }
}
impl<S: HasRand> Mutator<NmiInput, S> for ToggleWorkload {
    fn mutate(&mut self, state: &mut S, input: &mut NmiInput) -> Result<MutationResult, Error> {
        if !self.table.has_user() {
            return Ok(MutationResult::Skipped);
        }
        let schedule = &mut input.0;
        let old = schedule.workload;
        let new = match old {
            Workload::Loop => Workload::User,
            Workload::User => Workload::Loop,
        };
        schedule.workload = new;
        schedule.workload_iterations = generated_iterations(new);
        if let Some(Injection::At(point)) = schedule.injections.first()
            && self.table.is_first(old, &point.symbol, point.offset)
        {
            schedule.injections[0] = random_point(state.rand_mut(), &self.table, new, true);
        }
        Ok(MutationResult::Mutated)
    }
    fn post_exec(&mut self, _: &mut S, _: Option<CorpusId>) -> Result<(), Error> {
        Ok(())
    }
}

/// Every mutator, for LibAFL's havoc scheduler.
#[macro_export]
macro_rules! nmi_mutations {
    ($faults:expr, $table:expr) => {
        libafl_bolts::tuples::tuple_list!(
            $crate::regenerate::Regenerate::new($faults, $table),
            $crate::input::InsertInjection::new($table),
            $crate::input::RemoveInjection,
            $crate::input::DuplicateInjection,
            $crate::input::ShiftDelaySmall,
            $crate::input::ShiftDelayLarge,
            $crate::input::ChangeBusy,
            $crate::input::ChangeFaults::new($faults),
            $crate::input::InsertOrRemoveAction,
            $crate::input::SpliceSchedules,
            $crate::points::StepPoint::new($table),
            $crate::points::JumpPoint::new($table),
            $crate::points::ShiftOccurrence::new($table),
            $crate::points::ToggleExtra::new($table),
            $crate::points::ToggleStress,
            $crate::input::ToggleWorkload::new($table),
            $crate::input::ChangeUserFlags,
        )
    };
}
