//! The IDT: 256 64-bit interrupt gates, all pointing at real handlers.
//!
//! Every vector starts at its exception stub ([`exceptions::stub`]). The host points the NMI gate
//! at the script's variant before each run (so that even an NMI at a run's first instruction
//! enters it); [`nmi_entry`] lets the guest check that it did.

use core::arch::asm;
use core::mem::size_of;
use core::ptr::{addr_of, addr_of_mut, read_volatile};

use crate::exceptions;
use crate::gdt::{KERNEL_CODE_SELECTOR, TablePointer};
use crate::tss::Ist;

/// Number of vectors, so every vector has a gate.
const VECTORS: usize = 256;

/// Type/attribute byte of a 64-bit interrupt gate: present (0x80), DPL 0, type 0xE. An interrupt
/// gate (unlike a trap gate, 0xF) clears IF on entry; the guest runs with IF clear anyway.
const INTERRUPT_GATE: u64 = 0x8e;

/// A 16-byte gate as two qwords (SDM Vol. 3A §6.14.1, Figure 6-8):
///
/// ```text
/// low:  [15:0] offset[15:0]  [31:16] selector  [34:32] IST  [47:40] type/attr  [63:48] offset[31:16]
/// high: [31:0] offset[63:32] [63:32] reserved
/// ```
type Gate = [u64; 2];

#[repr(C, align(16))]
struct Idt([Gate; VECTORS]);

static mut IDT: Idt = Idt([[0; 2]; VECTORS]);

/// The gate for a handler at `handler` running on `ist` (or the current stack if `None`).
fn gate(handler: u64, ist: Option<Ist>) -> Gate {
    let ist = ist.map_or(0, |ist| ist as u64);
    let low = (handler & 0xffff)
        | u64::from(KERNEL_CODE_SELECTOR) << 16
        | ist << 32
        | INTERRUPT_GATE << 40
        | ((handler >> 16) & 0xffff) << 48;
    [low, handler >> 32]
}

/// Points every vector at its exception stub and loads the IDT. Needs the TSS loaded first
/// ([`crate::gdt::init`]), since the NMI, #DF, #BP and #DB gates use IST stacks.
pub fn init() {
    let idt = addr_of_mut!(IDT);
    for vector in 0..VECTORS {
        let gate = gate(exceptions::stub(vector), exceptions::ist(vector));
        // SAFETY: an in-bounds slot of the IDT static, which is not loaded yet.
        unsafe { (*idt).0[vector] = gate };
    }
    let pointer = TablePointer { limit: size_of::<Idt>() as u16 - 1, base: addr_of!(IDT) as u64 };
    // SAFETY: every gate now points at a handler in this image.
    unsafe { load(&pointer) };
}

/// Where the NMI gate points.
pub fn nmi_entry() -> u64 {
    let idt = addr_of!(IDT);
    // SAFETY: in-bounds slots of the IDT static, written by the host before the run.
    let [low, high] = unsafe { read_volatile(addr_of!((*idt).0[exceptions::NMI as usize])) };
    (low & 0xffff) | ((low >> 32) & 0xffff_0000) | (high & 0xffff_ffff) << 32
}

/// Loads an IDT with limit 0, so that the next exception cannot be delivered and ends in a
/// triple fault (the `TripleFault` workload).
///
/// # Safety
///
/// Every exception and NMI after this shuts the VM down.
pub unsafe fn load_empty() {
    // SAFETY: the caller accepts that no interrupt can be delivered any more.
    unsafe { load(&TablePointer { limit: 0, base: 0 }) };
}

/// # Safety
///
/// `pointer` must describe an IDT whose present gates all point at valid handlers.
unsafe fn load(pointer: &TablePointer) {
    // SAFETY: `lidt` only reads the 10-byte operand; the caller vouches for the table.
    unsafe { asm!("lidt [{}]", in(reg) pointer, options(readonly, nostack, preserves_flags)) };
}
