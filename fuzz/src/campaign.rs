//! One campaign client: the LibAFL pipeline, top to bottom, and its fuzzing loop.
//!
//! Each round of the loop runs two stages on the corpus: the systematic stage
//! ([`crate::systematic`]: deterministic second and third NMIs at the entry's instructions
//! nearest its IRETQs, after first NMIs whose handling reopens NMIs) and havoc over the
//! structure-aware mutators.
//!
//! The same function runs in the single process of `nmifuzz run` and in every client the
//! Launcher forks for `--cores`; only the event manager differs.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use libafl::Error;
use libafl::HasNamedMetadata;
use libafl::corpus::Corpus;
use libafl::events::{EventFirer, EventReceiver, ProgressReporter, SendExiting};
use libafl::feedbacks::{MapFeedbackMetadata, MaxMapFeedback};
use libafl::fuzzer::{Evaluator, Fuzzer, StdFuzzer};
use libafl::mutators::HavocScheduledMutator;
use libafl::observers::{HitcountsMapObserver, StdMapObserver};
use libafl::schedulers::QueueScheduler;
use libafl::stages::StdMutationalStage;
use libafl::state::{HasCorpus, HasExecutions, HasImported, HasSolutions, StdState, Stoppable};
use libafl_bolts::rands::StdRand;
use libafl_bolts::tuples::{Handled, tuple_list};
use nmifuzz_abi::Variant;
use vmm::engine::schedule::{Fault, Schedule};
use vmm::engine::{Mode, RunOptions};

use crate::corpus::{DirCorpus, Mirror};
use crate::executor::{self, Limits, NmiExecutor, Parts};
use crate::feedback::{VerdictFeedback, VerdictObserver};
use libafl::generators::Generator;

use crate::input::{NmiInput, ScheduleGenerator};
use crate::nmi_mutations;
use crate::stats::Shared;
use crate::store;
use crate::systematic::{Neighbours, SystematicStage};
use crate::target::Target;

pub use crate::states::MAP_SIZE;
/// The name of the NMI-state map observer and its feedback's state metadata.
const STATES: &str = "nmi-states";
/// Inputs generated when the seeds leave the corpus empty: all of them are run, not only
/// until the first that reaches new states, so that the corpus starts as varied as the
/// generator (a random schedule finds a shallow bug within a few dozen executions). 16, not
/// 32: the systematic stage starts from the corpus, and half as many seeds still give it
/// several first NMIs whose handling reopens NMIs (docs/eval.md).
const GENERATED_SEEDS: usize = 16;
/// How often a client reports progress (a `pulse` line).
pub const PULSE: Duration = Duration::from_secs(5);

/// The LibAFL state of a client: corpus and artifacts both mirrored to directories.
pub type State = StdState<DirCorpus, NmiInput, StdRand, DirCorpus>;

/// Everything a client needs to know; the same for every client.
#[derive(Clone, Debug)]
pub struct Config {
    /// The entry variant (validated), fixed for the campaign.
    pub variant: String,
    /// Seeds, already loaded and checked (junk reported by the caller).
    pub seeds: Vec<Schedule>,
    /// Where new corpus entries go (None: memory only), and the content hashes already there.
    pub corpus_dir: Option<PathBuf>,
    /// Where artifacts go.
    pub artifacts: PathBuf,
    /// The faults mutators and the generator may use.
    pub faults: Vec<Fault>,
    /// RNG seed; client `i` uses `seed + i`.
    pub seed: u64,
    /// Per-execution options (wall-clock limit).
    pub options: RunOptions,
    /// When to stop.
    pub limits: Limits,
}

/// Which client of how many this is.
#[derive(Clone, Copy, Debug)]
pub struct Seat {
    /// The client's number: 0 in a single-process campaign, 1..=N as LibAFL's Launcher
    /// numbers its clients.
    pub client: usize,
    /// How many clients the campaign has on this machine.
    pub clients: usize,
}

impl Seat {
    /// The seeds this client evaluates: every `clients`-th one, starting with the first for
    /// client 0 or 1, so that each seed is evaluated by exactly one client; the others receive
    /// what it keeps through the broker. Every client has the same seeds in the same order
    /// (file name order).
    fn share<'s>(&self, seeds: &'s [Schedule]) -> impl Iterator<Item = &'s Schedule> {
        seeds.iter().skip(self.client.saturating_sub(1)).step_by(self.clients)
    }
}

