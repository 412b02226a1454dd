//! Signals: the handler that ends a run on a fault nobody expected (status SIGNAL), and
//! BAD_SIGRETURN, whose fault is expected.
//!
//! BAD_SIGRETURN calls `rt_sigreturn` on a frame of its own whose CS is unusable. The kernel
//! loads the frame and returns to ring 3 by IRET, which faults (#GP) on that CS; the kernel's
//! `fixup_bad_iret` turns this into a #GP from ring 3 at the frame's RIP, for which the agent
//! gets SIGSEGV (SI_KERNEL). The handler recognises it (SIGSEGV, SI_KERNEL, at the frame's RIP,
//! while one is expected), corrects CS and SS in the context it was given and returns (through
//! the restorer, `rt_sigreturn` again), which resumes the block at the frame's RIP with the
//! frame's registers. It leaves every other register as the kernel reported it, RSP included
//! (the frame's RSP is the block's own stack), so that the block's checks see what the kernel
//! did with them.
//!
//! The handlers run on an alternate stack, so that they work whatever RSP the agent had.

use core::mem::{offset_of, size_of};
use core::ptr;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};

use nmifuzz_abi::agent::agent_status;

use crate::checks::{self, Area, RFLAGS, Regs, checked_asm};
use crate::host;
use crate::ops::Failure;
use crate::sys::{self, Errno, nr};

const SIGILL: u64 = 4;
const SIGTRAP: u64 = 5;
const SIGBUS: u64 = 7;
const SIGFPE: u64 = 8;
const SIGSEGV: u64 = 11;
const SA_SIGINFO: u64 = 0x4;
const SA_RESTORER: u64 = 0x0400_0000;
const SA_ONSTACK: u64 = 0x0800_0000;
/// `si_code` of a signal the kernel raised itself (a #GP, here).
const SI_KERNEL: i32 = 0x80;
const UC_SIGCONTEXT_SS: u64 = 0x2;
const UC_STRICT_RESTORE_SS: u64 = 0x4;
/// Linux's ring-3 64-bit code and data selectors (`__USER_CS`, `__USER_DS`).
const USER_CS: u16 = 0x33;
const USER_DS: u16 = 0x2b;
/// A CS that IRET refuses: index 0x1fff is far beyond the end of Linux's 16-entry GDT.
const BAD_CS: u16 = 0xfffb;

/// Linux's `stack_t`.
#[repr(C)]
struct StackT {
    sp: u64,
    flags: u32,
    _pad: u32,
    size: u64,
}

/// Linux's x86-64 `struct sigcontext` (asm/sigcontext.h).
#[repr(C)]
struct SigContext {
    r8_to_r15: [u64; 8],
    rdi: u64,
    rsi: u64,
    rbp: u64,
    rbx: u64,
    rdx: u64,
    rax: u64,
    rcx: u64,
    rsp: u64,
    rip: u64,
    eflags: u64,
    cs: u16,
    gs: u16,
    fs: u16,
    ss: u16,
    /// `err`, `trapno`, `oldmask`, `cr2`, `fpstate` (0: no FPU state) and `reserved1[8]`.
    rest: [u64; 13],
}

/// Linux's `struct ucontext` (asm-generic/ucontext.h).
#[repr(C)]
struct UContext {
    flags: u64,
    link: u64,
    stack: StackT,
    mcontext: SigContext,
    sigmask: u64,
}

/// Linux's x86-64 `struct rt_sigframe`: `rt_sigreturn` reads it at RSP - 8, so `uc` at RSP.
#[repr(C)]
struct RtSigFrame {
    pretcode: u64,
    uc: UContext,
    info: [u64; 16],
}

const _: () = assert!(size_of::<SigContext>() == 256 && size_of::<UContext>() == 304);
const _: () = assert!(size_of::<RtSigFrame>() == 440);

/// The start of Linux's `siginfo_t`, as far as `si_addr`.
#[repr(C)]
struct SigInfo {
    signo: i32,
    errno: i32,
    code: i32,
    _pad: i32,
    addr: u64,
}

