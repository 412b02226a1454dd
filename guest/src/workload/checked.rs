//! The `Loop` workload's loop: ring-0 code that keeps known values in every general register,
//! in RSP, in RFLAGS (the arithmetic flags and DF) and in CR2, and checks all of them at the top
//! of every iteration (invariant 2: an NMI must restore the interrupted context exactly). Its
//! iterations also raise exceptions of their own, so that NMIs land inside ordinary exception
//! entries and exits: iteration k (counting from 1) executes
//!
//! ```text
//! k % 4 == 1: ud2           #UD on the current stack
//! k % 4 == 2: a write to    #PF on the workload's demand page, which the handler maps; the
//!             DEMAND page   loop then expects CR2 = that address, and unmaps the page again
//! k % 4 == 3: int3          #BP on IST3 (on kvm_pvm the VMM performs the int3)
//! k % 4 == 0: nothing
//! ```
//!
//! The known values: rax..r14 hold fixed patterns (0x1111..., 0x2222..., ...); r15 counts the
//! iterations, so that a return to a stale copy of the context shows; RSP is the loop's own;
//! RFLAGS has CF, AF, SF, OF and DF set and PF, ZF clear (TF, RF and IF are not checked: the
//! host's single-stepping uses the first two, and IF is always clear). The expected values live
//! in memory, so the checks need no scratch register: `cmp reg, [expected]` for each.
//!
//! An iteration without an exception is about fifty instructions (each ~0.56 µs emulated on the
//! kvm_pvm host).
//!
//! The flags are checked and the registers compared between a `pushfq` and a `popfq`, which
//! brings the known flags back after the comparisons destroyed them; the saved copy has TF
//! cleared first, so that a TF the host's single-stepping left visible is never restored into
//! a run that is no longer being stepped.

use core::arch::global_asm;
use core::mem::offset_of;

use nmifuzz_abi::{Counters, Mailbox};

use crate::invariant;
use crate::paging::{self, WORKLOAD_PAGE};

/// The address the workload's #PF phase writes: a few bytes into its demand page, so that the
/// CR2 it expects is unmistakable.
const FAULT_ADDRESS: u64 = paging::page_address(WORKLOAD_PAGE) + 0x18;
/// RFLAGS bits the loop checks: CF, PF, AF, ZF, SF, DF, OF (SDM Vol. 1 §3.4.3).
const FLAGS_MASK: u64 = 0xcd5;
/// RFLAGS in the loop: CF, AF, SF, DF and OF set, plus bit 1, which always reads as 1.
const FLAGS: u64 = 0xc93;
/// RFLAGS.TF, never restored by the loop's `popfq`.
const TRAP_FLAG: u64 = 1 << 8;

/// Register names in [`Expected::regs`] order, which is the order of the loads below.
const REG_NAMES: [&str; 15] = [
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
    "r15",
];

/// What the loop expects, read by its `cmp` instructions.
#[repr(C)]
struct Expected {
    /// rax..r14: fixed patterns; r15: completed iterations.
    regs: [u64; 15],
    /// RSP while the loop checks, one `pushfq` below the loop's RSP.
    rsp: u64,
    /// CR2: its value at the start, then the workload's own fault address.
    cr2: u64,
    /// Iterations to run.
    limit: u64,
}

/// `regs[i]` is `0x1111_1111_1111_1111 * (i + 1)` for rax..r14; r15 starts at 0.
#[unsafe(no_mangle)]
static mut WORKLOAD_EXPECTED: Expected = Expected {
    regs: {
        let mut regs = [0; 15];
        let mut i = 0;
        while i < 14 {
            regs[i] = 0x1111_1111_1111_1111 * (i as u64 + 1);
            i += 1;
        }
        regs
    },
    rsp: 0,
    cr2: 0,
    limit: 0,
};

// The offsets and numbers the assembly below writes literally.
const _: () = {
    assert!(offset_of!(Expected, rsp) == 120 && offset_of!(Expected, cr2) == 128);
    assert!(offset_of!(Expected, limit) == 136);
    assert!(offset_of!(Mailbox, counters) + offset_of!(Counters, workload_iterations) == 8);
    assert!(FAULT_ADDRESS == 0x4000_0018 && FLAGS & FLAGS_MASK == 0xc91);
    assert!(FLAGS_MASK == 0xcd5 && FLAGS == 0xc93 && !TRAP_FLAG == 0xffff_ffff_ffff_feff);
};

