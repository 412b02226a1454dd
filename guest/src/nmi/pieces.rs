//! The pieces of Linux's nested-NMI entry (`arch/x86/entry/entry_64.S`, `asm_exc_nmi`, kernel
//! mode, in its finished late-2015 form), as macros that expand to assembly text. `entries/linux.rs`
//! strings all of them together; each buggy variant strings together the same pieces minus the
//! one its name says, or with that one piece replaced, so a variant's file shows only its
//! difference.
//!
//! Every piece takes the entry's symbol `$name` and derives its labels from it
//! (`<name>_nested`, `<name>_first`, `<name>_repeat`, `<name>_end_repeat`, ...), since all
//! variants are linked into one guest. `<name>_repeat` and `<name>_end_repeat` are global, so
//! that schedules can name the repeat window.
//!
//! The NMI stack, as every piece below sees it (IST1 top is 16-byte aligned; the byte offsets
//! are `nmifuzz_abi::NmiStackLayout::LINUX`):
//!
//! ```text
//! +---------------------------------------------------------+ <- IST1 top            (T)
//! | original SS                                             |
//! | original Return RSP   } written by the CPU on every     |
//! | original RFLAGS       } NMI delivery, nested or not     |
//! | original CS           }                                 |
//! | original RIP          }                                 | T - 40
//! +---------------------------------------------------------+
//! | temp storage for rdx                                    | T - 48
//! +---------------------------------------------------------+
//! | "NMI executing" variable                                | T - 56
//! +---------------------------------------------------------+
//! | iret SS          } copied from "outermost" by           |
//! | iret Return RSP  } repeat_nmi on every iteration;       |
//! | iret RFLAGS      } rewritten by a nested NMI to point   |
//! | iret CS          } at repeat_nmi and so force another   |
//! | iret RIP         } iteration                            | T - 96
//! +---------------------------------------------------------+
//! | outermost SS          } copied from "original" once, in |
//! | outermost Return RSP  } first_nmi; never written again  |
//! | outermost RFLAGS      } until the NMI is fully handled. |
//! | outermost CS          } Also NmiRegs::frame.            |
//! | outermost RIP         }                                 | T - 136
//! +---------------------------------------------------------+
//! | rax .. r15            } NmiRegs::regs, pushed after     |
//! |                       } end_repeat_nmi                  | T - 256: RSP at `call do_nmi`
//! +---------------------------------------------------------+
//! ```
//!
//! Unlike Linux's `pt_regs` there is no `orig_ax` slot: `NmiRegs` is the 15 general registers
//! followed directly by the "outermost" frame.
//!
//! Literal numbers in the text (selectors, the NMI stack's size, the script's option offset)
//! are pinned to their Rust definitions by the assertions at the bottom of this file.

use core::mem::offset_of;

use nmifuzz_abi::{NmiStackLayout, Script, option};

use crate::gdt::{KERNEL_CODE_SELECTOR, KERNEL_DATA_SELECTOR};
use crate::nmi::NmiRegs;
use crate::tss;

/// A label the host sees: a `.type`d symbol (the VMM's symbol table keeps typed symbols only),
/// so that traces name it and schedules can inject relative to it.
macro_rules! asm_label {
    ($name:literal, $suffix:literal) => {
        concat!("    .type ", $name, $suffix, ", @function\n", $name, $suffix, ":\n")
    };
}

/// Entry, shared by every variant: the symbol, the delivery count, `cld`, rdx into its temp
/// slot, and the dispatch on the interrupted privilege level.
///
/// ```text
/// +-------------------------+ <- IST1 top
/// | original SS .. RIP      |
/// +-------------------------+
/// | temp storage for rdx    | <- RSP after this piece: RIP at 8, CS at 16, RFLAGS at 24,
/// +-------------------------+    RSP at 32, SS at 40; "NMI executing" at -8
/// ```
///
/// The first instruction is instrumentation, not Linux: it counts every delivery in a variable
/// outside the NMI stack, so that `do_nmi` can check that no NMI is lost (invariant 4). An NMI
/// from ring 3 branches to `<name>_from_user` ([`nmi_epilogue!`]), which switches to the
/// thread stack and never nests (`from_user.rs`).
macro_rules! nmi_prologue {
    ($name:literal) => {
        concat!(
            "    .pushsection .text.",
            $name,
            ", \"ax\"\n",
            "    .balign 16\n",
            "    .global ",
            $name,
            "\n",
            "    .type ",
            $name,
            ", @function\n",
            $name,
            ":\n",
            "    inc qword ptr [rip + NMI_DELIVERIES] /* instrumentation: one per delivery */\n",
            "    cld                         /* the interrupted code may run with DF set */\n",
            "    push rdx                    /* temp storage for rdx: our scratch register */\n",
            "    test byte ptr [rsp + 16], 3 /* the interrupted CS's privilege level */\n",
            "    jnz ",
            $name,
            "_from_user   /* ring 3: the thread-stack path */\n",
            $crate::nmi::pieces::asm_label!($name, "_from_kernel"),
        )
    };
}

