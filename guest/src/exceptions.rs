//! Exception and interrupt handlers for all 256 vectors.
//!
//! One 16-byte stub per vector (generated with `.rept`) gives every vector a uniform frame and
//! jumps to `exception_common`, which saves the general registers and calls
//! [`exception_dispatch`]. Handled: #UD from `ud2` (counted, skipped), #BP (counted), #PF on a
//! not-present demand page (mapped, see `paging`). Everything else is a guest panic naming the
//! exception, since nothing in this guest expects it (invariant 6), and so is a handled
//! exception whose frame changed while its handler ran, or a #PF whose CR2 cannot be the
//! address of its own fault.
//!
//! **From ring 3** (the user workload, `user::traps::exception_dispatch_user`, kept apart from
//! [`exception_dispatch`] so that the kernel's path and the fuzzer's table of it stay as they
//! were) the entry does what Linux's
//! `idtentry`/`error_entry` do: `swapgs` on entry, and on the way out the common
//! return-to-user IRET path (`return_to_user_iret`, which swaps back and takes espfix64 when
//! needed), or, for a `ud2` system call that the handler redirected to `entry_SYSCALL_64`, a
//! `swapgs` and an IRETQ to that kernel entry. A #GP, #NP or #SS at `native_irq_return_iret`
//! is a faulting IRET to ring 3: it ran on the user's GS, so it is treated as coming from ring 3
//! too (Linux's `.Lerror_bad_iret`), and `fixup_bad_iret` rebuilds it as raised by ring 3 at the
//! IRET's target. Kernel-mode exceptions do not `swapgs`: the only kernel code that runs on the
//! user's GS is the few instructions of the entry and exit paths around a `swapgs`, none of
//! which faults, except that IRETQ.

use core::arch::global_asm;
use core::mem::{offset_of, size_of};
use core::ptr::addr_of;

use crate::mailbox::{self, Counter};
use crate::paging::{self, Fault};
use crate::regs::{GeneralRegs, InterruptFrame, pop_general_regs, push_general_regs};
use crate::tss::Ist;
use crate::{cpu, invariant, panic, stacks};

/// Vectors with their own handling or stack (SDM Vol. 3A Table 6-1).
const DEBUG: u64 = 1;
pub const NMI: u64 = 2;
const BREAKPOINT: u64 = 3;
pub const INVALID_OPCODE: u64 = 6;
const DOUBLE_FAULT: u64 = 8;
pub const SEGMENT_NOT_PRESENT: u64 = 11;
pub const GENERAL_PROTECTION: u64 = 13;
pub const PAGE_FAULT: u64 = 14;

/// #PF error code bit 0: the fault was a protection violation on a present page, not a
/// not-present page (SDM Vol. 3A §4.7).
const PF_PRESENT: u64 = 1 << 0;

/// `ud2` (SDM Vol. 2B "UD—Undefined Instruction"): the one #UD the guest raises on purpose.
pub const UD2: [u8; 2] = [0x0f, 0x0b];

/// Mnemonics of the architectural exception vectors: Intel SDM Vol. 3A Table 6-1, plus #HV,
/// #VC and #SX from the AMD APM Vol. 2 Table 8-1.
const NAMES: [&str; 32] = [
    "#DE",
    "#DB",
    "NMI",
    "#BP",
    "#OF",
    "#BR",
    "#UD",
    "#NM",
    "#DF",
    "coprocessor segment overrun",
    "#TS",
    "#NP",
    "#SS",
    "#GP",
    "#PF",
    "reserved",
    "#MF",
    "#AC",
    "#MC",
    "#XM",
    "#VE",
    "#CP",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "#HV",
    "#VC",
    "#SX",
    "reserved",
];

/// What the stubs leave on the stack for [`exception_dispatch`], lowest address first.
#[repr(C)]
pub struct TrapFrame {
    /// Pushed by `exception_common`.
    pub regs: GeneralRegs,
    /// Pushed by the vector's stub.
    pub vector: u64,
    /// Pushed by the CPU for vectors 8, 10-14, 17, 21, 29 and 30; a 0 pushed by the stub for
    /// all others.
    pub error_code: u64,
    /// Pushed by the CPU; IRETQ returns through it.
    pub frame: InterruptFrame,
}

// The assembly below depends on these.
const _: () = assert!(size_of::<TrapFrame>() == 22 * 8);
const _: () = assert!(offset_of!(TrapFrame, vector) == 15 * 8);
const _: () = assert!(offset_of!(TrapFrame, frame) == 17 * 8);

