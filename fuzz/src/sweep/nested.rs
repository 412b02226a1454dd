//! The loop sweep: the bounded exhaustive enumeration of two and three nested NMIs over the
//! ring-0 workload loop.
//!
//! For each handler action and a few placements of the first NMI in the workload, the sweep
//! measures how long the first NMI's handling lasts (from its delivery until the interrupted
//! context is resumed), then puts a second NMI at every instruction boundary of that handling.
//! Where the second NMI nests, a third goes at every boundary of a small window after the
//! second, and of the same window after every IRETQ that follows while the first NMI is still
//! handled: those IRETQs are where NMIs open again and where a repeat of the handler begins
//! (an entry that loses track of a repeat fails there). With `--third-window all` the third
//! goes at every boundary from the second injection until the first NMI's handling ends: a
//! bounded proof that the entry survives every placement of up to three NMIs, for each
//! handler action and placement of the first. A correct entry passes every run; a broken one
//! must fail at least one.

use std::collections::BTreeSet;

use anyhow::{Context, Result, bail};
use vmm::engine::decode::InsnCache;
use vmm::engine::schedule::{
    Fault, HandlerAction, Injection, Origin, SCHEDULE_FORMAT, SCHEDULE_MAX_DELAY, Schedule,
    Trigger, Workload,
};
use vmm::engine::symbolic::{injection_stop, point_at_count, point_between, symbolic_injections};
use vmm::engine::trace::Event;
use vmm::engine::{Execution, Mode, RunOptions};

use super::{Part, Shared, Sweeper, Tally, jobs};
use crate::options::{SweepArgs, ThirdWindow};
use crate::target::Target;

/// Where the first NMI lands: instructions after the start of the run. Spread over the
/// workload loop so that the first NMI interrupts different instructions of it.
const FIRST_PLACEMENTS: [u64; 5] = [60, 67, 75, 84, 97];

/// What the first NMI's `do_nmi` does: each exception alone, all together, then busy work
/// and an immediate return. The exceptions come first: their IRETQs are what let a second NMI
/// in while the first is handled, so that is where broken entries fail. (`revoke-cs` does
/// nothing to an NMI that interrupted ring 0: the user sweep has it.)
fn actions() -> Vec<HandlerAction> {
    let faults = Fault::EXCEPTIONS;
    let mut actions: Vec<HandlerAction> =
        faults.iter().map(|f| HandlerAction { busy: 0, faults: vec![*f] }).collect();
    if faults.len() > 1 {
        actions.push(HandlerAction { busy: 1, faults: faults.to_vec() });
    }
    actions.push(HandlerAction { busy: 4, faults: vec![] });
    actions.push(HandlerAction::default());
    actions
}

/// One unit of the loop sweep: one handler action with one placement of the first NMI, whose
/// handling lasts `length` instructions.
struct Unit {
    action: HandlerAction,
    first: u64,
    length: u64,
}

impl std::fmt::Display for Unit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "first NMI after {}, do_nmi {:?}", self.first, self.action)
    }
}

/// The schedules of one unit's runs: the sweep's variant and workload, the unit's action, and
/// the origin of the VM they run on.
struct Schedules<'a> {
    args: &'a SweepArgs,
    unit: &'a Unit,
    origin: Origin,
}

impl Schedules<'_> {
    /// The unit's schedule with `injections`.
    fn with(&self, injections: Vec<Injection>) -> Schedule {
        Schedule {
            format: SCHEDULE_FORMAT,
            description: format!("sweep: {}", self.unit),
            variant: self.args.variant.clone(),
            workload: Workload::Loop,
            workload_iterations: self.args.workload_iterations,
            stress_unmask: false,
            actions: vec![self.unit.action.clone()],
            injections,
            user_flags: Vec::new(),
            origin: Some(self.origin.clone()),
        }
    }
}

/// A third NMI planned after a pair: the pair's second NMI and the third, in instructions
/// after the previous injection, and the triple as symbolic points where it has them.
struct Triple {
    second: u64,
    third: u64,
    symbolic: Option<Vec<Injection>>,
}

/// The loop sweep, until its end or until the jobs stop: returns its units' tallies, in the
/// order of [`actions`] and then of the placements.
pub(super) fn sweep(
    target: &mut Target,
    shared: &Shared,
    part: &mut Part,
    args: &SweepArgs,
) -> Result<Vec<Tally>> {
    // Every unit's handling is measured first, here (a stepped run each), so that the jobs can
    // take the biggest units first.
    let mut units = Vec::new();
    for action in actions() {
        for &first in &FIRST_PLACEMENTS[..args.placements as usize] {
            let mut unit = Unit { action: action.clone(), first, length: 0 };
            let measured = [Injection::After(first), Injection::After(SCHEDULE_MAX_DELAY)];
            let measured =
                Schedules { args, unit: &unit, origin: target.origin() }.with(measured.to_vec());
            unit.length =
                handling_length(target, &measured).with_context(|| format!("measuring {unit}"))?;
            part.handling_lengths.push(unit.length);
            shared.progress.inc_length(unit.length + 2);
            units.push(unit);
        }
    }
    // A unit's pairs are its handling's instructions, and its triples grow with them.
    let mut order: Vec<usize> = (0..units.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(units[i].length));
    jobs::run(target, shared, &units, &order, |s, unit| sweep_unit(s, args, unit))
}

