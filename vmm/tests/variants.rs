//! The guest's NMI entry variants against their reproducers in `corpus/`: each buggy variant's
//! schedule ends in a finding, and the same schedule run with the `linux` entry passes. Plus the
//! `linux` entry under the stress option and with every kind of fault in `do_nmi`.

mod common;

use std::path::{Path, PathBuf};

use nmifuzz_abi::{Action, Script, Variant, Workload, fault, option};
use vmm::engine::profile;
use vmm::engine::schedule::{Injection, Plan, Schedule, Trigger};
use vmm::engine::{Engine, Execution, RunOptions};
use vmm::{Verdict, Vm};

/// What each buggy variant's reproducer must end in: a verdict whose message contains this.
const EXPECTED: &[(Variant, &str)] = &[
    (Variant::NAIVE, "guest panic: invariant violated: do_nmi entered while running (depth 2)"),
    (
        Variant::NO_STACK_CHECK,
        "guest panic: invariant violated: do_nmi entered for an NMI that interrupted NMI handling",
    ),
    (
        Variant::NO_EXECUTING_VAR,
        "guest panic: invariant violated: do_nmi entered while running (depth 2)",
    ),
    // The host's return-integrity oracle sees the final IRETQ return on the NMI stack before the
    // workload's register checks (invariant 2) can.
    (Variant::NO_REPEAT_WINDOW, "(on the NMI stack); the context it interrupted was workload_loop"),
    (
        Variant::REPEAT_WITHOUT_SET,
        "guest panic: invariant violated: do_nmi entered while running (depth 2)",
    ),
    (
        Variant::EARLY_CLEAR,
        "guest panic: invariant violated: do_nmi entered for an NMI that interrupted NMI handling",
    ),
    // The NMI in the SYSCALL gap, taken for nested, never reaches do_nmi.
    (
        Variant::CVE_2015_3291,
        "NMI deliveries were never followed by a do_nmi iteration [invariant 4]",
    ),
    // The espfix64 frame the nested NMI half rewrote: the user's RIP with the kernel's CS.
    (Variant::CVE_2015_3290, "ended with a return to user_point_ss16+0x7 with RSP"),
    // The IST exit's IRETQ to the revoked CS faults in kernel mode, on the NMI stack.
    (Variant::CVE_2015_5157, "unexpected exception #NP (vector 11)"),
];

fn corpus_file(variant: Variant) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../corpus").join(format!("{}.json", variant.name()))
}

/// A VM and an engine calibrated for this host.
fn setup() -> Option<(Vm, Engine)> {
    let mut vm = common::boot()?;
    let profile = profile::calibrate(&mut vm).unwrap();
    let engine = Engine::new(&vm, profile).unwrap();
    Some((vm, engine))
}

fn run(vm: &mut Vm, engine: &mut Engine, plan: &Plan) -> Execution {
    let options = RunOptions { keep_trace: true, ..RunOptions::default() };
    engine.run(vm, plan, &options).unwrap()
}

/// `schedule` with `variant` instead of its own: the variant's name, and every symbolic point
/// inside the old variant's entry (`nmi_<old>_...`) moved to the same label of the new one.
fn retarget(schedule: &Schedule, variant: Variant) -> Schedule {
    let old = schedule.variant().unwrap().entry_symbol();
    let mut retargeted = schedule.clone();
    retargeted.variant = variant.name().into();
    for injection in &mut retargeted.injections {
        if let Injection::At(point) = injection
            && let Some(suffix) = point.symbol.strip_prefix(old)
        {
            point.symbol = format!("{}{suffix}", variant.entry_symbol());
        }
    }
    retargeted
}

/// The trace, one line per stop with events, for failure messages.
fn events(vm: &Vm, execution: &Execution) -> String {
    let mut lines = Vec::new();
    for step in execution.trace.iter().filter(|s| !s.events.is_empty()) {
        let events: Vec<String> = step.events.iter().map(|e| e.to_string()).collect();
        lines.push(format!(
            "{:6} depth {} {:32} {}",
            step.index,
            step.depth,
            vm.image().symbolize(step.rip),
            events.join("; ")
        ));
    }
    lines.join("\n")
}

#[test]
fn kvm_every_buggy_variant_fails_its_reproducer_which_linux_passes() {
    let Some((mut vm, mut engine)) = setup() else { return };
    for variant in Variant::ALL.iter().copied().filter(|v| *v != Variant::LINUX) {
        let (_, expected) = EXPECTED.iter().find(|(v, _)| *v == variant).unwrap();
        let path = corpus_file(variant);
        let schedule = Schedule::load(&path).unwrap();
        assert_eq!(schedule.variant().unwrap(), variant, "{}", path.display());

        let plan = schedule.resolve(vm.image()).unwrap();
        let execution = run(&mut vm, &mut engine, &plan);
        let verdict = &execution.outcome.verdict;
        eprintln!("{}: {verdict}", variant.name());
        assert!(verdict.is_finding(), "{}: passed\n{}", variant.name(), events(&vm, &execution));
        assert!(verdict.to_string().contains(expected), "{}: {verdict}", variant.name());

        let linux = retarget(&schedule, Variant::LINUX);
        let plan = linux.resolve(vm.image()).unwrap();
        let execution = run(&mut vm, &mut engine, &plan);
        assert_eq!(
            execution.outcome.verdict,
            Verdict::Done,
            "linux on {}'s reproducer\n{}",
            variant.name(),
            events(&vm, &execution)
        );
        // The reproducer's NMIs all arrived (none merged away before the entry saw them).
        assert_eq!(execution.nmi.delivered, schedule.injections.len() as u64);
    }
}

