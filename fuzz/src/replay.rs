//! `nmifuzz replay`: runs reproducers and prints their verdicts, optionally with the full
//! symbolized, disassembled trace.

use std::path::{Path, PathBuf};

use vmm::kernel::schedule::KernelSchedule;

use anyhow::{Context, Result};
use nmifuzz_abi::{NmiStackLayout, Variant};
use serde::Serialize;
use vmm::engine::returns::{WrongReturn, frame_fields};
use vmm::engine::schedule::Schedule;
use vmm::engine::trace::Step;
use vmm::engine::{Execution, NmiStats, RunOptions};
use vmm::{Verdict, Vm};

use crate::options::ReplayArgs;
use crate::target::Target;

/// One replay, as `--json` prints it.
#[derive(Debug, Serialize)]
struct Replayed<'a> {
    file: &'a Path,
    variant: &'a str,
    workload: &'static str,
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
    let kernel_files = args
        .files
        .iter()
        .filter(|f| {
            std::fs::read_to_string(f).is_ok_and(|t| KernelSchedule::is_kernel_schedule(&t))
        })
        .count();
    if kernel_files > 0 {
        if kernel_files < args.files.len() {
            anyhow::bail!("replay real-kernel reproducers and built-in-guest ones separately");
        }
        let files: Vec<&Path> = args.files.iter().map(PathBuf::as_path).collect();
        let timeout = std::time::Duration::from_millis(crate::options::DEFAULT_TIMEOUT_MS * 10);
        return crate::kernel::replay::run(&files, args.trace, args.json, timeout);
    }
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
            if let Some(layout) =
                Variant::from_name(&schedule.variant).and_then(Variant::stack_layout)
            {
                print_nmi_stack(&target, layout);
            }
            if let Verdict::WrongReturn(wrong) = verdict {
                print_wrong_return(wrong);
            }
        }
        let replayed = Replayed {
            file,
            variant: &schedule.variant,
            workload: schedule.workload.name(),
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
        "  variant {}, {} workload, {} instructions stepped, {} exits, {:.2} ms, trace {}",
        r.variant,
        r.workload,
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

/// Prints one line per stop: index, `symbol+offset`, disassembly, NMI depth, the "NMI
/// executing" variable, events.
fn print_trace(vm: &Vm, trace: &[Step]) {
    println!(
        "{:>7}  {:<34} {:<40} {:>5} {:>4}  events",
        "insn", "rip", "instruction", "depth", "exec"
    );
    for step in trace {
        let events: Vec<String> = step.events.iter().map(ToString::to_string).collect();
        let executing = step.nmi_executing.map_or_else(|| "-".to_owned(), |v| v.to_string());
        println!(
            "{:>7}  {:<34} {:<40} {:>5} {:>4}  {}",
            step.index,
            vm.image().symbolize(step.rip),
            vmm::engine::decode::disassemble(vm.ram(), step.rip),
            step.depth,
            executing,
            events.join("; ")
        );
    }
}

/// Draws the NMI stack as the Linux entry lays it out (the seed commit's diagram), filled with
/// the values in guest memory where the run ended.
fn print_nmi_stack(target: &Target, layout: NmiStackLayout) {
    let top = target.nmi_stack_top();
    let vm = target.vm();
    let word = |offset: u64| vm.ram().read_u64(top - offset).unwrap_or(0);
    let rule = "+----------------------------------------------------------------------+";
    let row = |name: &str, address: u64, value: u64, note: String| {
        println!("| {name:<24} {address:#010x}: {value:#018x} {note:<24}|");
    };
    let frame = |name: &str, offset: u64, side: &str| {
        println!("{rule}");
        // The frame's five qwords from the highest address down: SS, RSP, RFLAGS, CS, RIP.
        for (slot, field) in ["SS", "Return RSP", "RFLAGS", "CS", "RIP"].iter().enumerate() {
            let at = offset - 8 * (4 - slot as u64);
            let value = word(at);
            let note = match *field {
                "RIP" => vm.image().symbolize(value),
                _ if slot == 0 => side.to_owned(),
                _ => String::new(),
            };
            row(&format!("{name} {field}"), top - at, value, note);
        }
    };
    println!("\nNMI stack at the end of the run (IST1 top {top:#x}):");
    frame("original", layout.original, "written by the CPU");
    println!("{rule}");
    row("temp storage for rdx", top - layout.temp_rdx, word(layout.temp_rdx), String::new());
    println!("{rule}");
    row("\"NMI executing\"", top - layout.executing, word(layout.executing), String::new());
    frame("iret", layout.iret, "copied from outermost");
    frame("outermost", layout.outermost, "set in first_nmi");
    println!("{rule}");
}

/// The wrong return's two frames side by side: what the NMI interrupted, what the IRETQ pops.
fn print_wrong_return(wrong: &WrongReturn) {
    let differing: Vec<&str> = wrong.differences().iter().map(|d| d.field).collect();
    let (expected, actual) = (&wrong.expected, &wrong.actual);
    println!(
        "\nWrong return: the IRETQ at {} (instruction {}) resumes no context an NMI interrupted.",
        wrong.iretq, wrong.returned_at
    );
    println!(
        "  {:<8} {:<44} {:<44}",
        "",
        format!("NMI #{} interrupted (instruction {})", wrong.nmi, wrong.delivered_at),
        "the IRETQ pops"
    );
    for ((field, want), (_, got)) in frame_fields(expected).into_iter().zip(frame_fields(actual)) {
        let (mut want, mut got) = (format!("{want:#018x}"), format!("{got:#018x}"));
        if field == "RIP" {
            want = format!("{want} {}", wrong.expected_symbol);
            got = format!("{got} {}", wrong.actual_symbol);
        }
        if field == "RSP" && wrong.actual_rsp_on_nmi_stack {
            got.push_str(" (on the NMI stack)");
        }
        let mark = if differing.contains(&field) { "<-- differs" } else { "" };
        println!("  {field:<8} {want:<44} {got:<44} {mark}");
    }
}
