//! `--features host-test`: a stand-in for the host, to smoke-test the agent as an ordinary
//! process on a development machine. Never in an initramfs.
//!
//! Run it as root (for kernel breakpoints) in a mount namespace of its own, since the
//! agent mounts /proc: `unshare --mount --propagation private target/.../agent OPS...`.
//! Messages are printed on stdout instead of going to the doorbell. At Ready the stand-in writes the
//! run's operations into the mailbox from the command line: one `KIND:COUNT[:ARG]` argument per
//! operation (numbers decimal or 0x-prefixed hex), e.g. `1:100 2:5:0 7:100000`; arguments with
//! no `:` are ignored, so that it also runs as the `/init` of a test VM, where the kernel passes
//! on the boot parameters it does not know (`nokaslr`) besides those after `--`. At Done it
//! prints the status and exits with it.

use core::fmt::Write;
use core::{ptr, slice, str};

use nmifuzz_abi::agent::{AGENT_REGISTER_NAMES, AgentMessage, AgentOp, MAX_AGENT_OPS};

use crate::host::{Line, mailbox};
use crate::sys;

/// Does what the host would do with `message`.
pub fn receive(message: AgentMessage, rdi: u64, rsi: u64) {
    let mut line = Line::new();
    let _ = match message {
        AgentMessage::Hello => write!(line, "Hello: mailbox at {rdi:#x}"),
        AgentMessage::Symbols => {
            // SAFETY: used only while the message is handled.
            let first = unsafe { text(rdi, rsi) }.lines().next().unwrap_or("");
            write!(line, "Symbols: {rsi} bytes at {rdi:#x}, from \"{first}\"")
        }
        // SAFETY: used only while the message is handled.
        AgentMessage::Log => write!(line, "Log: {}", unsafe { text(rdi, rsi) }),
        AgentMessage::Ready => write!(line, "Ready"),
        AgentMessage::Done => done(&mut line),
    };
    print(&line);
    match message {
        AgentMessage::Ready => write_ops(),
        // SAFETY: the agent is stopped here as it would be at the host's Done.
        AgentMessage::Done => sys::exit_group(unsafe { (*mailbox()).status }.into()),
        _ => {}
    }
}

/// The text at `addr`, `len` bytes long, that a Symbols or Log message sends.
///
/// # Safety
///
/// The text must not be used after the message is handled: the agent's buffer lives only until
/// its `send` returns.
unsafe fn text<'a>(addr: u64, len: u64) -> &'a str {
    // SAFETY: the agent sends these messages with a buffer of `len` bytes at `addr`, which the
    // caller uses no longer than the buffer lives.
    let bytes = unsafe { slice::from_raw_parts(addr as *const u8, len as usize) };
    str::from_utf8(bytes).unwrap_or("(not UTF-8)")
}

/// The run's outcome, as the mailbox says.
fn done(line: &mut Line) -> core::fmt::Result {
    // SAFETY: the agent is stopped here as it would be at the host's Done.
    let m = unsafe { ptr::read_volatile(mailbox()) };
    write!(line, "Done: status {} detail {:x?} completed {}", m.status, m.detail, m.completed)?;
    match AGENT_REGISTER_NAMES.get(m.detail[0] as usize) {
        Some(name) if m.status == nmifuzz_abi::agent::agent_status::REGISTER => {
            write!(line, " ({name})")
        }
        _ => Ok(()),
    }
}

fn print(line: &Line) {
    let _ = sys::write(1, line.as_bytes());
    let _ = sys::write(1, b"\n");
}

/// Writes the operations on the command line (/proc/self/cmdline) into the mailbox.
fn write_ops() {
    let mut cmdline = [0; 4096];
    let mut len = 0;
    if let Ok(fd) = sys::open_read_only(c"/proc/self/cmdline") {
        len = sys::read(fd, &mut cmdline).unwrap_or(0) as usize;
        let _ = sys::close(fd);
    }
    let args = cmdline[..len].split(|&b| b == 0).skip(1).filter(|arg| arg.contains(&b':'));
    let mut count = 0;
    for (index, arg) in args.enumerate() {
        let Some(op) = parse_op(arg).filter(|_| index < MAX_AGENT_OPS) else {
            let mut line = Line::new();
            let arg = str::from_utf8(arg).unwrap_or("(not UTF-8)");
            let _ = write!(line, "bad operation {arg:?} (want KIND:COUNT[:ARG], at most 16)");
            print(&line);
            sys::exit_group(100);
        };
        // SAFETY: the agent is stopped at Ready, where the host writes the operations.
        unsafe {
            ptr::write_volatile((&raw mut (*mailbox()).ops).cast::<AgentOp>().add(index), op)
        };
        count = index + 1;
    }
    // SAFETY: as above.
    unsafe { ptr::write_volatile(&raw mut (*mailbox()).op_count, count as u32) };
}

/// `KIND:COUNT[:ARG]`.
fn parse_op(arg: &[u8]) -> Option<AgentOp> {
    let mut fields = str::from_utf8(arg).ok()?.split(':').map(parse_number);
    let kind = u32::try_from(fields.next()??).ok()?;
    let count = u32::try_from(fields.next()??).ok()?;
    let arg = fields.next().unwrap_or(Some(0))?;
    fields.next().is_none().then_some(AgentOp { kind, count, arg })
}

fn parse_number(text: &str) -> Option<u64> {
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}
