//! The exact injection engine against real KVM.

mod common;

use nmifuzz_abi::{Action, Script, Variant, Workload, fault};
use vmm::Verdict;
use vmm::engine::profile::{self, HostProfile};
use vmm::engine::schedule::{Plan, Trigger};
use vmm::engine::trace::{Event, Injected};
use vmm::engine::{Engine, Execution, RunOptions};

fn traced() -> RunOptions {
    RunOptions { keep_trace: true, ..RunOptions::default() }
}

fn plan(workload: Workload, arg: u32, actions: &[Action], injections: &[Trigger]) -> Plan {
    let mut script = Script::new(Variant::Naive, workload, arg);
    script.action_count = actions.len() as u32;
    script.actions[..actions.len()].copy_from_slice(actions);
    Plan { script, injections: injections.to_vec() }
}

fn delivered_frames(execution: &Execution) -> Vec<(u64, u64)> {
    let mut frames = Vec::new();
    for step in &execution.trace {
        for event in &step.events {
            if let Event::NmiDelivered { frame_rip } = event {
                frames.push((step.index, *frame_rip));
            }
        }
    }
    frames
}

#[test]
fn kvm_calibration_finds_this_hosts_profile() {
    let Some(mut vm) = common::boot() else { return };
    let profile = profile::calibrate(&mut vm).unwrap();
    eprintln!("host profile: {profile}");
    // Calibrating twice gives the same answer.
    assert_eq!(profile::calibrate(&mut vm).unwrap(), profile);
}

#[test]
fn kvm_single_nmi_runs_do_nmi_once() {
    let Some(mut vm) = common::boot() else { return };
    let profile = profile::calibrate(&mut vm).unwrap();
    let mut engine = Engine::new(&vm, profile).unwrap();
    let plan = plan(Workload::Loop, 10, &[], &[Trigger::After(30)]);
    let execution = engine.run(&mut vm, &plan, &traced()).unwrap();
    assert_eq!(execution.outcome.verdict, Verdict::Done, "{:?}", execution.nmi);
    assert_eq!(execution.nmi.injected, 1);
    assert_eq!(execution.nmi.delivered, 1);
    assert_eq!(execution.nmi.iterations, 1);
    assert_eq!(execution.nmi.probe, Some(true));
    assert_eq!(execution.outcome.counters.do_nmi_calls, 1);
    let frames = delivered_frames(&execution);
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].0, 31, "delivery seen after the handler's first instruction");
    let _ = HostProfile::KVM_PVM;
    let _ = (Injected::Delivered, fault::UD);
}
