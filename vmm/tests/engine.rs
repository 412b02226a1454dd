//! The exact injection engine against real KVM: timing, latching, counting, determinism.

mod common;

use std::collections::BTreeMap;

use nmifuzz_abi::{Action, Script, Variant, Workload, fault};
use vmm::engine::decode::InsnCache;
use vmm::engine::profile;
use vmm::engine::schedule::{Plan, SCHEDULE_MAX_DELAY, Trigger};
use vmm::engine::trace::{Event, Injected};
use vmm::engine::{Engine, Execution, RunOptions};
use vmm::{Verdict, Vm};

fn traced() -> RunOptions {
    RunOptions { keep_trace: true, ..RunOptions::default() }
}

fn plan(workload: Workload, arg: u32, actions: &[Action], injections: &[Trigger]) -> Plan {
    let mut script = Script::new(Variant::NAIVE, workload, arg);
    script.action_count = actions.len() as u32;
    script.actions[..actions.len()].copy_from_slice(actions);
    Plan { script, injections: injections.to_vec() }
}

/// The engine with this host's calibrated profile.
fn engine(vm: &mut Vm) -> Engine {
    let profile = profile::calibrate(vm).unwrap();
    Engine::new(vm, profile).unwrap()
}

/// `(stop index, frame RIP)` of every NMI delivery in the trace.
fn deliveries(execution: &Execution) -> Vec<(u64, u64)> {
    let mut found = Vec::new();
    for step in &execution.trace {
        for event in &step.events {
            if let Event::NmiDelivered { frame_rip } = event {
                found.push((step.index, *frame_rip));
            }
        }
    }
    found
}

fn injections(execution: &Execution) -> Vec<Injected> {
    let events = execution.trace.iter().flat_map(|s| &s.events);
    events
        .filter_map(|e| if let Event::NmiInjected { how, .. } = e { Some(*how) } else { None })
        .collect()
}

/// A run that single-steps from start to DONE without injecting anything: its trace maps each
/// instruction count to the boundary the engine stops at.
fn baseline(engine: &mut Engine, vm: &mut Vm, workload: Workload, arg: u32) -> Execution {
    let execution = engine
        .run(vm, &plan(workload, arg, &[], &[Trigger::After(SCHEDULE_MAX_DELAY)]), &traced())
        .unwrap();
    assert_eq!(execution.outcome.verdict, Verdict::Done);
    assert_eq!(execution.nmi.injected, 0);
    execution
}

#[test]
fn kvm_calibration_is_stable() {
    let Some(mut vm) = common::boot() else { return };
    let profile = profile::calibrate(&mut vm).unwrap();
    eprintln!("host profile: {profile}");
    assert_eq!(profile::calibrate(&mut vm).unwrap(), profile);
}

#[test]
fn kvm_nmi_at_instruction_k_interrupts_the_kth_instruction() {
    let Some(mut vm) = common::boot() else { return };
    let mut engine = engine(&mut vm);
    // Ping: `out` exits; Breakpoint: int3 → #BP entry → IRETQ → the instruction after it.
    for (workload, arg) in [(Workload::Breakpoint, 2), (Workload::Ping, 2)] {
        let base = baseline(&mut engine, &mut vm, workload, arg);
        let mut first_rip_at = BTreeMap::new();
        for step in &base.trace {
            first_rip_at.entry(step.index).or_insert(step.rip);
        }
        for k in 0..base.instructions {
            let execution = engine
                .run(&mut vm, &plan(workload, arg, &[], &[Trigger::After(k)]), &traced())
                .unwrap();
            assert_eq!(execution.outcome.verdict, Verdict::Done, "{workload:?} k={k}");
            let found = deliveries(&execution);
            assert_eq!(found.len(), 1, "{workload:?} k={k}: {found:?}");
            assert_eq!(
                found[0].1,
                first_rip_at[&k],
                "{workload:?} k={k}: NMI frame RIP {} but instruction {k} is at {}",
                vm.image().symbolize(found[0].1),
                vm.image().symbolize(first_rip_at[&k])
            );
            assert_eq!(execution.outcome.counters.do_nmi_calls, 1);
        }
    }
}

