//! Linux's nested-NMI entry as finished in 2015 (the default).
//!
//! Layout: linux
//!
//! The `linux` NMI entry (the default): Linux's nested-NMI handling for an NMI from kernel mode,
//! as `asm_exc_nmi` in `arch/x86/entry/entry_64.S` has done it since the end of 2015 (the seed's
//! comments plus "Reorder nested NMI checks" and "Use DF to avoid userspace RSP confusing nested
//! NMI detection"). Its pieces live in `pieces.rs`, each with its stack diagram; the buggy
//! variants are this list with one piece left out or replaced.
//!
//! The problem: the NMI gate uses IST1, so the CPU loads RSP = IST1 top for every NMI, nested
//! or not, and writes its frame at the same place. NMIs are blocked only until the next IRETQ,
//! and an exception taken inside `do_nmi` (a #UD, a #PF, a #BP on the current stack) returns
//! with IRETQ and unblocks them while this NMI is still being handled. A second NMI then
//! overwrites the first one's hardware frame.
//!
//! The algorithm:
//!   o On entry, `cld` and park rdx in a temp slot below the hardware ("original") frame.
//!   o If the interrupted RIP lies in [repeat_nmi, end_repeat_nmi): an outer NMI is copying
//!     its frames and will call do_nmi anyway. Restore rdx and IRETQ.
//!   o Else if "NMI executing" is 1, or the interrupted RSP lies on the NMI stack with DF set
//!     (only the outer NMI's exit path runs there with DF set): nested. Point the "iret" frame
//!     at repeat_nmi, restore rdx, IRETQ back into the outer NMI, which will loop.
//!   o Else this is the first NMI: restore rdx, push "NMI executing" = 0, reserve the "iret"
//!     frame, copy the "original" frame into "outermost", which nothing overwrites until the
//!     NMI is fully handled. (Option STRESS_UNMASK: IRETQ to the next instruction here, to
//!     unmask NMIs at once, as CONFIG_DEBUG_ENTRY does.)
//!   o repeat_nmi: set "NMI executing" = 1, copy "outermost" into "iret". end_repeat_nmi.
//!   o Save the registers below "outermost" (NmiRegs) and call do_nmi(regs).
//!   o Exit: restore the registers, point RSP at "iret", `std`, clear "NMI executing", IRETQ.
//!     The IRETQ either returns to the interrupted code or, if a nested NMI rewrote "iret" in
//!     the meantime, goes to repeat_nmi for another round.
//!
//! One deliberate difference from Linux's instruction sequence: every check jumps to `nested`
//! when it detects nesting and falls through otherwise, and a `jmp first` follows the last one
//! (Linux's last check jumps to first_nmi and falls into nested_nmi). That lets a variant drop
//! any single check without touching the others.

use core::arch::global_asm;

use crate::nmi::pieces::{
    nmi_call, nmi_check_executing, nmi_check_repeat_window, nmi_check_stack_and_df,
    nmi_epilogue, nmi_exit, nmi_first, nmi_nested, nmi_not_nested, nmi_prologue, nmi_repeat,
};

global_asm!(
    nmi_prologue!("nmi_linux"),
    nmi_check_repeat_window!("nmi_linux"),
    nmi_check_executing!("nmi_linux"),
    nmi_check_stack_and_df!("nmi_linux"),
    nmi_not_nested!("nmi_linux"),
    nmi_nested!("nmi_linux"),
    nmi_first!("nmi_linux", "0"),
    nmi_repeat!("nmi_linux", set),
    nmi_call!("nmi_linux"),
    nmi_exit!("nmi_linux"),
    nmi_epilogue!("nmi_linux"),
);

