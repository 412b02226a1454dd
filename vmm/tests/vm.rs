//! The VM against real KVM: boot, reports, every host-side verdict, the watchdog, int3
//! emulation and reset.

mod common;

use std::time::Duration;

use nmifuzz_abi::{Action, Script, Variant, Workload, fault};
use vmm::{RunLimits, Verdict, Vm};

fn script(workload: Workload, arg: u32) -> Script {
    Script::new(Variant::NAIVE, workload, arg)
}

/// Resets, writes `script` and runs it with short limits.
fn run(vm: &mut Vm, script: &Script) -> vmm::Outcome {
    vm.reset().unwrap();
    vm.write_script(script).unwrap();
    let limits = RunLimits { wall: Duration::from_millis(300), max_exits: 100_000 };
    vm.run(&limits).unwrap()
}

#[test]
fn kvm_boots_to_ready_with_console_output() {
    let Some(vm) = common::boot() else { return };
    // The boot console is cleared by the first reset; before it, the boot banner is there.
    assert!(vm.console().contains("nmifuzz guest"), "console: {:?}", vm.console());
    let mailbox = vm.mailbox().unwrap();
    assert_eq!(mailbox.counters, Default::default(), "counters must be zero at READY");
}

#[test]
fn kvm_loop_workload_reports_done_with_counters() {
    let Some(mut vm) = common::boot() else { return };
    let outcome = run(&mut vm, &script(Workload::Loop, 50));
    assert_eq!(outcome.verdict, Verdict::Done);
    assert_eq!(outcome.counters.workload_iterations, 50);
    assert_ne!(outcome.counters.checksum, 0);
    // Deterministic: the same run gives the same checksum.
    let again = run(&mut vm, &script(Workload::Loop, 50));
    assert_eq!(again.counters, outcome.counters);
}

#[test]
fn kvm_guest_panic_is_a_verdict_with_message_and_location() {
    let Some(mut vm) = common::boot() else { return };
    let outcome = run(&mut vm, &script(Workload::Panic, 0));
    let Verdict::GuestPanic(panic) = outcome.verdict else {
        panic!("expected a guest panic, got {}", outcome.verdict)
    };
    assert_eq!(panic.message, "workload asked to panic");
    assert_eq!(panic.file, "src/workload.rs");
    assert!(panic.line > 0 && panic.column > 0, "{panic:?}");
    // The RIP is the panic site's own, in the guest's code, named by its symbol.
    let text = vm.image().symbol("_start").unwrap();
    assert!(panic.rip > text && panic.rip < text + (1 << 20), "{panic:?}");
    assert_eq!(panic.symbol, vm.image().symbolize(panic.rip));
    assert!(!panic.symbol.starts_with("0x"), "{panic:?}");
    let shown = Verdict::GuestPanic(panic).to_string();
    assert!(shown.contains("workload asked to panic (at src/workload.rs:"), "{shown}");
    assert!(shown.contains(", rip "), "{shown}");
}

#[test]
fn kvm_triple_fault_is_a_verdict() {
    let Some(mut vm) = common::boot() else { return };
    let outcome = run(&mut vm, &script(Workload::TripleFault, 0));
    assert!(matches!(outcome.verdict, Verdict::TripleFault { .. }), "{}", outcome.verdict);
}

#[test]
fn kvm_emulation_error_reports_where() {
    let Some(mut vm) = common::boot() else { return };
    // The workload calls code where no memory is: no host has an instruction there to emulate.
    let outcome = run(&mut vm, &script(Workload::EmulationError, 0));
    let Verdict::EmulationError { rip, .. } = outcome.verdict else {
        panic!("expected an emulation error, got {}", outcome.verdict)
    };
    assert_eq!(rip, nmifuzz_abi::USER_POINT_ADDRESS);
}

#[test]
fn kvm_spinning_guest_times_out_and_the_vm_stays_usable() {
    let Some(mut vm) = common::boot() else { return };
    for workload in [Workload::Spin, Workload::Vmcall] {
        let outcome = run(&mut vm, &script(workload, 0));
        match (&outcome.verdict, workload) {
            (Verdict::Timeout { limit, .. }, _) => assert_eq!(*limit, Duration::from_millis(300)),
            // On stock KVM vmcall returns to the guest, which then panics.
            (Verdict::GuestPanic(p), Workload::Vmcall) => assert_eq!(p.message, "vmcall returned"),
            (other, _) => panic!("{workload:?}: expected a timeout, got {other}"),
        }
        assert!(outcome.elapsed < Duration::from_secs(2), "{:?}", outcome.elapsed);
        let next = run(&mut vm, &script(Workload::Loop, 10));
        assert_eq!(next.verdict, Verdict::Done, "after {workload:?}");
        assert_eq!(next.counters.workload_iterations, 10);
    }
}

#[test]
fn kvm_exit_budget_ends_the_run() {
    let Some(mut vm) = common::boot() else { return };
    vm.reset().unwrap();
    // Every ping is an `out`, an exit on every host.
    vm.write_script(&script(Workload::Ping, 20)).unwrap();
    let outcome = vm.run(&RunLimits { wall: Duration::from_secs(1), max_exits: 5 }).unwrap();
    assert_eq!(outcome.verdict, Verdict::BudgetExhausted { exits: 5 });
}

#[test]
fn kvm_ring0_int3_reaches_the_breakpoint_handler() {
    let Some(mut vm) = common::boot() else { return };
    let outcome = run(&mut vm, &script(Workload::Breakpoint, 3));
    assert_eq!(outcome.verdict, Verdict::Done);
    assert_eq!(outcome.counters.breakpoints, 3);
}

#[test]
fn kvm_nmi_calls_do_nmi_and_ud2_returns_into_it() {
    let Some(mut vm) = common::boot() else { return };
    let mut s = script(Workload::Loop, 20);
    // The Loop workload raises #UD itself in some iterations: count those without the NMI.
    let workload_own = run(&mut vm, &s).counters.invalid_opcodes;
    s.action_count = 1;
    s.actions[0] = Action { busy: 5, faults: fault::UD, ..Action::NONE };
    vm.reset().unwrap();
    vm.apply_pending_reset().unwrap();
    vm.write_script(&s).unwrap();
    vm.vcpu().nmi().unwrap();
    let outcome = vm.run(&RunLimits::default()).unwrap();
    assert_eq!(outcome.verdict, Verdict::Done);
    assert_eq!(outcome.counters.do_nmi_calls, 1);
    assert_eq!(outcome.counters.invalid_opcodes, workload_own + 1);
    assert_eq!(outcome.counters.workload_iterations, 20);
}

#[test]
fn kvm_malformed_script_is_a_guest_panic_naming_the_field() {
    let Some(mut vm) = common::boot() else { return };
    let mut s = script(Workload::Loop, 1);
    s.variant = 0xdead;
    let outcome = run(&mut vm, &s);
    let Verdict::GuestPanic(panic) = outcome.verdict else { panic!("{}", outcome.verdict) };
    assert!(panic.message.contains("variant"), "{}", panic.message);
}
