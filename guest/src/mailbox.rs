//! The guest → host channel: the [`Mailbox`] in guest memory (counters and the panic record) and
//! the READY / DONE / PANIC reports on [`port::REPORT`].
//!
//! The host reads the mailbox at exits the compiler cannot see, so every access is volatile and
//! goes through raw pointers (never a reference to the `static mut`).

use core::arch::asm;
use core::mem::{offset_of, size_of};
use core::ptr::{addr_of_mut, read_volatile, write_volatile};

use nmifuzz_abi::{ABI_VERSION, Counters, MAILBOX_MAGIC, Mailbox, PanicRecord, Report, port};

use crate::scribble::Region;

/// The mailbox, found by the host through the symbol `nmifuzz_abi::MAILBOX_SYMBOL`.
#[unsafe(no_mangle)]
// SAFETY: `Mailbox` holds only integers and arrays of integers, for which all-zero bytes are a
// valid value.
static mut NMIFUZZ_MAILBOX: Mailbox = unsafe { core::mem::zeroed() };

/// A 64-bit field of [`Counters`].
#[derive(Clone, Copy)]
pub enum Counter {
    /// `workload_iterations`.
    WorkloadIterations,
    /// `do_nmi_calls`.
    DoNmiCalls,
    /// `nmi_iterations`.
    NmiIterations,
    /// `page_faults`.
    PageFaults,
    /// `invalid_opcodes`.
    InvalidOpcodes,
    /// `breakpoints`.
    Breakpoints,
    /// `pages_scribbled`.
    PagesScribbled,
    /// `checksum` (set, not counted).
    Checksum,
    /// `syscalls`.
    Syscalls,
    /// `user_points` (set from the user workload's own count).
    UserPoints,
    /// `espfix_returns` (counted by the espfix64 assembly itself, see [`offset`]).
    EspfixReturns,
    /// `bad_iret_fixups`.
    BadIretFixups,
}

/// Where `counter` lives. Inlined, so a constant `counter` costs no instructions.
#[inline(always)]
fn slot(counter: Counter) -> *mut u64 {
    let mailbox = addr_of_mut!(NMIFUZZ_MAILBOX);
    // SAFETY: field projections of the mailbox static; no reference is created.
    unsafe {
        let counters = addr_of_mut!((*mailbox).counters);
        match counter {
            Counter::WorkloadIterations => addr_of_mut!((*counters).workload_iterations),
            Counter::DoNmiCalls => addr_of_mut!((*counters).do_nmi_calls),
            Counter::NmiIterations => addr_of_mut!((*counters).nmi_iterations),
            Counter::PageFaults => addr_of_mut!((*counters).page_faults),
            Counter::InvalidOpcodes => addr_of_mut!((*counters).invalid_opcodes),
            Counter::Breakpoints => addr_of_mut!((*counters).breakpoints),
            Counter::PagesScribbled => addr_of_mut!((*counters).pages_scribbled),
            Counter::Checksum => addr_of_mut!((*counters).checksum),
            Counter::Syscalls => addr_of_mut!((*counters).syscalls),
            Counter::UserPoints => addr_of_mut!((*counters).user_points),
            Counter::EspfixReturns => addr_of_mut!((*counters).espfix_returns),
            Counter::BadIretFixups => addr_of_mut!((*counters).bad_iret_fixups),
        }
    }
}

/// The byte offset of `counter` in `NMIFUZZ_MAILBOX`, for assembly that counts with one `inc`
/// (the espfix64 path runs with the user's GS and no free register to spare).
pub const fn offset(counter: Counter) -> usize {
    let counters = offset_of!(Mailbox, counters);
    counters
        + match counter {
            Counter::EspfixReturns => offset_of!(Counters, espfix_returns),
            _ => panic!("only the espfix64 path counts from assembly"),
        }
}

/// Adds one to `counter` and returns the new value.
///
/// Not atomic against an NMI that lands between the load and the store: each counter is only
/// ever written from one kind of context (the workload, `do_nmi`, or one exception handler), so
/// that can only happen to a nested `do_nmi`, which is itself a bug the fuzzer reports.
#[inline(always)]
pub fn increment(counter: Counter) -> u64 {
    let slot = slot(counter);
    // SAFETY: `slot` points into the mailbox static, which is only accessed through volatile
    // raw-pointer accesses like this one.
    unsafe {
        let value = read_volatile(slot).wrapping_add(1);
        write_volatile(slot, value);
        value
    }
}

/// Sets `counter` to `value`.
#[inline(always)]
pub fn set(counter: Counter, value: u64) {
    // SAFETY: as in `increment`.
    unsafe { write_volatile(slot(counter), value) };
}

/// Stamps the magic and version and zeroes the counters: the state the host snapshots at READY.
pub fn init() {
    let mailbox = addr_of_mut!(NMIFUZZ_MAILBOX);
    // SAFETY: field projections of the mailbox static, written with volatile accesses only.
    unsafe {
        write_volatile(addr_of_mut!((*mailbox).magic), MAILBOX_MAGIC);
        write_volatile(addr_of_mut!((*mailbox).version), ABI_VERSION);
        write_volatile(addr_of_mut!((*mailbox).counters), Counters::default());
    }
}

/// Stores the panic record for the PANIC report.
pub fn record_panic(record: &PanicRecord) {
    // SAFETY: a field projection of the mailbox static, written with a volatile access.
    unsafe { write_volatile(addr_of_mut!(NMIFUZZ_MAILBOX.panic), *record) };
}

/// Sends `report` to the host.
fn report(report: Report) {
    // SAFETY: `out` exits to the host. No `nomem`: at this exit the host reads the mailbox and,
    // at READY, writes the script, so the compiler must not keep memory values across it.
    unsafe {
        asm!(
            "out dx, eax",
            in("dx") port::REPORT,
            in("eax") report as u32,
            options(nostack, preserves_flags)
        );
    }
}

/// Reports READY. The host snapshots here; every run resumes right after this call, with the
/// script it has just written.
pub fn ready() {
    report(Report::Ready);
}

/// Reports DONE (the counters are already in the mailbox) and halts.
pub fn done() -> ! {
    report(Report::Done);
    halt_forever()
}

/// Reports PANIC (the panic record is already in the mailbox) and halts.
pub fn panicked() -> ! {
    report(Report::Panic);
    halt_forever()
}

/// Halts for good. An NMI still wakes `hlt`, runs its handler and comes back here, so the host
/// can probe the NMI entry after DONE.
fn halt_forever() -> ! {
    loop {
        // SAFETY: `hlt` only waits for the next interrupt or NMI.
        unsafe { asm!("hlt", options(nomem, nostack, preserves_flags)) };
    }
}

/// The whole mailbox, for the chaos `scribble` action.
pub fn scribble_region() -> Region {
    Region { base: addr_of_mut!(NMIFUZZ_MAILBOX).cast(), len: size_of::<Mailbox>() }
}
