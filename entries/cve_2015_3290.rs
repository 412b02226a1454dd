//! CVE-2015-3290: user NMIs on the IST, returning through espfix64; a nested NMI mixes frames.
//!
//! Layout: linux
//!
//! The `cve-2015-3290` NMI entry: `linux` in the shape it had before 9b6e6a8334d5
//! "x86/nmi/64: Switch stacks on userspace NMI entry" (4.2-rc3, with the fix of CVE-2015-3290):
//! an NMI from ring 3 takes the same nested-NMI path on the IST as one from ring 0 (GS is
//! swapped by the paranoid check), and its exit leaves through the common return to user,
//! `native_iret`, which for a 16-bit SS goes through espfix64.
//!
//! The mistake it models: espfix64 copies the iret frame field by field while RSP still points
//! at the NMI stack's "iret" frame, after the exit path cleared "NMI executing" and set DF:
//!
//! ```text
//! nmi_exit:              swapgs (the paranoid exit: back to the user's GS)
//!                        pop registers; add rsp, 40; std
//!                        mov qword ptr [rsp + 40], 0     <- "NMI executing" = 0
//!                        jmp native_iret                 (instead of iretq)
//! native_irq_return_ldt: push rax; push rdi              <- onto "outermost"
//!                        mov rax, [rsp + 16] ... x5      <- copies "iret" to espfix, one
//!                                                           field at a time
//!                        mov rsp, <espfix stack>; iretq
//! ```
//!
//! If an exception in `do_nmi` unmasked NMIs, a second NMI there sees RSP on the NMI stack with
//! DF set and is taken as nested: it rewrites the "iret" frame to point at `repeat_nmi` (kernel
//! CS, kernel SS) and returns into the copy, which goes on copying the new fields after the old
//! ones. The espfix frame then holds the user's RIP with the kernel's CS: the IRETQ returns to
//! user code in ring 0. Linux fixed it by running NMIs from ring 3 on the thread stack, where
//! none of this state lives (the `linux` entry's user path).

use core::arch::global_asm;

use crate::nmi::ist_user::{nmi_user_on_ist, paranoid_entry, paranoid_exit};
use crate::nmi::pieces::{
    nmi_call, nmi_check_executing, nmi_check_repeat_window, nmi_check_stack_and_df, nmi_exit,
    nmi_first, nmi_nested, nmi_not_nested, nmi_prologue, nmi_repeat,
};

global_asm!(
    nmi_prologue!("nmi_cve_2015_3290"),
    nmi_check_repeat_window!("nmi_cve_2015_3290"),
    nmi_check_executing!("nmi_cve_2015_3290"),
    nmi_check_stack_and_df!("nmi_cve_2015_3290"),
    nmi_not_nested!("nmi_cve_2015_3290"),
    nmi_nested!("nmi_cve_2015_3290"),
    nmi_first!("nmi_cve_2015_3290", "0"),
    nmi_repeat!("nmi_cve_2015_3290", set),
    nmi_call!("nmi_cve_2015_3290", paranoid_entry!()),
    // Instead of the IRETQ: the common return, espfix64 for a 16-bit SS (Linux's
    // INTERRUPT_RETURN, `jmp native_iret`).
    nmi_exit!(
        "nmi_cve_2015_3290",
        paranoid_exit!(),
        "    jmp native_iret             /* espfix64 for a 16-bit SS, else IRETQ */\n"
    ),
    nmi_user_on_ist!("nmi_cve_2015_3290"),
);
