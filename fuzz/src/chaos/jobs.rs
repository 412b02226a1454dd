//! The soak's jobs (`--jobs N`): N threads, each with a VM of its own, take run numbers from
//! one counter and make those runs; one recorder, the calling thread, counts their results in
//! run order. Since each run's input depends only on the seed and the run's number
//! ([`Inputs::at`]) and every execution starts from the VM's snapshot, the summary is the same
//! whatever the number of jobs and whichever job made which run, but for its seconds and
//! memory.
//!
//! Each job replays the plain reproducer on its own VM after every run whose number is a
//! multiple of [`SANITY_EVERY`] that it made: with one job, after every 1,000 runs of its VM;
//! with N, after about every 1,000 runs of each VM, and after every 1,000 of the soak.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, mpsc};
use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use nmifuzz_abi::Variant;
use vmm::engine::schedule::Plan;
use vmm::engine::{Execution, RunOptions};

use super::inputs::{Inputs, Kind};
use super::summary::{Took, thread_cpu_time};
use super::{SANITY_EVERY, Sanity};
use crate::target::Target;

/// One soak's runs from `first` to `last`, as its jobs see them.
pub struct Soak {
    pub seed: u64,
    pub variant: Variant,
    pub options: RunOptions,
    pub first: u64,
    pub last: u64,
}

/// One run a job made, for the recorder.
pub struct Ran {
    pub run: u64,
    pub kind: Kind,
    pub plan: Plan,
    pub result: Result<Execution>,
    pub took: Took,
    /// After a run whose number is a multiple of [`SANITY_EVERY`], the plain reproducer's
    /// replay on the same VM.
    pub sanity: Option<Result<(), String>>,
}

/// What the recorder does with the runs, in run order.
pub trait Recorder {
    /// Every job's VM is up, `jobs` VMs with `guest_ram_kib` of guest memory in all, and the
    /// jobs are about to start.
    fn started(&mut self, jobs: u64, guest_ram_kib: u64);
    /// Counts run `ran.run`, the one after the last counted; an error stops the soak.
    fn record(&mut self, ran: Ran) -> Result<()>;
}

/// What a job tells the recorder.
enum Report {
    /// Its VM is up, with this much guest memory in KiB, or it could not be.
    Booted(Result<u64>),
    Ran(Box<Ran>),
}

/// What the jobs share: the next run to make, whether to stop, and when to start and end.
struct Shared<'a> {
    soak: &'a Soak,
    next: AtomicU64,
    stop: AtomicBool,
    /// Opened by the recorder once every VM is up (or one could not be).
    go: Gate,
    /// Opened once the recorder has counted the last run: a job keeps its VM until then, so
    /// that the memory figures of the soak's end are those of every VM.
    done: Gate,
}

/// A gate that threads wait at until it is opened, once and for good.
#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    opened: Condvar,
}

impl Gate {
    fn open(&self) {
        *self.open.lock().expect("not poisoned") = true;
        self.opened.notify_all();
    }

    fn wait(&self) {
        let open = self.open.lock().expect("not poisoned");
        drop(self.opened.wait_while(open, |open| !*open).expect("not poisoned"));
    }
}

/// Makes the runs of `soak` with `jobs` jobs, and hands them to `recorder` in run order.
pub fn run(soak: &Soak, jobs: u64, recorder: &mut impl Recorder) -> Result<()> {
    let runs = soak.last.saturating_sub(soak.first) + 1;
    let jobs = usize::try_from(jobs.clamp(1, runs)).expect("at most 64 jobs");
    let shared = Shared {
        soak,
        next: AtomicU64::new(soak.first),
        stop: AtomicBool::new(false),
        go: Gate::default(),
        done: Gate::default(),
    };
    std::thread::scope(|scope| {
        let (reports, received) = mpsc::channel();
        for number in 1..=jobs {
            let (shared, reports) = (&shared, reports.clone());
            std::thread::Builder::new()
                .name(format!("chaos job {number}"))
                .spawn_scoped(scope, move || job(shared, number, reports))
                .context("cannot start a chaos job's thread")?;
        }
        drop(reports);
        let result = record(&shared, jobs, &received, recorder);
        // Whatever happened, the jobs stop at their next run and the scope waits for them.
        shared.stop.store(true, Ordering::Relaxed);
        shared.go.open();
        shared.done.open();
        result
    })
}

