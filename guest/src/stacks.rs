//! Every stack the guest runs on, each between unmapped guard pages: link.ld puts them in a
//! 2 MiB page of their own (`.stacks`), and [`crate::paging`] maps that page page by page,
//! leaving out every page that is not a stack's. A stack that runs over either end (a buggy
//! entry running its repeat path on the espfix64 stack, say) faults at once, before it writes
//! into another stack or into the panic report; the fault's handler then faults too, on the
//! same stack, and the double fault, on IST2, reports which guard was hit.

use core::ops::Range;
use core::ptr::addr_of;

use crate::{percpu, tss};

unsafe extern "C" {
    /// The stacks link.ld places from assembly: only their addresses are used.
    static boot_stack_bottom: u8;
    static boot_stack_top: u8;
    static workload_fail_stack_bottom: u8;
    static workload_fail_stack_top: u8;
}

/// Every stack by name.
pub fn all() -> [(&'static str, Range<u64>); 7] {
    let [nmi, double_fault, debug, thread] = tss::stack_ranges();
    let symbols = |bottom: *const u8, top: *const u8| bottom as u64..top as u64;
    [
        nmi,
        double_fault,
        debug,
        thread,
        ("espfix64", percpu::espfix_range()),
        ("boot", symbols(addr_of!(boot_stack_bottom), addr_of!(boot_stack_top))),
        (
            "workload-failure",
            symbols(addr_of!(workload_fail_stack_bottom), addr_of!(workload_fail_stack_top)),
        ),
    ]
}

/// Whether `page` (an address in it) belongs to a stack.
pub fn is_stack_page(page: u64) -> bool {
    let page = page & !0xfff;
    all().iter().any(|(_, range)| range.start <= page && page < range.end)
}

/// The stack whose guard page `rsp` points into (or just above: a push that faults leaves RSP
/// unchanged), if one does, and whether the guard is below the stack (an overflow) or above it
/// (a write past its top).
pub fn guard_at(rsp: u64) -> Option<(&'static str, &'static str)> {
    const PAGE: u64 = 4096;
    /// How far above a stack's bottom a faulting push or call can leave RSP.
    const SLACK: u64 = 64;
    all().into_iter().find_map(|(name, range)| {
        if (range.start.saturating_sub(PAGE)..range.start + SLACK).contains(&rsp) {
            Some((name, "below"))
        } else if (range.end..range.end + PAGE).contains(&rsp) {
            Some((name, "above"))
        } else {
            None
        }
    })
}
