//! The real-kernel campaign: LibAFL's fuzzer over [`KernelInput`]s on a booted kernel.
//!
//! Coverage is what the host saw, not the kernel's code coverage: which instruction each NMI
//! interrupted and at what depth, where the kernel's watchpoint raised #DB and whether inside
//! NMI handling, and the verdict ([`vmm::kernel::Execution::features`]). A schedule that
//! reaches one of those for the first time joins the corpus; a finding is saved as
//! `crash-<kind>-<hash>.json` once per kind and interrupted place.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use libafl::Error;
use libafl::corpus::{Corpus, CorpusId, InMemoryCorpus};
use libafl::events::{ProgressReporter, SimpleEventManager};
use libafl::executors::{Executor, ExitKind, HasObservers};
use libafl::feedbacks::{CrashFeedback, MaxMapFeedback};
use libafl::fuzzer::{Evaluator, Fuzzer, StdFuzzer};
use libafl::generators::Generator;
use libafl::observers::StdMapObserver;
use libafl::schedulers::QueueScheduler;
use libafl::stages::StdMutationalStage;
use libafl::state::{HasCorpus, HasExecutions, StdState, Stoppable};
use libafl_bolts::rands::StdRand;
use libafl_bolts::tuples::{RefIndexable, tuple_list};
use vmm::kernel::Execution;
use vmm::kernel::schedule::KernelSchedule;

use super::KernelTarget;
use super::input::{KernelGenerator, KernelInput, KernelMutator};
use crate::executor::Limits;
use crate::status::StatusMonitor;
use crate::store;

/// Coverage map entries.
const MAP_SIZE: usize = 4096;
/// Inputs generated when the corpus directory gives none.
const GENERATED_SEEDS: usize = 8;
/// How often a pulse line is printed.
const PULSE: Duration = Duration::from_secs(10);

type State =
    StdState<InMemoryCorpus<KernelInput>, KernelInput, StdRand, InMemoryCorpus<KernelInput>>;

/// What a kernel campaign needs.
pub struct Campaign {
    /// The bzImage.
    pub kernel: PathBuf,
    /// Its System.map, if given.
    pub system_map: Option<PathBuf>,
    /// Seeds and new entries (None: memory only).
    pub corpus_dir: Option<PathBuf>,
    /// Where findings go.
    pub artifacts: PathBuf,
    /// The RNG seed.
    pub seed: u64,
    /// One execution's wall-clock limit.
    pub timeout: Duration,
    /// When to stop.
    pub limits: Limits,
}

/// What a kernel campaign did.
pub struct Report {
    /// Executions.
    pub executions: u64,
    /// Wall-clock time, boot included.
    pub elapsed: Duration,
    /// Corpus entries.
    pub corpus: usize,
    /// Artifacts written, with their verdicts.
    pub artifacts: Vec<(PathBuf, String)>,
    /// Seconds from the start to the first finding.
    pub first_finding: Option<f64>,
}

