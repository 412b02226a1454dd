//! Command-line interface: the commands and their options; the values clap cannot parse by
//! itself are in [`values`].

mod values;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use nmifuzz_abi::Variant;
use vmm::engine::schedule::MAX_USER_ITERATIONS;

pub use self::values::{
    CoreList, FaultList, SweepWorkload, ThirdWindow, UserPairs, parse_cores, parse_faults,
    parse_socket_addr, parse_third_window, parse_variant,
};

/// `nmifuzz bench --samples`' default.
pub const DEFAULT_BENCH_SAMPLES: u32 = 2000;

/// Default wall-clock limit of one execution, in milliseconds.
pub const DEFAULT_TIMEOUT_MS: u64 = 3_000;

/// A hypervisor-based fuzzer for x86-64 NMI entry code.
///
/// nmifuzz boots a small guest kernel under KVM, injects NMIs at exactly chosen instructions
/// and checks that the guest's NMI entry survives.
#[derive(Debug, Parser)]
#[command(version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a fuzzing campaign (like `cargo fuzz run` / libFuzzer).
    ///
    /// Seeds come from CORPUS_DIR, which also receives every new corpus entry; without it,
    /// from ./corpus if it exists (nothing is written then), else from the generator. Each
    /// distinct finding is saved once as ARTIFACTS/crash-<verdict-kind>-<hash>.json, a schedule
    /// that `nmifuzz replay` and `nmifuzz tmin` read. The campaign stops at the first crash
    /// unless --keep-going is given.
    ///
    /// Exit status: 0 nothing found, 1 a crash was found, 2 usage or setup error, 72
    /// interrupted (SIGINT) without a crash.
    Run(RunArgs),
    /// Minimize a reproducer: fewest injections, smallest counts, simplest handler actions
    /// that still end in the same verdict kind and message.
    ///
    /// Writes minimized-<hash>.json next to FILE (or in --output). Exit status 0, or 2 if FILE
    /// does not end in a finding.
    Tmin(TminArgs),
    /// Minimize a corpus: keep the fewest entries that cover every edge the corpus covers
    /// (greedy set cover, ties to smaller entries).
    ///
    /// Without --output or --in-place it only reports what it would keep.
    Cmin(CminArgs),
    /// CI mode: a short campaign with a fixed seed from ./corpus; writes a Markdown and a JSON
    /// summary for the CI job to attach.
    ///
    /// Exit status: 0 nothing found, 1 a finding, 2 usage or setup error.
    Smoke(SmokeArgs),
    /// Replay reproducers (schedule JSON files) and print each verdict.
    ///
    /// Exits 1 if any replay ends in a finding, 0 if all pass.
    Replay(ReplayArgs),
    /// Check KVM and print this host's stepping and NMI profile and what it means.
    Doctor,
    /// Exhaustively place NMIs: for the loop workload, a second NMI at every instruction of a
    /// first NMI's handling and a third in a window after the second; for the user workload,
    /// one NMI at every boundary of the SYSCALL gaps and the return to user and at every
    /// ring-3 point, and a second at every boundary of the handling of those after ring 3 and
    /// in the gaps. Exits 1 if any run fails.
    ///
    /// Without --workload both sweeps run, the loop's first; the user sweep is left out on a
    /// guest without the user workload.
    Sweep(SweepArgs),
    /// Soak the VMM with the most hostile inputs: raw script bytes past validation, schedules
    /// at every limit, and NMI handlers that scribble over the guest's IDT, GDT, TSS, page
    /// tables, stacks, mailbox and script. Every run must end in a verdict, and a plain
    /// reproducer replayed every 1,000 runs must give its usual one.
    ///
    /// Exit status: 0 without VMM errors and hangs, 1 otherwise, 2 usage or setup error.
    Chaos(ChaosArgs),
    /// Measure the VMM's costs on this host: exit round trip, reset, reset + idle run.
    Bench(BenchArgs),
    /// Run the corpus and a seeded set of generated schedules on the stepped engine and write
    /// their verdict signatures, or compare two hosts' files (`--compare MINE THEIRS`): the
    /// cross-host agreement check of docs/engine.md.
    ///
    /// Exit status: 0, or 1 if compared files differ; 2 usage or setup error.
    Signatures(crate::signatures::SignaturesArgs),
    /// Run random symbolic schedules for one entry in both modes and report where the fast
    /// mode judges otherwise than the stepped engine, saving each such schedule: run it once
    /// on an entry of your own.
    ///
    /// Exit status: 0, or 1 if the modes disagree anywhere; 2 usage or setup error.
    Modes(crate::modes::ModesArgs),
    /// List the NMI entry variants linked into the guest: the files in entries/.
    Variants,
    /// Write a commented starting point for an NMI entry of your own: entries/NAME.S (or .rs),
    /// a copy of --from with its symbols renamed and the entry contract inline.
    ///
    /// The build finds the file by itself; no other file changes. See docs/entries.md and the
    /// tutorial docs/fuzz-your-entry.md.
    NewEntry(NewEntryArgs),
    /// Measure time to the first finding per variant: the campaign against a random-timing
    /// baseline and the sweep. Writes eval.md, eval.svg and eval.json to --output.
    ///
    /// The default run (5 seeds, 50 s per run, two runs at a time) takes up to about 40
    /// minutes on a 2-core host; --quick takes about 2 minutes.
    Eval(EvalArgs),
    /// One run of `nmifuzz eval`, in its own process (used by `eval`).
    #[command(hide = true)]
    EvalJob(EvalJobArgs),
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Schedule files to replay (artifacts, corpus entries, hand-written seeds).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Replay against this entry variant instead of the one in the file (e.g. check that
    /// `linux` survives what kills `naive`).
    #[arg(long, value_parser = parse_variant)]
    pub variant: Option<String>,
    /// Print the per-step trace: instruction count, RIP as symbol+offset, disassembly, NMI
    /// depth and events.
    #[arg(long)]
    pub trace: bool,
    /// Print one JSON object per file instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SweepArgs {
    /// The entry variant to sweep.
    #[arg(long, default_value = "linux", value_parser = parse_variant)]
    pub variant: String,
    /// How many placements of the first NMI in the workload (1 to 5).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=5))]
    pub placements: u64,
    /// Window of the third NMI: every instruction 1..=N after a nested second NMI, and N
    /// instructions after each IRETQ that follows it in the first NMI's handling (0: no third);
    /// `all`: every instruction from the second NMI until the first NMI's handling ends.
    #[arg(long, value_name = "N|all", default_value_t = ThirdWindow::Within(8), value_parser = parse_third_window)]
    pub third_window: ThirdWindow,
    /// Iterations of the workload loop.
    #[arg(long, default_value_t = 20)]
    pub workload_iterations: u32,
    /// Which workload's sweep to run: `loop`, `user` or `both` (the loop's first).
    #[arg(long, value_enum, default_value_t = SweepWorkload::Both)]
    pub workload: SweepWorkload,
    /// Iterations of the user workload in the user sweep: every stop of each is swept, so the
    /// runs grow with it.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_USER_ITERATIONS)))]
    pub user_iterations: u32,
    /// Where the user sweep's first NMIs get second NMIs at every stop of their handling:
    /// after ring 3 and in both SYSCALL gaps (`gaps`, the full sweep), or only after ring 3
    /// (`ring3`, about a tenth of the runs: what CI affords).
    #[arg(long, value_enum, default_value_t = UserPairs::Gaps)]
    pub user_pairs: UserPairs,
    /// Stop at the first failing run.
    #[arg(long)]
    pub stop_on_first: bool,
    /// Jobs sweeping at a time, each with a VM of its own on a thread of its own (default: one
    /// per core, at most 64). The summary is the same whatever the number, but for its seconds.
    #[arg(long, default_value_t = default_jobs(), value_parser = clap::value_parser!(u64).range(1..=64))]
    pub jobs: u64,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// One job per core this process may use, at most the 64 `--jobs` allows.
fn default_jobs() -> u64 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u64).min(64)
}

