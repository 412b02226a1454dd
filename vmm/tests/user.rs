//! The ring-3 workload (`Workload::User`) against real KVM: it runs to DONE on every entry with
//! its counters and checksum, a corrupted user register is reported, and the native `syscall`
//! instruction is reported for what it is on a host where SYSCALL stays at CPL3.
//!
//! Schedules cannot place NMIs at ring-3 points yet (the stepped engine single-steps where an
//! injection is due, which leaks #DB into ring 3 on kvm_pvm), so the runs with NMIs here drive
//! the VM by hand: run to the n-th point's MMIO exit, make NMIs pending (`Vm::inject_nmi`),
//! and let the next KVM_RUN deliver them right after the point, in ring 3.

mod common;

use std::time::Duration;

use nmifuzz_abi::{Action, Counters, Script, USER_POINT_ADDRESS, Variant, Workload, fault, option};
use vmm::exit::Exit;
use vmm::vm::GuestDebug;
use vmm::{RunLimits, Verdict, Vm};

/// System calls per iteration: getpid, getpid on the NMI stack, set_ss16, getpid, alt_cs,
/// getpid, bad_return.
const SYSCALLS_PER_ITERATION: u64 = 7;
/// Points per iteration: (a), after set_ss16, after alt_cs.
const POINTS_PER_ITERATION: u64 = 3;
/// The system-call numbers in the order one iteration makes them (guest `user::syscall`).
const ITERATION_CALLS: [u64; 7] = [0, 0, 1, 0, 2, 0, 3];
const EXIT: u64 = 4;

fn run(vm: &mut Vm, script: &Script) -> vmm::Outcome {
    vm.reset().unwrap();
    vm.write_script(script).unwrap();
    vm.run(&RunLimits { wall: Duration::from_secs(2), max_exits: 100_000 }).unwrap()
}

/// Runs `script`, making `count` NMIs pending at the point exit number `point` (1-based, in
/// run order) for each `(point, count)` of `nmis`; returns the verdict and the counters.
fn run_with_nmis(vm: &mut Vm, script: &Script, nmis: &[(u64, u32)]) -> (Verdict, Counters) {
    vm.reset().unwrap();
    vm.write_script(script).unwrap();
    let limit = Duration::from_secs(2);
    let deadline = vm.watchdog().arm(limit);
    let mut points = 0;
    let verdict = loop {
        let exit = vm.run_once().unwrap();
        if let Exit::Mmio { address: USER_POINT_ADDRESS, write: true } = exit {
            points += 1;
            for &(_, count) in nmis.iter().filter(|(at, _)| *at == points) {
                (0..count).for_each(|_| vm.inject_nmi().unwrap());
            }
        }
        if let Some(verdict) = vm.classify(&exit, deadline, limit) {
            break verdict;
        }
    };
    vm.watchdog().disarm();
    (verdict, vm.mailbox().unwrap().counters)
}

/// Where, after the `occurrence`-th arrival at a symbol, [`run_with_nmi_at`] makes its NMI
/// pending.
#[derive(Clone, Copy, Debug)]
enum Then {
    /// After this many single-steps (ring 0 only: a step into ring 3 leaks #DB on kvm_pvm).
    Steps(u32),
    /// At the next arrival at this address (a step over the SYSRET gap's `swapgs` runs on
    /// through `sysretq` on kvm_pvm, so the `sysretq` is reached with a breakpoint).
    Breakpoint(u64),
}

