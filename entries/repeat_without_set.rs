//! repeat_nmi does not set "NMI executing" again: repeated iterations run unprotected.
//!
//! Layout: linux
//!
//! The `repeat-without-set` NMI entry: `linux` whose `first_nmi` pushes "NMI executing" = 1
//! and whose `repeat_nmi` does not set it again: the variable is set once per NMI, as in the
//! nested-NMI code's first (2012) form.
//!
//! The mistake it models: setting the variable only once per NMI. The exit path clears it
//! before its IRETQ; when that IRETQ goes to `repeat_nmi` (a nested NMI asked for another
//! round), the repeated iteration runs with the variable clear and DF clear again:
//!
//! ```text
//! first_nmi:    push 1            "NMI executing" = 1   (linux: push 0)
//!   ...         do_nmi            protected
//! exit:         mov [rsp + 40], 0 "NMI executing" = 0
//!               iretq             -> repeat_nmi (nested NMI rewrote "iret")
//! repeat_nmi:                     (linux: mov [rsp + 80], 1)
//!   ...         do_nmi            unprotected: a nested NMI now looks like a first one
//! ```
//!
//! A second nested NMI during the repeated `do_nmi` (after an exception's IRETQ) is taken as
//! first and overwrites "outermost" and the saved registers. Linux's `repeat_nmi` sets the
//! variable on every iteration, "in case we came back here via IRET" (the seed's comment).

use core::arch::global_asm;

use crate::nmi::pieces::{
    nmi_call, nmi_check_executing, nmi_check_repeat_window, nmi_check_stack_and_df,
    nmi_epilogue, nmi_exit, nmi_first, nmi_nested, nmi_not_nested, nmi_prologue, nmi_repeat,
};

global_asm!(
    nmi_prologue!("nmi_repeat_without_set"),
    nmi_check_repeat_window!("nmi_repeat_without_set"),
    nmi_check_executing!("nmi_repeat_without_set"),
    nmi_check_stack_and_df!("nmi_repeat_without_set"),
    nmi_not_nested!("nmi_repeat_without_set"),
    nmi_nested!("nmi_repeat_without_set"),
    nmi_first!("nmi_repeat_without_set", "1"), // The difference: set once, here ...
    nmi_repeat!("nmi_repeat_without_set", keep), // ... and not again here.
    nmi_call!("nmi_repeat_without_set"),
    nmi_exit!("nmi_repeat_without_set"),
    nmi_epilogue!("nmi_repeat_without_set"),
);

