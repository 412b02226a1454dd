//! no RSP/DF test: misses an NMI between clearing "NMI executing" and IRETQ.
//!
//! Layout: linux
//!
//! The `no-stack-check` NMI entry: `linux` without the interrupted-RSP/DF test, so "NMI
//! executing" is the only sign of an outer NMI.
//!
//! The mistake it models: relying on the variable alone. The exit path must clear "NMI
//! executing" before its IRETQ (nothing runs after the IRETQ), which leaves a window of a few
//! instructions:
//!
//! ```text
//! nmi_exit:   pop registers
//!             add rsp, 40
//!             std
//!             mov qword ptr [rsp + 40], 0   <- "NMI executing" = 0 from here ...
//!             iretq                         <- ... to here, NMIs still blocked unless an
//!                                              exception's IRETQ unblocked them earlier
//! ```
//!
//! An NMI there finds the variable clear and is taken as a first NMI: it copies its own
//! "original" frame (RIP = the outer NMI's `iretq`, RSP = the outer's "iret" frame) into
//! "outermost" and "iret", runs `do_nmi` on behalf of the outer NMI's exit path, and returns to
//! the outer `iretq`, which now pops the inner's "iret" copy: the same `iretq` again, forever.
//! The outer NMI's interrupted context is lost. Linux checked the stack for exactly this window
//! from the start (3.3); the DF half came with CVE-2015-3291.

use core::arch::global_asm;

use crate::nmi::pieces::{
    nmi_call, nmi_check_executing, nmi_check_repeat_window, nmi_epilogue, nmi_exit,
    nmi_first, nmi_nested, nmi_not_nested, nmi_prologue, nmi_repeat,
};

global_asm!(
    nmi_prologue!("nmi_no_stack_check"),
    nmi_check_repeat_window!("nmi_no_stack_check"),
    nmi_check_executing!("nmi_no_stack_check"),
    // Left out: nmi_check_stack_and_df!
    nmi_not_nested!("nmi_no_stack_check"),
    nmi_nested!("nmi_no_stack_check"),
    nmi_first!("nmi_no_stack_check", "0"),
    nmi_repeat!("nmi_no_stack_check", set),
    nmi_call!("nmi_no_stack_check"),
    nmi_exit!("nmi_no_stack_check"),
    nmi_epilogue!("nmi_no_stack_check"),
);

