//! `nmifuzz tmin`: minimizes a reproducer with a deterministic delta-debugging loop over the
//! schedule, run directly on the [`Target`] (LibAFL's tmin stage removes one step per pass).
//!
//! A candidate is kept when it ends in the same finding: the same [`vmm::Verdict::signature`], the one
//! finding identity (the campaign's artifacts and the sweep use it too). Passes, each only shrinking, repeat until none changes
//! anything:
//! 1. remove injections, in chunks of halving size (ddmin), then one by one;
//! 2. remove handler actions (from the end first: later `do_nmi` calls may not happen), then
//!    faults one by one;
//! 3. make every count smallest: each injection's `after`/`extra` and each action's `busy`,
//!    by trying 0 and then a binary search below the current value.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use vmm::engine::RunOptions;
use vmm::engine::schedule::{Injection, Schedule};

use crate::options::TminArgs;
use crate::progress::Progress;
use crate::store;
use crate::target::Target;

/// How big a schedule is, compared lexicographically: injections, actions, faults, then the
/// sum of its counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size {
    /// Injections.
    pub injections: usize,
    /// Handler actions.
    pub actions: usize,
    /// Faults over all actions.
    pub faults: usize,
    /// Sum of `after`/`extra` and `busy`.
    pub counts: u64,
}

impl Size {
    /// The size of `s`.
    pub fn of(s: &Schedule) -> Self {
        let delays: u64 = s
            .injections
            .iter()
            .map(|i| match i {
                Injection::After(n) => *n,
                Injection::At(p) => p.extra,
            })
            .sum();
        Self {
            injections: s.injections.len(),
            actions: s.actions.len(),
            faults: s.actions.iter().map(|a| a.faults.len()).sum(),
            counts: delays + s.actions.iter().map(|a| u64::from(a.busy)).sum::<u64>(),
        }
    }
}

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} injections, {} actions, {} faults, counts summing to {}",
            self.injections, self.actions, self.faults, self.counts
        )
    }
}

/// The minimizer: the target and the finding to keep.
pub struct Minimizer<'t> {
    target: &'t mut Target,
    options: RunOptions,
    key: String,
    /// Executions so far.
    pub executions: u64,
    /// Counts them for the user (the total is not known in advance).
    progress: Progress,
}

impl<'t> Minimizer<'t> {
    /// Runs `schedule` once; fails unless it ends in a finding, which becomes the one to keep.
    pub fn new(target: &'t mut Target, options: RunOptions, schedule: &Schedule) -> Result<Self> {
        let verdict = target.execute(schedule, &options, &mut [])?.outcome.verdict;
        if !verdict.is_finding() {
            bail!("the schedule does not end in a finding ({verdict}): nothing to minimize");
        }
        let key = verdict.signature();
        println!("INFO: keeping the finding: {verdict} [{}]", verdict.kind());
        let progress = Progress::counter("executions", true);
        progress.inc(1);
        Ok(Self { target, options, key, executions: 1, progress })
    }

    /// Whether `candidate` ends in the same finding.
    fn keeps(&mut self, candidate: &Schedule) -> Result<bool> {
        self.executions += 1;
        self.progress.inc(1);
        let verdict = self.target.execute(candidate, &self.options, &mut [])?.outcome.verdict;
        Ok(verdict.is_finding() && verdict.signature() == self.key)
    }

    /// Minimizes `schedule` to a fixpoint of all passes.
    pub fn minimize(&mut self, mut schedule: Schedule) -> Result<Schedule> {
        loop {
            let before = schedule.clone();
            self.remove_injections(&mut schedule)?;
            self.remove_actions(&mut schedule)?;
            self.shrink_counts(&mut schedule)?;
            if schedule == before {
                self.progress.finish();
                return Ok(schedule);
            }
            self.progress.set_message(format!("now {}", Size::of(&schedule)));
        }
    }

    fn remove_injections(&mut self, s: &mut Schedule) -> Result<()> {
        let mut chunk = s.injections.len().div_ceil(2).max(1);
        loop {
            let mut start = 0;
            while start < s.injections.len() && s.injections.len() > 1 {
                let end = (start + chunk).min(s.injections.len());
                let mut candidate = s.clone();
                candidate.injections.drain(start..end);
                if !candidate.injections.is_empty() && self.keeps(&candidate)? {
                    *s = candidate;
                } else {
                    start = end;
                }
            }
            if chunk == 1 {
                return Ok(());
            }
            chunk = chunk.div_ceil(2);
        }
    }