/// One unit: two NMIs, the second at every boundary of the first's handling, then a third
/// after each nested second one.
fn sweep_unit(s: &mut Sweeper, args: &SweepArgs, unit: &Unit) -> Result<()> {
    let schedules = Schedules { args, unit, origin: s.target.origin() };
    // Pass 1: two NMIs, the second at every boundary of the first's handling.
    let mut triples = Vec::new();
    for second in 0..=unit.length + 1 {
        if !s.go() {
            return Ok(());
        }
        let planned = run_pair(s, &schedules, second)?;
        s.shared.progress.inc_length(planned.len() as u64);
        triples.extend(planned);
    }
    // Pass 2: a third NMI after each nested second one.
    for triple in triples {
        if !s.go() {
            return Ok(());
        }
        run_triple(s, &schedules, triple)?;
    }
    Ok(())
}

/// Runs and records the pair with the second NMI `second` instructions after the first, traced
/// to find where a third should go; returns the triples planned after it.
fn run_pair(s: &mut Sweeper, schedules: &Schedules, second: u64) -> Result<Vec<Triple>> {
    let pair =
        schedules.with(vec![Injection::After(schedules.unit.first), Injection::After(second)]);
    let traced = RunOptions { keep_trace: true, ..RunOptions::default() };
    let execution = s.target.execute(&pair, &traced, &mut [])?;
    let mut triples = Vec::new();
    if !execution.outcome.verdict.is_finding() {
        for third in third_offsets(s.target, &execution, schedules.args.third_window) {
            let symbolic = symbolic_triple(s.target, &execution, third);
            triples.push(Triple { second, third, symbolic });
        }
    }
    s.part().pairs += 1;
    s.record(&execution, pair);
    Ok(triples)
}

/// Runs and records `triple` as symbolic points on the fast mode; a finding is re-run on the
/// stepped engine and recorded as it judges it. A triple with no symbolic form runs in the
/// after form, which the fast mode steps: exact, only slower.
fn run_triple(s: &mut Sweeper, schedules: &Schedules, triple: Triple) -> Result<()> {
    let Triple { second, third, symbolic } = triple;
    let after_form = || {
        let first = schedules.unit.first;
        schedules.with(vec![
            Injection::After(first),
            Injection::After(second),
            Injection::After(third),
        ])
    };
    let fast = RunOptions { mode: Mode::Fast, ..RunOptions::default() };
    let mut schedule = symbolic.map_or_else(after_form, |i| schedules.with(i));
    let mut execution = s.target.execute(&schedule, &fast, &mut [])?;
    if execution.outcome.verdict.is_finding() {
        schedule = after_form();
        execution = s.target.execute(&schedule, &RunOptions::default(), &mut [])?;
    }
    s.part().triples += 1;
    s.record(&execution, schedule);
    Ok(())
}

/// Where a third NMI goes, in instructions after the second, for a run whose second NMI
/// nested; empty if it did not. With a window of N instructions: `1..=N`, and `0..N` after
/// every IRETQ between the second injection and the end of the first NMI's handling (where
/// NMIs open again and repeats begin). With `all`: every boundary from the one after the
/// second injection to the one where the first NMI's interrupted context resumes.
fn third_offsets(target: &Target, execution: &Execution, window: ThirdWindow) -> Vec<u64> {
    if window == ThirdWindow::Within(0) {
        return Vec::new();
    }
    let trace = &execution.trace;
    let injected = |step: &&vmm::engine::trace::Step| {
        step.events.iter().any(|e| matches!(e, Event::NmiInjected { index: 1, .. }))
    };
    let Some(start) = trace.iter().position(|s| injected(&s)) else { return Vec::new() };
    let second_at = trace[start].index;
    let nested = trace[start..]
        .iter()
        .filter(|s| s.events.iter().any(|e| matches!(e, Event::NmiDelivered { .. })))
        .take(1)
        .any(|s| s.depth >= 2);
    if !nested {
        return Vec::new();
    }
    // A nested second NMI was injected while the first was handled (depth 1 at `start`), so
    // the first stop back at depth 0 is where the handling ends.
    let handling = trace[start..].iter().take_while(|s| s.depth > 0);
    let window = match window {
        ThirdWindow::Within(n) => n,
        ThirdWindow::All => {
            let Some(resumed) = trace[start..].iter().find(|s| s.depth == 0) else {
                return Vec::new();
            };
            return (1..=resumed.index - second_at).collect();
        }
    };
    let mut insns = InsnCache::default();
    let mut offsets: BTreeSet<u64> = (1..=window).collect();
    for step in handling {
        if insns.get(target.vm().ram(), step.rip).is_ok_and(|i| i.is_iretq) {
            let after = step.index + 1 - second_at;
            offsets.extend(after..after + window);
        }
    }
    offsets.into_iter().collect()
}

