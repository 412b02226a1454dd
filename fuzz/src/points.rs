//! Symbolic points for the fast mode: drawn from the guest's instruction table
//! (`vmm::engine::table`: the variant's entry, `do_nmi`, the exception paths and the workload
//! loop, decoded with iced-x86), and the mutators that move them: to the next or previous
//! instruction, to another place of the table, by one occurrence, with or without a few
//! `extra` stepped instructions. Plus the mutator of the schedule's stress option.

use std::borrow::Cow;
use std::sync::Arc;

use libafl::Error;
use libafl::corpus::CorpusId;
use libafl::mutators::{MutationResult, Mutator};
use libafl::state::HasRand;
use libafl_bolts::Named;
use libafl_bolts::rands::Rand;
use vmm::engine::schedule::{Injection, Point};
use vmm::engine::table::{InstructionTable, TableInsn};

use crate::input::NmiInput;

/// Largest `occurrence` the fuzzer sets.
pub const MAX_OCCURRENCE: u32 = 8;
/// Largest `extra` the fuzzer sets: extras are stepped, so they stay small.
pub const MAX_EXTRA: u64 = 8;
/// The symbol of the workload loop, where the first NMI of a generated schedule goes.
const WORKLOAD: &str = "workload_loop";

/// The instruction table the points come from, shared by the generator and the mutators.
pub type Table = Arc<InstructionTable>;

fn point_at(insn: &TableInsn, occurrence: u32, extra: u64) -> Injection {
    Injection::At(Point { symbol: insn.symbol.clone(), offset: insn.offset, occurrence, extra })
}

/// A random point: in the workload loop if `in_workload`, anywhere in the table otherwise;
/// occurrence 1 to 3, and a quarter of the time 1 to 2 extra instructions.
pub fn random_point<R: Rand>(
    rand: &mut R,
    table: &InstructionTable,
    in_workload: bool,
) -> Injection {
    let insns = table.insns();
    let workload: Vec<&TableInsn> = insns.iter().filter(|i| i.symbol == WORKLOAD).collect();
    let insn = if in_workload && !workload.is_empty() {
        workload[rand.below_or_zero(workload.len())]
    } else {
        &insns[rand.below_or_zero(insns.len())]
    };
    let occurrence = rand.between(1, 3) as u32;
    let extra = if rand.coinflip(0.25) { rand.between(1, 2) as u64 } else { 0 };
    point_at(insn, occurrence, extra)
}

/// A random symbolic injection of `input` and its position in the table, if it has one there.
fn pick_point<R: Rand>(
    rand: &mut R,
    input: &mut NmiInput,
    table: &InstructionTable,
) -> Option<(usize, usize)> {
    let points: Vec<usize> = input
        .0
        .injections
        .iter()
        .enumerate()
        .filter_map(|(k, injection)| match injection {
            Injection::At(p) => table.position(&p.symbol, p.offset).map(|_| k),
            Injection::After(_) => None,
        })
        .collect();
    let k = *points.get(rand.below_or_zero(points.len().max(1)))?;
    let Injection::At(p) = &input.0.injections[k] else { unreachable!("filtered above") };
    Some((k, table.position(&p.symbol, p.offset)?))
}

/// The point of injection `k` (which [`pick_point`] found symbolic).
fn point_mut(input: &mut NmiInput, k: usize) -> &mut Point {
    match &mut input.0.injections[k] {
        Injection::At(point) => point,
        Injection::After(_) => unreachable!("pick_point returns symbolic injections"),
    }
}

/// Defines a mutator over the table with its `Named` impl and constructor.
macro_rules! table_mutator {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        pub struct $name {
            table: Table,
        }
        impl $name {
            /// The mutator over `table`.
            pub fn new(table: &Table) -> Self {
                Self { table: Arc::clone(table) }
            }
        }
        impl Named for $name {
            fn name(&self) -> &Cow<'static, str> {
                static NAME: Cow<'static, str> = Cow::Borrowed(stringify!($name));
                &NAME
            }
        }
    };
}

