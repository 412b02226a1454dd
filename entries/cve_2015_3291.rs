//! CVE-2015-3291: nesting decided by "RSP on the NMI stack" without DF; a user RSP fools it.
//!
//! Layout: linux
//!
//! The `cve-2015-3291` NMI entry: `linux` whose stack check has no DF half, as Linux's was from
//! 3.3 until 810bc075f78f "x86/nmi/64: Use DF to avoid userspace RSP confusing nested NMI
//! detection" (4.2-rc3, the fix of CVE-2015-3291).
//!
//! The mistake it models: taking "the interrupted RSP lies on the NMI stack" as proof of an
//! outer NMI. In kernel mode that holds: only NMI processing runs there. But a few ring-0
//! instructions of the system-call path run on a stack the user chose, before the kernel stack
//! is loaded and after the user's is restored:
//!
//! ```text
//! entry_SYSCALL_64:          swapgs                          <- RSP = the user's
//!                            mov gs:[rsp_scratch], rsp       <- RSP = the user's
//!                            mov rsp, gs:[top_of_stack]      <- RSP = the user's
//!                            ...                             (the kernel stack from here)
//! syscall_return_via_sysret: mov rsp, [user RSP]
//!                            swapgs                          <- RSP = the user's
//!                            sysretq                         <- RSP = the user's
//! ```
//!
//! A user that makes a system call with RSP pointing into the NMI stack makes an NMI in either
//! gap look nested: this entry points the "iret" frame (of no outer NMI at all) at
//! `repeat_nmi` and returns at once. Nobody ever runs `do_nmi` for that NMI: it is lost. The fix
//! adds the DF test: SYSCALL clears DF (SFMASK), and only the NMI exit path runs on the NMI
//! stack with DF set.

use core::arch::global_asm;

use crate::nmi::pieces::{
    nmi_call, nmi_check_executing, nmi_check_repeat_window, nmi_check_stack_and_df,
    nmi_epilogue, nmi_exit, nmi_first, nmi_nested, nmi_not_nested, nmi_prologue, nmi_repeat,
};

global_asm!(
    nmi_prologue!("nmi_cve_2015_3291"),
    nmi_check_repeat_window!("nmi_cve_2015_3291"),
    nmi_check_executing!("nmi_cve_2015_3291"),
    // The RSP test alone, without the DF half.
    nmi_check_stack_and_df!("nmi_cve_2015_3291", without_df),
    nmi_not_nested!("nmi_cve_2015_3291"),
    nmi_nested!("nmi_cve_2015_3291"),
    nmi_first!("nmi_cve_2015_3291", "0"),
    nmi_repeat!("nmi_cve_2015_3291", set),
    nmi_call!("nmi_cve_2015_3291"),
    nmi_exit!("nmi_cve_2015_3291"),
    nmi_epilogue!("nmi_cve_2015_3291"),
);
