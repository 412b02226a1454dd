//! `nmifuzz eval`: how fast each method finds each variant's bug.
//!
//! For every variant (the 2015 CVE variants of the user-mode half too: the campaign's and the
//! baseline's generator draws the user workload half the time, the sweep has both), three
//! methods: the LibAFL campaign and the random-timing baseline (several seeds each, one core
//! each, a time limit per run), and the exhaustive sweep (deterministic, one run). Each run is a
//! child process (`nmifuzz eval-job`) of the very binary the evaluation started with, two at a
//! time on this 2-core host. The results go to `docs/eval.json` (raw), `docs/eval.md` (table)
//! and `docs/eval.svg` (plot).

mod jobs;
mod plot;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nmifuzz_abi::Variant;
use serde::{Deserialize, Serialize};

pub use self::jobs::run_job;
use crate::options::{EvalArgs, EvalJobArgs};
use crate::progress::Progress;
use crate::store;

/// A way of searching for a bug.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// The LibAFL campaign (`nmifuzz run`).
    Campaign,
    /// Random schedules from the campaign's generator, no feedback.
    Random,
    /// The exhaustive sweep (`nmifuzz sweep`), stopping at its first finding.
    Sweep,
}

impl Method {
    /// Every method, in table order.
    pub const ALL: [Method; 3] = [Method::Campaign, Method::Random, Method::Sweep];

    fn name(self) -> &'static str {
        match self {
            Self::Campaign => "campaign",
            Self::Random => "random",
            Self::Sweep => "sweep",
        }
    }
}

/// One run of one method on one variant.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobResult {
    pub method: Method,
    pub variant: String,
    pub seed: u64,
    /// Whether anything was found within the limit.
    pub found: bool,
    /// Seconds to the first finding, or the limit if none.
    pub seconds_to_first: f64,
    /// Executions to the first finding, or all executions if none.
    pub execs_to_first: u64,
    /// Executions in all.
    pub execs: u64,
    /// Seconds in all.
    pub seconds: f64,
    /// The first finding's verdict.
    pub message: Option<String>,
    /// The schedule of the first finding, when the method knows it (a reproducer).
    pub example: Option<vmm::engine::schedule::Schedule>,
}

/// Median, minimum and maximum over seeds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stat {
    fn of(mut values: Vec<f64>) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let median =
            if n % 2 == 1 { values[n / 2] } else { (values[n / 2 - 1] + values[n / 2]) / 2.0 };
        Self { median, min: values[0], max: values[n - 1] }
    }
}

/// One table row: a variant and a method over all seeds.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub variant: String,
    pub method: &'static str,
    /// Runs that found something, out of `runs`.
    pub found: usize,
    pub runs: usize,
    pub seconds: Stat,
    pub execs: Stat,
    pub exec_per_sec: f64,
    pub message: Option<String>,
}

/// The raw data file.
#[derive(Serialize)]
struct RawData<'a> {
    host: String,
    seeds: u32,
    time_limit_secs: u64,
    results: &'a [JobResult],
    rows: &'a [Row],
}

/// Runs the whole evaluation.
pub fn run(args: &EvalArgs) -> Result<()> {
    let (seeds, limit) = if args.quick { (1, 6) } else { (args.seeds, args.time_limit) };
    let mut jobs = Vec::new();
    let chosen =
        |v: &&Variant| args.variants.is_empty() || args.variants.iter().any(|n| n == v.name());
    for variant in Variant::ALL.iter().filter(chosen) {
        for method in [Method::Campaign, Method::Random] {
            for seed in 0..u64::from(seeds) {
                jobs.push((method, variant.name(), seed, limit));
            }
        }
        // The sweep is deterministic: one run, with twice the time limit.
        let sweep_limit = limit * 2;
        jobs.push((Method::Sweep, variant.name(), 0, sweep_limit));
    }
    let progress = Progress::new(jobs.len() as u64, "runs", true);
    let queue = Mutex::new(jobs.into_iter());
    let results = Mutex::new(Vec::new());
    let quick = args.quick;
    std::thread::scope(|scope| -> Result<()> {
        let workers: Vec<_> = (0..args.jobs.max(1))
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    loop {
                        let Some((method, variant, seed, limit)) =
                            queue.lock().expect("not poisoned").next()
                        else {
                            return Ok(());
                        };
                        progress.set_message(format!("{} on {variant}", method.name()));
                        let result = spawn_job(method, variant, seed, limit, quick)?;
                        progress.note(&format!(
                            "{:<8} {:<20} seed {seed}: {}",
                            method.name(),
                            variant,
                            match &result.message {
                                Some(m) if result.found =>
                                    format!("found in {:.2} s: {m}", result.seconds_to_first),
                                _ => format!(
                                    "nothing in {:.0} s ({} runs)",
                                    result.seconds, result.execs
                                ),
                            }
                        ));
                        results.lock().expect("not poisoned").push(result);
                        progress.inc(1);
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.join().expect("an eval worker panicked")?;
        }
        Ok(())
    })?;
    progress.finish();
    let mut results = results.into_inner().expect("not poisoned");
    results.sort_by(|a, b| {
        (&a.variant, a.method.name(), a.seed).cmp(&(&b.variant, b.method.name(), b.seed))
    });
    let rows = aggregate(&results);
    write_outputs(&args.output, &results, &rows, seeds, limit, args.jobs)?;
    print!("{}", table(&rows, limit));
    Ok(())
}

