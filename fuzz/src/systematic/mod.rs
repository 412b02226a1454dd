//! The systematic stage: deterministic neighbours of corpus entries, tried before havoc.
//!
//! Why: an entry's bugs live in a few instructions of its assembly (the restore path between
//! clearing "NMI executing" and IRETQ, the repeat window, espfix64's copy on the return to
//! user), and are reached only when the *first* NMI's handling reopens NMIs (an exception's
//! IRETQ inside `do_nmi`, or the stress option) so that a second NMI nests there. Havoc and the
//! generator draw a later NMI uniformly over the whole table (`do_nmi`, the exception paths,
//! the workload: a few thousand instructions), so they rarely hit those few; the sweep walks
//! every boundary of the first NMI's handling in order, most of them in `do_nmi` where every
//! placement is the same one (the NMI latches until the next IRETQ).
//!
//! What: each corpus entry, in the order it was added, is expanded once into
//! 1. *fault neighbours*: its first NMI alone with the first `do_nmi` call raising each allowed
//!    fault in turn; for a user schedule also with the first NMI at each ring-3 point (where
//!    `revoke-cs` makes the IRET to user fault); and, for a user schedule, *gap neighbours*: a
//!    lone first NMI at each instruction of the SYSCALL gaps, occurrences 1 to 3 (kernel code
//!    on the user's RSP, where an entry that trusts RSP alone takes an NMI for a nested one:
//!    CVE-2015-3291), the same for every base of one workload length (the fuzzer gives every
//!    user schedule the same), so tried once;
//! 2. *nest neighbours*, when its first `do_nmi` call faults or it has the stress option (NMIs
//!    reopen inside the first NMI's handling): its first NMI and a second at every instruction
//!    of the variant's entry, nearest an IRETQ first (the exit path up to the final IRETQ, the
//!    repeat window right after the IRETQ that returns to `repeat_nmi`); after a first NMI at
//!    a ring-3 point, which leaves through the return to user instead, at every instruction of
//!    that (espfix64's copy, the IRETQ to user). Occurrence 1 (inside the first NMI's
//!    handling); occurrence 2 only once everything else is tried;
//! 3. *third neighbours*, as soon as a nest neighbour is kept as a corpus entry (it reached
//!    NMI states no execution reached before): it and a third NMI at the same points, the
//!    pairs of ranks nearest the IRETQs only ([`neighbours`]).
//!
//! Order: by priority. An entry's neighbours start [`STRIDE`] after the previous entry's, a
//! nest neighbour's priority adds the rank of its point, a third's that of the second plus
//! one plus its own: entries take turns by rank (a diagonal over entries and points), so an
//! entry whose first NMI cannot reach a bug holds the next ones up for a few points only.
//! A neighbour identical to one already tried (busy work aside) is skipped.
//!
//! Budget: each round (one per `fuzz_one`, before the mutational stage and its 1 to 128
//! mutants) runs at most [`BUDGET`] neighbours, through `evaluate_input`, so that they reach
//! the feedback and the objective exactly as mutated inputs do.
//!
//! What it misses: SYSCALL-gap placements of second and third NMIs, fourth NMIs, and an entry
//! another client sent (expanded again by every client); the stage keeps its progress in
//! memory only, so a respawned client starts over.
//!
//! Layout: this file, the stage and the order neighbours are tried in; [`neighbours`], what
//! they are; `tests`.

mod neighbours;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};

use libafl::Error;
use libafl::corpus::{Corpus, CorpusId};
use libafl::fuzzer::Evaluator;
use libafl::stages::{Restartable, Stage};
use libafl::state::{HasCorpus, Stoppable};
use vmm::engine::schedule::Schedule;

pub use self::neighbours::Neighbours;
use self::neighbours::{Kind, Neighbour};
use crate::input::NmiInput;

/// Neighbours a round runs at most: twice the mean of the mutational stage's 1 to 128
/// mutants, so that havoc keeps a third of the executions while neighbours are left.
pub const BUDGET: usize = 128;
/// How much later each corpus entry's neighbours start than those of the entry before it:
/// entries take turns by the rank of their points (a diagonal over entries and ranks), so that
/// an entry whose first NMI cannot reach a bug holds up the next ones only for a few points.
const STRIDE: usize = 8;

/// Neighbours in the order they are tried: by priority, then as they came.
#[derive(Default)]
struct Queue {
    neighbours: BTreeMap<(usize, u64), Neighbour>,
    arrivals: u64,
}

impl Queue {
    fn extend(&mut self, neighbours: impl IntoIterator<Item = Neighbour>) {
        for neighbour in neighbours {
            self.arrivals += 1;
            self.neighbours.insert((neighbour.priority, self.arrivals), neighbour);
        }
    }

