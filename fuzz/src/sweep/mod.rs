//! `nmifuzz sweep`: bounded exhaustive enumerations of NMI placements, one per workload.
//!
//! - **The loop sweep** ([`nested`]): a first NMI in the ring-0 workload loop, a second at
//!   every instruction boundary of its handling, a third in a window after a nested second.
//! - **The user sweep** ([`user`]): a single NMI at every boundary of the two SYSCALL gaps and
//!   of the return to user (espfix64 and the final IRETQ included) and at every ring-3 point
//!   of the user workload, with each handler action; and after each first NMI at a ring-3
//!   point or in a gap, a second at every boundary of its handling (the entry's user path
//!   included).
//!
//! `--workload loop` or `--workload user` runs one of them; the default, `both`, runs the loop
//! sweep and then the user sweep, which it leaves out (saying so) on a guest without the user
//! workload. A correct entry passes every run; a broken one must fail at least one.

mod nested;
mod user;

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::Result;
use serde::Serialize;
use vmm::engine::Execution;
use vmm::engine::schedule::{Schedule, Workload};

use crate::options::{SweepArgs, SweepWorkload, UserPairs};
use crate::progress::Progress;
use crate::ring3::Region;
use crate::target::Target;

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
    /// Each workload's sweep, in the order they ran.
    pub parts: Vec<Part>,
    /// Findings per verdict signature, with the first verdict and schedule of each.
    pub findings: BTreeMap<String, Finding>,
}

/// The sweep of one workload.
#[derive(Debug, Default, Serialize)]
pub struct Part {
    /// `loop` or `user`.
    pub workload: &'static str,
    pub runs: u64,
    pub seconds: f64,
    pub complete: bool,
    /// Why this workload was not swept.
    pub skipped: Option<String>,
    /// Instructions of each measured first NMI's handling.
    pub handling_lengths: Vec<u64>,
    /// The user sweep: stops of the measured run without NMIs in each region, where single
    /// NMIs go.
    pub places: BTreeMap<Region, u64>,
    /// The user sweep: stops of a region where stepping found no symbolic point.
    pub unplaced: u64,
    /// The user sweep: runs with one NMI.
    pub singles: u64,
    /// The user sweep: runs with two NMIs.
    pub pairs: u64,
    /// The user sweep: second NMIs per region they struck.
    pub seconds_by_region: BTreeMap<Region, u64>,
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
    let progress = Progress::new(0, "runs", !args.json);
    let summary = sweep(&mut target, args, None, &progress)?;
    progress.finish();
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print_summary(&summary);
    }
    Ok(!summary.findings.is_empty())
}

/// The sweep itself, until its end, the first finding (`args.stop_on_first`) or `deadline`.
/// With both workloads and a deadline, the loop sweep has at most half the time.
pub fn sweep(
    target: &mut Target,
    args: &SweepArgs,
    deadline: Option<Instant>,
    progress: &Progress,
) -> Result<Summary> {
    let start = Instant::now();
    let summary = Summary { variant: args.variant.clone(), ..Summary::default() };
    let mut sweeper = Sweeper {
        target,
        summary,
        progress,
        start,
        deadline,
        stop_on_first: args.stop_on_first,
        stopped: false,
    };
    let workloads = match args.workload {
        SweepWorkload::Loop => vec![Workload::Loop],
        SweepWorkload::User => vec![Workload::User],
        SweepWorkload::Both => vec![Workload::Loop, Workload::User],
    };
    for (k, workload) in workloads.iter().enumerate() {
        if sweeper.stopped {
            break;
        }
        let part_start = Instant::now();
        sweeper.summary.parts.push(Part {
            workload: workload.name(),
            complete: true,
            ..Part::default()
        });
        sweeper.deadline = match deadline {
            Some(d) if k + 1 < workloads.len() => {
                Some(part_start + d.saturating_duration_since(part_start) / 2)
            }
            other => other,
        };
        match workload {
            Workload::Loop => nested::sweep(&mut sweeper, args)?,
            Workload::User => {
                let regions = sweeper.target.regions(&args.variant)?;
                if !regions.has_user_points() {
                    let why = "the guest has no user workload (no ring-3 points)";
                    if args.workload == SweepWorkload::User {
                        anyhow::bail!("cannot sweep the user workload: {why}");
                    }
                    let part = sweeper.part();
                    part.skipped = Some(why.into());
                    part.complete = false;
                } else {
                    let plan = user::Plan {
                        variant: &args.variant,
                        workload: Workload::User,
                        iterations: args.user_iterations,
                        regions: &regions,
                        pairs_in_gaps: args.user_pairs == UserPairs::Gaps,
                    };
                    user::sweep(&mut sweeper, &plan)?;
                }
            }
        }
        sweeper.part().seconds = part_start.elapsed().as_secs_f64();
    }
    let mut summary = sweeper.summary;
    summary.complete = summary.parts.iter().all(|p| p.complete || p.skipped.is_some());
    summary.seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}

