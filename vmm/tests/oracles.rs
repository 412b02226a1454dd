//! Every host-side verdict kind, each produced by a purpose-made guest behaviour or schedule.

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use nmifuzz_abi::{Script, Variant, Workload};
use vmm::engine::profile::{self, HostProfile};
use vmm::engine::schedule::{Plan, SCHEDULE_MAX_DELAY, Trigger};
use vmm::engine::{Engine, ITERATION_SYMBOL, RunOptions};
use vmm::{RunLimits, Verdict, Vm};

/// `iretq` (REX.W + CF).
const IRETQ: [u8; 2] = [0x48, 0xcf];
/// `hlt`.
const HLT: [u8; 1] = [0xf4];
/// `jmp $` (to itself).
const SPIN: [u8; 2] = [0xeb, 0xfe];

/// This host's profile, calibrated once with the unpatched guest (a patched one may not have
/// a working NMI entry to calibrate with).
fn host_profile() -> HostProfile {
    static PROFILE: OnceLock<HostProfile> = OnceLock::new();
    *PROFILE.get_or_init(|| profile::calibrate(&mut common::boot().unwrap()).unwrap())
}

/// Short limits: a wall clock of half a second and a total stepping budget of 3000.
/// Generous wall-clock limits: every run here but the timeout test's ends by itself or by the
/// instruction budget, and 3,000 stepped instructions take over 500 ms on an emulated host
/// under load.
fn options() -> RunOptions {
    RunOptions {
        limits: RunLimits { wall: Duration::from_secs(10), ..RunLimits::default() },
        max_instructions: 3_000,
        ..RunOptions::default()
    }
}

fn run(vm: &mut Vm, workload: Workload, arg: u32, injections: &[Trigger]) -> Verdict {
    run_variant(vm, Variant::NAIVE, workload, arg, injections)
}

fn run_variant(
    vm: &mut Vm,
    variant: Variant,
    workload: Workload,
    arg: u32,
    injections: &[Trigger],
) -> Verdict {
    run_with(vm, &options(), variant, workload, arg, injections)
}

fn run_with(
    vm: &mut Vm,
    options: &RunOptions,
    variant: Variant,
    workload: Workload,
    arg: u32,
    injections: &[Trigger],
) -> Verdict {
    let mut engine = Engine::new(vm, host_profile()).unwrap();
    let script = Script::new(variant, workload, arg);
    let plan = Plan { script, injections: injections.to_vec() };
    engine.run(vm, &plan, options).unwrap().outcome.verdict
}

#[test]
fn kvm_wall_clock_timeout() {
    let Some(mut vm) = common::boot() else { return };
    let short = RunOptions {
        limits: RunLimits { wall: Duration::from_millis(500), ..RunLimits::default() },
        ..options()
    };
    let verdict = run_with(&mut vm, &short, Variant::NAIVE, Workload::Spin, 0, &[]);
    assert!(matches!(verdict, Verdict::Timeout { .. }), "{verdict}");
}

#[test]
fn kvm_instruction_budget_is_deterministic() {
    let Some(mut vm) = common::boot() else { return };
    // An injection that never comes keeps the engine stepping the spinning guest.
    let verdict = run(&mut vm, Workload::Spin, 0, &[Trigger::After(SCHEDULE_MAX_DELAY)]);
    let Verdict::InstructionBudget { instructions, .. } = &verdict else { panic!("{verdict}") };
    assert_eq!(*instructions, options().max_instructions);
    assert_eq!(run(&mut vm, Workload::Spin, 0, &[Trigger::After(SCHEDULE_MAX_DELAY)]), verdict);
    // In NMI context the budget is separate: a handler that never returns.
    let Some(mut vm) = common::boot_elf(common::patched_guest("nmi_naive", 1, &SPIN)) else {
        return;
    };
    let verdict = run(&mut vm, Workload::Loop, 10, &[Trigger::After(40)]);
    let Verdict::InstructionBudget { instructions, symbol } = &verdict else { panic!("{verdict}") };
    assert_eq!(symbol, "nmi_naive+0x1");
    assert!(*instructions < 40 + 2 * options().max_nmi_instructions, "{instructions}");
}

#[test]
fn kvm_triple_fault_and_emulation_error() {
    let Some(mut vm) = common::boot() else { return };
    let verdict = run(&mut vm, Workload::TripleFault, 0, &[Trigger::After(5)]);
    assert!(matches!(verdict, Verdict::TripleFault { .. }), "{verdict}");
    let verdict = run(&mut vm, Workload::EmulationError, 0, &[]);
    assert!(matches!(verdict, Verdict::EmulationError { .. }), "{verdict}");
}