/// Runs the campaign; returns its report.
pub fn run(campaign: &Campaign) -> Result<Report> {
    let started = Instant::now();
    for dir in campaign.corpus_dir.iter().chain([&campaign.artifacts]) {
        store::prepare_dir(dir)?;
    }
    crate::executor::install_sigint_handler();
    let target = KernelTarget::boot(&campaign.kernel, campaign.system_map.as_deref())?;
    let seeds = load_seeds(campaign.corpus_dir.as_deref(), &target)?;
    let points = target.points.clone();
    let kernel = target.id.clone();
    println!(
        "INFO: Seed: {}; {} NMI points ({} in asm_exc_nmi, {} in the SYSCALL entry); artifacts in {}/",
        campaign.seed,
        points.nmi.len() + points.syscall.len() + points.other.len(),
        points.nmi.len(),
        points.syscall.len(),
        campaign.artifacts.display()
    );

    let mut map = vec![0; MAP_SIZE];
    // SAFETY: the map's buffer moves into the executor with the Vec (a move keeps the heap
    // buffer where it is), which owns this observer too and never resizes the Vec; the
    // observer is only used while the executor lives.
    let observer =
        unsafe { StdMapObserver::from_mut_ptr("kernel-features", map.as_mut_ptr(), MAP_SIZE) };
    let mut feedback = MaxMapFeedback::new(&observer);
    let mut objective = CrashFeedback::new();
    let mut executor = KernelExecutor::new(target, campaign, map, tuple_list!(observer));
    let mut state = StdState::new(
        StdRand::with_seed(campaign.seed),
        InMemoryCorpus::new(),
        InMemoryCorpus::new(),
        &mut feedback,
        &mut objective,
    )
    .map_err(|e| anyhow!("campaign state: {e}"))?;
    let mut fuzzer = StdFuzzer::new(QueueScheduler::new(), feedback, objective);
    let mut mgr = SimpleEventManager::new(StatusMonitor::new(PULSE));

    let lib = |e: Error| anyhow!("kernel campaign: {e}");
    for seed in seeds {
        done_or_stopped(fuzzer.evaluate_input(&mut state, &mut executor, &mut mgr, &seed))?;
    }
    let mut generator = KernelGenerator::new(kernel, &points);
    for _ in 0..GENERATED_SEEDS {
        if state.corpus().count() > 0 || state.stop_requested() || executor.limit_reached() {
            break;
        }
        let input = generator.generate(&mut state).map_err(lib)?;
        done_or_stopped(fuzzer.evaluate_input(&mut state, &mut executor, &mut mgr, &input))?;
    }
    if state.corpus().count() == 0 {
        let input = generator.generate(&mut state).map_err(lib)?;
        done_or_stopped(fuzzer.add_input(&mut state, &mut executor, &mut mgr, input))?;
    }
    let mut mirrored = 0;
    let mut stages = tuple_list!(StdMutationalStage::new(KernelMutator::new(points.clone())));
    while !state.stop_requested() && !executor.limit_reached() {
        mirrored = mirror_corpus(&state, campaign.corpus_dir.as_deref(), mirrored)?;
        mgr.maybe_report_progress(&mut state, PULSE).map_err(lib)?;
        done_or_stopped(fuzzer.fuzz_one(&mut stages, &mut executor, &mut state, &mut mgr))?;
    }
    mirror_corpus(&state, campaign.corpus_dir.as_deref(), mirrored)?;
    Ok(Report {
        executions: *state.executions(),
        elapsed: started.elapsed(),
        corpus: state.corpus().count(),
        artifacts: executor.artifacts,
        first_finding: executor.first_finding.map(|d| d.duration_since(started).as_secs_f64()),
    })
}

/// A LibAFL call's result, where ShuttingDown (a limit made the executor request a stop) is
/// not an error.
fn done_or_stopped<T>(result: Result<T, Error>) -> Result<()> {
    match result {
        Ok(_) | Err(Error::ShuttingDown) => Ok(()),
        Err(e) => Err(anyhow!("kernel campaign: {e}")),
    }
}

/// The kernel schedules in the corpus directory; other files are skipped with a warning.
fn load_seeds(dir: Option<&Path>, target: &KernelTarget) -> Result<Vec<KernelInput>> {
    let Some(dir) = dir else { return Ok(Vec::new()) };
    let mut seeds = Vec::new();
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    names.sort();
    for path in names {
        match KernelSchedule::load(&path) {
            Ok(mut schedule) => {
                // A seed from another build of the kernel is still a good start here.
                schedule.kernel = target.id.clone();
                seeds.push(KernelInput(schedule));
            }
            Err(why) => eprintln!("WARNING: skipping {why}"),
        }
    }
    println!("INFO: {} seeds from {}", seeds.len(), dir.display());
    Ok(seeds)
}