/// Runs `script` with one NMI made pending in ring 0: the `occurrence`-th (1-based) time the
/// guest reaches `symbol`, then `then`; and one at each point exit numbered in `points`. A hardware execute breakpoint on `symbol` counts the
/// arrivals, each passed with one single-step (`symbol`'s first instruction must stay in ring
/// 0); the NMI is made pending with neither breakpoint nor stepping left, so that the next
/// KVM_RUN delivers it before the instruction at RIP.
fn run_with_nmi_at(
    vm: &mut Vm,
    script: &Script,
    symbol: &str,
    occurrence: u32,
    then: Then,
    points: &[u64],
) -> (Verdict, Counters) {
    let start = vm.image().symbol(symbol).unwrap();
    let at =
        |address| GuestDebug { single_step: false, breakpoints: [Some(address), None, None, None] };
    let step = GuestDebug { single_step: true, ..GuestDebug::default() };
    vm.reset().unwrap();
    vm.write_script(script).unwrap();
    vm.set_debug(at(start)).unwrap();
    let limit = Duration::from_secs(2);
    let deadline = vm.watchdog().arm(limit);
    // Arrivals seen; single-steps to go (past an arrival, or towards the NMI).
    let (mut seen, mut passing, mut steps, mut injected) = (0, false, None, false);
    let mut point = 0;
    let verdict = loop {
        let exit = vm.run_once().unwrap();
        let inject = match exit {
            Exit::Debug { .. } if passing => {
                passing = false;
                vm.set_debug(at(start)).unwrap();
                false
            }
            Exit::Debug { .. } if steps.is_some() => {
                steps = steps.map(|n: u32| n - 1);
                steps == Some(0)
            }
            Exit::Debug { pc, .. } if pc == start && seen + 1 < occurrence => {
                seen += 1;
                passing = true;
                vm.set_debug(step).unwrap();
                false
            }
            Exit::Debug { pc, .. } if pc == start && seen + 1 == occurrence => {
                seen += 1;
                match then {
                    Then::Steps(0) => true,
                    Then::Steps(n) => {
                        steps = Some(n);
                        vm.set_debug(step).unwrap();
                        false
                    }
                    Then::Breakpoint(address) => {
                        vm.set_debug(at(address)).unwrap();
                        false
                    }
                }
            }
            Exit::Debug { .. } => true,
            Exit::Mmio { address: USER_POINT_ADDRESS, write: true } => {
                point += 1;
                if points.contains(&point) {
                    vm.inject_nmi().unwrap();
                }
                false
            }
            _ => {
                if let Some(verdict) = vm.classify(&exit, deadline, limit) {
                    break verdict;
                }
                false
            }
        };
        if inject {
            vm.set_debug(GuestDebug::default()).unwrap();
            vm.inject_nmi().unwrap();
            (steps, injected) = (None, true);
        }
    };
    vm.watchdog().disarm();
    vm.set_debug(GuestDebug::default()).unwrap();
    assert!(injected, "{symbol} #{occurrence}, then {then:?}, was never reached: {verdict}");
    (verdict, vm.mailbox().unwrap().counters)
}

/// The single-steps from the first time `from` is reached to `to` (on kvm_pvm a `swapgs` and
/// the next instruction are one step).
fn steps_between(vm: &mut Vm, script: &Script, from: &str, to: u64) -> u32 {
    let start = vm.image().symbol(from).unwrap();
    vm.reset().unwrap();
    vm.write_script(script).unwrap();
    vm.set_debug(GuestDebug { single_step: false, breakpoints: [Some(start), None, None, None] })
        .unwrap();
    while !matches!(vm.run_once().unwrap(), Exit::Debug { pc, .. } if pc == start) {}
    vm.set_debug(GuestDebug { single_step: true, ..GuestDebug::default() }).unwrap();
    let mut steps = 0;
    while vm.regs().rip != to {
        assert!(matches!(vm.run_once().unwrap(), Exit::Debug { .. }) && steps < 100, "{from}");
        steps += 1;
    }
    vm.set_debug(GuestDebug::default()).unwrap();
    steps
}

/// The guest's checksum over the system-call numbers of `iterations` iterations and the exit.
fn expected_checksum(iterations: u64) -> u64 {
    let calls = (0..iterations).flat_map(|_| ITERATION_CALLS).chain([EXIT]);
    calls.fold(0x6e6d_6966_757a_7a21, |sum: u64, number| {
        let sum = (sum ^ number).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        sum ^ (sum >> 29)
    })
}