    fn remove_actions(&mut self, s: &mut Schedule) -> Result<()> {
        let mut i = s.actions.len();
        while i > 0 {
            i -= 1;
            let mut candidate = s.clone();
            candidate.actions.remove(i);
            if self.keeps(&candidate)? {
                *s = candidate;
            }
        }
        for a in 0..s.actions.len() {
            let mut f = s.actions[a].faults.len();
            while f > 0 {
                f -= 1;
                let mut candidate = s.clone();
                candidate.actions[a].faults.remove(f);
                if self.keeps(&candidate)? {
                    *s = candidate;
                }
            }
        }
        Ok(())
    }

    fn shrink_counts(&mut self, s: &mut Schedule) -> Result<()> {
        for i in 0..s.injections.len() {
            let value = |s: &Schedule| match &s.injections[i] {
                Injection::After(n) => *n,
                Injection::At(p) => p.extra,
            };
            let set = |s: &mut Schedule, v: u64| match &mut s.injections[i] {
                Injection::After(n) => *n = v,
                Injection::At(p) => p.extra = v,
            };
            self.shrink_one(s, value, set)?;
        }
        for a in 0..s.actions.len() {
            self.shrink_one(
                s,
                |s| u64::from(s.actions[a].busy),
                |s, v| s.actions[a].busy = v as u32,
            )?;
        }
        Ok(())
    }

    /// Makes one count as small as the finding allows: 0 if possible, else a binary search
    /// for the smallest value that keeps it (assuming smaller values below a failing one fail
    /// too; a candidate is only taken when it was run and kept).
    fn shrink_one(
        &mut self,
        s: &mut Schedule,
        value: impl Fn(&Schedule) -> u64,
        set: impl Fn(&mut Schedule, u64),
    ) -> Result<()> {
        let current = value(s);
        if current == 0 {
            return Ok(());
        }
        let try_value = |this: &mut Self, s: &mut Schedule, v: u64| -> Result<bool> {
            let mut candidate = s.clone();
            set(&mut candidate, v);
            let kept = this.keeps(&candidate)?;
            if kept {
                *s = candidate;
            }
            Ok(kept)
        };
        if try_value(self, s, 0)? {
            return Ok(());
        }
        let (mut low, mut high) = (1, current); // `high` keeps the finding, `low - 1` does not
        while low < high {
            let mid = low + (high - low) / 2;
            if try_value(self, s, mid)? {
                high = mid;
            } else {
                low = mid + 1;
            }
        }
        // `s` now holds `high`: every kept candidate was taken as it was found.
        Ok(())
    }
}

/// `nmifuzz tmin`.
pub fn run(args: &TminArgs) -> Result<()> {
    if std::fs::read_to_string(&args.file)
        .is_ok_and(|t| vmm::kernel::schedule::KernelSchedule::is_kernel_schedule(&t))
    {
        let timeout = std::time::Duration::from_millis(args.timeout_ms);
        return crate::kernel::tmin::run(&args.file, args.output.as_deref(), timeout);
    }
    let original = Schedule::load(&args.file)?;
    let mut target = Target::new()?;
    let options = crate::target::run_options(args.timeout_ms);
    let mut minimizer = Minimizer::new(&mut target, options, &original)?;
    let mut minimized = minimizer.minimize(original.clone())?;
    let executions = minimizer.executions;
    minimized.origin = Some(target.origin());
    minimized.description = format!(
        "minimized by nmifuzz tmin from {}{}",
        args.file.display(),
        if original.description.is_empty() {
            String::new()
        } else {
            format!(": {}", original.description)
        }
    );
    let dir = match &args.output {
        Some(dir) => dir.clone(),
        None => args.file.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf),
    };
    let dir = if dir.as_os_str().is_empty() { PathBuf::from(".") } else { dir };
    store::prepare_dir(&dir)?;
    let path = dir.join(format!("minimized-{:016x}.json", store::content_hash(&minimized)));
    store::write_atomic(&path, minimized.to_json().as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!("before: {}", Size::of(&original));
    println!("after:  {}", Size::of(&minimized));
    println!("INFO: {executions} executions; minimized reproducer written to {}", path.display());
    Ok(())
}
