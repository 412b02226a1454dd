//! The user workload: ring-3 code in `.text.user`, its stack and its variables in the user page.
//!
//! It keeps known values in every register a system call preserves (rbx, rdx, rsi, rdi, rbp,
//! r8-r10, r12-r15) and checks them, RSP (all 64 bits), the privilege level of CS and SS (3:
//! no user RIP runs with a kernel CS) and `gs:[0]` (the user GS area's magic) after every
//! point and every return to ring 3 (invariants 2, 10 and 11 from ring 3's side). The exact
//! selectors are the kernel's to check, at the next entry from ring 3: on kvm_pvm, ring 3
//! reads the host's own user selectors (CS 0x33, SS 0x2b) from CS and SS, whatever the guest
//! loaded, while the frames pushed on entry to ring 0 hold the guest's
//! (`user::check_entry_from_user`). RAX, RCX and R11 are scratch: SYSCALL
//! and SYSRET use RCX and R11, RAX is the system call's number and result. A failed check puts
//! the value found in RAX, the value expected in R11 and the check's index ([`CHECKS`]) in
//! ECX, and executes `hlt` at `user_check_failed`: a #GP from ring 3 that the kernel reports.
//!
//! **Flags.** Before every system call and every point it sets RFLAGS to the next of the
//! script's user flags (`USER_VARS.flag_slots`, in turn): DF, AC, NT and the arithmetic flags
//! (`nmifuzz_abi::user_flag`), and after every return and every point it checks that its
//! RFLAGS came back with them, as every return to ring 3 must give them. The kernel checks its
//! side (invariant 12: SFMASK and the entries clear DF, AC and NT). Setting them takes the
//! stack (`popfq`), so (c) sets them before it points RSP into the NMI stack, and nothing
//! between the set and the system call changes the flags (the system-call macro branches with
//! `jrcxz`).
//!
//! Each iteration:
//!
//! ```text
//! (a) user_point_a:        a point (an MMIO write, see `USER_POINT_ADDRESS`); check
//! (b) getpid:              with the ordinary RSP; result and check
//! (c) getpid:              with RSP inside the NMI stack (the CVE-2015-3291 reproducer:
//!                          the entry's and the SYSRET exit's gaps then run on that RSP);
//!                          RSP back from user data; result and check
//! (d) set_ss16:            returns by IRET to compatibility mode (CS 0x5b) with a 16-bit
//!                          SS, through espfix64: there an IRET loads only SP on hardware
//!     user_point_ss16:     a point (32-bit code); a far jump back to 64-bit mode;
//!                          ESP must be the user's (espfix64's job), and the full RSP is
//!                          set again (its upper half is undefined after compatibility
//!                          mode); check (the kernel checks the SS at the next entry);
//!                          getpid, back by SYSRET with SS 0x1b; check
//! (e) alt_cs:              returns by IRET onto CS 0x33;
//!     user_point_alt_cs:   a point; check (the kernel checks CS 0x33 at the next entry);
//!                          getpid, back by SYSRET on CS 0x23; check
//! (f) bad_return:          the kernel revokes CS 0x33 and IRETs onto it: the IRETQ faults,
//!                          and the fixup resumes ring 3 at user_signal_handler with CS 0x23
//!                          and the marker in RAX; check the marker; check
//! ```
//!
//! then the next iteration, or the `exit` system call. The system-call instruction is `ud2`,
//! or `syscall` when the kernel set `native_syscall` (`option::NATIVE_SYSCALL`); the branch
//! between them is taken before the instruction, so the instruction after each return is the
//! same either way. No instruction here touches the stack: with RSP on the NMI stack (c), a
//! push would be a user write to kernel memory.

use core::arch::global_asm;
use core::mem::offset_of;

use super::UserVars;
use super::syscall::{ALT_CS, BAD_RETURN, EXIT, GETPID, SET_SS16, SIGNAL_MARKER, USER_PID};
use nmifuzz_abi::{USER_POINT_ADDRESS, user_flag};

use crate::gdt::USER_DATA_SELECTOR;
use crate::percpu::USER_MAGIC;
use crate::tss::NMI_STACK_SPAN;

