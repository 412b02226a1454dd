//! The chaos-only scribble action and the reports of a guest that overwrote its own mailbox,
//! against real KVM: the bytes really change, reset puts them back, and a panic record the
//! guest cannot have written whole is reported as unreadable, saying where the mailbox is.

mod common;

use std::time::{Duration, Instant};

use nmifuzz_abi::{
    Action, MAILBOX_SYMBOL, Report, SCRIPT_SYMBOL, Scribble, ScribbleArea, Script, Variant,
    Workload, fault, port,
};
use vmm::engine::decode::InsnCache;
use vmm::engine::profile;
use vmm::engine::schedule::{Plan, Trigger};
use vmm::engine::{Engine, RunOptions};
use vmm::exit::Exit;
use vmm::{GuestPanic, Verdict, Vm};
use zerocopy::IntoBytes;

/// A plan whose first NMI, at the run's first instruction, scribbles `bytes` bytes of `area`.
fn scribbling(workload: Workload, area: ScribbleArea, bytes: u16, seed: u32) -> Plan {
    let mut script = Script::new(Variant::LINUX, workload, 0);
    script.action_count = 1;
    script.actions[0] = Action {
        faults: fault::SCRIBBLE,
        scribble: Scribble { area: area as u16, bytes, seed },
        ..Action::NONE
    };
    Plan { script, injections: vec![Trigger::After(0)] }
}

fn engine(vm: &mut Vm) -> Engine {
    let profile = profile::calibrate(vm).unwrap();
    Engine::new(vm, profile).unwrap()
}

fn script_bytes(vm: &Vm) -> Vec<u8> {
    let mut bytes = vec![0; size_of::<Script>()];
    vm.ram().read(vm.image().symbol(SCRIPT_SYMBOL).unwrap(), &mut bytes).unwrap();
    bytes
}

#[test]
fn kvm_a_scribble_changes_guest_memory_and_reset_restores_it() {
    let Some(mut vm) = common::boot() else { return };
    let mut engine = engine(&mut vm);
    let plan = scribbling(Workload::Loop, ScribbleArea::Script, 16, 7);
    let execution = engine.run(&mut vm, &plan, &RunOptions::default()).unwrap();
    assert_eq!(execution.outcome.counters.do_nmi_calls, 1, "{}", execution.outcome.verdict);
    let written = plan.script.as_bytes();
    let now = script_bytes(&vm);
    let changed = written.iter().zip(&now).filter(|(a, b)| a != b).count();
    // 16 random bytes: some may land on the same offset or write the value already there.
    assert!((1..=16).contains(&changed), "{changed} bytes of the script changed");
    // The same seed scribbles the same bytes.
    engine.run(&mut vm, &plan, &RunOptions::default()).unwrap();
    assert_eq!(script_bytes(&vm), now);
    vm.reset().unwrap();
    assert!(script_bytes(&vm).iter().all(|b| *b == 0), "reset restores the READY snapshot");
}

#[test]
fn kvm_a_scribbled_mailbox_gives_an_explicit_panic_report() {
    let Some(mut vm) = common::boot() else { return };
    let mut engine = engine(&mut vm);
    let mailbox = vm.image().symbol(MAILBOX_SYMBOL).unwrap();
    let mut unreadable = 0;
    for seed in 1..=12 {
        let plan = scribbling(Workload::Panic, ScribbleArea::Mailbox, 64, seed);
        let execution = engine.run(&mut vm, &plan, &RunOptions::default()).unwrap();
        let Verdict::GuestPanic(panic) = &execution.outcome.verdict else {
            panic!("seed {seed}: {}", execution.outcome.verdict)
        };
        // The guest writes its record after the scribble, but not the magic or the version.
        if panic.message != "workload asked to panic" {
            unreadable += 1;
            assert!(
                panic.message.starts_with("unreadable panic report: ")
                    && panic
                        .message
                        .contains(&format!("(mailbox at {mailbox:#x}); the run ended at ")),
                "seed {seed}: {panic:?}"
            );
        }
        assert!(!panic.message.is_empty() && !panic.file.is_empty(), "seed {seed}: {panic:?}");
    }
    assert!(unreadable > 0, "64 random bytes of 448 hit the magic or version in some of 12 runs");
}

/// The verdict of a PANIC report made now, with the mailbox as it is.
fn panic_report(vm: &Vm) -> GuestPanic {
    let exit = Exit::IoOut { port: port::REPORT, value: Report::Panic as u32, size: 4 };
    let limit = Duration::from_secs(1);
    match vm.classify(&exit, Instant::now() + limit, limit) {
        Some(Verdict::GuestPanic(panic)) => panic,
        other => panic!("a PANIC report is a guest panic, got {other:?}"),
    }
}

#[test]
fn kvm_empty_and_garbled_panic_records_say_so_and_where_the_mailbox_is() {
    let Some(mut vm) = common::boot() else { return };
    let mailbox = vm.image().symbol(MAILBOX_SYMBOL).unwrap();
    let at = format!("(mailbox at {mailbox:#x}); the run ended at ");
    // At READY the record is empty: a PANIC report from code that never filled it in.
    let panic = panic_report(&vm);
    assert!(
        panic.message.starts_with(&format!(
            "unreadable panic report: the message is empty (file length 0, line 0, rip 0x0) {at}"
        )),
        "{}",
        panic.message
    );
    assert_eq!((panic.file.as_str(), panic.line, panic.rip), ("<no location>", 0, 0));
    let shown = Verdict::GuestPanic(panic).to_string();
    assert!(!shown.contains("guest panic:  ("), "{shown}");
    assert!(shown.ends_with("(at <no location>)"), "no made-up line and column: {shown}");

    // Lengths no guest writes.
    let message_len = std::mem::offset_of!(nmifuzz_abi::Mailbox, panic)
        + std::mem::offset_of!(nmifuzz_abi::PanicRecord, message_len);
    vm.ram_mut().write(mailbox + message_len as u64, &1000u32.to_le_bytes()).unwrap();
    let message = panic_report(&vm).message;
    assert!(
        message.starts_with(&format!(
            "unreadable panic report: message length 1000 (at most 256), file name length 0 (at \
             most 96) {at}"
        )),
        "{message}"
    );

    // A smashed magic: the report says where the run ended and what the mailbox now holds.
    vm.ram_mut().write(mailbox, b"AAAA").unwrap();
    let message = panic_report(&vm).message;
    assert!(
        message.starts_with(&format!(
            "unreadable panic report: bad magic 0x41414141, expected 0x4d494d4e {at}"
        )) && message.contains("the mailbox begins 0x"),
        "{message}"
    );
}

/// A guest sent into data by a smashed frame executes bytes that change from run to run: the
/// engine must decode what is there now, and an address outside memory is no error.
#[test]
fn kvm_decoded_instructions_follow_the_bytes_in_memory() {
    let Some(mut vm) = common::boot() else { return };
    let at = vm.image().symbol("NMIFUZZ_SCRATCH").unwrap();
    let mut insns = InsnCache::default();
    vm.ram_mut().write(at, &[0x48, 0xcf]).unwrap(); // iretq
    assert!(insns.get(vm.ram(), at).unwrap().is_iretq);
    vm.ram_mut().write(at, &[0xcc, 0x90]).unwrap(); // int3; nop
    let insn = insns.get(vm.ram(), at).unwrap();
    assert!(insn.is_int3 && !insn.is_iretq && insn.len == 1, "{insn:?}");
    let outside = insns.get(vm.ram(), 0x6c00_0020_3bb0).unwrap();
    assert_eq!(outside.len, 0, "no bytes, an invalid instruction: {outside:?}");
}
