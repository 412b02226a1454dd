//! The sweep's jobs (`--jobs N`): each sweep is cut into independent *units* (the loop sweep's
//! are one handler action with one placement of the first NMI; the user sweep's are one
//! place's single NMIs, or one first NMI's pairs), and N jobs, each with a VM of its own, take
//! units from one queue. Each unit counts into a [`Tally`] of its own; the caller merges the
//! tallies in unit order ([`super::Summary::merge`]), so that the summary does not depend on
//! which job ran what, nor when.
//!
//! What stops a unit before its next run:
//!
//! - the deadline (`eval`'s time limit), for every unit;
//! - a failed job: the others stop and the sweep returns the error;
//! - with `--stop-on-first`, a finding in an *earlier* unit (in unit order). Units before the
//!   first finding's go on to their end, since one of them may still fail first in unit order,
//!   which is where a single job would have stopped. So the first finding, its runs and every
//!   finding kept are a single job's; only the work wasted by later units differs.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Display;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use vmm::engine::Execution;
use vmm::engine::schedule::Schedule;

use super::{Finding, Part};
use crate::progress::Progress;
use crate::target::Target;

/// What every job of one sweep shares: the progress, the clock and when to stop.
pub struct Shared<'a> {
    /// How many jobs sweep at a time.
    jobs: usize,
    pub(super) progress: &'a Progress,
    /// The start of the whole sweep, which finding times count from.
    start: Instant,
    deadline: Option<Instant>,
    stop_on_first: bool,
    /// With `stop_on_first`, the first unit in unit order with a finding so far (`usize::MAX`:
    /// none); the units after it stop.
    first_found: AtomicUsize,
    /// Set when a job fails: the others stop.
    failed: AtomicBool,
    /// The finding signatures announced so far, so that each is announced once whichever jobs
    /// find it.
    announced: Mutex<BTreeSet<String>>,
}

impl<'a> Shared<'a> {
    /// What `jobs` jobs share while they sweep one part: they count into `progress`, time
    /// their findings from `start` (of the whole sweep) and stop at `deadline`.
    pub fn new(
        jobs: u64,
        progress: &'a Progress,
        start: Instant,
        deadline: Option<Instant>,
        stop_on_first: bool,
    ) -> Self {
        Self {
            jobs: usize::try_from(jobs).unwrap_or(usize::MAX).max(1),
            progress,
            start,
            deadline,
            stop_on_first,
            first_found: AtomicUsize::new(usize::MAX),
            failed: AtomicBool::new(false),
            announced: Mutex::new(BTreeSet::new()),
        }
    }

    /// `self`, with `signatures` (the findings of the parts swept before) announced already.
    pub fn announced(self, signatures: impl IntoIterator<Item = String>) -> Self {
        self.announced.lock().expect("not poisoned").extend(signatures);
        self
    }

    /// Whether `unit` must stop before its next run, whatever it found itself.
    fn stopped(&self, unit: usize) -> bool {
        self.failed.load(Ordering::Relaxed)
            || self.deadline.is_some_and(|d| Instant::now() >= d)
            || (self.stop_on_first && unit > self.first_found.load(Ordering::Relaxed))
    }
}

/// What one unit found: its runs and counters, kept as a part's, and its findings.
#[derive(Debug)]
pub struct Tally {
    pub(super) part: Part,
    pub(super) findings: BTreeMap<String, Finding>,
    /// The unit's runs up to and including its first finding, and the sweep's seconds then.
    pub(super) first_finding: Option<(u64, f64)>,
}

/// One unit under way: the target it runs on, what the jobs share, and its own tally.
pub struct Sweeper<'a> {
    pub(super) target: &'a mut Target,
    pub(super) shared: &'a Shared<'a>,
    /// The unit's index in unit order.
    unit: usize,
    pub(super) tally: Tally,
}

