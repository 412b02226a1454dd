//! Per-CPU data through GS, with `swapgs`, as Linux has it on x86-64.
//!
//! In the kernel, MSR_GS_BASE points at [`PerCpu`] (this guest's one CPU) and
//! MSR_KERNEL_GS_BASE holds the user's GS base, a small area in user memory; every transition
//! between the rings executes `swapgs`, which exchanges the two. So kernel code that runs on
//! the right side of every `swapgs` finds `gs:[0]` == [`KERNEL_MAGIC`], and user code finds
//! [`USER_MAGIC`] (invariant 11, GS integrity; the user workload checks its side).
//!
//! The system-call entry needs the per-CPU area before it has a stack: it saves the user's RSP
//! in `rsp_scratch` and loads the thread stack from `top_of_stack`, both through GS. The
//! espfix64 return path writes its frame at `espfix_waddr` and returns from `espfix_stack`, an
//! alias of the same memory ([`crate::paging`]).
//!
//! Segment reloads clear the GS base, so [`init`] runs after `gdt::init`; and the host's
//! snapshot does not hold MSR_KERNEL_GS_BASE, so the user workload calls [`init`] again before
//! it enters ring 3 (a previous run may have stopped in ring 3, with the bases swapped).

use core::arch::asm;
use core::mem::offset_of;
use core::ptr::{addr_of, addr_of_mut};

use crate::cpu::{self, msr};
use crate::{invariant, paging, tss};

/// `PerCpu::magic`: "KERNELGS" in memory.
pub const KERNEL_MAGIC: u64 = u64::from_le_bytes(*b"KERNELGS");
/// The first qword of the user's GS area: "USER_GS!" in memory.
pub const USER_MAGIC: u64 = u64::from_le_bytes(*b"USER_GS!");

/// The per-CPU area, like Linux's `cpu_tss`/`irq_stack_union` fields the entry code reads.
#[repr(C)]
pub struct PerCpu {
    /// [`KERNEL_MAGIC`]: what the kernel's GS integrity checks read at `gs:[0]`.
    magic: u64,
    /// The user's RSP while `entry_SYSCALL_64` builds its frame (Linux's `rsp_scratch`).
    rsp_scratch: u64,
    /// The thread stack's top, TSS.RSP0 (Linux's `cpu_current_top_of_stack`).
    top_of_stack: u64,
    /// Where espfix64 copies the iret frame (Linux's `espfix_waddr`): the espfix page through
    /// the identity map.
    espfix_waddr: u64,
    /// The same qword through the espfix aliases, with bits [31:16] clear (Linux's
    /// `espfix_stack`): ORed with the user's RSP[31:16], it is the RSP the IRETQ runs on.
    espfix_stack: u64,
}

/// Offsets the assembly uses as `gs:[...]` (pinned by the assertions below).
pub const RSP_SCRATCH: usize = 8;
pub const TOP_OF_STACK: usize = 16;
pub const ESPFIX_WADDR: usize = 24;
pub const ESPFIX_STACK: usize = 32;

const _: () = assert!(offset_of!(PerCpu, magic) == 0);
const _: () = assert!(offset_of!(PerCpu, rsp_scratch) == RSP_SCRATCH);
const _: () = assert!(offset_of!(PerCpu, top_of_stack) == TOP_OF_STACK);
const _: () = assert!(offset_of!(PerCpu, espfix_waddr) == ESPFIX_WADDR);
const _: () = assert!(offset_of!(PerCpu, espfix_stack) == ESPFIX_STACK);

/// Qwords of the espfix64 page. Its stack is the first [`ESPFIX_STACK_QWORDS`]: the iret frame
/// and the saved RAX at their top, and room below them for the frame of a fault on the IRETQ
/// from there (a bad IRET, see `exceptions`).
const ESPFIX_QWORDS: usize = 512;
const ESPFIX_STACK_QWORDS: usize = 64;
/// The qwords the espfix64 path writes: RAX, then the iret frame (RIP, CS, RFLAGS, RSP, SS).
pub const ESPFIX_FRAME_QWORDS: usize = 6;
/// Where in the espfix page the path writes them.
const ESPFIX_FRAME_OFFSET: u64 = ((ESPFIX_STACK_QWORDS - ESPFIX_FRAME_QWORDS) * 8) as u64;

/// One page, mapped by [`crate::paging`] at every 64 KiB of the espfix aliases, and between
/// guard pages like every stack ([`crate::stacks`]).
#[repr(C, align(4096))]
struct EspfixPage([u64; ESPFIX_QWORDS]);

static mut PERCPU: PerCpu = PerCpu {
    magic: KERNEL_MAGIC,
    rsp_scratch: 0,
    top_of_stack: 0,
    espfix_waddr: 0,
    espfix_stack: 0,
};
#[unsafe(no_mangle)]
#[unsafe(link_section = ".stack.espfix")]
static mut ESPFIX_STACK_AREA: EspfixPage = EspfixPage([0; ESPFIX_QWORDS]);

/// The physical (identity-mapped) address of the espfix page, for the aliases.
pub fn espfix_page() -> u64 {
    addr_of!(ESPFIX_STACK_AREA) as u64
}

/// The espfix64 stack's page.
pub fn espfix_range() -> core::ops::Range<u64> {
    espfix_page()..espfix_page() + size_of::<EspfixPage>() as u64
}
/// The user's GS area, in user memory: ring 3 reads its magic through GS.
#[unsafe(link_section = ".data.user.gs")]
static mut USER_GS_AREA: [u64; 2] = [USER_MAGIC, 0];

/// Fills in the per-CPU area and sets both GS bases for kernel mode: MSR_GS_BASE = the
/// per-CPU area, MSR_KERNEL_GS_BASE = the user's area.
pub fn init() {
    let percpu = addr_of_mut!(PERCPU);
    // SAFETY: plain stores to the per-CPU static; the entry code reads these fields only in
    // user mode or on the way to and from it, never while this runs.
    unsafe {
        (*percpu).top_of_stack = tss::thread_stack_top();
        (*percpu).espfix_waddr = espfix_page() + ESPFIX_FRAME_OFFSET;
        (*percpu).espfix_stack = paging::ESPFIX_BASE + ESPFIX_FRAME_OFFSET;
        cpu::wrmsr(msr::GS_BASE, percpu as u64);
        cpu::wrmsr(msr::KERNEL_GS_BASE, addr_of!(USER_GS_AREA) as u64);
    }
}

/// `gs:[0]`: [`KERNEL_MAGIC`] when the kernel runs on its own GS base.
#[inline(always)]
fn gs_magic() -> u64 {
    let magic: u64;
    // SAFETY: a load through GS; both GS bases point at mapped areas at least a qword long.
    unsafe { asm!("mov {}, gs:[0]", out(reg) magic, options(readonly, nostack, preserves_flags)) };
    magic
}

/// Invariant 11 at a kernel entry point named `place`: the kernel must run on its own GS base.
#[inline(always)]
#[track_caller]
pub fn check_kernel_gs(place: &str) {
    let magic = gs_magic();
    if magic != KERNEL_MAGIC {
        wrong_gs(place, magic);
    }
}

#[cold]
#[inline(never)]
#[track_caller]
fn wrong_gs(place: &str, magic: u64) -> ! {
    let base = cpu::rdmsr(msr::GS_BASE);
    let what = if magic == USER_MAGIC { "the user's" } else { "an unknown" };
    invariant::violated(
        11,
        format_args!(
            "{place} runs on {what} GS base {base:#x} (gs:[0] = {magic:#x}), not the kernel's: a \
             swapgs is missing or doubled"
        ),
    )
}