table_mutator!(
    /// Moves one point 1 to 3 instructions forward or back in the table.
    StepPoint
);
impl<S: HasRand> Mutator<NmiInput, S> for StepPoint {
    fn mutate(&mut self, state: &mut S, input: &mut NmiInput) -> Result<MutationResult, Error> {
        let rand = state.rand_mut();
        let Some((k, at)) = pick_point(rand, input, &self.table) else {
            return Ok(MutationResult::Skipped);
        };
        let distance = rand.between(1, 3);
        let to = if rand.coinflip(0.5) { at.checked_sub(distance) } else { Some(at + distance) };
        let Some(insn) = to.and_then(|i| self.table.insns().get(i)) else {
            return Ok(MutationResult::Skipped);
        };
        let point = point_mut(input, k);
        (point.symbol, point.offset) = (insn.symbol.clone(), insn.offset);
        Ok(MutationResult::Mutated)
    }
    fn post_exec(&mut self, _: &mut S, _: Option<CorpusId>) -> Result<(), Error> {
        Ok(())
    }
}

table_mutator!(
    /// Moves one point to another instruction of the table, or inserts a new point.
    JumpPoint
);
impl<S: HasRand> Mutator<NmiInput, S> for JumpPoint {
    fn mutate(&mut self, state: &mut S, input: &mut NmiInput) -> Result<MutationResult, Error> {
        let rand = state.rand_mut();
        let fresh = random_point(rand, &self.table, input.0.injections.is_empty());
        match pick_point(rand, input, &self.table) {
            Some((k, _)) if input.0.injections[k] != fresh => input.0.injections[k] = fresh,
            Some(_) => return Ok(MutationResult::Skipped),
            None if input.0.injections.len() < crate::input::FUZZER_MAX_INJECTIONS => {
                input.0.injections.push(fresh);
            }
            None => return Ok(MutationResult::Skipped),
        }
        Ok(MutationResult::Mutated)
    }
    fn post_exec(&mut self, _: &mut S, _: Option<CorpusId>) -> Result<(), Error> {
        Ok(())
    }
}

table_mutator!(
    /// Changes one point's occurrence by one, within `1..=MAX_OCCURRENCE`.
    ShiftOccurrence
);
impl<S: HasRand> Mutator<NmiInput, S> for ShiftOccurrence {
    fn mutate(&mut self, state: &mut S, input: &mut NmiInput) -> Result<MutationResult, Error> {
        let rand = state.rand_mut();
        let Some((k, _)) = pick_point(rand, input, &self.table) else {
            return Ok(MutationResult::Skipped);
        };
        let up = rand.coinflip(0.5);
        let point = point_mut(input, k);
        let new = if up { point.occurrence + 1 } else { point.occurrence.saturating_sub(1) };
        if !(1..=MAX_OCCURRENCE).contains(&new) {
            return Ok(MutationResult::Skipped);
        }
        point.occurrence = new;
        Ok(MutationResult::Mutated)
    }
    fn post_exec(&mut self, _: &mut S, _: Option<CorpusId>) -> Result<(), Error> {
        Ok(())
    }
}

table_mutator!(
    /// Adds 1 to `MAX_EXTRA` extra instructions to a point that has none, or removes them.
    ToggleExtra
);
impl<S: HasRand> Mutator<NmiInput, S> for ToggleExtra {
    fn mutate(&mut self, state: &mut S, input: &mut NmiInput) -> Result<MutationResult, Error> {
        let rand = state.rand_mut();
        let Some((k, _)) = pick_point(rand, input, &self.table) else {
            return Ok(MutationResult::Skipped);
        };
        let extra = rand.between(1, MAX_EXTRA as usize) as u64;
        let point = point_mut(input, k);
        point.extra = if point.extra == 0 { extra } else { 0 };
        Ok(MutationResult::Mutated)
    }
    fn post_exec(&mut self, _: &mut S, _: Option<CorpusId>) -> Result<(), Error> {
        Ok(())
    }
}

/// Turns the schedule's stress option (`stress_unmask`) on or off.
pub struct ToggleStress;
impl Named for ToggleStress {
    fn name(&self) -> &Cow<'static, str> {
        static NAME: Cow<'static, str> = Cow::Borrowed("ToggleStress");
        &NAME
    }
}
impl<S> Mutator<NmiInput, S> for ToggleStress {
    fn mutate(&mut self, _: &mut S, input: &mut NmiInput) -> Result<MutationResult, Error> {
        input.0.stress_unmask = !input.0.stress_unmask;
        Ok(MutationResult::Mutated)
    }
    fn post_exec(&mut self, _: &mut S, _: Option<CorpusId>) -> Result<(), Error> {
        Ok(())
    }
}