// exception_common: the half of the exception entry that all 256 stubs share. Runs on the stack
// the gate chose: an IST stack for NMI, #DF, #BP and #DB, the interrupted stack otherwise.
//
// Here's the stack at `call exception_dispatch`:
//
// +---------------------------------------------------------+ <- RSP before delivery, aligned
// | SS                                                      |    to 16 by the CPU
// | Return RSP       } pushed by the CPU:                   |
// | RFLAGS           } TrapFrame::frame                     |
// | CS               }                                      |
// | RIP              }                                      |
// +---------------------------------------------------------+
// | error code       } by the CPU, or 0 by the stub         |
// | vector           } by the stub                          |
// +---------------------------------------------------------+
// | rax .. r15       } by exception_common: TrapFrame::regs |
// +---------------------------------------------------------+ <- RDI = RBX = &mut TrapFrame
// | 0 or 8 bytes of padding                                 |
// +---------------------------------------------------------+ <- RSP at the call, 16-aligned
//
// With the CPU's own alignment (SDM Vol. 3A §6.14.2) the 176-byte TrapFrame already ends
// aligned and the padding is empty; `and rsp, -16` keeps the call aligned even if an emulated
// delivery skipped that step. RBX is callee-saved, so it still holds the TrapFrame's address
// after the call, and IRETQ needs nothing but RSP at the hardware frame.
global_asm!(
    r#"
    .pushsection .text.exceptions, "ax"
    .balign 16
    .global exception_stubs
    .type exception_stubs, @function
exception_stubs:
    .set .Lvector, 0
    .rept 256
    .if (.Lvector == 8) || ((.Lvector >= 10) && (.Lvector <= 14)) || (.Lvector == 17) || (.Lvector == 21) || (.Lvector == 29) || (.Lvector == 30)
    .else
    push 0                      /* TrapFrame::error_code: the CPU pushes none for this vector */
    .endif
    push .Lvector               /* TrapFrame::vector */
    .if (.Lvector >= 11) && (.Lvector <= 13)
    jmp exception_bad_iret_check /* #NP, #SS, #GP: what a faulting IRET to ring 3 raises */
    .else
    jmp exception_common
    .endif
    /* Pad to the next 16-byte slot; an error if the stub outgrew its slot. The padding is
       never executed: int3 (0xcc) would stop the VM if it were. */
    .org exception_stubs + 16 * (.Lvector + 1), 0xcc
    .set .Lvector, .Lvector + 1
    .endr
    .size exception_stubs, . - exception_stubs

    .global exception_common
    .type exception_common, @function
exception_common:
    test byte ptr [rsp + 24], 3 /* TrapFrame::frame.cs: from ring 3? */
    jnz exception_from_user
    cld                         /* the interrupted code may run with DF set; Rust may not */
"#,
    push_general_regs!(),
    r#"
    mov rbx, rsp                /* callee-saved: the TrapFrame, across the call */
    mov rdi, rsp                /* exception_dispatch(frame) */
    and rsp, -16
    call exception_dispatch
    mov rsp, rbx
"#,
    pop_general_regs!(),
    r#"
    add rsp, 16                 /* drop TrapFrame::vector and ::error_code */
    .global exception_iretq
    .type exception_iretq, @function
exception_iretq:                /* a label for schedules: this IRETQ unblocks NMIs */
    iretq
    .size exception_common, . - exception_common

    /* #NP, #SS and #GP: a fault of the IRETQ to ring 3 (Linux's exception-table entry for
       native_irq_return_iret) comes from ring 0 but ran on the user's GS. */
    .global exception_bad_iret_check
    .type exception_bad_iret_check, @function
exception_bad_iret_check:
    test byte ptr [rsp + 24], 3 /* TrapFrame::frame.cs: from ring 3? */
    jnz exception_from_user
    push rax
    lea rax, [rip + native_irq_return_iret]
    cmp [rsp + 24], rax         /* TrapFrame::frame.rip, 8 bytes further up past the push */
    pop rax
    jne exception_common        /* an ordinary kernel-mode fault */
    .global exception_bad_iret
    .type exception_bad_iret, @function
exception_bad_iret:
    swapgs                      /* the faulting IRETQ ran on the user's GS */
    cld
"#,
    push_general_regs!(),
    r#"
    mov rdi, rsp                /* fixup_bad_iret(frame) -> the frame rebuilt on the */
    and rsp, -16                /* thread stack, as if ring 3 had faulted */
    call fixup_bad_iret
    mov rsp, rax
    jmp exception_from_user_saved

    /* From ring 3, on TSS.RSP0 (or IST3 for #BP/#DB): Linux's error_entry. */
    .global exception_from_user
    .type exception_from_user, @function
exception_from_user:
    swapgs                      /* the kernel's GS */
    cld
"#,
    push_general_regs!(),
    r#"
    .global exception_from_user_saved
    .type exception_from_user_saved, @function
exception_from_user_saved:
    mov rbx, rsp                /* callee-saved: the TrapFrame, across the call */
    mov rdi, rsp                /* exception_dispatch_user(frame) */
    and rsp, -16
    call exception_dispatch_user
    mov rsp, rbx
"#,
    pop_general_regs!(),
    r#"
    add rsp, 16                 /* drop TrapFrame::vector and ::error_code */
    test byte ptr [rsp + 8], 3  /* back to ring 3? */
    jnz return_to_user_iret     /* the common IRET path: swapgs, espfix64 */
    .global exception_to_syscall_entry
    .type exception_to_syscall_entry, @function
exception_to_syscall_entry:     /* a ud2 system call, now to be entered as SYSCALL: */
    swapgs                      /* with the user's GS, */
    iretq                       /* kernel CS and the user's RSP */
    .size exception_from_user, . - exception_from_user
    .popsection
"#
);

