//! The user sweep: NMIs at every instruction boundary of the places around ring 3
//! ([`crate::ring3`]), one at a time and in pairs.
//!
//! 1. **Measure.** One stepped, traced run of the user workload without NMIs (an injection
//!    due after the end keeps the engine stepping to DONE) gives every stop of it: each
//!    ring-0 boundary, and the ring-3 points, where the host stops at the I/O exits of user
//!    `out`s (it never steps ring 3). The stops in a region (a SYSCALL gap, the return to
//!    user with espfix64 and the final IRETQ, a ring-3 point) are the *places*; each becomes
//!    a symbolic point, "the n-th time this address is reached", which both modes reach alike.
//! 2. **Singles.** One NMI at each place, with each handler action ([`single_actions`]).
//! 3. **Pairs.** After a first NMI at a ring-3 point or in a gap, with each action of
//!    [`pair_actions`], one more stepped, traced run measures its handling (from the injection
//!    until the interrupted context resumes), and a second NMI goes at every stop of it: the
//!    entry's user path, `do_nmi`, its exceptions and the return to user. The entry's user
//!    path runs only under an NMI from user, so its boundaries are swept here.
//!
//! Singles and pairs run as symbolic points on the fast mode; a finding is re-run on the
//! stepped engine and recorded as it judges it. The run count is about places x 7 singles plus
//! nesting places x 5 actions x the handling's length in stops.

use anyhow::{Context, Result, bail};
use vmm::engine::schedule::{
    Fault, HandlerAction, Injection, Origin, SCHEDULE_FORMAT, SCHEDULE_MAX_DELAY, Schedule,
    Workload,
};
use vmm::engine::symbolic::{injection_stop, point_between, symbolic_injections};
use vmm::engine::trace::{Event, Step};
use vmm::engine::{Execution, Mode, RunOptions};

use super::{Part, Shared, Sweeper, Tally, jobs};
use crate::ring3::{Region, Regions};
use crate::target::Target;

/// What the user sweep sweeps.
pub struct Plan<'a> {
    /// The entry variant.
    pub variant: &'a str,
    /// The user workload (tests put the loop workload in its place).
    pub workload: Workload,
    /// Its iterations.
    pub iterations: u32,
    /// Where the places are.
    pub regions: &'a Regions,
    /// Whether first NMIs in the SYSCALL gaps get second NMIs too (always after ring 3).
    pub pairs_in_gaps: bool,
}

/// A place: a stop of the measured run in a region, as the injection that strikes it.
struct Place {
    region: Region,
    /// Where the stop is, for descriptions.
    at: String,
    first: Injection,
}

/// The handler actions of single NMIs: each fault alone, the faults together after a little
/// busy work, busy work alone and an immediate return. `revoke-cs` only after ring 3, the one
/// place where it does something.
fn single_actions(ring3: bool) -> Vec<HandlerAction> {
    let mut actions = faults_alone(ring3);
    let all = actions.iter().flat_map(|a| a.faults.iter().copied()).collect();
    actions.push(HandlerAction { busy: 1, faults: all });
    actions.push(HandlerAction { busy: 4, faults: vec![] });
    actions.push(HandlerAction::default());
    actions
}

/// The handler actions of first NMIs that get second ones: each fault alone (whose IRETQ
/// lets the second in, or whose revoked segment makes the return to user fault) and an
/// immediate return (the second waits in the latch for the final IRETQ). Busy work only makes
/// the handling longer.
fn pair_actions(ring3: bool) -> Vec<HandlerAction> {
    let mut actions = faults_alone(ring3);
    actions.push(HandlerAction::default());
    actions
}

/// One action per fault, `revoke-cs` only if `ring3`.
fn faults_alone(ring3: bool) -> Vec<HandlerAction> {
    Fault::ALL
        .iter()
        .filter(|f| ring3 || **f != Fault::RevokeCs)
        .map(|f| HandlerAction { busy: 0, faults: vec![*f] })
        .collect()
}

/// One unit of the user sweep.
enum Unit<'p> {
    /// The single NMIs at a place, one per action of [`single_actions`].
    Singles(&'p Place),
    /// A first NMI at a place with an action of [`pair_actions`], and a second at every stop
    /// of its handling.
    Pairs(&'p Place, HandlerAction),
}

impl std::fmt::Display for Unit<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Singles(place) => write!(f, "single NMIs at {}", place.at),
            Self::Pairs(place, action) => {
                write!(f, "second NMIs after a first at {}, do_nmi {action:?}", place.at)
            }
        }
    }
}

