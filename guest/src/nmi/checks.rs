//! The invariants the NMI path checks about itself (design.md section 4):
//! - 3 and 5: while an iteration of `do_nmi` runs, its `regs` (the saved registers and, for the
//!   `linux`-derived entries, the "outermost" frame) and the frame it will finally return
//!   through do not change. A shadow copy is taken when the iteration starts and compared when
//!   it ends; the IST guard words are checked there too.
//! - 4: every NMI delivery is followed by the start of an iteration, and iterations never
//!   outnumber deliveries. Every entry counts its deliveries in `NMI_DELIVERIES`, outside the
//!   NMI stack, as its first instruction; several deliveries may merge into one iteration, as
//!   Linux merges nested NMIs into one repeat. The comparison is cumulative, not per
//!   iteration: an NMI nested after `end_repeat_nmi` but before the iteration starts precedes
//!   that iteration and also forces the next one, so two iterations may follow each other
//!   without a delivery in between.
//!
//! The frame an iteration finally returns through is found from the variant's own description
//! (`Variant::stack_layout`): the "outermost" frame for `linux` and its kin, `regs.frame` for
//! an entry without one.
//!
//! Copies and comparisons use `rep movsq` / `repe cmpsq`: one instruction each for the host's
//! single-stepping, whatever the length.

use core::arch::asm;
use core::mem::size_of;
use core::ptr::{addr_of, addr_of_mut, read_volatile};

use super::NmiRegs;
use crate::regs::{FRAME_FIELD_NAMES, GENERAL_REG_NAMES, InterruptFrame};
use crate::{invariant, script, tss};

const REGS_QWORDS: usize = size_of::<NmiRegs>() / 8;
const FRAME_QWORDS: usize = size_of::<InterruptFrame>() / 8;

/// NMI deliveries so far: incremented by the first instruction of every entry.
#[unsafe(no_mangle)]
static mut NMI_DELIVERIES: u64 = 0;
/// `NMI_DELIVERIES` when the latest iteration started.
static mut DELIVERIES_SEEN: u64 = 0;
/// Iterations started.
static mut ITERATIONS: u64 = 0;
/// The running iteration's `regs` as they were when it started.
static mut SHADOW_REGS: [u64; REGS_QWORDS] = [0; REGS_QWORDS];
/// The running iteration's final return frame as it was when it started, and its address
/// (null if it is `regs.frame`, which `SHADOW_REGS` covers).
static mut SHADOW_FRAME: [u64; FRAME_QWORDS] = [0; FRAME_QWORDS];
static mut FINAL_FRAME: *const u64 = core::ptr::null();

/// At the start of an iteration: invariant 4, then the shadow copies.
pub fn iteration_start(regs: &NmiRegs) {
    // SAFETY: statics only the NMI path touches, and do_nmi does not nest (checked on entry);
    // NMI_DELIVERIES is read with a volatile load since the entries write it.
    unsafe {
        let delivered = read_volatile(addr_of!(NMI_DELIVERIES));
        ITERATIONS += 1;
        let iterations = ITERATIONS;
        if iterations > delivered {
            invariant::violated(
                4,
                format_args!(
                    "do_nmi iteration {iterations} started after only {delivered} NMI \
                     deliveries: iterations outnumber deliveries"
                ),
            );
        }
        DELIVERIES_SEEN = delivered;
        copy(addr_of_mut!(SHADOW_REGS).cast(), (regs as *const NmiRegs).cast(), REGS_QWORDS);
        let frame = final_frame(regs);
        if frame == addr_of!(regs.frame).cast() {
            FINAL_FRAME = core::ptr::null();
        } else {
            // The run's first iteration is the first NMI's, before anything could nest: the
            // frame the entry's `Layout:` says it returns through must hold the interrupted
            // context then, or the description contradicts the code.
            if iterations == 1 && !equal(frame, addr_of!(regs.frame).cast(), FRAME_QWORDS) {
                layout_contradicts_code(frame);
            }
            FINAL_FRAME = frame;
            copy(addr_of_mut!(SHADOW_FRAME).cast(), frame, FRAME_QWORDS);
        }
    }
}

/// At the end of an iteration: invariants 5 and 3 against the shadow copies, and the guards.
pub fn iteration_end(regs: &NmiRegs) {
    let now = (regs as *const NmiRegs).cast::<u64>();
    // SAFETY: as in `iteration_start`; FINAL_FRAME, if set, points at the NMI stack.
    unsafe {
        let before = addr_of!(SHADOW_REGS).cast::<u64>();
        if !equal(now, before, REGS_QWORDS) {
            changed(5, "do_nmi's regs", now, before, REGS_QWORDS);
        }
        let frame = FINAL_FRAME;
        let before = addr_of!(SHADOW_FRAME).cast::<u64>();
        if !frame.is_null() && !equal(frame, before, FRAME_QWORDS) {
            changed(3, "the final return frame", frame, before, FRAME_QWORDS);
        }
    }
    tss::check_guards();
}