/// What the sweeps share while they run: the target, the summary they add to, and when to
/// stop.
pub struct Sweeper<'a> {
    target: &'a mut Target,
    summary: Summary,
    progress: &'a Progress,
    start: Instant,
    deadline: Option<Instant>,
    stop_on_first: bool,
    /// Set by the first finding with `stop_on_first`.
    stopped: bool,
}

impl Sweeper<'_> {
    /// The sweep of the workload under way.
    fn part(&mut self) -> &mut Part {
        self.summary.parts.last_mut().expect("a part is pushed before it is swept")
    }

    /// Whether the next run may go: not after the first finding (with `stop_on_first`) nor
    /// past the deadline. A run that may not go leaves the part incomplete.
    fn go(&mut self) -> bool {
        if self.stopped || self.deadline.is_some_and(|d| Instant::now() >= d) {
            self.part().complete = false;
            return false;
        }
        true
    }

    /// Counts one run; returns whether it was a finding (and stops the sweep at the first one
    /// with `stop_on_first`).
    fn record(&mut self, execution: &Execution, schedule: Schedule) -> bool {
        self.summary.runs += 1;
        self.part().runs += 1;
        self.progress.inc(1);
        let verdict = &execution.outcome.verdict;
        if !verdict.is_finding() {
            return false;
        }
        let (runs, elapsed) = (self.summary.runs, self.start.elapsed().as_secs_f64());
        self.summary.first_finding.get_or_insert((runs, elapsed));
        let progress = self.progress;
        let entry = self.summary.findings.entry(verdict.signature()).or_insert_with(|| {
            progress.note(&format!("found: {verdict}"));
            Finding {
                kind: verdict.kind(),
                message: verdict.to_string(),
                count: 0,
                example: schedule,
            }
        });
        entry.count += 1;
        progress.set_message(format!("{} findings", self.summary.findings.len()));
        if self.stop_on_first {
            self.stopped = true;
        }
        true
    }
}

fn print_summary(summary: &Summary) {
    println!(
        "sweep of variant {}: {} runs{} in {:.1} s",
        summary.variant,
        summary.runs,
        if summary.complete { "" } else { " (stopped early)" },
        summary.seconds,
    );
    for part in &summary.parts {
        let lengths = &part.handling_lengths;
        print!("  {} workload: ", part.workload);
        if let Some(why) = &part.skipped {
            println!("not swept: {why}");
            continue;
        }
        print!(
            "{} runs{} in {:.1} s; first-NMI handling {}..{} instructions",
            part.runs,
            if part.complete { "" } else { " (stopped early)" },
            part.seconds,
            lengths.iter().min().unwrap_or(&0),
            lengths.iter().max().unwrap_or(&0)
        );
        if part.workload == Workload::User.name() {
            let regions = |counts: &BTreeMap<Region, u64>| {
                counts.iter().map(|(r, n)| format!("{} {n}", r.name())).collect::<Vec<_>>()
            };
            print!(
                "; {} single and {} paired runs; single NMIs at {}; second NMIs in {}",
                part.singles,
                part.pairs,
                regions(&part.places).join(", "),
                regions(&part.seconds_by_region).join(", "),
            );
            if part.unplaced > 0 {
                print!("; {} stops had no symbolic point", part.unplaced);
            }
        }
        println!();
    }
    if summary.findings.is_empty() {
        println!("no findings");
    }
    for (signature, finding) in &summary.findings {
        println!("{} x {signature}", finding.count);
        println!("  first: {}", finding.message);
        println!("  example: {}", serde_json::to_string(&finding.example).unwrap_or_default());
    }
}
