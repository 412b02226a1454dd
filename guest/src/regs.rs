//! The register frames the entry stubs build on the stack, and the push/pop sequences that build
//! them, shared by the exception stubs and every NMI entry variant so that all of them agree with
//! the Rust layouts below.

/// The 15 general registers as [`push_general_regs!`] leaves them, lowest address first (the
/// reverse of the push order). Like the general-register part of Linux's `pt_regs`.
#[repr(C)]
#[derive(Clone, Copy)]
#[allow(dead_code, reason = "written by the entry stubs; the fields document the layout")]
pub struct GeneralRegs {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
}

const _: () = assert!(size_of::<GeneralRegs>() == 15 * 8);

/// [`GeneralRegs`]' fields in memory order, for messages that name a register by its index.
pub const GENERAL_REG_NAMES: [&str; 15] = [
    "r15", "r14", "r13", "r12", "r11", "r10", "r9", "r8", "rbp", "rdi", "rsi", "rdx", "rcx", "rbx",
    "rax",
];

/// The frame the CPU pushes on every interrupt or exception in 64-bit mode, lowest address
/// first; IRETQ pops it (Intel SDM Vol. 3A §6.14.2 "64-Bit Mode Stack Frame", Figure 6-9).
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
#[allow(dead_code, reason = "written by the CPU; the fields document the layout")]
pub struct InterruptFrame {
    /// The interrupted instruction (for a fault, the faulting one; for a trap, the next one).
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

const _: () = assert!(size_of::<InterruptFrame>() == 5 * 8);

/// [`InterruptFrame`]'s fields in memory order.
pub const FRAME_FIELD_NAMES: [&str; 5] = ["rip", "cs", "rflags", "rsp", "ss"];

/// Assembly that pushes the 15 general registers so that RSP then points at a [`GeneralRegs`].
/// 120 bytes: it leaves RSP's alignment mod 16 flipped by 8.
macro_rules! push_general_regs {
    () => {
        "
        push rax        /* GeneralRegs::rax (highest address) */
        push rbx
        push rcx
        push rdx
        push rsi
        push rdi
        push rbp
        push r8
        push r9
        push r10
        push r11
        push r12
        push r13
        push r14
        push r15        /* GeneralRegs::r15: RSP points at the GeneralRegs */
        "
    };
}

/// Assembly that pops the [`GeneralRegs`] at RSP back into the registers.
macro_rules! pop_general_regs {
    () => {
        "
        pop r15
        pop r14
        pop r13
        pop r12
        pop r11
        pop r10
        pop r9
        pop r8
        pop rbp
        pop rdi
        pop rsi
        pop rdx
        pop rcx
        pop rbx
        pop rax
        "
    };
}

pub(crate) use {pop_general_regs, push_general_regs};
