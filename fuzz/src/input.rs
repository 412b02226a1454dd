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
//! - the campaign's variant.
//!
//! The variant is fixed per campaign: no mutator reads or writes it. [`ToggleWorkload`] flips
//! the workload gene.

use std::borrow::Cow;
use std::hash::Hash;
use std::path::Path;
use std::sync::Arc;

use libafl::corpus::{Corpus, CorpusId};
use libafl::generators::Generator;
use libafl::inputs::Input;
use libafl::mutators::{MutationResult, Mutator};
use libafl::state::{HasCorpus, HasRand};
use libafl::{Error, random_corpus_id};
use libafl_bolts::rands::Rand;
use libafl_bolts::{HasLen, Named};
use serde::{Deserialize, Serialize};
use vmm::engine::schedule::{Fault, HandlerAction, Injection, SCHEDULE_FORMAT, Schedule, Workload};

use crate::points::{MAX_EXTRA, Table, random_point};
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
struct AllowedFaults {
    all: Vec<Fault>,
    ring0: Vec<Fault>,
}

impl AllowedFaults {
    fn new(faults: &[Fault]) -> Self {
        let ring0 = faults.iter().copied().filter(|f| *f != Fault::RevokeCs).collect();
        Self { all: faults.to_vec(), ring0 }
    }

    fn of(&self, workload: Workload) -> &[Fault] {
        match workload {
            Workload::Loop => &self.ring0,
            Workload::User => &self.all,
        }
    }
}

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
        Schedule {
            format: SCHEDULE_FORMAT,
            description: String::new(),
            variant: self.variant.clone(),
            workload,
            workload_iterations: generated_iterations(workload),
            stress_unmask: rand.coinflip(0.5),
            actions,
            injections,
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
        )
    };
}

#[cfg(test)]
mod tests {
    use libafl::corpus::{InMemoryCorpus, Testcase};
    use libafl::mutators::{HavocScheduledMutator, MutationResult, Mutator};
    use libafl::state::StdState;
    use libafl_bolts::rands::StdRand;

    use vmm::engine::table::{InstructionTable, TableInsn};

    use super::*;
    use crate::points::{JumpPoint, Points, ShiftOccurrence, StepPoint, ToggleExtra, ToggleStress};
    use crate::ring3::Region;

    type TestState =
        StdState<InMemoryCorpus<NmiInput>, NmiInput, StdRand, InMemoryCorpus<NmiInput>>;

    fn insn(symbol: &str, base: u64, offset: u64) -> TableInsn {
        TableInsn { symbol: symbol.into(), offset, address: base + offset }
    }

    /// A small table without the user workload: a workload loop of 6 instructions and a
    /// handler of 4.
    fn loop_table() -> Table {
        let mut insns: Vec<TableInsn> =
            (0..6).map(|i| insn("workload_loop", 0x1000, 2 * i)).collect();
        insns.extend((0..4).map(|i| insn("do_nmi", 0x2000, 3 * i)));
        Arc::new(Points::new(InstructionTable::from_insns(insns), Vec::new()))
    }

    /// The same with the user workload: 3 ring-3 points, a SYSCALL gap of 3 instructions and
    /// an entry's user path of 2 (where no first NMI can go).
    fn table() -> Table {
        let base = loop_table();
        let mut ring3: Vec<(TableInsn, Region)> = (0..3)
            .map(|i| (insn(&format!("user_point_{i}"), 0x400_000 + 16 * i, 2), Region::UserPoint))
            .collect();
        ring3.extend((0..3).map(|i| (insn("entry_SYSCALL_64", 0x3000, 3 * i), Region::SyscallGap)));
        ring3.extend((0..2).map(|i| (insn("nmi_naive_from_user", 0x5000, i), Region::NmiUserPath)));
        Arc::new(Points::new(InstructionTable::from_insns(base.insns().to_vec()), ring3))
    }

    fn generator(faults: &[Fault]) -> ScheduleGenerator {
        ScheduleGenerator::new("naive", faults, &table())
    }

    fn state(seed: u64) -> TestState {
        StdState::new(
            StdRand::with_seed(seed),
            InMemoryCorpus::new(),
            InMemoryCorpus::new(),
            &mut (),
            &mut (),
        )
        .unwrap()
    }

    /// The fuzzer's own limits, on top of the schedule format's.
    fn assert_within_limits(schedule: &Schedule) {
        schedule.validate().unwrap_or_else(|p| panic!("{p}: {schedule:?}"));
        assert_eq!(schedule.variant, "naive", "the variant changed");
        assert!(schedule.injections.len() <= FUZZER_MAX_INJECTIONS);
        assert!(schedule.actions.len() <= FUZZER_MAX_ACTIONS);
        for injection in &schedule.injections {
            match injection {
                Injection::After(n) => assert!(*n <= FUZZER_MAX_DELAY),
                Injection::At(p) => {
                    assert!(p.extra <= MAX_EXTRA, "{p:?}");
                    assert!((1..=crate::points::MAX_OCCURRENCE).contains(&p.occurrence));
                    assert!(table().position(&p.symbol, p.offset).is_some(), "{p:?}");
                }
            }
        }
        for action in &schedule.actions {
            assert!(action.busy <= FUZZER_MAX_BUSY && action.faults.len() <= FUZZER_MAX_FAULTS);
        }
        assert_eq!(schedule.workload_iterations, generated_iterations(schedule.workload));
    }

