//! `nmifuzz chaos`: a soak of the most hostile inputs the guest can be given (see [`inputs`]),
//! to show that nothing a guest does can break the VMM.
//!
//! Every execution must end in a verdict. Two things count against the VMM:
//! - **VMM errors**: the engine returned an `Err` instead of a verdict, or a plain reproducer,
//!   replayed after every [`SANITY_EVERY`] chaos runs, no longer gives the verdict, instruction
//!   count and trace hash it gave on the fresh VM (so the VM did not stay usable);
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
//! Resident memory is reported whole and, apart, for guest memory: a chaos guest touches pages
//! of its 16 MiB it never touched before (scribbled page tables, runs through data), and each
//! stays resident. That growth is bounded by the guest's size and is no leak of the VMM.

mod inputs;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nmifuzz_abi::{SCRIPT_ACTION_SLOTS, Variant};
use serde::Serialize;
use vmm::Verdict;
use vmm::engine::schedule::{Plan, Schedule};
use vmm::engine::{Execution, RunOptions};

use self::inputs::{Inputs, Kind};
use crate::options::ChaosArgs;
use crate::progress::Progress;
use crate::target::{Target, run_options};

/// Chaos runs between two replays of the plain reproducer.
pub const SANITY_EVERY: u64 = 1_000;
/// How late after its wall-clock limit an execution may return before it counts as a hang.
const OVERRUN_GRACE: Duration = Duration::from_secs(1);
/// Most VMM errors and hangs kept with their details in the summary.
const DETAILS_KEPT: usize = 10;

/// The plain reproducer for `naive`: a nested NMI it dies of, always the same way.
const NAIVE_REPRODUCER: &str = include_str!("../../../corpus/naive.json");
/// The plain reproducer for every other variant: one NMI that every entry survives.
const PLAIN_REPRODUCER: &str = include_str!("../../../corpus/single-nmi-in-workload.json");

/// What `--json` prints.
#[derive(Debug, Default, Serialize)]
struct Summary {
    variant: String,
    seed: u64,
    runs: u64,
    /// Executions per verdict kind.
    verdicts: BTreeMap<&'static str, u64>,
    /// The first message of each verdict kind, to see what the guest did.
    examples: BTreeMap<&'static str, String>,
    /// Executions per input kind.
    inputs: BTreeMap<&'static str, u64>,
    /// Seconds spent per input kind.
    input_secs: BTreeMap<&'static str, f64>,
    /// The longest execution that ended before the watchdog, in milliseconds.
    slowest_verdict_ms: f64,
    vmm_errors: u64,
    /// Executions that returned more than [`OVERRUN_GRACE`] after their limit.
    hangs: u64,
    /// Executions the watchdog ended with a `timeout` verdict.
    timeouts: u64,
    sanity_replays: u64,
    /// The first VMM errors and hangs: run number, input kind and what happened.
    details: Vec<String>,
    /// The first timeouts, likewise.
    timeout_details: Vec<String>,
    /// This process's resident memory (VmRSS) before the first and after the last run.
    rss_start_kib: u64,
    rss_end_kib: u64,
    /// Of it, guest memory: pages the guest has touched, bounded by its size (16 MiB).
    guest_ram_rss_start_kib: u64,
    guest_ram_rss_end_kib: u64,
    elapsed_secs: f64,
    runs_per_sec: f64,
}