/// Linux's `struct sigaction` as `rt_sigaction` takes it.
#[repr(C)]
struct KernelSigaction {
    handler: u64,
    flags: u64,
    restorer: u64,
    mask: u64,
}

const ALT_STACK_SIZE: usize = 64 * 1024;
/// The handlers' stack (signal frames with XSAVE state take a few KiB).
static ALT_STACK: Area<[u8; ALT_STACK_SIZE]> = Area::new([0; ALT_STACK_SIZE]);
/// BAD_SIGRETURN's frame ([`bad_frame`]). Its RIP and RSP are written by the block itself.
// SAFETY: every field of an `RtSigFrame` is an integer, for which zero is a valid value.
static FRAME: Area<RtSigFrame> = Area::new(unsafe { core::mem::zeroed() });

/// Whether a BAD_SIGRETURN's SIGSEGV is due.
static EXPECTING: AtomicBool = AtomicBool::new(false);
/// Whether the handler took it.
static CAUGHT: AtomicBool = AtomicBool::new(false);
/// The operation under way, for the report of an unexpected signal.
static CURRENT_OP: AtomicU64 = AtomicU64::new(crate::NO_OP);

/// Records that operation `op` is under way.
pub fn set_current_op(op: u64) {
    CURRENT_OP.store(op, SeqCst);
}

fn alt_stack() -> StackT {
    StackT { sp: ALT_STACK.get() as u64, flags: 0, _pad: 0, size: ALT_STACK_SIZE as u64 }
}

/// Installs the alternate stack and the handler for every signal a fault raises.
pub fn install() -> Result<(), Errno> {
    let stack = alt_stack();
    // SAFETY: the kernel only reads `stack`; the stack it describes is a static that nothing
    // but the kernel's signal delivery uses.
    unsafe { sys::syscall(nr::SIGALTSTACK, [&raw const stack as u64, 0, 0, 0, 0, 0]) }?;
    let action = KernelSigaction {
        handler: on_signal as *const () as usize as u64,
        flags: SA_SIGINFO | SA_ONSTACK | SA_RESTORER,
        restorer: restore_rt as *const () as usize as u64,
        mask: 0,
    };
    for signal in [SIGILL, SIGTRAP, SIGBUS, SIGFPE, SIGSEGV] {
        let args = [signal, &raw const action as u64, 0, size_of::<u64>() as u64, 0, 0];
        // SAFETY: the kernel only reads `action`; the handler and the restorer live as long as
        // the program and have the signatures the kernel calls them with.
        unsafe { sys::syscall(nr::RT_SIGACTION, args) }?;
    }
    Ok(())
}

/// Where a handler returns to (SA_RESTORER): `rt_sigreturn` on the frame the kernel built.
#[unsafe(naked)]
extern "C" fn restore_rt() -> ! {
    core::arch::naked_asm!(
        "mov eax, {rt_sigreturn}",
        "syscall",
        "ud2", // rt_sigreturn does not return here
        rt_sigreturn = const nr::RT_SIGRETURN,
    )
}

/// The handler: resumes a BAD_SIGRETURN, or ends the run with SIGNAL.
extern "C" fn on_signal(signal: i32, info: *const SigInfo, context: *mut UContext) {
    // SAFETY: for an SA_SIGINFO handler the kernel passes its siginfo and ucontext, which it
    // just wrote on the alternate stack and nothing else accesses until the handler returns.
    let (info, regs) = unsafe { (&*info, &mut (*context).mcontext) };
    // SAFETY: a read of a static that nothing writes meanwhile: BAD_SIGRETURN's block wrote it
    // before the system call that led here (or long ago, if this signal is another's).
    let frame_rip = unsafe { ptr::read_volatile(&raw const (*FRAME.get()).uc.mcontext.rip) };
    if signal as u64 == SIGSEGV
        && info.code == SI_KERNEL
        && regs.rip == frame_rip
        && EXPECTING.swap(false, SeqCst)
    {
        CAUGHT.store(true, SeqCst);
        regs.cs = USER_CS;
        regs.ss = USER_DS;
        return;
    }
    let detail = [signal as u64, regs.rip, info.addr, CURRENT_OP.load(SeqCst)];
    host::finish(agent_status::SIGNAL, detail)
}

