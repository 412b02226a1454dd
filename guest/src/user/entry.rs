//! The kernel's side of every transition to and from ring 3, after Linux's `entry_64.S` of
//! late 2015 (`entry_SYSCALL_64`, `restore_c_regs_and_iret`, `native_iret`,
//! `native_irq_return_ldt`), in `.text.entry_user`: kernel code, but not NMI-handling code
//! (link.ld's NMI code range does not include it).
//!
//! **`entry_SYSCALL_64`** (reached by SYSCALL, or on kvm_pvm by the `ud2` system call, see
//! `user::traps`): CS = 0x08, SS = 0x10, RCX = the user's next RIP, R11 = the user's RFLAGS,
//! RFLAGS masked by SFMASK (IF, DF, TF, AC clear), and RSP and GS still the user's.
//!
//! ```text
//! entry_SYSCALL_64:               swapgs                 } GAP: ring 0 on the user's RSP
//! entry_SYSCALL_64_after_swapgs:  mov gs:[rsp_scratch], rsp   (any value the user chose,
//!                                 mov rsp, gs:[top_of_stack]   even one on the NMI stack)
//! entry_SYSCALL_64_stack_switched:
//!
//! +-------------------------+ <- thread stack top (TSS.RSP0), 16-byte aligned
//! | pt_regs->ss    0x1b     |
//! | pt_regs->sp    scratch  |
//! | pt_regs->flags r11      |
//! | pt_regs->cs    0x23     |    SyscallRegs::frame (the IRET frame, if IRET is used)
//! | pt_regs->ip    rcx      |
//! +-------------------------+
//! | pt_regs->orig_ax  rax   |    SyscallRegs::orig_ax: the system-call number
//! +-------------------------+
//! | rax .. r15              |    SyscallRegs::regs
//! +-------------------------+ <- RDI = RBX at `call do_syscall`, then 8 bytes of padding
//! ```
//!
//! **The exit** is SYSRET whenever it can restore what `pt_regs` says (CS 0x23, SS 0x1b,
//! RIP = RCX, RFLAGS = R11 with RF and TF clear), else the IRET path:
//!
//! ```text
//! syscall_return_via_sysret:  pop rax .. r15; drop orig_ax
//!                             mov rsp, [rsp + 24]    the user's RSP ...
//! syscall_sysret_gap:         swapgs                 } GAP: ring 0 on the user's RSP again
//!                             sysretq                }
//! syscall_return_via_iret:    pop rax .. r15; drop orig_ax; jmp return_to_user_iret
//! ```
//!
//! **`return_to_user_iret`**, the one IRET path to ring 3 (the syscall's, every exception's
//! and the user-mode NMI's; Linux's `swapgs; jmp restore_c_regs_and_iret`): entered with the
//! registers restored and RSP at the iret frame, on the kernel GS. `swapgs`, then
//! `native_iret` decides: a 16-bit SS goes through espfix64, anything else straight to the
//! IRETQ at `native_irq_return_iret`. Linux tests the SS selector's TI bit (16-bit stacks live
//! in the LDT there), and so does this guest; on kvm_pvm, where an IRET to an LDT SS faults,
//! the user workload's 16-bit SS is the GDT's 0x2b, which the test looks for too.
//!
//! **espfix64** (`native_irq_return_ldt`, Linux's `espfix_64.c` scheme): an IRET to a 16-bit SS
//! loads only SP on hardware and leaves RSP[63:16] as they were, leaking kernel stack bits. So
//! the frame is copied to the per-CPU espfix stack (through `espfix_waddr`) and the IRETQ runs
//! from an alias of it (`espfix_stack`, [`crate::paging`]) whose RSP[31:16] are the user's:
//! the user gets its own RSP[31:0] back, and only the alias window's RSP[63:32]. `swapgs`
//! brackets the per-CPU reads (the path starts on the user's GS):
//!
//! ```text
//! thread stack                      espfix stack (gs:[espfix_waddr])
//! | SS      | rsp + 48  -------->   | SS      | +40
//! | RSP     | rsp + 40  -------->   | RSP     | +32
//! | RFLAGS  | rsp + 32  -------->   | RFLAGS  | +24
//! | CS      | rsp + 24  -------->   | CS      | +16
//! | RIP     | rsp + 16  -------->   | RIP     | +8   <- RSP at the IRETQ
//! | rax     | rsp + 8   -------->   | rax     | +0   <- RSP after the switch:
//! | rdi     | rsp                                          gs:[espfix_stack] | (RSP & 0xffff0000)
//! ```
//!
//! kvm_pvm loads the full RSP on an IRET to a 16-bit SS (reference/kvm-on-this-host.md §9), so
//! there the user gets all of its RSP back; the user workload's check accepts either.
//!
//! **A faulting IRETQ** at `native_irq_return_iret` (here: CS 0x33 revoked) raises #NP at CPL0
//! with the user's GS; `exceptions` recognises the RIP as Linux's exception table does and
//! repairs it as `fixup_bad_iret` does (`user::traps`).