/// Writes the corpus entries from `from` on to `dir`; returns the new count.
fn mirror_corpus(state: &State, dir: Option<&Path>, from: usize) -> Result<usize> {
    let count = state.corpus().count();
    if let Some(dir) = dir {
        for id in from..count {
            let testcase = state.corpus().get(CorpusId(id)).map_err(|e| anyhow!("{e}"))?;
            if let Some(input) = testcase.borrow().input() {
                let path = dir.join(input.corpus_name());
                if !path.exists() {
                    store::write_atomic(&path, input.to_json().as_bytes())?;
                }
            }
        }
    }
    Ok(count)
}

/// Runs schedules on the kernel, fills the coverage map, saves findings.
struct KernelExecutor<OT> {
    target: KernelTarget,
    map: Vec<u8>,
    observers: OT,
    timeout: Duration,
    limits: Limits,
    artifacts_dir: PathBuf,
    saved: HashSet<String>,
    artifacts: Vec<(PathBuf, String)>,
    first_finding: Option<Instant>,
    executions: u64,
}

impl<OT> KernelExecutor<OT> {
    fn new(target: KernelTarget, campaign: &Campaign, map: Vec<u8>, observers: OT) -> Self {
        Self {
            target,
            map,
            observers,
            timeout: campaign.timeout,
            limits: campaign.limits,
            artifacts_dir: campaign.artifacts.clone(),
            saved: HashSet::new(),
            artifacts: Vec::new(),
            first_finding: None,
            executions: 0,
        }
    }

    fn limit_reached(&self) -> bool {
        crate::executor::interrupted()
            || self.limits.max_time.is_some_and(|t| self.limits.start.elapsed() >= t)
            || self.limits.max_runs.is_some_and(|n| self.executions >= n)
            || (self.limits.stop_on_crash && !self.artifacts.is_empty())
    }

    /// Saves a finding once per kind and interrupted place.
    fn save(&mut self, input: &KernelInput, execution: &Execution) -> Result<(), Error> {
        let place = execution.deliveries.first().map_or("", |d| d.interrupted.as_str());
        let key = format!("{}:{place}", execution.verdict.kind());
        if !self.saved.insert(key.clone()) {
            return Ok(());
        }
        let path = self.artifacts_dir.join(store::artifact_name(execution.verdict.kind(), &key));
        let mut artifact = input.clone();
        artifact.0.description = format!("found by nmifuzz run: {}", execution.verdict);
        if store::write_new_atomic(&path, artifact.to_json().as_bytes())? {
            println!("==nmifuzz== finding: {} -> {}", execution.verdict, path.display());
            self.artifacts.push((path, execution.verdict.to_string()));
            self.first_finding.get_or_insert_with(Instant::now);
        }
        Ok(())
    }
}

impl<EM, S, Z, OT> Executor<EM, KernelInput, S, Z> for KernelExecutor<OT>
where
    S: HasExecutions + Stoppable,
{
    fn run_target(
        &mut self,
        _fuzzer: &mut Z,
        state: &mut S,
        _mgr: &mut EM,
        input: &KernelInput,
    ) -> Result<ExitKind, Error> {
        self.map.fill(0);
        if self.limit_reached() {
            state.request_stop();
            return Ok(ExitKind::Ok);
        }
        *state.executions_mut() += 1; // custom executors count their executions themselves
        self.executions += 1;
        let execution = self
            .target
            .execute(&input.0, self.timeout)
            .map_err(|e| Error::unknown(format!("executing a kernel schedule: {e:#}")))?;
        for feature in &execution.features {
            self.map[(*feature % MAP_SIZE as u64) as usize] = 1;
        }
        if !execution.verdict.is_finding() {
            return Ok(ExitKind::Ok);
        }
        self.save(input, &execution)?;
        Ok(ExitKind::Crash)
    }
}

impl<OT> HasObservers for KernelExecutor<OT> {
    type Observers = OT;

    fn observers(&self) -> RefIndexable<&Self::Observers, Self::Observers> {
        RefIndexable::from(&self.observers)
    }

    fn observers_mut(&mut self) -> RefIndexable<&mut Self::Observers, Self::Observers> {
        RefIndexable::from(&mut self.observers)
    }
}
