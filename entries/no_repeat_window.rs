//! no RIP-window test: a nested NMI rewrites the "iret" frame while repeat_nmi copies it.
//!
//! Layout: linux
//!
//! The `no-repeat-window` NMI entry: `linux` without the test of the interrupted RIP against
//! `repeat_nmi`..`end_repeat_nmi`.
//!
//! The mistake it models: treating a nested NMI inside the repeat window like any other nested
//! NMI. `repeat_nmi` runs with NMIs unmasked whenever it is reached through the outer NMI's
//! IRETQ (after an earlier nested NMI) or after the STRESS_UNMASK IRETQ. A nested NMI in the
//! middle of the copy rewrites the "iret" frame, and the copy then goes on over part of it:
//!
//! ```text
//! repeat_nmi:   mov [rsp + 80], 1
//!               add rsp, 80
//!               push [rsp - 48]   iret SS      <- copied
//!               push [rsp - 48]   iret RSP     <- copied
//!                                              <- nested NMI: iret = {repeat_nmi, CS,
//!                                                 its RFLAGS, "outermost RIP", SS}
//!               push [rsp - 48]   iret RFLAGS  <- copied again
//!               push [rsp - 48]   iret CS      <- copied again
//!               push [rsp - 48]   iret RIP     <- copied again
//! ```
//!
//! The "iret" frame ends up with the interrupted RIP but the nested NMI's RSP (an address on
//! the NMI stack): the final IRETQ returns to the interrupted code on the wrong stack. Linux had
//! the window test from the start (3.3); since 2015 it comes first, because "NMI executing"
//! can be either value inside the window.

use core::arch::global_asm;

use crate::nmi::pieces::{
    nmi_call, nmi_check_executing, nmi_check_stack_and_df, nmi_epilogue, nmi_exit,
    nmi_first, nmi_nested, nmi_not_nested, nmi_prologue, nmi_repeat,
};

global_asm!(
    nmi_prologue!("nmi_no_repeat_window"),
    // Left out: nmi_check_repeat_window!
    nmi_check_executing!("nmi_no_repeat_window"),
    nmi_check_stack_and_df!("nmi_no_repeat_window"),
    nmi_not_nested!("nmi_no_repeat_window"),
    nmi_nested!("nmi_no_repeat_window"),
    nmi_first!("nmi_no_repeat_window", "0"),
    nmi_repeat!("nmi_no_repeat_window", set),
    nmi_call!("nmi_no_repeat_window"),
    nmi_exit!("nmi_no_repeat_window"),
    nmi_epilogue!("nmi_no_repeat_window"),
);