use core::arch::global_asm;
use core::mem::offset_of;
use core::ops::Range;
use core::ptr::addr_of;

use super::syscall::SyscallRegs;
use crate::gdt::{USER_CODE_SELECTOR, USER_DATA_SELECTOR, USER_DATA16_SELECTOR};
use crate::mailbox::{self, Counter};
use crate::percpu::{ESPFIX_STACK, ESPFIX_WADDR, RSP_SCRATCH, TOP_OF_STACK};
use crate::regs::{GeneralRegs, InterruptFrame, pop_general_regs, push_general_regs};

/// RFLAGS of ring 3: IOPL 3 (so that the workload's `out` points work at CPL3), IF clear (the
/// guest takes no interrupts), and bit 1, which always reads as 1.
pub const USER_RFLAGS: u64 = 0x3002;
/// RFLAGS.TF and RFLAGS.RF: SYSRET cannot restore them faithfully (Linux's opportunistic
/// SYSRET declines them too).
const RF_TF: u64 = 1 << 16 | 1 << 8;

/// With RSP at an iret frame: to espfix64 (`native_irq_return_ldt`) if its SS is a 16-bit
/// stack, a selector from the LDT (as Linux tests) or the GDT's 0x2b (kvm_pvm's, which has no
/// LDT stacks). `native_iret` starts with it, and so do the exits of entries that return to
/// ring 3 by their own IRETQ, as Linux's `irq_return` did.
macro_rules! to_espfix_if_16bit_ss {
    () => {
        concat!(
            "    test byte ptr [rsp + 32], 4 /* the frame's SS from the LDT: a 16-bit stack */\n",
            "    jnz native_irq_return_ldt\n",
            "    cmp qword ptr [rsp + 32], 0x2b /* the GDT's 16-bit SS (kvm_pvm: no LDT SS) */\n",
            "    je native_irq_return_ldt\n",
        )
    };
}
pub(crate) use to_espfix_if_16bit_ss;
const _: () = assert!(USER_DATA16_SELECTOR == 0x2b);

/// The kernel's RSP while ring 3 runs: `user_mode_exit` returns on it.
#[unsafe(no_mangle)]
static mut USER_KERNEL_RSP: u64 = 0;

/// Offsets into [`SyscallRegs`] the exit's SYSRET test reads.
const fn frame(field: usize) -> usize {
    offset_of!(SyscallRegs, frame) + field
}
const fn reg(field: usize) -> usize {
    offset_of!(SyscallRegs, regs) + field
}

