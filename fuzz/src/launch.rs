//! `nmifuzz run`: sets a campaign up (seeds, directories, limits), runs its clients, in this
//! process or one per core through LibAFL's Launcher, and prints the final summary.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use libafl::Error;
use libafl::events::{
    ClientDescription, EventConfig, Launcher, ManagerKind, ShouldSaveState, SimpleEventManager,
    setup_restarting_mgr_llmp,
};
use libafl_bolts::core_affinity::Cores;
use libafl_bolts::shmem::ShMemProvider;
use serde::Serialize;
use vmm::engine::RunOptions;
use vmm::engine::schedule::Schedule;

use crate::broker::Broker;
use crate::campaign::{self, Config, PULSE, Seat, State};
use crate::executor::{self, Limits};
use crate::options::{CampaignArgs, RunArgs};
use crate::shmem::SelfRemovingShMemProvider;
use crate::stats::{Shared, Totals};
use crate::status::StatusMonitor;
use crate::store;

/// libFuzzer's exit status for an interrupted run (`-interrupted_exitcode`).
pub const EXIT_INTERRUPTED: i32 = 72;

/// How clients are run.
pub enum Clients {
    /// One client, in this process.
    Single,
    /// One client per core, connected by an LLMP broker on `port` (and to `remote`).
    Cores { cores: Vec<usize>, port: u16, remote: Option<SocketAddr> },
}

/// A campaign to run.
pub struct Setup {
    /// Everything the clients need.
    pub config: Config,
    /// How to run them.
    pub clients: Clients,
}

/// What a campaign did.
#[derive(Debug, Serialize)]
pub struct Report {
    /// The entry variant.
    pub variant: String,
    /// The RNG seed.
    pub seed: u64,
    /// Wall-clock time of the campaign.
    pub elapsed_secs: f64,
    /// Executions of all clients.
    pub executions: u64,
    /// Executions per second, all clients.
    pub execs_per_sec: f64,
    /// `(client, executions)` of each client that ran.
    pub clients: Vec<(usize, u64)>,
    /// Corpus entries (the largest client corpus).
    pub corpus: u64,
    /// Entries the clients received from each other.
    pub imported: u64,
    /// Edges covered (the best client).
    pub edges: u64,
    /// Executions that ended in a finding.
    pub crashes: u64,
    /// Seconds from the start to the first crash.
    pub first_crash_secs: Option<f64>,
    /// Mean milliseconds inside `Target::execute` per execution.
    pub target_ms_per_exec: Option<f64>,
    /// Mean microseconds per execution outside the target (LibAFL, mutators, feedback).
    pub overhead_us_per_exec: Option<f64>,
    /// That time's share of the fuzzing loop.
    pub overhead_share: Option<f64>,
    /// Artifacts this campaign wrote: path and verdict.
    pub artifacts: Vec<(PathBuf, String)>,
    /// Whether SIGINT ended it.
    pub interrupted: bool,
}

/// `nmifuzz run`: returns whether a crash was found; exits 72 itself when interrupted.
pub fn run(args: &RunArgs) -> Result<bool> {
    if let Some(kernel) = &args.kernel {
        return run_kernel(args, kernel);
    }
    let (seeds, corpus_dir) = match &args.corpus {
        Some(dir) => (load_seeds(dir)?, Some(dir.clone())),
        None if Path::new("corpus").is_dir() => (load_seeds(Path::new("corpus"))?, None),
        None => {
            println!("INFO: no corpus directory and no ./corpus: generating the seeds");
            (Vec::new(), None)
        }
    };
    let seed = args.seed.unwrap_or_else(libafl_bolts::current_nanos);
    let limits = Limits {
        start: Instant::now(),
        max_time: args.max_total_time.map(Duration::from_secs),
        max_runs: args.runs,
        stop_on_crash: !args.keep_going,
    };
    let clients = match &args.cores {
        None => Clients::Single,
        Some(cores) => Clients::Cores {
            cores: cores.0.clone(),
            port: args.broker_port,
            remote: args.remote_broker,
        },
    };
    let setup = Setup { config: config(&args.campaign, seeds, corpus_dir, seed, limits), clients };
    let report = run_campaign(setup)?;
    print_summary(&report);
    if report.interrupted && report.crashes == 0 {
        std::process::exit(EXIT_INTERRUPTED);
    }
    Ok(report.crashes > 0)
}

