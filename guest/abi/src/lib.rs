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

#[cfg(feature = "std")]
pub mod entry_name;

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Version of this contract; bumped on every incompatible change to the structures below.
pub const ABI_VERSION: u32 = 4;

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

/// `Script::magic`: "NMIS" little-endian. A script without it was never written by the host.
pub const SCRIPT_MAGIC: u32 = u32::from_le_bytes(*b"NMIS");
/// `Mailbox::magic`: "NMIM" little-endian, set by the guest at boot.
pub const MAILBOX_MAGIC: u32 = u32::from_le_bytes(*b"NMIM");

/// Number of per-call entries in [`Script::actions`], the most actions any schedule can have.
/// Calls beyond the last entry return at once.
pub const SCRIPT_ACTION_SLOTS: usize = 32;

/// An NMI entry: one file in the repository's `entries/` directory, found by the build
/// (`guest/abi/build.rs`; the contract is in docs/entries.md). Its code is its index in
/// [`Variant::ALL`], the default (`linux`) first and then by name; schedules name entries by
/// [`Variant::name`], never by code. The host points IDT vector 2 at its
/// [`Variant::entry_symbol`] when it writes the script, so that even an NMI at the first
/// instruction of a run enters it; the guest checks that the gate matches the script.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Variant(u32);

/// What the build read from an entry's file.
struct EntryInfo {
    name: &'static str,
    symbol: &'static str,
    summary: &'static str,
    file: &'static str,
    layout: Option<NmiStackLayout>,
}

// `ENTRIES`, `Variant::ALL` and a constant per entry (`Variant::LINUX`, `Variant::NAIVE`, ...),
// and the guest's `include_entries!`.
include!(concat!(env!("OUT_DIR"), "/entries.rs"));

impl Variant {
    /// The entry used when none is named.
    pub const DEFAULT: Self = Self::LINUX;

    fn info(self) -> &'static EntryInfo {
        &ENTRIES[self.0 as usize]
    }

    /// The code the script carries.
    pub const fn code(self) -> u32 {
        self.0
    }

    /// Decodes a script's variant field.
    pub fn from_code(code: u32) -> Option<Self> {
        ((code as usize) < ENTRIES.len()).then_some(Self(code))
    }

    /// The entry called `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|v| v.name() == name)
    }

    /// The name users type (`--variant NAME`): the file's stem with `-` for `_`.
    pub fn name(self) -> &'static str {
        self.info().name
    }

    /// The symbol of the entry, `nmi_<stem>`, which the VMM installs in IDT vector 2.
    pub fn entry_symbol(self) -> &'static str {
        self.info().symbol
    }

    /// One line on what the entry is: the first line of its file's header comment.
    pub fn summary(self) -> &'static str {
        self.info().summary
    }

    /// The entry's file, relative to the repository's root.
    pub fn file(self) -> &'static str {
        self.info().file
    }

    /// Where the entry keeps its nested-NMI state on the NMI stack, if its file describes it
    /// (a `Layout:` line in its header comment).
    pub fn stack_layout(self) -> Option<NmiStackLayout> {
        self.info().layout
    }
}

/// The nested-NMI stack of Linux's entry (the seed's diagram), as byte offsets below the NMI
/// stack's top (IST1): each frame is five qwords RIP, CS, RFLAGS, RSP, SS at increasing
/// addresses from `top - offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NmiStackLayout {
    /// The hardware ("original") frame.
    pub original: u64,
    /// The temporary RDX slot.
    pub temp_rdx: u64,
    /// The "NMI executing" variable.
    pub executing: u64,
    /// The "iret" frame.
    pub iret: u64,
    /// The "outermost" frame.
    pub outermost: u64,
}

