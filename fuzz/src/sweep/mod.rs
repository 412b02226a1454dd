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
//!
//! `--jobs N` sweeps N units of a workload's sweep at a time, each job on a VM of its own
//! ([`jobs`]); the summary is the same whatever N is, but for its seconds.

mod jobs;
mod nested;
mod user;

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::Result;
pub use jobs::{Shared, Sweeper, Tally};
use serde::Serialize;
use vmm::engine::schedule::{Schedule, Workload};

use crate::options::{SweepArgs, SweepWorkload, UserPairs};
use crate::progress::Progress;
use crate::ring3::Region;
use crate::target::Target;

/// The summary, also the `--json` object. Whatever `--jobs` is, it is the same but for its
/// seconds (the jobs' units are merged in unit order, see [`jobs`]).
#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub variant: String,
    pub runs: u64,
    pub seconds: f64,
    /// Whether every planned run was made (not cut by a deadline or the first finding).
    pub complete: bool,
    /// The first failing run in the sweep's order: the runs up to and including it in that
    /// order, and the seconds from the start of the sweep until a job made it. With one job
    /// that is the first failing run made; with several, the runs are still counted in the
    /// sweep's order (a single job's count, not the runs all jobs had made by then), and
    /// another job may have failed a run of a later unit earlier.
    pub first_finding: Option<(u64, f64)>,
    /// With `--stop-on-first` and several jobs: runs the other jobs made in units after the
    /// first finding's before they stopped. They are left out of `runs` and `findings`, which
    /// a single job would never have made.
    pub runs_after_first: u64,
    /// Each workload's sweep, in the order they ran.
    pub parts: Vec<Part>,
    /// Findings per verdict signature, with the first verdict and schedule of each.
    pub findings: BTreeMap<String, Finding>,
}

/// The sweep of one workload (and the counters of one unit of it, see [`Tally`]).
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
    /// Runs with two NMIs.
    pub pairs: u64,
    /// The loop sweep: runs with three NMIs.
    pub triples: u64,
    /// The user sweep: second NMIs per region they struck.
    pub seconds_by_region: BTreeMap<Region, u64>,
}

impl Part {
    /// Adds the runs and counters of `unit`, one of this part's units, after those already
    /// added.
    fn add(&mut self, unit: Part) {
        self.runs += unit.runs;
        self.complete &= unit.complete;
        self.handling_lengths.extend(unit.handling_lengths);
        for (region, n) in unit.places {
            *self.places.entry(region).or_default() += n;
        }
        self.unplaced += unit.unplaced;
        self.singles += unit.singles;
        self.pairs += unit.pairs;
        self.triples += unit.triples;
        for (region, n) in unit.seconds_by_region {
            *self.seconds_by_region.entry(region).or_default() += n;
        }
    }
}

/// One distinct finding of a sweep.
#[derive(Debug, Serialize)]
pub struct Finding {
    pub kind: &'static str,
    pub message: String,
    pub count: u64,
    pub example: Schedule,
}

impl Summary {
    /// Adds the tallies of the units of the part under way (the last one), in unit order: the
    /// order a single job sweeps them in. With `stop_on_first`, the units after the first one
    /// with a finding are left out, and so is everything after that first finding.
    pub fn merge(&mut self, tallies: Vec<Tally>, stop_on_first: bool) {
        for tally in tallies {
            if stop_on_first && self.first_finding.is_some() {
                self.runs_after_first += tally.part.runs;
                self.part().complete = false;
                continue;
            }
            if let Some((runs, seconds)) = tally.first_finding {
                self.first_finding.get_or_insert((self.runs + runs, seconds));
            }
            self.runs += tally.part.runs;
            self.part().add(tally.part);
            for (signature, finding) in tally.findings {
                self.findings
                    .entry(signature)
                    .and_modify(|f| f.count += finding.count)
                    .or_insert(finding);
            }
        }
    }

    /// The sweep of the workload under way.
    fn part(&mut self) -> &mut Part {
        self.parts.last_mut().expect("a part is pushed before it is swept")
    }
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

/// The sweep itself, on `target` and `args.jobs - 1` more VMs, until its end, the first
/// finding (`args.stop_on_first`) or `deadline`. With both workloads and a deadline, the loop
/// sweep has at most half the time.
pub fn sweep(
    target: &mut Target,
    args: &SweepArgs,
    deadline: Option<Instant>,
    progress: &Progress,
) -> Result<Summary> {
    let start = Instant::now();
    let mut summary = Summary { variant: args.variant.clone(), ..Summary::default() };
    let workloads = match args.workload {
        SweepWorkload::Loop => vec![Workload::Loop],
        SweepWorkload::User => vec![Workload::User],
        SweepWorkload::Both => vec![Workload::Loop, Workload::User],
    };
    for (k, workload) in workloads.iter().enumerate() {
        if args.stop_on_first && summary.first_finding.is_some() {
            break;
        }
        let part_start = Instant::now();
        summary.parts.push(Part { workload: workload.name(), complete: true, ..Part::default() });
        let part_deadline = match deadline {
            Some(d) if k + 1 < workloads.len() => {
                Some(part_start + d.saturating_duration_since(part_start) / 2)
            }
            other => other,
        };
        let shared = Shared::new(args.jobs, progress, start, part_deadline, args.stop_on_first)
            .announced(summary.findings.keys().cloned());
        let part = summary.part();
        let tallies = match workload {
            Workload::Loop => nested::sweep(target, &shared, part, args)?,
            Workload::User => {
                let regions = target.regions(&args.variant)?;
                if !regions.has_user_points() {
                    let why = "the guest has no user workload (no ring-3 points)";
                    if args.workload == SweepWorkload::User {
                        anyhow::bail!("cannot sweep the user workload: {why}");
                    }
                    part.skipped = Some(why.into());
                    part.complete = false;
                    Vec::new()
                } else {
                    let plan = user::Plan {
                        variant: &args.variant,
                        workload: Workload::User,
                        iterations: args.user_iterations,
                        regions: &regions,
                        pairs_in_gaps: args.user_pairs == UserPairs::Gaps,
                    };
                    user::sweep(target, &shared, part, &plan)?
                }
            }
        };
        summary.merge(tallies, args.stop_on_first);
        summary.part().seconds = part_start.elapsed().as_secs_f64();
    }
    summary.complete = summary.parts.iter().all(|p| p.complete || p.skipped.is_some());
    summary.seconds = start.elapsed().as_secs_f64();
    Ok(summary)
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
        } else {
            print!("; {} paired and {} tripled runs", part.pairs, part.triples);
        }
        println!();
    }
    if summary.runs_after_first > 0 {
        println!(
            "  (and {} runs of other jobs after the first finding, not counted)",
            summary.runs_after_first
        );
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
