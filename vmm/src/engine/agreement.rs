//! The fast mode against the stepped engine: random symbolic schedules for one variant, each
//! executed in both modes, must end in the same verdict with the same NMI books and the same
//! guest counters (docs/engine.md, "Two execution modes"). `vmm/tests/modes.rs` runs it for
//! every built-in variant, and `nmifuzz modes` for any entry, a user's own included.
//!
//! The schedules: the loop workload (8 iterations); one to four actions with busy work and
//! faults; the stress option half the time; and one to four symbolic points of the variant's
//! instruction table, the first where the workload goes, each later one (mostly) where the
//! guest goes after the first NMI, as a traced stepped run of the schedule so far shows.

use super::schedule::{
    Fault, HandlerAction, Injection, Point, SCHEDULE_FORMAT, SCHEDULE_MAX_DELAY, Schedule, Workload,
};
use super::table::InstructionTable;
use super::{Engine, Execution, Mode, RunOptions};
use crate::error::Result;
use crate::outcome::Verdict;
use crate::vm::Vm;

/// splitmix64: a small deterministic generator, so that every schedule is reproducible from
/// its seed.
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One schedule that ran in both modes.
pub struct Compared {
    /// The schedule.
    pub schedule: Schedule,
    /// What the stepped engine made of it.
    pub stepped: Execution,
    /// What the fast mode made of it.
    pub fast: Execution,
}

impl Compared {
    /// Whether the modes agree ([`agreed`]).
    pub fn agrees(&self) -> bool {
        agreed(&self.fast) == agreed(&self.stepped)
    }
}

/// What both modes must agree on: the verdict without the instruction counts in it (the fast
/// mode counts only what it steps), the NMI books and the guest's counters.
pub fn agreed(execution: &Execution) -> String {
    let verdict = match &execution.outcome.verdict {
        Verdict::WrongReturn(wrong) => format!(
            "wrong return of NMI {} at {}: {:?} instead of {:?}",
            wrong.nmi, wrong.iretq, wrong.actual, wrong.expected
        ),
        verdict @ Verdict::GuestPanic(_) => verdict.to_string(),
        verdict => verdict.signature(),
    };
    format!("{verdict}\n{:?}\n{:?}", execution.nmi, execution.outcome.counters)
}

/// Draws a schedule for `variant` with `rng` (see the module documentation) and executes it in
/// both modes with `options` (whose mode is ignored).
pub fn compare_one(
    engine: &mut Engine,
    vm: &mut Vm,
    rng: &mut Rng,
    variant: &str,
    table: &InstructionTable,
    options: &RunOptions,
) -> Result<Compared> {
    let schedule = random_schedule(engine, vm, rng, variant, table, options)?;
    let plan = schedule.resolve(vm.image())?;
    let stepped = engine.run(vm, &plan, &RunOptions { mode: Mode::Stepped, ..*options })?;
    let fast = engine.run(vm, &plan, &RunOptions { mode: Mode::Fast, ..*options })?;
    Ok(Compared { schedule, stepped, fast })
}

/// A random schedule (see the module documentation); traced stepped runs say where the guest
/// goes.
fn random_schedule(
    engine: &mut Engine,
    vm: &mut Vm,
    rng: &mut Rng,
    variant: &str,
    table: &InstructionTable,
    options: &RunOptions,
) -> Result<Schedule> {
    const FAULTS: [&[Fault]; 6] = [
        &[],
        &[Fault::Ud],
        &[Fault::Pf],
        &[Fault::Bp],
        &[Fault::Ud, Fault::Bp],
        &[Fault::Ud, Fault::Pf, Fault::Bp],
    ];
    let count = 1 + rng.below(4) as usize;
    let mut schedule = Schedule {
        format: SCHEDULE_FORMAT,
        description: "nmifuzz modes: a random symbolic schedule".into(),
        variant: variant.to_owned(),
        workload: Workload::Loop,
        workload_iterations: 8,
        stress_unmask: rng.below(2) == 0,
        actions: (0..count)
            .map(|_| HandlerAction {
                busy: rng.below(6) as u32,
                faults: FAULTS[rng.below(FAULTS.len() as u64) as usize].to_vec(),
            })
            .collect(),
        // Where the workload goes without NMIs: an injection that never comes keeps it stepped.
        injections: vec![Injection::After(SCHEDULE_MAX_DELAY)],
        user_flags: Vec::new(),
        origin: None,
    };
    let mut reached = |schedule: &Schedule| -> Result<Vec<usize>> {
        let plan = schedule.resolve(vm.image())?;
        let traced = RunOptions { mode: Mode::Stepped, keep_trace: true, ..*options };
        let execution = engine.run(vm, &plan, &traced)?;
        let first = execution.trace.iter().position(|s| s.depth > 0).unwrap_or(0);
        let rips = execution.trace[first..].iter().map(|s| s.rip);
        // A point names its symbol, and a name that repeats means its first symbol.
        let named = |i: &usize| {
            let insn = &table.insns()[*i];
            vm.image().symbol(&insn.symbol).ok() == Some(insn.address - insn.offset)
        };
        Ok(rips
            .filter_map(|rip| table.insns().iter().position(|i| i.address == rip))
            .filter(named)
            .collect())
    };
    let workload = reached(&schedule)?;
    let point = |rng: &mut Rng, pool: &[usize]| {
        let insn = &table.insns()[pool[rng.below(pool.len() as u64) as usize]];
        Injection::At(Point {
            symbol: insn.symbol.clone(),
            offset: insn.offset,
            occurrence: 1 + rng.below(3) as u32,
            extra: if rng.below(2) == 0 { 0 } else { rng.below(4) },
        })
    };
    if workload.is_empty() {
        return Ok(schedule);
    }
    schedule.injections = vec![point(rng, &workload)];
    let after_first = reached(&schedule)?;
    for _ in 1..count {
        let pool =
            if after_first.is_empty() || rng.below(5) == 0 { &workload } else { &after_first };
        schedule.injections.push(point(rng, pool));
    }
    Ok(schedule)
}
