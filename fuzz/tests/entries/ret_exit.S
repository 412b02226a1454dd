# Test fixture (fuzz/tests/tutorial.rs): naive's entry leaving a ring-0 NMI by popfq and RET.
#
# Layout: none
#
# Not an entry anyone should write: it returns to the interrupted ring-0 context without
# IRETQ, so NMIs stay blocked for the rest of the run, and the host's return-integrity oracle,
# which judges IRETQs, never sees the return. The fast mode must still close the NMI's
# interrupted context where execution resumes it, as the stepped engine does at every step.
#
# This file holds only its exit: tests/tutorial.rs puts naive's entry and body
# (entries/naive.S, renamed, up to its exit) before it.
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