/// Arguments of `nmifuzz chaos`.
#[derive(Debug, Args)]
pub struct ChaosArgs {
    /// How many chaos executions.
    #[arg(long, default_value_t = 10_000)]
    pub runs: u64,
    /// Seed of the inputs: the same seed gives the same inputs.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The NMI entry variant the guest runs.
    #[arg(long, default_value = "linux", value_parser = parse_variant)]
    pub variant: String,
    /// Wall-clock limit of one execution, in milliseconds (the slowest chaos runs that end by
    /// themselves take about 0.5 s here); the watchdog ends a run reaching it with a timeout.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout_ms: u64,
    /// The engine that executes the soak's inputs (see `nmifuzz run --engine`).
    #[arg(long, value_enum, default_value_t = Engine::Fast)]
    pub engine: Engine,
    /// Jobs running the soak at a time, each with a VM of its own on a thread of its own
    /// (default: one per core, at most 64). The summary is the same whatever the number, but
    /// for its seconds and memory.
    #[arg(long, default_value_t = default_jobs(), value_parser = clap::value_parser!(u64).range(1..=64))]
    pub jobs: u64,
    /// Keep the soak's progress in this file (rewritten atomically every 1,000 runs) and, if
    /// it exists, resume the soak it holds: a stopped soak goes on where it was. The file
    /// must belong to the same soak (variant, seed, engine, timeout and nmifuzz executable);
    /// `--jobs` may differ.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Print one JSON object instead of progress lines and a summary.
    #[arg(long)]
    pub json: bool,
}