global_asm!(
    r#"
    .pushsection .text.entry_user, "ax"
    .balign 16
    .global entry_SYSCALL_64
    .type entry_SYSCALL_64, @function
entry_SYSCALL_64:
    swapgs                              /* GAP: ring 0, the user's RSP; now the kernel GS */
    .global entry_SYSCALL_64_after_swapgs
    .type entry_SYSCALL_64_after_swapgs, @function
entry_SYSCALL_64_after_swapgs:
    mov gs:[{rsp_scratch}], rsp         /* the user's RSP, whatever it is */
    mov rsp, gs:[{top_of_stack}]        /* the thread stack: the gap ends */
    .global entry_SYSCALL_64_stack_switched
    .type entry_SYSCALL_64_stack_switched, @function
entry_SYSCALL_64_stack_switched:
    push {user_ds}                      /* pt_regs->ss: __USER_DS */
    push qword ptr gs:[{rsp_scratch}]   /* pt_regs->sp */
    push r11                            /* pt_regs->flags */
    push {user_cs}                      /* pt_regs->cs: __USER_CS */
    push rcx                            /* pt_regs->ip */
    push rax                            /* pt_regs->orig_ax: the system-call number */
"#,
    push_general_regs!(),
    r#"
    mov rbx, rsp                        /* callee-saved: the SyscallRegs, across the call */
    mov rdi, rsp                        /* do_syscall(regs) */
    and rsp, -16
    call do_syscall
    mov rsp, rbx
    /* SYSRET restores RIP from RCX, RFLAGS from R11, and loads CS 0x23 / SS 0x1b: use it only
       if that is exactly what pt_regs holds. */
    mov rcx, [rsp + {rcx}]
    cmp rcx, [rsp + {rip}]
    jne syscall_return_via_iret         /* RIP changed */
    mov r11, [rsp + {r11}]
    cmp r11, [rsp + {rflags}]
    jne syscall_return_via_iret         /* RFLAGS changed */
    test r11, {rf_tf}
    jnz syscall_return_via_iret         /* SYSRET cannot restore RF, and TF would trap early */
    cmp qword ptr [rsp + {cs}], {user_cs}
    jne syscall_return_via_iret         /* another CS (alt_cs, bad_return) */
    cmp qword ptr [rsp + {ss}], {user_ds}
    jne syscall_return_via_iret         /* another SS (set_ss16) */
    .global syscall_return_via_sysret
    .type syscall_return_via_sysret, @function
syscall_return_via_sysret:
"#,
    pop_general_regs!(),
    r#"
    add rsp, 8                          /* drop orig_ax: RSP at pt_regs->ip */
    mov rsp, [rsp + 24]                 /* pt_regs->sp: the user's RSP */
    .global syscall_sysret_gap
    .type syscall_sysret_gap, @function
syscall_sysret_gap:
    swapgs                              /* GAP: ring 0 on the user's RSP, now the user's GS */
    sysretq                             /* CS 0x23, SS 0x1b, RIP = RCX, RFLAGS = R11 */
    .global syscall_return_via_iret
    .type syscall_return_via_iret, @function
syscall_return_via_iret:
"#,
    pop_general_regs!(),
    r#"
    add rsp, 8                          /* drop orig_ax: RSP at the iret frame */
    jmp return_to_user_iret

    .global return_to_user_iret
    .type return_to_user_iret, @function
return_to_user_iret:                    /* registers restored, RSP at the iret frame */
    swapgs                              /* the user's GS from here on */
    .global native_iret
    .type native_iret, @function
native_iret:
"#,
    to_espfix_if_16bit_ss!(),
    r#"
    .global native_irq_return_iret
    .type native_irq_return_iret, @function
native_irq_return_iret:
    iretq                               /* to ring 3; a bad CS or SS faults right here */

    .global native_irq_return_ldt
    .type native_irq_return_ldt, @function
native_irq_return_ldt:
    push rax                            /* the user's RAX and RDI: our scratch registers */
    push rdi
    swapgs                              /* the kernel GS, for the per-CPU reads */
    mov rdi, gs:[{espfix_waddr}]        /* where the frame goes */
    mov [rdi], rax                      /* espfix: user RAX */
    mov rax, [rsp + 16]
    mov [rdi + 8], rax                  /* espfix: RIP */
    mov rax, [rsp + 24]
    mov [rdi + 16], rax                 /* espfix: CS */
    mov rax, [rsp + 32]
    mov [rdi + 24], rax                 /* espfix: RFLAGS */
    mov rax, [rsp + 48]
    mov [rdi + 40], rax                 /* espfix: SS */
    mov rax, [rsp + 40]
    mov [rdi + 32], rax                 /* espfix: RSP; RAX = the user's RSP */
    inc qword ptr [rip + NMIFUZZ_MAILBOX + {espfix_count}] /* instrumentation */
    and eax, 0xffff0000                 /* RAX = the user's RSP[31:16] */
    pop rdi                             /* the user's RDI */
    or rax, gs:[{espfix_stack}]         /* the alias of the frame with those RSP[31:16] */
    swapgs                              /* the user's GS again */
    mov rsp, rax                        /* onto the espfix stack */
    pop rax                             /* the user's RAX: RSP at the copied frame */
    jmp native_irq_return_iret

    /* The kernel's way into ring 3 for the user workload: build an iret frame on the thread
       stack and leave through the common IRET path, as a new task's first return to user
       does. Called from Rust; returns when the workload's exit system call runs
       user_mode_exit. */
    .global user_mode_enter
    .type user_mode_enter, @function
user_mode_enter:
    push rbx                            /* the caller's callee-saved registers */
    push rbp
    push r12
    push r13
    push r14
    push r15
    mov [rip + USER_KERNEL_RSP], rsp
    mov rsp, gs:[{top_of_stack}]
    push {user_ds}                      /* SS */
    lea rax, [rip + user_stack_top]
    push rax                            /* RSP */
    push {user_rflags}                  /* RFLAGS */
    push {user_cs}                      /* CS */
    lea rax, [rip + user_start]
    push rax                            /* RIP */
    xor eax, eax                        /* leave no kernel value in ring 3's registers */
    xor ebx, ebx
    xor ecx, ecx
    xor edx, edx
    xor esi, esi
    xor edi, edi
    xor ebp, ebp
    xor r8d, r8d
    xor r9d, r9d
    xor r10d, r10d
    xor r11d, r11d
    xor r12d, r12d
    xor r13d, r13d
    xor r14d, r14d
    xor r15d, r15d
    jmp return_to_user_iret
    .size user_mode_enter, . - user_mode_enter

    .global user_mode_exit
    .type user_mode_exit, @function
user_mode_exit:                         /* from do_syscall(exit): the kernel GS, any stack */
    mov rsp, [rip + USER_KERNEL_RSP]
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbp
    pop rbx
    ret                                 /* from user_mode_enter */
    .size user_mode_exit, . - user_mode_exit
    .popsection
"#,
    rsp_scratch = const RSP_SCRATCH,
    top_of_stack = const TOP_OF_STACK,
    espfix_waddr = const ESPFIX_WADDR,
    espfix_stack = const ESPFIX_STACK,
    user_ds = const USER_DATA_SELECTOR,
    user_cs = const USER_CODE_SELECTOR,
    user_rflags = const USER_RFLAGS,
    rf_tf = const RF_TF,
    rcx = const reg(offset_of!(GeneralRegs, rcx)),
    r11 = const reg(offset_of!(GeneralRegs, r11)),
    rip = const frame(offset_of!(InterruptFrame, rip)),
    cs = const frame(offset_of!(InterruptFrame, cs)),
    rflags = const frame(offset_of!(InterruptFrame, rflags)),
    ss = const frame(offset_of!(InterruptFrame, ss)),
    espfix_count = const mailbox::offset(Counter::EspfixReturns),
);

