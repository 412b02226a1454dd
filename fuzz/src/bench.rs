//! `nmifuzz bench`: the VMM's costs on this host, each as a median and as a ratio to the raw
//! exit round trip measured in the same run, so the numbers compare across hosts.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nmifuzz_abi::{Action, Script, Variant, Workload, fault, port};
use serde::Serialize;
use vmm::engine::profile;
use vmm::engine::schedule::{Plan, SCHEDULE_MAX_DELAY, Trigger};
use vmm::engine::symbolic::symbolic_triggers;
use vmm::engine::{Engine, Mode, RunOptions};
use vmm::exit::Exit;
use vmm::vm::GuestDebug;
use vmm::{RunLimits, Verdict, Vm, VmConfig};

use crate::options::BenchArgs;

/// `--samples` on a real kernel when it is not given: its runs take milliseconds.
const KERNEL_SAMPLES: u32 = 50;

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
    /// Median time per single-stepped guest instruction (a fully stepped run), in µs.
    step_us: f64,
    /// `step_us / exit_roundtrip_us`.
    step_ratio: f64,
    /// Median execution of a typical 3-NMI schedule by the engine (reset to verdict), in µs.
    exec_3nmi_us: f64,
    /// `exec_3nmi_us / exit_roundtrip_us`.
    exec_3nmi_ratio: f64,
    /// Share of the 3-NMI execution spent outside KVM_RUN: the VMM's and engine's own work.
    engine_overhead: f64,
    /// Median execution of the same 3-NMI schedule as symbolic points (measured by one stepped
    /// run), on the fast mode, in µs.
    exec_3nmi_fast_us: f64,
    /// `exec_3nmi_fast_us / exit_roundtrip_us`.
    exec_3nmi_fast_ratio: f64,
    /// `exec_3nmi_us / exec_3nmi_fast_us`: how many times faster the fast mode is.
    fast_speedup: f64,
    /// Median reset plus the same execution with no stops but the injections: free runs to
    /// a breakpoint at each point (one exit per hit), the NMI injected there, and nothing
    /// stepped or trapped, in µs. The least any breakpoint-driven mode can cost.
    free_run_floor_us: f64,
    /// `free_run_floor_us / exit_roundtrip_us`.
    free_run_floor_ratio: f64,
    /// `exec_3nmi_fast_us / free_run_floor_us`: the fast mode's cost over the floor.
    fast_over_floor: f64,
    /// Samples per measurement.
    samples: u32,
}

