//! The nmifuzz agent: the `/init` of the initramfs that nmifuzz boots a real Linux kernel with.
//!
//! It is a static Linux x86-64 executable with no libc: raw system calls, its own `_start`. It
//! sets things up, tells the host where its mailbox and the kernel's symbols are, and stops at
//! Ready, where the host snapshots the machine. Every run restores that snapshot, so it starts
//! right after Ready: the agent performs the operations the host wrote into its mailbox (system
//! calls, page faults, espfix64 returns, bad sigreturns, breakpoints, a ring-3 loop) while the
//! host injects NMIs, checks that every register came back from the kernel as it went in, and
//! reports Done. The contract with the host is `nmifuzz_abi::agent`.
//!
//! - `host`: the messages to the host and the mailbox;
//! - `setup`: what happens before Ready;
//! - `ops`: a run's operations, most of them `checks`' checked blocks;
//! - `signals`: the fault handler and BAD_SIGRETURN; `watch`: WATCH's breakpoints;
//! - `sys`: the system calls.
#![no_std]
#![no_main]

mod checks;
mod host;
#[cfg(feature = "host-test")]
mod host_test;
mod ops;
mod setup;
mod signals;
mod sys;
mod watch;

use nmifuzz_abi::agent::{AgentMessage, agent_status};

/// The operation index reported for what happens before any operation (the set-up, or a signal
/// before the first operation starts).
pub const NO_OP: u64 = u64::MAX;

/// The ELF entry point. The kernel enters with RSP at `argc` (16-byte aligned), which the agent
/// does not need: `main` gets a clean frame chain and the alignment the ABI promises a callee.
#[unsafe(naked)]
#[unsafe(no_mangle)]
extern "C" fn _start() -> ! {
    core::arch::naked_asm!(
        "xor ebp, ebp",     // the end of the frame-pointer chain
        "and rsp, -16",
        "call {main}",      // main never returns
        "ud2",
        main = sym main,
    )
}

/// Sets up, reports Ready, then (at every run) performs the run's operations and reports Done.
extern "C" fn main() -> ! {
    let proc_mounted = setup::mount_proc();
    // Without the doorbell nothing can be reported, not even this failure: exiting makes the
    // kernel panic ("Attempted to kill init!"), which the host sees on the console. (The
    // host-test stand-in needs no doorbell, and runs as an ordinary process.)
    if host::open_doorbell().is_err() && cfg!(not(feature = "host-test")) {
        sys::exit_group(1);
    }
    host::hello();
    let setup = proc_mounted.and_then(|()| setup::prepare());
    if let Err(error) = &setup {
        host::log(format_args!("nmifuzz agent: {} failed: errno {}", error.step, error.errno.0));
    }
    host::send(AgentMessage::Ready, 0, 0);

    // Every run starts here, with the operations the host has just written into the mailbox.
    match setup {
        Ok(setup) => ops::run(&setup),
        Err(error) => host::finish(agent_status::SETUP, [error.errno.0, NO_OP, 0, 0]),
    }
}

/// A panic is a bug in the agent. Exiting makes the kernel panic, which the host sees.
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    sys::exit_group(127)
}
