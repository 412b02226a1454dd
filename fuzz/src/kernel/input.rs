//! The input of a real-kernel campaign: a [`KernelSchedule`], its generator and its mutator.
//! Both draw NMI points from the kernel's own entry code ([`Points`]) and watchpoints from the
//! places the NMI path touches.

use std::borrow::Cow;
use std::path::Path;

use libafl::Error;
use libafl::corpus::CorpusId;
use libafl::generators::Generator;
use libafl::inputs::Input;
use libafl::mutators::{MutationResult, Mutator};
use libafl::state::HasRand;
use libafl_bolts::Named;
use libafl_bolts::rands::Rand;
use serde::{Deserialize, Serialize};
use vmm::hash::fnv1a;
use vmm::kernel::schedule::{
    FORMAT, KernelId, KernelSchedule, MAX_NMIS, NmiPoint, Operation, Place, START,
};

use crate::store;

/// The input: a kernel schedule, JSON on disk.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KernelInput(pub KernelSchedule);

impl KernelInput {
    /// The schedule as the JSON of a reproducer.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(&self.0).unwrap_or_default() + "\n"
    }

    /// `<content hash>.json`, the corpus file name.
    pub fn corpus_name(&self) -> String {
        format!("{:016x}.json", fnv1a(self.to_json().as_bytes()))
    }
}

impl Input for KernelInput {
    fn to_file<P: AsRef<Path>>(&self, path: P) -> Result<(), Error> {
        store::write_atomic(path.as_ref(), self.to_json().as_bytes()).map_err(Error::from)
    }

    fn from_file<P: AsRef<Path>>(path: P) -> Result<Self, Error> {
        KernelSchedule::load(path.as_ref()).map(Self).map_err(Error::serialize)
    }

    fn generate_name(&self, _id: Option<CorpusId>) -> String {
        self.corpus_name()
    }
}

/// Where NMIs may arrive: every instruction of the kernel's entry code the campaign fuzzes,
/// as `symbol+0xoffset`, by region.
#[derive(Clone, Debug, Default)]
pub struct Points {
    /// `asm_exc_nmi` and its labels.
    pub nmi: Vec<String>,
    /// The SYSCALL entry, from its first instruction to SYSRET.
    pub syscall: Vec<String>,
    /// Exception entries and the return to user (`native_irq_return_iret`, espfix).
    pub other: Vec<String>,
}

impl Points {
    fn pick(&self, rand: &mut impl Rand) -> String {
        let region = match rand.below_or_zero(10) {
            0..=4 if !self.syscall.is_empty() => &self.syscall,
            5..=7 if !self.nmi.is_empty() => &self.nmi,
            _ if !self.other.is_empty() => &self.other,
            _ => return START.to_owned(),
        };
        region[rand.below_or_zero(region.len())].clone()
    }

    /// The point `distance` instructions from `point` in its region, if it is in one.
    fn neighbour(&self, point: &str, distance: isize) -> Option<String> {
        [&self.nmi, &self.syscall, &self.other].into_iter().find_map(|region| {
            let at = region.iter().position(|p| p == point)?;
            let to = at.checked_add_signed(distance)?.min(region.len() - 1);
            Some(region[to].clone())
        })
    }
}

/// Addresses worth a hardware watchpoint: the per-CPU data the NMI path reads before
/// `exc_nmi` clears DR7 (`nmi_state`, `nmi_cr2`), where a real CPU raises #DB inside NMI
/// handling. Linux refuses breakpoints on its entry stacks and the TSS (`within_cpu_entry`,
/// since 2020: for exactly this reason), so the NMI stack is not among them. Data touched
/// everywhere (the online-CPU mask, `irq_stat`) is left out too: the VMM sees every access to
/// the watched address, wherever the kernel's own DR7 has it on or not.
fn watch_place(rand: &mut impl Rand) -> Place {
    let name = if rand.coinflip(0.6) { "nmi_state" } else { "nmi_cr2" };
    Place::PerCpu(name.into())
}

fn small(rand: &mut impl Rand) -> u32 {
    1 + rand.below_or_zero(3) as u32
}

fn operation(rand: &mut impl Rand) -> Operation {
    match rand.below_or_zero(10) {
        0 | 1 => Operation::Syscall(small(rand)),
        2 | 3 => Operation::SyscallWithRsp {
            count: small(rand),
            rsp: Place::NmiStack(8 * rand.below_or_zero(8) as u64),
        },
        4 => Operation::PageFault(small(rand)),
        5 => Operation::Espfix(1),
        6 => Operation::BadSigreturn(1),
        7 | 8 => Operation::Watch(watch_place(rand)),
        _ => Operation::Spin(small(rand)),
    }
}

/// Drops every watchpoint after the first: the VMM mirrors one (`vmm::kernel`'s `exec`), and
/// a second would be armed in the kernel but never fire.
fn keep_first_watch(operations: &mut Vec<Operation>) {
    let mut seen = false;
    operations
        .retain(|op| !matches!(op, Operation::Watch(_)) || !std::mem::replace(&mut seen, true));
}

fn nmi(points: &Points, rand: &mut impl Rand) -> NmiPoint {
    NmiPoint { at: points.pick(rand), occurrence: small(rand) }
}

/// Random schedules for `kernel`.
pub struct KernelGenerator<'p> {
    kernel: KernelId,
    points: &'p Points,
}

impl<'p> KernelGenerator<'p> {
    /// A generator drawing from `points`.
    pub fn new(kernel: KernelId, points: &'p Points) -> Self {
        Self { kernel, points }
    }
}

