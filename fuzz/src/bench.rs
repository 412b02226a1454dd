//! `nmifuzz bench`: the VMM's costs on this host, each as a median and as a ratio to the raw
//! exit round trip measured in the same run, so the numbers compare across hosts.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nmifuzz_abi::{Script, Variant, Workload, port};
use serde::Serialize;
use vmm::exit::Exit;
use vmm::{RunLimits, Verdict, Vm, VmConfig};

use crate::options::BenchArgs;

/// Pages the guest dirties before the reset measurement ("a few", as a real run does).
const DIRTY_PAGES: u32 = 4;

/// The report, also the `--json` object.
#[derive(Debug, Serialize)]
struct Report {
    /// Median KVM_RUN round trip of a guest `out` exit, in µs.
    exit_roundtrip_us: f64,
    /// Median `reset()` after a run that dirtied [`DIRTY_PAGES`] scratch pages, in µs.
    reset_us: f64,
    /// Pages `reset()` restored in that measurement (the scratch pages plus stack, page
    /// tables and the host-written script).
    reset_pages: usize,
    /// Median `reset()` + script write + run to DONE of a guest that does nothing, in µs.
    reset_run_idle_us: f64,
    /// `reset_us / exit_roundtrip_us`.
    reset_ratio: f64,
    /// `reset_run_idle_us / exit_roundtrip_us`.
    reset_run_idle_ratio: f64,
    /// Samples per measurement.
    samples: u32,
}

pub fn run(args: &BenchArgs) -> Result<()> {
    let mut vm = Vm::new(&VmConfig::default(), vmm::EMBEDDED_GUEST.to_vec())
        .context("cannot start the VM")?;
    let exit_roundtrip = exit_roundtrip(&mut vm, args.samples)?;
    let (reset, reset_pages) = reset_cost(&mut vm, args.samples)?;
    let reset_run_idle = reset_run_idle(&mut vm, args.samples)?;
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let report = Report {
        exit_roundtrip_us: us(exit_roundtrip),
        reset_us: us(reset),
        reset_pages,
        reset_run_idle_us: us(reset_run_idle),
        reset_ratio: us(reset) / us(exit_roundtrip),
        reset_run_idle_ratio: us(reset_run_idle) / us(exit_roundtrip),
        samples: args.samples,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

fn print_table(r: &Report) {
    println!("{:<44} {:>10} {:>16}", "measurement (median)", "µs", "x exit round trip");
    let row = |name: &str, value: f64, ratio: f64| {
        println!("{name:<44} {value:>10.2} {ratio:>15.2}x");
    };
    row("raw exit round trip (guest `out`)", r.exit_roundtrip_us, 1.0);
    row(&format!("reset() ({} dirty pages)", r.reset_pages), r.reset_us, r.reset_ratio);
    row("reset() + run to DONE, idle guest", r.reset_run_idle_us, r.reset_run_idle_ratio);
    println!("({} samples each)", r.samples);
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort_unstable();
    samples[samples.len() / 2]
}

/// Times each KVM_RUN between two consecutive `out` exits of the guest's ping loop.
fn exit_roundtrip(vm: &mut Vm, samples: u32) -> Result<Duration> {
    vm.reset()?;
    vm.write_script(&Script::new(Variant::Naive, Workload::Ping, samples + 1))?;
    // The first exit includes the script read and the cold start; not measured.
    expect_ping(vm.run_once()?)?;
    let mut times = Vec::with_capacity(samples as usize);
    for _ in 0..samples {
        let start = Instant::now();
        let exit = vm.run_once()?;
        times.push(start.elapsed());
        expect_ping(exit)?;
    }
    Ok(median(times))
}

fn expect_ping(exit: Exit) -> Result<()> {
    match exit {
        Exit::IoOut { port: port::PING, .. } => Ok(()),
        other => bail!("the ping workload exited with {other:?} instead of a ping"),
    }
}

/// Times `reset()` after runs that dirty [`DIRTY_PAGES`] pages.
fn reset_cost(vm: &mut Vm, samples: u32) -> Result<(Duration, usize)> {
    let script = Script::new(Variant::Naive, Workload::Scribble, DIRTY_PAGES);
    let mut times = Vec::with_capacity(samples as usize);
    let mut pages = 0;
    vm.reset()?;
    for _ in 0..samples {
        vm.write_script(&script)?;
        let outcome = vm.run(&RunLimits::default())?;
        ensure!(outcome.verdict == Verdict::Done, "scribble run: {}", outcome.verdict);
        let start = Instant::now();
        pages = vm.reset()?;
        times.push(start.elapsed());
    }
    Ok((median(times), pages))
}

/// Times reset + script write + run to DONE of a guest whose workload is empty.
fn reset_run_idle(vm: &mut Vm, samples: u32) -> Result<Duration> {
    let script = Script::new(Variant::Naive, Workload::Ping, 0);
    let mut times = Vec::with_capacity(samples as usize);
    for _ in 0..samples {
        let start = Instant::now();
        vm.reset()?;
        vm.write_script(&script)?;
        let outcome = vm.run(&RunLimits::default())?;
        times.push(start.elapsed());
        ensure!(outcome.verdict == Verdict::Done, "idle run: {}", outcome.verdict);
    }
    Ok(median(times))
}
