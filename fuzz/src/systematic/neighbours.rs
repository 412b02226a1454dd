//! What the systematic stage tries: fault, nest and third neighbours of a schedule, and the
//! order of the points later NMIs go to (see [`super`]).

use vmm::engine::schedule::{Fault, HandlerAction, Injection, Schedule, Workload};

use crate::input::AllowedFaults;
use crate::points::{Table, point_at};

/// The occurrence a second NMI is tried at after its first (inside the NMI just taken):
/// inside a nested or repeated one.
const LATER_OCCURRENCE: u32 = 2;
/// The rank (in the order of [`Neighbours::later_points`]) of a third NMI plus that of the
/// second it follows stays below this: the pairs nearest the IRETQs (a second NMI at the final
/// IRETQ makes the entry repeat, a third in the repeat finds what the repeat forgot), so that
/// an entry's third NMIs do not hold up its second ones for long.
const THIRD_HORIZON: usize = 16;

/// The occurrences a first NMI in a SYSCALL gap is tried at: the generator's, since the user
/// workload's system calls differ (one has RSP in the NMI stack) and each passes the gap.
const GAP_OCCURRENCES: u32 = 3;
/// How many ranks of nest neighbours each gap instruction's lone NMIs take: the gap's first
/// instructions (still on the user's RSP) come first, and the rest do not crowd out the
/// entries' second NMIs (measured on `early-clear`, median executions over 5 seeds: 104
/// without gap neighbours, 119 with a spread of 1 or 4, 110 with 16).
const GAP_SPREAD: usize = 16;

/// What a neighbour is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Fault,
    /// A lone first NMI in a SYSCALL gap.
    Gap,
    /// A second NMI at the point of this rank; kept as a corpus entry, it gets third NMIs.
    Nest {
        rank: usize,
    },
    Third,
}

/// A schedule to try, what it is and when: lower priorities first.
#[derive(Debug)]
pub(super) struct Neighbour {
    pub(super) schedule: Schedule,
    pub(super) kind: Kind,
    pub(super) priority: usize,
}

/// The neighbours of a schedule, for one variant's table.
pub struct Neighbours {
    table: Table,
    faults: AllowedFaults,
    /// Positions of the entry's instructions, nearest an IRETQ first.
    entry: Vec<usize>,
    /// Positions of the return to user, nearest an IRETQ first.
    return_to_user: Vec<usize>,
}

impl Neighbours {
    /// Neighbours over `table` for the entry named `entry_symbol`, whose actions use `faults`;
    /// `iretqs` are the addresses of the guest's IRETQs.
    pub fn new(table: &Table, entry_symbol: &str, faults: &[Fault], iretqs: &[u64]) -> Self {
        let order = |positions| nearest_iretq_first(table, positions, iretqs);
        Self {
            table: Table::clone(table),
            faults: AllowedFaults::new(faults),
            entry: order(table.in_symbol(entry_symbol)),
            return_to_user: order(table.return_to_user().to_vec()),
        }
    }

    /// Whether `injection` is at a ring-3 point.
    fn at_ring3_point(&self, injection: &Injection) -> bool {
        match injection {
            Injection::At(p) => self
                .table
                .position(&p.symbol, p.offset)
                .is_some_and(|at| self.table.user_points().contains(&at)),
            Injection::After(_) => false,
        }
    }

    /// Where later NMIs go, in the order they are tried, when the first strikes at `first`:
    /// the return to user after an NMI from a ring-3 point (its handling takes the entry's user
    /// path and leaves through the return to user), the entry otherwise.
    fn later_points(&self, first: &Injection) -> &[usize] {
        if self.at_ring3_point(first) { &self.return_to_user } else { &self.entry }
    }

    /// `base` with an NMI added at the `rank`-th later point, its `occurrence`-th time.
    fn add_nmi(&self, base: &Schedule, rank: usize, occurrence: u32) -> Option<Schedule> {
        let position = *self.later_points(base.injections.first()?).get(rank)?;
        let mut schedule = base.clone();
        schedule.injections.push(point_at(&self.table.insns()[position], occurrence, 0));
        Some(schedule)
    }

