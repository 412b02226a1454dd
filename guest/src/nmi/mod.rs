//! NMI handling: the entry variants (one module each, in assembly) and `do_nmi`, the handler
//! body they all call.
//!
//! The script selects a variant and the host points IDT vector 2 (on IST1) at its entry symbol;
//! [`check_installed`] verifies that. To add a variant: add it to `nmifuzz_abi::Variant` (with
//! its entry symbol), write its entry in a new module here (its own `global_asm!` with a stack
//! diagram, building [`NmiRegs`] with `regs::push_general_regs!` and calling `do_nmi`), and add
//! its arm to [`entry`].

mod naive;

use core::arch::asm;
use core::mem::size_of;

use nmifuzz_abi::{Variant, fault};

use crate::mailbox::{self, Counter};
use crate::regs::{GeneralRegs, InterruptFrame};
use crate::{idt, script};

/// Where each variant's entry code starts: the table of variants.
fn entry(variant: Variant) -> u64 {
    match variant {
        Variant::Naive => naive::entry(),
    }
}

/// Panics unless the host pointed the NMI gate at `variant`'s entry.
pub fn check_installed(variant: Variant) {
    let (gate, expected) = (idt::nmi_entry(), entry(variant));
    if gate != expected {
        panic!(
            "the NMI gate points at {gate:#x}, not at the {} entry {expected:#x}",
            variant.name()
        );
    }
}

/// What an NMI entry passes to `do_nmi`: the interrupted context, like Linux's `pt_regs`.
#[repr(C)]
#[allow(dead_code, reason = "built by the entry assembly; invariant checks will read it")]
pub struct NmiRegs {
    /// The general registers, saved by the entry.
    pub regs: GeneralRegs,
    /// The interrupted RIP, CS, RFLAGS, RSP and SS, in the hardware frame's layout.
    pub frame: InterruptFrame,
}

// The entries' assembly depends on this.
const _: () = assert!(size_of::<NmiRegs>() == 20 * 8);

/// The NMI handler body: counts the call, then does what the script's action for this call
/// says: busy work, then the faults it asks for. A `ud2` here is handled on the current (NMI)
/// stack, and that handler's IRETQ unblocks NMIs while this NMI is still being handled: the
/// window the entry variants must survive.
#[unsafe(no_mangle)]
pub extern "C" fn do_nmi(_regs: &mut NmiRegs) {
    let index = mailbox::increment(Counter::DoNmiCalls) - 1;
    let Some(action) = script::action(index) else {
        return;
    };
    busy(action.busy);
    if action.faults & fault::UD != 0 {
        // SAFETY: `ud2` raises #UD, whose handler counts it and resumes after it; registers,
        // stack and flags are as before.
        unsafe { asm!("ud2") };
    }
}

/// `iterations` turns of a two-instruction loop: a fixed instruction count for the fuzzer to
/// place NMIs in, whatever the compiler does to the surrounding code.
fn busy(iterations: u32) {
    if iterations == 0 {
        return;
    }
    // SAFETY: only the counter register and the flags change, both declared.
    unsafe {
        asm!(
            "2:",
            "dec {count:e}",
            "jnz 2b",
            count = inout(reg) iterations => _,
            options(nomem, nostack)
        );
    }
}