/// BAD_SIGRETURN's frame, with the registers `regs` (RIP and RSP are the block's to fill in).
fn bad_frame(regs: &Regs) -> RtSigFrame {
    let [rax, rbx, rcx, rdx, rsi, rdi, rbp, _rsp, r8, r9, r10, r11, r12, r13, r14, r15, ..] = *regs;
    let mcontext = SigContext {
        r8_to_r15: [r8, r9, r10, r11, r12, r13, r14, r15],
        rdi,
        rsi,
        rbp,
        rbx,
        rdx,
        rax,
        rcx,
        rsp: 0,
        rip: 0,
        eflags: regs[RFLAGS],
        cs: BAD_CS,
        gs: 0,
        fs: 0,
        ss: USER_DS,
        rest: [0; 13],
    };
    // The kernel takes SS as given (UC_STRICT_RESTORE_SS), sets the alternate stack from
    // `stack` (so, the one it has) and the blocked signals from `sigmask` (none).
    let flags = UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS;
    let uc = UContext { flags, link: 0, stack: alt_stack(), mcontext, sigmask: 0 };
    RtSigFrame { pretcode: 0, uc, info: [0; 16] }
}

const FRAME_UC: usize = offset_of!(RtSigFrame, uc);
const FRAME_RSP: usize = FRAME_UC + offset_of!(UContext, mcontext) + offset_of!(SigContext, rsp);
const FRAME_RIP: usize = FRAME_UC + offset_of!(UContext, mcontext) + offset_of!(SigContext, rip);

/// One BAD_SIGRETURN: `rt_sigreturn` to a frame with [`BAD_CS`]; after the SIGSEGV, every
/// register must be the frame's.
pub fn bad_sigreturn(iteration: u32) -> Result<(), Failure> {
    let regs = checks::patterns(iteration);
    // SAFETY: no block is running. The handler may read the frame's RIP at any signal, but the
    // agent is one thread: a signal interrupts this write, it does not race with it, and a
    // half-written RIP only fails the handler's comparison (the signal is not the one expected).
    unsafe { *FRAME.get() = bad_frame(&regs) };
    checks::load(&regs);
    CAUGHT.store(false, SeqCst);
    EXPECTING.store(true, SeqCst);
    // SAFETY: a checked block (see `checks`). The CALL/POP pair (on our own stack) puts the
    // address of the JMP into the frame's RIP, which is where the handler lets the block resume,
    // and RSP goes into the frame too, so the block resumes on its own stack. The system call
    // replaces every register, all of which the block declares clobbered or restores itself.
    // No SSE state is lost: the agent uses none (the frame has no FPU state, so the kernel
    // resets it).
    unsafe {
        checked_asm!(
            "call 2f",
            "jmp 3f", // the frame's RIP: the handler resumes the block here
            "2: pop qword ptr [rip + {frame} + {frame_rip}]",
            "mov [rip + {frame} + {frame_rsp}], rsp",
            "lea rsp, [rip + {frame} + {frame_uc}]", // rt_sigreturn reads the frame at RSP - 8
            "mov eax, {rt_sigreturn}",
            "syscall",
            "ud2", // rt_sigreturn does not return here
            "3:";
            frame = sym FRAME,
            frame_rip = const FRAME_RIP,
            frame_rsp = const FRAME_RSP,
            frame_uc = const FRAME_UC,
            rt_sigreturn = const nr::RT_SIGRETURN,
        )
    };
    EXPECTING.store(false, SeqCst);
    if !CAUGHT.load(SeqCst) {
        return Err(Failure::NoSignal);
    }
    let (found, saved) = checks::results();
    Ok(checks::compare(&checks::with_own_stack(regs, saved), &found, &[])?)
}