/// Check: did we interrupt an outer NMI inside `repeat_nmi`..`end_repeat_nmi`?
///
/// ```text
/// | original RIP  | <- RSP + 8:  repeat_nmi <= RIP < end_repeat_nmi ?
/// | temp rdx      | <- RSP
/// ```
///
/// Catches: a nested NMI while the outer NMI copies "outermost" into "iret". Rewriting "iret"
/// now would leave it half old, half new; and the outer NMI is about to call `do_nmi` anyway,
/// so this NMI can simply return. Misses nothing it is meant for; it must come first, since
/// "NMI executing" may or may not be set yet inside the window.
macro_rules! nmi_check_repeat_window {
    ($name:literal) => {
        concat!(
            "    lea rdx, [rip + ",
            $name,
            "_repeat]\n",
            "    cmp rdx, [rsp + 8]          /* repeat_nmi vs the interrupted RIP */\n",
            "    ja 2f                       /* RIP below repeat_nmi: outside the window */\n",
            "    lea rdx, [rip + ",
            $name,
            "_end_repeat]\n",
            "    cmp rdx, [rsp + 8]          /* end_repeat_nmi vs the interrupted RIP */\n",
            "    ja ",
            $name,
            "_nested_out   /* inside the window: let the outer NMI repeat */\n",
            "2:\n",
        )
    };
}

/// Check: is "NMI executing" set?
///
/// ```text
/// | temp rdx           | <- RSP
/// | "NMI executing"    | <- RSP - 8: 1 from repeat_nmi until the exit path clears it
/// ```
///
/// Catches: a nested NMI anywhere from `repeat_nmi` to the exit path, including inside
/// `do_nmi` and the exceptions it takes. Misses: an NMI that lands after the exit path cleared
/// the variable but before its IRETQ; the stack check below covers that.
macro_rules! nmi_check_executing {
    ($name:literal) => {
        concat!(
            "    cmp qword ptr [rsp - 8], 1  /* \"NMI executing\" */\n",
            "    je ",
            $name,
            "_nested       /* set: we interrupted NMI processing */\n",
        )
    };
}

/// Check: was the interrupted RSP on the NMI stack, with DF set?
///
/// ```text
/// | original RFLAGS    | <- RSP + 24: DF is bit 2 of byte RSP + 25
/// | original RSP       | <- RSP + 32: in [T - size, T] ?
/// | ...                |
/// | temp rdx           | <- RSP = T - 48
/// ```
///
/// Catches: an NMI between the exit path's clearing of "NMI executing" and its IRETQ; only
/// that window runs on the NMI stack with DF set (`std` just before the clear; the entry does
/// `cld` first thing, and the IRETQ restores the interrupted DF). Misses: nothing in ring 0.
/// The DF half exists for ring 3, where user code controls RSP at the SYSCALL entry and could
/// point it into the NMI stack, but cannot get past SYSCALL with DF set (CVE-2015-3291).
macro_rules! nmi_check_stack_and_df {
    ($name:literal) => {
        concat!(
            $crate::nmi::pieces::nmi_check_stack_and_df!(@on_the_nmi_stack),
            "    test byte ptr [rsp + 25], 4 /* the interrupted RFLAGS.DF */\n",
            "    jnz ",
            $name,
            "_nested      /* on the NMI stack with DF: an outer NMI's exit */\n",
            "2:\n",
        )
    };
    // The check of Linux 3.3 to 4.1, CVE-2015-3291's: the interrupted RSP alone
    // (entries/cve_2015_3291.rs).
    ($name:literal, without_df) => {
        concat!(
            $crate::nmi::pieces::nmi_check_stack_and_df!(@on_the_nmi_stack),
            "    jmp ",
            $name,
            "_nested      /* on the NMI stack: taken for an outer NMI's exit */\n",
            "2:\n",
        )
    };
    // Falls through if the interrupted RSP lies on the NMI stack, else jumps to `2f`.
    (@on_the_nmi_stack) => {
        concat!(
            "    lea rdx, [rsp + 48]         /* the NMI stack's top (IST1) */\n",
            "    cmp [rsp + 32], rdx         /* the interrupted RSP vs the top */\n",
            "    ja 2f                       /* above the NMI stack: not nested */\n",
            "    sub rdx, 16368              /* the NMI stack's bottom (tss::NMI_STACK_SPAN) */\n",
            "    cmp [rsp + 32], rdx\n",
            "    jb 2f                       /* below the NMI stack: not nested */\n",
        )
    };
}

/// The checks found no outer NMI: this is the first.
macro_rules! nmi_not_nested {
    ($name:literal) => {
        concat!("    jmp ", $name, "_first\n")
    };
}

