# IST entry, save registers, call do_nmi, IRETQ; no nesting support (Linux < 3.3).
#
# Layout: none
#
# The `naive` NMI entry, in plain assembly: the smallest entry that follows the contract of
# docs/entries.md, and the default starting point of `nmifuzz new-entry`. It runs on the NMI
# stack (IST1), with NMIs blocked until the next IRETQ, whichever handler executes it.
#
# The algorithm:
#   o Count the delivery (the contract's first instruction).
#   o From ring 3 (the interrupted CS's RPL), swapgs: the kernel's GS for do_nmi.
#   o Save the general registers below the hardware frame.
#   o Call do_nmi(regs).
#   o Restore the registers; IRETQ through the hardware frame. Back to ring 3, swapgs again and
#     return through the kernel's return-to-user path (native_iret): an IRET straight to a
#     16-bit stack would leak RSP[31:16] on hardware, which espfix64 there prevents, and a
#     return to a segment that went bad faults where the kernel can fix it up.
#
# Here's the NMI stack while do_nmi runs:
#
# +---------------------------------------------------------+ <- IST1 top (16-byte aligned)
# | SS                                                      |
# | Return RSP       } written by the CPU on every NMI      |
# | RFLAGS           } delivery, at the same addresses:     |
# | CS               } NmiRegs::frame                       |
# | RIP              }                                      |
# +---------------------------------------------------------+
# | rax .. r15       } pushed here: NmiRegs::regs           |
# +---------------------------------------------------------+ <- RSP at `call do_nmi`
#                                                              (IST1 top - 160: 16-byte aligned)
#
# Why it is wrong: IST1 makes the CPU load RSP = IST1 top for every NMI, even one that
# interrupts this handler. NMIs are blocked only until the next IRETQ, and an exception that
# do_nmi takes (an action's ud2) returns with IRETQ, unblocking them while do_nmi still runs. A
# second NMI then writes its frame over the first one's and its registers over the saved ones.
# When it has returned into do_nmi and the first NMI exits, that exit pops the registers the
# second NMI saved and IRETQs through the second NMI's frame: back into do_nmi, where the second
# NMI struck. From there the same exit runs again, with the same frame, forever; the first
# NMI's interrupted context is lost.

    .balign 16
    .global nmi_naive
    .type nmi_naive, @function
nmi_naive:
    inc qword ptr [rip + NMI_DELIVERIES] /* the contract's first instruction: one per delivery */
    cld                         /* the interrupted code may run with DF set; do_nmi may not */
    test byte ptr [rsp + 8], 3  /* the interrupted CS: from ring 3? */
    jz 1f
    swapgs                      /* the user's GS: take the kernel's */
1:  push rax                    /* NmiRegs::regs, rax at the highest address ... */
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push rbp
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15                    /* ... r15 at the lowest: RSP points at NmiRegs */
    mov rdi, rsp                /* do_nmi(regs) */
    call do_nmi
    pop r15
    pop r14
    pop r13
    pop r12
    pop r11
    pop r10
    pop r9
    pop r8
    pop rbp
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    pop rax
    test byte ptr [rsp + 8], 3  /* back to ring 3? */
    jz 2f
    swapgs                      /* give ring 3 its GS back, and return the kernel's way: */
    jmp native_iret             /* espfix64 for a 16-bit stack, the fixup for a faulting IRET */
2:  iretq                       /* unblocks NMIs */
    .size nmi_naive, . - nmi_naive
