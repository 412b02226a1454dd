//! The `naive` NMI entry: save registers on the NMI stack, call `do_nmi`, IRETQ. No defence
//! against nesting at all, like Linux before 3.3.

use core::arch::global_asm;

use super::pieces::entry_address;
use crate::regs::{pop_general_regs, push_general_regs};

// nmi_naive: runs on the NMI stack (IST1), with NMIs blocked until the next IRETQ, whichever
// handler executes it.
//
// The algorithm:
//   o Save the general registers below the hardware frame.
//   o Call do_nmi(regs).
//   o Restore the registers and IRETQ through the hardware frame.
//
// Here's the NMI stack while do_nmi runs:
//
// +---------------------------------------------------------+ <- IST1 top (16-byte aligned)
// | SS                                                      |
// | Return RSP       } written by the CPU on every NMI     |
// | RFLAGS           } delivery, at the same addresses:    |
// | CS               } NmiRegs::frame                      |
// | RIP              }                                      |
// +---------------------------------------------------------+
// | rax .. r15       } pushed here: NmiRegs::regs          |
// +---------------------------------------------------------+ <- RSP at `call do_nmi`
//                                                              (IST1 top - 160: 16-byte aligned)
//
// Why it is wrong: IST1 makes the CPU load RSP = IST1 top for every NMI, even one that
// interrupts this handler. NMIs are blocked only until the next IRETQ, and an exception that
// do_nmi takes (an action's ud2) returns with IRETQ, unblocking them while do_nmi still runs. A
// second NMI then writes its frame over the first one's and its registers over the saved ones.
// When it has returned into do_nmi and the first NMI exits, that exit pops the registers the
// second NMI saved and IRETQs through the second NMI's frame: back into do_nmi, where the second
// NMI struck. From there the same exit runs again, with the same frame, forever; the first
// NMI's interrupted context is lost.
global_asm!(
    r#"
    .pushsection .text.nmi_naive, "ax"
    .balign 16
    .global nmi_naive
    .type nmi_naive, @function
nmi_naive:
    inc qword ptr [rip + NMI_DELIVERIES] /* instrumentation: one per delivery (invariant 4) */
    cld                         /* the interrupted code may run with DF set; Rust may not */
"#,
    push_general_regs!(),
    r#"
    mov rdi, rsp                /* do_nmi(regs): RSP points at NmiRegs */
    call do_nmi
"#,
    pop_general_regs!(),
    r#"
    iretq                       /* unblocks NMIs */
    .size nmi_naive, . - nmi_naive
    .popsection
"#
);

entry_address!("nmi_naive");
