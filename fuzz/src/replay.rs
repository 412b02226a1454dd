//! `nmifuzz replay`: runs reproducers and prints their verdicts, optionally with the full
//! symbolized, disassembled trace.

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;
use vmm::Vm;
use vmm::engine::schedule::Schedule;
use vmm::engine::trace::Step;
use vmm::engine::{Execution, NmiStats, RunOptions};

use crate::options::ReplayArgs;
use crate::target::Target;

/// One replay, as `--json` prints it.
#[derive(Debug, Serialize)]
struct Replayed<'a> {
    file: &'a Path,
    variant: &'a str,
    verdict: &'static str,
    message: String,
    instructions: u64,
    trace_hash: String,
    nmi: NmiStats,
    exits: u64,
    elapsed_us: u128,
    warnings: Vec<String>,
}

/// Replays every file; returns whether any ended in a finding.
pub fn run(args: &ReplayArgs) -> Result<bool> {
    let mut target = Target::new()?;
    let mut any_finding = false;
    for file in &args.files {
        let mut schedule = Schedule::load(file)?;
        if let Some(variant) = &args.variant {
            schedule.variant = variant.clone();
        }
        let warnings = target.provenance_warnings(&schedule);
        if !args.json {
            for warning in &warnings {
                eprintln!("warning: {}: {warning}", file.display());
            }
        }
        let options = RunOptions { keep_trace: args.trace, ..RunOptions::default() };
        let execution = target
            .execute(&schedule, &options, &mut [])
            .with_context(|| file.display().to_string())?;
        let verdict = &execution.outcome.verdict;
        any_finding |= verdict.is_finding();
        if args.trace {
            print_trace(target.vm(), &execution.trace);
        }
        let replayed = Replayed {
            file,
            variant: &schedule.variant,
            verdict: verdict.kind(),
            message: verdict.to_string(),
            instructions: execution.instructions,
            trace_hash: format!("{:016x}", execution.trace_hash),
            nmi: execution.nmi,
            exits: execution.outcome.exits,
            elapsed_us: execution.outcome.elapsed.as_micros(),
            warnings,
        };
        if args.json {
            println!("{}", serde_json::to_string(&replayed)?);
        } else {
            print_summary(&replayed, &execution);
        }
    }
    Ok(any_finding)
}

fn print_summary(r: &Replayed<'_>, execution: &Execution) {
    let nmi = &r.nmi;
    println!("{}: {} [{}]", r.file.display(), r.message, r.verdict);
    println!(
        "  variant {}, {} instructions stepped, {} exits, {:.2} ms, trace {}",
        r.variant,
        r.instructions,
        r.exits,
        r.elapsed_us as f64 / 1000.0,
        r.trace_hash
    );
    println!(
        "  NMIs: {} injected, {} delivered ({} latched first), {} dropped; {} do_nmi iterations; \
         guest counted {} calls",
        nmi.injected,
        nmi.delivered,
        nmi.latched,
        nmi.dropped,
        nmi.iterations,
        execution.outcome.counters.do_nmi_calls
    );
}

/// Prints one line per stop: index, `symbol+offset`, disassembly, depth, events.
fn print_trace(vm: &Vm, trace: &[Step]) {
    println!("{:>7}  {:<34} {:<40} {:>5}  events", "insn", "rip", "instruction", "depth");
    for step in trace {
        let events: Vec<String> = step.events.iter().map(ToString::to_string).collect();
        println!(
            "{:>7}  {:<34} {:<40} {:>5}  {}",
            step.index,
            vm.image().symbolize(step.rip),
            vmm::engine::decode::disassemble(vm.ram(), step.rip),
            step.depth,
            events.join("; ")
        );
    }
}
