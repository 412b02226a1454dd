//! Exceptions from ring 3, reached from the exception entry's ring-3 path after its
//! `swapgs` (Linux's `error_entry`), and the repair of a faulting IRET to ring 3.
//!
//! - **The `ud2` system call** (kvm_pvm, where SYSCALL stays at CPL3): a #UD from CPL3 on a
//!   `ud2` in the user's code becomes what SYSCALL would have done. The frame is rewritten so
//!   that the exception's IRETQ (same privilege, after a `swapgs` back to the user's GS) lands
//!   on `entry_SYSCALL_64` with RCX = the RIP after the `ud2`, R11 = the user's RFLAGS (less
//!   the RF that the CPU sets in every fault's RFLAGS image),
//!   RFLAGS & ~SFMASK (and RF clear), CS 0x08, SS 0x10 and the user's own RSP: from there on the
//!   NMI situation is the real one, kernel CS with a user-chosen RSP and DF clear.
//! - **A bad IRET**: `fixup_bad_iret` (called by the exception entry for a #GP, #NP or #SS at
//!   `native_irq_return_iret`) moves the exception frame to the thread stack's top and puts the
//!   IRET's target under it, as Linux's `fixup_bad_iret` does: the fault then looks as if ring 3
//!   raised it at the IRET's target. Linux would deliver SIGSEGV or SIGBUS; here the "signal"
//!   resumes ring 3 at `user_signal_handler` with CS 0x23, SS 0x1b and [`SIGNAL_MARKER`] in RAX,
//!   and the alternate CS is made present again (the descriptor change was a one-off).
//! - **The workload's own reports**: a `hlt` at `user_check_failed` (a #GP from ring 3).
//! - **Anything else** is a panic: a #PF from CPL3 is a broken privilege invariant (a kernel
//!   RIP at CPL3, or ring 3 touching kernel memory), every other exception an unexpected one.

use core::ptr::{addr_of, copy};
use core::sync::atomic::{AtomicBool, Ordering};

use super::entry::ENTRY_SYSCALL_64;
use super::program::{CHECK_NO_FAULT, CHECKS};
use super::syscall::SIGNAL_MARKER;
use super::{check_entry_from_user, check_return_to_user, is_user_rip};
use crate::exceptions::{self, TrapFrame};
use crate::gdt::{self, KERNEL_CODE_SELECTOR, KERNEL_DATA_SELECTOR, USER_ALT_CODE_SELECTOR};
use crate::gdt::{USER_CODE_SELECTOR, USER_DATA_SELECTOR};
use crate::mailbox::{self, Counter};
use crate::{cpu, invariant, panic, percpu, tss};

/// SFMASK: the RFLAGS bits SYSCALL clears, Linux's (TF, IF, DF, IOPL, NT, AC).
pub const SFMASK: u64 = 0x47700;
/// RFLAGS.RF, which SYSCALL clears too.
const RESUME_FLAG: u64 = 1 << 16;

/// Set by `fixup_bad_iret`, taken by the dispatch of the exception it repaired.
static BAD_IRET: AtomicBool = AtomicBool::new(false);

unsafe extern "C" {
    #[link_name = "user_check_failed"]
    static USER_CHECK_FAILED: u8;
    #[link_name = "user_signal_handler"]
    static USER_SIGNAL_HANDLER: u8;
}

/// Handles an exception that `trap.frame` says came from ring 3 (called by the exception
/// entry's ring-3 path, on the kernel's GS); returning resumes at `trap.frame.rip`.
#[unsafe(no_mangle)]
extern "C" fn exception_dispatch_user(trap: &mut TrapFrame) {
    invariant::check_flags("the exception handler (from ring 3)", 0);
    let rip = trap.frame.rip;
    if BAD_IRET.swap(false, Ordering::Relaxed) {
        return deliver_signal(trap);
    }
    if trap.vector == exceptions::GENERAL_PROTECTION && rip == addr_of!(USER_CHECK_FAILED) as u64 {
        failed_check(trap);
    }
    percpu::check_kernel_gs("the exception handler (from ring 3)");
    check_entry_from_user(&trap.frame, "an exception from ring 3");
    match trap.vector {
        exceptions::INVALID_OPCODE if is_user_rip(rip) && exceptions::is_ud2(rip) => syscall(trap),
        exceptions::PAGE_FAULT => {
            let cr2 = cpu::read_cr2();
            invariant::violated(
                10,
                format_args!(
                    "#PF from ring 3 at RIP {rip:#x}, CR2 {cr2:#x}, error code {:#x}: a kernel \
                     RIP at CPL3, or ring 3 touching kernel memory",
                    trap.error_code
                ),
            )
        }
        vector => panic::exception(
            rip,
            format_args!(
                "invariant violated: unexpected exception {} (vector {vector}) from ring 3, error \
                 code {:#x}, at RIP {rip:#x}, RSP {:#x}, RFLAGS {:#x} [invariant 6]",
                exceptions::name(vector),
                trap.error_code,
                trap.frame.rsp,
                trap.frame.rflags
            ),
        ),
    }
}

