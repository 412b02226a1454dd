//! NMI handling: the entries (one file each in the repository's `entries/`, found by the
//! build), the pieces of Linux's entry they share, and `do_nmi`, the handler body they all call,
//! with its invariant checks.
//!
//! The script selects an entry and the host points IDT vector 2 (on IST1) at its symbol;
//! [`check_installed`] verifies that. To add an entry, add a file to `entries/`: nothing here
//! changes (docs/entries.md).

mod checks;
mod from_user;
mod handler;
mod ist_user;
mod pieces;

// Every entry's code, and `entry_addresses()`.
nmifuzz_abi::include_entries!();

use core::mem::size_of;

use nmifuzz_abi::Variant;

pub use self::checks::check_done;
use crate::idt;
use crate::panic::fail;
use crate::regs::{GeneralRegs, InterruptFrame};

/// Where `variant`'s entry code starts.
fn entry(variant: Variant) -> u64 {
    entry_addresses()[variant.code() as usize]
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
