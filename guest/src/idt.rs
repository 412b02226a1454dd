//! The IDT: 256 64-bit interrupt gates, all pointing at real handlers.
//!
//! Every vector starts at its exception stub ([`exceptions::stub`]). The host points the NMI gate
//! at the script's variant before each run (so that even an NMI at a run's first instruction
//! enters it); [`nmi_entry`] lets the guest check that it did.
//!
//! A second table, the NMI IDT, is the same except that #BP and #DB stay on the current stack
//! instead of IST3. `do_nmi` runs with it loaded ([`enter_nmi`] / [`leave_nmi`]), as Linux 3.3
//! to 5.x did with `debug_stack_set_zero()`: an NMI may interrupt the #BP handler while it still
//! runs on IST3, and an `int3` in `do_nmi` would then restart IST3 at its top and overwrite the
//! interrupted #BP frame.

use core::arch::asm;
use core::mem::size_of;
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use crate::exceptions;
use crate::gdt::{KERNEL_CODE_SELECTOR, TablePointer};
use crate::scribble::Region;
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
/// The IDT while `do_nmi` runs: #BP and #DB on the current stack.
static mut NMI_IDT: Idt = Idt([[0; 2]; VECTORS]);

/// The `lidt` operands of the two tables, built once by [`init`].
static mut IDT_POINTER: TablePointer = TablePointer { limit: 0, base: 0 };
static mut NMI_IDT_POINTER: TablePointer = TablePointer { limit: 0, base: 0 };

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
    let (idt, nmi_idt) = (addr_of_mut!(IDT), addr_of_mut!(NMI_IDT));
    for vector in 0..VECTORS {
        let (stub, ist) = (exceptions::stub(vector), exceptions::ist(vector));
        // SAFETY: in-bounds slots of the IDT statics, which are not loaded yet.
        unsafe {
            (*idt).0[vector] = gate(stub, ist);
            (*nmi_idt).0[vector] = gate(stub, ist.filter(|ist| !matches!(ist, Ist::Debug)));
        }
    }
    let limit = size_of::<Idt>() as u16 - 1;
    // SAFETY: plain stores to the pointer statics, not in use yet.
    unsafe {
        IDT_POINTER = TablePointer { limit, base: idt as u64 };
        NMI_IDT_POINTER = TablePointer { limit, base: nmi_idt as u64 };
    }
    // SAFETY: every gate now points at a handler in this image.
    unsafe { load(addr_of!(IDT_POINTER)) };
}

/// Loads the NMI IDT for `do_nmi`, with the NMI gate the host installed for this run.
pub fn enter_nmi() {
    let vector = exceptions::NMI as usize;
    // SAFETY: in-bounds slots of the IDT statics. The NMI IDT is not loaded (do_nmi does not
    // nest), so its gate can be written in two halves.
    unsafe {
        let gate = read_volatile(addr_of!(IDT.0[vector]));
        write_volatile(addr_of_mut!(NMI_IDT.0[vector]), gate);
        load(addr_of!(NMI_IDT_POINTER));
    }
}

/// Loads the ordinary IDT again when `do_nmi` leaves.
pub fn leave_nmi() {
    // SAFETY: the table `init` loaded.
    unsafe { load(addr_of!(IDT_POINTER)) };
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
unsafe fn load(pointer: *const TablePointer) {
    // SAFETY: `lidt` only reads the 10-byte operand; the caller vouches for the table.
    unsafe { asm!("lidt [{}]", in(reg) pointer, options(readonly, nostack, preserves_flags)) };
}

/// The exception and NMI gates (vectors 0 to 31) of the IDT (`pick` even) or of the NMI IDT
/// (odd), for the chaos `scribble` action.
pub fn scribble_region(pick: u64) -> Region {
    let table = if pick.is_multiple_of(2) { addr_of_mut!(IDT) } else { addr_of_mut!(NMI_IDT) };
    Region { base: table.cast(), len: 32 * size_of::<Gate>() }
}
