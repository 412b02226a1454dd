//! The NMI entries (one per file in `entries/`) and the nested-NMI stack layout an entry may
//! declare.

use crate::NMI_STACK_SPAN;

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

// The build checked every entry's layout against the same span.
const _: () = assert!(CHECKED_NMI_STACK_SPAN == NMI_STACK_SPAN);
