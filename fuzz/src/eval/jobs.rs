//! One evaluation run (`nmifuzz eval-job`), in its own process: a campaign, a random-timing
//! baseline or a sweep, on one variant with one seed and a time limit. Prints a [`JobResult`].

use std::time::Instant;

use anyhow::Result;
use libafl_bolts::rands::StdRand;
use vmm::engine::schedule::{Fault, Schedule};

use super::{JobResult, Method};
use crate::campaign::Config;
use crate::executor::Limits;
use crate::input::ScheduleGenerator;
use crate::launch::{self, Clients, Setup};
use crate::options::DEFAULT_TIMEOUT_MS;
use crate::options::{EvalJobArgs, SweepArgs, SweepWorkload, ThirdWindow, UserPairs};
use crate::progress::Progress;
use crate::sweep;
use crate::target::{self, Target};

/// Runs the job and prints its result as one JSON line.
pub fn run_job(args: &EvalJobArgs) -> Result<()> {
    let result = match args.method {
        Method::Sweep => sweep_job(args)?,
        Method::Random => random_job(args)?,
        Method::Campaign => campaign_job(args)?,
    };
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}

/// The sweep, stopping at its first finding or at the limit: the loop sweep with at most half
/// of it, then the user sweep (which the variants of the user-mode half need).
fn sweep_job(args: &EvalJobArgs) -> Result<JobResult> {
    let mut target = Target::new()?;
    let sweep_args = SweepArgs {
        variant: args.variant.clone(),
        placements: 1,
        third_window: ThirdWindow::Within(if args.quick { 2 } else { 8 }),
        workload_iterations: 20,
        workload: SweepWorkload::Both,
        user_iterations: 1,
        user_pairs: UserPairs::Gaps,
        stop_on_first: true,
        // One core per eval job: the eval runs jobs side by side.
        jobs: 1,
        json: true,
    };
    let start = Instant::now();
    let deadline = start + super::limit(args);
    let summary =
        sweep::sweep(&mut target, &sweep_args, Some(deadline), &Progress::new(0, "runs", false))?;
    let (execs_to_first, seconds_to_first) =
        summary.first_finding.unwrap_or((summary.runs, args.time_limit as f64));
    Ok(JobResult {
        method: Method::Sweep,
        variant: args.variant.clone(),
        seed: args.seed,
        found: summary.first_finding.is_some(),
        seconds_to_first,
        execs_to_first,
        execs: summary.runs,
        seconds: summary.seconds,
        message: summary.findings.values().next().map(|f| f.message.clone()),
        example: summary.findings.into_values().next().map(|f| f.example),
    })
}

/// The random-timing baseline: schedules from the campaign's own generator (the same number
/// of NMIs, the same points, random handler actions), executed by the same engine (the fast
/// mode) with the same per-execution options, without feedback, until a finding or the limit.
/// The campaign's default engine, as `nmifuzz run` uses it: campaign and random baseline run on
/// the same one, so the comparison is about search alone.
fn fast_options() -> vmm::engine::RunOptions {
    vmm::engine::RunOptions {
        mode: vmm::engine::Mode::Fast,
        ..target::run_options(DEFAULT_TIMEOUT_MS)
    }
}

fn random_job(args: &EvalJobArgs) -> Result<JobResult> {
    let mut target = Target::new()?;
    let table = std::sync::Arc::new(target.points(&args.variant)?);
    let generator = ScheduleGenerator::new(&args.variant, Fault::ALL, &table);
    let mut rand = StdRand::with_seed(args.seed);
    let options = fast_options();
    let start = Instant::now();
    let deadline = start + super::limit(args);
    let (mut execs, mut first) = (0, None);
    while Instant::now() < deadline {
        let schedule = generator.schedule(&mut rand);
        let execution = target.execute(&schedule, &options, &mut [])?;
        execs += 1;
        if execution.outcome.verdict.is_finding() {
            let message = execution.outcome.verdict.to_string();
            first = Some((start.elapsed().as_secs_f64(), message, schedule));
            break;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(JobResult {
        method: Method::Random,
        variant: args.variant.clone(),
        seed: args.seed,
        found: first.is_some(),
        seconds_to_first: first.as_ref().map_or(args.time_limit as f64, |f| f.0),
        execs_to_first: execs,
        execs,
        seconds,
        message: first.as_ref().map(|f| f.1.clone()),
        example: first.map(|f| f.2),
    })
}

/// The LibAFL campaign from an empty corpus, on one core, stopping at its first crash.
fn campaign_job(args: &EvalJobArgs) -> Result<JobResult> {
    let artifacts = std::env::temp_dir().join(format!(
        "nmifuzz-eval-{}-{}-{}",
        args.variant,
        args.seed,
        std::process::id()
    ));
    let limits = Limits {
        start: Instant::now(),
        max_time: Some(super::limit(args)),
        max_runs: None,
        stop_on_crash: true,
    };
    let config = Config {
        variant: args.variant.clone(),
        seeds: Vec::new(),
        corpus_dir: None,
        artifacts: artifacts.clone(),
        faults: Fault::ALL.to_vec(),
        seed: args.seed,
        options: fast_options(),
        limits,
    };
    let report = launch::run_campaign(Setup { config, clients: Clients::Single })?;
    let result = JobResult {
        method: Method::Campaign,
        variant: args.variant.clone(),
        seed: args.seed,
        found: report.crashes > 0,
        seconds_to_first: report.first_crash_secs.unwrap_or(args.time_limit as f64),
        execs_to_first: report.executions,
        execs: report.executions,
        seconds: report.elapsed_secs,
        message: report.artifacts.first().map(|(_, verdict)| verdict.clone()),
        example: report.artifacts.first().and_then(|(path, _)| Schedule::load(path).ok()),
    };
    let _ = std::fs::remove_dir_all(&artifacts);
    Ok(result)
}