impl NmiStackLayout {
    /// The layout every `linux`-derived variant shares.
    pub const LINUX: Self = Self {
        original: 5 * 8,
        temp_rdx: 6 * 8,
        executing: 7 * 8,
        iret: 12 * 8,
        outermost: 17 * 8,
    };
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
// The build checked every entry's layout against the same span.
const _: () = assert!(CHECKED_NMI_STACK_SPAN == NMI_STACK_SPAN);

/// Bits of [`Script::options`].
pub mod option {
    /// Unmask NMIs right after `first_nmi` with an IRETQ to the next instruction, as Linux's
    /// CONFIG_DEBUG_ENTRY does: a built-in stress mode for the `linux`-derived entries.
    pub const STRESS_UNMASK: u32 = 1 << 0;
    /// The user workload's system-call instruction is `syscall`, for hosts where SYSCALL from
    /// CPL3 enters CPL0 (ordinary KVM). Without it, it is `ud2`, whose #UD the kernel turns into
    /// the SYSCALL entry (kvm_pvm, where SYSCALL stays at CPL3).
    pub const NATIVE_SYSCALL: u32 = 1 << 1;
    /// Every bit the guest understands.
    pub const ALL: u32 = STRESS_UNMASK | NATIVE_SYSCALL;
}

/// What the code NMIs interrupt does. Only [`Workload::Loop`] is a real fuzzing target; the
/// others are purpose-made misbehaviours that let tests produce every host-side verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Workload {
    /// `workload_arg` iterations of a register-checking loop, then DONE.
    Loop = 0,
    /// Panic at once with a fixed message (tests the PANIC report).
    Panic = 1,
    /// Load an empty IDT and execute `ud2`: #UD, #DF and then a triple fault.
    TripleFault = 2,
    /// Execute an instruction KVM cannot emulate at ring 0 on kvm_pvm (`popcnt`).
    EmulationError = 3,
    /// Spin forever on a `jmp` to itself without any exit.
    Spin = 4,
    /// Execute `vmcall`, which never returns to the host on kvm_pvm.
    Vmcall = 5,
    /// Write one qword into each of `workload_arg` consecutive pages of scratch memory, then DONE.
    Scribble = 6,
    /// Execute `workload_arg` ring-0 `int3`s, each handled by #BP on its IST stack, then DONE.
    Breakpoint = 7,
    /// `workload_arg` times `out` to [`port::PING`], then DONE; 0 is the idle guest.
    Ping = 8,
    /// `workload_arg` iterations of the ring-3 workload: register checks, points (MMIO writes
    /// to [`USER_POINT_ADDRESS`]), system calls (one with RSP on the NMI stack), returns through espfix64
    /// and a faulting return to user, then DONE.
    User = 9,
}

impl Workload {
    /// Decodes a script's workload field.
    pub fn from_code(code: u32) -> Option<Self> {
        Some(match code {
            0 => Self::Loop,
            1 => Self::Panic,
            2 => Self::TripleFault,
            3 => Self::EmulationError,
            4 => Self::Spin,
            5 => Self::Vmcall,
            6 => Self::Scribble,
            7 => Self::Breakpoint,
            8 => Self::Ping,
            9 => Self::User,
            _ => return None,
        })
    }
}

/// Bits of [`Action::faults`]: exceptions `do_nmi` raises, in this order, after its busy work.
/// Each handler returns with IRETQ, which unblocks NMIs while `do_nmi` still runs.
pub mod fault {
    /// Execute `ud2`; #UD is handled on the current stack.
    pub const UD: u32 = 1 << 0;
    /// Touch a demand-mapped page; the #PF handler (current stack) maps it using CR2.
    pub const PF: u32 = 1 << 1;
    /// Execute `int3`; #BP is handled on the current stack while `do_nmi` runs (Linux's
    /// `debug_stack_set_zero`), on its own IST stack otherwise.
    pub const BP: u32 = 1 << 2;
    /// Overwrite random bytes of a guest structure, as [`Action::scribble`] says, after the busy
    /// work and before the other faults. Only `nmifuzz chaos` uses it: it tests that nothing the
    /// guest does to itself can break the VMM, and is no bug of an NMI entry. The schedule
    /// format cannot express it, so campaigns never generate it.
    pub const SCRIBBLE: u32 = 1 << 3;
    /// If the NMI interrupted ring 3 on the user workload's alternate code segment, mark that
    /// descriptor not-present, as another CPU's `modify_ldt` would: the NMI's final IRET to
    /// user then faults (#NP), as in CVE-2015-5157. Done first, before the busy work; a no-op
    /// for any other interrupted context.
    pub const REVOKE_CS: u32 = 1 << 4;
    /// The exceptions whose IRETQ re-opens NMIs inside `do_nmi`.
    pub const ENTRY_FAULTS: u32 = UD | PF | BP;
    /// What the fuzzer uses: the exceptions and the revoked user code segment.
    pub const FUZZED: u32 = ENTRY_FAULTS | REVOKE_CS;
    /// Every bit the guest understands; any other bit is a malformed script.
    pub const ALL: u32 = FUZZED | SCRIBBLE;
}

/// The guest structure a [`fault::SCRIBBLE`] action overwrites. Each names a byte range the
/// guest computes from its own statics; the ranges cover the live part of each structure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ScribbleArea {
    /// The first 32 gates (the exceptions and the NMI) of the IDT or of the NMI IDT.
    Idt = 0,
    /// The GDT (null, kernel and user segments, TSS descriptor).
    Gdt = 1,
    /// The 64-bit TSS, IST pointers included.
    Tss = 2,
    /// The first eight entries of one of the page-table pages.
    PageTables = 3,
    /// The top 512 bytes of the NMI stack (IST1): the frames of Linux's entry, the saved
    /// registers and the top guards.
    NmiStack = 4,
    /// The top 512 bytes of the double-fault (IST2) or the breakpoint/debug (IST3) stack.
    ExceptionStacks = 5,
    /// The whole [`Mailbox`].
    Mailbox = 6,
    /// The whole [`Script`], this action included.
    Script = 7,
}

