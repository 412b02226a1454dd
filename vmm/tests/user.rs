//! The ring-3 workload (`Workload::User`) against real KVM: it runs to DONE on every entry with
//! its counters and checksum, a corrupted user register is reported, and the native `syscall`
//! instruction is reported for what it is on a host where SYSCALL stays at CPL3.
//!
//! NMIs at ring-3 points need the engine's ring-3 support (the stepped engine single-steps
//! where an injection is due, which leaks #DB into ring 3 on kvm_pvm), so these runs inject
//! none.

mod common;

use std::time::Duration;

use nmifuzz_abi::{Counters, Script, Variant, Workload, option};
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
