//! `nmifuzz chaos`: a soak of the most hostile inputs the guest can be given (see [`inputs`]),
//! to show that nothing a guest does can break the VMM.
//!
//! Every execution must end in a verdict. Two things count against the VMM:
//! - **VMM errors**: the engine returned an `Err` instead of a verdict, or a plain reproducer,
//!   replayed after every [`SANITY_EVERY`] chaos runs on the stepped engine and on the soak's
//!   own, no longer gives the verdict, instruction count and trace hash it gave on the fresh VM
//!   (so the VM did not stay usable);
//! - **hangs**: executions the VMM did not end in time, returning more than [`OVERRUN_GRACE`]
//!   after their wall-clock limit: the watchdog failed to stop the guest.
//!
//! A `timeout` verdict is neither: the watchdog stopped a guest that would not stop by itself,
//! which is the VMM doing its job. Chaos asks for nothing that runs that long on purpose, but a
//! scribbled GDT or IDT can leave the guest in an endless exception loop (a #DF whose handler
//! faults again restarts IST2 for ever) that no VMM can end otherwise, and a garbled script can
//! ask for millions of workload iterations. Timeouts are counted apart
//! (`timeouts`, and `timeout` among the verdicts), with their details.
//!
//! The exit status is 0 without VMM errors and hangs, 1 otherwise.
//!
//! Resident memory is reported whole and, apart, for guest memory. The VMM makes all of guest
//! memory resident when it maps it, 16 MiB a VM whatever the guest touches, so any growth of
//! the whole is the VMM's own.
//!
//! A soak can be longer than one sitting: with `--checkpoint FILE` it is stopped and resumed
//! (see [`checkpoint`]), each process being one [`Segment`] of it. With `--jobs N` it runs on
//! N VMs at a time, to the same summary (see [`jobs`]).

mod checkpoint;
mod inputs;
mod jobs;
mod summary;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nmifuzz_abi::Variant;
use vmm::engine::schedule::Schedule;
use vmm::engine::{Execution, Mode, RunOptions};

use self::checkpoint::Soak;
use self::summary::Summary;
use crate::options::ChaosArgs;
use crate::progress::Progress;
use crate::target::{Target, run_options};

/// Chaos runs between two replays of the plain reproducer.
pub const SANITY_EVERY: u64 = 1_000;

/// The plain reproducer for `naive`: a nested NMI it dies of, always the same way.
const NAIVE_REPRODUCER: &str = include_str!("../../../corpus/naive.json");
/// The plain reproducer for every other variant: one NMI that every entry survives.
const PLAIN_REPRODUCER: &str = include_str!("../../../corpus/single-nmi-in-workload.json");

/// Runs the soak; returns whether it failed (a VMM error or a hang).
pub fn run(args: &ChaosArgs) -> Result<bool> {
    let variant = Variant::from_name(&args.variant).expect("checked by the option parser");
    // Only a checkpointed soak needs to know which soak it is (hashing the executable
    // included).
    let checkpoint = match &args.checkpoint {
        Some(path) => Some((path.as_path(), Soak::of(args)?)),
        None => None,
    };
    let resumed = match &checkpoint {
        Some((path, soak)) => checkpoint::load(path, soak)?,
        None => None,
    };
    let mut summary = resumed.unwrap_or_else(|| Summary::new(&args.variant, args.seed));
    let done = summary.runs();
    if done >= args.runs {
        // A finished soak: its figures, as they were at its end.
        summary.report(args.json)?;
        return Ok(summary.failed());
    }
    // Written once before the first run, so that a checkpoint that cannot be written fails
    // the soak now rather than after its first 1,000 runs.
    if let Some((path, soak)) = &checkpoint {
        checkpoint::save(path, soak, &summary)?;
    }
    let options = RunOptions { mode: args.engine.mode(), ..run_options(args.timeout_ms) };
    let soak = jobs::Soak { seed: args.seed, variant, options, first: done + 1, last: args.runs };
    let progress = Progress::new(args.runs, "runs", !args.json);
    progress.inc(done);
    if done > 0 {
        progress.note(&format!("chaos: resuming after run {done} of {}", args.runs));
    }
    let mut recorder = Recorder {
        summary: &mut summary,
        checkpoint,
        progress: &progress,
        limit: options.limits.wall,
        last: args.runs,
        done,
        start: Instant::now(),
    };
    jobs::run(&soak, args.jobs, &mut recorder)?;
    progress.finish();
    summary.report(args.json)?;
    Ok(summary.failed())
}

