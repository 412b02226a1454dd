//! NMI handling: the entry variants (one module each, in assembly), the pieces of Linux's entry
//! they share, and `do_nmi`, the handler body they all call, with its invariant checks.
//!
//! The script selects a variant and the host points IDT vector 2 (on IST1) at its entry symbol;
//! [`check_installed`] verifies that. To add a variant: add it to `nmifuzz_abi::Variant` (with
//! its entry symbol and stack layout), write its entry in a new module here (see `linux.rs` and
//! `README.md`), and add its arm to [`entry`].

mod checks;
mod early_clear;
mod handler;
mod linux;
mod naive;
mod no_executing_var;
mod no_repeat_window;
mod no_stack_check;
mod pieces;
mod repeat_without_set;

use core::mem::size_of;

use nmifuzz_abi::Variant;

pub use self::checks::check_done;
use crate::idt;
use crate::panic::fail;
use crate::regs::{GeneralRegs, InterruptFrame};

/// Where each variant's entry code starts: the table of variants.
fn entry(variant: Variant) -> u64 {
    match variant {
        Variant::Linux => linux::entry(),
        Variant::Naive => naive::entry(),
        Variant::NoStackCheck => no_stack_check::entry(),
        Variant::NoExecutingVar => no_executing_var::entry(),
        Variant::NoRepeatWindow => no_repeat_window::entry(),
        Variant::RepeatWithoutSet => repeat_without_set::entry(),
        Variant::EarlyClear => early_clear::entry(),
    }
}

/// Panics unless the host pointed the NMI gate at `variant`'s entry.
pub fn check_installed(variant: Variant) {
    let (gate, expected) = (idt::nmi_entry(), entry(variant));
    if gate != expected {
        fail!(
            "the NMI gate points at {gate:#x}, not at the {} entry {expected:#x}",
            variant.name()
        );
    }
}

/// What an NMI entry passes to `do_nmi`: the interrupted context, like Linux's `pt_regs`
/// (without `orig_ax`). For the `linux`-derived entries, `frame` is the "outermost" frame.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct NmiRegs {
    /// The general registers, saved by the entry.
    pub regs: GeneralRegs,
    /// The interrupted RIP, CS, RFLAGS, RSP and SS, in the hardware frame's layout.
    pub frame: InterruptFrame,
}

// The entries' assembly depends on this.
const _: () = assert!(size_of::<NmiRegs>() == 20 * 8);
