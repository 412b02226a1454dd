//! The script: what the host asks of one run (workload, NMI entry, and what each `do_nmi` call
//! does), written into the guest before it runs.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::{ABI_VERSION, Variant};

/// `Script::magic`: "NMIS" little-endian. A script without it was never written by the host.
pub const SCRIPT_MAGIC: u32 = u32::from_le_bytes(*b"NMIS");

/// Number of per-call entries in [`Script::actions`], the most actions any schedule can have.
/// Calls beyond the last entry return at once.
pub const SCRIPT_ACTION_SLOTS: usize = 32;

/// Bits of [`Script::options`].
pub mod option {
    /// Unmask NMIs right after `first_nmi` with an IRETQ to the next instruction, as Linux's
    /// CONFIG_DEBUG_ENTRY does: a built-in stress mode for the `linux`-derived entries.
    pub const STRESS_UNMASK: u32 = 1 << 0;
    /// The user workload's system-call instruction is `syscall`, for hosts where SYSCALL from
    /// CPL3 enters CPL0 (ordinary KVM). Without it, it is `ud2`, whose #UD the kernel turns into
    /// the SYSCALL entry (kvm_pvm, where SYSCALL stays at CPL3).
    pub const NATIVE_SYSCALL: u32 = 1 << 1;
    /// The user workload's 16-bit SS comes from the LDT, as Linux's do (`modify_ldt`), for
    /// hosts where an IRET to an LDT SS works (ordinary KVM). Without it, it is the GDT's
    /// (kvm_pvm, where an IRET to an LDT SS raises #GP).
    pub const LDT_SS16: u32 = 1 << 2;
    /// Every bit the guest understands.
    pub const ALL: u32 = STRESS_UNMASK | NATIVE_SYSCALL | LDT_SS16;
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
    /// Call code where no memory is (the points' MMIO page): KVM reports an emulation
    /// failure on every host.
    EmulationError = 3,
    /// Spin forever on a `jmp` to itself without any exit.
    Spin = 4,
    /// Execute `vmcall`, which never returns to the host on kvm_pvm.
    Vmcall = 5,
    /// Write one qword into each of `workload_arg` consecutive pages of scratch memory, then DONE.
    Scribble = 6,
    /// Execute `workload_arg` ring-0 `int3`s, each handled by #BP on its IST stack, then DONE.
    Breakpoint = 7,
    /// `workload_arg` times `out` to [`port::PING`](crate::port::PING), then DONE; 0 is the
    /// idle guest.
    Ping = 8,
    /// `workload_arg` iterations of the ring-3 workload: register checks, points (MMIO writes
    /// to [`USER_POINT_ADDRESS`](crate::USER_POINT_ADDRESS)), system calls (one with RSP on
    /// the NMI stack), returns through espfix64 and a faulting return to user, then DONE.
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
    /// Overwrite random bytes of a guest structure, as
    /// [`Action::scribble`](crate::Action::scribble) says, after the busy work and before the
    /// other faults. Only `nmifuzz chaos` uses it: it tests that nothing the guest does to
    /// itself can break the VMM, and is no bug of an NMI entry. The schedule format cannot
    /// express it, so campaigns never generate it.
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
    /// The whole [`Mailbox`](crate::Mailbox).
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

/// Slots of [`Script::user_flags`].
pub const USER_FLAG_SLOTS: usize = 7;

/// RFLAGS bits the user workload may set before its system calls and ring-3 points
/// ([`Script::user_flags`]): the arithmetic flags, which every return must give back, and the
/// ones an entry from ring 3 must not trust. SYSCALL's SFMASK clears DF, AC and NT (and TF and
/// IF) for the kernel; an exception or NMI entry clears DF with `cld`. TF and IF stay off:
/// the host's stepping owns TF, and the guest takes no interrupts.
pub mod user_flag {
    /// Carry.
    pub const CF: u32 = 1 << 0;
    /// Parity.
    pub const PF: u32 = 1 << 2;
    /// Auxiliary carry.
    pub const AF: u32 = 1 << 4;
    /// Zero.
    pub const ZF: u32 = 1 << 6;
    /// Sign.
    pub const SF: u32 = 1 << 7;
    /// Direction: string instructions go down. The kernel's C code must never see it set.
    pub const DF: u32 = 1 << 10;
    /// Overflow.
    pub const OF: u32 = 1 << 11;
    /// Nested task: an IRET with it set raises #GP in 64-bit mode.
    pub const NT: u32 = 1 << 14;
    /// Alignment check: with SMAP it lets the kernel touch user memory.
    pub const AC: u32 = 1 << 18;
    /// Every bit the user workload may set.
    pub const ALL: u32 = CF | PF | AF | ZF | SF | DF | OF | NT | AC;
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
    /// How many entries of `user_flags` are valid (at most [`USER_FLAG_SLOTS`]); 0: the user
    /// workload sets none.
    pub user_flag_count: u32,
    /// The [`user_flag`] bits the user workload sets before each of its system calls and
    /// ring-3 points, in turn, starting over after the last.
    pub user_flags: [u32; USER_FLAG_SLOTS],
}

impl Script {
    /// A script that runs `workload` with `workload_arg` under `variant`, every NMI returning at
    /// once.
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
            user_flag_count: 0,
            user_flags: [0; USER_FLAG_SLOTS],
        }
    }
}
