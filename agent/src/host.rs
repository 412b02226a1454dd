//! The agent's side of the host contract (`nmifuzz_abi::agent`): the messages it writes to the
//! doorbell ([`AGENT_DOORBELL`], mapped from /dev/mem by [`open_doorbell`]), and the
//! [`AgentMailbox`] the host reads and writes.
//!
//! The host reads the message's registers at the doorbell's MMIO exit and accesses agent memory
//! only while the agent is stopped there, so the write is all the synchronisation there is: it
//! is an `asm!` block that may read and write any memory, and the mailbox is accessed with
//! volatile reads and writes besides, so that no access is cached across it or left out.

use core::cell::UnsafeCell;
use core::fmt::{self, Write};
use core::ptr;

use core::sync::atomic::{AtomicU64, Ordering};

use nmifuzz_abi::agent::{
    AGENT_DOORBELL, AGENT_MAILBOX_MAGIC, AgentMailbox, AgentMessage, AgentOp, MAX_AGENT_OPS,
};

use crate::sys::{self, Errno};

/// Where the doorbell is mapped (0 until [`open_doorbell`]).
static DOORBELL: AtomicU64 = AtomicU64::new(0);

/// Maps the doorbell page from /dev/mem. Without it nothing can be reported.
pub fn open_doorbell() -> Result<(), Errno> {
    let fd = sys::open_read_write_sync(c"/dev/mem")?;
    let address = sys::mmap_shared(4096, fd, AGENT_DOORBELL)?;
    // The mapping keeps the file; the descriptor is no longer needed.
    let _ = sys::close(fd);
    DOORBELL.store(address, Ordering::Relaxed);
    Ok(())
}

/// The mailbox, alone in its page (the contract wants it page-aligned).
#[repr(C, align(4096))]
struct MailboxPage(UnsafeCell<AgentMailbox>);

// SAFETY: the agent is a single thread. Besides it, only its signal handler (which ends the run
// and never returns to the code it interrupted) and the host (while the agent is stopped at an
// `out`) access the mailbox, always through raw pointers, never through references.
unsafe impl Sync for MailboxPage {}

const ZERO_OP: AgentOp = AgentOp { kind: 0, count: 0, arg: 0 };

/// Zero-initialised, so in .bss: its page is mapped by the first write ([`hello`]).
static MAILBOX: MailboxPage = MailboxPage(UnsafeCell::new(AgentMailbox {
    magic: 0,
    op_count: 0,
    status: 0,
    ops: [ZERO_OP; MAX_AGENT_OPS],
    detail: [0; 4],
    completed: 0,
    reserved: 0,
}));

/// The mailbox, for volatile accesses.
pub fn mailbox() -> *mut AgentMailbox {
    MAILBOX.0.get()
}

/// Sends `message` with its arguments in RDI and RSI.
pub fn send(message: AgentMessage, rdi: u64, rsi: u64) {
    #[cfg(not(feature = "host-test"))]
    // SAFETY: main mapped the doorbell page before the first message; the write goes to the
    // host (an MMIO exit), changes no register and no flag, and the host may read or write our
    // memory meanwhile, which the block allows by not being `nomem`.
    unsafe {
        core::arch::asm!(
            "mov dword ptr [{doorbell}], eax",
            doorbell = in(reg) DOORBELL.load(Ordering::Relaxed),
            in("eax") message as u32,
            in("rdi") rdi,
            in("rsi") rsi,
            options(nostack, preserves_flags),
        );
    }
    #[cfg(feature = "host-test")]
    crate::host_test::receive(message, rdi, rsi);
}

/// Stamps the mailbox's magic (mapping its page) and sends Hello with its address.
pub fn hello() {
    // SAFETY: the mailbox is a valid static; see `MailboxPage`'s `Sync` for the aliasing.
    unsafe { ptr::write_volatile(&raw mut (*mailbox()).magic, AGENT_MAILBOX_MAGIC) };
    send(AgentMessage::Hello, mailbox() as u64, 0);
}

/// The operations the host wrote for this run (at most [`MAX_AGENT_OPS`]).
pub fn ops() -> impl Iterator<Item = AgentOp> {
    // SAFETY: as in `hello`.
    let count = unsafe { ptr::read_volatile(&raw const (*mailbox()).op_count) };
    (0..(count as usize).min(MAX_AGENT_OPS)).map(|index| {
        // SAFETY: as in `hello`; `index` is in bounds of `ops`.
        unsafe { ptr::read_volatile((&raw const (*mailbox()).ops).cast::<AgentOp>().add(index)) }
    })
}

/// Records that `count` operations are over.
pub fn set_completed(count: usize) {
    // SAFETY: as in `hello`.
    unsafe { ptr::write_volatile(&raw mut (*mailbox()).completed, count as u32) };
}

/// Ends the run: writes `status` and `detail`, then sends Done, again and again (the host resets
/// the machine after Done, it never lets the agent go on; if it did, the agent would say Done
/// again rather than run off into whatever follows).
pub fn finish(status: u32, detail: [u64; 4]) -> ! {
    // SAFETY: as in `hello`.
    unsafe {
        ptr::write_volatile(&raw mut (*mailbox()).detail, detail);
        ptr::write_volatile(&raw mut (*mailbox()).status, status);
    }
    loop {
        send(AgentMessage::Done, 0, 0);
    }
}

/// Sends a Log line (only before Ready: the contract has no Log afterwards).
pub fn log(args: fmt::Arguments) {
    let mut line = Line::new();
    // A line too long for the buffer is cut short (`Line` never fails), which is fine for a log.
    let _ = line.write_fmt(args);
    let text = line.as_bytes();
    send(AgentMessage::Log, text.as_ptr() as u64, text.len() as u64);
}

/// A line of text formatted on the stack (there is no heap), cut short at its capacity.
pub struct Line {
    buf: [u8; 160],
    len: usize,
}

impl Line {
    pub const fn new() -> Self {
        Self { buf: [0; 160], len: 0 }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = self.buf.len() - self.len;
        let take = s.len().min(room);
        self.buf[self.len..self.len + take].copy_from_slice(&s.as_bytes()[..take]);
        self.len += take;
        Ok(())
    }
}
