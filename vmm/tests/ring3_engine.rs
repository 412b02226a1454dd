//! The engine through ring 3 (docs/engine.md, "Ring 3"): NMIs at ring-3 points, in both
//! SYSCALL gaps and on the way back to user are delivered where the schedule says, handled by
//! the `linux` entry's user path, judged by the oracles, and the same in both modes; ring 3 is
//! never single-stepped.

mod common;

use nmifuzz_abi::{Action, Script, Variant, Workload, fault};
use vmm::engine::schedule::{Plan, Trigger};
use vmm::engine::table::InstructionTable;
use vmm::engine::trace::Event;
use vmm::engine::{Engine, Execution, Mode, RunOptions, profile};
use vmm::{Verdict, Vm};

/// Length of a ring-3 point's write, `mov byte ptr [USER_POINT_ADDRESS], al` (88 04 25 + disp32).
const POINT_WRITE_LEN: u64 = 7;

fn setup() -> Option<(Vm, Engine)> {
    let mut vm = common::boot()?;
    let profile = profile::calibrate(&mut vm).unwrap();
    let engine = Engine::new(&vm, profile).unwrap();
    Some((vm, engine))
}

fn run(vm: &mut Vm, engine: &mut Engine, plan: &Plan, mode: Mode) -> Execution {
    let options = RunOptions { keep_trace: true, mode, ..RunOptions::default() };
    engine.run(vm, plan, &options).unwrap()
}

fn at(vm: &Vm, symbol: &str, offset: u64, occurrence: u32, extra: u64) -> Trigger {
    Trigger::At { address: vm.image().symbol(symbol).unwrap() + offset, occurrence, extra }
}

/// A plan for `variant`'s User workload (3 iterations) with `actions` and `injections`.
fn user_plan(variant: Variant, actions: &[Action], injections: Vec<Trigger>) -> Plan {
    let mut script = Script::new(variant, Workload::User, 3);
    script.action_count = actions.len() as u32;
    script.actions[..actions.len()].copy_from_slice(actions);
    Plan { script, injections }
}

/// The frame RIPs of the deliveries in `execution`'s trace.
fn delivered_at(execution: &Execution) -> Vec<u64> {
    let events = execution.trace.iter().flat_map(|step| &step.events);
    events
        .filter_map(|e| match e {
            Event::NmiDelivered { frame_rip } => Some(*frame_rip),
            _ => None,
        })
        .collect()
}

#[test]
fn kvm_an_nmi_at_a_ring3_point_arrives_there_and_linux_handles_it_on_the_thread_stack() {
    let Some((mut vm, mut engine)) = setup() else { return };
    for point in ["user_point_a", "user_point_ss16", "user_point_alt_cs"] {
        for mode in [Mode::Stepped, Mode::Fast] {
            let plan = user_plan(
                Variant::LINUX,
                &[Action { faults: fault::UD, ..Action::NONE }],
                vec![at(&vm, point, POINT_WRITE_LEN, 2, 0)],
            );
            let execution = run(&mut vm, &mut engine, &plan, mode);
            assert_eq!(execution.outcome.verdict, Verdict::Done, "{point} {mode:?}");
            assert_eq!(execution.nmi.delivered, 1, "{point} {mode:?}");
            assert_eq!(execution.nmi.iterations, 1, "{point} {mode:?}");
            let expected = vm.image().symbol(point).unwrap() + POINT_WRITE_LEN;
            if mode == Mode::Stepped {
                assert_eq!(delivered_at(&execution), [expected], "{point}");
            }
            assert_eq!(execution.outcome.counters.user_points, 9, "{point} {mode:?}");
        }
    }
}

#[test]
fn kvm_the_table_names_every_ring3_point_and_the_kernel_side_of_ring3() {
    let Some((vm, _)) = setup() else { return };
    let table =
        InstructionTable::build(vm.image(), vm.ram(), Variant::LINUX.entry_symbol()).unwrap();
    for point in ["user_point_a", "user_point_ss16", "user_point_alt_cs"] {
        assert!(table.position(point, POINT_WRITE_LEN).is_some(), "{point}");
    }
    for symbol in ["entry_SYSCALL_64", "syscall_sysret_gap", "native_irq_return_ldt"] {
        assert!(table.position(symbol, 0).is_some(), "{symbol}");
    }
    // Nothing else in ring 3: the engine never stops there.
    let user = vm.image().symbol("user_start").unwrap();
    let in_ring3 = table.insns().iter().filter(|i| i.address >= user && i.address < user + 0x10000);
    assert_eq!(in_ring3.count(), 3);
}