    /// The lowest priority queued.
    fn first_priority(&self) -> Option<usize> {
        self.neighbours.first_key_value().map(|((priority, _), _)| *priority)
    }

    fn pop(&mut self) -> Option<Neighbour> {
        self.neighbours.pop_first().map(|(_, neighbour)| neighbour)
    }
}

/// What is left to try: the corpus entries not expanded yet and the neighbours not run yet.
#[derive(Default)]
struct Expansion {
    /// Corpus entries walked so far, in corpus order.
    walked: usize,
    /// Where the priorities of the next entry's neighbours start.
    start: usize,
    /// Entries kept from nest neighbours: their third neighbours are queued already.
    nested: HashSet<CorpusId>,
    /// Neighbours to try before the next entry is expanded.
    pending: Queue,
    /// Second NMIs at a second occurrence: tried once every entry is expanded, since the first
    /// occurrence inside the first NMI's handling is where most bugs are.
    deferred: Queue,
    /// Neighbours already tried, by [`key`].
    tried: HashSet<u64>,
}

impl Expansion {
    /// Notes that `neighbour` was kept as corpus entry `id`: a nest neighbour gets its third
    /// neighbours, among those of the entry it came from.
    fn kept(&mut self, neighbours: &Neighbours, neighbour: &Neighbour, id: CorpusId) {
        if let Kind::Nest { rank } = neighbour.kind {
            self.nested.insert(id);
            self.pending.extend(neighbours.thirds(neighbour, rank));
        }
    }

    /// The next neighbour not tried yet, expanding the next corpus entry when its turn comes
    /// (its neighbours' priorities start [`STRIDE`] after the previous entry's) or when none is
    /// left; `None` when every entry of `corpus` is expanded and every neighbour tried.
    fn next<C: Corpus<NmiInput>>(
        &mut self,
        neighbours: &Neighbours,
        corpus: &C,
    ) -> Result<Option<Neighbour>, Error> {
        loop {
            let turn = self.pending.first_priority().is_none_or(|p| p >= self.start);
            if turn && self.walked < corpus.count() {
                let id = corpus.nth(self.walked);
                self.walked += 1;
                if !self.nested.contains(&id) {
                    let base = corpus.cloned_input_for_id(id)?;
                    let (now, later) = neighbours.of(&base.0, self.start);
                    self.pending.extend(now);
                    self.deferred.extend(later);
                    self.start += STRIDE;
                }
                continue;
            }
            if let Some(neighbour) = self.pending.pop() {
                if self.tried.insert(key(&neighbour.schedule)) {
                    return Ok(Some(neighbour));
                }
                continue;
            }
            match self.deferred.pop() {
                Some(neighbour) => self.pending.extend([neighbour]),
                None => return Ok(None),
            }
        }
    }
}

/// What makes two neighbours the same: the schedule without its busy work, which moves
/// instructions inside `do_nmi` but not where NMIs strike.
fn key(schedule: &Schedule) -> u64 {
    let mut schedule = schedule.clone();
    schedule.actions.iter_mut().for_each(|a| a.busy = 0);
    let mut hasher = DefaultHasher::new();
    schedule.hash(&mut hasher);
    hasher.finish()
}

/// The stage (see the module documentation).
pub struct SystematicStage {
    neighbours: Neighbours,
    expansion: Expansion,
}

impl SystematicStage {
    /// The stage over `neighbours`.
    pub fn new(neighbours: Neighbours) -> Self {
        Self { neighbours, expansion: Expansion::default() }
    }
}

impl<E, EM, S, Z> Stage<E, EM, S, Z> for SystematicStage
where
    S: HasCorpus<NmiInput> + Stoppable,
    Z: Evaluator<E, EM, NmiInput, S>,
{
    fn perform(
        &mut self,
        fuzzer: &mut Z,
        executor: &mut E,
        state: &mut S,
        manager: &mut EM,
    ) -> Result<(), Error> {
        for _ in 0..BUDGET {
            if state.stop_requested() {
                break;
            }
            let Some(neighbour) = self.expansion.next(&self.neighbours, state.corpus())? else {
                break;
            };
            let input = NmiInput(neighbour.schedule.clone());
            if let (_, Some(id)) = fuzzer.evaluate_input(state, executor, manager, &input)? {
                self.expansion.kept(&self.neighbours, &neighbour, id);
            }
        }
        Ok(())
    }
}

/// Progress lives in the stage, not in the state: a round interrupted by a crash of the target
/// simply goes on with the next neighbour.
impl<S> Restartable<S> for SystematicStage {
    fn should_restart(&mut self, _: &mut S) -> Result<bool, Error> {
        Ok(true)
    }

    fn clear_progress(&mut self, _: &mut S) -> Result<(), Error> {
        Ok(())
    }
}