// workload_loop(iterations: u64) -> u64: the loop; returns the iterations done. Runs on the
// caller's stack:
//
// +---------------------------------------------------------+ <- RSP at the call
// | return address                                          |
// | rbx, rbp, r12..r15    } the caller's, restored at the end|
// +---------------------------------------------------------+ <- the loop's RSP
// | live RFLAGS           } pushfq at the top of each        |
// |                       } iteration, popfq before its phase| <- Expected::rsp
// | RFLAGS copy           } masked and compared              |
// +---------------------------------------------------------+
// | exception frames (#UD, #PF) and their saved registers   |
// +---------------------------------------------------------+
//
// A mismatch jumps to a stub that puts the register and its index in rsi and edi, switches to
// a stack of its own (RSP itself may be what is wrong) and calls workload_mismatch, which
// panics.
global_asm!(
    r#"
    .pushsection .text.workload_loop, "ax"
    .balign 16
    .global workload_loop
    .type workload_loop, @function
workload_loop:
    push rbx
    push rbp
    push r12
    push r13
    push r14
    push r15
    mov [rip + WORKLOAD_EXPECTED + 136], rdi    /* Expected::limit */
    lea rax, [rsp - 8]
    mov [rip + WORKLOAD_EXPECTED + 120], rax    /* Expected::rsp: one pushfq below */
    mov rax, cr2
    mov [rip + WORKLOAD_EXPECTED + 128], rax    /* Expected::cr2: as it is now */
    mov rax, [rip + WORKLOAD_EXPECTED + 0]
    mov rbx, [rip + WORKLOAD_EXPECTED + 8]
    mov rcx, [rip + WORKLOAD_EXPECTED + 16]
    mov rdx, [rip + WORKLOAD_EXPECTED + 24]
    mov rsi, [rip + WORKLOAD_EXPECTED + 32]
    mov rdi, [rip + WORKLOAD_EXPECTED + 40]
    mov rbp, [rip + WORKLOAD_EXPECTED + 48]
    mov r8, [rip + WORKLOAD_EXPECTED + 56]
    mov r9, [rip + WORKLOAD_EXPECTED + 64]
    mov r10, [rip + WORKLOAD_EXPECTED + 72]
    mov r11, [rip + WORKLOAD_EXPECTED + 80]
    mov r12, [rip + WORKLOAD_EXPECTED + 88]
    mov r13, [rip + WORKLOAD_EXPECTED + 96]
    mov r14, [rip + WORKLOAD_EXPECTED + 104]
    mov r15, [rip + WORKLOAD_EXPECTED + 112]
    push 0xc93                  /* FLAGS */
    popfq

    .global workload_loop_top
    .type workload_loop_top, @function
workload_loop_top:
    pushfq                      /* the live flags, for the popfq below */
    pushfq                      /* a copy to check */
    and qword ptr [rsp], 0xcd5  /* FLAGS_MASK */
    cmp qword ptr [rsp], 0xc91  /* FLAGS & FLAGS_MASK */
    jne workload_bad_flags      /* catches: a flag not restored; misses: TF, RF, IF */
    lea rsp, [rsp + 8]          /* drop the copy, leaving the flags as they are */
    cmp rsp, [rip + WORKLOAD_EXPECTED + 120]
    jne workload_bad_rsp        /* catches: a return on the wrong stack */
    cmp rax, [rip + WORKLOAD_EXPECTED + 0]
    jne workload_bad_rax        /* catches: a register not restored (each of these) */
    cmp rbx, [rip + WORKLOAD_EXPECTED + 8]
    jne workload_bad_rbx
    cmp rcx, [rip + WORKLOAD_EXPECTED + 16]
    jne workload_bad_rcx
    cmp rdx, [rip + WORKLOAD_EXPECTED + 24]
    jne workload_bad_rdx
    cmp rsi, [rip + WORKLOAD_EXPECTED + 32]
    jne workload_bad_rsi
    cmp rdi, [rip + WORKLOAD_EXPECTED + 40]
    jne workload_bad_rdi
    cmp rbp, [rip + WORKLOAD_EXPECTED + 48]
    jne workload_bad_rbp
    cmp r8, [rip + WORKLOAD_EXPECTED + 56]
    jne workload_bad_r8
    cmp r9, [rip + WORKLOAD_EXPECTED + 64]
    jne workload_bad_r9
    cmp r10, [rip + WORKLOAD_EXPECTED + 72]
    jne workload_bad_r10
    cmp r11, [rip + WORKLOAD_EXPECTED + 80]
    jne workload_bad_r11
    cmp r12, [rip + WORKLOAD_EXPECTED + 88]
    jne workload_bad_r12
    cmp r13, [rip + WORKLOAD_EXPECTED + 96]
    jne workload_bad_r13
    cmp r14, [rip + WORKLOAD_EXPECTED + 104]
    jne workload_bad_r14
    cmp r15, [rip + WORKLOAD_EXPECTED + 112]
    jne workload_bad_r15        /* also catches: a return to a stale copy of the context */
    push rax
    mov rax, cr2
    cmp rax, [rip + WORKLOAD_EXPECTED + 128]
    pop rax
    jne workload_bad_cr2        /* catches: an NMI's own #PF left CR2 changed */
    and qword ptr [rsp], -0x101 /* never restore TF (!TRAP_FLAG) */
    mov [rip + NMIFUZZ_MAILBOX + 8], r15 /* counters.workload_iterations */
    cmp r15, [rip + WORKLOAD_EXPECTED + 136]
    jae workload_finished
    inc r15
    inc qword ptr [rip + WORKLOAD_EXPECTED + 112]
    test r15b, 2
    jnz 2f
    test r15b, 1
    jz workload_phase_none
    .global workload_phase_ud
    .type workload_phase_ud, @function
workload_phase_ud:
    popfq
    ud2                         /* #UD, handled on this stack */
    jmp workload_loop_top
2:
    test r15b, 1
    jnz workload_phase_bp
    .global workload_phase_pf
    .type workload_phase_pf, @function
workload_phase_pf:
    popfq
    mov [0x40000018], rax       /* FAULT_ADDRESS: #PF, the handler maps the page */
    mov qword ptr [rip + WORKLOAD_EXPECTED + 128], 0x40000018 /* CR2 from now on */
    mov qword ptr [rip + DEMAND_PT], 0 /* unmap the page (entry WORKLOAD_PAGE = 0) ... */
    invlpg [0x40000018]         /* ... so that the next round faults again */
    jmp workload_loop_top
    .global workload_phase_bp
    .type workload_phase_bp, @function
workload_phase_bp:
    popfq
    int3                        /* #BP, handled on IST3 */
    jmp workload_loop_top
workload_phase_none:
    popfq
    jmp workload_loop_top

workload_finished:
    lea rsp, [rsp + 8]          /* drop the live flags */
    cld                         /* Rust wants DF clear */
    mov rax, r15                /* the iterations done */
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbp
    pop rbx
    ret

    .macro workload_bad_stub reg, index
workload_bad_\reg:
    mov rsi, \reg              /* the value compared, first: the next line may need rdx */
    mov rdx, [rip + WORKLOAD_EXPECTED + 8 * \index] /* what it was compared with */
    mov edi, \index            /* which register: Expected::regs index */
    jmp workload_fail
    .endm
    workload_bad_stub rax, 0
    workload_bad_stub rbx, 1
    workload_bad_stub rcx, 2
    workload_bad_stub rdx, 3
    workload_bad_stub rsi, 4
    workload_bad_stub rdi, 5
    workload_bad_stub rbp, 6
    workload_bad_stub r8, 7
    workload_bad_stub r9, 8
    workload_bad_stub r10, 9
    workload_bad_stub r11, 10
    workload_bad_stub r12, 11
    workload_bad_stub r13, 12
    workload_bad_stub r14, 13
    workload_bad_stub r15, 14
    .purgem workload_bad_stub
workload_bad_rsp:
    lea rsi, [rsp + 8]          /* the loop's RSP */
    mov rdx, [rip + WORKLOAD_EXPECTED + 120] /* Expected::rsp */
    add rdx, 8                  /* ... as the loop's RSP */
    mov edi, 15
    jmp workload_fail
workload_bad_flags:
    mov rsi, [rsp]              /* the masked copy */
    mov edx, 0xc91              /* FLAGS & FLAGS_MASK */
    mov edi, 16
    jmp workload_fail
workload_bad_cr2:
    mov rsi, cr2
    mov rdx, [rip + WORKLOAD_EXPECTED + 128] /* Expected::cr2 */
    mov edi, 17
workload_fail:
    lea rsp, [rip + workload_fail_stack_top]
    cld
    call workload_mismatch
    ud2
    .size workload_loop, . - workload_loop
    .popsection

    .pushsection .stack.workload_fail, "aw", @nobits
    .balign 4096
    .global workload_fail_stack_bottom
    .type workload_fail_stack_bottom, @object
workload_fail_stack_bottom:
    .skip 4096
    .global workload_fail_stack_top
    .type workload_fail_stack_top, @object
workload_fail_stack_top:
    .popsection
"#
);