/// The addresses of the table's instructions in the kernel side of ring 3 that lie in the
/// named symbols: the SYSCALL entry's gap, the SYSRET gap, and the return to user by IRET with
/// espfix64.
fn ring0_paths_of_ring3(vm: &Vm, table: &InstructionTable) -> Vec<u64> {
    let range =
        |from: &str, to: &str| vm.image().symbol(from).unwrap()..vm.image().symbol(to).unwrap();
    let ranges = [
        range("entry_SYSCALL_64", "entry_SYSCALL_64_stack_switched"),
        range("syscall_return_via_sysret", "syscall_return_via_iret"),
        range("return_to_user_iret", "user_mode_enter"),
    ];
    let insns = table.insns().iter().map(|i| i.address);
    insns.filter(|a| ranges.iter().any(|r| r.contains(a))).collect()
}

#[test]
fn kvm_linux_survives_an_nmi_at_every_instruction_of_the_gaps_and_the_return_to_user() {
    let Some((mut vm, mut engine)) = setup() else { return };
    let table =
        InstructionTable::build(vm.image(), vm.ram(), Variant::LINUX.entry_symbol()).unwrap();
    let addresses = ring0_paths_of_ring3(&vm, &table);
    assert!(addresses.len() > 20, "{addresses:x?}");
    // Occurrence 2 of a gap instruction is the system call with RSP on the NMI stack; of the
    // IRET path, the return through espfix64 (the first is the kernel's way into ring 3).
    for address in addresses {
        for occurrence in [1, 2, 3] {
            let plan = user_plan(
                Variant::LINUX,
                &[Action { faults: fault::UD, ..Action::NONE }],
                vec![Trigger::At { address, occurrence, extra: 0 }],
            );
            let execution = run(&mut vm, &mut engine, &plan, Mode::Stepped);
            let symbol = vm.image().symbolize(address);
            assert_eq!(execution.outcome.verdict, Verdict::Done, "{symbol} #{occurrence}");
            assert_eq!(execution.nmi.delivered, 1, "{symbol} #{occurrence}");
        }
    }
}

/// CVE-2015-3290: an NMI from ring 3 while on a 16-bit SS takes a #UD in do_nmi (NMIs open
/// again); a second NMI at each instruction of espfix64's copy of its iret frame. `linux` (the
/// user path on the thread stack) passes all of them; the variant, whose NMI exit copies the
/// NMI stack's "iret" frame, returns to the user's RIP with the kernel's CS for some.
#[test]
fn kvm_cve_2015_3290_returns_to_a_user_rip_with_kernel_cs_from_inside_the_espfix_copy() {
    let Some((mut vm, mut engine)) = setup() else { return };
    let table =
        InstructionTable::build(vm.image(), vm.ram(), Variant::CVE_2015_3290.entry_symbol())
            .unwrap();
    let copy = vm.image().symbol("native_irq_return_ldt").unwrap()
        ..vm.image().symbol("user_mode_enter").unwrap();
    let mut kernel_cs_returns = 0;
    for insn in table.insns().iter().filter(|i| copy.contains(&i.address)) {
        for variant in [Variant::LINUX, Variant::CVE_2015_3290] {
            let plan = user_plan(
                variant,
                &[Action { faults: fault::UD, ..Action::NONE }],
                vec![
                    at(&vm, "user_point_ss16", POINT_WRITE_LEN, 1, 0),
                    Trigger::At { address: insn.address, occurrence: 1, extra: 0 },
                ],
            );
            let verdict = run(&mut vm, &mut engine, &plan, Mode::Stepped).outcome.verdict;
            let place = format!("{}+{:#x}", insn.symbol, insn.offset);
            if variant == Variant::LINUX {
                assert_eq!(verdict, Verdict::Done, "linux, second NMI at {place}");
            } else if let Verdict::WrongReturn(wrong) = &verdict {
                kernel_cs_returns += u32::from(wrong.differing_fields().contains("cs"));
            }
        }
    }
    assert!(kernel_cs_returns > 0, "no second NMI in the copy made a return with the kernel's CS");
}