#[test]
fn kvm_instruction_counts_follow_the_decoder() {
    let Some(mut vm) = common::boot() else { return };
    let mut engine = engine(&mut vm);
    let action = Action { busy: 2, faults: fault::UD, ..Action::NONE };
    let plan = plan(
        Workload::Breakpoint,
        2,
        &[action],
        &[Trigger::After(40), Trigger::After(SCHEDULE_MAX_DELAY)],
    );
    let execution = engine.run(&mut vm, &plan, &traced()).unwrap();
    assert_eq!(execution.outcome.verdict, Verdict::Done);
    let mut insns = InsnCache::default();
    for pair in execution.trace.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        let at_handler_entry = b.events.iter().any(|e| matches!(e, Event::Exception { .. }));
        let at_nmi_entry = b.events.iter().any(|e| matches!(e, Event::NmiDelivered { .. }));
        let insn = insns.get(vm.ram(), a.rip).unwrap();
        // A fault (ud2) does not retire before its handler's entry stop; a trap (int3) does.
        // An NMI is delivered before the instruction at `a`, which does not retire.
        let interrupted = (at_handler_entry && !insn.is_int3) || at_nmi_entry;
        let expected = if interrupted || (insn.is_rep_string && a.rip == b.rip) { 0 } else { 1 };
        assert_eq!(
            b.index - a.index,
            expected,
            "{} → {}",
            vm.image().symbolize(a.rip),
            vm.image().symbolize(b.rip)
        );
    }
    // Tracing does not change what is counted.
    let untraced = engine.run(&mut vm, &plan, &RunOptions::default()).unwrap();
    assert_eq!(untraced.instructions, execution.instructions);
    assert_eq!(untraced.trace_hash, execution.trace_hash);
}

#[test]
fn kvm_second_nmi_is_latched_until_the_iretq_and_a_third_is_dropped() {
    let Some(mut vm) = common::boot() else { return };
    let mut engine = engine(&mut vm);
    let plan =
        plan(Workload::Loop, 10, &[], &[Trigger::After(30), Trigger::After(3), Trigger::After(1)]);
    let execution = engine.run(&mut vm, &plan, &traced()).unwrap();
    assert_eq!(execution.outcome.verdict, Verdict::Done);
    assert_eq!(injections(&execution), [Injected::Delivered, Injected::Latched, Injected::Dropped]);
    let nmi = execution.nmi;
    assert_eq!(
        (nmi.injected, nmi.delivered, nmi.latched, nmi.dropped, nmi.iterations),
        (3, 2, 1, 1, 2)
    );
    let found = deliveries(&execution);
    // The latched NMI arrives right after the first handler's IRETQ, before the
    // interrupted instruction runs: the same frame RIP as the first.
    assert_eq!(found[1].1, found[0].1, "{found:?}");
    let iretq_index = execution
        .trace
        .iter()
        .rposition(|s| s.index < found[1].0 && insn_is_iretq(&vm, s.rip))
        .expect("the handler's IRETQ is in the trace");
    assert_eq!(
        execution.trace[iretq_index].index + 1,
        found[1].0,
        "the IRETQ retires, then the NMI is delivered before the next instruction"
    );
}

fn insn_is_iretq(vm: &Vm, rip: u64) -> bool {
    InsnCache::default().get(vm.ram(), rip).unwrap().is_iretq
}

#[test]
fn kvm_nmi_latched_in_the_handler_arrives_after_the_ud2_iretq() {
    let Some(mut vm) = common::boot() else { return };
    let mut engine = engine(&mut vm);
    // NMI 1, then do_nmi runs `ud2`; NMI 2 arrives while NMI 1 still blocks NMIs, so it is
    // latched and must be delivered right after the #UD handler's IRETQ, inside do_nmi.
    let action = Action { busy: 0, faults: fault::UD, ..Action::NONE };
    let plan = plan(Workload::Loop, 10, &[action], &[Trigger::After(30), Trigger::After(5)]);
    let execution = engine.run(&mut vm, &plan, &traced()).unwrap();
    assert_eq!(injections(&execution), [Injected::Delivered, Injected::Latched]);
    let found = deliveries(&execution);
    assert_eq!(found.len(), 2);
    let ud_return = execution
        .trace
        .iter()
        .rev()
        .find(|s| s.index < found[1].0 && insn_is_iretq(&vm, s.rip))
        .expect("the #UD handler's IRETQ");
    assert!(
        vm.image().symbolize(found[1].1).starts_with("do_nmi"),
        "{}",
        vm.image().symbolize(found[1].1)
    );
    assert_eq!(ud_return.index + 1, found[1].0, "the IRETQ, then the delivery");
}