impl<'a> Sweeper<'a> {
    /// Unit `unit` (its index in unit order), about to be swept on `target`.
    pub fn new(target: &'a mut Target, shared: &'a Shared<'a>, unit: usize) -> Self {
        let part = Part { complete: true, ..Part::default() };
        let tally = Tally { part, findings: Default::default(), first_finding: None };
        Self { target, shared, unit, tally }
    }

    /// The unit's counters.
    pub(super) fn part(&mut self) -> &mut Part {
        &mut self.tally.part
    }

    /// Whether the next run may go: not after this unit's first finding (with
    /// `stop_on_first`) nor when the jobs stop ([`Shared::stopped`]). A run that may not go
    /// leaves the unit incomplete.
    pub(super) fn go(&mut self) -> bool {
        let found = self.shared.stop_on_first && self.tally.first_finding.is_some();
        if found || self.shared.stopped(self.unit) {
            self.tally.part.complete = false;
            return false;
        }
        true
    }

    /// Counts one run; returns whether it was a finding (which, with `stop_on_first`, stops
    /// this unit and every later one).
    pub(super) fn record(&mut self, execution: &Execution, schedule: Schedule) -> bool {
        self.tally.part.runs += 1;
        let shared = self.shared;
        shared.progress.inc(1);
        let verdict = &execution.outcome.verdict;
        if !verdict.is_finding() {
            return false;
        }
        let (runs, elapsed) = (self.tally.part.runs, shared.start.elapsed().as_secs_f64());
        self.tally.first_finding.get_or_insert((runs, elapsed));
        if shared.stop_on_first {
            shared.first_found.fetch_min(self.unit, Ordering::Relaxed);
        }
        let signature = verdict.signature();
        let entry = self.tally.findings.entry(signature.clone()).or_insert_with(|| Finding {
            kind: verdict.kind(),
            message: verdict.to_string(),
            count: 0,
            example: schedule,
        });
        entry.count += 1;
        let mut announced = shared.announced.lock().expect("not poisoned");
        if announced.insert(signature) {
            shared.progress.note(&format!("found: {verdict}"));
            shared.progress.set_message(format!("{} findings", announced.len()));
        }
        true
    }
}