    #[test]
    fn generated_schedules_follow_the_documented_ranges() {
        let generator = generator(Fault::ALL);
        let mut rand = StdRand::with_seed(7);
        let (mut saw_faults, mut saw_stress, mut saw_extra, mut saw_handler) =
            (false, false, false, false);
        let (mut users, mut first_at_user_points, mut revoked) = (0, 0, false);
        for _ in 0..2_000 {
            let s = generator.schedule(&mut rand);
            assert_within_limits(&s);
            assert!((1..=4).contains(&s.injections.len()));
            assert_eq!(s.actions.len(), s.injections.len());
            saw_stress |= s.stress_unmask;
            users += usize::from(s.workload == Workload::User);
            for (k, injection) in s.injections.iter().enumerate() {
                let Injection::At(p) = injection else { panic!("not a point: {injection:?}") };
                assert!((1..=3).contains(&p.occurrence) && p.extra <= 2, "{p:?}");
                if k == 0 {
                    // The first NMI strikes where the workload runs.
                    match s.workload {
                        Workload::Loop => assert_eq!(p.symbol, "workload_loop"),
                        Workload::User => {
                            assert!(
                                p.symbol.starts_with("user_point_")
                                    || p.symbol == "entry_SYSCALL_64",
                                "{p:?}"
                            );
                            first_at_user_points += usize::from(p.symbol.starts_with("user_"));
                        }
                    }
                }
                saw_extra |= p.extra > 0;
                saw_handler |= p.symbol == "do_nmi";
            }
            for action in &s.actions {
                assert!(action.busy <= GENERATED_BUSY && action.faults.len() <= 2);
                saw_faults |= !action.faults.is_empty();
                let revokes = action.faults.contains(&Fault::RevokeCs);
                assert!(!revokes || s.workload == Workload::User, "revoke-cs at ring 0: {s:?}");
                revoked |= revokes;
            }
        }
        assert!(saw_faults && saw_stress && saw_extra && saw_handler && revoked);
        assert!((900..1100).contains(&users), "{users} of 2000 user schedules");
        assert!(
            (users * 2 / 5..users * 3 / 5).contains(&first_at_user_points),
            "{first_at_user_points} of {users} user schedules begin at a ring-3 point"
        );
    }

    #[test]
    fn without_the_user_workload_the_generator_draws_what_it_drew_before() {
        let (with, without) =
            (generator(Fault::ALL), ScheduleGenerator::new("naive", Fault::ALL, &loop_table()));
        let (mut a, mut b) = (StdRand::with_seed(9), StdRand::with_seed(9));
        for _ in 0..200 {
            let s = without.schedule(&mut a);
            assert_eq!((s.workload, s.workload_iterations), (Workload::Loop, 0));
            let Injection::At(first) = &s.injections[0] else { panic!("{s:?}") };
            assert_eq!(first.symbol, "workload_loop");
        }
        // With the user workload, the loop schedules are drawn as often as the user ones.
        let loops = (0..200).filter(|_| with.schedule(&mut b).workload == Workload::Loop).count();
        assert!((70..130).contains(&loops), "{loops}");
    }

    #[test]
    fn toggling_the_workload_moves_the_first_nmi_where_the_new_workload_runs() {
        let mut state = state(13);
        let mut toggle = ToggleWorkload::new(&table());
        let generator = generator(Fault::ALL);
        for _ in 0..200 {
            let mut input = NmiInput(generator.schedule(state.rand_mut()));
            let before = input.0.workload;
            assert_eq!(toggle.mutate(&mut state, &mut input).unwrap(), MutationResult::Mutated);
            assert_ne!(input.0.workload, before);
            assert_within_limits(&input.0);
            let Injection::At(first) = &input.0.injections[0] else { panic!("{input:?}") };
            assert!(table().is_first(input.0.workload, &first.symbol, first.offset), "{first:?}");
        }
        let mut input = NmiInput(generator.schedule(state.rand_mut()));
        let mut without = ToggleWorkload::new(&loop_table());
        assert_eq!(without.mutate(&mut state, &mut input).unwrap(), MutationResult::Skipped);
    }

