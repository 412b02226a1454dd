//! The pre-2015 shape of the NMI from ring 3, shared by the `cve-2015-3290` and `cve-2015-5157`
//! entries: before 9b6e6a8334d5 "x86/nmi/64: Switch stacks on userspace NMI entry" (4.2-rc3),
//! an NMI from ring 3 took the same path on the IST as one from ring 0, with the whole
//! nested-NMI machinery, and only Linux's paranoid GS handling told the two apart.
//!
//! **Paranoid GS** (`paranoid_entry` / `paranoid_exit` in the entry_64.S of that time): an NMI
//! can arrive with either GS base loaded, the user's (it came from ring 3, or from one of the
//! kernel's few instructions between a `swapgs` and the return to user) or the kernel's. So,
//! once the registers are saved, the entry asks which one it has and swaps to the kernel's if
//! needed, keeping the answer in EBX (callee-saved, so it survives `do_nmi`); the exit swaps
//! back if the entry swapped. Linux asks MSR_GS_BASE for its sign (kernel addresses are
//! negative there); this guest's addresses are not, and its per-CPU area starts with a magic,
//! so the entry reads `gs:[0]` instead (both GS bases always point at readable memory here).
//!
//! ```text
//! push registers (NmiRegs)
//! mov ebx, 1                      ebx = 1: GS was the kernel's, nothing to undo
//! cmp gs:[0], KERNEL_MAGIC
//! je 2f
//! swapgs                          the user's GS: take the kernel's ...
//! xor ebx, ebx                    ... and remember to give it back
//! 2: call do_nmi
//! test ebx, ebx                   the exit, before the registers are restored
//! jnz 2f
//! swapgs                          back to the user's GS
//! 2: pop registers ...
//! ```
//!
//! Every iteration that `repeat_nmi` starts goes through the entry's check again, so a
//! repeat after the exit's `swapgs` finds the user's GS and swaps once more, as in Linux.

/// The paranoid GS entry, run between the register pushes and `call do_nmi`.
macro_rules! paranoid_entry {
    () => {
        concat!(
            "    mov ebx, 1                  /* paranoid: ebx = 1, GS is the kernel's */\n",
            "    movabs rax, 0x53474c454e52454b /* percpu::KERNEL_MAGIC */\n",
            "    cmp gs:[0], rax             /* the per-CPU area's magic? */\n",
            "    je 2f\n",
            "    swapgs                      /* the user's GS: take the kernel's */\n",
            "    xor ebx, ebx                /* ebx = 0: swap back on exit */\n",
            "2:\n",
        )
    };
}

/// The paranoid GS exit, run before the registers are restored.
macro_rules! paranoid_exit {
    () => {
        concat!(
            "    test ebx, ebx               /* did the entry swap GS? */\n",
            "    jnz 2f\n",
            "    swapgs                      /* back to the user's GS */\n",
            "2:\n",
        )
    };
}

/// The end of an entry whose NMIs from ring 3 take the kernel path: `<name>_from_user` joins
/// it at once (the prologue's privilege test has already branched here), and the symbol's
/// size.
macro_rules! nmi_user_on_ist {
    ($name:literal) => {
        concat!(
            $crate::nmi::pieces::asm_label!($name, "_from_user"),
            "    jmp ",
            $name,
            "_from_kernel      /* ring 3 as ring 0: the IST path, paranoid GS */\n",
            "    .size ",
            $name,
            ", . - ",
            $name,
            "\n",
            "    .popsection\n",
        )
    };
}

pub(crate) use {nmi_user_on_ist, paranoid_entry, paranoid_exit};

// The magic written literally above ("KERNELGS" read as a little-endian qword).
const _: () = assert!(crate::percpu::KERNEL_MAGIC == 0x5347_4c45_4e52_454b);
