//! The user-mode half of the guest (issue 9): a ring-3 workload and the kernel paths that
//! carry it, modelled on Linux x86-64 after its 2015 fixes (design.md section 3b).
//!
//! - `program`: the workload itself, ring-3 assembly in `.text.user` (the user page, link.ld):
//!   known values in its registers, checked after every point and every return to ring 3;
//!   points (`out` to `port::USER`); system calls with an ordinary RSP and with RSP on the NMI
//!   stack (CVE-2015-3291); a return through espfix64; a return onto the alternate CS; and a
//!   return that faults (CVE-2015-5157's bad IRET).
//! - `entry`: Linux's `entry_SYSCALL_64` with its SYSRET and IRET exits, the common
//!   return-to-user IRET path with espfix64 (`native_irq_return_ldt`), and the kernel's way in
//!   and out of ring 3 for the workload, in `.text.entry_user` (outside the NMI code range).
//! - `syscall`: the system-call table (`do_syscall`).
//! - `traps`: exceptions from ring 3: the `ud2` system call, the bad-IRET fixup and its
//!   "signal", and the panics for everything else.
//!
//! **The system-call instruction.** On kvm_pvm, SYSCALL from CPL3 stays at CPL3
//! (reference/kvm-on-this-host.md §9), so by default the workload's system-call instruction is
//! `ud2`: its #UD arrives at CPL0 on TSS.RSP0, and the exception entry turns it into exactly
//! what SYSCALL would have done (RCX = the user RIP after it, R11 = the user RFLAGS, RFLAGS
//! masked by SFMASK, CS = 0x08, SS = 0x10, RSP and GS still the user's) by rewriting the #UD
//! frame and IRETQ-ing to `entry_SYSCALL_64`. From there on everything is Linux's path, gaps
//! included: the first instructions of the entry and the last of the SYSRET exit run in ring 0
//! on the user's RSP with DF clear, the situation CVE-2015-3291 is about. With
//! `option::NATIVE_SYSCALL` the instruction is `syscall` (for ordinary KVM).
//!
//! **The 16-bit stack segment** `set_ss16` returns with is the LDT's (`option::LDT_SS16`, as in
//! Linux, for ordinary KVM) or, on kvm_pvm, where an IRET to an LDT SS raises #GP, the GDT's.

mod entry;
pub(crate) use entry::to_espfix_if_16bit_ss;
mod program;
mod syscall;
mod traps;

use core::ptr::{addr_of, addr_of_mut, write_volatile};
use core::sync::atomic::{AtomicU64, Ordering};

use nmifuzz_abi::{USER_FLAG_SLOTS, option};

use crate::cpu::{self, msr};
use crate::percpu;
use crate::regs::InterruptFrame;
use crate::script::UserFlags;
use crate::{gdt, invariant};

/// EFER.SCE: SYSCALL/SYSRET enabled.
const EFER_SCE: u64 = 1 << 0;
/// Iterations when `workload_arg` is 0.
const DEFAULT_ITERATIONS: u32 = 8;

/// The workload's variables, in user memory: set by the kernel before ring 3 starts, counted
/// by ring 3, read back by the kernel at `exit`.
#[repr(C)]
struct UserVars {
    /// Iterations still to run.
    remaining: u64,
    /// Non-zero: the system-call instruction is `syscall`, else `ud2`.
    native_syscall: u64,
    /// The user's RSP while it makes a system call with RSP on the NMI stack.
    saved_rsp: u64,
    /// Points passed.
    points: u64,
    /// Iterations completed.
    iterations: u64,
    /// A far pointer (m16:32: offset, then selector) to `user_back64`, with which the
    /// compatibility-mode code after `set_ss16` jumps back to 64-bit mode.
    back64: u64,
    /// How many of `flag_slots` the workload cycles through (at least one).
    flag_count: u64,
    /// The next of them.
    flag_index: u64,
    /// The RFLAGS the workload sets before each system call and ring-3 point, in turn: its own
    /// (IOPL 3) with the script's user flags.
    flag_slots: [u64; USER_FLAG_SLOTS],
    /// The RFLAGS it set last: what every return to it must give back.
    flags_expected: u64,
}