/// The recorder's side: waits for every VM, then counts the runs in run order.
fn record(
    shared: &Shared,
    jobs: usize,
    received: &mpsc::Receiver<Report>,
    recorder: &mut impl Recorder,
) -> Result<()> {
    let mut guest_ram_kib = 0;
    let mut failure = None;
    for _ in 0..jobs {
        match received.recv() {
            Ok(Report::Booted(Ok(kib))) => guest_ram_kib += kib,
            Ok(Report::Booted(Err(e))) => failure = failure.or(Some(e)),
            Ok(Report::Ran(_)) => unreachable!("a job runs only after every job booted"),
            Err(_) => failure = failure.or(Some(anyhow!("a chaos job ended before its VM was up"))),
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    recorder.started(jobs as u64, guest_ram_kib);
    shared.go.open();
    let mut waiting = BTreeMap::new();
    let mut expected = shared.soak.first;
    while expected <= shared.soak.last {
        // Every sender gone before the last run: a job died.
        let Ok(report) = received.recv() else {
            return Err(anyhow!("the chaos jobs ended before run {expected}"));
        };
        let Report::Ran(ran) = report else { unreachable!("every job booted once") };
        waiting.insert(ran.run, ran);
        while let Some(ran) = waiting.remove(&expected) {
            recorder.record(*ran)?;
            expected += 1;
        }
    }
    Ok(())
}

/// Job `number`: boots its VM, then makes runs until there are none left or the soak stops,
/// and keeps its VM until the recorder is done.
fn job(shared: &Shared, number: usize, reports: mpsc::Sender<Report>) {
    let soak = shared.soak;
    let boot = || -> Result<(Target, Sanity)> {
        let mut target = Target::new()?;
        let sanity = Sanity::new(&mut target, soak.variant, soak.options.mode)?;
        Ok((target, sanity))
    };
    // A panic while booting is reported like any failure to boot: the recorder waits for every
    // job's report before it lets any run.
    let booted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(boot))
        .unwrap_or_else(|_| Err(anyhow!("it panicked")))
        .with_context(|| format!("chaos job {number} cannot start its VM"));
    let report = booted.as_ref().map(|(t, _)| t.vm().ram().size() >> 10);
    // A failed send means the recorder is gone, and then the gates are open.
    let _ = reports.send(Report::Booted(report.map_err(|e| anyhow!("{e:#}"))));
    shared.go.wait();
    if let Ok((mut target, sanity)) = booted {
        make_runs(shared, &mut target, &sanity, &reports);
        // The recorder needs no more of this job; its VM stays until the recorder's last
        // figures (a job that panics drops both, and the recorder then stops).
        drop(reports);
        shared.done.wait();
    }
}

/// Makes runs on `target` until there are none left, the soak stops or the recorder is gone.
fn make_runs(
    shared: &Shared,
    target: &mut Target,
    sanity: &Sanity,
    reports: &mpsc::Sender<Report>,
) {
    let soak = shared.soak;
    let image = target.vm().image().clone();
    let mut inputs = Inputs::new(soak.seed, soak.variant, &image);
    while !shared.stop.load(Ordering::Relaxed) {
        let run = shared.next.fetch_add(1, Ordering::Relaxed);
        if run > soak.last {
            break;
        }
        let (kind, plan) = inputs.at(run);
        let (began, cpu) = (Instant::now(), thread_cpu_time());
        let result = target.execute_plan(&plan, &soak.options);
        let took = Took { wall: began.elapsed(), cpu: thread_cpu_time().saturating_sub(cpu) };
        let sanity = run.is_multiple_of(SANITY_EVERY).then(|| sanity.check(target));
        let ran = Ran { run, kind, plan, result, took, sanity };
        if reports.send(Report::Ran(Box::new(ran))).is_err() {
            break;
        }
    }
}