fn expected_counters(iterations: u64) -> Counters {
    Counters {
        workload_iterations: iterations,
        checksum: expected_checksum(iterations),
        syscalls: iterations * SYSCALLS_PER_ITERATION + 1,
        user_points: iterations * POINTS_PER_ITERATION,
        espfix_returns: iterations,
        bad_iret_fixups: iterations,
        ..Counters::default()
    }
}

#[test]
fn kvm_user_workload_runs_to_done_on_linux() {
    let Some(mut vm) = common::boot() else { return };
    for (arg, iterations) in [(0, 8), (3, 3)] {
        let outcome = run(&mut vm, &Script::new(Variant::LINUX, Workload::User, arg));
        assert_eq!(outcome.verdict, Verdict::Done, "arg {arg}: {:?}", outcome.counters);
        assert_eq!(outcome.counters, expected_counters(iterations), "arg {arg}");
    }
}

#[test]
fn kvm_user_workload_runs_to_done_on_every_entry_without_nmis() {
    let Some(mut vm) = common::boot() else { return };
    for &variant in Variant::ALL {
        let outcome = run(&mut vm, &Script::new(variant, Workload::User, 2));
        assert_eq!(outcome.verdict, Verdict::Done, "{}", variant.name());
        assert_eq!(outcome.counters, expected_counters(2), "{}", variant.name());
    }
}

#[test]
fn kvm_a_corrupted_user_register_is_reported() {
    // The first known value, rbx's, loaded wrong: `mov rbx, imm64` is 48 bb imm64.
    let elf = common::patched_guest("user_load_known_values", 2, &0xbad_u64.to_le_bytes());
    let Some(mut vm) = common::boot_elf(elf) else { return };
    let outcome = run(&mut vm, &Script::new(Variant::LINUX, Workload::User, 1));
    let Verdict::GuestPanic(panic) = outcome.verdict else {
        panic!("expected a guest panic, got {}", outcome.verdict)
    };
    assert_eq!(
        panic.message,
        "invariant violated: the user workload's rbx is 0xbad, expected 0xb0b0b0b0b0b0b0b0 \
         [invariant 2]"
    );
    assert_eq!(panic.symbol, vm.image().symbolize(panic.rip));
}

#[test]
fn kvm_native_syscall_is_a_kernel_rip_at_cpl3_on_this_host() {
    let Some(mut vm) = common::boot() else { return };
    let mut script = Script::new(Variant::LINUX, Workload::User, 1);
    script.options = option::NATIVE_SYSCALL;
    let outcome = run(&mut vm, &script);
    match outcome.verdict {
        // kvm_pvm: SYSCALL jumps to LSTAR but stays at CPL3, where the kernel page faults.
        Verdict::GuestPanic(panic) => {
            assert!(panic.message.contains("#PF from ring 3"), "{}", panic.message);
            assert!(panic.message.ends_with("[invariant 10]"), "{}", panic.message);
        }
        // Ordinary KVM: SYSCALL enters CPL0 and the workload runs as with `ud2`.
        Verdict::Done => assert_eq!(outcome.counters, expected_counters(1)),
        other => panic!("expected DONE or a #PF from ring 3, got {other}"),
    }
}

#[test]
fn kvm_nmis_from_ring3_return_through_every_user_path() {
    let Some(mut vm) = common::boot() else { return };
    // Points 1, 2, 3 of the first iteration: (a) on SS 0x1b, after set_ss16 on SS 0x2b (the
    // NMI returns through espfix64), after alt_cs on CS 0x33; and (a) of the second.
    let nmis = [(1, 1), (2, 1), (3, 1), (4, 1)];
    for &variant in Variant::ALL.iter().filter(|v| **v != Variant::NAIVE) {
        let script = Script::new(variant, Workload::User, 2);
        let (verdict, counters) = run_with_nmis(&mut vm, &script, &nmis);
        assert_eq!(verdict, Verdict::Done, "{}", variant.name());
        // The NMI at the point on the 16-bit SS returns through espfix64 too, in every entry.
        let expected = Counters {
            do_nmi_calls: 4,
            nmi_iterations: 4,
            espfix_returns: 3,
            ..expected_counters(2)
        };
        assert_eq!(counters, expected, "{}", variant.name());
    }
}