#[unsafe(no_mangle)]
#[unsafe(link_section = ".data.user.vars")]
static mut USER_VARS: UserVars = UserVars {
    remaining: 0,
    native_syscall: 0,
    saved_rsp: 0,
    points: 0,
    iterations: 0,
    back64: 0,
    flag_count: 0,
    flag_index: 0,
    flag_slots: [0; USER_FLAG_SLOTS],
    flags_expected: 0,
};

unsafe extern "C" {
    /// Linker markers around the user's code (link.ld). Code, not data: only addresses used.
    #[link_name = "__user_text_start"]
    static USER_TEXT_START: u8;
    #[link_name = "__user_text_end"]
    static USER_TEXT_END: u8;
    /// Where the compatibility-mode code after `set_ss16` returns to 64-bit mode.
    #[link_name = "user_back64"]
    static USER_BACK64: u8;
}

/// Sets the system-call MSRs, for ordinary KVM, where the workload's `syscall` (with
/// `option::NATIVE_SYSCALL`) enters CPL0 at LSTAR: EFER.SCE, STAR (kernel CS 0x08, SYSRET base
/// 0x13), LSTAR = `entry_SYSCALL_64`, SFMASK as Linux's. kvm_pvm accepts them too, but its
/// SYSCALL stays at CPL3, so it is never used there.
pub fn init() {
    let star =
        u64::from(gdt::SYSRET_BASE_SELECTOR) << 48 | u64::from(gdt::KERNEL_CODE_SELECTOR) << 32;
    // SAFETY: the values describe this guest's GDT and entry; nothing executes SYSCALL or
    // SYSRET before they are set.
    unsafe {
        cpu::wrmsr(msr::STAR, star);
        cpu::wrmsr(msr::LSTAR, addr_of!(entry::ENTRY_SYSCALL_64) as u64);
        cpu::wrmsr(msr::SFMASK, traps::SFMASK);
        cpu::wrmsr(msr::EFER, cpu::rdmsr(msr::EFER) | EFER_SCE);
    }
}

/// Runs the user workload for `iterations` (0: the default) under the script's `options`, with
/// its `flags` set before its system calls and points; returns when ring 3 made its `exit`
/// system call.
pub fn run(iterations: u32, options: u32, flags: &UserFlags) {
    let iterations = if iterations == 0 { DEFAULT_ITERATIONS } else { iterations };
    let vars = addr_of_mut!(USER_VARS);
    // SAFETY: plain stores to the user's variables; ring 3 does not run yet.
    unsafe {
        write_volatile(addr_of_mut!((*vars).remaining), u64::from(iterations));
        write_volatile(
            addr_of_mut!((*vars).native_syscall),
            u64::from(options & option::NATIVE_SYSCALL != 0),
        );
        // The user page lies below 4 GiB: the offset fits the far pointer's 32 bits.
        let back64 = addr_of!(USER_BACK64) as u64 | u64::from(gdt::USER_CODE_SELECTOR) << 32;
        write_volatile(addr_of_mut!((*vars).back64), back64);
        let count = flags.count.max(1);
        write_volatile(addr_of_mut!((*vars).flag_count), count as u64);
        write_volatile(addr_of_mut!((*vars).flag_index), 0);
        for i in 0..count {
            let user = if i < flags.count { flags.flags[i] } else { 0 };
            write_volatile(
                addr_of_mut!((*vars).flag_slots[i]),
                entry::USER_RFLAGS | u64::from(user),
            );
        }
    }
    let ss16 = if options & option::LDT_SS16 != 0 {
        gdt::USER_LDT_DATA16_SELECTOR
    } else {
        gdt::USER_DATA16_SELECTOR
    };
    SS16.store(u64::from(ss16), Ordering::Relaxed);
    // The host's snapshot restores MSR_GS_BASE (with the segment registers) but not
    // MSR_KERNEL_GS_BASE: a run that ended in ring 3 would leave them swapped for this one.
    percpu::init();
    // What user_mode_enter's iret frame holds.
    USER_CS.store(u64::from(gdt::USER_CODE_SELECTOR), Ordering::Relaxed);
    USER_SS.store(u64::from(gdt::USER_DATA_SELECTOR), Ordering::Relaxed);
    entry::enter_user_mode();
}

/// The 16-bit stack segment `set_ss16` returns with in this run: the LDT's where the host lets
/// an IRET load it (`option::LDT_SS16`), else the GDT's.
static SS16: AtomicU64 = AtomicU64::new(0);

