# Test fixture (fuzz/tests/tutorial.rs): naive's entry leaving a ring-0 NMI by popfq and RET.
#
# Layout: none
#
# Not an entry anyone should write: it returns to the interrupted ring-0 context without
# IRETQ, so NMIs stay blocked for the rest of the run, and the host's return-integrity oracle,
# which judges IRETQs, never sees the return. The fast mode must still close the NMI's
# interrupted context where execution resumes it, as the stepped engine does at every step.

    .balign 16
    .global nmi_ret_exit
    .type nmi_ret_exit, @function
nmi_ret_exit:
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
    swapgs                      /* give ring 3 its GS back */
    iretq                       /* (a RET cannot change privilege) */
2:  push rax                    /* RSP at the frame + 8: build a RET frame on the */
    mov rax, [rsp + 8 + 24]     /* interrupted stack, below its RSP: RFLAGS, then RIP */
    sub rax, 16
    push rbx
    mov rbx, [rsp + 16 + 16]
    mov [rax], rbx              /* the interrupted RFLAGS, for popfq */
    mov rbx, [rsp + 16]
    mov [rax + 8], rbx          /* the interrupted RIP, for ret */
    pop rbx
    xchg rax, [rsp]             /* RAX back; the new RSP where RAX was saved */
    pop rsp                     /* onto the interrupted stack */
    popfq
    ret                         /* NMIs stay blocked: no IRET */
    .size nmi_ret_exit, . - nmi_ret_exit