unsafe extern "C" {
    /// The first stub; vector `v`'s is at `+ 16 * v`. Code, not data: only its address is used.
    #[link_name = "exception_stubs"]
    static STUBS: u8;
}

/// The address of `vector`'s stub.
pub fn stub(vector: usize) -> u64 {
    addr_of!(STUBS) as u64 + 16 * vector as u64
}

/// The stack `vector` runs on: NMI, #DF, #BP and #DB have their own; everything else stays on
/// the interrupted stack, so that a #UD inside `do_nmi` runs on the NMI stack below the NMI's
/// frame and its IRETQ re-opens NMIs, as it would in Linux.
pub fn ist(vector: usize) -> Option<Ist> {
    match vector as u64 {
        NMI => Some(Ist::Nmi),
        DOUBLE_FAULT => Some(Ist::DoubleFault),
        DEBUG | BREAKPOINT => Some(Ist::Debug),
        _ => None,
    }
}

/// Handles the exception described by `trap`; returning resumes at `trap.frame.rip`.
#[unsafe(no_mangle)]
extern "C" fn exception_dispatch(trap: &mut TrapFrame) {
    invariant::check_flags("the exception handler", 0);
    let rip = trap.frame.rip;
    // The frame as the handler found it: an NMI in the middle of the handler must leave it
    // intact (invariant 6).
    let frame = trap.frame;
    let name = match trap.vector {
        INVALID_OPCODE if is_ud2(rip) => {
            mailbox::increment(Counter::InvalidOpcodes);
            "#UD"
        }
        // A trap: RIP already points after the int3.
        BREAKPOINT => {
            mailbox::increment(Counter::Breakpoints);
            "#BP"
        }
        PAGE_FAULT => {
            page_fault(trap);
            "#PF"
        }
        // The saved RIP of a #DF is undefined (SDM Vol. 3A §6.15, "Interrupt 8"); it is still
        // the best hint there is.
        DOUBLE_FAULT => match stacks::guard_at(trap.frame.rsp) {
            Some((stack, side)) => violated(
                rip,
                format_args!(
                    "double fault at RIP {rip:#x}, RSP {:#x}: in the guard page {side} the \
                     {stack} stack (a stack overflow)",
                    trap.frame.rsp
                ),
            ),
            None => violated(
                rip,
                format_args!("double fault at RIP {rip:#x}, RSP {:#x}", trap.frame.rsp),
            ),
        },
        vector => {
            let name = name(vector);
            violated(
                rip,
                format_args!(
                    "unexpected exception {name} (vector {vector}), error code {:#x}, at RIP \
                     {rip:#x}",
                    trap.error_code
                ),
            )
        }
    };
    if trap.frame != frame {
        violated(
            rip,
            format_args!(
                "the {name} frame changed while its handler ran: RIP {rip:#x} -> {:#x}, RSP \
                 {:#x} -> {:#x}",
                trap.frame.rip, frame.rsp, trap.frame.rsp
            ),
        );
    }
    if trap.vector == INVALID_OPCODE {
        trap.frame.rip = rip + UD2.len() as u64;
    }
}

/// A #PF: maps a not-present demand page; anything else is a broken invariant 6. The #PF
/// handler must see the CR2 of its own fault: for a not-present fault, CR2's page cannot be
/// present (the guest never maps a page without first faulting on it), so a present one means
/// CR2 was changed before the handler read it, e.g. by an NMI that took a #PF of its own and
/// did not restore CR2.
fn page_fault(trap: &TrapFrame) {
    let (cr2, rip) = (cpu::read_cr2(), trap.frame.rip);
    if trap.error_code & PF_PRESENT == 0 {
        match paging::demand_fault(cr2) {
            Fault::Mapped => {
                mailbox::increment(Counter::PageFaults);
                return;
            }
            Fault::AlreadyMapped => violated(
                rip,
                format_args!(
                    "the #PF handler sees CR2 {cr2:#x}, a page that is present: not the address \
                     of its own not-present fault at RIP {rip:#x}"
                ),
            ),
            Fault::Elsewhere => {}
        }
    }
    violated(
        rip,
        format_args!(
            "unexpected exception #PF (vector {PAGE_FAULT}), error code {:#x}, at RIP {rip:#x}, \
             CR2 {cr2:#x}",
            trap.error_code
        ),
    );
}

/// Panics about the exception at `rip` as a violation of invariant 6.
#[cold]
#[track_caller]
fn violated(rip: u64, message: core::fmt::Arguments) -> ! {
    panic::exception(rip, format_args!("invariant violated: {message} [invariant 6]"))
}

/// The mnemonic of exception `vector`.
pub fn name(vector: u64) -> &'static str {
    NAMES.get(vector as usize).copied().unwrap_or("interrupt")
}

/// Whether the instruction at `rip` is `ud2`.
pub fn is_ud2(rip: u64) -> bool {
    // SAFETY: `rip` is where the CPU just decoded the instruction that raised #UD, so its first
    // two bytes are mapped (all guest memory is, identity-mapped).
    unsafe { (rip as *const [u8; 2]).read_unaligned() == UD2 }
}
