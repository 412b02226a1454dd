//! The control and debug registers the NMI path saves, restores and checks: CR2 (the last
//! page-fault address), CR3 (the page-table root) and DR7 (breakpoint enables).
//!
//! All of them are read and written with `mov` to or from a general register, which the
//! kvm_pvm host emulates at ring 0.

use core::arch::asm;

/// CR2: the linear address of the last page fault (SDM Vol. 3A §2.5).
#[inline(always)]
pub fn read_cr2() -> u64 {
    let value: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

/// Sets CR2, as Linux's `do_nmi` does when the handler's own page faults changed it.
#[inline(always)]
pub fn write_cr2(value: u64) {
    // SAFETY: CR2 is only information for the #PF handler; writing it changes nothing else.
    unsafe { asm!("mov cr2, {}", in(reg) value, options(nomem, nostack, preserves_flags)) };
}

/// DR7: which hardware breakpoints are enabled (SDM Vol. 3B §18.2.4).
#[inline(always)]
pub fn read_dr7() -> u64 {
    let value: u64;
    // SAFETY: reading DR7 has no side effects.
    unsafe { asm!("mov {}, dr7", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

/// Sets DR7.
///
/// # Safety
///
/// The breakpoints `value` enables must have handlers that expect them: the guest's #DB is a
/// panic, so only a value the guest had before is safe.
#[inline(always)]
pub unsafe fn write_dr7(value: u64) {
    // SAFETY: the caller restores a value DR7 held before.
    unsafe { asm!("mov dr7, {}", in(reg) value, options(nomem, nostack, preserves_flags)) };
}

/// CR3: the physical address of the top-level page table.
pub fn read_cr3() -> u64 {
    let value: u64;
    // SAFETY: reading CR3 has no side effects.
    unsafe { asm!("mov {}, cr3", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

/// Loads CR3, which also flushes every non-global TLB entry (SDM Vol. 3A §4.10.4.1).
///
/// # Safety
///
/// `value` must point at page tables that map everything the guest uses at the addresses it
/// uses them.
pub unsafe fn write_cr3(value: u64) {
    // SAFETY: the caller vouches for the tables. No `nomem`: the compiler must not move memory
    // accesses across a change of the mapping.
    unsafe { asm!("mov cr3, {}", in(reg) value, options(nostack, preserves_flags)) };
}