/// Options shared by `run` and `smoke`.
#[derive(Debug, Args)]
pub struct CampaignArgs {
    /// The NMI entry variant the guest runs, fixed for the whole campaign (`nmifuzz
    /// variants` lists them).
    #[arg(long, default_value = "linux", value_parser = parse_variant)]
    pub variant: String,
    /// Where artifacts (crash-<verdict-kind>-<hash>.json) are written; created if missing.
    #[arg(long, default_value = "artifacts")]
    pub artifacts: PathBuf,
    /// Wall-clock limit of one execution, in milliseconds; a run exceeding it is a `timeout`
    /// finding.
    #[arg(long, default_value_t = DEFAULT_TIMEOUT_MS, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout_ms: u64,
    /// The faults the handler actions may raise, comma-separated (`ud`, `pf`, `bp`,
    /// `revoke-cs`), `all` or `none`.
    /// Faults already in seeds are kept.
    #[arg(long, default_value = "all", value_parser = parse_faults)]
    pub faults: FaultList,
    /// How schedules are executed: `fast` free-runs between injection points and through NMI
    /// handling, stopping at breakpoints and IRETQs; `stepped` single-steps everything up to
    /// the last injection (the reference). A finding of `fast` is re-run on `stepped` and
    /// saved with the stepped engine's verdict.
    #[arg(long, value_enum, default_value_t = Engine::Fast)]
    pub engine: Engine,
}

/// The `--engine` choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Engine {
    /// Breakpoint-driven free runs (`vmm::engine::Mode::Fast`).
    Fast,
    /// Every instruction single-stepped up to the last injection.
    Stepped,
}

impl Engine {
    /// The engine mode.
    pub fn mode(self) -> vmm::engine::Mode {
        match self {
            Self::Fast => vmm::engine::Mode::Fast,
            Self::Stepped => vmm::engine::Mode::Stepped,
        }
    }
}