impl ScribbleArea {
    /// Every area, in code order.
    pub const ALL: &'static [ScribbleArea] = &[
        ScribbleArea::Idt,
        ScribbleArea::Gdt,
        ScribbleArea::Tss,
        ScribbleArea::PageTables,
        ScribbleArea::NmiStack,
        ScribbleArea::ExceptionStacks,
        ScribbleArea::Mailbox,
        ScribbleArea::Script,
    ];

    /// Decodes [`Scribble::area`].
    pub fn from_code(code: u16) -> Option<Self> {
        Self::ALL.iter().copied().find(|a| *a as u16 == code)
    }

    /// A kebab-case name, for reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Idt => "idt",
            Self::Gdt => "gdt",
            Self::Tss => "tss",
            Self::PageTables => "page-tables",
            Self::NmiStack => "nmi-stack",
            Self::ExceptionStacks => "exception-stacks",
            Self::Mailbox => "mailbox",
            Self::Script => "script",
        }
    }
}

/// Most bytes one scribble overwrites.
pub const MAX_SCRIBBLE_BYTES: u16 = 64;

/// What a [`fault::SCRIBBLE`] action overwrites: `bytes` bytes at offsets and with values drawn
/// from `seed` (xorshift64), inside `area`. Ignored, and must be zero, without that bit.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct Scribble {
    /// A [`ScribbleArea`] code.
    pub area: u16,
    /// How many bytes to overwrite, 1 to [`MAX_SCRIBBLE_BYTES`].
    pub bytes: u16,
    /// Seed of the offsets and values.
    pub seed: u32,
}

/// Most rounds of busy work one action may ask for (two instructions each, all single-stepped
/// by the host). The guest refuses more, also in an action it was never shown at validation.
pub const MAX_BUSY_ITERATIONS: u32 = 2_000;

/// What one `do_nmi` call does.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct Action {
    /// Rounds of busy work (two instructions each) before any fault, at most
    /// [`MAX_BUSY_ITERATIONS`].
    pub busy: u32,
    /// [`fault`] bits; 0 returns right after the busy work.
    pub faults: u32,
    /// What [`fault::SCRIBBLE`] overwrites; all zero without that bit.
    pub scribble: Scribble,
}

impl Action {
    /// An action that returns at once.
    pub const NONE: Self =
        Self { busy: 0, faults: 0, scribble: Scribble { area: 0, bytes: 0, seed: 0 } };
}

/// The host-written half of an input; see the crate documentation.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Script {
    /// [`SCRIPT_MAGIC`].
    pub magic: u32,
    /// [`ABI_VERSION`].
    pub version: u32,
    /// A [`Variant`] code.
    pub variant: u32,
    /// [`option`] bits.
    pub options: u32,
    /// A [`Workload`] code.
    pub workload: u32,
    /// The workload's parameter (iterations, pages, breakpoints).
    pub workload_arg: u32,
    /// How many entries of `actions` are valid (at most [`SCRIPT_ACTION_SLOTS`]).
    pub action_count: u32,
    /// Must be 0.
    pub reserved: u32,
    /// `actions[i]` is what the i-th `do_nmi` call of the run does.
    pub actions: [Action; SCRIPT_ACTION_SLOTS],
}

impl Script {
    /// A script that runs `workload` with `workload_arg` under `variant`, every NMI returning at once.
    pub const fn new(variant: Variant, workload: Workload, workload_arg: u32) -> Self {
        Self {
            magic: SCRIPT_MAGIC,
            version: ABI_VERSION,
            variant: variant.code(),
            options: 0,
            workload: workload as u32,
            workload_arg,
            action_count: 0,
            reserved: 0,
            actions: [Action::NONE; SCRIPT_ACTION_SLOTS],
        }
    }
}

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
    /// Ring-3 points (writes to [`USER_POINT_ADDRESS`]) the user workload passed, as it counted
    /// them.
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
    /// The guest's [`ABI_VERSION`].
    pub version: u32,
    /// This run's counters.
    pub counters: Counters,
    /// Filled before a PANIC report.
    pub panic: PanicRecord,
}

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use super::*;

    #[test]
    fn layouts_are_pinned() {
        assert_eq!(size_of::<Scribble>(), 8);
        assert_eq!(size_of::<Action>(), 16);
        assert_eq!(size_of::<Script>(), 32 + 16 * SCRIPT_ACTION_SLOTS);
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