unsafe extern "C" {
    /// The loop above.
    fn workload_loop(iterations: u64) -> u64;
}

/// Runs `iterations` iterations of the loop; returns how many ran.
pub fn run(iterations: u32) -> u64 {
    // SAFETY: the loop keeps the SysV contract (callee-saved registers, RSP and DF restored at
    // the end); in between it changes only memory it owns: its expectations, the workload
    // iteration counter and its demand page's entry.
    unsafe { workload_loop(u64::from(iterations)) }
}

/// Called by the loop's mismatch stubs on a stack of their own: `index` says what differs
/// (0..=14: `Expected::regs`, 15: RSP, 16: RFLAGS, 17: CR2), `value` is what was found and
/// `expected` what it was compared with, both taken by the stub right after the compare: the
/// report never reads them again.
#[unsafe(no_mangle)]
extern "C" fn workload_mismatch(index: u64, value: u64, expected: u64) -> ! {
    let name = match index {
        0..=14 => REG_NAMES[index as usize],
        15 => "rsp",
        16 => "rflags (CF PF AF ZF SF DF OF)",
        _ => "cr2",
    };
    if value == expected {
        // The compare saw a difference that is gone one instruction later: the context changed
        // in between (an NMI landed right there), or the check's failure path was jumped into.
        invariant::violated(
            2,
            format_args!(
                "the workload's {name} check failed, but right after it {name} is {value:#x} as \
                 expected: the context changed between the compare and the report, or the \
                 failure path was entered without the compare"
            ),
        );
    }
    invariant::violated(
        2,
        format_args!("the workload's {name} is {value:#x}, expected {expected:#x}"),
    );
}
