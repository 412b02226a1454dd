//! only the RSP/DF test: an NMI nested inside the handler proper looks like a first one.
//!
//! Layout: linux
//!
//! The `no-executing-var` NMI entry: `linux` without the "NMI executing" test; only the
//! interrupted-RSP/DF test decides whether an NMI is nested. (The variable is still written, so
//! the stack layout stays `linux`'s; nothing reads it.)
//!
//! The mistake it models: trusting the stack test alone. Since 2015 that test also demands DF,
//! which only the exit path sets; without the variable, an NMI that nests anywhere inside the
//! handler proper (typically right after an exception in `do_nmi` returned with IRETQ) sees
//! DF clear and is taken as a first NMI:
//!
//! ```text
//! | original frame    | <- overwritten by the nested NMI's delivery
//! | temp rdx          |
//! | "NMI executing"   | <- 1, but nobody looks
//! | iret frame        |
//! | outermost frame   | <- overwritten with the nested NMI's frame (RIP inside do_nmi)
//! | NmiRegs           | <- overwritten with the registers of do_nmi's context
//! ```
//!
//! The nested NMI calls `do_nmi` while it runs, and the outer NMI's interrupted context is gone.
//! Before 2015 the same test without DF caught this case, but was fooled from ring 3.

use core::arch::global_asm;

use crate::nmi::pieces::{
    nmi_call, nmi_check_repeat_window, nmi_check_stack_and_df, nmi_epilogue,
    nmi_exit, nmi_first, nmi_nested, nmi_not_nested, nmi_prologue, nmi_repeat,
};

global_asm!(
    nmi_prologue!("nmi_no_executing_var"),
    nmi_check_repeat_window!("nmi_no_executing_var"),
    // Left out: nmi_check_executing!
    nmi_check_stack_and_df!("nmi_no_executing_var"),
    nmi_not_nested!("nmi_no_executing_var"),
    nmi_nested!("nmi_no_executing_var"),
    nmi_first!("nmi_no_executing_var", "0"),
    nmi_repeat!("nmi_no_executing_var", set),
    nmi_call!("nmi_no_executing_var"),
    nmi_exit!("nmi_no_executing_var"),
    nmi_epilogue!("nmi_no_executing_var"),
);