/// Arguments of `nmifuzz run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Corpus directory: the seeds, and where new corpus entries are written (atomically,
    /// named by content hash). Must exist. Files that are not schedules are skipped with a
    /// warning.
    pub corpus: Option<PathBuf>,
    #[command(flatten)]
    pub campaign: CampaignArgs,
    /// Stop after this many seconds (default: no limit).
    #[arg(long, value_name = "SECS")]
    pub max_total_time: Option<u64>,
    /// Stop after this many executions, over all clients (default: no limit).
    #[arg(long, value_name = "N")]
    pub runs: Option<u64>,
    /// Seed of the random number generator (client i uses SEED+i); default: from the clock.
    /// The seed used is printed at start.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Keep fuzzing after a crash (each distinct finding is still saved once).
    #[arg(long)]
    pub keep_going: bool,
    /// Run one client per core through LibAFL's Launcher, sharing inputs over LLMP: a count
    /// N (cores 0..N-1) or a list such as `0,2` or `0-3`, or `all`. Each client boots its own
    /// VM. Without this flag the campaign runs in this process only.
    #[arg(long, value_parser = parse_cores, value_name = "N|LIST")]
    pub cores: Option<CoreList>,
    /// TCP port of the local LLMP broker that connects the clients (with --cores).
    #[arg(long, default_value_t = 1337)]
    pub broker_port: u16,
    /// Connect this machine's broker to the broker of another machine's campaign, to share
    /// inputs across machines (with --cores).
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_socket_addr, requires = "cores")]
    pub remote_broker: Option<SocketAddr>,
    /// Fuzz the NMI entry of this Linux kernel (a bzImage) instead of the built-in guest: it
    /// boots with nmifuzz's agent as /init (see README, "Fuzzing a real kernel"). --variant,
    /// --engine and --faults do not apply.
    #[arg(long, value_name = "BZIMAGE", conflicts_with = "cores")]
    pub kernel: Option<PathBuf>,
    /// The kernel's System.map, for symbols. A stub (Debian ships one) is recognised and the
    /// kernel's own /proc/kallsyms is used instead, as it is without this option.
    #[arg(long, value_name = "FILE", requires = "kernel")]
    pub system_map: Option<PathBuf>,
}

/// Arguments of `nmifuzz tmin`.
#[derive(Debug, Args)]
pub struct TminArgs {
    /// The reproducer (an artifact or any schedule that ends in a finding).
    pub file: PathBuf,
    /// Directory for minimized-<hash>.json (default: FILE's directory).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Wall-clock limit of one execution, in milliseconds.
    #[arg(long, default_value_t = DEFAULT_TIMEOUT_MS, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout_ms: u64,
}

/// Arguments of `nmifuzz cmin`.
#[derive(Debug, Args)]
pub struct CminArgs {
    /// The corpus directory to minimize.
    pub corpus: PathBuf,
    /// Copy the kept entries into this directory (created if missing); CORPUS is untouched.
    #[arg(long, conflicts_with = "in_place")]
    pub output: Option<PathBuf>,
    /// Delete the entries that are not kept from CORPUS itself.
    #[arg(long)]
    pub in_place: bool,
    /// Wall-clock limit of one execution, in milliseconds.
    #[arg(long, default_value_t = DEFAULT_TIMEOUT_MS, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout_ms: u64,
}

/// Arguments of `nmifuzz smoke`.
#[derive(Debug, Args)]
pub struct SmokeArgs {
    #[command(flatten)]
    pub campaign: CampaignArgs,
    /// Length of the campaign, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub max_total_time: u64,
    /// Seed of the random number generator (fixed, so CI runs are comparable).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Where smoke-summary.md and smoke-summary.json are written; created if missing.
    #[arg(long, default_value = "artifacts")]
    pub summary: PathBuf,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Measure a real kernel (a bzImage) instead of the built-in guest: boot time, snapshot
    /// size, reset and execution costs (samples default to 50 there).
    #[arg(long, value_name = "BZIMAGE")]
    pub kernel: Option<PathBuf>,
    /// The kernel's System.map (see `nmifuzz run --system-map`).
    #[arg(long, value_name = "FILE", requires = "kernel")]
    pub system_map: Option<PathBuf>,
    /// Samples per measurement (the median is reported).
    #[arg(long, default_value_t = DEFAULT_BENCH_SAMPLES, value_parser = clap::value_parser!(u32).range(10..))]
    pub samples: u32,
}