#[test]
fn kvm_unexpected_exit() {
    // The workload halts without reporting anything.
    let Some(mut vm) = common::boot_elf(common::patched_guest("workload_loop", 0, &HLT)) else {
        return;
    };
    let verdict = run(&mut vm, Workload::Loop, 10, &[]);
    let Verdict::UnexpectedExit { description } = &verdict else { panic!("{verdict}") };
    assert!(description.starts_with("HLT at workload_loop"), "{description}");
}

#[test]
fn kvm_lost_nmi_when_the_entry_never_calls_do_nmi() {
    // An NMI entry that returns at once: the delivery is never followed by an iteration.
    let Some(mut vm) = common::boot_elf(common::patched_guest("nmi_naive", 0, &IRETQ)) else {
        return;
    };
    let verdict = run(&mut vm, Workload::Loop, 10, &[Trigger::After(40)]);
    let Verdict::LostNmi { message } = &verdict else { panic!("{verdict}") };
    assert!(message.contains("never followed by a do_nmi iteration"), "{message}");
}

#[test]
fn kvm_nmis_left_blocked_when_the_probe_nmi_goes_nowhere() {
    // No scheduled NMI: the run passes every check up to DONE, and only the probe NMI shows
    // that NMIs do not reach do_nmi.
    let Some(mut vm) = common::boot_elf(common::patched_guest("nmi_naive", 0, &IRETQ)) else {
        return;
    };
    let verdict = run(&mut vm, Workload::Loop, 10, &[]);
    let Verdict::NmiLeftBlocked { message } = &verdict else { panic!("{verdict}") };
    assert!(message.contains("probe NMI"), "{message}");
}

#[test]
fn kvm_what_the_probe_nmi_runs_into_is_judged_as_in_the_rest_of_the_run() {
    // No scheduled NMI: the run passes every check up to DONE, and the probe NMI enters an
    // entry that spins until the watchdog. NMIs are not blocked there; the run did not end.
    let Some(mut vm) = common::boot_elf(common::patched_guest("nmi_naive", 0, &SPIN)) else {
        return;
    };
    let verdict = run(&mut vm, Workload::Loop, 10, &[]);
    let Verdict::Timeout { symbol, .. } = &verdict else { panic!("{verdict}") };
    assert_eq!(symbol, "nmi_naive", "{verdict}");
    // An entry that jumps to the triple-fault workload's code: a triple fault, as anywhere.
    let image = vmm::GuestImage::parse(vmm::EMBEDDED_GUEST.to_vec(), 16 << 20).unwrap();
    let entry = image.symbol("nmi_naive").unwrap();
    let target = image.symbol("guest::workload::triple_fault").unwrap();
    let rel = i32::try_from(target as i64 - (entry as i64 + 5)).unwrap();
    let jmp = [&[0xe9][..], &rel.to_le_bytes()].concat();
    let Some(mut vm) = common::boot_elf(common::patched_guest("nmi_naive", 0, &jmp)) else {
        return;
    };
    let verdict = run(&mut vm, Workload::Loop, 10, &[]);
    assert!(matches!(verdict, Verdict::TripleFault { .. }), "{verdict}");
}

#[test]
fn kvm_count_mismatch_when_the_guest_does_not_count_an_iteration() {
    // The iteration starts (the VMM sees it) but the guest's counter increment, the first
    // instruction there, is gone.
    let Some(probe) = common::boot() else { return };
    let address = probe.image().symbol(ITERATION_SYMBOL).unwrap();
    let mut insn = [0u8; 15];
    probe.ram().read(address, &mut insn).unwrap();
    let mut decoder =
        iced_x86::Decoder::with_ip(64, &insn, address, iced_x86::DecoderOptions::NONE);
    let first = decoder.decode();
    assert_eq!(first.mnemonic(), iced_x86::Mnemonic::Inc, "{ITERATION_SYMBOL} starts by counting");
    let nops = vec![0x90; first.len()];
    let Some(mut vm) = common::boot_elf(common::patched_guest(ITERATION_SYMBOL, 0, &nops)) else {
        return;
    };
    let verdict = run(&mut vm, Workload::Loop, 10, &[Trigger::After(40)]);
    let Verdict::NmiCountMismatch { message } = &verdict else { panic!("{verdict}") };
    assert!(message.contains("the VMM saw 1"), "{message}");
}