/// Counts the soak's runs into its summary, in run order, and keeps its checkpoint.
struct Recorder<'a> {
    summary: &'a mut Summary,
    checkpoint: Option<(&'a Path, Soak)>,
    progress: &'a Progress,
    /// An execution's wall-clock limit.
    limit: Duration,
    /// The soak's last run.
    last: u64,
    /// The runs made before this process.
    done: u64,
    start: Instant,
}

impl jobs::Recorder for Recorder<'_> {
    fn started(&mut self, jobs: u64, guest_ram_kib: u64) {
        self.summary.start_segment(self.done + 1, jobs, guest_ram_kib);
        self.start = Instant::now();
    }

    fn record(&mut self, ran: jobs::Ran) -> Result<()> {
        let jobs::Ran { run, kind, plan, result, took, sanity } = ran;
        self.summary.record(run, kind, &plan, result, took, self.limit);
        if let Some(sanity) = sanity {
            self.summary.sanity_replayed(run, sanity);
        }
        if run.is_multiple_of(SANITY_EVERY) || run == self.last {
            self.summary.end_segment(self.start.elapsed().as_secs_f64());
            if let Some((path, soak)) = &self.checkpoint {
                checkpoint::save(path, soak, self.summary)?;
            }
            let line = self.summary.progress_line(self.start.elapsed(), self.done);
            self.progress.note(&line);
        }
        self.progress.inc(1);
        Ok(())
    }
}

/// The plain reproducer and what it gave on the fresh VM, on the stepped engine (the
/// reference) and on the soak's own, if that is another: a VM the soak broke shows in either.
struct Sanity {
    schedule: Schedule,
    expected: Vec<(RunOptions, Execution)>,
}

impl Sanity {
    /// Runs the reproducer for `variant` once per engine to learn its usual results.
    fn new(target: &mut Target, variant: Variant, soak: Mode) -> Result<Self> {
        let (json, name) = if variant == Variant::NAIVE {
            (NAIVE_REPRODUCER, "corpus/naive.json")
        } else {
            (PLAIN_REPRODUCER, "corpus/single-nmi-in-workload.json")
        };
        let mut schedule = Schedule::from_json(json.as_bytes(), name.as_ref())?;
        schedule.variant = variant.name().to_owned();
        let mut modes = vec![Mode::Stepped];
        if soak != Mode::Stepped {
            modes.push(soak);
        }
        let expected = modes
            .into_iter()
            .map(|mode| {
                let options =
                    RunOptions { mode, ..run_options(crate::options::DEFAULT_TIMEOUT_MS) };
                let execution = target
                    .execute(&schedule, &options, &mut [])
                    .with_context(|| format!("the plain reproducer {name} does not run"))?;
                Ok((options, execution))
            })
            .collect::<Result<_>>()?;
        Ok(Self { schedule, expected })
    }

    /// Replays the reproducer on each engine; an error says how a result differs from the
    /// usual one.
    fn check(&self, target: &mut Target) -> Result<(), String> {
        for (options, want) in &self.expected {
            let got = target
                .execute(&self.schedule, options, &mut [])
                .map_err(|e| format!("the plain reproducer fails to run: {e:#}"))?;
            if got.outcome.verdict != want.outcome.verdict
                || got.instructions != want.instructions
                || got.trace_hash != want.trace_hash
            {
                return Err(format!(
                    "the plain reproducer gave `{}` ({} instructions, trace {:016x}) instead of \
                     `{}` ({} instructions, trace {:016x}) on the {:?} engine",
                    got.outcome.verdict,
                    got.instructions,
                    got.trace_hash,
                    want.outcome.verdict,
                    want.instructions,
                    want.trace_hash,
                    options.mode
                ));
            }
        }
        Ok(())
    }
}
