//! `nmifuzz tmin` of a real-kernel reproducer: remove NMIs and operations and make counts and
//! occurrences smallest, one candidate at a time, keeping a candidate when it ends in the same
//! kind of finding; repeat until nothing changes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use vmm::kernel::schedule::{KernelSchedule, Operation};

use super::KernelTarget;
use super::input::KernelInput;
use crate::store;

/// The smaller schedules to try instead of `s`, most shrinking first.
fn candidates(s: &KernelSchedule) -> Vec<KernelSchedule> {
    let mut out = Vec::new();
    for i in 0..s.nmis.len() {
        let mut c = s.clone();
        c.nmis.remove(i);
        out.push(c);
    }
    for i in 0..s.operations.len() {
        let mut c = s.clone();
        c.operations.remove(i);
        out.push(c);
    }
    for i in 0..s.nmis.len() {
        if s.nmis[i].occurrence > 1 {
            let mut c = s.clone();
            c.nmis[i].occurrence -= 1;
            out.push(c);
        }
    }
    for i in 0..s.operations.len() {
        let mut c = s.clone();
        let count = match &mut c.operations[i] {
            Operation::Syscall(n)
            | Operation::PageFault(n)
            | Operation::Espfix(n)
            | Operation::BadSigreturn(n)
            | Operation::Spin(n)
            | Operation::SyscallWithRsp { count: n, .. } => n,
            Operation::Watch(_) | Operation::Unwatch => continue,
        };
        if *count > 1 {
            *count -= 1;
            out.push(c);
        }
    }
    out
}

/// Minimizes `file`; writes `minimized-<hash>.json` into `output` (default: next to it).
pub fn run(file: &Path, output: Option<&Path>, timeout: Duration) -> Result<()> {
    let original = KernelSchedule::load(file).map_err(|e| anyhow!(e))?;
    let mut target = KernelTarget::for_schedule(&original, file)?;
    let kind = target.execute(&original, timeout)?.verdict;
    if !kind.is_finding() {
        bail!("{} does not end in a finding ({kind})", file.display());
    }
    let mut best = original;
    let mut executions = 1;
    'shrink: loop {
        for candidate in candidates(&best) {
            executions += 1;
            let verdict = target.execute(&candidate, timeout)?.verdict;
            if verdict.kind() == kind.kind() {
                best = candidate;
                continue 'shrink;
            }
        }
        break;
    }
    best.description = format!("minimized by nmifuzz tmin from {}: {kind}", file.display());
    let input = KernelInput(best);
    let dir: PathBuf = output
        .map_or_else(|| file.parent().unwrap_or(Path::new(".")).to_path_buf(), Path::to_path_buf);
    store::ensure_dir(&dir)?;
    let path = dir.join(format!("minimized-{}", input.corpus_name()));
    store::write_atomic(&path, input.to_json().as_bytes())?;
    println!(
        "minimized in {executions} executions to {} NMIs and {} operations: {}",
        input.0.nmis.len(),
        input.0.operations.len(),
        path.display()
    );
    Ok(())
}