/// Offset of `naive`'s `swapgs` on entry from ring 3: after `inc [rip + NMI_DELIVERIES]` (7
/// bytes), `cld` (1), `test byte ptr [rsp + 8], 3` (5) and `jz` (2).
const NAIVE_ENTRY_SWAPGS: u64 = 15;

#[test]
fn kvm_an_entry_without_swapgs_runs_do_nmi_on_the_user_gs() {
    let swapgs = [0x0f, 0x01, 0xf8];
    let elf = common::patched_guest("nmi_naive", NAIVE_ENTRY_SWAPGS, &[0x90; 3]);
    let image = vmm::GuestImage::parse(vmm::EMBEDDED_GUEST.to_vec(), 16 << 20).unwrap();
    let at = image.symbol("nmi_naive").unwrap() + NAIVE_ENTRY_SWAPGS;
    let Some(mut vm) = common::boot_elf(elf) else { return };
    let mut original = [0; 3];
    common::boot().unwrap().ram().read(at, &mut original).unwrap();
    assert_eq!(original, swapgs, "naive's entry swapgs moved");
    let script = Script::new(Variant::NAIVE, Workload::User, 1);
    let (verdict, _) = run_with_nmis(&mut vm, &script, &[(1, 1)]);
    let Verdict::GuestPanic(panic) = verdict else { panic!("expected a panic, got {verdict}") };
    assert!(panic.message.contains("runs on the user's GS base"), "{}", panic.message);
    assert!(panic.message.ends_with("[invariant 11]"), "{}", panic.message);
}

#[test]
fn kvm_a_revoked_cs_makes_the_nmis_iret_fault_and_the_fixup_signal_ring3() {
    let Some(mut vm) = common::boot() else { return };
    let mut script = Script::new(Variant::LINUX, Workload::User, 1);
    script.action_count = 1;
    script.actions[0] = Action { faults: fault::REVOKE_CS, ..Action::NONE };
    // Point 3 is on CS 0x33: the NMI's IRET back faults, and ring 3 resumes at its signal
    // handler, skipping the getpid and bad_return of (e) and (f).
    let (verdict, counters) = run_with_nmis(&mut vm, &script, &[(3, 1)]);
    assert_eq!(verdict, Verdict::Done);
    let mut expected = Counters { do_nmi_calls: 1, nmi_iterations: 1, ..expected_counters(1) };
    expected.syscalls -= 2;
    // The NMI struck right after point 3's write, before the workload counted it.
    expected.user_points -= 1;
    expected.checksum = {
        let calls = [0, 0, 1, 0, 2, EXIT];
        calls.iter().fold(0x6e6d_6966_757a_7a21, |sum: u64, &number| {
            let sum = (sum ^ number).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            sum ^ (sum >> 29)
        })
    };
    assert_eq!(counters, expected);
}

#[test]
fn kvm_an_nmi_nested_in_a_user_nmis_handler_is_latched() {
    let Some(mut vm) = common::boot() else { return };
    let mut script = Script::new(Variant::LINUX, Workload::User, 1);
    script.action_count = 1;
    script.actions[0] = Action { faults: fault::UD, ..Action::NONE };
    // An NMI at point 1 runs do_nmi on the thread stack; its #UD returns with the IRETQ at
    // exception_iretq, which unmasks NMIs; a second NMI right after it (one step: the IRETQ and
    // the instruction after it) comes from kernel mode, is a first NMI for the entry and finds
    // do_nmi running: latched, and the running call runs a second iteration.
    let (verdict, counters) =
        run_with_nmi_at(&mut vm, &script, "exception_iretq", 1, Then::Steps(1), &[1]);
    assert_eq!(verdict, Verdict::Done);
    let expected =
        Counters { do_nmi_calls: 1, nmi_iterations: 2, invalid_opcodes: 1, ..expected_counters(1) };
    assert_eq!(counters, expected);
}