/// At DONE: no NMI still being handled, none lost (invariants 2 and 4), guards intact.
pub fn check_done() {
    if super::handler::running() {
        invariant::violated(
            2,
            format_args!(
                "the workload reached DONE while do_nmi was still running: an NMI returned to \
                 the interrupted context before it was done"
            ),
        );
    }
    // An NMI may arrive between any two loads here and be handled completely, moving both
    // counters; read until two rounds agree, so the pair is one consistent snapshot.
    // SAFETY: plain loads of statics the NMI path writes.
    let read = || unsafe {
        (read_volatile(addr_of!(NMI_DELIVERIES)), read_volatile(addr_of!(DELIVERIES_SEEN)))
    };
    let (delivered, seen) = loop {
        let first = read();
        if read() == first {
            break first;
        }
    };
    if delivered != seen {
        invariant::violated(
            4,
            format_args!(
                "{} of {delivered} NMI deliveries were never followed by a do_nmi iteration",
                delivered - seen
            ),
        );
    }
    tss::check_guards();
}

/// Where the frame the current NMI finally returns through lives. An NMI from ring 3 returns
/// through `regs.frame` on the thread stack whatever the entry's layout (its user path).
fn final_frame(regs: &NmiRegs) -> *const u64 {
    if regs.frame.cs & 3 != 0 {
        return addr_of!(regs.frame).cast();
    }
    match script::variant().and_then(|v| v.stack_layout()) {
        Some(layout) => (tss::nmi_stack_top() - layout.outermost) as *const u64,
        None => addr_of!(regs.frame).cast(),
    }
}

/// The panic for an entry whose `Layout:` puts the "outermost" frame where the code does not.
#[cold]
#[inline(never)]
fn layout_contradicts_code(frame: *const u64) -> ! {
    let offset = tss::nmi_stack_top() - frame as u64;
    panic!(
        "the entry's Layout: contradicts its code: at the first NMI's first do_nmi iteration, \
         the \"outermost\" frame it names (IST1 top - {offset}) is not the interrupted context \
         that do_nmi received (docs/entries.md)"
    )
}

/// Copies `qwords` qwords from `src` to `dst`.
///
/// # Safety
///
/// Both ranges must be valid for `qwords` qwords and not overlap.
unsafe fn copy(dst: *mut u64, src: *const u64, qwords: usize) {
    // SAFETY: the caller vouches for the ranges; DF is clear (Rust ABI), and only RCX, RSI and
    // RDI change, all declared.
    unsafe {
        asm!(
            "rep movsq",
            inout("rcx") qwords => _,
            inout("rsi") src => _,
            inout("rdi") dst => _,
            options(nostack, preserves_flags)
        );
    }
}

/// Whether `qwords` (at least one) qwords at `a` and `b` are equal.
///
/// # Safety
///
/// Both ranges must be valid for reads of `qwords` qwords.
unsafe fn equal(a: *const u64, b: *const u64, qwords: usize) -> bool {
    let same: u8;
    // SAFETY: the caller vouches for the ranges; DF is clear (Rust ABI). `repe cmpsq` stops at
    // the first difference; ZF then tells whether the last pair compared equal.
    unsafe {
        asm!(
            "repe cmpsq",
            "sete {same}",
            same = out(reg_byte) same,
            inout("rcx") qwords => _,
            inout("rsi") a => _,
            inout("rdi") b => _,
            options(readonly, nostack)
        );
    }
    same != 0
}

/// Reports the first qword of `what` that differs between `now` and `before`.
///
/// # Safety
///
/// Both ranges must be valid for reads of `qwords` qwords.
#[cold]
#[inline(never)]
unsafe fn changed(number: u8, what: &str, now: *const u64, before: *const u64, qwords: usize) -> ! {
    for i in 0..qwords {
        // SAFETY: `i` is in both ranges.
        let (is, was) = unsafe { (read_volatile(now.add(i)), read_volatile(before.add(i))) };
        if is != was {
            let name = match (qwords, i) {
                (REGS_QWORDS, i) if i < GENERAL_REG_NAMES.len() => GENERAL_REG_NAMES[i],
                (REGS_QWORDS, i) => FRAME_FIELD_NAMES[i - GENERAL_REG_NAMES.len()],
                (_, i) => FRAME_FIELD_NAMES[i],
            };
            invariant::violated(
                number,
                format_args!(
                    "{what} changed while a do_nmi iteration ran: {name} was {was:#x} at its \
                     start, {is:#x} at its end"
                ),
            );
        }
    }
    invariant::violated(number, format_args!("{what} compared unequal, but no qword differs"));
}