/// Runs the soak; returns whether it failed (a VMM error or a hang).
pub fn run(args: &ChaosArgs) -> Result<bool> {
    let variant = Variant::from_name(&args.variant).expect("checked by the option parser");
    let mut target = Target::new()?;
    let options = RunOptions { mode: args.engine.mode(), ..run_options(args.timeout_ms) };
    let limit = options.limits.wall;
    let sanity = Sanity::new(&mut target, variant)?;
    let image = target.vm().image().clone();
    let guest_ram = target.vm().ram().host_address();
    let mut inputs = Inputs::new(args.seed, variant, &image);
    let mut summary = Summary {
        variant: args.variant.clone(),
        seed: args.seed,
        rss_start_kib: rss_kib(),
        guest_ram_rss_start_kib: mapping_rss_kib(guest_ram),
        ..Summary::default()
    };
    let progress = Progress::new(args.runs, "runs", !args.json);
    let start = Instant::now();
    for run in 1..=args.runs {
        let (kind, plan) = inputs.next();
        *summary.inputs.entry(kind_name(kind)).or_default() += 1;
        let began = Instant::now();
        let result = target.execute_plan(&plan, &options);
        summary.record(run, kind, &plan, result, began.elapsed(), limit);
        if run % SANITY_EVERY == 0 {
            summary.sanity_replays += 1;
            if let Err(problem) = sanity.check(&mut target) {
                summary.vmm_errors += 1;
                summary.details.push(format!("after run {run}: {problem}"));
            }
            progress.note(&summary.progress_line(start.elapsed(), guest_ram));
        }
        progress.inc(1);
    }
    progress.finish();
    summary.rss_end_kib = rss_kib();
    summary.guest_ram_rss_end_kib = mapping_rss_kib(guest_ram);
    summary.elapsed_secs = start.elapsed().as_secs_f64();
    summary.runs_per_sec = summary.runs as f64 / summary.elapsed_secs.max(1e-9);
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        summary.print();
    }
    Ok(summary.vmm_errors > 0 || summary.hangs > 0)
}

impl Summary {
    /// Counts the result of chaos run number `run`, which took `took` with a wall-clock
    /// `limit`.
    fn record(
        &mut self,
        run: u64,
        kind: Kind,
        plan: &Plan,
        result: Result<Execution>,
        took: Duration,
        limit: Duration,
    ) {
        self.runs += 1;
        *self.input_secs.entry(kind_name(kind)).or_default() += took.as_secs_f64();
        let execution = match result {
            Ok(execution) => execution,
            Err(e) => {
                self.vmm_errors += 1;
                let detail = describe(run, kind, plan, &format!("VMM error: {e:#}"));
                keep(&mut self.details, detail);
                return;
            }
        };
        let verdict = &execution.outcome.verdict;
        *self.verdicts.entry(verdict.kind()).or_default() += 1;
        self.examples.entry(verdict.kind()).or_insert_with(|| verdict.to_string());
        if matches!(verdict, Verdict::Timeout { .. }) {
            self.timeouts += 1;
            keep(&mut self.timeout_details, describe(run, kind, plan, &verdict.to_string()));
        } else {
            self.slowest_verdict_ms = self.slowest_verdict_ms.max(took.as_secs_f64() * 1e3);
        }
        if took > limit + OVERRUN_GRACE {
            self.hangs += 1;
            keep(&mut self.details, describe(run, kind, plan, &format!("hang: took {took:?}")));
        }
    }

    fn progress_line(&self, elapsed: Duration, guest_ram: u64) -> String {
        format!(
            "#{} runs  {:.0} runs/s  vmm_errors: {}  hangs: {}  timeouts: {}  rss: {} KiB (guest \
             memory {} KiB)  verdicts: {}",
            self.runs,
            self.runs as f64 / elapsed.as_secs_f64().max(1e-9),
            self.vmm_errors,
            self.hangs,
            self.timeouts,
            rss_kib(),
            mapping_rss_kib(guest_ram),
            counts(&self.verdicts)
        )
    }

    fn print(&self) {
        println!("chaos: {} runs on `{}`, seed {}", self.runs, self.variant, self.seed);
        println!("  inputs:     {}", counts(&self.inputs));
        println!("  verdicts:   {}", counts(&self.verdicts));
        println!("  VMM errors: {}", self.vmm_errors);
        println!("  hangs:      {} (executions the watchdog did not end in time)", self.hangs);
        println!("  timeouts:   {} (guests the watchdog stopped)", self.timeouts);
        println!("  sanity replays: {} of the plain reproducer", self.sanity_replays);
        println!(
            "  RSS:        {} KiB at start, {} KiB at the end; of it guest memory {} KiB, {} KiB",
            self.rss_start_kib,
            self.rss_end_kib,
            self.guest_ram_rss_start_kib,
            self.guest_ram_rss_end_kib
        );
        println!("  time:       {:.1} s, {:.0} runs/s", self.elapsed_secs, self.runs_per_sec);
        let secs = self.input_secs.iter().map(|(k, s)| format!("{k}: {s:.1} s"));
        println!("  time per input kind: {}", secs.collect::<Vec<_>>().join(", "));
        println!("  slowest run before the watchdog: {:.0} ms", self.slowest_verdict_ms);
        for (kind, example) in &self.examples {
            println!("  e.g. {kind}: {example}");
        }
        for detail in self.details.iter().chain(&self.timeout_details) {
            println!("  {detail}");
        }
    }
}