/// See [`SS16`].
fn ss16_selector() -> u64 {
    SS16.load(Ordering::Relaxed)
}

/// Whether `rip` is in the user's code.
pub fn is_user_rip(rip: u64) -> bool {
    (addr_of!(USER_TEXT_START) as u64..addr_of!(USER_TEXT_END) as u64).contains(&rip)
}

/// Whether a kernel-mode `rip` is in one of the two places where ring-0 code runs on the
/// user's RSP: the start of `entry_SYSCALL_64` and the end of the SYSRET exit. An NMI there
/// arrives in kernel mode with an RSP the user chose, possibly on the NMI stack. Out of line,
/// as [`check_nmi_from_user`].
#[inline(never)]
pub fn in_syscall_gap(rip: u64) -> bool {
    entry::gaps().iter().any(|gap| gap.contains(&rip))
}

/// The CS and SS the kernel last returned to ring 3 with: what every entry from ring 3 must
/// find in its frame. Ring 3 cannot check its own selectors on kvm_pvm, where `mov rax, cs`
/// in ring 3 reads the host's user selectors (0x33, 0x2b) whatever the guest loaded; the
/// frames the CPU pushes on entry to ring 0 hold the guest's.
static USER_CS: AtomicU64 = AtomicU64::new(0);
static USER_SS: AtomicU64 = AtomicU64::new(0);

/// `do_nmi`'s checks for an NMI from ring 3: the entry switched to the kernel's GS (invariant
/// 11), and ring 3 ran on the segments the kernel returned it with (invariant 10). Out of line
/// and outside the NMI code range, so that `do_nmi`'s kernel-mode path and the fuzzer's table
/// of NMI code (`vmm::engine::table`) grow as little as possible.
#[inline(never)]
pub fn check_nmi_from_user(frame: &InterruptFrame) {
    percpu::check_kernel_gs("do_nmi (for an NMI from ring 3)");
    check_entry_from_user(frame, "an NMI from ring 3");
}

/// Invariant 10 at an entry from ring 3 (an exception, an NMI): ring 3 ran on the CS and SS
/// the kernel last returned it with.
#[track_caller]
pub fn check_entry_from_user(frame: &InterruptFrame, path: &str) {
    let (mut cs, ss) = (USER_CS.load(Ordering::Relaxed), USER_SS.load(Ordering::Relaxed));
    // The compatibility-mode code after `set_ss16` jumps back to 64-bit mode by itself.
    let back64 = addr_of!(USER_BACK64) as u64;
    if cs == u64::from(gdt::USER_CODE32_SELECTOR) && is_user_rip(frame.rip) && frame.rip >= back64 {
        cs = u64::from(gdt::USER_CODE_SELECTOR);
    }
    if frame.cs != cs || frame.ss != ss {
        invariant::violated(
            10,
            format_args!(
                "{path} at RIP {:#x} finds CS {:#x}, SS {:#x}; the kernel returned to ring 3 \
                 with CS {cs:#x}, SS {ss:#x}",
                frame.rip, frame.cs, frame.ss
            ),
        );
    }
}

/// Invariant 10 (privilege integrity) for a frame about to be IRETed or SYSRETed to ring 3 by
/// `path`: user CS, user SS and a user RIP. Records the segments for
/// [`check_entry_from_user`]. Out of line, as [`check_nmi_from_user`].
#[inline(never)]
#[track_caller]
pub fn check_return_to_user(frame: &InterruptFrame, path: &str) {
    USER_CS.store(frame.cs, Ordering::Relaxed);
    USER_SS.store(frame.ss, Ordering::Relaxed);
    let cs = [gdt::USER_CODE_SELECTOR, gdt::USER_ALT_CODE_SELECTOR, gdt::USER_CODE32_SELECTOR]
        .contains(&(frame.cs as u16))
        && frame.cs <= 0xffff;
    let ss = frame.ss == u64::from(gdt::USER_DATA_SELECTOR) || frame.ss == ss16_selector();
    if !(cs && ss && is_user_rip(frame.rip)) {
        invariant::violated(
            10,
            format_args!(
                "{path} returns to ring 3 with RIP {:#x}, CS {:#x}, SS {:#x}: not a user RIP with \
                 user segments",
                frame.rip, frame.cs, frame.ss
            ),
        );
    }
}
