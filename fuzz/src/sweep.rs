//! `nmifuzz sweep`: the bounded exhaustive enumeration of two and three nested NMIs.
//!
//! For each handler action and a few placements of the first NMI in the workload, the sweep
//! measures how long the first NMI's handling lasts (from its delivery until the interrupted
//! context is resumed), then puts a second NMI at every instruction boundary of that handling,
//! and for each of those a third NMI at every boundary of a smaller window after the second.
//! A correct entry passes every run; a broken one must fail at least one.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use vmm::engine::schedule::{
    Fault, HandlerAction, Injection, MAX_DELAY, SCHEDULE_FORMAT, Schedule,
};
use vmm::engine::trace::Event;
use vmm::engine::{Execution, RunOptions};

use crate::options::SweepArgs;
use crate::target::Target;

/// Where the first NMI lands: instructions after the start of the run. Spread over the
/// workload loop so that the first NMI interrupts different instructions of it.
const FIRST_PLACEMENTS: [u64; 5] = [60, 67, 75, 84, 97];

/// What the first NMI's `do_nmi` does: each fault alone, all faults together, then busy work
/// and an immediate return. The faults come first: their IRETQs are what let a second NMI in
/// while the first is handled, so that is where broken entries fail.
fn actions() -> Vec<HandlerAction> {
    let mut actions: Vec<HandlerAction> =
        Fault::ALL.iter().map(|f| HandlerAction { busy: 0, faults: vec![*f] }).collect();
    if Fault::ALL.len() > 1 {
        actions.push(HandlerAction { busy: 1, faults: Fault::ALL.to_vec() });
    }
    actions.push(HandlerAction { busy: 4, faults: vec![] });
    actions.push(HandlerAction::default());
    actions
}

/// The summary, also the `--json` object.
#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub variant: String,
    pub runs: u64,
    pub seconds: f64,
    /// Whether every planned run was made (not cut by a deadline or the first finding).
    pub complete: bool,
    /// Runs and seconds up to and including the first failing run.
    pub first_finding: Option<(u64, f64)>,
    /// Instructions of the first NMI's handling, per (action, placement).
    handling_lengths: Vec<u64>,
    /// Findings per verdict signature, with the first verdict and schedule of each.
    pub findings: BTreeMap<String, Finding>,
}

/// One distinct finding of a sweep.
#[derive(Debug, Serialize)]
pub struct Finding {
    pub kind: &'static str,
    pub message: String,
    pub count: u64,
    pub example: Schedule,
}

/// Runs the sweep as `nmifuzz sweep`; returns whether anything was found.
pub fn run(args: &SweepArgs) -> Result<bool> {
    let mut target = Target::new()?;
    let progress = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{elapsed_precise} [{wide_bar}] {pos}/{len} runs {msg}")
            .expect("a valid template"),
    );
    if args.json {
        progress.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let summary = sweep(&mut target, args, None, &progress)?;
    progress.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print_summary(&summary);
    }
    Ok(!summary.findings.is_empty())
}

/// The sweep itself, until its end, the first finding (`args.stop_on_first`) or `deadline`.
pub fn sweep(
    target: &mut Target,
    args: &SweepArgs,
    deadline: Option<Instant>,
    progress: &ProgressBar,
) -> Result<Summary> {
    let start = Instant::now();
    let mut summary =
        Summary { variant: args.variant.clone(), complete: true, ..Summary::default() };
    let placements = &FIRST_PLACEMENTS[..args.placements as usize];
    let origin = target.origin();
    'sweep: for action in actions() {
        for &first in placements {
            let schedule = |injections: Vec<Injection>| Schedule {
                format: SCHEDULE_FORMAT,
                description: format!("sweep: first NMI after {first}, do_nmi {action:?}"),
                variant: args.variant.clone(),
                workload_iterations: args.workload_iterations,
                actions: vec![action.clone()],
                injections,
                origin: Some(origin.clone()),
            };
            let measured = schedule(vec![Injection::After(first), Injection::After(MAX_DELAY)]);
            let length = handling_length(target, &measured)
                .with_context(|| format!("measuring the handling of {action:?} at {first}"))?;
            summary.handling_lengths.push(length);
            progress.inc_length((length + 2) * (1 + args.third_window));
            for second in 0..=length + 1 {
                for third in std::iter::once(None).chain((1..=args.third_window).map(Some)) {
                    let mut injections = vec![Injection::After(first), Injection::After(second)];
                    injections.extend(third.map(Injection::After));
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        summary.complete = false;
                        break 'sweep;
                    }
                    let candidate = schedule(injections);
                    let execution = target.execute(&candidate, &RunOptions::default(), &mut [])?;
                    summary.runs += 1;
                    progress.inc(1);
                    let verdict = &execution.outcome.verdict;
                    if verdict.is_finding() {
                        summary
                            .first_finding
                            .get_or_insert((summary.runs, start.elapsed().as_secs_f64()));
                        let entry =
                            summary.findings.entry(verdict.signature()).or_insert_with(|| {
                                progress.println(format!("found: {verdict}"));
                                Finding {
                                    kind: verdict.kind(),
                                    message: verdict.to_string(),
                                    count: 0,
                                    example: candidate,
                                }
                            });
                        entry.count += 1;
                        progress.set_message(format!("{} findings", summary.findings.len()));
                        if args.stop_on_first {
                            summary.complete = false;
                            break 'sweep;
                        }
                    }
                }
            }
        }
    }
    summary.seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}

/// Instructions from the first NMI's delivery until its interrupted context resumes.
fn handling_length(target: &mut Target, schedule: &Schedule) -> Result<u64> {
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

fn print_summary(summary: &Summary) {
    let lengths = &summary.handling_lengths;
    println!(
        "sweep of variant {}: {} runs{} in {:.1} s; first-NMI handling {}..{} instructions",
        summary.variant,
        summary.runs,
        if summary.complete { "" } else { " (stopped early)" },
        summary.seconds,
        lengths.iter().min().unwrap_or(&0),
        lengths.iter().max().unwrap_or(&0)
    );
    if summary.findings.is_empty() {
        println!("no findings");
    }
    for (signature, finding) in &summary.findings {
        println!("{} x {signature}", finding.count);
        println!("  first: {}", finding.message);
        println!("  example: {}", serde_json::to_string(&finding.example).unwrap_or_default());
    }
}