/// `nmifuzz run --kernel`: a campaign on a real kernel ([`crate::kernel::campaign`]).
fn run_kernel(args: &RunArgs, kernel: &Path) -> Result<bool> {
    let seed = args.seed.unwrap_or_else(libafl_bolts::current_nanos);
    let campaign = crate::kernel::campaign::Campaign {
        kernel: kernel.to_path_buf(),
        system_map: args.system_map.clone(),
        corpus_dir: args.corpus.clone(),
        artifacts: args.campaign.artifacts.clone(),
        seed,
        timeout: Duration::from_millis(args.campaign.timeout_ms),
        limits: Limits {
            start: Instant::now(),
            max_time: args.max_total_time.map(Duration::from_secs),
            max_runs: args.runs,
            stop_on_crash: !args.keep_going,
        },
    };
    let report = crate::kernel::campaign::run(&campaign)?;
    let elapsed = report.elapsed.as_secs_f64();
    let rate = report.executions as f64 / elapsed.max(1e-3);
    println!(
        "#{} DONE corp: {} exec/s: {rate:.1} crashes: {}",
        report.executions,
        report.corpus,
        report.artifacts.len()
    );
    println!(
        "Done {} runs in {elapsed:.1} s ({rate:.1} exec/s, boot included), kernel {}, seed {seed}",
        report.executions,
        kernel.display()
    );
    if let Some(first) = report.first_finding {
        println!("  first finding after {first:.1} s");
    }
    for (path, verdict) in &report.artifacts {
        println!("  artifact {}: {verdict}", path.display());
    }
    if let Some((path, _)) = report.artifacts.first() {
        println!("  reproduce with: nmifuzz replay --trace {}", path.display());
    }
    if crate::executor::interrupted() && report.artifacts.is_empty() {
        std::process::exit(EXIT_INTERRUPTED);
    }
    Ok(!report.artifacts.is_empty())
}

/// The clients' configuration from the shared campaign options.
pub fn config(
    args: &CampaignArgs,
    seeds: Vec<Schedule>,
    corpus_dir: Option<PathBuf>,
    seed: u64,
    limits: Limits,
) -> Config {
    let options =
        RunOptions { mode: args.engine.mode(), ..crate::target::run_options(args.timeout_ms) };
    Config {
        variant: args.variant.clone(),
        seeds,
        corpus_dir,
        artifacts: args.artifacts.clone(),
        faults: args.faults.0.clone(),
        seed,
        options,
        limits,
    }
}

/// Loads the seeds of `dir`, printing a warning for each file skipped.
pub fn load_seeds(dir: &Path) -> Result<Vec<Schedule>> {
    let loaded = store::load_dir(dir)?;
    for warning in &loaded.warnings {
        eprintln!("WARNING: {warning}");
    }
    println!(
        "INFO: {} seeds from {}{}",
        loaded.entries.len(),
        dir.display(),
        if loaded.warnings.is_empty() {
            String::new()
        } else {
            format!(" ({} files skipped)", loaded.warnings.len())
        }
    );
    Ok(loaded.entries.into_iter().map(|(_, s)| s).collect())
}

/// Runs the campaign's clients and reports what they did.
pub fn run_campaign(setup: Setup) -> Result<Report> {
    let config = &setup.config;
    for dir in config.corpus_dir.iter().chain([&config.artifacts]) {
        store::prepare_dir(dir)?;
    }
    let before = artifacts_in(&config.artifacts)?;
    let shared = Shared::new();
    println!("INFO: Seed: {}", config.seed);
    println!("INFO: variant {}, artifacts in {}/", config.variant, config.artifacts.display());
    match &setup.clients {
        Clients::Single => {
            let manager = SimpleEventManager::new(StatusMonitor::new(PULSE));
            let seat = Seat { client: 0, clients: 1 };
            campaign::run_client(None, manager, config, shared, seat)
                .map_err(|e| anyhow!("campaign: {e}"))?;
        }
        Clients::Cores { cores, port, remote } => launch(config, shared, cores, *port, *remote)?,
    }
    let after = artifacts_in(&config.artifacts)?;
    let artifacts = after
        .into_iter()
        .filter(|p| !before.contains(p))
        .map(|path| {
            let verdict = Schedule::load(&path)
                .map(|s| s.description.trim_start_matches("found by nmifuzz run: ").to_owned())
                .unwrap_or_default();
            (path, verdict)
        })
        .collect();
    let mut report = report(config, &shared.totals(), artifacts);
    report.interrupted |= shared.interrupted.load(std::sync::atomic::Ordering::Relaxed);
    Ok(report)
}