/// The `ud2` system call, re-entered as SYSCALL would enter (see the module documentation).
fn syscall(trap: &mut TrapFrame) {
    let frame = &mut trap.frame;
    trap.regs.rcx = frame.rip + exceptions::UD2.len() as u64;
    // The CPU sets RF in the RFLAGS image of every fault (SDM Vol. 3A §18.3.1.1): the RFLAGS
    // ring 3 ran with, which SYSCALL saves, had it clear.
    trap.regs.r11 = frame.rflags & !RESUME_FLAG;
    frame.rip = addr_of!(ENTRY_SYSCALL_64) as u64;
    frame.cs = u64::from(KERNEL_CODE_SELECTOR);
    frame.rflags &= !(SFMASK | RESUME_FLAG);
    frame.ss = u64::from(KERNEL_DATA_SELECTOR);
}

/// Linux's `fixup_bad_iret`: `old` is the TrapFrame of a fault at `native_irq_return_iret`,
/// whose `frame.rsp` points at the iret frame that faulted. Builds, at the thread stack's
/// top, the TrapFrame of the same fault raised by ring 3 at the IRET's target, and returns it;
/// the exception entry continues on it as for any exception from ring 3.
#[unsafe(no_mangle)]
extern "C" fn fixup_bad_iret(old: *const TrapFrame) -> *mut TrapFrame {
    let new = (tss::thread_stack_top() as *mut TrapFrame).wrapping_sub(1);
    // SAFETY: `old` is the exception entry's TrapFrame and its `frame.rsp` the faulting IRETQ's
    // RSP, at an iret frame on the thread stack or the espfix stack; `new` is the top of the
    // thread stack, which nothing else uses while the kernel returns to ring 3. The ranges
    // may overlap (an iret frame at the thread stack's top is where `new.frame` goes), hence
    // `copy`, a memmove, in Linux's order: the iret frame first, then the rest.
    unsafe {
        let target = (*old).frame.rsp as *const u64;
        copy(target, addr_of!((*new).frame).cast_mut().cast(), 5);
        copy(old.cast::<u64>(), new.cast(), core::mem::offset_of!(TrapFrame, frame) / 8);
    }
    mailbox::increment(Counter::BadIretFixups);
    BAD_IRET.store(true, Ordering::Relaxed);
    new
}

/// The "signal" for a fault of a return to ring 3: only a revoked alternate CS is a fault the
/// workload provokes (`bad_return`, `fault::REVOKE_CS`); any other means a return frame the
/// kernel should never have built.
fn deliver_signal(trap: &mut TrapFrame) {
    let alt_cs = u64::from(USER_ALT_CODE_SELECTOR);
    // The error code is the selector's index and table bits, without the RPL.
    if trap.vector != exceptions::SEGMENT_NOT_PRESENT
        || trap.error_code != alt_cs & !3
        || trap.frame.cs != alt_cs
    {
        invariant::violated(
            10,
            format_args!(
                "an IRET to ring 3 faulted with {} error code {:#x}, returning to RIP {:#x}, CS \
                 {:#x}, SS {:#x}: a return frame the kernel never meant to build",
                exceptions::name(trap.vector),
                trap.error_code,
                trap.frame.rip,
                trap.frame.cs,
                trap.frame.ss
            ),
        );
    }
    gdt::set_alt_code_present(true);
    trap.regs.rax = SIGNAL_MARKER;
    trap.frame.rip = addr_of!(USER_SIGNAL_HANDLER) as u64;
    trap.frame.cs = u64::from(USER_CODE_SELECTOR);
    trap.frame.ss = u64::from(USER_DATA_SELECTOR);
    check_return_to_user(&trap.frame, "the bad-IRET signal");
}

/// The workload found a wrong value: RAX found, R11 expected, RCX the check.
#[cold]
#[inline(never)]
fn failed_check(trap: &TrapFrame) -> ! {
    let (found, expected, index) = (trap.regs.rax, trap.regs.r11, trap.regs.rcx);
    let Some(&(what, number)) = CHECKS.get(index as usize) else {
        panic!("the user workload reports an unknown check {index}");
    };
    if index >= u64::from(CHECK_NO_FAULT) {
        invariant::violated(number, format_args!("the user workload's {what} (RAX {found:#x})"));
    }
    invariant::violated(
        number,
        format_args!("the user workload's {what} is {found:#x}, expected {expected:#x}"),
    )
}
