//! The host → guest half of an input: the [`Script`] buffer, its validation, and the per-call
//! actions `do_nmi` reads from it.
//!
//! The host writes the buffer after the READY snapshot and before every run, behind the
//! compiler's back, so it is only ever read with volatile accesses, and only after READY.

use core::arch::asm;
use core::mem::{MaybeUninit, size_of};
use core::ptr::{addr_of, read_volatile};

use nmifuzz_abi::{
    ABI_VERSION, Action, MAX_ACTIONS, SCRIPT_MAGIC, Script, Variant, Workload, fault, option,
};

/// The script buffer, found by the host through the symbol `nmifuzz_abi::SCRIPT_SYMBOL`. All
/// zero until the host writes it, which fails the magic check.
#[unsafe(no_mangle)]
// SAFETY: `Script` holds only integers and arrays of integers, for which all-zero bytes are a
// valid value.
static mut NMIFUZZ_SCRIPT: Script = unsafe { core::mem::zeroed() };

/// What a valid script asks of this run.
pub struct Run {
    /// The NMI entry to install in IDT vector 2.
    pub variant: Variant,
    /// What the interrupted code does.
    pub workload: Workload,
    /// The workload's parameter.
    pub workload_arg: u32,
}

// `read` copies whole qwords.
const _: () = assert!(size_of::<Script>().is_multiple_of(8));

/// Reads the script the host wrote for this run and validates it; a malformed script is a
/// guest panic that names the field and its value.
pub fn read() -> Run {
    let mut script = MaybeUninit::<Script>::uninit();
    // A volatile read of the whole struct into a local, done as one `rep movsq`: the compiler
    // cannot see into the asm, so the copy is always made, fresh from memory. (`read_volatile`
    // would be split into some 70 loads and as many spills, each an emulated instruction.)
    // SAFETY: copies `size_of::<Script>()` bytes from the script static into the local; DF is
    // clear (Rust ABI), and only RCX, RSI and RDI change, all declared. The local is then fully
    // written, and any bit pattern is a valid `Script`.
    let script = unsafe {
        asm!(
            "rep movsq",
            inout("rcx") size_of::<Script>() / 8 => _,
            inout("rsi") addr_of!(NMIFUZZ_SCRIPT) => _,
            inout("rdi") script.as_mut_ptr() => _,
            options(nostack, preserves_flags)
        );
        script.assume_init_ref()
    };
    validate(script)
}

fn validate(script: &Script) -> Run {
    if script.magic != SCRIPT_MAGIC {
        panic!("script: bad magic {:#010x}, expected {SCRIPT_MAGIC:#010x}", script.magic);
    }
    if script.version != ABI_VERSION {
        panic!("script: unsupported version {}, expected {ABI_VERSION}", script.version);
    }
    let Some(variant) = Variant::from_code(script.variant) else {
        panic!("script: unknown variant code {}", script.variant);
    };
    let Some(workload) = Workload::from_code(script.workload) else {
        panic!("script: unknown workload code {}", script.workload);
    };
    let unknown = script.options & !option::ALL;
    if unknown != 0 {
        panic!("script: unknown option bits {unknown:#x}");
    }
    if script.reserved != 0 {
        panic!("script: reserved must be 0, got {:#x}", script.reserved);
    }
    let count = script.action_count as usize;
    if count > MAX_ACTIONS {
        panic!("script: action_count {count} exceeds {MAX_ACTIONS}");
    }
    for (index, action) in script.actions[..count].iter().enumerate() {
        let unknown = action.faults & !fault::ALL;
        if unknown != 0 {
            panic!("script: action {index} has unknown fault bits {unknown:#x}");
        }
    }
    Run { variant, workload, workload_arg: script.workload_arg }
}

/// What the `index`-th `do_nmi` call of this run does, or `None` past the script's last action.
///
/// Reads the host's buffer directly rather than a copy: [`read`] validated it before the NMI
/// entry was installed, and a copy would cost every run a few hundred emulated instructions.
#[inline(always)]
pub fn action(index: u64) -> Option<Action> {
    let script = addr_of!(NMIFUZZ_SCRIPT);
    // SAFETY: a field of the valid script static, read with a volatile access.
    let count = unsafe { read_volatile(addr_of!((*script).action_count)) };
    if index >= u64::from(count) {
        return None;
    }
    // The array index is bounds-checked, so even a script changed after validation cannot make
    // this read out of bounds.
    let index = index as usize;
    // SAFETY: as above; `index < MAX_ACTIONS` (checked by the indexing).
    Some(unsafe { read_volatile(addr_of!((*script).actions[index])) })
}

/// The variant the host installed for this run, read straight from the script buffer (also
/// before [`read`] validated it: an NMI can arrive at a run's first instruction); `None` for
/// an unknown code, which [`read`] refuses.
#[inline(always)]
pub fn variant() -> Option<Variant> {
    let script = addr_of!(NMIFUZZ_SCRIPT);
    // SAFETY: a field of the script static, read with a volatile access.
    Variant::from_code(unsafe { read_volatile(addr_of!((*script).variant)) })
}
