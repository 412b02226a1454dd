//! `do_nmi`, the handler body every entry calls, modelled on Linux's C side
//! (`arch/x86/kernel/nmi.c`): the `nmi_state` latch (legal only under an NMI from ring 3), CR2 and DR7 saved on entry and put back
//! if the handler changed them, and the #BP/#DB stack switch of Linux 3.3 to 5.x. Each
//! iteration starts with a call of [`nmi_iteration`], where the host counts iterations, and
//! ends with the invariant checks of `checks.rs`; in between, the script's action for this
//! call: busy work, then the faults it asks for.

use core::arch::asm;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use nmifuzz_abi::{Action, fault};

use super::{NmiRegs, checks};
use crate::mailbox::{self, Counter};
use crate::{cpu, gdt, idt, invariant, paging, scribble, script, tss, user};

/// Linux's `nmi_state`: `do_nmi` is not running.
const NOT_RUNNING: u64 = 0;
/// `do_nmi` is running.
const EXECUTING: u64 = 1;
/// `do_nmi` was entered again while running; the running one must run another iteration.
const LATCHED: u64 = 2;

static NMI_STATE: AtomicU64 = AtomicU64::new(NOT_RUNNING);
/// Whether the running `do_nmi` call handles an NMI from ring 3 (on the thread stack).
static FROM_USER: AtomicBool = AtomicBool::new(false);

/// The NMI handler body, with Linux's `nmi_state` latch: a call while another runs only sets
/// LATCHED and returns, and the running call runs another iteration for it.
///
/// Which nesting is legal depends on where the running call came from:
/// - **From ring 3**, the entry ran on the thread stack and left the NMI stack alone. If
///   `do_nmi` takes an exception, its IRETQ unblocks NMIs, and a nested NMI from kernel mode
///   passes the entry's checks as a first NMI (nothing is on the NMI stack) and reaches
///   `do_nmi`: the latch is what handles it, as in Linux.
/// - **From kernel mode**, the entry's assembly must catch every nested NMI; a call that gets
///   here while another runs is invariant 1 broken, and so is a "first" call whose interrupted
///   context is NMI handling itself (its RSP on the NMI stack; except in the two system-call
///   gaps, where ring-0 code runs on an RSP the user chose, possibly on the NMI stack).
///
/// For an NMI from ring 3 the entry must have switched to the kernel's GS (invariant 11), and
/// the frame it returns through must go back to ring 3 with user segments (invariant 10).
#[unsafe(no_mangle)]
pub extern "C" fn do_nmi(regs: &mut NmiRegs) {
    invariant::check_flags("do_nmi", 0);
    let from_user = regs.frame.cs & 3 != 0;
    if NMI_STATE.load(Ordering::Relaxed) != NOT_RUNNING {
        NMI_STATE.store(LATCHED, Ordering::Relaxed);
        if FROM_USER.load(Ordering::Relaxed) {
            return;
        }
        invariant::violated(1, format_args!("do_nmi entered while running (depth 2)"));
    }
    if from_user {
        user::check_nmi_from_user(&regs.frame);
    } else if tss::on_nmi_stack(regs.frame.rsp) && !user::in_syscall_gap(regs.frame.rip) {
        invariant::violated(
            1,
            format_args!(
                "do_nmi entered for an NMI that interrupted NMI handling (depth 2): interrupted \
                 RIP {:#x}, RSP {:#x} on the NMI stack",
                regs.frame.rip, regs.frame.rsp
            ),
        );
    }
    NMI_STATE.store(EXECUTING, Ordering::Relaxed);
    FROM_USER.store(from_user, Ordering::Relaxed);
    let call = mailbox::increment(Counter::DoNmiCalls) - 1;
    let mut action = script::action(call);
    let (cr2, dr7) = (cpu::read_cr2(), cpu::read_dr7());
    // Linux 3.3 to 5.x: `debug_stack_set_zero()` (there only if the NMI interrupted code on
    // the debug stack; here always, which is simpler and just as safe).
    idt::enter_nmi();
    loop {
        nmi_iteration(regs);
        // The call's action runs once, in its first iteration.
        if let Some(action) = action.take() {
            perform(action, regs);
        }
        checks::iteration_end(regs);
        if cpu::read_dr7() != dr7 {
            // SAFETY: the value DR7 had when this NMI arrived.
            unsafe { cpu::write_dr7(dr7) };
        }
        if cpu::read_cr2() != cr2 {
            cpu::write_cr2(cr2);
        }
        // LATCHED -> EXECUTING: another iteration; EXECUTING -> NOT_RUNNING: done.
        if NMI_STATE.fetch_sub(1, Ordering::Relaxed) == EXECUTING {
            break;
        }
    }
    idt::leave_nmi();
    if from_user {
        FROM_USER.store(false, Ordering::Relaxed);
        user::check_return_to_user(&regs.frame, "the NMI's return");
    }
}

/// The start of every `do_nmi` iteration, where the host counts iterations
/// (`nmifuzz_abi::ITERATION_SYMBOL`). Never inlined, so that its first instruction is reached
/// exactly once per iteration.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn nmi_iteration(regs: &NmiRegs) {
    mailbox::increment(Counter::NmiIterations);
    checks::iteration_start(regs);
}

/// The revoked user CS first (if the NMI interrupted ring 3 on the alternate CS), then busy
/// work, the chaos scribble if asked for, then the faults in their fixed order: #UD, #PF, #BP.
/// Each fault's handler returns with IRETQ, which unblocks NMIs while this NMI is still being
/// handled.
fn perform(action: Action, regs: &NmiRegs) {
    if action.faults & fault::REVOKE_CS != 0
        && regs.frame.cs == u64::from(gdt::USER_ALT_CODE_SELECTOR)
    {
        // As another CPU's modify_ldt would: the NMI's IRET back onto this CS now faults.
        gdt::set_alt_code_present(false);
    }
    busy(action.busy);
    if action.faults & fault::SCRIBBLE != 0 {
        scribble::perform(action.scribble);
    }
    if action.faults & fault::UD != 0 {
        // SAFETY: `ud2` raises #UD, whose handler counts it and resumes after it; registers,
        // stack and flags are as before.
        unsafe { asm!("ud2") };
    }
    if action.faults & fault::PF != 0 {
        paging::touch_fresh_page();
    }
    if action.faults & fault::BP != 0 {
        // SAFETY: #BP is handled on the current stack while do_nmi runs (the NMI IDT); its
        // handler counts it and resumes after the int3 with everything as before.
        unsafe { asm!("int3") };
    }
}

/// `iterations` turns of a two-instruction loop: a fixed instruction count for the fuzzer to
/// place NMIs in, whatever the compiler does to the surrounding code.
fn busy(iterations: u32) {
    if iterations == 0 {
        return;
    }
    // SAFETY: only the counter register and the flags change, both declared.
    unsafe {
        asm!(
            "2:",
            "dec {count:e}",
            "jnz 2b",
            count = inout(reg) iterations => _,
            options(nomem, nostack)
        );
    }
}

/// Whether `do_nmi` is running.
pub fn running() -> bool {
    NMI_STATE.load(Ordering::Relaxed) != NOT_RUNNING
}