impl<S: HasRand> Generator<KernelInput, S> for KernelGenerator<'_> {
    fn generate(&mut self, state: &mut S) -> Result<KernelInput, Error> {
        let rand = state.rand_mut();
        let mut operations = (0..1 + rand.below_or_zero(4)).map(|_| operation(rand)).collect();
        keep_first_watch(&mut operations);
        let nmis = (0..1 + rand.below_or_zero(3)).map(|_| nmi(self.points, rand)).collect();
        Ok(KernelInput(KernelSchedule {
            format: FORMAT.into(),
            description: "generated".into(),
            kernel: self.kernel.clone(),
            operations,
            nmis,
        }))
    }
}

/// Operations per schedule at most, below the agent's limit so there is room to insert.
const MAX_OPERATIONS: usize = 8;

/// One to four random edits: an NMI moved to a neighbouring instruction or anywhere, its
/// occurrence changed, an NMI or an operation added, removed or replaced, a count changed.
pub struct KernelMutator {
    points: Points,
}

impl KernelMutator {
    /// A mutator drawing from `points`.
    pub fn new(points: Points) -> Self {
        Self { points }
    }

    fn edit(&self, schedule: &mut KernelSchedule, rand: &mut impl Rand) -> bool {
        let nmis = schedule.nmis.len();
        let ops = schedule.operations.len();
        match rand.below_or_zero(9) {
            0 | 1 if nmis > 0 => {
                let i = rand.below_or_zero(nmis);
                let distance = rand.below_or_zero(7) as isize - 3;
                let moved = self.points.neighbour(&schedule.nmis[i].at, distance);
                schedule.nmis[i].at = moved.unwrap_or_else(|| self.points.pick(rand));
            }
            2 if nmis > 0 => {
                let i = rand.below_or_zero(nmis);
                let n = &mut schedule.nmis[i].occurrence;
                *n = if rand.coinflip(0.5) { n.saturating_sub(1).max(1) } else { (*n + 1).min(8) };
            }
            3 if nmis < MAX_NMIS => {
                let at = rand.below_or_zero(nmis + 1);
                schedule.nmis.insert(at, nmi(&self.points, rand));
            }
            4 if nmis > 1 => {
                schedule.nmis.remove(rand.below_or_zero(nmis));
            }
            5 if ops < MAX_OPERATIONS => {
                let at = rand.below_or_zero(ops + 1);
                schedule.operations.insert(at, operation(rand));
            }
            6 if ops > 1 => {
                schedule.operations.remove(rand.below_or_zero(ops));
            }
            7 if ops > 0 => {
                let i = rand.below_or_zero(ops);
                schedule.operations[i] = operation(rand);
            }
            8 if nmis > 0 => schedule.nmis[rand.below_or_zero(nmis)].at = self.points.pick(rand),
            _ => return false,
        }
        true
    }
}

impl<S: HasRand> Mutator<KernelInput, S> for KernelMutator {
    fn mutate(&mut self, state: &mut S, input: &mut KernelInput) -> Result<MutationResult, Error> {
        let rand = state.rand_mut();
        let mut changed = false;
        for _ in 0..1 + rand.below_or_zero(4) {
            changed |= self.edit(&mut input.0, rand);
        }
        keep_first_watch(&mut input.0.operations);
        input.0.description = "mutated".into();
        Ok(if changed { MutationResult::Mutated } else { MutationResult::Skipped })
    }

    fn post_exec(&mut self, _state: &mut S, _new: Option<CorpusId>) -> Result<(), Error> {
        Ok(())
    }
}

impl Named for KernelMutator {
    fn name(&self) -> &Cow<'static, str> {
        static NAME: Cow<'static, str> = Cow::Borrowed("KernelMutator");
        &NAME
    }
}

#[cfg(test)]
mod tests {
    use libafl_bolts::rands::StdRand;

    use super::*;

    fn points() -> Points {
        Points {
            nmi: (0..10).map(|i| format!("asm_exc_nmi+{:#x}", 4 * i)).collect(),
            syscall: (0..5).map(|i| format!("entry_SYSCALL_64+{:#x}", 3 * i)).collect(),
            other: vec!["native_irq_return_iret".into()],
        }
    }

    #[test]
    fn mutations_keep_schedules_valid_and_points_in_the_table() {
        let points = points();
        let mutator = KernelMutator::new(points.clone());
        let mut rand = StdRand::with_seed(3);
        let mut schedule = KernelSchedule {
            format: FORMAT.into(),
            description: String::new(),
            kernel: KernelId::default(),
            operations: vec![operation(&mut rand)],
            nmis: vec![nmi(&points, &mut rand)],
        };
        let all: Vec<&String> =
            points.nmi.iter().chain(&points.syscall).chain(&points.other).collect();
        for _ in 0..2000 {
            mutator.edit(&mut schedule, &mut rand);
            schedule.validate().unwrap();
            assert!(schedule.nmis.iter().all(|n| all.contains(&&n.at)), "{:?}", schedule.nmis);
            assert!(schedule.operations.len() <= MAX_OPERATIONS);
            keep_first_watch(&mut schedule.operations);
            let watches = schedule.operations.iter().filter(|o| matches!(o, Operation::Watch(_)));
            assert!(watches.count() <= 1);
        }
    }

    #[test]
    fn a_neighbour_stays_in_its_region() {
        let points = points();
        assert_eq!(points.neighbour("asm_exc_nmi+0x8", 1).as_deref(), Some("asm_exc_nmi+0xc"));
        assert_eq!(points.neighbour("asm_exc_nmi+0x0", -3).as_deref(), None);
        assert_eq!(
            points.neighbour("entry_SYSCALL_64+0xc", 3).as_deref(),
            Some("entry_SYSCALL_64+0xc")
        );
    }
}