/// The schedule of the plan with `action` and `injections`, described as `what`.
fn schedule(
    plan: &Plan,
    origin: &Origin,
    action: &HandlerAction,
    injections: Vec<Injection>,
    what: &str,
) -> Schedule {
    Schedule {
        format: SCHEDULE_FORMAT,
        description: format!("user sweep: {what}, do_nmi {action:?}"),
        variant: plan.variant.to_owned(),
        workload: plan.workload,
        workload_iterations: plan.iterations,
        stress_unmask: false,
        actions: vec![action.clone()],
        injections,
        user_flags: Vec::new(),
        origin: Some(origin.clone()),
    }
}

/// The user sweep, until its end or until the jobs stop: finds the places on `target`, then
/// returns the tallies of its units, the places' singles and then their pairs.
pub(super) fn sweep(
    target: &mut Target,
    shared: &Shared,
    part: &mut Part,
    plan: &Plan,
) -> Result<Vec<Tally>> {
    // 1. The places, from a run without NMIs.
    let base = [Injection::After(SCHEDULE_MAX_DELAY)];
    let base = schedule(plan, &target.origin(), &HandlerAction::default(), base.to_vec(), "");
    let traced = RunOptions { keep_trace: true, ..RunOptions::default() };
    let execution = target.execute(&base, &traced, &mut [])?;
    if execution.outcome.verdict.is_finding() {
        bail!(
            "the {} workload already fails without NMIs: {}",
            plan.workload.name(),
            execution.outcome.verdict
        );
    }
    let places = places(target, part, plan.regions, &execution.trace);
    for place in &places {
        *part.places.entry(place.region).or_default() += 1;
    }
    let singles: usize = places.iter().map(|p| single_actions(p.region.is_ring3()).len()).sum();
    shared.progress.inc_length(singles as u64);
    let mut units: Vec<Unit> = places.iter().map(Unit::Singles).collect();
    // 2. After a first NMI after ring 3 or in a gap, a second at every stop of its handling.
    let nests = |p: &&Place| p.region.nests() && (plan.pairs_in_gaps || p.region.is_ring3());
    for place in places.iter().filter(nests) {
        let actions = pair_actions(place.region.is_ring3());
        units.extend(actions.into_iter().map(|action| Unit::Pairs(place, action)));
    }
    // The units are many and alike, and their sizes unknown until their handling is measured:
    // the jobs take them in order.
    let order: Vec<usize> = (0..units.len()).collect();
    jobs::run(target, shared, &units, &order, |s, unit| match unit {
        Unit::Singles(place) => sweep_singles(s, plan, place),
        Unit::Pairs(place, action) => sweep_pairs(s, plan, place, action),
    })
}

/// One NMI at `place`, with each handler action.
fn sweep_singles(s: &mut Sweeper, plan: &Plan, place: &Place) -> Result<()> {
    let origin = s.target.origin();
    for action in single_actions(place.region.is_ring3()) {
        if !s.go() {
            return Ok(());
        }
        let what = format!("NMI at {}", place.at);
        let single = schedule(plan, &origin, &action, vec![place.first.clone()], &what);
        run_fast(s, single)?;
        s.part().singles += 1;
    }
    Ok(())
}

/// A first NMI at `place` with `action`, its handling measured by one stepped run, and a
/// second NMI at every stop of that handling.
fn sweep_pairs(s: &mut Sweeper, plan: &Plan, place: &Place, action: &HandlerAction) -> Result<()> {
    if !s.go() {
        return Ok(());
    }
    let (origin, what) = (s.target.origin(), format!("first NMI at {}", place.at));
    let measured = [place.first.clone(), Injection::After(SCHEDULE_MAX_DELAY)];
    let measured = schedule(plan, &origin, action, measured.to_vec(), &what);
    let traced = RunOptions { keep_trace: true, ..RunOptions::default() };
    let execution = s
        .target
        .execute(&measured, &traced, &mut [])
        .with_context(|| format!("measuring the handling of {action:?} at {}", place.at))?;
    if execution.outcome.verdict.is_finding() {
        // The single NMI with this action already failed, and was recorded.
        return Ok(());
    }
    let seconds = seconds(s.target, plan.regions, &execution);
    s.part().handling_lengths.push(handling_length(&execution.trace));
    s.shared.progress.inc_length(seconds.len() as u64);
    for (region, second) in seconds {
        if !s.go() {
            return Ok(());
        }
        let pair = schedule(plan, &origin, action, vec![place.first.clone(), second], &what);
        run_fast(s, pair)?;
        let part = s.part();
        part.pairs += 1;
        if let Some(region) = region {
            *part.seconds_by_region.entry(region).or_default() += 1;
        }
    }
    Ok(())
}