/// The `linux` entry with its exit path's `std; mov qword ptr [rsp + 40], 0` (10 bytes, right
/// before the final IRETQ, RSP at the "iret" frame) replaced by `and qword ptr [rsp + 40], 0`
/// (still clearing "NMI executing") followed by `tamper`, 4 bytes that damage the frame.
fn linux_with_tampered_return(tamper: [u8; 4]) -> Vec<u8> {
    let probe = common::boot_elf(vmm::EMBEDDED_GUEST.to_vec()).unwrap();
    let restore = probe.image().symbol("nmi_linux_restore").unwrap();
    let mut code = [0u8; 64];
    probe.ram().read(restore, &mut code).unwrap();
    let mut decoder =
        iced_x86::Decoder::with_ip(64, &code, restore, iced_x86::DecoderOptions::NONE);
    let std = decoder
        .iter()
        .find(|insn| insn.mnemonic() == iced_x86::Mnemonic::Std)
        .expect("the exit path sets DF");
    let mut patch = vec![0x48, 0x83, 0x64, 0x24, 0x28, 0x00];
    patch.extend(tamper);
    common::patched_guest("nmi_linux_restore", std.ip() - restore, &patch)
}

/// One NMI into the Loop workload on `linux`, `extra` instructions into its second round.
fn one_nmi_on_linux(vm: &mut Vm, extra: u64) -> Verdict {
    let address = vm.image().symbol("workload_loop_top").unwrap();
    let nmi = Trigger::At { address, occurrence: 2, extra };
    run_variant(vm, Variant::LINUX, Workload::Loop, 10, &[nmi])
}

#[test]
fn kvm_wrong_return_when_the_entry_returns_with_a_wrong_rsp() {
    let Some(mut vm) = common::boot() else { return };
    assert_eq!(one_nmi_on_linux(&mut vm, 5), Verdict::Done, "the unpatched entry returns rightly");
    // `inc byte ptr [rsp + 24]`: the "iret" frame's RSP, one byte off.
    let Some(mut vm) = common::boot_elf(linux_with_tampered_return([0xfe, 0x44, 0x24, 0x18]))
    else {
        return;
    };
    let verdict = one_nmi_on_linux(&mut vm, 5);
    let Verdict::WrongReturn(wrong) = &verdict else { panic!("{verdict}") };
    assert_eq!(wrong.differing_fields(), "rsp", "{verdict}");
    assert_eq!(wrong.actual.rsp, wrong.expected.rsp + 1, "{verdict}");
    assert_eq!((wrong.nmi, wrong.actual.rip), (1, wrong.expected.rip), "{verdict}");
    assert!(wrong.iretq.starts_with("nmi_linux_restore+"), "{verdict}");
    assert!(wrong.delivered_at < wrong.returned_at, "{verdict}");
    let message = verdict.to_string();
    assert!(message.starts_with("wrong NMI return: NMI #1 (delivered at instruction"), "{message}");
    assert!(message.contains(&format!("with RSP {:#x}", wrong.actual.rsp)), "{message}");
}

#[test]
fn kvm_wrong_return_when_the_entry_returns_to_a_wrong_rip() {
    // `inc byte ptr [rsp]; nop`: the "iret" frame's RIP, one byte into the instruction.
    let Some(mut vm) = common::boot_elf(linux_with_tampered_return([0xfe, 0x04, 0x24, 0x90]))
    else {
        return;
    };
    let verdict = one_nmi_on_linux(&mut vm, 5);
    let Verdict::WrongReturn(wrong) = &verdict else { panic!("{verdict}") };
    assert_eq!(wrong.differing_fields(), "rip", "{verdict}");
    assert_eq!(wrong.actual.rip, wrong.expected.rip + 1, "{verdict}");
    assert!(!wrong.actual_rsp_on_nmi_stack, "{verdict}");
    // The same bug wherever the NMI lands: one finding.
    let later = one_nmi_on_linux(&mut vm, 30);
    assert_eq!(later.signature(), verdict.signature(), "{later}");
    assert_eq!(verdict.signature(), "wrong-return: rip at nmi_linux_restore");
}

/// `sub rsp, 0x4000`: 7 bytes, as long as an entry's first instruction (`inc qword ptr [rip +
/// NMI_DELIVERIES]`).
const RSP_DOWN_16K: [u8; 7] = [0x48, 0x81, 0xec, 0x00, 0x40, 0x00, 0x00];

#[test]
fn kvm_a_stack_that_runs_over_faults_in_its_guard_page_and_the_report_survives() {
    // The NMI entry's first instruction moves RSP 16 KiB down, below the NMI stack, as a
    // runaway repeat path would: its next access faults in the guard page, the #PF cannot be
    // delivered on that stack either, and the double fault (on IST2) reports where RSP was,
    // in a mailbox nothing overwrote.
    let patched = common::patched_guest("nmi_naive", 0, &RSP_DOWN_16K);
    let Some(mut vm) = common::boot_elf(patched) else { return };
    let verdict = run(&mut vm, Workload::Loop, 10, &[Trigger::After(40)]);
    let Verdict::GuestPanic(panic) = &verdict else { panic!("{verdict}") };
    assert!(
        panic.message.starts_with("invariant violated: double fault at RIP ")
            && panic
                .message
                .contains("in the guard page below the NMI IST stack (a stack overflow)"),
        "{verdict}"
    );
}