/// Arguments of `nmifuzz new-entry`.
#[derive(Debug, Args)]
pub struct NewEntryArgs {
    /// The new entry's name: a lower-case identifier like `my_entry` (listed as `my-entry`).
    pub name: String,
    /// The entry to copy.
    #[arg(long, default_value = "naive", value_parser = parse_variant)]
    pub from: String,
    /// The nmifuzz tree to write into (default: found from the current directory).
    #[arg(long)]
    pub root: Option<PathBuf>,
}

/// Prints the variants, one line each.
pub fn print_variants() {
    for v in Variant::ALL {
        println!("{:<20} {}", v.name(), v.summary());
    }
}

/// Arguments of `nmifuzz eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Seeds per variant for the campaign and for the random baseline.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub seeds: u32,
    /// Time limit of each campaign and baseline run, in seconds ("not found" counts as this).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..))]
    pub time_limit: u64,
    /// Runs at a time, each on its own core.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub jobs: u64,
    /// A 2-minute version: one seed, 6 s per run, a small sweep.
    #[arg(long)]
    pub quick: bool,
    /// Evaluate only this variant (repeatable); every variant without it.
    #[arg(long = "variant", value_parser = parse_variant)]
    pub variants: Vec<String>,
    /// Where the table, plot and raw data go.
    #[arg(long, default_value = "docs")]
    pub output: PathBuf,
}

/// Arguments of `nmifuzz eval-job`.
#[derive(Debug, Args)]
pub struct EvalJobArgs {
    #[arg(long, value_enum)]
    pub method: crate::eval::Method,
    #[arg(long, value_parser = parse_variant)]
    pub variant: String,
    #[arg(long)]
    pub seed: u64,
    /// Seconds.
    #[arg(long)]
    pub time_limit: u64,
    #[arg(long)]
    pub quick: bool,
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn sweep_args(args: &[&str]) -> Result<SweepArgs, clap::Error> {
        let cli = Cli::try_parse_from(["nmifuzz", "sweep"].iter().chain(args))?;
        match cli.command {
            Command::Sweep(args) => Ok(args),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn third_window_takes_a_number_or_all_and_names_the_flag_otherwise() {
        assert_eq!(sweep_args(&[]).unwrap().third_window, ThirdWindow::Within(8));
        let window = |w| sweep_args(&["--third-window", w]).map(|a| a.third_window);
        assert_eq!(window("0").unwrap(), ThirdWindow::Within(0));
        assert_eq!(window("1000").unwrap(), ThirdWindow::Within(1000));
        assert_eq!(window("all").unwrap(), ThirdWindow::All);
        for bad in ["foo", "1001", "8.5", "ALL"] {
            let error = window(bad).unwrap_err().to_string();
            assert!(error.contains("--third-window"), "{bad}: {error}");
            assert!(error.contains("nor `all`"), "{bad}: {error}");
        }
    }

    #[test]
    fn jobs_default_to_the_cores_and_stay_in_range() {
        let jobs = sweep_args(&[]).unwrap().jobs;
        assert!((1..=64).contains(&jobs), "{jobs}");
        assert_eq!(sweep_args(&["--jobs", "3"]).unwrap().jobs, 3);
        for bad in ["0", "65"] {
            let error = sweep_args(&["--jobs", bad]).unwrap_err().to_string();
            assert!(error.contains("--jobs"), "{bad}: {error}");
        }
    }
}