/// Runs one client per core through LibAFL's Launcher; returns in the main process only.
///
/// The Launcher forks the clients; the main process then runs the broker ([`Broker`]) in
/// place of the Launcher's own, which cannot reach a remote broker.
fn launch(
    config: &Config,
    shared: &'static Shared,
    cores: &[usize],
    port: u16,
    remote: Option<SocketAddr>,
) -> Result<()> {
    // LLMP clients join whatever broker listens on their port: on a port in use (the default
    // 1337 is a common one) they would join another campaign's.
    std::net::TcpListener::bind(("127.0.0.1", port))
        .with_context(|| format!("broker port {port} is in use: choose another --broker-port"))?;
    let main_pid = std::process::id();
    let clients = cores.len();
    let cores = Cores::from(cores.to_vec());
    let shmem = SelfRemovingShMemProvider::new().context("cannot set up shared memory for LLMP")?;
    let configuration = EventConfig::from_name("nmifuzz");
    println!(
        "INFO: {} clients on cores {:?}, LLMP broker on 127.0.0.1:{port}",
        cores.ids.len(),
        cores.ids
    );
    // Before the forks, so that no SIGINT finds the main process without it.
    executor::install_sigint_handler();
    let run_client = |state: Option<State>, manager, client: ClientDescription| {
        let seat = Seat { client: client.id(), clients };
        let result = campaign::run_client(state, manager, config, shared, seat);
        shared.client_finished();
        result
    };
    // The Launcher reports a failed broker only to its log: keep the error for the summary.
    let mut broker_error = None;
    let result = Launcher::builder()
        .shmem_provider(shmem.clone())
        .configuration(configuration)
        .monitor(StatusMonitor::new(PULSE))
        .run_client(run_client)
        .cores(&cores)
        .broker_port(port)
        .build()
        .launch_with_manager(|_, client, monitor| match client {
            Some(client_description) => setup_restarting_mgr_llmp(
                shmem.clone(),
                configuration,
                None::<StatusMonitor>, // the broker's monitor prints the status lines
                port,
                ManagerKind::Client { client_description },
                None,                       // exit_cleanly_after: for brokers only
                ShouldSaveState::OnRestart, // the Launcher's default
                (),                         // no event hooks
            ),
            None => {
                let monitor = monitor.expect("the Launcher passes its monitor to the broker");
                let broker = Broker { shmem: shmem.clone(), monitor, port, remote, clients };
                if let Err(e) = broker.run(shared) {
                    shared.request_stop(); // the clients cannot share inputs any more
                    broker_error = Some(e);
                }
                Err(Error::shutting_down())
            }
        });
    if std::process::id() != main_pid {
        // A client or its respawner returning from the Launcher: its work is done.
        match result {
            Ok(()) | Err(Error::ShuttingDown) => std::process::exit(0),
            Err(e) => {
                eprintln!("error: client {}: {e}", std::process::id());
                std::process::exit(2);
            }
        }
    }
    if let Some(e) = broker_error {
        return Err(anyhow!("LLMP broker on port {port}: {e}"));
    }
    match result {
        Ok(()) | Err(Error::ShuttingDown) => Ok(()),
        Err(e) => Err(anyhow!("launcher (broker port {port}): {e}")),
    }
}

/// The `crash-*.json` files in `dir`.
fn artifacts_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if name.starts_with("crash-") && name.ends_with(".json") {
            paths.push(path);
        }
    }
    paths.sort();
    Ok(paths)
}

fn report(config: &Config, totals: &Totals, artifacts: Vec<(PathBuf, String)>) -> Report {
    let elapsed = config.limits.start.elapsed().as_secs_f64();
    let overhead = totals.overhead();
    Report {
        variant: config.variant.clone(),
        seed: config.seed,
        elapsed_secs: elapsed,
        executions: totals.executions,
        execs_per_sec: totals.executions as f64 / elapsed.max(1e-3),
        clients: totals.clients.clone(),
        corpus: totals.corpus,
        imported: totals.imported,
        edges: totals.edges,
        crashes: totals.crashes,
        first_crash_secs: totals.first_crash.map(|d| d.as_secs_f64()),
        target_ms_per_exec: (totals.executions > 0)
            .then(|| totals.target.as_secs_f64() * 1e3 / totals.executions as f64),
        overhead_us_per_exec: overhead.map(|(per, _)| per.as_secs_f64() * 1e6),
        overhead_share: overhead.map(|(_, share)| share),
        artifacts,
        interrupted: executor::interrupted(),
    }
}

/// The final summary, libFuzzer's `DONE` line first.
pub fn print_summary(r: &Report) {
    if r.interrupted {
        println!("==nmifuzz== run interrupted; exiting");
    }
    println!(
        "#{} DONE cov: {} corp: {} exec/s: {:.0} crashes: {}",
        r.executions,
        r.edges,
        r.corpus,
        r.execs_per_sec,
        r.artifacts.len()
    );
    println!(
        "Done {} runs in {:.1} s ({:.1} exec/s), variant {}, seed {}",
        r.executions, r.elapsed_secs, r.execs_per_sec, r.variant, r.seed
    );
    for (client, executions) in &r.clients {
        println!("  client {client}: {executions} executions");
    }
    if r.clients.len() > 1 || r.imported > 0 {
        // From this machine's other clients and, with --remote-broker, the other campaign.
        println!("  inputs shared between clients: {}", r.imported);
    }
    if let (Some(target), Some(overhead), Some(share)) =
        (r.target_ms_per_exec, r.overhead_us_per_exec, r.overhead_share)
    {
        println!(
            "  per execution: {target:.2} ms in the target, {overhead:.0} µs in LibAFL and the \
             mutators ({:.2}% of the loop)",
            share * 100.0
        );
    }
    if let Some(first) = r.first_crash_secs {
        println!(
            "  {} executions ended in a finding ({} new distinct findings saved); the first after \
             {first:.1} s",
            r.crashes,
            r.artifacts.len()
        );
    }
    for (path, verdict) in &r.artifacts {
        println!("  artifact {}: {verdict}", path.display());
    }
    if !r.artifacts.is_empty() {
        println!("  reproduce with: nmifuzz replay {}", r.artifacts[0].0.display());
    }
}
