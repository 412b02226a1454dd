//! The LibAFL executor: runs a schedule on the [`Target`], fills the NMI-state map the map
//! observer reads, records the verdict for the objective, and enforces the campaign's limits.
//!
//! LibAFL does not count executions of a custom executor, so this one does (its own counter,
//! the state's and the shared ones). When a limit is reached (`--runs`, `--max-total-time`,
//! the first crash without `--keep-going`, SIGINT, or another client's stop) it asks the state
//! to stop and turns the remaining executions of the current stage into no-ops, so the
//! campaign ends within one execution of the limit.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use libafl::Error;
use libafl::executors::{Executor, ExitKind, HasObservers};
use libafl::state::{HasExecutions, Stoppable};
use libafl_bolts::tuples::{Handle, MatchName, MatchNameRef, RefIndexable};
use vmm::Verdict;
use vmm::engine::schedule::Schedule;
use vmm::engine::{Mode, RunOptions};

use crate::feedback::VerdictObserver;
use crate::input::NmiInput;
use crate::stats::{ClientCounters, Shared};
use crate::store;
use crate::target::Target;

/// Set by SIGINT (see [`install_sigint_handler`]).
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
    // A second Ctrl-C ends the process at once.
    // SAFETY: signal() is async-signal-safe; SIG_DFL is a valid disposition.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_DFL) };
}

/// Makes the first SIGINT stop the campaign after the current execution (with its summary),
/// the second one kill it. Launcher clients call it too, replacing the handler LibAFL's
/// restarting manager installs, which `_exit`s at once; so does the main process of a
/// `--cores` campaign, which runs the broker (see `broker`).
pub fn install_sigint_handler() {
    // SAFETY: the handler only stores to an atomic and calls signal(); both are
    // async-signal-safe.
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
}

/// Whether SIGINT ended the campaign.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

/// When the campaign ends.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The campaign's start (shared by all clients).
    pub start: Instant,
    /// `--max-total-time`.
    pub max_time: Option<Duration>,
    /// `--runs`: executions of all clients.
    pub max_runs: Option<u64>,
    /// Stop every client at the first crash (not `--keep-going`).
    pub stop_on_crash: bool,
}

/// A coverage map owned by the executor; the map observer reads it through a raw pointer.
struct CoverageMap {
    ptr: *mut u8,
    len: usize,
}

