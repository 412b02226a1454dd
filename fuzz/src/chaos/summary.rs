//! The soak's summary: what every run ended in, what `--json` prints, and what a checkpoint
//! keeps.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;
use nmifuzz_abi::SCRIPT_ACTION_SLOTS;
use serde::{Deserialize, Serialize};
use vmm::Verdict;
use vmm::engine::Execution;
use vmm::engine::schedule::Plan;

use super::inputs::Kind;

/// How late after its wall-clock limit an execution may return before it counts as a hang.
const OVERRUN_GRACE: Duration = Duration::from_secs(1);
/// Most VMM errors and hangs kept with their details in the summary.
const DETAILS_KEPT: usize = 10;

/// What `--json` prints, and what a checkpoint keeps.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Summary {
    variant: String,
    seed: u64,
    runs: u64,
    /// Executions per verdict kind.
    verdicts: BTreeMap<String, u64>,
    /// The first message of each verdict kind, to see what the guest did.
    examples: BTreeMap<String, String>,
    /// Executions per input kind.
    inputs: BTreeMap<String, u64>,
    /// Seconds spent per input kind.
    input_secs: BTreeMap<String, f64>,
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
    /// This process's resident memory (VmRSS) before its first and after its last run: of
    /// the last segment, when the soak was resumed.
    rss_start_kib: u64,
    rss_end_kib: u64,
    /// Of it, guest memory: every VM's, resident from boot and through the soak.
    guest_ram_kib: u64,
    /// Seconds of all segments.
    elapsed_secs: f64,
    runs_per_sec: f64,
    /// The processes that made the runs, in order: one, unless the soak was resumed.
    segments: Vec<Segment>,
}

/// The runs one process made, and its resident memory.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Segment {
    first_run: u64,
    last_run: u64,
    /// Its jobs, each with a VM.
    jobs: u64,
    rss_start_kib: u64,
    rss_end_kib: u64,
    guest_ram_kib: u64,
    elapsed_secs: f64,
}

impl Summary {
    /// The summary of a soak that has not run yet.
    pub fn new(variant: &str, seed: u64) -> Self {
        Self { variant: variant.to_owned(), seed, ..Self::default() }
    }

    /// Runs made so far.
    pub fn runs(&self) -> u64 {
        self.runs
    }

    /// Counts the replay of the plain reproducer after run `run`: a problem is a VMM error.
    pub fn sanity_replayed(&mut self, run: u64, result: Result<(), String>) {
        self.sanity_replays += 1;
        if let Err(problem) = result {
            self.vmm_errors += 1;
            self.details.push(format!("after run {run}: {problem}"));
        }
    }

    /// Opens this process's segment, which starts at run `first_run` with `jobs` VMs whose
    /// guest memory is `guest_ram_kib` in all.
    pub fn start_segment(&mut self, first_run: u64, jobs: u64, guest_ram_kib: u64) {
        self.rss_start_kib = rss_kib();
        self.guest_ram_kib = guest_ram_kib;
        self.segments.push(Segment {
            first_run,
            jobs,
            rss_start_kib: self.rss_start_kib,
            guest_ram_kib,
            ..Segment::default()
        });
    }

    /// Brings this process's segment, `segment_secs` old, and the totals up to now.
    pub fn end_segment(&mut self, segment_secs: f64) {
        self.rss_end_kib = rss_kib();
        let segment = self.segments.last_mut().expect("a segment is open");
        segment.last_run = self.runs;
        segment.rss_end_kib = self.rss_end_kib;
        segment.elapsed_secs = segment_secs;
        self.elapsed_secs = self.segments.iter().map(|s| s.elapsed_secs).sum();
        self.runs_per_sec = self.runs as f64 / self.elapsed_secs.max(1e-9);
    }