/// The stops of `trace` (the run without NMIs) in a region, each as a symbolic injection
/// counted from the start; stops without one are counted as unplaced.
fn places(target: &mut Target, part: &mut Part, regions: &Regions, trace: &[Step]) -> Vec<Place> {
    let mut places = Vec::new();
    for (at, step) in trace.iter().enumerate() {
        let Some(region) = regions.classify(step.rip) else { continue };
        let first = point_between(trace, 0, at, |address| target.anchorable(address))
            .and_then(|trigger| symbolic_injections(&[trigger], target.vm().image()));
        match first {
            Some(mut injections) => places.push(Place {
                region,
                at: target.vm().image().symbolize(step.rip),
                first: injections.remove(0),
            }),
            None => part.unplaced += 1,
        }
    }
    places
}

/// Every stop of the first NMI's handling in `execution` (a traced run of the first NMI with
/// an injection due after the end) as a second injection, counted from the first's stop, with
/// the region it strikes: `after: 0` at the first's own stop, then a symbolic point at each
/// later stop until the interrupted context resumes. Empty if the first NMI never returned.
fn seconds(
    target: &mut Target,
    regions: &Regions,
    execution: &Execution,
) -> Vec<(Option<Region>, Injection)> {
    let trace = &execution.trace;
    let Some((first, resumed)) = handling(trace) else { return Vec::new() };
    let mut seconds = vec![(regions.classify(trace[first].rip), Injection::After(0))];
    for at in first + 1..=resumed {
        let second = point_between(trace, first + 1, at, |a| target.anchorable(a))
            .and_then(|trigger| symbolic_injections(&[trigger], target.vm().image()));
        if let Some(mut second) = second {
            seconds.push((regions.classify(trace[at].rip), second.remove(0)));
        }
    }
    seconds
}

/// The first NMI's handling in `trace`: the stop where it was injected and the first stop at
/// depth 0 after its delivery (its interrupted context resumed).
fn handling(trace: &[Step]) -> Option<(usize, usize)> {
    let injected = injection_stop(trace, 0)?;
    let delivered = injected
        + trace[injected..]
            .iter()
            .position(|s| s.events.iter().any(|e| matches!(e, Event::NmiDelivered { .. })))?;
    let resumed = delivered + trace[delivered..].iter().position(|s| s.depth == 0)?;
    Some((injected, resumed))
}

/// Instructions of the first NMI's handling in `trace`, as the loop sweep counts them.
fn handling_length(trace: &[Step]) -> u64 {
    handling(trace).map_or(0, |(first, resumed)| trace[resumed].index - trace[first].index + 1)
}

