//! The mailbox: what the guest reports of a run (its counters, and where and why it panicked).

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// `Mailbox::magic`: "NMIM" little-endian, set by the guest at boot.
pub const MAILBOX_MAGIC: u32 = u32::from_le_bytes(*b"NMIM");

/// Counters the guest keeps for one run; reported with DONE and readable at any exit.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct Counters {
    /// Completed iterations of the workload loop.
    pub workload_iterations: u64,
    /// Calls of `do_nmi` (one per NMI the entry let through to it).
    pub do_nmi_calls: u64,
    /// `do_nmi` iterations: calls plus re-runs of the C-level latch.
    pub nmi_iterations: u64,
    /// #PF exceptions handled (demand mappings).
    pub page_faults: u64,
    /// #UD exceptions handled.
    pub invalid_opcodes: u64,
    /// #BP exceptions handled.
    pub breakpoints: u64,
    /// Pages written by the scribble workload.
    pub pages_scribbled: u64,
    /// A checksum of the workload's results, so the host can see it really ran.
    pub checksum: u64,
    /// System calls the user workload made (each handled by `do_syscall`).
    pub syscalls: u64,
    /// Ring-3 points (writes to [`USER_POINT_ADDRESS`](crate::USER_POINT_ADDRESS)) the user
    /// workload passed, as it counted them.
    pub user_points: u64,
    /// Returns to user mode through espfix64 (a 16-bit SS).
    pub espfix_returns: u64,
    /// Faulting IRETs to user mode repaired by `fixup_bad_iret` (a "signal" each).
    pub bad_iret_fixups: u64,
}

/// Bytes of the panic message kept in the mailbox; longer messages are cut.
pub const PANIC_MESSAGE_LEN: usize = 256;
/// Bytes of the panic location's file name kept in the mailbox.
pub const PANIC_FILE_LEN: usize = 96;

/// Where and why the guest panicked.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct PanicRecord {
    /// The instruction the panic is about: the faulting RIP for an unexpected exception, the
    /// panic site for the guest's own panics, and the panic handler itself for a panic raised
    /// inside `core` (its panic machinery keeps no frame pointers to find the caller).
    pub rip: u64,
    /// Source line of the panic.
    pub line: u32,
    /// Source column of the panic.
    pub column: u32,
    /// Valid bytes in `file`.
    pub file_len: u32,
    /// Valid bytes in `message`.
    pub message_len: u32,
    /// Source file of the panic, UTF-8, cut at [`PANIC_FILE_LEN`].
    pub file: [u8; PANIC_FILE_LEN],
    /// The panic message, UTF-8, cut at [`PANIC_MESSAGE_LEN`].
    pub message: [u8; PANIC_MESSAGE_LEN],
}

/// The guest's report area; see the crate documentation.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Mailbox {
    /// [`MAILBOX_MAGIC`] once the guest booted.
    pub magic: u32,
    /// The guest's [`ABI_VERSION`](crate::ABI_VERSION).
    pub version: u32,
    /// This run's counters.
    pub counters: Counters,
    /// Filled before a PANIC report.
    pub panic: PanicRecord,
}
