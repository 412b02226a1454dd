# Test fixture (fuzz/tests/tutorial.rs): naive's entry leaving NMIs by an indirect jump.
#
# Layout: none
#
# Not an entry anyone should write: it restores RFLAGS and RSP itself and jumps back to the
# interrupted RIP, without IRETQ (the ring-3 path included, which then runs user code at CPL0).
# The fast mode must judge it as the stepped engine does.

    .balign 16
    .global nmi_jmp_exit
    .type nmi_jmp_exit, @function
nmi_jmp_exit:
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
2:  push qword ptr [rsp + 16]  /* the interrupted RFLAGS ... */
    popfq                       /* ... restored here, on the NMI stack */
    push rax
    mov rax, [rsp + 8]          /* the interrupted RIP */
    mov [rip + jmp_exit_target], rax
    pop rax
    mov rsp, [rsp + 24]         /* the interrupted RSP */
    jmp qword ptr [rip + jmp_exit_target] /* NMIs stay blocked: no IRET */

    .pushsection .bss.jmp_exit, "aw", @nobits
    .balign 8
jmp_exit_target:
    .skip 8
    .popsection
    .size nmi_jmp_exit, . - nmi_jmp_exit
