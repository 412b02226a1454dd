# Test fixture (fuzz/tests/tutorial.rs): naive's entry leaving NMIs by an indirect jump.
#
# Layout: none
#
# Not an entry anyone should write: it restores RFLAGS and RSP itself and jumps back to the
# interrupted RIP, without IRETQ (the ring-3 path included, which then runs user code at CPL0).
# The fast mode must judge it as the stepped engine does.
#
# This file holds only its exit: tests/tutorial.rs puts naive's entry and body
# (entries/naive.S, renamed, up to its exit) before it.
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