/// The user's stack, in qwords.
const STACK_QWORDS: usize = 512;
/// Where (c) points RSP: 64 bytes below the NMI stack's usable top, among the frames of
/// Linux's entry, as the CVE-2015-3291 reproducer does. `NMI_IST_STACK + this`.
const NMI_STACK_RSP: u64 = NMI_STACK_SPAN + 8 - 64;

/// What each failed check's index (ECX at `user_check_failed`) stands for: its name and the
/// invariant it belongs to. The first twelve are the registers, in check order; the last two
/// ([`CHECK_NO_FAULT`], [`CHECK_EXIT`]) are code that must never run, with nothing expected.
pub const CHECKS: [(&str, u8); 23] = [
    ("rbx", 2),
    ("rdx", 2),
    ("rsi", 2),
    ("rdi", 2),
    ("rbp", 2),
    ("r8", 2),
    ("r9", 2),
    ("r10", 2),
    ("r12", 2),
    ("r13", 2),
    ("r14", 2),
    ("r15", 2),
    ("rsp", 2),
    ("cs's privilege level", 10),
    ("ss's privilege level", 10),
    ("gs:[0]", 11),
    ("system call result", 2),
    ("signal marker in rax", 2),
    ("esp after a return to a 16-bit SS", 2),
    ("rflags (the arithmetic flags, DF, AC, NT)", 2),
    ("bad_return came back without its IRET faulting", 10),
    ("set_ss16 came back to its caller, not to compatibility mode", 10),
    ("exit system call came back", 2),
];
const CHECK_RSP: u32 = 12;
const CHECK_RESULT: u32 = 16;
const CHECK_MARKER: u32 = 17;
const CHECK_ESP16: u32 = 18;
const CHECK_FLAGS: u32 = 19;
pub const CHECK_NO_FAULT: u32 = 20;
const CHECK_NO_COMPAT: u32 = 21;
pub const CHECK_EXIT: u32 = 22;

/// The values the registers keep, in [`CHECKS`] order.
pub const KNOWN: [u64; 12] = [
    0xb0b0_b0b0_b0b0_b0b0,
    0xd0d0_d0d0_d0d0_d0d0,
    0x5151_5151_5151_5151,
    0xd1d1_d1d1_d1d1_d1d1,
    0xb9b9_b9b9_b9b9_b9b9,
    0x0808_0808_0808_0808,
    0x0909_0909_0909_0909,
    0x1010_1010_1010_1010,
    0x1212_1212_1212_1212,
    0x1313_1313_1313_1313,
    0x1414_1414_1414_1414,
    0x1515_1515_1515_1515,
];