/// Runs one client until a limit is reached, then tells the event manager it exits.
/// `restored` is the state a restarting manager kept across a respawn.
pub fn run_client<EM>(
    restored: Option<State>,
    mut mgr: EM,
    config: &Config,
    shared: &'static Shared,
    seat: Seat,
) -> Result<(), Error>
where
    EM: EventFirer<NmiInput, State>
        + EventReceiver<NmiInput, State>
        + ProgressReporter<State>
        + SendExiting,
{
    let client = seat.client;
    // SIGINT: stop after the current execution, in every client.
    executor::install_sigint_handler();

    // Target: the VM, created here, so after the Launcher's fork: KVM file descriptors belong
    // to the process that made them.
    let mut target = Target::new().map_err(|e| Error::unknown(format!("{e:#}")))?;
    let origin = target.origin();
    // This client's share of the seeds, in the campaign's variant; for the fast mode with
    // their `after` injections restated as the symbolic points where the stepped engine makes
    // them, which the fast mode reaches without stepping.
    let seeds = seat
        .share(&config.seeds)
        .map(|seed| {
            let mut seed = seed.clone();
            seed.variant.clone_from(&config.variant);
            match config.options.mode {
                Mode::Fast => target.symbolic(&seed),
                Mode::Stepped => Ok(seed),
            }
        })
        .collect::<anyhow::Result<Vec<Schedule>>>()
        .map_err(|e| Error::unknown(format!("restating the seeds: {e:#}")))?;
    // The points the generator and the mutators draw from: the instruction table and the
    // places around ring 3.
    let table =
        Arc::new(target.points(&config.variant).map_err(|e| Error::unknown(format!("{e:#}")))?);
    // Where NMIs open again: the systematic stage tries later NMIs nearest these first.
    let iretqs = vmm::engine::table::iretq_sites(target.vm().image(), target.vm().ram())
        .map_err(|e| Error::unknown(format!("{e:#}")))?;
    let parts = Parts::new(target, MAP_SIZE, config.artifacts.clone());

    // Observers: the NMI states reached (`states`), and the verdict.
    let (map, len) = parts.coverage_ptr();
    // SAFETY: the map is owned by the executor made from `parts` below, which also owns this
    // observer; it outlives every use.
    let states =
        HitcountsMapObserver::new(unsafe { StdMapObserver::from_mut_ptr(STATES, map, len) });
    let verdict = VerdictObserver::new();
    let verdict_handle = verdict.handle();

    // Feedback: an input is interesting when it reaches an NMI state none reached before.
    let mut feedback = MaxMapFeedback::new(&states);

    // Objective: a finding whose kind and location have no artifact yet.
    let mut objective = VerdictFeedback::new(&verdict, config.artifacts.clone());

    // State: the RNG, the corpus (mirrored to the corpus directory) and the artifacts.
    let mut state = match restored {
        Some(state) => state,
        None => StdState::new(
            StdRand::with_seed(config.seed.wrapping_add(client as u64)), // RNG
            DirCorpus::new(match &config.corpus_dir {
                // The seeds, and their symbolic forms, are already there.
                Some(dir) => {
                    Mirror::Queue(dir.clone(), known_hashes(config.seeds.iter().chain(&seeds)))
                }
                None => Mirror::None,
            }), // corpus: in memory, each new entry also written to the directory
            DirCorpus::new(Mirror::Artifacts(config.artifacts.clone(), origin)), // artifacts
            &mut feedback,
            &mut objective,
        )?,
    };

    // Scheduler: walks the queue, every entry in turn. A minimizing scheduler (LibAFL's
    // IndexesLenTimeMinimizerScheduler) favoured the shortest, fastest entry of each state,
    // that is schedules with the fewest NMIs, and made the campaign need 1.3 to 6.7 times more
    // executions than random timing to its first finding (docs/history.md, "Evaluation").
    let scheduler = QueueScheduler::new();

    // Fuzzer: scheduler, feedback and objective together.
    let mut fuzzer = StdFuzzer::new(scheduler, feedback, objective);

    // Executor: runs schedules on the VM and enforces the campaign's limits.
    let mut executor = NmiExecutor::new(
        parts,
        config.options,
        tuple_list!(states, verdict),
        verdict_handle,
        config.limits,
        shared,
        client,
    );

    // Initial inputs: this client's share of the seeds (new coverage only), or generated
    // ones if it keeps none. A respawned client has its corpus already.
    let started = Instant::now();
    if state.corpus().count_all() == 0 {
        let mut evaluated = 0;
        for seed in seeds {
            evaluated += 1;
            fuzzer.evaluate_input(&mut state, &mut executor, &mut mgr, &NmiInput(seed))?;
        }
        let mut generator = ScheduleGenerator::new(&config.variant, &config.faults, &table);
        if state.corpus().count() == 0 {
            for _ in 0..GENERATED_SEEDS {
                if state.stop_requested() {
                    break;
                }
                let input = generator.generate(&mut state)?;
                fuzzer.evaluate_input(&mut state, &mut executor, &mut mgr, &input)?;
            }
        }
        if state.corpus().count() == 0 && !state.stop_requested() {
            // Nothing reached new coverage: fuzz from a generated input all the same.
            let input = generator.generate(&mut state)?;
            fuzzer.add_input(&mut state, &mut executor, &mut mgr, input)?;
        }
        println!(
            "#{} INITED cov: {} corp: {} exec/s: {:.0} crashes: {} (client {client}, {evaluated} \
             of {} seeds)",
            state.executions(),
            covered_edges(&state),
            state.corpus().count(),
            *state.executions() as f64 / started.elapsed().as_secs_f64().max(1e-3),
            state.solutions().count(),
            config.seeds.len(),
        );
    }

    // Mutators: structure-aware, stacked 1 to 8 at a time (havoc) ...
    let mutator =
        HavocScheduledMutator::with_max_stack_pow(nmi_mutations!(&config.faults, &table), 3);
    // Stages: each round, first the systematic stage (up to 128 deterministic neighbours of
    // the corpus entries: a second and third NMI at the entry's instructions, where its bugs
    // are), then the mutational stage.
    let entry = Variant::from_name(&config.variant)
        .ok_or_else(|| Error::illegal_argument(format!("variant {}", config.variant)))?
        .entry_symbol();
    let systematic = SystematicStage::new(Neighbours::new(&table, entry, &config.faults, &iretqs));
    let mut stages = tuple_list!(systematic, StdMutationalStage::new(mutator));

    // The loop: until a limit is reached (checked before every execution by the executor).
    // Its time includes the initial inputs' evaluation above: their executions' target time
    // is counted too, and the overhead outside the target must not go negative.
    let counters = shared.client(client);
    counters.loop_nanos.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
    let mut shut_down = false;
    while !state.stop_requested() && !executor.limit_reached() {
        mgr.maybe_report_progress(&mut state, PULSE)?;
        let iteration = Instant::now();
        let result = fuzzer.fuzz_one(&mut stages, &mut executor, &mut state, &mut mgr);
        counters.loop_nanos.fetch_add(iteration.elapsed().as_nanos() as u64, Ordering::Relaxed);
        counters.corpus.store(state.corpus().count() as u64, Ordering::Relaxed);
        counters.imported.store(*state.imported() as u64, Ordering::Relaxed);
        counters.edges.store(covered_edges(&state) as u64, Ordering::Relaxed);
        match result {
            Ok(_) => {}
            Err(Error::ShuttingDown) => {
                shut_down = true; // fuzz_one already told the event manager
                break;
            }
            Err(e) => return Err(e),
        }
    }
    counters.corpus.store(state.corpus().count() as u64, Ordering::Relaxed);
    counters.edges.store(covered_edges(&state) as u64, Ordering::Relaxed);
    mgr.report_progress(&mut state)?;
    if !shut_down {
        // Tells the broker (and a respawner) that this exit is intended.
        mgr.send_exiting()?;
    }
    Ok(())
}

