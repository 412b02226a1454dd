//! The contract between nmifuzz's agent (the `/init` of the initramfs nmifuzz gives a real Linux
//! kernel, built from `agent/`) and the host.
//!
//! The agent talks to the host by writing an [`AgentMessage`] code (a u32) to the doorbell, the
//! guest physical address [`AGENT_DOORBELL`], where the VM has no memory: the write is an MMIO
//! exit. RDI and RSI hold the message's arguments. The agent maps the doorbell from /dev/mem.
//! The host reads the registers at the exit and reads or writes agent memory through the
//! guest's page tables. The sequence at boot is:
//!
//! (Not `out` to a port with `iopl(3)`: under QEMU's emulated SVM, a ring-3 `out` faults once
//! the VMM has restored the vCPU's system registers, because KVM reports the TSS as busy (type
//! 11, as the CPU holds it) and QEMU's I/O-permission check accepts only type 9. A memory
//! write needs no I/O permission on any host.)
//!
//! 1. [`AgentMessage::Hello`]: RDI = the address of the agent's [`AgentMailbox`] (page-aligned,
//!    already touched so it is mapped).
//! 2. [`AgentMessage::Symbols`]: RDI, RSI = address and length of the text of
//!    `/proc/kallsyms` (the kernel's symbols, which Debian's stub `System.map` lacks).
//! 3. [`AgentMessage::Ready`]: the snapshot point. Every run starts right after this `out`: the
//!    agent reads the [`AgentMailbox`]'s operations, which the host wrote, and performs them.
//! 4. [`AgentMessage::Done`]: the operations are over; the mailbox's `status` says whether
//!    every check held.
//!
//! [`AgentMessage::Log`] (RDI, RSI = text) may come at any time before Ready: a line for the
//! host to show, such as why the set-up failed.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// The guest physical address the agent writes its messages to: above the VM's RAM, below the
/// IOAPIC and the LAPIC, with nothing there.
pub const AGENT_DOORBELL: u64 = 0xd000_0000;

/// What the agent tells the host (the value it writes to [`AGENT_DOORBELL`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum AgentMessage {
    /// RDI = the mailbox's address.
    Hello = 1,
    /// RDI, RSI = the text of `/proc/kallsyms`.
    Symbols = 2,
    /// The snapshot point.
    Ready = 3,
    /// The operations are over; see the mailbox's status.
    Done = 4,
    /// RDI, RSI = a line of text for the host.
    Log = 5,
}

impl AgentMessage {
    /// The message with code `code`, if any.
    pub fn from_code(code: u32) -> Option<Self> {
        Some(match code {
            1 => Self::Hello,
            2 => Self::Symbols,
            3 => Self::Ready,
            4 => Self::Done,
            5 => Self::Log,
            _ => return None,
        })
    }
}

/// Operations one run performs at most.
pub const MAX_AGENT_OPS: usize = 16;

/// The kinds of [`AgentOp`]. Unknown kinds end the run with [`agent_status::BAD_OP`].
pub mod agent_op {
    /// `count` times: `getppid` through SYSCALL, checking every register SYSCALL must keep.
    pub const SYSCALL: u32 = 1;
    /// `count` times: SYSCALL (`getppid`) with RSP = `arg`, any address (the NMI IST stack, a
    /// kernel address, zero); RSP and every register are checked after the return.
    pub const SYSCALL_WITH_RSP: u32 = 2;
    /// `count` pages (at most [`super::AGENT_FAULT_PAGES`]): a write to a page the agent mapped
    /// before Ready and never touched, so a page fault from ring 3; registers checked.
    pub const PAGE_FAULT: u32 = 3;
    /// `count` times: load SS with the agent's 16-bit LDT data segment (set up with
    /// `modify_ldt` before Ready) and take a page fault with it, so the kernel returns through
    /// espfix64; then SS is restored and the high bits of ESP are checked.
    pub const ESPFIX: u32 = 4;
    /// `count` times: `rt_sigreturn` to a frame with an unusable CS, so the kernel's return to
    /// user faults and it delivers SIGSEGV; the agent's handler checks it and goes on.
    pub const BAD_SIGRETURN: u32 = 5;
    /// Arms a hardware data breakpoint on kernel address `arg` (read/write, 8 bytes) with
    /// `perf_event_open`; `count` = 0 disarms every breakpoint armed this run.
    pub const WATCH: u32 = 6;
    /// `count` iterations of a ring-3 loop with every register set to a pattern and checked:
    /// what an NMI interrupting user code must leave unchanged.
    pub const SPIN: u32 = 7;
}

/// Fresh pages the agent maps for [`agent_op::PAGE_FAULT`] and [`agent_op::ESPFIX`].
pub const AGENT_FAULT_PAGES: u32 = 64;

/// The agent's run status in [`AgentMailbox::status`].
pub mod agent_status {
    /// Every operation ran and every check held.
    pub const OK: u32 = 0;
    /// A register differed after a return: `detail` = [register index, expected, found, op].
    pub const REGISTER: u32 = 1;
    /// An operation could not be performed (a system call failed): `detail` = [errno, op, 0, 0].
    pub const SETUP: u32 = 2;
    /// An unknown operation kind: `detail` = [kind, op, 0, 0].
    pub const BAD_OP: u32 = 3;
    /// A signal the agent did not expect: `detail` = [signal, RIP, address, op].
    pub const SIGNAL: u32 = 4;
}

/// One operation of a run.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct AgentOp {
    /// An [`agent_op`] kind.
    pub kind: u32,
    /// Repetitions, or as the kind says.
    pub count: u32,
    /// As the kind says.
    pub arg: u64,
}

/// The page the host and the agent share (the agent's static, found at Hello).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct AgentMailbox {
    /// [`AGENT_MAILBOX_MAGIC`], written by the agent.
    pub magic: u64,
    /// Host → agent: how many of `ops` to perform.
    pub op_count: u32,
    /// Agent → host: an [`agent_status`] value.
    pub status: u32,
    /// Host → agent: the operations, in order.
    pub ops: [AgentOp; MAX_AGENT_OPS],
    /// Agent → host: the status's details.
    pub detail: [u64; 4],
    /// Agent → host: operations completed.
    pub completed: u32,
    /// Padding.
    pub reserved: u32,
}

/// The agent mailbox's magic ("NMIAGENT").
pub const AGENT_MAILBOX_MAGIC: u64 = u64::from_le_bytes(*b"NMIAGENT");

/// The registers the agent checks, in the order of [`agent_status::REGISTER`]'s index.
pub const AGENT_REGISTER_NAMES: [&str; 18] = [
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12", "r13",
    "r14", "r15", "rflags", "ss",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mailbox_fits_in_one_page_and_has_a_pinned_size() {
        assert_eq!(size_of::<AgentOp>(), 16);
        assert_eq!(size_of::<AgentMailbox>(), 8 + 8 + 16 * 16 + 32 + 8);
        const { assert!(size_of::<AgentMailbox>() <= 4096) };
    }

    #[test]
    fn every_message_code_round_trips() {
        for m in [
            AgentMessage::Hello,
            AgentMessage::Symbols,
            AgentMessage::Ready,
            AgentMessage::Done,
            AgentMessage::Log,
        ] {
            assert_eq!(AgentMessage::from_code(m as u32), Some(m));
        }
        assert_eq!(AgentMessage::from_code(0), None);
    }
}