pub fn run(args: &BenchArgs) -> Result<()> {
    if let Some(kernel) = &args.kernel {
        let samples = if args.samples == crate::options::DEFAULT_BENCH_SAMPLES {
            KERNEL_SAMPLES
        } else {
            args.samples
        };
        return crate::kernel::bench::run(kernel, args.system_map.as_deref(), samples, args.json);
    }
    let mut vm = Vm::new(&VmConfig::default(), vmm::EMBEDDED_GUEST.to_vec())
        .context("cannot start the VM")?;
    let exit_roundtrip = exit_roundtrip(&mut vm, args.samples)?;
    let (reset, reset_pages) = reset_cost(&mut vm, args.samples)?;
    let reset_run_idle = reset_run_idle(&mut vm, args.samples)?;
    let profile = profile::calibrate(&mut vm).context("cannot calibrate the engine")?;
    let mut engine = Engine::new(&vm, profile)?;
    let step = step_cost(&mut engine, &mut vm, args.samples)?;
    let plan = three_nmi_plan();
    let (exec_3nmi, engine_overhead) = three_nmi_cost(&mut engine, &mut vm, &plan, args.samples)?;
    let fast_plan = symbolic_plan(&mut engine, &mut vm, &plan)?;
    let fast = RunOptions { mode: Mode::Fast, ..RunOptions::default() };
    let (exec_3nmi_fast, _) =
        three_nmi_cost_with(&mut engine, &mut vm, &fast_plan, &fast, args.samples)?;
    let floor = free_run_floor(&mut vm, &fast_plan, args.samples)?;
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let report = Report {
        exit_roundtrip_us: us(exit_roundtrip),
        reset_us: us(reset),
        reset_pages,
        reset_run_idle_us: us(reset_run_idle),
        reset_ratio: us(reset) / us(exit_roundtrip),
        reset_run_idle_ratio: us(reset_run_idle) / us(exit_roundtrip),
        step_us: step,
        step_ratio: step / us(exit_roundtrip),
        exec_3nmi_us: us(exec_3nmi),
        exec_3nmi_ratio: us(exec_3nmi) / us(exit_roundtrip),
        engine_overhead,
        exec_3nmi_fast_us: us(exec_3nmi_fast),
        exec_3nmi_fast_ratio: us(exec_3nmi_fast) / us(exit_roundtrip),
        fast_speedup: us(exec_3nmi) / us(exec_3nmi_fast),
        free_run_floor_us: us(floor),
        free_run_floor_ratio: us(floor) / us(exit_roundtrip),
        fast_over_floor: us(exec_3nmi_fast) / us(floor),
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
    row("one single-stepped instruction", r.step_us, r.step_ratio);
    row("execution of a 3-NMI schedule", r.exec_3nmi_us, r.exec_3nmi_ratio);
    row("the same, symbolic, on the fast mode", r.exec_3nmi_fast_us, r.exec_3nmi_fast_ratio);
    row(
        "free-run floor of the same (injections only)",
        r.free_run_floor_us,
        r.free_run_floor_ratio,
    );
    println!(
        "fast mode: {:.1}x faster than the stepped engine, {:.2}x the free-run floor",
        r.fast_speedup, r.fast_over_floor
    );
    println!(
        "engine overhead (time outside KVM_RUN) in a 3-NMI execution: {:.1}%",
        r.engine_overhead * 100.0
    );
    println!("({} samples each)", r.samples);
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort_unstable();
    samples[samples.len() / 2]
}

/// Times each KVM_RUN between two consecutive `out` exits of the guest's ping loop.
fn exit_roundtrip(vm: &mut Vm, samples: u32) -> Result<Duration> {
    vm.reset()?;
    vm.write_script(&Script::new(Variant::NAIVE, Workload::Ping, samples + 1))?;
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
    let script = Script::new(Variant::NAIVE, Workload::Scribble, DIRTY_PAGES);
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
    let script = Script::new(Variant::NAIVE, Workload::Ping, 0);
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

/// Runs the loop workload single-stepped from start to DONE (an injection that never comes
/// keeps the engine stepping) and divides by the instructions stepped.
fn step_cost(engine: &mut Engine, vm: &mut Vm, samples: u32) -> Result<f64> {
    let plan = Plan {
        script: Script::new(Variant::NAIVE, Workload::Loop, 20),
        injections: vec![Trigger::After(SCHEDULE_MAX_DELAY)],
    };
    let mut per_step = Vec::with_capacity(samples as usize);
    for _ in 0..samples.div_ceil(10) {
        let execution = engine.run(vm, &plan, &RunOptions::default())?;
        ensure!(
            execution.outcome.verdict == Verdict::Done,
            "stepped run: {}",
            execution.outcome.verdict
        );
        per_step.push(execution.outcome.elapsed / execution.instructions as u32);
    }
    Ok(median(per_step).as_secs_f64() * 1e6)
}

/// A typical schedule: three NMIs during the workload against the default `linux` entry,
/// each `do_nmi` doing a little work and taking a #UD. The second comes while the first is
/// handled (latched, then delivered at the #UD's IRETQ: a nested NMI and a repeat); the third
/// after the first's handling has ended (it ends about 820 instructions after the first
/// injection, the third comes 1,050 after it), so that a guest change of a few dozen
/// instructions leaves all three delivered (`tests/cli.rs` runs the bench).
fn three_nmi_plan() -> Plan {
    let mut script = Script::new(Variant::LINUX, Workload::Loop, 40);
    script.action_count = 3;
    script.actions[..3].fill(Action { busy: 3, faults: fault::UD, ..Action::NONE });
    Plan { script, injections: vec![Trigger::After(60), Trigger::After(150), Trigger::After(900)] }
}

/// The median execution time of `plan` on the stepped engine and the share spent outside
/// KVM_RUN.
fn three_nmi_cost(
    engine: &mut Engine,
    vm: &mut Vm,
    plan: &Plan,
    samples: u32,
) -> Result<(Duration, f64)> {
    three_nmi_cost_with(engine, vm, plan, &RunOptions::default(), samples)
}

/// The median execution time of `plan` with `options` and the share spent outside KVM_RUN.
fn three_nmi_cost_with(
    engine: &mut Engine,
    vm: &mut Vm,
    plan: &Plan,
    options: &RunOptions,
    samples: u32,
) -> Result<(Duration, f64)> {
    let mut times = Vec::with_capacity(samples as usize);
    let (mut total, mut inside) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..samples.div_ceil(4) {
        let before = vm.kvm_run_time();
        let execution = engine.run(vm, plan, options)?;
        ensure!(
            execution.outcome.verdict == Verdict::Done,
            "3-NMI run: {}",
            execution.outcome.verdict
        );
        ensure!(execution.nmi.delivered == 3, "3-NMI run delivered {:?}", execution.nmi);
        inside += vm.kvm_run_time() - before;
        total += execution.outcome.elapsed;
        times.push(execution.outcome.elapsed);
    }
    Ok((median(times), 1.0 - inside.as_secs_f64() / total.as_secs_f64()))
}

/// `plan` with its injections as symbolic points, measured by one traced stepped run; the
/// fast mode must give the same NMI books.
fn symbolic_plan(engine: &mut Engine, vm: &mut Vm, plan: &Plan) -> Result<Plan> {
    let traced = RunOptions { keep_trace: true, ..RunOptions::default() };
    let stepped = engine.run(vm, plan, &traced)?;
    let injections =
        symbolic_triggers(&stepped, plan.injections.len(), |a| engine.anchorable(vm, a))
            .context("the 3-NMI schedule has no symbolic form")?;
    let symbolic = Plan { script: plan.script, injections };
    let fast =
        engine.run(vm, &symbolic, &RunOptions { mode: Mode::Fast, ..RunOptions::default() })?;
    ensure!(
        fast.nmi == stepped.nmi && fast.outcome.verdict == stepped.outcome.verdict,
        "the fast mode disagrees on the 3-NMI schedule: {:?} {} vs {:?} {}",
        fast.nmi,
        fast.outcome.verdict,
        stepped.nmi,
        stepped.outcome.verdict
    );
    Ok(symbolic)
}

/// Times reset + script write + a free run that stops only at `plan`'s points: one exit per
/// breakpoint hit, the NMI injected at the wanted occurrence, on to the next point at once
/// (the NMI arrives before the instruction there); a hit before the wanted occurrence is
/// passed with one step. The run must reach DONE.
fn free_run_floor(vm: &mut Vm, plan: &Plan, samples: u32) -> Result<Duration> {
    let free_run = |address: Option<u64>| GuestDebug {
        single_step: false,
        breakpoints: [address, None, None, None],
    };
    let one_step = GuestDebug { single_step: true, ..GuestDebug::default() };
    let mut times = Vec::with_capacity(samples as usize);
    for _ in 0..samples.div_ceil(4) {
        let start = Instant::now();
        vm.reset()?;
        vm.write_script(&plan.script)?;
        let mut points = plan.injections.iter().filter_map(|trigger| match *trigger {
            Trigger::At { address, occurrence, .. } => Some((address, occurrence)),
            Trigger::After(_) => None,
        });
        let mut next = points.next();
        let mut hits = 0;
        vm.set_debug(free_run(next.map(|(address, _)| address)))?;
        let report = loop {
            match vm.run_once()? {
                Exit::Debug { .. } if next.is_some() => {
                    hits += 1;
                    if next.is_some_and(|(_, occurrence)| hits == occurrence) {
                        vm.inject_nmi()?;
                        (next, hits) = (points.next(), 0);
                    } else {
                        vm.set_debug(one_step)?;
                        vm.run_once()?;
                    }
                    vm.set_debug(free_run(next.map(|(address, _)| address)))?;
                }
                Exit::IoOut { port: port::REPORT, value, .. } => break value,
                Exit::IoOut { .. } | Exit::Int3Performed => {}
                other => bail!("the free-run floor's run ended with {other:?}"),
            }
        };
        times.push(start.elapsed());
        ensure!(
            nmifuzz_abi::Report::from_code(report) == Some(nmifuzz_abi::Report::Done),
            "the free-run floor's run reported {report} instead of DONE: {}",
            vm.console()
        );
    }
    vm.set_debug(GuestDebug::default())?;
    Ok(median(times))
}
