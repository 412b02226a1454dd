//! Reset restores guest memory and vCPU state to the snapshot, byte for byte.

mod common;

use std::time::Duration;

use nmifuzz_abi::{Script, USER_POINT_ADDRESS, Variant, Workload};
use vmm::{RunLimits, Verdict, Vm};

/// Asserts that memory and every piece of vCPU state equal the snapshot.
fn assert_equals_snapshot(vm: &mut Vm) {
    vm.apply_pending_reset().unwrap();
    let memory = vm.ram().copy_all().unwrap();
    let snapshot = vm.snapshot();
    if let Some(i) = memory.iter().zip(&snapshot.memory).position(|(a, b)| a != b) {
        panic!(
            "guest memory differs from the snapshot at {i:#x}: {:#04x} != {:#04x}",
            memory[i], snapshot.memory[i]
        );
    }
    let vcpu = vm.vcpu();
    assert_eq!(vcpu.get_regs().unwrap(), snapshot.regs);
    assert_eq!(vcpu.get_sregs().unwrap(), snapshot.sregs);
    assert_eq!(vcpu.get_fpu().unwrap(), snapshot.fpu);
    assert_eq!(vcpu.get_debug_regs().unwrap(), snapshot.debugregs);
    let events = vcpu.get_vcpu_events().unwrap();
    assert_eq!(events.nmi, snapshot.events.nmi);
    assert_eq!(events.exception.injected, snapshot.events.exception.injected);
    assert_eq!(events.exception.pending, snapshot.events.exception.pending);
    assert_eq!(events.interrupt, snapshot.events.interrupt);
}

#[test]
fn kvm_reset_restores_memory_and_vcpu_byte_for_byte() {
    let Some(mut vm) = common::boot() else { return };
    let scratch = vm.image().symbol("NMIFUZZ_SCRATCH").unwrap();
    for pages in [1, 200, 256] {
        vm.reset().unwrap();
        vm.write_script(&Script::new(Variant::NAIVE, Workload::Scribble, pages)).unwrap();
        // A host write far from anything the guest touches must be undone as well.
        vm.ram_mut().write_u64(scratch + 255 * 4096 + 8, 0x5eed).unwrap();
        let outcome = vm.run(&RunLimits::default()).unwrap();
        assert_eq!(outcome.verdict, Verdict::Done);
        assert_eq!(outcome.counters.pages_scribbled, u64::from(pages));
        assert_ne!(vm.ram().read_u64(scratch).unwrap(), 0, "the guest really scribbled");
        let restored = vm.reset().unwrap();
        assert!(restored >= pages as usize, "{restored} pages restored for {pages} dirtied");
        assert_equals_snapshot(&mut vm);
    }
}

#[test]
fn kvm_reset_after_a_timeout_and_a_triple_fault_is_exact() {
    let Some(mut vm) = common::boot() else { return };
    let limits = RunLimits { wall: Duration::from_millis(200), max_exits: 10_000 };
    for workload in [Workload::Spin, Workload::TripleFault, Workload::Panic] {
        vm.reset().unwrap();
        vm.write_script(&Script::new(Variant::NAIVE, workload, 0)).unwrap();
        let outcome = vm.run(&limits).unwrap();
        assert!(outcome.verdict.is_finding(), "{workload:?}: {}", outcome.verdict);
        vm.reset().unwrap();
        assert_equals_snapshot(&mut vm);
    }
}

/// A run that ends on an instruction KVM finishes only at the next entry: an `in` (which the
/// guest never does, but a scribbled IDT or GDT can send it into the middle of an instruction
/// that is one) or a read of memory with nothing behind it. Finishing it writes back the
/// registers it was decoded with, so the reset must not let it happen over the snapshot's.
#[test]
fn kvm_reset_after_a_run_that_ends_on_an_unfinished_instruction_is_exact() {
    let Some(mut vm) = common::boot() else { return };
    let rip = vm.snapshot().regs.rip;
    let read = USER_POINT_ADDRESS as u32;
    let unfinished: [(&str, Vec<u8>); 2] = [
        ("in al, dx", vec![0xec]),
        ("mov al, [USER_POINT_ADDRESS]", [&[0x8a, 0x04, 0x25][..], &read.to_le_bytes()].concat()),
    ];
    for (name, bytes) in unfinished {
        vm.reset().unwrap();
        vm.write_script(&Script::new(Variant::NAIVE, Workload::Loop, 0)).unwrap();
        // The guest's first instruction after READY becomes `name`; the reset undoes the write.
        vm.ram_mut().write(rip, &bytes).unwrap();
        let outcome = vm.run(&RunLimits::default()).unwrap();
        assert!(
            matches!(outcome.verdict, Verdict::UnexpectedExit { .. }),
            "{name}: {}",
            outcome.verdict
        );
        vm.reset().unwrap();
        assert_equals_snapshot(&mut vm);
    }
}