/// A `linux` plan: the Loop workload with `actions`, `options` and `injections` at symbols.
fn linux_plan(vm: &Vm, options: u32, actions: &[Action], injections: &[(&str, u32, u64)]) -> Plan {
    let mut script = Script::new(Variant::LINUX, Workload::Loop, 8);
    script.options = options;
    script.action_count = actions.len() as u32;
    script.actions[..actions.len()].copy_from_slice(actions);
    let injections = injections
        .iter()
        .map(|&(symbol, occurrence, extra)| Trigger::At {
            address: vm.image().symbol(symbol).unwrap(),
            occurrence,
            extra,
        })
        .collect();
    Plan { script, injections }
}

#[test]
fn kvm_linux_survives_nmis_in_every_fault_of_do_nmi() {
    let Some((mut vm, mut engine)) = setup() else { return };
    // One NMI into the workload; do_nmi takes #UD, #PF and #BP, and an NMI arrives right after
    // each of their IRETQs: each is nested, and each forces one more iteration.
    let action = Action { busy: 3, faults: fault::UD | fault::PF | fault::BP, ..Action::NONE };
    let plan = linux_plan(
        &vm,
        0,
        &[action],
        &[
            ("workload_loop_top", 2, 5),
            ("exception_iretq", 1, 1),
            ("exception_iretq", 1, 1),
            ("exception_iretq", 1, 1),
        ],
    );
    let execution = run(&mut vm, &mut engine, &plan);
    assert_eq!(execution.outcome.verdict, Verdict::Done, "{}", events(&vm, &execution));
    let counters = execution.outcome.counters;
    assert_eq!(execution.nmi.delivered, 4);
    // The three nested NMIs merge: each finds "iret" already pointing at repeat_nmi, so one
    // repeat follows the first call.
    assert_eq!((counters.do_nmi_calls, counters.nmi_iterations), (2, 2));
    assert!(counters.page_faults >= 1 && counters.breakpoints >= 1, "{counters:?}");
}

#[test]
fn kvm_linux_survives_the_stress_option() {
    let Some((mut vm, mut engine)) = setup() else { return };
    // STRESS_UNMASK: NMIs are unmasked right after first_nmi, so an NMI can land in the repeat
    // window (ignored), in do_nmi (nested) and on the exit path's IRETQ (nested through DF).
    for (label, extra) in
        [("nmi_linux_repeat", 3), ("nmi_linux_end_repeat", 20), ("nmi_linux_restore", 18)]
    {
        let plan = linux_plan(
            &vm,
            option::STRESS_UNMASK,
            &[],
            &[("workload_loop_top", 3, 7), (label, 1, extra)],
        );
        let execution = run(&mut vm, &mut engine, &plan);
        assert_eq!(
            execution.outcome.verdict,
            Verdict::Done,
            "{label}\n{}",
            events(&vm, &execution)
        );
        assert_eq!(execution.nmi.delivered, 2, "{label}");
    }
}

#[test]
fn kvm_linux_passes_a_second_nmi_at_every_boundary_of_the_first_under_stress() {
    let Some((mut vm, mut engine)) = setup() else { return };
    // With STRESS_UNMASK, NMIs are unmasked from the end of first_nmi on: a second NMI placed
    // k instructions after the first one lands, as k grows, in first_nmi (latched until the
    // unmasking IRETQ), the repeat window, the register saves, do_nmi, the exit path and its
    // final IRETQ, and then in the workload again. Every one of them must pass.
    let mut plan = linux_plan(&vm, option::STRESS_UNMASK, &[], &[("workload_loop_top", 3, 7)]);
    plan.injections.push(Trigger::After(0));
    let mut nested = 0;
    for k in 1..=450 {
        plan.injections[1] = Trigger::After(k);
        let execution = run(&mut vm, &mut engine, &plan);
        assert_eq!(
            execution.outcome.verdict,
            Verdict::Done,
            "k = {k}\n{}",
            events(&vm, &execution)
        );
        nested += u64::from(execution.outcome.counters.nmi_iterations == 2);
    }
    // Most of the positions are inside the first NMI's handling, and force a repeat.
    assert!(nested > 300, "{nested}");
}
