//! The system-call table: `do_syscall`, called by `entry_SYSCALL_64` on the thread stack with
//! the kernel's GS, NMIs unmasked and the user's registers in [`SyscallRegs`] (Linux's
//! `pt_regs`). The number is in `orig_ax`, the result goes to `regs.rax`; a call that wants a
//! return SYSRET cannot make changes the frame, and the exit then takes the IRET path.
//!
//! | number | name         | what it does                                                  |
//! | ------ | ------------ | ------------------------------------------------------------- |
//! | 0      | `getpid`     | returns [`USER_PID`]                                          |
//! | 1      | `set_ss16`   | returns to `user_point_ss16`, compatibility mode (CS 0x5b), with a 16-bit SS (0x07 or 0x2b): IRET, through espfix64 |
//! | 2      | `alt_cs`     | returns with CS = 0x33: IRET                                  |
//! | 3      | `bad_return` | marks CS 0x33 not-present, returns onto it: the IRETQ faults  |
//! | 4      | `exit`       | records the workload's counters and returns to the kernel     |
//!
//! Every call counts in `syscalls` and folds its number into a checksum (the `Loop` workload's
//! multiply-xorshift), so the host can tell the whole sequence ran, in order.

use core::ptr::{addr_of, read_volatile};

use super::entry::user_mode_exit;
use super::{USER_VARS, check_return_to_user, ss16_selector};
use crate::gdt::{USER_ALT_CODE_SELECTOR, USER_CODE32_SELECTOR};
use crate::mailbox::{self, Counter};
use crate::panic::fail;
use crate::regs::{GeneralRegs, InterruptFrame};
use crate::{gdt, invariant, percpu};
use nmifuzz_abi::user_flag;

pub const GETPID: u64 = 0;
pub const SET_SS16: u64 = 1;
pub const ALT_CS: u64 = 2;
pub const BAD_RETURN: u64 = 3;
pub const EXIT: u64 = 4;

unsafe extern "C" {
    /// The compatibility-mode code `set_ss16` returns to; only its address is used.
    #[link_name = "user_point_ss16"]
    static USER_POINT_SS16: u8;
}

/// What `getpid` returns: "NMIPID" in memory.
pub const USER_PID: u64 = 0x4449_5049_4d4e;
/// What the "signal handler" finds in RAX after a bad IRET: "SIGNALED" in memory.
pub const SIGNAL_MARKER: u64 = u64::from_le_bytes(*b"SIGNALED");

/// The checksum before the first system call, and its multiplier (as `Loop`'s).
const CHECKSUM_SEED: u64 = 0x6e6d_6966_757a_7a21;
const CHECKSUM_MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;
static mut CHECKSUM: u64 = CHECKSUM_SEED;

/// What `entry_SYSCALL_64` builds on the thread stack, lowest address first.
#[repr(C)]
pub struct SyscallRegs {
    /// Pushed after `orig_ax`.
    pub regs: GeneralRegs,
    /// The system-call number (RAX at the call).
    pub orig_ax: u64,
    /// RIP = RCX, CS = 0x23, RFLAGS = R11, RSP = the user's, SS = 0x1b: what the return
    /// restores.
    pub frame: InterruptFrame,
}

const _: () = assert!(size_of::<SyscallRegs>() == 21 * 8);

/// The system-call handler.
#[unsafe(no_mangle)]
extern "C" fn do_syscall(regs: &mut SyscallRegs) {
    invariant::check_flags("the system-call handler", user_flag::AC | user_flag::NT);
    percpu::check_kernel_gs("the system-call handler");
    mailbox::increment(Counter::Syscalls);
    let number = regs.orig_ax;
    // SAFETY: the checksum static is only touched here, and system calls do not nest.
    unsafe {
        let checksum = (CHECKSUM ^ number).wrapping_mul(CHECKSUM_MULTIPLIER);
        CHECKSUM = checksum ^ (checksum >> 29);
    }
    regs.regs.rax = 0;
    match number {
        GETPID => regs.regs.rax = USER_PID,
        SET_SS16 => {
            regs.frame.rip = addr_of!(USER_POINT_SS16) as u64;
            regs.frame.cs = u64::from(USER_CODE32_SELECTOR);
            regs.frame.ss = ss16_selector();
        }
        ALT_CS => regs.frame.cs = u64::from(USER_ALT_CODE_SELECTOR),
        BAD_RETURN => {
            gdt::set_alt_code_present(false);
            regs.frame.cs = u64::from(USER_ALT_CODE_SELECTOR);
        }
        EXIT => exit(),
        _ => fail!("unknown system call {number} at RIP {:#x}", regs.frame.rip),
    }
    check_return_to_user(&regs.frame, "the system-call exit");
}

/// `exit`: the workload's counters and the checksum into the mailbox, then back to the kernel.
fn exit() -> ! {
    let vars = addr_of!(USER_VARS);
    // SAFETY: plain loads of the user's variables and the checksum; ring 3 is stopped here.
    unsafe {
        mailbox::set(Counter::WorkloadIterations, read_volatile(addr_of!((*vars).iterations)));
        mailbox::set(Counter::UserPoints, read_volatile(addr_of!((*vars).points)));
        mailbox::set(Counter::Checksum, CHECKSUM);
    }
    // SAFETY: the kernel GS is loaded (checked on entry); `user_mode_exit` only restores the
    // stack and registers `user_mode_enter` saved.
    unsafe { user_mode_exit() }
}
