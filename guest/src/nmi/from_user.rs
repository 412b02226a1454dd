//! The last piece of every `linux`-derived entry: the entry from ring 3, `<name>_from_user`,
//! which Linux has had since 9b6e6a8334d5 (x86/nmi/64: "Switch stacks on userspace NMI
//! entry"), and the end of the entry's symbol. Kept apart from `pieces.rs`, whose pieces are
//! all about the nested-NMI dance this path avoids.

use crate::percpu;

/// The end of every variant: the entry symbol's size, then the entry from ring 3,
/// `<name>_from_user`, a typed label without a size of its own. The entry's size ends where its
/// kernel-mode path ends, as before the user path existed, so the host's table of NMI code
/// (`vmm::engine::table`, sized symbols only), which the fuzzer draws its points from, holds
/// the kernel-mode path only; the user path is in the NMI code range all the same. Linux after 9b6e6a8334d5 ("Switch stacks on userspace NMI entry"):
///
/// ```text
/// NMI stack                                 thread stack (gs:[top_of_stack])
/// +-------------------------+ <- IST1 top   +-------------------------+ <- top
/// | original SS .. RIP      | --copied-->   | SS .. RIP               | NmiRegs::frame
/// +-------------------------+               +-------------------------+
/// | temp storage for rdx    | <- RDX        | rax .. r15 (rdx from    | NmiRegs::regs
/// +-------------------------+               |  the temp slot)         |
/// | "NMI executing": never  |               +-------------------------+ <- RSP at the call,
/// |  written on this path   |                                              16-byte aligned
/// ```
///
/// `swapgs` (the kernel's GS), `cld`, keep the NMI stack's address in RDX and load the thread
/// stack's top from the per-CPU area, *without pushing anything more on the NMI stack*: a
/// push there would land in "NMI executing" (83c133cf11fb), where a later kernel-mode NMI would
/// find garbage. Then the hardware frame is copied from RDX, the registers are pushed (RDX
/// from its temp slot) to make `NmiRegs`, `do_nmi` runs, and the registers are popped back.
/// The way out is the common return-to-user IRET path, `return_to_user_iret`: `swapgs`, and
/// espfix64 if the interrupted SS is the 16-bit one.
///
/// Nothing here can nest: NMIs stay blocked until the final IRETQ, unless `do_nmi` takes an
/// exception, whose IRETQ unblocks them. A nested NMI then comes from kernel mode, on the
/// thread stack, takes the kernel path above as a first NMI (nothing of this path is on the
/// NMI stack) and reaches `do_nmi` while it runs, which latches it (Linux's `nmi_state`).
macro_rules! nmi_epilogue {
    ($name:literal) => {
        concat!(
            "    .size ",
            $name,
            ", . - ",
            $name,
            "\n",
            $crate::nmi::pieces::asm_label!($name, "_from_user"),
            "    swapgs                      /* the kernel's GS */\n",
            "    cld\n",
            "    mov rdx, rsp                /* the NMI stack: temp rdx, then the frame */\n",
            "    mov rsp, gs:[16]            /* the thread stack's top (percpu::TOP_OF_STACK) */\n",
            "    push qword ptr [rdx + 40]   /* NmiRegs::frame.ss */\n",
            "    push qword ptr [rdx + 32]   /* NmiRegs::frame.rsp */\n",
            "    push qword ptr [rdx + 24]   /* NmiRegs::frame.rflags */\n",
            "    push qword ptr [rdx + 16]   /* NmiRegs::frame.cs */\n",
            "    push qword ptr [rdx + 8]    /* NmiRegs::frame.rip */\n",
            "    push rax                    /* NmiRegs::regs.rax ... */\n",
            "    push rbx\n",
            "    push rcx\n",
            "    push qword ptr [rdx]        /* rdx, from the temp slot */\n",
            "    push rsi\n",
            "    push rdi\n",
            "    push rbp\n",
            "    push r8\n",
            "    push r9\n",
            "    push r10\n",
            "    push r11\n",
            "    push r12\n",
            "    push r13\n",
            "    push r14\n",
            "    push r15                    /* ... NmiRegs::regs.r15: RSP at NmiRegs */\n",
            "    /* On the thread stack and done with the NMI stack: no nesting damage from here. */\n",
            "    mov rdi, rsp                /* do_nmi(regs) */\n",
            "    call do_nmi\n",
            $crate::regs::pop_general_regs!(),
            "    jmp return_to_user_iret     /* swapgs, espfix64 if needed, IRETQ */\n",
            "    .popsection\n",
        )
    };
}

pub(crate) use nmi_epilogue;

// The number written literally in the text above.
const _: () = assert!(percpu::TOP_OF_STACK == 16);