    /// The fault and nest neighbours of `base` (see the module documentation), those of a
    /// second occurrence apart; their priorities start at `start`.
    pub(super) fn of(&self, base: &Schedule, start: usize) -> (Vec<Neighbour>, Vec<Neighbour>) {
        let Some(first) = base.injections.first() else { return (Vec::new(), Vec::new()) };
        let alone = |first: &Injection, actions| Schedule {
            injections: vec![first.clone()],
            actions,
            ..base.clone()
        };
        let busy = base.actions.first().map_or(0, |a| a.busy);
        let mut firsts = vec![first.clone()];
        if base.workload == Workload::User {
            let insns = self.table.insns();
            firsts.extend(self.table.user_points().iter().map(|&p| point_at(&insns[p], 1, 0)));
        }
        let mut now: Vec<Neighbour> = firsts
            .iter()
            .flat_map(|first| {
                self.faults.of(base.workload).iter().map(move |&fault| Neighbour {
                    schedule: alone(first, vec![HandlerAction { busy, faults: vec![fault] }]),
                    kind: Kind::Fault,
                    priority: start,
                })
            })
            .collect();
        // `revoke-cs` makes only the IRET to user fault: nothing reopens NMIs for a first NMI
        // that interrupted ring 0.
        let from_user = self.at_ring3_point(first);
        let reopens = |f: &Fault| from_user || *f != Fault::RevokeCs;
        let opens = base.stress_unmask
            || base.actions.first().is_some_and(|a| a.faults.iter().any(reopens));
        if base.workload == Workload::User {
            now.extend(self.gap_firsts(base, start));
        }
        let mut later = Vec::new();
        if opens {
            let prefix = alone(first, base.actions.clone());
            for rank in 0..self.later_points(first).len() {
                let nest = |occurrence| self.add_nmi(&prefix, rank, occurrence);
                let kind = Kind::Nest { rank };
                let priority = start + rank;
                now.extend(nest(1).map(|schedule| Neighbour { schedule, kind, priority }));
                later.extend(nest(LATER_OCCURRENCE).map(|schedule| Neighbour {
                    schedule,
                    kind,
                    priority,
                }));
            }
        }
        (now, later)
    }

    /// A lone first NMI at each instruction of the SYSCALL gaps (kernel code on the user's
    /// RSP, where an entry that trusts RSP alone takes the NMI for a nested one), at each of
    /// [`GAP_OCCURRENCES`], spread over the ranks of nest neighbours ([`GAP_SPREAD`]). Without
    /// actions, user flags or stress, so that they are the same for every base of one workload
    /// length (the fuzzer gives every user schedule the same) and tried once.
    fn gap_firsts(&self, base: &Schedule, start: usize) -> Vec<Neighbour> {
        let insns = self.table.insns();
        let lone = |position: usize, occurrence| Schedule {
            description: String::new(),
            injections: vec![point_at(&insns[position], occurrence, 0)],
            actions: Vec::new(),
            user_flags: Vec::new(),
            stress_unmask: false,
            origin: None,
            ..base.clone()
        };
        let gaps = self.table.syscall_gaps().iter().enumerate();
        gaps.flat_map(|(rank, &position)| {
            (1..=GAP_OCCURRENCES).map(move |occurrence| Neighbour {
                schedule: lone(position, occurrence),
                kind: Kind::Gap,
                priority: start + GAP_SPREAD * rank,
            })
        })
        .collect()
    }

    /// The third neighbours of `kept`, a nest neighbour whose second NMI is at the `rank`-th
    /// later point: a third NMI at each later point, by the sum of the ranks.
    pub(super) fn thirds(&self, kept: &Neighbour, rank: usize) -> Vec<Neighbour> {
        (0..THIRD_HORIZON.saturating_sub(rank))
            .filter_map(|third| {
                let schedule = self.add_nmi(&kept.schedule, third, 1)?;
                let priority = kept.priority + 1 + third;
                Some(Neighbour { schedule, kind: Kind::Third, priority })
            })
            .collect()
    }
}

/// `positions` (in address order) by their distance in instructions to the nearest IRETQ
/// among them, later ones first among equals: an IRETQ is where NMIs open again, the exit path
/// runs up to one with "NMI executing" already clear, and the repeat window starts right after
/// the one that returns to `repeat_nmi`. Without an IRETQ, simply the last first.
fn nearest_iretq_first(table: &Table, positions: Vec<usize>, iretqs: &[u64]) -> Vec<usize> {
    let insns = table.insns();
    let at_iretq: Vec<usize> =
        (0..positions.len()).filter(|&k| iretqs.contains(&insns[positions[k]].address)).collect();
    let distance = |k: usize| at_iretq.iter().map(|&i| i.abs_diff(k)).min().unwrap_or(0);
    let mut ranked: Vec<usize> = (0..positions.len()).rev().collect();
    ranked.sort_by_key(|&k| distance(k));
    ranked.into_iter().map(|k| positions[k]).collect()
}