    /// Counts the result of chaos run number `run`, which took `took` with a wall-clock
    /// `limit`.
    pub fn record(
        &mut self,
        run: u64,
        kind: Kind,
        plan: &Plan,
        result: Result<Execution>,
        took: Took,
        limit: Duration,
    ) {
        let Took { wall: took, cpu } = took;
        self.runs += 1;
        *self.inputs.entry(kind_name(kind).to_owned()).or_default() += 1;
        *self.input_secs.entry(kind_name(kind).to_owned()).or_default() += took.as_secs_f64();
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
        *self.verdicts.entry(verdict.kind().to_owned()).or_default() += 1;
        self.examples.entry(verdict.kind().to_owned()).or_insert_with(|| verdict.to_string());
        if matches!(verdict, Verdict::Timeout { .. }) {
            self.timeouts += 1;
            keep(&mut self.timeout_details, describe(run, kind, plan, &verdict.to_string()));
        } else {
            self.slowest_verdict_ms = self.slowest_verdict_ms.max(took.as_secs_f64() * 1e3);
        }
        if took > limit + OVERRUN_GRACE {
            self.hangs += 1;
            // Whether the thread ran at all says whether the VMM overran or the host did not
            // run it (a loaded machine): a hang either way, told apart for whoever reads it.
            let what = format!(
                "hang: took {took:?}, of which the VMM's thread ran {cpu:?} (user and system), \
                 ending in `{}`",
                verdict.kind()
            );
            keep(&mut self.details, describe(run, kind, plan, &what));
        }
    }

    /// The line after each checkpoint: `elapsed` since this process made run `done + 1`.
    pub fn progress_line(&self, elapsed: Duration, done: u64) -> String {
        format!(
            "#{} runs  {:.0} runs/s  vmm_errors: {}  hangs: {}  timeouts: {}  rss: {} KiB (guest \
             memory {} KiB)  verdicts: {}",
            self.runs,
            (self.runs - done) as f64 / elapsed.as_secs_f64().max(1e-9),
            self.vmm_errors,
            self.hangs,
            self.timeouts,
            rss_kib(),
            self.guest_ram_kib,
            counts(&self.verdicts)
        )
    }

    /// Whether the soak failed: a VMM error or a hang.
    pub fn failed(&self) -> bool {
        self.vmm_errors > 0 || self.hangs > 0
    }

    /// Prints the summary, as one JSON object with `json`.
    pub fn report(&self, json: bool) -> Result<()> {
        if json {
            println!("{}", serde_json::to_string(self)?);
        } else {
            self.print();
        }
        Ok(())
    }

    pub fn print(&self) {
        println!("chaos: {} runs on `{}`, seed {}", self.runs, self.variant, self.seed);
        println!("  inputs:     {}", counts(&self.inputs));
        println!("  verdicts:   {}", counts(&self.verdicts));
        println!("  VMM errors: {}", self.vmm_errors);
        println!("  hangs:      {} (executions the watchdog did not end in time)", self.hangs);
        println!("  timeouts:   {} (guests the watchdog stopped)", self.timeouts);
        println!("  sanity replays: {} of the plain reproducer", self.sanity_replays);
        println!(
            "  RSS:        {} KiB at start, {} KiB at the end; of it guest memory {} KiB",
            self.rss_start_kib, self.rss_end_kib, self.guest_ram_kib
        );
        println!("  time:       {:.1} s, {:.0} runs/s", self.elapsed_secs, self.runs_per_sec);
        if self.segments.len() > 1 {
            for s in &self.segments {
                println!(
                    "  segment:    runs {}..={} in {:.1} s on {} jobs, RSS {} KiB → {} KiB (guest \
                     memory {} KiB)",
                    s.first_run,
                    s.last_run,
                    s.elapsed_secs,
                    s.jobs,
                    s.rss_start_kib,
                    s.rss_end_kib,
                    s.guest_ram_kib
                );
            }
        }
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
fn counts(map: &BTreeMap<String, u64>) -> String {
    map.iter().map(|(name, count)| format!("{name}: {count}")).collect::<Vec<_>>().join(", ")
}

/// How long one execution took: wall-clock time, and the CPU time of the thread that ran it
/// (guest time included: KVM_RUN counts as the thread's system time).
#[derive(Clone, Copy, Debug)]
pub struct Took {
    pub wall: Duration,
    pub cpu: Duration,
}

/// The calling thread's CPU time so far, user and system (zero if unreadable).
pub fn thread_cpu_time() -> Duration {
    // SAFETY: a zeroed rusage is valid, and getrusage only writes to it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable rusage for the duration of the call.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) } != 0 {
        return Duration::ZERO;
    }
    let time = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    time(usage.ru_utime) + time(usage.ru_stime)
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
