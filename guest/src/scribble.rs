//! The chaos-only `scribble` action: `do_nmi` overwrites random bytes of one of the guest's own
//! structures while it handles an NMI (`nmifuzz_abi::fault::SCRIBBLE`).
//!
//! This is no model of an NMI-entry bug. It is how `nmifuzz chaos` makes the guest as hostile
//! to the VMM as it can be: a broken IDT, GDT, TSS, page table, stack, mailbox or script must
//! still end every run in a verdict, and the next run must not notice. So nothing here checks
//! anything: the bytes are written, and whatever follows is the test.

use core::ptr::write_volatile;

use nmifuzz_abi::{Scribble, ScribbleArea};

use crate::{gdt, idt, mailbox, paging, script, tss};

/// A byte range of guest memory that a scribble may overwrite.
pub struct Region {
    /// First byte.
    pub base: *mut u8,
    /// Length in bytes, at least 1.
    pub len: usize,
}

/// Overwrites `scribble.bytes` bytes of its area; offsets and values come from a xorshift64
/// stream seeded with `scribble.seed`, so a chaos run is as reproducible as any other.
///
/// The script was validated before the NMI entry was installed, but the script itself is one of
/// the areas, so a code or count that is out of range by now is clamped rather than trusted.
pub fn perform(scribble: Scribble) {
    let Some(area) = ScribbleArea::from_code(scribble.area) else { return };
    // Never 0: xorshift stays at 0 forever.
    let mut state = u64::from(scribble.seed) << 1 | 1;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    // Areas made of several structures pick one with the stream's first value.
    let region = region(area, next());
    for _ in 0..scribble.bytes.min(nmifuzz_abi::MAX_SCRIBBLE_BYTES) {
        let value = next();
        let offset = (value >> 16) as usize % region.len;
        // SAFETY: `offset < region.len`, and every region is a guest static of its module (see
        // `region`). Overwriting it is the point: the guest may fault, loop or report garbage
        // afterwards, which the host turns into a verdict.
        unsafe { write_volatile(region.base.add(offset), value as u8) };
    }
}

/// The byte range of `area`; `pick` chooses among its structures.
fn region(area: ScribbleArea, pick: u64) -> Region {
    match area {
        ScribbleArea::Idt => idt::scribble_region(pick),
        ScribbleArea::Gdt => gdt::scribble_region(),
        ScribbleArea::Tss => tss::scribble_region(),
        ScribbleArea::PageTables => paging::scribble_region(pick),
        ScribbleArea::NmiStack => tss::stack_top_region(0),
        ScribbleArea::ExceptionStacks => tss::stack_top_region(1 + (pick % 2) as usize),
        ScribbleArea::Mailbox => mailbox::scribble_region(),
        ScribbleArea::Script => script::scribble_region(),
    }
}
