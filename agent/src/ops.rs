//! A run: the operations the host wrote into the mailbox (`nmifuzz_abi::agent::agent_op`),
//! performed in order after Ready, each checking that the kernel gave every register back.
//!
//! The first failure ends the run with its status (`agent_status`); if none fails, the run ends
//! with OK. Every operation but WATCH is a loop of checked blocks (see `checks`), one per
//! iteration, each with its own register patterns.

use nmifuzz_abi::agent::{AGENT_FAULT_PAGES, AgentOp, agent_op, agent_status};

use crate::checks::{self, Mismatch, R11, RAX, RCX, RDI, RSP, SS, checked_asm};
use crate::host;
use crate::setup::{LDT_DATA16_SELECTOR, Setup};
use crate::signals;
use crate::sys::{Errno, nr};
use crate::watch::Watches;

/// Why an operation failed.
pub enum Failure {
    /// A register did not come back as it should have.
    Register(Mismatch),
    /// A system call the operation needs failed.
    Syscall(Errno),
    /// An operation kind the agent does not know.
    BadOp(u32),
    /// BAD_SIGRETURN's return to ring 3 did not fault: no SIGSEGV came.
    NoSignal,
}

impl From<Mismatch> for Failure {
    fn from(mismatch: Mismatch) -> Self {
        Self::Register(mismatch)
    }
}

impl From<Errno> for Failure {
    fn from(errno: Errno) -> Self {
        Self::Syscall(errno)
    }
}

impl Failure {
    /// The mailbox's status and detail for this failure in operation `op`.
    fn report(self, op: u64) -> (u32, [u64; 4]) {
        match self {
            Self::Register(m) => {
                (agent_status::REGISTER, [m.register as u64, m.expected, m.found, op])
            }
            Self::Syscall(Errno(errno)) => (agent_status::SETUP, [errno, op, 0, 0]),
            Self::BadOp(kind) => (agent_status::BAD_OP, [kind.into(), op, 0, 0]),
            // Signal 0: the SIGSEGV the operation expects did not come.
            Self::NoSignal => (agent_status::SIGNAL, [0, 0, 0, op]),
        }
    }
}

/// Performs this run's operations and reports Done.
pub fn run(setup: &Setup) -> ! {
    host::set_completed(0);
    let mut watches = Watches::new();
    for (index, op) in host::ops().enumerate() {
        signals::set_current_op(index as u64);
        if let Err(failure) = perform(op, setup, &mut watches) {
            let (status, detail) = failure.report(index as u64);
            host::finish(status, detail);
        }
        host::set_completed(index + 1);
    }
    host::finish(agent_status::OK, [0; 4])
}

fn perform(op: AgentOp, setup: &Setup, watches: &mut Watches) -> Result<(), Failure> {
    let mut iterations = 0..op.count;
    match op.kind {
        agent_op::SYSCALL => iterations.try_for_each(|i| syscall(i, None, setup.ppid)),
        agent_op::SYSCALL_WITH_RSP => {
            iterations.try_for_each(|i| syscall(i, Some(op.arg), setup.ppid))
        }
        agent_op::PAGE_FAULT => (0..op.count.min(AGENT_FAULT_PAGES))
            .try_for_each(|i| page_fault(i, setup.fault_page(i))),
        // From the last page down, so that after a PAGE_FAULT the first ones still fault; past
        // the 64th, pages come round again, already touched (no fault, no espfix: harmless).
        agent_op::ESPFIX => iterations.try_for_each(|i| {
            espfix(i, setup.fault_page(AGENT_FAULT_PAGES - 1 - i % AGENT_FAULT_PAGES))
        }),
        agent_op::BAD_SIGRETURN => iterations.try_for_each(signals::bad_sigreturn),
        agent_op::WATCH if op.count == 0 => {
            watches.disarm_all();
            Ok(())
        }
        agent_op::WATCH => Ok(watches.arm(op.arg)?),
        agent_op::SPIN => spin(op.count),
        kind => Err(Failure::BadOp(kind)),
    }
}