/// A nested NMI: rewrite the "iret" frame so that the outer NMI's IRETQ goes to `repeat_nmi`,
/// with RSP pointing at "outermost RIP", where `repeat_nmi` expects it; then return into the
/// outer NMI at once. Its exit (or the exception return that let us in) brings it back to
/// `repeat_nmi`, which runs `do_nmi` once more for us.
///
/// ```text
/// | original frame    |
/// | temp rdx          | <- RSP on entry; popped again at nested_out
/// | "NMI executing"   | <- RSP after `sub rsp, 8`
/// | iret SS           | <- kernel SS
/// | iret RSP          | <- "outermost RIP" (RSP - 80)
/// | iret RFLAGS       | <- ours (DF and IF clear)
/// | iret CS           | <- kernel CS
/// | iret RIP          | <- repeat_nmi
/// | outermost frame   | <- untouched
/// ```
macro_rules! nmi_nested {
    ($name:literal) => {
        concat!(
            $crate::nmi::pieces::asm_label!($name, "_nested"),
            "    sub rsp, 8                  /* RSP at \"NMI executing\" */\n",
            "    lea rdx, [rsp - 80]         /* \"outermost RIP\": repeat_nmi's RSP */\n",
            "    push 0x10                   /* iret SS: kernel data */\n",
            "    push rdx                    /* iret RSP */\n",
            "    pushfq                      /* iret RFLAGS */\n",
            "    push 0x08                   /* iret CS: kernel code */\n",
            "    push offset ", $name, "_repeat /* iret RIP */\n",
            "    add rsp, 48                 /* put the stack back: RSP at temp rdx */\n",
            $crate::nmi::pieces::asm_label!($name, "_nested_out"),
            "    pop rdx\n",
            "    iretq                       /* back into the outer NMI; cannot fault (ring 0) */\n",
        )
    };
}

/// The first NMI: restore rdx (its slot stays reserved: nested NMIs use it), push "NMI
/// executing", leave room for "iret" and copy the "original" frame to "outermost". Linux pushes
/// 0 and sets the variable in `repeat_nmi`; `$executing` is what gets pushed.
///
/// Then, with the script option `STRESS_UNMASK`, unmask NMIs at once with an IRETQ to the next
/// instruction, as Linux's CONFIG_DEBUG_ENTRY does: every nested-NMI window below then opens
/// without an exception in `do_nmi`.
///
/// ```text
/// | original frame    |
/// | temp rdx          |
/// | "NMI executing"   | <- $executing
/// | iret frame        | <- reserved, written by repeat_nmi
/// | outermost frame   | <- copy of "original"; RSP at "outermost RIP" after this piece
/// ```
macro_rules! nmi_first {
    ($name:literal, $executing:literal) => {
        concat!(
            $crate::nmi::pieces::asm_label!($name, "_first"),
            "    mov rdx, [rsp]              /* restore rdx; keep its slot for nested NMIs */\n",
            "    push ",
            $executing,
            "       /* \"NMI executing\" */\n",
            "    sub rsp, 40                 /* room for the \"iret\" frame */\n",
            "    .rept 5\n",
            "    push qword ptr [rsp + 88]   /* copy \"original\" to \"outermost\", SS first */\n",
            "    .endr\n",
            "    /* Everything up to here is safe from nested NMIs. */\n",
            "    test dword ptr [rip + NMIFUZZ_SCRIPT + 12], 1 /* option STRESS_UNMASK */\n",
            "    jz ",
            $name,
            "_repeat\n",
            "    push 0x10                   /* SS */\n",
            "    push rsp                    /* RSP, 8 too low because of the push above */\n",
            "    add qword ptr [rsp], 8      /* ... fixed up */\n",
            "    pushfq                      /* RFLAGS */\n",
            "    push 0x08                   /* CS */\n",
            "    push offset .L",
            $name,
            "_unmasked /* RIP: the next instruction */\n",
            "    iretq                       /* unmasks NMIs */\n",
            ".L",
            $name,
            "_unmasked:\n",
        )
    };
}

