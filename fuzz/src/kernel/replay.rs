//! `nmifuzz replay` of a real-kernel reproducer: boot the kernel it names (checking it is the
//! same image), run the schedule, print the verdict, and with `--trace` what happened: every
//! NMI injected and delivered, the NMI stack at each delivery, the #DBs the kernel's
//! watchpoint raised, and each return.

use std::path::Path;
use std::time::Duration;

use anyhow::{Result, anyhow};
use serde::Serialize;
use vmm::kernel::schedule::KernelSchedule;

use super::KernelTarget;

/// One replay as JSON (`--json`).
#[derive(Serialize)]
struct Replayed<'a> {
    file: &'a Path,
    kernel: &'a str,
    verdict: &'static str,
    message: String,
    injected: u32,
    delivered: usize,
    debug_exceptions: usize,
    exits: u64,
}

/// Replays kernel schedules (all for the same kernel); returns whether any ended in a finding.
pub fn run(files: &[&Path], trace: bool, json: bool, timeout: Duration) -> Result<bool> {
    let mut target: Option<KernelTarget> = None;
    let mut any_finding = false;
    for &file in files {
        let schedule = KernelSchedule::load(file).map_err(|e| anyhow!(e))?;
        let target = match &mut target {
            Some(t) if t.id.hash == schedule.kernel.hash => t,
            slot => slot.insert(KernelTarget::for_schedule(&schedule, file)?),
        };
        let execution = target.execute(&schedule, timeout)?;
        any_finding |= execution.verdict.is_finding();
        if trace {
            for line in &execution.trace {
                println!("{line}");
            }
        }
        let replayed = Replayed {
            file,
            kernel: &schedule.kernel.path,
            verdict: execution.verdict.kind(),
            message: execution.verdict.to_string(),
            injected: execution.injected,
            delivered: execution.deliveries.len(),
            debug_exceptions: execution.debug_exceptions.len(),
            exits: execution.exits,
        };
        if json {
            println!("{}", serde_json::to_string(&replayed)?);
        } else {
            println!("{}: {} [{}]", file.display(), replayed.message, replayed.verdict);
            println!(
                "  kernel {}, {} NMIs injected, {} delivered, {} #DB from the watchpoint, {} exits",
                replayed.kernel,
                replayed.injected,
                replayed.delivered,
                replayed.debug_exceptions,
                replayed.exits
            );
        }
    }
    Ok(any_finding)
}
