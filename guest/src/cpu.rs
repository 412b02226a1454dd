//! The control and debug registers the NMI path saves, restores and checks: CR2 (the last
//! page-fault address), CR3 (the page-table root) and DR7 (breakpoint enables); and the MSRs
//! of the system-call and GS machinery, set at boot and at the start of the user workload.
//!
//! All of them are read and written with `mov` to or from a general register, or `wrmsr`,
//! which the kvm_pvm host emulates at ring 0.

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

/// Model-specific registers the guest writes (SDM Vol. 4 Table 2-2, AMD APM Vol. 2 §6.1.1).
pub mod msr {
    /// EFER; bit 0 (SCE) enables SYSCALL/SYSRET.
    pub const EFER: u32 = 0xc000_0080;
    /// STAR: [47:32] the kernel CS that SYSCALL loads (SS = that + 8); [63:48] the base SYSRET
    /// uses (SS = base + 8, 64-bit CS = base + 16, both with RPL 3).
    pub const STAR: u32 = 0xc000_0081;
    /// LSTAR: the 64-bit SYSCALL entry point.
    pub const LSTAR: u32 = 0xc000_0082;
    /// SFMASK: RFLAGS bits SYSCALL clears.
    pub const SFMASK: u32 = 0xc000_0084;
    /// The GS base in use (also the hidden part of the GS register).
    pub const GS_BASE: u32 = 0xc000_0101;
    /// The GS base `swapgs` exchanges with [`GS_BASE`].
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
}

/// Reads model-specific register `msr`.
pub fn rdmsr(msr: u32) -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: `rdmsr` of one of the architectural MSRs in [`msr`] has no side effects.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") low, out("edx") high, options(nomem, nostack))
    };
    u64::from(high) << 32 | u64::from(low)
}

/// Writes model-specific register `msr`.
///
/// # Safety
///
/// `value` must be what the rest of the guest expects in `msr`: the system-call MSRs point at
/// the guest's entry, the GS bases at its per-CPU areas.
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: the caller vouches for the value. No `nomem`: an MSR can change how memory is
    // addressed (the GS base).
    unsafe {
        asm!(
            "wrmsr",
            in("ecx") msr,
            in("eax") value as u32,
            in("edx") (value >> 32) as u32,
            options(nostack, preserves_flags)
        )
    };
}