/// The plain reproducer and what it gave on the fresh VM.
struct Sanity {
    schedule: Schedule,
    expected: Execution,
}

impl Sanity {
    /// Runs the reproducer for `variant` once to learn its usual result.
    fn new(target: &mut Target, variant: Variant) -> Result<Self> {
        let (json, name) = if variant == Variant::NAIVE {
            (NAIVE_REPRODUCER, "corpus/naive.json")
        } else {
            (PLAIN_REPRODUCER, "corpus/single-nmi-in-workload.json")
        };
        let mut schedule = Schedule::from_json(json.as_bytes(), name.as_ref())?;
        schedule.variant = variant.name().to_owned();
        let expected = target
            .execute(&schedule, &run_options(crate::options::DEFAULT_TIMEOUT_MS), &mut [])
            .with_context(|| format!("the plain reproducer {name} does not run"))?;
        Ok(Self { schedule, expected })
    }

    /// Replays the reproducer; an error says how the result differs from the usual one.
    fn check(&self, target: &mut Target) -> Result<(), String> {
        let options = run_options(crate::options::DEFAULT_TIMEOUT_MS);
        let got = target
            .execute(&self.schedule, &options, &mut [])
            .map_err(|e| format!("the plain reproducer fails to run: {e:#}"))?;
        let (want, got) = (&self.expected, &got);
        if got.outcome.verdict != want.outcome.verdict
            || got.instructions != want.instructions
            || got.trace_hash != want.trace_hash
        {
            return Err(format!(
                "the plain reproducer gave `{}` ({} instructions, trace {:016x}) instead of `{}` \
                 ({} instructions, trace {:016x})",
                got.outcome.verdict,
                got.instructions,
                got.trace_hash,
                want.outcome.verdict,
                want.instructions,
                want.trace_hash
            ));
        }
        Ok(())
    }
}

/// One line on chaos run number `run` and what happened to it.
fn describe(run: u64, kind: Kind, plan: &Plan, what: &str) -> String {
    let script = &plan.script;
    let actions = &script.actions[..(script.action_count as usize).min(SCRIPT_ACTION_SLOTS)];
    format!(
        "run {run} ({}: {} injections; script variant {}, workload {} arg {}, actions (busy, \
         faults, scribble area) {:?}): {what}",
        kind_name(kind),
        plan.injections.len(),
        script.variant,
        script.workload,
        script.workload_arg,
        actions.iter().map(|a| (a.busy, a.faults, a.scribble.area)).collect::<Vec<_>>()
    )
}

/// Appends `detail` to `details` unless [`DETAILS_KEPT`] are already there.
fn keep(details: &mut Vec<String>, detail: String) {
    if details.len() < DETAILS_KEPT {
        details.push(detail);
    }
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::RawScript => "raw-script",
        Kind::Limits => "limits",
        Kind::Scribble => "scribble",
    }
}

/// `name: count` pairs, comma-separated.
fn counts(map: &BTreeMap<&'static str, u64>) -> String {
    map.iter().map(|(name, count)| format!("{name}: {count}")).collect::<Vec<_>>().join(", ")
}

/// The resident part of the mapping that starts at `address` in this process, in KiB, from
/// /proc/self/smaps (0 if unreadable).
fn mapping_rss_kib(address: u64) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    let start = format!("{address:x}-");
    smaps
        .lines()
        .skip_while(|line| !line.starts_with(&start))
        .find_map(|line| line.strip_prefix("Rss:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// This process's resident set size in KiB, from /proc/self/status (0 if unreadable).
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