/// `getppid` through SYSCALL, with RSP = `rsp` if given. SYSCALL keeps every register but RCX
/// (the return address) and R11 (RFLAGS); RAX is the result.
fn syscall(iteration: u32, rsp: Option<u64>, ppid: u64) -> Result<(), Failure> {
    let mut regs = checks::patterns(iteration);
    regs[RAX] = nr::GETPPID;
    if let Some(rsp) = rsp {
        regs[RSP] = rsp;
    }
    checks::load(&regs);
    match rsp {
        // SAFETY: a checked block (see `checks`); getppid touches no user memory.
        None => unsafe { checked_asm!("syscall") },
        // SAFETY: as above; nothing uses the stack until the block's end restores RSP.
        Some(_) => unsafe { checked_asm!("mov rsp, [rip + {before} + 7*8]", "syscall") },
    }
    let (found, saved) = checks::results();
    let mut expected = checks::with_own_stack(regs, saved);
    expected[RAX] = ppid;
    if let Some(rsp) = rsp {
        expected[RSP] = rsp;
    }
    Ok(checks::compare(&expected, &found, &[RCX, R11])?)
}

/// A one-byte write to `page`, which faults if the page is fresh. An exception's return keeps
/// every register.
fn page_fault(iteration: u32, page: u64) -> Result<(), Failure> {
    let mut regs = checks::patterns(iteration);
    regs[RDI] = page;
    checks::load(&regs);
    // SAFETY: a checked block (see `checks`); the write is to the agent's own fault pages,
    // which nothing else uses.
    unsafe { checked_asm!("mov byte ptr [rdi], al") };
    let (found, saved) = checks::results();
    Ok(checks::compare(&checks::with_own_stack(regs, saved), &found, &[])?)
}

/// [`page_fault`] with SS = the 16-bit LDT data segment, so that the kernel returns through
/// espfix64 (the kernel IRETs to an LDT SS from a per-CPU alias of its stack whose bits 16-31
/// are the user's ESP's, as an IRET to a 16-bit SS may keep those bits from the stack it runs
/// on). RSP must come back whole, and SS as loaded; the block then restores SS.
fn espfix(iteration: u32, page: u64) -> Result<(), Failure> {
    let mut regs = checks::patterns(iteration);
    regs[RDI] = page;
    regs[SS] = LDT_DATA16_SELECTOR;
    checks::load(&regs);
    // SAFETY: as in `page_fault`; in 64-bit mode SS's base, limit and size do not apply, so
    // nothing changes meaning while SS holds the 16-bit segment.
    unsafe { checked_asm!("mov ss, word ptr [rip + {before} + 17*8]", "mov byte ptr [rdi], al") };
    let (found, saved) = checks::results();
    let mut expected = checks::with_own_stack(regs, saved);
    expected[SS] = LDT_DATA16_SELECTOR;
    Ok(checks::compare(&expected, &found, &[])?)
}

/// `count` iterations of `loop` (which counts RCX down and leaves the flags alone), with every
/// other register and RFLAGS holding its pattern all along: whatever interrupts ring 3 here
/// (an NMI, a timer) must leave them as they were.
fn spin(count: u32) -> Result<(), Failure> {
    let mut regs = checks::patterns(count);
    regs[RCX] = count.into();
    checks::load(&regs);
    // SAFETY: a checked block (see `checks`) that touches no memory of its own. JRCXZ skips
    // the loop for a zero count, which `loop` would take for 2^64.
    unsafe { checked_asm!("jrcxz 3f", "2: loop 2b", "3:") };
    let (found, saved) = checks::results();
    let mut expected = checks::with_own_stack(regs, saved);
    expected[RCX] = 0;
    Ok(checks::compare(&expected, &found, &[])?)
}
