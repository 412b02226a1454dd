//! "NMI executing" cleared before the registers are restored, DF set only at IRETQ.
//!
//! Layout: linux
//!
//! The `early-clear` NMI entry: `linux` whose exit path clears "NMI executing" before it
//! restores the registers, while DF is still set only right before the IRETQ.
//!
//! The mistake it models: clearing the variable as soon as `do_nmi` returns (a natural place
//! for it in C-minded code) instead of as the last thing before IRETQ. Between the clear and
//! the `std`, a nested NMI (NMIs are unmasked if `do_nmi` took an exception) finds the variable
//! clear, DF clear, and is taken as a first NMI:
//!
//! ```text
//! | temp rdx          |
//! | "NMI executing"   | <- already 0
//! | iret frame        | <- rewritten by the nested "first" NMI's repeat_nmi
//! | outermost frame   | <- overwritten with the nested NMI's frame (RIP in the pops below)
//! | NmiRegs           | <- overwritten with half-restored registers, while the outer
//! |                   |    exit path is still popping them
//! ```
//!
//! Only the last few instructions before IRETQ may run with the variable clear, and those must
//! be recognisable from the stack and DF.

use core::arch::global_asm;

use crate::nmi::pieces::{
    asm_label, nmi_call, nmi_check_executing, nmi_check_repeat_window,
    nmi_check_stack_and_df, nmi_epilogue, nmi_first, nmi_nested, nmi_not_nested, nmi_prologue,
    nmi_repeat,
};
use crate::regs::pop_general_regs;

global_asm!(
    nmi_prologue!("nmi_early_clear"),
    nmi_check_repeat_window!("nmi_early_clear"),
    nmi_check_executing!("nmi_early_clear"),
    nmi_check_stack_and_df!("nmi_early_clear"),
    nmi_not_nested!("nmi_early_clear"),
    nmi_nested!("nmi_early_clear"),
    nmi_first!("nmi_early_clear", "0"),
    nmi_repeat!("nmi_early_clear", set),
    nmi_call!("nmi_early_clear"),
    asm_label!("nmi_early_clear", "_restore"),
    // The difference: nmi_exit! with the clear moved before the pops. RSP is at NmiRegs (T -
    // 256), so "NMI executing" (T - 56) is 200 bytes up.
    "    mov qword ptr [rsp + 200], 0 /* clear \"NMI executing\": too early */",
    pop_general_regs!(),
    r#"
    add rsp, 40                 /* skip "outermost": RSP at the "iret" frame */
    std                         /* mark the exit path for nested NMIs */
    iretq
"#,
    nmi_epilogue!("nmi_early_clear"),
);

