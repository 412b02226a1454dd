//! `nmifuzz bench --kernel`: the real-kernel VM's costs on this host, each a median and a ratio
//! to the bare exit round trip measured in the same run.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use serde::Serialize;
use vmm::kernel::schedule::{FORMAT, KernelSchedule, NmiPoint, Operation, Place};

use super::KernelTarget;

/// The report, also the `--json` object.
#[derive(Debug, Serialize)]
struct Report {
    /// Boot to the agent's Ready, snapshot and calibration included, in s.
    boot_s: f64,
    /// Guest memory in the snapshot, in MiB.
    snapshot_mib: u64,
    /// Median bare exit round trip (the agent's doorbell write), in µs.
    exit_roundtrip_us: f64,
    /// Median reset after a typical run, in µs.
    reset_us: f64,
    /// Memory pages that reset restored (median).
    reset_pages: usize,
    /// Median execution of a run with nothing to do (reset, run to Done), in µs.
    exec_empty_us: f64,
    /// Median execution of a typical run: three system calls, two page faults, a watchpoint
    /// on `nmi_state`, and two NMIs (in the SYSCALL gap, at the #PF entry), in µs.
    exec_typical_us: f64,
    /// Ratios of the above to the exit round trip.
    reset_ratio: f64,
    exec_empty_ratio: f64,
    exec_typical_ratio: f64,
}

fn schedule(
    target: &KernelTarget,
    operations: Vec<Operation>,
    nmis: Vec<NmiPoint>,
) -> KernelSchedule {
    KernelSchedule {
        format: FORMAT.into(),
        description: "nmifuzz bench".into(),
        kernel: target.id.clone(),
        operations,
        nmis,
    }
}

fn median(mut times: Vec<Duration>) -> f64 {
    times.sort();
    times.get(times.len() / 2).map_or(0.0, |d| d.as_secs_f64() * 1e6)
}

/// Measures and prints.
pub fn run(kernel: &Path, system_map: Option<&Path>, samples: u32, json: bool) -> Result<()> {
    let started = Instant::now();
    let mut target = KernelTarget::boot(kernel, system_map)?;
    let boot_s = started.elapsed().as_secs_f64();
    let limit = Duration::from_secs(30);
    let empty = schedule(&target, Vec::new(), Vec::new());
    let typical = schedule(
        &target,
        vec![
            Operation::Watch(Place::PerCpu("nmi_state".into())),
            Operation::Syscall(3),
            Operation::PageFault(2),
        ],
        vec![
            NmiPoint { at: "entry_SYSCALL_64".into(), occurrence: 2 },
            NmiPoint { at: "asm_exc_page_fault".into(), occurrence: 1 },
        ],
    );
    let (mut exits, mut resets, mut pages, mut empties, mut typicals) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..samples {
        let t = Instant::now();
        let run = target.execute(&empty, limit)?;
        empties.push(t.elapsed());
        ensure!(!run.verdict.is_finding(), "the empty run ended in a finding: {}", run.verdict);
        exits.extend(target.vm.time_exit_round_trips(4)?);
        let t = Instant::now();
        let run = target.execute(&typical, limit)?;
        typicals.push(t.elapsed());
        ensure!(!run.verdict.is_finding(), "the typical run ended in a finding: {}", run.verdict);
        let (reset, restored) = target.vm.time_reset()?;
        resets.push(reset);
        pages.push(restored);
    }
    pages.sort_unstable();
    let exit = median(exits);
    let report = Report {
        boot_s,
        snapshot_mib: target.vm.facts().snapshot_bytes >> 20,
        exit_roundtrip_us: exit,
        reset_us: median(resets.clone()),
        reset_pages: pages[pages.len() / 2],
        exec_empty_us: median(empties.clone()),
        exec_typical_us: median(typicals.clone()),
        reset_ratio: median(resets) / exit,
        exec_empty_ratio: median(empties) / exit,
        exec_typical_ratio: median(typicals) / exit,
    };
    if json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    let r = &report;
    println!("real kernel {} ({samples} samples, medians)", kernel.display());
    println!(
        "  boot to the agent's Ready   {:>10.1} s   (snapshot {} MiB)",
        r.boot_s, r.snapshot_mib
    );
    println!("  exit round trip             {:>10.1} µs", r.exit_roundtrip_us);
    println!(
        "  reset                       {:>10.1} µs  {:>7.1}x exit  ({} pages)",
        r.reset_us, r.reset_ratio, r.reset_pages
    );
    println!(
        "  empty execution             {:>10.1} µs  {:>7.1}x exit",
        r.exec_empty_us, r.exec_empty_ratio
    );
    println!(
        "  typical execution           {:>10.1} µs  {:>7.1}x exit",
        r.exec_typical_us, r.exec_typical_ratio
    );
    Ok(())
}