/// `repeat_nmi`..`end_repeat_nmi`: set "NMI executing" (if `set`), copy "outermost" into
/// "iret". Entered from `first_nmi` and from the outer NMI's IRETQ after a nested NMI rewrote
/// "iret"; in both cases RSP points at "outermost RIP". A nested NMI that lands in here finds
/// its interrupted RIP in the window and returns without touching anything.
///
/// ```text
/// | temp rdx          |
/// | "NMI executing"   | <- RSP + 80: set to 1; RSP after `add rsp, 80`
/// | iret frame        | <- pushed from RSP - 48 each time: "outermost", SS first
/// | outermost frame   | <- RSP on entry and at end_repeat_nmi
/// ```
macro_rules! nmi_repeat {
    ($name:literal, set) => {
        concat!(
            "    .global ", $name, "_repeat\n",
            $crate::nmi::pieces::asm_label!($name, "_repeat"),
            "    mov qword ptr [rsp + 80], 1 /* set \"NMI executing\" */\n",
            $crate::nmi::pieces::nmi_repeat!(@copy $name),
        )
    };
    ($name:literal, keep) => {
        concat!(
            "    .global ", $name, "_repeat\n",
            $crate::nmi::pieces::asm_label!($name, "_repeat"),
            $crate::nmi::pieces::nmi_repeat!(@copy $name),
        )
    };
    (@copy $name:literal) => {
        concat!(
            "    add rsp, 80                 /* RSP at \"NMI executing\" */\n",
            "    .rept 5\n",
            "    push qword ptr [rsp - 48]   /* copy \"outermost\" to \"iret\", SS first */\n",
            "    .endr\n",
            "    sub rsp, 40                 /* RSP at \"outermost RIP\" again */\n",
            "    .global ", $name, "_end_repeat\n",
            $crate::nmi::pieces::asm_label!($name, "_end_repeat"),
            "    /* Everything below can be preempted by a nested NMI, which then points the\n",
            "       \"iret\" frame at repeat_nmi. */\n",
        )
    };
}

/// Save the registers below "outermost" (which makes `NmiRegs`) and call `do_nmi(regs)`. RSP
/// is 16-byte aligned at the call: T - 256. The second form runs `$before` between the pushes
/// and the call (the pre-2015 entries' paranoid GS check, `ist_user.rs`).
macro_rules! nmi_call {
    ($name:literal) => {
        $crate::nmi::pieces::nmi_call!($name, "")
    };
    ($name:literal, $before:expr) => {
        concat!(
            $crate::regs::push_general_regs!(),
            $before,
            "    mov rdi, rsp                /* do_nmi(regs): RSP points at NmiRegs */\n",
            "    call do_nmi\n",
        )
    };
}

/// The exit, `<name>_restore` (Linux's `nmi_restore`): restore the registers, point RSP at the
/// "iret" frame, set DF, clear "NMI executing", IRETQ (which also restores the interrupted DF,
/// atomically).
///
/// ```text
/// | temp rdx          |
/// | "NMI executing"   | <- RSP + 40: cleared
/// | iret frame        | <- RSP after `add rsp, 40`: IRETQ pops it
/// | outermost frame   | <- RSP after the pops
/// ```
///
/// From the `std` on, a nested NMI sees DF and an RSP on the NMI stack, and so is still
/// nested after "NMI executing" is cleared.
///
/// The second form runs `$before` first and ends with `$last` instead of the IRETQ (the
/// pre-2015 entries' paranoid GS exit and return to user, `ist_user.rs`).
macro_rules! nmi_exit {
    ($name:literal) => {
        $crate::nmi::pieces::nmi_exit!(
            $name,
            "",
            "    iretq                       /* returns, or loops back to repeat_nmi */\n"
        )
    };
    ($name:literal, $before:expr, $last:expr) => {
        concat!(
            $crate::nmi::pieces::asm_label!($name, "_restore"),
            $before,
            $crate::regs::pop_general_regs!(),
            "    add rsp, 40                 /* skip \"outermost\": RSP at the \"iret\" frame */\n",
            "    std                         /* mark the exit path for nested NMIs */\n",
            "    mov qword ptr [rsp + 40], 0 /* clear \"NMI executing\" */\n",
            $last,
        )
    };
}

pub(crate) use {
    asm_label, nmi_call, nmi_check_executing, nmi_check_repeat_window, nmi_check_stack_and_df,
    nmi_exit, nmi_first, nmi_nested, nmi_not_nested, nmi_prologue, nmi_repeat,
};

// The last piece, the entry from ring 3, has a file of its own.
pub(crate) use super::from_user::nmi_epilogue;

// The numbers written literally in the text above.
const _: () = assert!(KERNEL_CODE_SELECTOR == 0x08 && KERNEL_DATA_SELECTOR == 0x10);
const _: () = assert!(tss::NMI_STACK_SPAN == 16368);
const _: () = assert!(offset_of!(Script, options) == 12 && option::STRESS_UNMASK == 1);
// The layout the host reads: temp rdx at RSP = T - 48, "NMI executing" just below it, "iret"
// 40 bytes below that, "outermost" 40 bytes lower still, and NmiRegs right below "outermost"
// so that NmiRegs::frame is the "outermost" frame.
const _: () = {
    let l = NmiStackLayout::LINUX;
    assert!(l.original == 40 && l.temp_rdx == 48 && l.executing == 56);
    assert!(l.iret == l.executing + 40 && l.outermost == l.iret + 40);
    assert!(offset_of!(NmiRegs, frame) == 15 * 8);
};