    #[test]
    fn mutators_keep_the_variant_and_the_limits() {
        let mut state = state(3);
        let generator = generator(Fault::ALL);
        for _ in 0..4 {
            let seed = NmiInput(generator.schedule(state.rand_mut()));
            state.corpus_mut().add(Testcase::new(seed)).unwrap();
        }
        let mut havoc =
            HavocScheduledMutator::with_max_stack_pow(nmi_mutations!(Fault::ALL, &table()), 4);
        let mut input = NmiInput(generator.schedule(state.rand_mut()));
        let mut mutated = 0;
        for round in 0..5_000 {
            if round % 100 == 0 {
                input = NmiInput(generator.schedule(state.rand_mut()));
            }
            if havoc.mutate(&mut state, &mut input).unwrap() == MutationResult::Mutated {
                mutated += 1;
            }
            assert_within_limits(&input.0);
        }
        assert!(mutated > 4_000, "only {mutated} mutations took effect");
    }

    #[test]
    fn each_mutator_changes_something_and_stays_valid() {
        let mut state = state(11);
        let generator = generator(Fault::ALL);
        for _ in 0..3 {
            let seed = NmiInput(generator.schedule(state.rand_mut()));
            state.corpus_mut().add(Testcase::new(seed)).unwrap();
        }
        fn check<M: Mutator<NmiInput, TestState>>(
            m: &mut M,
            state: &mut TestState,
            g: &ScheduleGenerator,
        ) {
            let mut changed = 0;
            for _ in 0..500 {
                let before = NmiInput(g.schedule(state.rand_mut()));
                let mut after = before.clone();
                if m.mutate(state, &mut after).unwrap() == MutationResult::Mutated {
                    assert_ne!(before, after, "{} claimed a mutation", m.name());
                    changed += 1;
                } else {
                    assert_eq!(before, after, "{} changed a skipped input", m.name());
                }
                assert_within_limits(&after.0);
            }
            assert!(changed > 100, "{} mutated only {changed} of 500", m.name());
        }
        check(&mut InsertInjection::new(&table()), &mut state, &generator);
        check(&mut RemoveInjection, &mut state, &generator);
        check(&mut DuplicateInjection, &mut state, &generator);
        check(&mut ShiftDelaySmall, &mut state, &generator);
        check(&mut ShiftDelayLarge, &mut state, &generator);
        check(&mut ChangeBusy, &mut state, &generator);
        check(&mut ChangeFaults::new(Fault::ALL), &mut state, &generator);
        check(&mut InsertOrRemoveAction, &mut state, &generator);
        check(&mut SpliceSchedules, &mut state, &generator);
        check(&mut StepPoint::new(&table()), &mut state, &generator);
        check(&mut JumpPoint::new(&table()), &mut state, &generator);
        check(&mut ShiftOccurrence::new(&table()), &mut state, &generator);
        check(&mut ToggleExtra::new(&table()), &mut state, &generator);
        check(&mut ToggleStress, &mut state, &generator);
        check(&mut ToggleWorkload::new(&table()), &mut state, &generator);
    }

    #[test]
    fn without_allowed_faults_no_fault_is_ever_added() {
        let mut state = state(5);
        let generator = generator(&[]);
        let mut havoc = HavocScheduledMutator::with_max_stack_pow(nmi_mutations!(&[], &table()), 4);
        let mut input = NmiInput(generator.schedule(state.rand_mut()));
        for _ in 0..2_000 {
            let _ = havoc.mutate(&mut state, &mut input).unwrap();
            assert!(input.0.actions.iter().all(|a| a.faults.is_empty()), "{input:?}");
        }
    }

    #[test]
    fn input_round_trips_through_postcard_and_json() {
        let mut schedule = generator(Fault::ALL).schedule(&mut StdRand::with_seed(1));
        schedule.origin = Some(vmm::engine::schedule::Origin {
            guest_hash: "00".into(),
            host_profile: "p".into(),
        });
        for workload in Workload::ALL {
            let input = NmiInput(Schedule { workload: *workload, ..schedule.clone() });
            let bytes = postcard::to_allocvec(&input).unwrap();
            assert_eq!(postcard::from_bytes::<NmiInput>(&bytes).unwrap(), input);
            let json = serde_json::to_string(&input).unwrap();
            assert_eq!(Schedule::from_json(json.as_bytes(), Path::new("x")).unwrap(), input.0);
        }
    }

    #[test]
    fn inputs_saved_before_the_workload_gene_load_as_loop_schedules() {
        // The seeds of ./corpus, written before the gene, and their corpus names.
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../corpus");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if std::fs::read_to_string(&path).unwrap().contains("\"workload\"") {
                continue; // written with the gene (the ring-3 reproducers)
            }
            let input = NmiInput::from_file(&path).unwrap();
            assert_eq!(input.0.workload, Workload::Loop);
            assert!(!serde_json::to_string(&input).unwrap().contains("workload\""));
            seen += 1;
        }
        assert!(seen >= 7);
    }
}
