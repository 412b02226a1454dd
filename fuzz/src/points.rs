//! Symbolic points for the fast mode: drawn from the guest's instruction table
//! (`vmm::engine::table`: the variant's entry, `do_nmi`, the exception paths and the workload
//! loop, decoded with iced-x86) and the places around ring 3 ([`crate::ring3`]: the ring-3
//! points, the SYSCALL gaps, the entry's user path, the return to user), and the mutators that
//! move them: to the next or previous instruction, to another place of the table, by one
//! occurrence, with or without a few `extra` stepped instructions. Plus the mutator of the
//! schedule's stress option.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::ops::Deref;
use std::sync::Arc;

use libafl::Error;
use libafl::corpus::CorpusId;
use libafl::mutators::{MutationResult, Mutator};
use libafl::state::HasRand;
use libafl_bolts::Named;
use libafl_bolts::rands::Rand;
use vmm::engine::schedule::{Injection, Point, Workload};
use vmm::engine::table::{InstructionTable, TableInsn};

use crate::input::NmiInput;
use crate::ring3::Region;

/// Largest `occurrence` the fuzzer sets.
pub const MAX_OCCURRENCE: u32 = 8;
/// Largest `extra` the fuzzer sets: extras are stepped, so they stay small.
pub const MAX_EXTRA: u64 = 8;
/// The symbol of the workload loop, where the first NMI of a generated loop schedule goes.
const WORKLOAD: &str = "workload_loop";

/// The points shared by the generator and the mutators.
pub type Table = Arc<Points>;

/// The instruction table with the places around ring 3 added (those it does not have
/// already), and where the first NMI of each workload goes. Derefs to the table.
#[derive(Clone, Debug, Default)]
pub struct Points {
    table: InstructionTable,
    /// Positions of the workload loop's instructions.
    loop_first: Vec<usize>,
    /// Positions of the ring-3 points.
    user_points: Vec<usize>,
    /// Positions of the ring-0 places around ring 3 that run without an NMI: the SYSCALL gaps
    /// and the return to user.
    around_ring3: Vec<usize>,
    /// Positions of the return to user alone: where a user NMI's handling ends (espfix64's
    /// copy, the final IRETQ), the systematic stage's second target after the entry.
    return_to_user: Vec<usize>,
    /// Positions of the SYSCALL entry and exit gaps alone: ring-0 code on the user's RSP, where
    /// the systematic stage puts first NMIs.
    syscall_gaps: Vec<usize>,
}

impl Points {
    /// `table` and the instructions `around_ring3` (with the region of each) merged, in
    /// address order.
    pub fn new(table: InstructionTable, around_ring3: Vec<(TableInsn, Region)>) -> Self {
        let regions: HashMap<u64, Region> =
            around_ring3.iter().map(|(insn, region)| (insn.address, *region)).collect();
        let mut insns = table.insns().to_vec();
        let known: HashSet<u64> = insns.iter().map(|i| i.address).collect();
        insns.extend(
            around_ring3.into_iter().filter(|(i, _)| !known.contains(&i.address)).map(|(i, _)| i),
        );
        let mut points = Self { table: InstructionTable::from_insns(insns), ..Self::default() };
        for (position, insn) in points.table.insns().iter().enumerate() {
            match regions.get(&insn.address) {
                Some(Region::UserPoint) => points.user_points.push(position),
                // Only an NMI from user runs it: no first NMI can strike there.
                Some(Region::NmiUserPath) => {}
                Some(region) => {
                    points.around_ring3.push(position);
                    match region {
                        Region::ReturnToUser => points.return_to_user.push(position),
                        Region::SyscallGap | Region::SysretGap => {
                            points.syscall_gaps.push(position)
                        }
                        _ => {}
                    }
                }
                None if insn.symbol == WORKLOAD => points.loop_first.push(position),
                None => {}
            }
        }
        points
    }

    /// Whether the guest has the user workload (its ring-3 points).
    pub fn has_user(&self) -> bool {
        !self.user_points.is_empty()
    }

    /// Where an NMI of a `workload` schedule may go (empty: anywhere in the table). The
    /// `first` NMI goes to the workload loop; for the user workload half the time to a ring-3
    /// point, half the time to a ring-0 place around ring 3. A later NMI of a user schedule
    /// goes around ring 3 half the time, where a user NMI's handling and its return to user
    /// run (espfix64's copy, the final IRETQ), and anywhere otherwise.
    fn places<R: Rand>(&self, rand: &mut R, workload: Workload, first: bool) -> &[usize] {
        match (workload, first) {
            (Workload::Loop, true) => &self.loop_first,
            (Workload::Loop, false) => &[],
            (Workload::User, true) if self.around_ring3.is_empty() || rand.coinflip(0.5) => {
                &self.user_points
            }
            (Workload::User, true) => &self.around_ring3,
            (Workload::User, false) if rand.coinflip(0.5) => &self.around_ring3,
            (Workload::User, false) => &[],
        }
    }

    /// Positions of the ring-3 points, where the first NMI of a user schedule goes.
    pub fn user_points(&self) -> &[usize] {
        &self.user_points
    }

    /// Positions of the return to user ([`Region::ReturnToUser`]).
    pub fn return_to_user(&self) -> &[usize] {
        &self.return_to_user
    }

    /// Positions of the SYSCALL gaps ([`Region::SyscallGap`], [`Region::SysretGap`]), in
    /// address order.
    pub fn syscall_gaps(&self) -> &[usize] {
        &self.syscall_gaps
    }

    /// Positions of the instructions of `symbol` (a sized symbol of the table, such as the
    /// variant's entry), in address order.
    pub fn in_symbol(&self, symbol: &str) -> Vec<usize> {
        let insns = self.table.insns().iter().enumerate();
        insns.filter(|(_, insn)| insn.symbol == symbol).map(|(position, _)| position).collect()
    }

    /// Whether the point `symbol+offset` is one the first NMI of `workload` may go to.
    pub fn is_first(&self, workload: Workload, symbol: &str, offset: u64) -> bool {
        let Some(position) = self.table.position(symbol, offset) else { return false };
        match workload {
            Workload::Loop => self.loop_first.contains(&position),
            Workload::User => {
                self.user_points.contains(&position) || self.around_ring3.contains(&position)
            }
        }
    }
}

impl Deref for Points {
    type Target = InstructionTable;

    fn deref(&self) -> &InstructionTable {
        &self.table
    }
}

/// The injection at `insn`, its `occurrence`-th time, `extra` instructions later.
pub fn point_at(insn: &TableInsn, occurrence: u32, extra: u64) -> Injection {
    Injection::At(Point { symbol: insn.symbol.clone(), offset: insn.offset, occurrence, extra })
}

/// A random point for an NMI of a `workload` schedule, the `first` or a later one
/// ([`Points::places`]; anywhere in the table when the guest has no such place); occurrence 1
/// to 3, and a quarter of the time 1 to 2 extra instructions.
pub fn random_point<R: Rand>(
    rand: &mut R,
    points: &Points,
    workload: Workload,
    first: bool,
) -> Injection {
    let insns = points.insns();
    let places = points.places(rand, workload, first);
    let insn = if places.is_empty() {
        &insns[rand.below_or_zero(insns.len())]
    } else {
        &insns[places[rand.below_or_zero(places.len())]]
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
        let picked = pick_point(rand, input, &self.table);
        let first = picked.map_or(input.0.injections.is_empty(), |(k, _)| k == 0);
        let fresh = random_point(rand, &self.table, input.0.workload, first);
        match picked {
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