#[test]
fn the_user_area_loads_at_8_mib_above_the_kernel_image() {
    let image = vmm::GuestImage::parse(vmm::EMBEDDED_GUEST.to_vec(), 16 << 20).unwrap();
    for symbol in ["user_start", "user_stack_top", "USER_VARS"] {
        let address = image.symbol(symbol).unwrap();
        assert!((0x80_0000..0xa0_0000).contains(&address), "{symbol} at {address:#x}");
    }
    assert!(image.symbol("kmain").unwrap() < 0x80_0000);
}

#[test]
fn kvm_nmis_in_the_system_call_gaps_with_rsp_on_the_nmi_stack_are_first_nmis() {
    let Some(mut vm) = common::boot() else { return };
    // The second system call of an iteration, (c), runs entry_SYSCALL_64 and the SYSRET exit
    // on an RSP inside the NMI stack (DF clear): each gap instruction, before and after its
    // swapgs, with the NMI arriving in kernel mode there (CVE-2015-3291's situation).
    let sysretq = vm.image().symbol("syscall_sysret_gap").unwrap() + 3;
    let sites = [
        ("entry_SYSCALL_64", Then::Steps(0)), // swapgs, on the user's GS
        ("entry_SYSCALL_64", Then::Steps(1)), // mov gs:[rsp_scratch], rsp
        ("entry_SYSCALL_64", Then::Steps(2)), // mov rsp, gs:[top_of_stack]
        ("syscall_sysret_gap", Then::Steps(0)), // swapgs, on the kernel's GS
        ("syscall_sysret_gap", Then::Breakpoint(sysretq)), // sysretq, on the user's GS
    ];
    // cve-2015-3291 loses exactly these NMIs: its bug.
    for &variant in Variant::ALL.iter().filter(|v| **v != Variant::CVE_2015_3291) {
        for (symbol, then) in sites {
            let script = Script::new(variant, Workload::User, 1);
            let (verdict, counters) = run_with_nmi_at(&mut vm, &script, symbol, 2, then, &[]);
            let site = format!("{} at {symbol}, then {then:?}", variant.name());
            assert_eq!(verdict, Verdict::Done, "{site}");
            let expected = Counters { do_nmi_calls: 1, nmi_iterations: 1, ..expected_counters(1) };
            assert_eq!(counters, expected, "{site}");
        }
    }
}

#[test]
fn kvm_nmis_in_the_return_to_user_paths_are_handled_on_the_users_gs() {
    let Some(mut vm) = common::boot() else { return };
    // An action that raises #UD: the exception in do_nmi then runs on whatever GS the NMI
    // found, the user's in most of these places.
    let mut script = Script::new(Variant::LINUX, Workload::User, 1);
    script.action_count = 1;
    script.actions[0] = Action { faults: fault::UD, ..Action::NONE };
    let iret = vm.image().symbol("native_irq_return_iret").unwrap();
    // native_irq_return_ldt to its IRETQ, every stop (set_ss16's return).
    let to_iretq = steps_between(&mut vm, &script, "native_irq_return_ldt", iret);
    let espfix = (0..=to_iretq).map(|n| ("native_irq_return_ldt", 1, Then::Steps(n)));
    // The first IRET to ring 3, and the faulting one of bad_return (the third IRET exit).
    let others = [
        ("return_to_user_iret", 1, Then::Steps(0)),
        ("return_to_user_iret", 1, Then::Steps(1)),
        ("return_to_user_iret", 1, Then::Steps(3)),
        ("syscall_return_via_iret", 3, Then::Breakpoint(iret)),
    ];
    for (symbol, occurrence, then) in espfix.chain(others) {
        let (verdict, counters) = run_with_nmi_at(&mut vm, &script, symbol, occurrence, then, &[]);
        let site = format!("{symbol} #{occurrence}, then {then:?}");
        assert_eq!(verdict, Verdict::Done, "{site}");
        let expected = Counters {
            do_nmi_calls: 1,
            nmi_iterations: 1,
            invalid_opcodes: 1,
            ..expected_counters(1)
        };
        assert_eq!(counters, expected, "{site}");
    }
}
