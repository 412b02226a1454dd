//! CVE-2015-5157: user NMIs return to ring 3 from the NMI stack; a faulting IRET runs on user GS.
//!
//! Layout: linux
//!
//! The `cve-2015-5157` NMI entry: `linux` before 9b6e6a8334d5 "x86/nmi/64: Switch stacks on
//! userspace NMI entry" (4.2-rc3, which also fixed CVE-2015-5157): an NMI from ring 3 takes the
//! nested-NMI path on the IST like one from ring 0, and its exit path returns to ring 3 with the
//! IRETQ at its end, on the NMI stack.
//!
//! The mistake it models: that IRETQ can fault. A return to user faults when the user's code or
//! stack segment went bad while the NMI was handled (another CPU's `modify_ldt`; here the action
//! `revoke-cs`). (A return to a 16-bit stack goes through espfix64, as Linux's `irq_return`
//! did.) The fault then arrives
//!
//! ```text
//! nmi_exit:   swapgs                          <- the paranoid exit: the user's GS from here
//!             pop registers; add rsp, 40; std
//!             mov qword ptr [rsp + 40], 0     <- "NMI executing" = 0
//!             iretq                           <- #NP: in kernel mode, on the NMI stack, with
//!                                                "NMI executing" clear and the user's GS
//! ```
//!
//! at a kernel RIP the exception entry does not know as a return to user (only
//! `native_irq_return_iret` is in the exception table), so it does not swap GS, and the
//! handler runs on the user's GS base; and with "NMI executing" clear and NMIs open again after
//! the fault's own IRETQ, a new NMI would rebuild its frames over the fault's. The `linux` entry
//! returns to ring 3 from the thread stack through `native_irq_return_iret`, whose fault the
//! kernel fixes up (`fixup_bad_iret`).

use core::arch::global_asm;

use crate::nmi::ist_user::{nmi_user_on_ist, paranoid_entry, paranoid_exit};
use crate::user::to_espfix_if_16bit_ss;
use crate::nmi::pieces::{
    nmi_call, nmi_check_executing, nmi_check_repeat_window, nmi_check_stack_and_df, nmi_exit,
    nmi_first, nmi_nested, nmi_not_nested, nmi_prologue, nmi_repeat,
};

global_asm!(
    nmi_prologue!("nmi_cve_2015_5157"),
    nmi_check_repeat_window!("nmi_cve_2015_5157"),
    nmi_check_executing!("nmi_cve_2015_5157"),
    nmi_check_stack_and_df!("nmi_cve_2015_5157"),
    nmi_not_nested!("nmi_cve_2015_5157"),
    nmi_nested!("nmi_cve_2015_5157"),
    nmi_first!("nmi_cve_2015_5157", "0"),
    nmi_repeat!("nmi_cve_2015_5157", set),
    nmi_call!("nmi_cve_2015_5157", paranoid_entry!()),
    nmi_exit!(
        "nmi_cve_2015_5157",
        paranoid_exit!(),
        concat!(
            to_espfix_if_16bit_ss!(),
            "    iretq                       /* to ring 3 from the NMI stack: may fault */\n"
        )
    ),
    nmi_user_on_ist!("nmi_cve_2015_5157"),
);