global_asm!(
    r#"
    /* Compare \found (moved into RAX) with \expected (in R11); on a mismatch report check
       \index. Clobbers RAX, RCX, R11 and the flags. */
    .macro user_expect found, expected, index
    mov rax, \found
    mov r11, \expected
    cmp rax, r11
    mov ecx, \index
    jne user_check_failed
    .endm

    /* Every register, RSP, the privilege level of CS and SS, and the user GS magic. */
    .macro user_check
    user_expect rbx, {k0}, 0
    user_expect rdx, {k1}, 1
    user_expect rsi, {k2}, 2
    user_expect rdi, {k3}, 3
    user_expect rbp, {k4}, 4
    user_expect r8, {k5}, 5
    user_expect r9, {k6}, 6
    user_expect r10, {k7}, 7
    user_expect r12, {k8}, 8
    user_expect r13, {k9}, 9
    user_expect r14, {k10}, 10
    user_expect r15, {k11}, 11
    lea r11, [rip + user_stack_top]
    mov rax, rsp
    cmp rax, r11
    mov ecx, {check_rsp}
    jne user_check_failed
    mov rax, cs
    and eax, 3
    user_expect rax, 3, 13
    mov rax, ss
    and eax, 3
    user_expect rax, 3, 14
    mov rax, gs:[0]
    user_expect rax, {user_magic}, 15
    .endm

    /* After compatibility mode on a 16-bit SS: RSP[63:32] are undefined after compatibility
       mode (and hold espfix64's alias window on hardware), so the full RSP is set again at
       once, without touching the flags, which are checked next; then ESP, as it came back,
       must be the user's, which is espfix64's whole job (an IRET to a 16-bit SS loads only SP
       on hardware). Clobbers RAX, RCX, R11 and the flags. */
    .macro user_check_esp16
    mov [rip + USER_VARS + {saved_rsp}], rsp
    lea rsp, [rip + user_stack_top]
    user_check_flags
    mov eax, [rip + USER_VARS + {saved_rsp}]
    lea r11, [rip + user_stack_top]
    mov r11d, r11d
    cmp rax, r11
    mov ecx, {check_esp16}
    jne user_check_failed
    .endm

    /* A system call: `ud2` (kvm_pvm), or `syscall` if the kernel says so. The branch leaves
       the flags as the last user_set_flags made them. Clobbers RAX and RCX. */
    .macro user_syscall number
    mov eax, \number
    mov rcx, [rip + USER_VARS + {native}]
    jrcxz 1f
    syscall
    jmp 2f
1:  ud2
2:
    .endm

    /* Sets RFLAGS to the next of the script's user flags, in turn, and remembers it. Takes the
       stack. Clobbers RAX, R11 and (on purpose) the flags. */
    .macro user_set_flags
    mov rax, [rip + USER_VARS + {flag_index}]
    lea r11, [rip + USER_VARS + {flag_slots}]
    mov r11, [r11 + rax * 8]
    mov [rip + USER_VARS + {flags_expected}], r11
    inc rax
    cmp rax, [rip + USER_VARS + {flag_count}]
    jb 3f
    xor eax, eax
3:  mov [rip + USER_VARS + {flag_index}], rax
    push r11
    popfq
    .endm

    /* RFLAGS must be what user_set_flags set: the arithmetic flags, DF, AC and NT. Comes first
       after a return or a point, before anything changes the flags. Keeps RAX (a system call's
       result); clobbers RCX, R11 and the flags. */
    .macro user_check_flags
    pushfq
    pop rcx
    and ecx, {flag_mask}
    mov r11, [rip + USER_VARS + {flags_expected}]
    and r11d, {flag_mask}
    cmp rcx, r11
    je 4f
    mov rax, rcx
    mov ecx, {check_flags}
    jmp user_check_failed
4:
    .endm

    /* A point: an exit the host can inject an NMI at, counted. A write to the MMIO page,
       not an `out`: kvm_pvm runs ring 3 with IOPL 0, so `out` would raise #GP. */
    .macro user_point name
    user_set_flags
    .global user_point_\name
    .type user_point_\name, @function
user_point_\name:
    mov byte ptr [{point}], al
    user_check_flags
    inc qword ptr [rip + USER_VARS + {points}]
    .endm

    .pushsection .text.user, "ax"
    .global user_start
    .type user_start, @function
user_start:                             /* the first instruction in ring 3 */
    mov eax, {user_ds}                  /* DS for compatibility mode, where it is used (the */
    mov ds, eax                         /* IRET into ring 3 nulled the kernel's) */
    .global user_load_known_values
    .type user_load_known_values, @function
user_load_known_values:
    mov rbx, {k0}
    mov rdx, {k1}
    mov rsi, {k2}
    mov rdi, {k3}
    mov rbp, {k4}
    mov r8, {k5}
    mov r9, {k6}
    mov r10, {k7}
    mov r12, {k8}
    mov r13, {k9}
    mov r14, {k10}
    mov r15, {k11}

    .global user_loop
    .type user_loop, @function
user_loop:
    /* (a) a point */
    user_point a
    user_check

    /* (b) a system call with the ordinary RSP */
    user_set_flags
    user_syscall {getpid}
    user_check_flags
    user_expect rax, {pid}, {check_result}
    user_check

    /* (c) the same with RSP on the NMI stack: the flags first, on the user's stack; lea only
       computes the address */
    user_set_flags
    mov [rip + USER_VARS + {saved_rsp}], rsp
    lea rsp, [rip + NMI_IST_STACK + {nmi_rsp}]
    .global user_syscall_on_nmi_stack
    .type user_syscall_on_nmi_stack, @function
user_syscall_on_nmi_stack:
    user_syscall {getpid}
    mov rsp, [rip + USER_VARS + {saved_rsp}]
    user_check_flags
    user_expect rax, {pid}, {check_result}
    user_check

    /* (d) back through espfix64 into compatibility mode, with a 16-bit SS */
    user_set_flags
    user_syscall {set_ss16}
    mov ecx, {check_no_compat}
    jmp user_check_failed
    .code32
    .global user_point_ss16
    .type user_point_ss16, @function
user_point_ss16:                        /* compatibility mode, SS 16-bit: a point ... */
    .byte 0x88, 0x04, 0x25              /* mov [point], al: 7 bytes, the same in either mode */
    .long {point}
    .byte 0xff, 0x2d                    /* ... then jmp far [USER_VARS.back64] to 64-bit mode */
    .long USER_VARS + {back64}
    .code64
    .global user_back64
    .type user_back64, @function
user_back64:
    user_check_esp16
    inc qword ptr [rip + USER_VARS + {points}]
    user_check
    user_set_flags
    user_syscall {getpid}
    user_check_flags
    user_check

    /* (e) back onto the alternate CS 0x33 */
    user_set_flags
    user_syscall {alt_cs}
    user_check_flags
    user_point alt_cs
    user_check
    user_set_flags
    user_syscall {getpid}
    user_check_flags
    user_check

    /* (f) a return whose IRETQ faults; the fixup resumes at user_signal_handler */
    user_set_flags
    user_syscall {bad_return}
    mov rax, cs
    mov ecx, {check_no_fault}
    jmp user_check_failed
    .global user_signal_handler
    .type user_signal_handler, @function
user_signal_handler:
    user_check_flags
    user_expect rax, {marker}, {check_marker}
    user_check

    inc qword ptr [rip + USER_VARS + {iterations}]
    dec qword ptr [rip + USER_VARS + {remaining}]
    jnz user_loop
    user_set_flags
    user_syscall {exit}
    mov ecx, {check_exit}

    .global user_check_failed
    .type user_check_failed, @function
user_check_failed:                      /* RAX found, R11 expected, ECX the check */
    hlt                                 /* #GP from ring 3: the kernel reports it */
    jmp user_check_failed
    .size user_start, . - user_start
    .popsection

    .pushsection .bss.user.stack, "aw", @nobits
    .balign 16
    .skip {stack_bytes}
    .global user_stack_top
    .type user_stack_top, @object
user_stack_top:
    .popsection
"#,
    k0 = const KNOWN[0],
    k1 = const KNOWN[1],
    k2 = const KNOWN[2],
    k3 = const KNOWN[3],
    k4 = const KNOWN[4],
    k5 = const KNOWN[5],
    k6 = const KNOWN[6],
    k7 = const KNOWN[7],
    k8 = const KNOWN[8],
    k9 = const KNOWN[9],
    k10 = const KNOWN[10],
    k11 = const KNOWN[11],
    check_rsp = const CHECK_RSP,
    check_result = const CHECK_RESULT,
    check_marker = const CHECK_MARKER,
    check_no_fault = const CHECK_NO_FAULT,
    check_exit = const CHECK_EXIT,
    check_esp16 = const CHECK_ESP16,
    user_ds = const USER_DATA_SELECTOR,
    check_no_compat = const CHECK_NO_COMPAT,
    back64 = const offset_of!(UserVars, back64),
    flag_index = const offset_of!(UserVars, flag_index),
    flag_slots = const offset_of!(UserVars, flag_slots),
    flag_count = const offset_of!(UserVars, flag_count),
    flags_expected = const offset_of!(UserVars, flags_expected),
    flag_mask = const user_flag::ALL,
    check_flags = const CHECK_FLAGS,
    user_magic = const USER_MAGIC,
    getpid = const GETPID,
    set_ss16 = const SET_SS16,
    alt_cs = const ALT_CS,
    bad_return = const BAD_RETURN,
    exit = const EXIT,
    pid = const USER_PID,
    marker = const SIGNAL_MARKER,
    nmi_rsp = const NMI_STACK_RSP,
    native = const offset_of!(UserVars, native_syscall),
    saved_rsp = const offset_of!(UserVars, saved_rsp),
    points = const offset_of!(UserVars, points),
    iterations = const offset_of!(UserVars, iterations),
    remaining = const offset_of!(UserVars, remaining),
    stack_bytes = const STACK_QWORDS * 8,
    point = const USER_POINT_ADDRESS,
);
