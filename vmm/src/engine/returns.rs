//! The return-integrity oracle: every NMI returns exactly to the context it interrupted.
//!
//! The engine keeps, for every NMI delivered and not yet returned from, the hardware frame the
//! CPU saved at its delivery: the interrupted context ([`Context`]). While any such context is
//! open, every IRETQ the guest is about to execute is one of three things:
//!
//! - **a return within NMI handling:** its target lies in the guest's NMI-handling code, between
//!   the linker-script markers `nmifuzz_abi::NMI_CODE_START` and `NMI_CODE_END` (every entry,
//!   `do_nmi`, and the exception paths its faults take). An exception taken by `do_nmi`
//!   returning to it, a nested NMI returning into the outer one, Linux's IRETQ into
//!   `repeat_nmi` and its stress-mode IRETQ to the next instruction are all of this kind;
//! - **a return to an open context:** the frame it pops equals one that an NMI saved. RIP, CS,
//!   RSP and SS must be equal, and RFLAGS too except TF and RF (the VMM's single-stepping and
//!   breakpoints own those) and the always-one bit 1. Returning to an outer context closes
//!   every NMI nested inside it: merged NMIs and repeats are legal;
//! - **a wrong return:** anything else. It ends the run with [`Verdict::WrongReturn`] at the
//!   IRETQ itself, before it executes, so nothing the returned-to code does (such as the
//!   workload's own register checks) can come first. It is judged against the open context
//!   with the same return RIP, if there is one, and otherwise against the outermost.
//!
//! Only IRETQs are judged. `do_nmi` calls shared code (panic formatting, `memcpy`) that lies
//! outside the NMI-handling range, and reaching it is not a return; and an NMI entry leaves NMI
//! handling with IRETQ, as the entry contract says. The stepped engine sees every IRETQ: it is
//! a stop of its own.

use std::fmt;
use std::ops::Range;

use crate::image::GuestImage;
use crate::outcome::Verdict;
use crate::vm::IretFrame;

/// RFLAGS bits a correct return need not restore: bit 1 (always one), TF (bit 8) and RF
/// (bit 16), which the VMM's single-stepping and breakpoints set and clear.
const RFLAGS_NOT_JUDGED: u64 = (1 << 1) | (1 << 8) | (1 << 16);

/// A context an NMI interrupted and will return to.
#[derive(Clone, Copy, Debug)]
pub(super) struct Context {
    /// The hardware frame saved at the delivery.
    pub frame: IretFrame,
    /// Which NMI: 1 for the first delivered in the run.
    pub nmi: u64,
    /// Retired instructions at the delivery.
    pub delivered_at: u64,
}

/// One field of an IRETQ frame whose value differs from the interrupted context's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FieldDifference {
    /// `RIP`, `CS`, `RFLAGS`, `RSP` or `SS`.
    pub field: &'static str,
    /// The interrupted context's value.
    pub expected: u64,
    /// The value the IRETQ pops.
    pub actual: u64,
}

/// The fields in which `actual` fails to restore `expected`, in frame order.
pub fn differences(expected: &IretFrame, actual: &IretFrame) -> Vec<FieldDifference> {
    // What a correct return must restore of each field: selectors are 16 bits wide, and
    // RFLAGS is judged without the bits the VMM owns.
    let judged = |field: &str, value: u64| match field {
        "CS" | "SS" => value & 0xffff,
        "RFLAGS" => value & !RFLAGS_NOT_JUDGED,
        _ => value,
    };
    frame_fields(expected)
        .into_iter()
        .zip(frame_fields(actual))
        .map(|((field, expected), (_, actual))| {
            (field, judged(field, expected), judged(field, actual))
        })
        .filter(|(_, expected, actual)| expected != actual)
        .map(|(field, expected, actual)| FieldDifference { field, expected, actual })
        .collect()
}

/// The frame's fields by name, in stack order (RIP at the lowest address).
pub fn frame_fields(frame: &IretFrame) -> [(&'static str, u64); 5] {
    [
        ("RIP", frame.rip),
        ("CS", frame.cs),
        ("RFLAGS", frame.rflags),
        ("RSP", frame.rsp),
        ("SS", frame.ss),
    ]
}

/// An NMI's return that does not resume the context it interrupted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrongReturn {
    /// Which NMI: 1 for the first delivered in the run.
    pub nmi: u64,
    /// Retired instructions at its delivery.
    pub delivered_at: u64,
    /// Retired instructions at the wrong IRETQ.
    pub returned_at: u64,
    /// The IRETQ, as `symbol+offset`.
    pub iretq: String,
    /// The hardware frame saved at the delivery: the context to resume.
    pub expected: IretFrame,
    /// The frame the IRETQ pops.
    pub actual: IretFrame,
    /// `expected.rip` as `symbol+offset`.
    pub expected_symbol: String,
    /// `actual.rip` as `symbol+offset`.
    pub actual_symbol: String,
    /// Whether `actual.rsp` lies on the NMI stack.
    pub actual_rsp_on_nmi_stack: bool,
}

