//! The fast mode against the stepped engine: many random symbolic schedules, in every variant,
//! must end in the same verdict with the same NMI books and the same guest counters
//! (`vmm::engine::agreement`).

mod common;

use nmifuzz_abi::Variant;
use vmm::Vm;
use vmm::engine::agreement::{self, Rng};
use vmm::engine::table::InstructionTable;
use vmm::engine::{Engine, Execution, Mode, RunOptions, profile};

/// Schedules per variant.
const SCHEDULES: usize = 60;

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
    let (mut findings, mut injected, mut compared) = (0, 0, 0);
    for (v, &variant) in Variant::ALL.iter().enumerate() {
        let table = InstructionTable::build(vm.image(), vm.ram(), variant.entry_symbol()).unwrap();
        let mut rng = Rng::new(0x5eed + v as u64);
        for k in 0..SCHEDULES {
            let options = RunOptions::default();
            let one = agreement::compare_one(
                &mut engine,
                &mut vm,
                &mut rng,
                variant.name(),
                &table,
                &options,
            )
            .unwrap();
            if !one.agrees() {
                let plan = one.schedule.resolve(vm.image()).unwrap();
                let traced = |mode| RunOptions { mode, keep_trace: true, ..options };
                let fast = engine.run(&mut vm, &plan, &traced(Mode::Fast)).unwrap();
                let stepped = engine.run(&mut vm, &plan, &traced(Mode::Stepped)).unwrap();
                panic!(
                    "{} schedule {k}:\n{}\nfast: {}\nstepped: {}\nfast trace:\n{}\nstepped \
                     trace:\n{}",
                    variant.name(),
                    one.schedule.to_json(),
                    agreement::agreed(&one.fast),
                    agreement::agreed(&one.stepped),
                    events(&vm, &fast),
                    events(&vm, &stepped),
                );
            }
            compared += 1;
            findings += usize::from(one.stepped.outcome.verdict.is_finding());
            injected += one.stepped.nmi.injected;
        }
    }
    eprintln!("{compared} schedules agree ({findings} findings, {injected} NMIs injected)");
    // The schedules must exercise the engine: NMIs arrive, and some runs find bugs.
    assert!(injected as usize > compared, "only {injected} NMIs in {compared} schedules");
    assert!(findings > 0);
}
