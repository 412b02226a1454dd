//! The fast mode against the stepped engine: many random symbolic schedules, in every variant,
//! must end in the same verdict with the same NMI books and the same guest counters.

mod common;

use nmifuzz_abi::{Action, SCRIPT_ACTION_SLOTS, Script, Variant, Workload, fault, option};
use vmm::engine::schedule::{Plan, SCHEDULE_MAX_DELAY as SCHEDULE_NEVER, Trigger};
use vmm::engine::table::InstructionTable;
use vmm::engine::{Engine, Execution, Mode, RunOptions, profile};
use vmm::{Verdict, Vm};

/// Schedules per variant.
const SCHEDULES: usize = 60;

/// splitmix64: a small deterministic RNG, so a failure names a reproducible schedule.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A random symbolic plan for `variant`: actions with busy work and faults, the stress option
/// half the time, and one to four points from the table: the first in the workload loop, each
/// later one (mostly) where the guest goes after the first NMI, which `reached` lists.
fn random_plan(
    rng: &mut Rng,
    variant: Variant,
    table: &InstructionTable,
    mut reached: impl FnMut(&Plan) -> Vec<u64>,
) -> Plan {
    let mut script = Script::new(variant, Workload::Loop, 8);
    if rng.below(2) == 0 {
        script.options = option::STRESS_UNMASK;
    }
    let count = 1 + rng.below(4) as usize;
    script.action_count = count.min(SCRIPT_ACTION_SLOTS) as u32;
    for action in &mut script.actions[..count] {
        let faults =
            [0, fault::UD, fault::PF, fault::BP, fault::UD | fault::BP, fault::ENTRY_FAULTS];
        *action = Action {
            busy: rng.below(6) as u32,
            faults: faults[rng.below(faults.len() as u64) as usize],
            ..Action::NONE
        };
    }
    let in_table = |rips: Vec<u64>| -> Vec<u64> {
        rips.into_iter().filter(|rip| table.insns().iter().any(|i| i.address == *rip)).collect()
    };
    // Where the workload goes without NMIs: an injection that never comes keeps it stepped.
    let unreached = Plan { script, injections: vec![Trigger::After(SCHEDULE_NEVER)] };
    let workload = in_table(reached(&unreached));
    let point = |rng: &mut Rng, pool: &[u64]| Trigger::At {
        address: pool[rng.below(pool.len() as u64) as usize],
        occurrence: 1 + rng.below(3) as u32,
        extra: if rng.below(2) == 0 { 0 } else { rng.below(4) },
    };
    let mut plan = Plan { script, injections: vec![point(rng, &workload)] };
    let after_first = in_table(reached(&plan));
    for _ in 1..count {
        let pool =
            if after_first.is_empty() || rng.below(5) == 0 { &workload } else { &after_first };
        plan.injections.push(point(rng, pool));
    }
    plan
}

/// What both modes must agree on: the verdict without the instruction counts in it (the fast
/// mode counts only what it steps), the NMI books and the guest's counters.
fn agreed(execution: &Execution) -> String {
    let verdict = match &execution.outcome.verdict {
        Verdict::WrongReturn(wrong) => format!(
            "wrong return of NMI {} at {}: {:?} instead of {:?}",
            wrong.nmi, wrong.iretq, wrong.actual, wrong.expected
        ),
        verdict @ Verdict::GuestPanic(_) => verdict.to_string(),
        verdict => verdict.signature(),
    };
    format!("{verdict}\n{:?}\n{:?}", execution.nmi, execution.outcome.counters)
}

/// The stops with events, for failure messages.
fn events(vm: &Vm, execution: &Execution) -> String {
    let lines: Vec<String> = execution
        .trace
        .iter()
        .filter(|s| !s.events.is_empty())
        .map(|s| {
            let events: Vec<String> = s.events.iter().map(|e| e.to_string()).collect();
            format!("{:6} {:36} {}", s.index, vm.image().symbolize(s.rip), events.join(", "))
        })
        .collect();
    lines.join("\n")
}

#[test]
fn kvm_fast_mode_agrees_with_the_stepped_engine_on_random_symbolic_schedules() {
    let Some(mut vm) = common::boot() else { return };
    let profile = profile::calibrate(&mut vm).unwrap();
    let mut engine = Engine::new(&vm, profile).unwrap();
    let stepped = RunOptions::default();
    let fast = RunOptions { mode: Mode::Fast, ..RunOptions::default() };
    let (mut findings, mut injected, mut compared) = (0, 0, 0);
    for (v, &variant) in Variant::ALL.iter().enumerate() {
        let table = InstructionTable::build(vm.image(), vm.ram(), variant.entry_symbol()).unwrap();
        let mut rng = Rng(0x5eed + v as u64);
        for k in 0..SCHEDULES {
            let plan = random_plan(&mut rng, variant, &table, |plan| {
                let traced = RunOptions { keep_trace: true, ..RunOptions::default() };
                let execution = engine.run(&mut vm, plan, &traced).unwrap();
                let first = execution.trace.iter().position(|s| s.depth > 0);
                execution.trace[first.unwrap_or(0)..].iter().map(|s| s.rip).collect()
            });
            let reference = engine.run(&mut vm, &plan, &stepped).unwrap();
            let candidate = engine.run(&mut vm, &plan, &fast).unwrap();
            if agreed(&candidate) != agreed(&reference) {
                let traced = |mode| RunOptions { mode, keep_trace: true, ..RunOptions::default() };
                let fast_trace = engine.run(&mut vm, &plan, &traced(Mode::Fast)).unwrap();
                let stepped_trace = engine.run(&mut vm, &plan, &traced(Mode::Stepped)).unwrap();
                panic!(
                    "{} schedule {k}: {:?}\nfast: {}\nstepped: {}\nfast trace:\n{}\nstepped \
                     trace:\n{}",
                    variant.name(),
                    plan.injections,
                    agreed(&candidate),
                    agreed(&reference),
                    events(&vm, &fast_trace),
                    events(&vm, &stepped_trace),
                );
            }
            compared += 1;
            findings += usize::from(reference.outcome.verdict.is_finding());
            injected += reference.nmi.injected;
        }
    }
    eprintln!("{compared} schedules agree ({findings} findings, {injected} NMIs injected)");
    // The schedules must exercise the engine: NMIs arrive, and some runs find bugs.
    assert!(injected as usize > compared, "only {injected} NMIs in {compared} schedules");
    assert!(findings > 0);
}