unsafe extern "C" {
    fn user_mode_enter();
    /// Never returns: resumes `user_mode_enter`'s caller.
    pub fn user_mode_exit() -> !;
    /// Code labels; only their addresses are used.
    #[link_name = "entry_SYSCALL_64"]
    pub static ENTRY_SYSCALL_64: u8;
    #[link_name = "entry_SYSCALL_64_stack_switched"]
    static ENTRY_STACK_SWITCHED: u8;
    #[link_name = "syscall_sysret_gap"]
    static SYSRET_GAP: u8;
    #[link_name = "syscall_return_via_iret"]
    static SYSRET_GAP_END: u8;
}

/// Enters ring 3 at `user_start`; returns when the workload's `exit` system call ran.
pub fn enter_user_mode() {
    // SAFETY: `user_mode_enter` saves the callee-saved registers and RSP, and
    // `user_mode_exit` restores them and returns here; everything else is caller-saved. The
    // per-CPU area, the GDT, the TSS and the user page are set up (boot and `user::run`).
    unsafe { user_mode_enter() };
}

/// The two ranges where ring-0 code runs on the user's RSP (see the module documentation).
pub fn gaps() -> [Range<u64>; 2] {
    [
        addr_of!(ENTRY_SYSCALL_64) as u64..addr_of!(ENTRY_STACK_SWITCHED) as u64,
        addr_of!(SYSRET_GAP) as u64..addr_of!(SYSRET_GAP_END) as u64,
    ]
}