/// Runs `schedule` on the fast mode, re-runs a finding on the stepped engine, and records the
/// stepped engine's verdict.
fn run_fast(s: &mut Sweeper, schedule: Schedule) -> Result<()> {
    let fast = RunOptions { mode: Mode::Fast, ..RunOptions::default() };
    let mut execution = s.target.execute(&schedule, &fast, &mut [])?;
    if execution.outcome.verdict.is_finding() {
        execution = s.target.execute(&schedule, &RunOptions::default(), &mut [])?;
    }
    s.record(&execution, schedule);
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use std::time::Instant;

    use vmm::engine::trace::Injected;

    use super::*;
    use crate::progress::Progress;
    use crate::sweep::Summary;

    /// The user sweep of `variant` over the loop workload, with the loop's own symbols standing
    /// in for the places around ring 3 (this guest may have no user workload yet, and the
    /// engine's ring-3 support may not be there): the start of `workload_phase_bp` as the
    /// "ring-3 point", the #PF phase of the loop as a "gap" (no second NMIs there: the test
    /// stays short) and the exception return as the "return to user". On `jobs` VMs.
    pub(in crate::sweep) fn stand_in_sweep(
        variant: &str,
        stop_on_first: bool,
        jobs: u64,
    ) -> Option<Summary> {
        if std::env::var_os("NMIFUZZ_SKIP_KVM_TESTS").is_some_and(|v| v == "1") {
            return None;
        }
        let mut target = Target::new().unwrap();
        let (image, ram) = (target.vm().image(), target.vm().ram());
        let spans = [
            (Region::ReturnToUser, vec!["exception_iretq"]),
            (Region::NmiUserPath, vec!["workload_phase_pf"]),
        ];
        let regions = Regions::from_symbols(image, ram, &spans, "workload_phase_bp");
        let progress = Progress::new(0, "runs", false);
        let shared = Shared::new(jobs, &progress, Instant::now(), None, stop_on_first);
        let mut summary = Summary::default();
        summary.parts.push(Part { workload: "loop", complete: true, ..Part::default() });
        let plan = Plan {
            variant,
            workload: Workload::Loop,
            iterations: 4,
            regions: &regions,
            pairs_in_gaps: true,
        };
        let part = summary.parts.last_mut().unwrap();
        let tallies = sweep(&mut target, &shared, part, &plan).unwrap();
        summary.merge(tallies, stop_on_first);
        Some(summary)
    }

    #[test]
    fn kvm_the_stand_in_sweep_places_singles_and_pairs_and_linux_survives() {
        let start = Instant::now();
        let Some(summary) = stand_in_sweep("linux", false, 1) else { return };
        let part = &summary.parts[0];
        eprintln!("{} runs in {:.1} s: {part:?}", summary.runs, start.elapsed().as_secs_f64());
        assert!(summary.findings.is_empty(), "{:?}", summary.findings);
        assert!(part.complete && part.unplaced == 0, "{part:?}");
        // The point once (one round of the four phases), the #PF phase's instructions once,
        // the exception return after each of the three exception phases.
        assert_eq!(part.places[&Region::UserPoint], 1, "{part:?}");
        assert!(part.places[&Region::NmiUserPath] >= 5, "{part:?}");
        assert!(part.places[&Region::ReturnToUser] >= 3, "{part:?}");
        let ring0: u64 = part.places.iter().filter(|(r, _)| !r.is_ring3()).map(|(_, n)| n).sum();
        assert_eq!(part.singles, 7 + ring0 * 6, "{part:?}");
        // Second NMIs at every stop of the handling of the first at the point, for each of the
        // five pair actions; the handling's exceptions return through `exception_iretq`.
        assert_eq!(part.handling_lengths.len(), 5, "{part:?}");
        assert!(part.pairs > 5 * 200, "{part:?}");
        assert!(part.seconds_by_region.get(&Region::ReturnToUser) > Some(&0), "{part:?}");
        assert_eq!(summary.runs, part.singles + part.pairs);
    }

    #[test]
    fn kvm_the_stand_in_sweep_kills_naive() {
        let Some(summary) = stand_in_sweep("naive", true, 1) else { return };
        assert_eq!(summary.findings.len(), 1, "{summary:?}");
        assert!(summary.first_finding.is_some());
        let finding = summary.findings.values().next().unwrap();
        assert!(finding.message.contains("invariant violated"), "{}", finding.message);
        // The example replays as it was found, on the stepped engine.
        assert_eq!(finding.example.workload, Workload::Loop);
    }

    #[test]
    fn actions_cover_every_fault_and_revoke_only_after_ring3() {
        let singles = single_actions(true);
        assert_eq!(singles.len(), 7);
        for fault in Fault::ALL {
            assert!(singles.iter().any(|a| a.faults == [*fault]), "{fault:?} alone");
        }
        assert!(singles.iter().any(|a| a.faults.len() == Fault::ALL.len()));
        assert_eq!(singles.last(), Some(&HandlerAction::default()));
        let ring0 = single_actions(false);
        assert_eq!(ring0.len(), 6);
        assert!(ring0.iter().all(|a| !a.faults.contains(&Fault::RevokeCs)));
        assert_eq!(pair_actions(true).len(), 5);
        assert_eq!(pair_actions(false).len(), 4);
        assert!(pair_actions(true).iter().all(|a| a.busy == 0 && a.faults.len() <= 1));
    }

    fn step(index: u64, rip: u64, depth: u32, events: Vec<Event>) -> Step {
        Step { index, rip, depth, nmi_executing: None, events }
    }

    #[test]
    fn the_handling_runs_from_the_injection_to_the_resumed_context() {
        let injected = Event::NmiInjected { index: 0, how: Injected::Delivered };
        let delivered = Event::NmiDelivered { frame_rip: 0x10 };
        let trace = vec![
            step(0, 0x10, 0, vec![]),
            step(1, 0x12, 0, vec![injected]),
            step(2, 0x900, 1, vec![delivered]),
            step(3, 0x904, 1, vec![]),
            step(4, 0x12, 0, vec![]),
            step(5, 0x14, 0, vec![]),
        ];
        assert_eq!(handling(&trace), Some((1, 4)));
        assert_eq!(handling_length(&trace), 4);
        let never_returned = &trace[..4];
        assert_eq!(handling(never_returned), None);
        assert_eq!(handling_length(never_returned), 0);
    }
}