/// The triple "the pair of `pair` (a traced stepped run), then a third NMI `third`
/// instructions after the second" as symbolic points: the pair's trace is the triple's path
/// up to the third injection (a third due after the trace's end, where the pair run stopped
/// stepping, is its last stop plus `extra`). `None` where the stepped engine would never make
/// the third injection (its count falls between two stops) or an injection has no symbolic
/// form.
fn symbolic_triple(target: &mut Target, pair: &Execution, third: u64) -> Option<Vec<Injection>> {
    let trace = &pair.trace;
    let (p1, p2) = (injection_stop(trace, 0)?, injection_stop(trace, 1)?);
    let mut anchorable = |address| target.anchorable(address);
    let mut triggers = vec![point_between(trace, 0, p1, &mut anchorable)?];
    triggers.push(if p2 == p1 {
        Trigger::After(0)
    } else {
        point_between(trace, p1 + 1, p2, &mut anchorable)?
    });
    triggers.push(if third == 0 {
        Trigger::After(0)
    } else {
        point_at_count(trace, p2 + 1, trace[p2].index + third, &mut anchorable)?
    });
    symbolic_injections(&triggers, target.vm().image())
}

/// Instructions from the first NMI's delivery until its interrupted context resumes.
pub(super) fn handling_length(target: &mut Target, schedule: &Schedule) -> Result<u64> {
    let options = RunOptions { keep_trace: true, ..RunOptions::default() };
    let execution: Execution = target.execute(schedule, &options, &mut [])?;
    if execution.outcome.verdict.is_finding() {
        bail!("a single NMI already fails: {}", execution.outcome.verdict);
    }
    let delivered = execution
        .trace
        .iter()
        .position(|s| s.events.iter().any(|e| matches!(e, Event::NmiDelivered { .. })))
        .context("the first NMI was never delivered")?;
    let resumed = execution.trace[delivered..]
        .iter()
        .find(|s| s.depth == 0)
        .context("the first NMI never returned")?;
    Ok(resumed.index - execution.trace[delivered].index + 1)
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::options::{SweepWorkload, UserPairs};
    use crate::progress::Progress;

    fn linux(third_window: ThirdWindow) -> SweepArgs {
        SweepArgs {
            variant: "linux".into(),
            placements: 1,
            third_window,
            workload_iterations: 20,
            workload: SweepWorkload::Loop,
            user_iterations: 1,
            user_pairs: UserPairs::Gaps,
            stop_on_first: false,
            jobs: 1,
            json: false,
        }
    }

    /// The deep bound on its smallest meaningful case, the first pair of the `#BP` unit whose
    /// second NMI nests: a third NMI at every boundary until the first NMI's handling ends, and
    /// `linux` survives each. (The whole bound, `--third-window all`, is 780,844 runs on
    /// `linux` with one placement, about 70 minutes on one core: docs/sweep.md, "The deeper bound".)
    #[test]
    fn kvm_third_window_all_puts_the_third_nmi_at_every_boundary_and_linux_survives() {
        if std::env::var_os("NMIFUZZ_SKIP_KVM_TESTS").is_some_and(|v| v == "1") {
            return;
        }
        let mut target = Target::new().unwrap();
        let progress = Progress::new(0, "runs", false);
        let shared = Shared::new(1, &progress, Instant::now(), None, false);
        let (window, all) = (linux(ThirdWindow::Within(8)), linux(ThirdWindow::All));
        let action = HandlerAction { busy: 0, faults: vec![Fault::Bp] };
        let mut unit = Unit { action, first: FIRST_PLACEMENTS[0], length: 0 };
        let origin = target.origin();
        let measured = vec![Injection::After(unit.first), Injection::After(SCHEDULE_MAX_DELAY)];
        let measured = Schedules { args: &all, unit: &unit, origin: origin.clone() }.with(measured);
        unit.length = handling_length(&mut target, &measured).unwrap();
        let (window, all) = (
            Schedules { args: &window, unit: &unit, origin: origin.clone() },
            Schedules { args: &all, unit: &unit, origin },
        );
        let mut s = Sweeper::new(&mut target, &shared, 0);
        let (within, every) = (0..=unit.length + 1)
            .find_map(|second| {
                let within = run_pair(&mut s, &window, second).unwrap();
                (!within.is_empty()).then(|| (within, run_pair(&mut s, &all, second).unwrap()))
            })
            .unwrap();
        let offsets = |triples: &[Triple]| triples.iter().map(|t| t.third).collect::<Vec<_>>();
        // Every boundary, through the nested NMI's handling and the repeat, until the first
        // NMI's interrupted context resumes; the window's are a few around the IRETQs.
        assert_eq!(offsets(&every), (1..=every.len() as u64).collect::<Vec<_>>());
        assert!(every.len() > 4 * within.len(), "{} {}", every.len(), within.len());
        assert!(offsets(&within).iter().any(|&o| o > 8), "{:?}", offsets(&within));
        let planned = every.len() as u64;
        for triple in every {
            run_triple(&mut s, &all, triple).unwrap();
        }
        assert_eq!(s.part().triples, planned);
        assert!(s.tally.findings.is_empty(), "{:?}", s.tally.findings);
    }
}