impl WrongReturn {
    /// The fields that differ.
    pub fn differences(&self) -> Vec<FieldDifference> {
        differences(&self.expected, &self.actual)
    }

    /// Names of the differing fields, lower case, joined by `+`: `rsp`, `rip+rsp`, ...
    pub fn differing_fields(&self) -> String {
        let names: Vec<String> =
            self.differences().iter().map(|d| d.field.to_ascii_lowercase()).collect();
        names.join("+")
    }
}

impl fmt::Display for WrongReturn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // RIP and RSP always, the other fields where they differ.
        let others = self.differences();
        let others = others.iter().filter(|d| !matches!(d.field, "RIP" | "RSP"));
        write!(
            f,
            "NMI #{} (delivered at instruction {}) ended with a return to {} with RSP {:#x}",
            self.nmi, self.delivered_at, self.actual_symbol, self.actual.rsp
        )?;
        if self.actual_rsp_on_nmi_stack {
            write!(f, " (on the NMI stack)")?;
        }
        for d in others.clone() {
            write!(f, ", {} {:#x}", d.field, d.actual)?;
        }
        write!(
            f,
            "; the context it interrupted was {} with RSP {:#x}",
            self.expected_symbol, self.expected.rsp
        )?;
        for d in others {
            write!(f, ", {} {:#x}", d.field, d.expected)?;
        }
        write!(f, " (IRETQ at {}, instruction {})", self.iretq, self.returned_at)
    }
}

/// What the guest's code and stacks look like to the oracle.
#[derive(Clone, Debug)]
pub(super) struct Bounds {
    /// The NMI-handling code.
    pub nmi_code: Range<u64>,
    /// The NMI stack, its top included.
    pub nmi_stack: Range<u64>,
}

/// Judges an IRETQ about to pop `frame` at instruction `at` (the stop at `iretq`), with the
/// NMI contexts `open` (outermost first); `None` if it is a legal return.
pub(super) fn judge(
    open: &[Context],
    bounds: &Bounds,
    frame: &IretFrame,
    at: u64,
    iretq: u64,
    image: &GuestImage,
) -> Option<Verdict> {
    let outermost = open.first()?;
    if bounds.nmi_code.contains(&frame.rip)
        || open.iter().any(|c| differences(&c.frame, frame).is_empty())
    {
        return None;
    }
    let judged = open.iter().rev().find(|c| c.frame.rip == frame.rip).unwrap_or(outermost);
    Some(Verdict::WrongReturn(WrongReturn {
        nmi: judged.nmi,
        delivered_at: judged.delivered_at,
        returned_at: at,
        iretq: image.symbolize(iretq),
        expected: judged.frame,
        actual: *frame,
        expected_symbol: image.symbolize(judged.frame.rip),
        actual_symbol: image.symbolize(frame.rip),
        actual_rsp_on_nmi_stack: bounds.nmi_stack.contains(&frame.rsp),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAME: IretFrame = IretFrame { rip: 0x1000, cs: 8, rflags: 0x246, rsp: 0x8000, ss: 0x10 };

    #[test]
    fn the_stepping_flags_are_not_judged_but_every_other_bit_is() {
        let stepped = IretFrame { rflags: FRAME.rflags | (1 << 8) | (1 << 16), ..FRAME };
        assert!(differences(&FRAME, &stepped).is_empty());
        let df = IretFrame { rflags: FRAME.rflags | (1 << 10), ..FRAME };
        assert_eq!(
            differences(&FRAME, &df),
            [FieldDifference { field: "RFLAGS", expected: 0x244, actual: 0x644 }]
        );
        let moved = IretFrame { rip: 0x1001, rsp: 0x8008, ..FRAME };
        let fields: Vec<_> = differences(&FRAME, &moved).iter().map(|d| d.field).collect();
        assert_eq!(fields, ["RIP", "RSP"]);
    }
}