#[test]
fn kvm_replays_are_bit_for_bit_identical() {
    let Some(mut vm) = common::boot() else { return };
    let mut engine = engine(&mut vm);
    let action = Action { busy: 3, faults: fault::UD, ..Action::NONE };
    let three = plan(
        Workload::Loop,
        20,
        &[action, action],
        &[Trigger::After(25), Trigger::After(12), Trigger::After(40)],
    );
    let other = plan(Workload::Breakpoint, 3, &[], &[Trigger::After(7)]);
    let first = engine.run(&mut vm, &three, &RunOptions::default()).unwrap();
    for i in 0..100 {
        if i % 10 == 0 {
            engine.run(&mut vm, &other, &RunOptions::default()).unwrap();
        }
        let again = engine.run(&mut vm, &three, &RunOptions::default()).unwrap();
        assert_eq!(again.outcome.verdict, first.outcome.verdict, "replay {i}");
        assert_eq!(again.trace_hash, first.trace_hash, "replay {i}");
        assert_eq!(again.instructions, first.instructions, "replay {i}");
        assert_eq!(again.nmi, first.nmi, "replay {i}");
    }
}

#[test]
fn kvm_probe_nmi_may_take_exceptions_too() {
    let Some(mut vm) = common::boot() else { return };
    let mut engine = engine(&mut vm);
    // The probe NMI after DONE is the second do_nmi call; its action raises #UD, #PF and #BP
    // (an int3 the VMM performs on hosts that cannot), all of which must simply work.
    let actions =
        [Action::default(), Action { busy: 1, faults: fault::ENTRY_FAULTS, ..Action::NONE }];
    let plan = plan(Workload::Loop, 10, &actions, &[Trigger::After(40)]);
    let execution = engine.run(&mut vm, &plan, &RunOptions::default()).unwrap();
    assert_eq!(execution.outcome.verdict, Verdict::Done);
    assert_eq!(execution.nmi.probe, Some(true));
}

#[test]
fn kvm_nmi_injected_at_an_iretq_the_vmm_performs_is_counted_once() {
    let Some(mut vm) = common::boot() else { return };
    let mut engine = engine(&mut vm);
    // The naive entry's IRETQ, found by decoding from its start.
    let mut insns = InsnCache::default();
    let mut iretq = vm.image().symbol("nmi_naive").unwrap();
    while !insns.get(vm.ram(), iretq).unwrap().is_iretq {
        iretq += u64::from(insns.get(vm.ram(), iretq).unwrap().len);
    }
    // A second NMI made at the very stop where the engine performs the first one's IRETQ:
    // it is latched, then delivered right after the IRETQ, and counted once.
    let at_iretq = Trigger::At { address: iretq, occurrence: 1, extra: 0 };
    let plan = plan(Workload::Loop, 10, &[], &[Trigger::After(30), at_iretq]);
    let execution = engine.run(&mut vm, &plan, &traced()).unwrap();
    assert_eq!(execution.outcome.verdict, Verdict::Done);
    assert_eq!(injections(&execution), [Injected::Delivered, Injected::Latched]);
    let nmi = execution.nmi;
    assert_eq!((nmi.delivered, nmi.iterations), (2, 2), "{nmi:?}");
    let found = deliveries(&execution);
    assert_eq!(found[1].1, found[0].1, "the latched NMI interrupts the same instruction");
    // Its delivery is seen where it happens: at the NMI entry, one level deep.
    let second = execution
        .trace
        .iter()
        .filter(|s| s.events.iter().any(|e| matches!(e, Event::NmiDelivered { .. })))
        .nth(1)
        .unwrap();
    assert!(vm.image().symbolize(second.rip).starts_with("nmi_naive"), "{second:?}");
    assert_eq!(second.depth, 1);
}
