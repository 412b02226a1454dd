//! The workloads ([`Workload`]): what the code that NMIs interrupt does. `Loop` is the fuzzing
//! target (its loop is in `checked.rs`); the others misbehave on purpose so the host's tests
//! can produce every verdict.

mod checked;

use core::arch::asm;
use core::ptr::{addr_of_mut, write_volatile};

use nmifuzz_abi::Workload;

use crate::mailbox::{self, Counter};
use crate::panic::fail;
use crate::{console, idt, script, user};

/// `Loop` iterations when `workload_arg` is 0: four rounds of its four phases.
const DEFAULT_LOOP_ITERATIONS: u32 = 16;
/// The checksum before the first `Loop` iteration.
const LOOP_SEED: u64 = 0x6e6d_6966_757a_7a21;
/// The multiplier of the checksum's multiply-xorshift (2^64 / golden ratio, odd).
const LOOP_MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;

/// Pages of [`NMIFUZZ_SCRATCH`].
const SCRATCH_PAGES: usize = 256;
const PAGE_QWORDS: usize = 4096 / 8;
/// XORed with the page index to make the qword `Scribble` writes at the start of each page.
const SCRIBBLE_PATTERN: u64 = 0x5343_5249_4242_4c45;

/// 1 MiB of page-aligned scratch memory for `Scribble`, found by the host through its symbol.
#[repr(C, align(4096))]
struct Scratch([[u64; PAGE_QWORDS]; SCRATCH_PAGES]);

#[unsafe(no_mangle)]
static mut NMIFUZZ_SCRATCH: Scratch = Scratch([[0; PAGE_QWORDS]; SCRATCH_PAGES]);

/// Runs the script's workload with its parameter; returns only if the workload finished.
pub fn run(run: &script::Run) {
    let arg = run.workload_arg;
    match run.workload {
        Workload::Loop => run_loop(if arg == 0 { DEFAULT_LOOP_ITERATIONS } else { arg }),
        Workload::Panic => fail!("workload asked to panic"),
        Workload::TripleFault => triple_fault(),
        Workload::EmulationError => emulation_error(),
        Workload::Spin => spin(),
        Workload::Vmcall => vmcall(),
        Workload::Scribble => scribble(arg),
        Workload::Breakpoint => breakpoints(if arg == 0 { 1 } else { arg }),
        Workload::Ping => ping(arg),
        Workload::User => user::run(arg, run.options, &run.user_flags),
    }
}

/// The checked loop, then a checksum over the iterations it ran (a multiply-xorshift over the
/// iteration numbers, so the result depends on every iteration, in order).
fn run_loop(iterations: u32) {
    let done = checked::run(iterations);
    mailbox::set(Counter::WorkloadIterations, done);
    let mut checksum = LOOP_SEED;
    for i in 1..done + 1 {
        checksum = (checksum ^ i).wrapping_mul(LOOP_MULTIPLIER);
        checksum ^= checksum >> 29;
    }
    mailbox::set(Counter::Checksum, checksum);
}

/// Loads an empty IDT and executes `ud2`: the #UD cannot be delivered, nor the #GP that
/// replaces it, nor the #DF after that, so the CPU shuts down (a triple fault).
fn triple_fault() -> ! {
    // SAFETY: making every exception undeliverable is the point of this workload.
    unsafe { idt::load_empty() };
    // SAFETY: raises #UD; with no IDT it never returns.
    unsafe { asm!("ud2", options(nomem, nostack)) };
    fail!("ud2 returned with an empty IDT");
}

/// Calls code where no memory is: the user points' MMIO page. KVM has no instruction there to
/// emulate, and reports an emulation failure, on every host (kvm_pvm and stock KVM alike).
fn emulation_error() {
    // SAFETY: the call never returns: the fetch from the MMIO page ends the run. Were it to
    // return, everything but RAX would be as declared: the code there is no one's.
    unsafe {
        asm!(
            "call rax",
            inout("rax") nmifuzz_abi::USER_POINT_ADDRESS => _,
            clobber_abi("C"),
        );
    }
}

/// Jumps to itself forever, without any exit.
fn spin() -> ! {
    // SAFETY: an endless loop touches nothing.
    unsafe { asm!("2: jmp 2b", options(noreturn, nomem, nostack)) }
}

/// Executes `vmcall`, which never comes back on kvm_pvm.
fn vmcall() -> ! {
    // SAFETY: a KVM hypercall (RAX = 0, not a defined one) changes only RAX.
    unsafe { asm!("vmcall", inout("rax") 0u64 => _, options(nomem, nostack)) };
    fail!("vmcall returned");
}

/// Writes `page ^ SCRIBBLE_PATTERN` at the start of each of the first `pages` scratch pages.
fn scribble(pages: u32) {
    let pages = pages as usize;
    if pages > SCRATCH_PAGES {
        fail!("scribble: workload_arg {pages} exceeds the {SCRATCH_PAGES} scratch pages");
    }
    for page in 0..pages {
        // SAFETY: an in-bounds qword of the scratch static, which only this workload writes.
        unsafe {
            write_volatile(addr_of_mut!(NMIFUZZ_SCRATCH.0[page][0]), page as u64 ^ SCRIBBLE_PATTERN)
        };
        mailbox::increment(Counter::PagesScribbled);
    }
}

/// Executes `count` ring-0 `int3`s; each is a #BP that its handler counts (on kvm_pvm the VMM
/// emulates the int3 by injecting that #BP).
fn breakpoints(count: u32) {
    for _ in 0..count {
        // SAFETY: #BP is handled on IST3 and returns right after the int3 with everything as
        // before, except the breakpoint counter in memory.
        unsafe { asm!("int3") };
    }
}

/// `count` exits to the host through the ping port, and nothing else: the host times them.
fn ping(count: u32) {
    for _ in 0..count {
        console::ping();
    }
}