/// Edges covered so far, from the map feedback's state.
fn covered_edges(state: &State) -> usize {
    state
        .named_metadata_map()
        .get::<MapFeedbackMetadata<u8>>(STATES)
        .map_or(0, |m| m.num_covered_map_indexes)
}

/// The content hashes of the seeds, which are already in the corpus directory.
fn known_hashes<'s>(seeds: impl Iterator<Item = &'s Schedule>) -> std::collections::HashSet<u64> {
    seeds.map(store::content_hash).collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn every_seed_goes_to_exactly_one_client() {
        let seeds: Vec<Schedule> = (0..7)
            .map(|i| {
                let json =
                    format!(r#"{{"format":1,"variant":"naive","injections":[{{"after":{i}}}]}}"#);
                Schedule::from_json(json.as_bytes(), Path::new("seed")).unwrap()
            })
            .collect();
        let alone = Seat { client: 0, clients: 1 };
        assert_eq!(alone.share(&seeds).count(), seeds.len());
        for clients in 1..=4 {
            let mut evaluations = vec![0; seeds.len()];
            for client in 1..=clients {
                for seed in (Seat { client, clients }).share(&seeds) {
                    evaluations[seeds.iter().position(|s| std::ptr::eq(s, seed)).unwrap()] += 1;
                }
            }
            assert_eq!(evaluations, vec![1; seeds.len()], "{clients} clients");
        }
    }
}
