//! The contract between the nmifuzz guest kernel and the host VMM.
//!
//! Both sides compile this crate: the guest (`no_std`, `x86_64-unknown-none`) and the VMM. Every
//! structure that crosses the boundary lives in guest memory, is `#[repr(C)]`, holds only
//! integers (so any bit pattern is a valid value) and has its size pinned by a test below.
//!
//! - **Reports** go from guest to host through port I/O: a byte on [`port::CONSOLE`], or a
//!   [`Report`] code in EAX on [`port::REPORT`]. DONE and PANIC leave their details in the
//!   [`Mailbox`], a guest static the host finds by the symbol [`MAILBOX_SYMBOL`].
//! - **The script** goes from host to guest: before each run the VMM writes a [`Script`] into the
//!   guest static named [`SCRIPT_SYMBOL`]. It selects the workload and the NMI entry variant and
//!   says what each `do_nmi` call does.
#![cfg_attr(not(feature = "std"), no_std)]

pub mod agent;
#[cfg(feature = "std")]
pub mod entry_name;
mod mailbox;
mod script;
mod variant;

pub use self::mailbox::{
    Counters, MAILBOX_MAGIC, Mailbox, PANIC_FILE_LEN, PANIC_MESSAGE_LEN, PanicRecord,
};
pub use self::script::{
    Action, MAX_BUSY_ITERATIONS, MAX_SCRIBBLE_BYTES, SCRIPT_ACTION_SLOTS, SCRIPT_MAGIC, Scribble,
    ScribbleArea, Script, USER_FLAG_SLOTS, Workload, fault, option, user_flag,
};
pub use self::variant::{NmiStackLayout, Variant};

/// Version of this contract; bumped on every incompatible change to its structures.
pub const ABI_VERSION: u32 = 5;

/// Symbol of the guest's [`Script`] buffer.
pub const SCRIPT_SYMBOL: &str = "NMIFUZZ_SCRIPT";
/// Symbol of the guest's [`Mailbox`].
pub const MAILBOX_SYMBOL: &str = "NMIFUZZ_MAILBOX";

/// I/O ports the guest writes to. `out` is never used inside an NMI entry path: on kvm_pvm the
/// single-step stop right after an `out` is lost.
pub mod port {
    /// One byte of console output per `out dx, al` (the legacy COM1 data port).
    pub const CONSOLE: u16 = 0x3f8;
    /// A [`Report`](super::Report) code per `out dx, eax`.
    pub const REPORT: u16 = 0xf4;
    /// `out dx, al` that means nothing: the ping workload's exits, for measuring exit cost.
    pub const PING: u16 = 0x80;
}

/// A guest-physical address with no memory behind it (above the 1 GiB any guest may have),
/// mapped for ring 3 by the guest's page tables: a one-byte write there (`mov [addr], al`) is
/// an MMIO exit, the user workload's points. Ring-3 code can be interrupted only at exits it
/// takes itself on kvm_pvm, so each is a boundary the host can inject at; the guest's RIP is
/// already past the write at the exit, as after an `out`.
pub const USER_POINT_ADDRESS: u64 = 0x4020_0000;

/// What the guest tells the host on [`port::REPORT`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Report {
    /// Boot finished; the host takes its snapshot here and writes the script.
    Ready = 1,
    /// The workload finished; [`Mailbox::counters`] holds its counters.
    Done = 2,
    /// The guest panicked; [`Mailbox::panic`] holds the message and location.
    Panic = 3,
}

impl Report {
    /// Decodes a report code; `None` for anything the contract does not define.
    pub fn from_code(code: u32) -> Option<Self> {
        match code {
            1 => Some(Self::Ready),
            2 => Some(Self::Done),
            3 => Some(Self::Panic),
            _ => None,
        }
    }
}

/// Symbol of the code the guest runs at the start of every `do_nmi` iteration (once per call,
/// and once more per re-run of Linux's C-level latch); the host counts iterations there.
pub const ITERATION_SYMBOL: &str = "nmi_iteration";

/// Linker-script markers around the guest's NMI-handling code: every NMI entry, `do_nmi` and
/// what it calls, and the exception paths its faults take (`guest/link.ld`). An IRETQ made while
/// NMIs are being handled either lands in `[NMI_CODE_START, NMI_CODE_END)`, returns to a context
/// an NMI interrupted, or is a wrong return (the host's return-integrity oracle).
pub const NMI_CODE_START: &str = "__nmi_code_start";
/// The end of the NMI-handling code (exclusive); see [`NMI_CODE_START`].
pub const NMI_CODE_END: &str = "__nmi_code_end";

/// Linker-script markers around the kernel side of ring 3: the SYSCALL entry and the
/// return-to-user paths (`guest/link.ld`), where the host places NMIs and traps IRETQs.
pub const ENTRY_USER_START: &str = "__entry_user_start";
/// The end of the kernel side of ring 3 (exclusive); see [`ENTRY_USER_START`].
pub const ENTRY_USER_END: &str = "__entry_user_end";
/// Linker-script markers around the user workload's ring-3 code, whose points (writes to
/// [`USER_POINT_ADDRESS`]) the host names as places for NMIs.
pub const USER_TEXT_START: &str = "__user_text_start";
/// The end of the user workload's code (exclusive); see [`USER_TEXT_START`].
pub const USER_TEXT_END: &str = "__user_text_end";

/// Bytes of the NMI stack below IST1's top that NMI handling may use: the stack's lowest
/// usable byte is `top - NMI_STACK_SPAN`.
pub const NMI_STACK_SPAN: u64 = 16 * 1024 - 16;

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use super::*;

    #[test]
    fn layouts_are_pinned() {
        assert_eq!(size_of::<Scribble>(), 8);
        assert_eq!(size_of::<Action>(), 16);
        assert_eq!(size_of::<Script>(), 32 + 16 * SCRIPT_ACTION_SLOTS + 4 + 4 * USER_FLAG_SLOTS);
        assert_eq!(size_of::<Counters>(), 96);
        assert_eq!(size_of::<PanicRecord>(), 24 + PANIC_FILE_LEN + PANIC_MESSAGE_LEN);
        assert_eq!(size_of::<Mailbox>(), 8 + 96 + 376);
    }

    #[test]
    fn codes_round_trip() {
        for r in [Report::Ready, Report::Done, Report::Panic] {
            assert_eq!(Report::from_code(r as u32), Some(r));
        }
        assert_eq!(Report::from_code(0), None);
        for v in Variant::ALL {
            assert_eq!(Variant::from_code(v.code()), Some(*v));
        }
        for code in 0..10 {
            assert_eq!(Workload::from_code(code).map(|w| w as u32), Some(code));
        }
        assert_eq!(Workload::from_code(10), None);
        for a in ScribbleArea::ALL {
            assert_eq!(ScribbleArea::from_code(*a as u16), Some(*a));
        }
        assert_eq!(ScribbleArea::from_code(ScribbleArea::ALL.len() as u16), None);
    }
}