/// Runs one job in a child process and reads its JSON result.
fn spawn_job(
    method: Method,
    variant: &str,
    seed: u64,
    limit: u64,
    quick: bool,
) -> Result<JobResult> {
    // /proc/self/exe, not the path it was started from: an evaluation takes an hour, and a
    // `cargo build` meanwhile replaces that file. Every job must run the binary whose numbers
    // the table reports, and the running one stays reachable here even once replaced.
    let mut command = Command::new("/proc/self/exe");
    command.arg0("nmifuzz");
    command.args(["eval-job", "--method", method.name(), "--variant", variant]);
    command.args(["--seed", &seed.to_string(), "--time-limit", &limit.to_string()]);
    if quick {
        command.arg("--quick");
    }
    let output = command.output().context("cannot run an eval job")?;
    if !output.status.success() {
        bail!(
            "eval job {} on {variant} (seed {seed}) failed: {}",
            method.name(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // The campaign prints its status lines first; the result is the last line.
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).with_context(|| format!("an eval job printed no result: {last}"))
}

fn aggregate(results: &[JobResult]) -> Vec<Row> {
    let mut rows = Vec::new();
    for variant in Variant::ALL {
        for method in Method::ALL {
            let runs: Vec<&JobResult> = results
                .iter()
                .filter(|r| r.variant == variant.name() && r.method == method)
                .collect();
            if runs.is_empty() {
                continue;
            }
            let seconds: f64 = runs.iter().map(|r| r.seconds).sum();
            let execs: u64 = runs.iter().map(|r| r.execs).sum();
            rows.push(Row {
                variant: variant.name().to_owned(),
                method: method.name(),
                found: runs.iter().filter(|r| r.found).count(),
                runs: runs.len(),
                seconds: Stat::of(runs.iter().map(|r| r.seconds_to_first).collect()),
                execs: Stat::of(runs.iter().map(|r| r.execs_to_first as f64).collect()),
                exec_per_sec: if seconds > 0.0 { execs as f64 / seconds } else { 0.0 },
                message: runs.iter().find_map(|r| r.message.clone()),
            });
        }
    }
    rows
}

/// The Markdown table.
fn table(rows: &[Row], limit: u64) -> String {
    let mut out = String::from(
        "| variant | method | found | seconds to first finding: median (min–max) | executions to first finding: median (min–max) | exec/s | first finding |\n\
         | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for r in rows {
        let not_found = r.found == 0;
        let seconds = if not_found {
            format!("not found (limit {limit} s)")
        } else {
            format!("{:.2} ({:.2}–{:.2})", r.seconds.median, r.seconds.min, r.seconds.max)
        };
        let execs = if not_found {
            format!("{:.0} survived", r.execs.median)
        } else {
            format!("{:.0} ({:.0}–{:.0})", r.execs.median, r.execs.min, r.execs.max)
        };
        let message = r.message.as_deref().unwrap_or("—").replace('|', "\\|");
        out.push_str(&format!(
            "| {} | {} | {}/{} | {seconds} | {execs} | {:.0} | {message} |\n",
            r.variant, r.method, r.found, r.runs, r.exec_per_sec
        ));
    }
    out
}

fn write_outputs(
    dir: &Path,
    results: &[JobResult],
    rows: &[Row],
    seeds: u32,
    limit: u64,
    jobs: u64,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let host = host_description();
    let raw = RawData { host: host.clone(), seeds, time_limit_secs: limit, results, rows };
    store::write_atomic(&dir.join("eval.json"), serde_json::to_string_pretty(&raw)?.as_bytes())?;
    let markdown = format!(
        "# nmifuzz evaluation\n\nMeasured on {host}; {seeds} seed(s) per method, {limit} s per run, \
         {jobs} run(s) at a time, each on its own core.\n\n{}\n![time to first finding](eval.svg)\n",
        table(rows, limit)
    );
    store::write_atomic(&dir.join("eval.md"), markdown.as_bytes())?;
    let variants: Vec<String> = Variant::ALL
        .iter()
        .filter(|v| rows.iter().any(|r| r.variant == v.name()))
        .map(|v| v.name().to_owned())
        .collect();
    let methods: Vec<&str> = Method::ALL.iter().map(|m| m.name()).collect();
    plot::draw(&dir.join("eval.svg"), &variants, &methods, rows, limit as f64)
}

/// The host and its KVM, for the report.
fn host_description() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let kvm = if Path::new("/sys/module/kvm_pvm").exists() { "kvm_pvm" } else { "kvm" };
    format!(
        "Linux {} with {kvm}, {} CPUs",
        kernel.trim(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    )
}

/// Limit of a job as a duration.
fn limit(args: &EvalJobArgs) -> Duration {
    Duration::from_secs(args.time_limit)
}