/// Sweeps every unit of `units` with `work` and returns their tallies in unit order. Several
/// jobs take the units in `order` (biggest first where their sizes are known, so that no job
/// is left with a long unit at the end); one takes them in unit order. The caller's target is the first job's; with one job it is
/// the only one and no thread starts, else every other job boots a VM of its own on a thread
/// of its own (a VM stays on the thread that made it).
pub(super) fn run<U: Sync + Display>(
    target: &mut Target,
    shared: &Shared,
    units: &[U],
    order: &[usize],
    work: impl Fn(&mut Sweeper, &U) -> Result<()> + Sync,
) -> Result<Vec<Tally>> {
    debug_assert_eq!(order.len(), units.len());
    let jobs = shared.jobs.min(units.len()).max(1);
    // One job sweeps in unit order, so that with `stop_on_first` it stops as soon as it can.
    let order: Vec<usize> = if jobs == 1 { (0..units.len()).collect() } else { order.to_vec() };
    let next = AtomicUsize::new(0);
    let job = |target: &mut Target| -> Result<Vec<(usize, Tally)>> {
        let mut tallies = Vec::new();
        while let Some(&unit) = order.get(next.fetch_add(1, Ordering::Relaxed)) {
            let mut sweeper = Sweeper::new(target, shared, unit);
            work(&mut sweeper, &units[unit]).map_err(|e| {
                shared.failed.store(true, Ordering::Relaxed);
                e.context(format!("sweep unit {} of {}: {}", unit + 1, units.len(), units[unit]))
            })?;
            tallies.push((unit, sweeper.tally));
        }
        Ok(tallies)
    };
    let results = if jobs == 1 {
        vec![job(target)]
    } else {
        std::thread::scope(|scope| {
            let job = &job;
            let others: Vec<_> = (1..jobs)
                .map(|j| {
                    scope.spawn(move || {
                        let mut own = Target::new()
                            .with_context(|| format!("sweep job {}: cannot start its VM", j + 1))
                            .inspect_err(|_| shared.failed.store(true, Ordering::Relaxed))?;
                        job(&mut own)
                    })
                })
                .collect();
            let mut results = vec![job(target)];
            for (j, other) in others.into_iter().enumerate() {
                let joined = other.join().map_err(|panic| {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    anyhow!("sweep job {} panicked: {what}", j + 2)
                });
                results.push(joined.and_then(|r| r));
            }
            results
        })
    };
    let mut tallies: Vec<Option<Tally>> = units.iter().map(|_| None).collect();
    for result in results {
        for (unit, tally) in result? {
            tallies[unit] = Some(tally);
        }
    }
    Ok(tallies.into_iter().map(|t| t.expect("every unit is taken by a job")).collect())
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use crate::options::{SweepArgs, SweepWorkload, ThirdWindow, UserPairs};
    use crate::progress::Progress;
    use crate::sweep::user::tests::stand_in_sweep;
    use crate::sweep::{Summary, sweep};
    use crate::target::Target;

    /// `summary` as JSON, without what depends on the number of jobs: its seconds, and the
    /// runs of units stopped after the first finding.
    fn comparable(summary: &Summary) -> Value {
        let mut json = serde_json::to_value(summary).unwrap();
        json["seconds"] = Value::Null;
        json["runs_after_first"] = Value::Null;
        if let Some(first) = json["first_finding"].as_array_mut() {
            first[1] = Value::Null;
        }
        for part in json["parts"].as_array_mut().unwrap() {
            part["seconds"] = Value::Null;
        }
        json
    }

    /// The stand-in user sweep (its units: 11 places' singles and 5 first NMIs' pairs, 1,800
    /// runs on the fast mode) to its end, on a variant it kills in 3 runs (not `naive`, which
    /// fails 1,000, each re-run on the stepped engine: 7 times as long) and on one it does
    /// not kill.
    #[test]
    fn kvm_a_sweep_gives_the_same_summary_with_one_job_and_two() {
        for variant in ["no-stack-check", "linux"] {
            let Some(one) = stand_in_sweep(variant, false, 1) else { return };
            let two = stand_in_sweep(variant, false, 2).unwrap();
            assert!(one.parts[0].complete && one.runs > 1000, "{one:?}");
            assert_eq!(one.findings.is_empty(), variant == "linux", "{:?}", one.findings);
            assert_eq!(comparable(&one), comparable(&two), "{variant}");
        }
    }

    /// The loop sweep's units are handed out biggest first, so a second job starts on a later
    /// unit than the first; with `--stop-on-first`, both still stop where one job stops: at
    /// the first unit's first run, for `naive`.
    #[test]
    fn kvm_stop_on_first_stops_where_one_job_stops() {
        if std::env::var_os("NMIFUZZ_SKIP_KVM_TESTS").is_some_and(|v| v == "1") {
            return;
        }
        let mut target = Target::new().unwrap();
        let summary = |target: &mut Target, jobs| {
            let args = SweepArgs {
                variant: "naive".into(),
                placements: 1,
                third_window: ThirdWindow::Within(8),
                workload_iterations: 20,
                workload: SweepWorkload::Both,
                user_iterations: 1,
                user_pairs: UserPairs::Gaps,
                stop_on_first: true,
                jobs,
                json: true,
            };
            sweep(target, &args, None, &Progress::new(0, "runs", false)).unwrap()
        };
        let one = summary(&mut target, 1);
        let two = summary(&mut target, 2);
        assert_eq!(one.first_finding.map(|f| f.0), Some(1), "{one:?}");
        assert_eq!((one.parts.len(), one.runs, one.complete), (1, 1, false), "{one:?}");
        assert_eq!(comparable(&one), comparable(&two));
    }
}