impl CoverageMap {
    fn new(len: usize) -> Self {
        let ptr = Box::into_raw(vec![0u8; len].into_boxed_slice()).cast::<u8>();
        Self { ptr, len }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` is the live allocation of `len` bytes made in `new`; the observer that
        // shares it is not used while the engine fills it (LibAFL runs observers before and
        // after `run_target`, never during).
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for CoverageMap {
    fn drop(&mut self) {
        // SAFETY: reconstructs the box leaked in `new`, exactly once.
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(self.ptr, self.len)) });
    }
}

/// The executor; `OT` holds the map observer (over [`NmiExecutor::coverage_ptr`]) and the
/// [`VerdictObserver`].
pub struct NmiExecutor<OT> {
    target: Target,
    options: RunOptions,
    map: CoverageMap,
    observers: OT,
    verdict: Handle<VerdictObserver>,
    limits: Limits,
    shared: &'static Shared,
    client: usize,
    /// Where a schedule the two modes disagree on is saved (the artifacts directory).
    disagreements: PathBuf,
    /// Time spent inside `Target::execute`.
    pub target_time: Duration,
    /// Executions of this executor.
    pub executions: u64,
    /// Executions that ended in a finding.
    pub crashes: u64,
}

/// The pieces an executor is made of before its observers exist.
pub struct Parts {
    target: Target,
    map: CoverageMap,
    /// Where a schedule the two modes disagree on is saved.
    disagreements: PathBuf,
}

impl Parts {
    /// The target, a zeroed coverage map of `len` bytes, and the directory for schedules the
    /// two modes disagree on (the artifacts directory).
    pub fn new(target: Target, len: usize, disagreements: PathBuf) -> Self {
        Self { target, map: CoverageMap::new(len), disagreements }
    }

    /// The coverage map, for `StdMapObserver::from_mut_ptr`; valid until the executor made
    /// from these parts is dropped.
    pub fn coverage_ptr(&self) -> (*mut u8, usize) {
        (self.map.ptr, self.map.len)
    }
}

impl<OT> NmiExecutor<OT> {
    /// An executor of `parts`, with observers built over [`Parts::coverage_ptr`].
    pub fn new(
        parts: Parts,
        options: RunOptions,
        observers: OT,
        verdict: Handle<VerdictObserver>,
        limits: Limits,
        shared: &'static Shared,
        client: usize,
    ) -> Self {
        Self {
            target: parts.target,
            options,
            map: parts.map,
            observers,
            verdict,
            limits,
            shared,
            client,
            disagreements: parts.disagreements,
            target_time: Duration::ZERO,
            executions: 0,
            crashes: 0,
        }
    }

    fn counters(&self) -> &'static ClientCounters {
        self.shared.client(self.client)
    }

    /// Whether a limit says the campaign is over.
    pub fn limit_reached(&self) -> bool {
        if interrupted() {
            self.shared.interrupted.store(true, Ordering::Relaxed);
            return true;
        }
        self.shared.stop_requested()
            || self.limits.max_time.is_some_and(|t| self.limits.start.elapsed() >= t)
            || self
                .limits
                .max_runs
                .is_some_and(|n| self.shared.total_executions.load(Ordering::Relaxed) >= n)
    }
}

impl<OT> NmiExecutor<OT> {
    /// The verdict to keep for `schedule`: a finding of the fast mode is re-run on the stepped
    /// engine, the reference, and saved only as the stepped engine judges it. A disagreement
    /// (another verdict signature) is reported in one line, its schedule saved beside the
    /// artifacts, since the two modes must agree.
    fn confirmed(&mut self, schedule: &Schedule, verdict: Verdict) -> Result<Verdict, Error> {
        if self.options.mode != Mode::Fast || !verdict.is_finding() {
            return Ok(verdict);
        }
        let stepped = RunOptions { mode: Mode::Stepped, ..self.options };
        let reference = self
            .target
            .execute(schedule, &stepped, &mut [])
            .map_err(|e| Error::unknown(format!("re-running a finding stepped: {e:#}")))?
            .outcome
            .verdict;
        if reference.signature() != verdict.signature() {
            let report = store::record_disagreement(
                &self.disagreements,
                schedule,
                &verdict.signature(),
                &reference.signature(),
            );
            eprintln!("WARNING: {report}; keeping the stepped engine's verdict");
        }
        Ok(reference)
    }
}

impl<EM, S, Z, OT> Executor<EM, NmiInput, S, Z> for NmiExecutor<OT>
where
    S: HasExecutions + Stoppable,
    OT: MatchName,
{
    fn run_target(
        &mut self,
        _fuzzer: &mut Z,
        state: &mut S,
        _mgr: &mut EM,
        input: &NmiInput,
    ) -> Result<ExitKind, Error> {
        if self.limit_reached() {
            // Leave the map empty and the verdict a pass: nothing is added or saved.
            state.request_stop();
            return Ok(ExitKind::Ok);
        }
        *state.executions_mut() += 1; // custom executors count their executions themselves
        self.executions += 1;
        self.shared.total_executions.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let execution = self
            .target
            .execute(&input.0, &self.options, self.map.as_mut_slice())
            .map_err(|e| Error::unknown(format!("executing a schedule: {e:#}")))?;
        let verdict = self.confirmed(&input.0, execution.outcome.verdict)?;
        let elapsed = started.elapsed();
        self.target_time += elapsed;
        let counters = self.counters();
        counters.executions.fetch_add(1, Ordering::Relaxed);
        counters.target_nanos.fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
        let verdict = &verdict;
        self.observers
            .get_mut(&self.verdict)
            .ok_or_else(|| Error::illegal_state("the verdict observer is missing"))?
            .set(verdict);
        if !verdict.is_finding() {
            return Ok(ExitKind::Ok);
        }
        self.crashes += 1;
        counters.crashes.fetch_add(1, Ordering::Relaxed);
        let since_start = self.limits.start.elapsed().as_nanos().max(1) as u64;
        let _ = counters.first_crash_nanos.compare_exchange(
            0,
            since_start,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        if self.limits.stop_on_crash {
            self.shared.request_stop();
            state.request_stop();
        }
        Ok(match verdict {
            Verdict::Timeout { .. } => ExitKind::Timeout,
            _ => ExitKind::Crash,
        })
    }
}

impl<OT> HasObservers for NmiExecutor<OT> {
    type Observers = OT;

    fn observers(&self) -> RefIndexable<&Self::Observers, Self::Observers> {
        RefIndexable::from(&self.observers)
    }

    fn observers_mut(&mut self) -> RefIndexable<&mut Self::Observers, Self::Observers> {
        RefIndexable::from(&mut self.observers)
    }
}
