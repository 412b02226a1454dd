//! The host → guest half of an input: the [`Script`] buffer, its validation, and the per-call
//! actions `do_nmi` reads from it.
//!
//! The host writes the buffer after the READY snapshot and before every run, behind the
//! compiler's back, so it is only ever read with volatile accesses, and only after READY.

use core::arch::asm;
use core::mem::{MaybeUninit, size_of};
use core::ptr::{addr_of, addr_of_mut, read_volatile};

use nmifuzz_abi::{
    ABI_VERSION, Action, MAX_BUSY_ITERATIONS, MAX_SCRIBBLE_BYTES, SCRIPT_ACTION_SLOTS,
    SCRIPT_MAGIC, Scribble, ScribbleArea, Script, USER_FLAG_SLOTS, Variant, Workload, fault,
    option, user_flag,
};

use crate::panic::fail;
use crate::scribble::Region;

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
    /// The [`option`] bits.
    pub options: u32,
    /// The RFLAGS bits the user workload sets before each system call and ring-3 point, in
    /// turn ([`Script::user_flags`]); empty: none.
    pub user_flags: UserFlags,
}

/// The valid part of [`Script::user_flags`].
#[derive(Clone, Copy)]
pub struct UserFlags {
    pub count: usize,
    pub flags: [u32; USER_FLAG_SLOTS],
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

/// Checks the copy `read` made. Each field is loaded once, and the value compared is the value
/// reported: a guest whose stack is being overwritten (a workload left running on the NMI
/// stack by a broken entry) must not report "reserved must be 0, got 0x0".
fn validate(script: &Script) -> Run {
    let magic = once(&script.magic);
    if magic != SCRIPT_MAGIC {
        fail!("script: bad magic {magic:#010x}, expected {SCRIPT_MAGIC:#010x}");
    }
    let version = once(&script.version);
    if version != ABI_VERSION {
        fail!("script: unsupported version {version}, expected {ABI_VERSION}");
    }
    let code = once(&script.variant);
    let Some(variant) = Variant::from_code(code) else {
        fail!("script: unknown variant code {code}");
    };
    let code = once(&script.workload);
    let Some(workload) = Workload::from_code(code) else {
        fail!("script: unknown workload code {code}");
    };
    let options = once(&script.options);
    let unknown = options & !option::ALL;
    if unknown != 0 {
        fail!("script: unknown option bits {unknown:#x}");
    }
    let reserved = once(&script.reserved);
    if reserved != 0 {
        fail!("script: reserved must be 0, got {reserved:#x}");
    }
    let count = once(&script.action_count) as usize;
    if count > SCRIPT_ACTION_SLOTS {
        fail!("script: action_count {count} exceeds {SCRIPT_ACTION_SLOTS}");
    }
    for (index, action) in script.actions[..count].iter().enumerate() {
        validate_action(index, &once(action));
    }
    let user_flags = validate_user_flags(script);
    Run { variant, workload, workload_arg: once(&script.workload_arg), options, user_flags }
}

/// Checks the user flags: at most [`USER_FLAG_SLOTS`], each only [`user_flag`] bits.
fn validate_user_flags(script: &Script) -> UserFlags {
    let count = once(&script.user_flag_count) as usize;
    if count > USER_FLAG_SLOTS {
        fail!("script: user_flag_count {count} exceeds {USER_FLAG_SLOTS}");
    }
    let flags = once(&script.user_flags);
    for (index, bits) in flags[..count].iter().enumerate() {
        let unknown = bits & !user_flag::ALL;
        if unknown != 0 {
            fail!(
                "script: user flags {index} have bits the user workload cannot set: {unknown:#x}"
            );
        }
    }
    UserFlags { count, flags }
}

/// Checks action `index`: bounded busy work, known fault bits, and a scribble only with the
/// scribble bit.
#[inline(always)]
fn validate_action(index: usize, action: &Action) {
    if action.busy > MAX_BUSY_ITERATIONS {
        fail!("script: action {index} busy {} exceeds {MAX_BUSY_ITERATIONS}", action.busy);
    }
    let unknown = action.faults & !fault::ALL;
    if unknown != 0 {
        fail!("script: action {index} has unknown fault bits {unknown:#x}");
    }
    let Scribble { area, bytes, seed } = action.scribble;
    if action.faults & fault::SCRIBBLE == 0 {
        if (area, bytes, seed) != (0, 0, 0) {
            fail!("script: action {index} has a scribble but not the scribble fault bit");
        }
        return;
    }
    if ScribbleArea::from_code(area).is_none() {
        fail!("script: action {index} scribbles unknown area {area}");
    }
    if !(1..=MAX_SCRIBBLE_BYTES).contains(&bytes) {
        fail!("script: action {index} scribbles {bytes} bytes, not 1 to {MAX_SCRIBBLE_BYTES}");
    }
}

/// One volatile load of `field`: the compiler may neither repeat nor drop it.
#[inline(always)]
fn once<T: Copy>(field: &T) -> T {
    // SAFETY: a reference is valid and aligned for a read.
    unsafe { read_volatile(field) }
}

/// What the `index`-th `do_nmi` call of this run does, or `None` past the script's last action.
///
/// Reads the host's buffer directly rather than a copy (a copy would cost every run a few
/// hundred emulated instructions), and checks the action it returns as [`read`] does: an NMI
/// can arrive before [`read`] ran (at a run's first instruction), and the script may have been
/// overwritten since, so an action that was never validated must not ask for four billion
/// rounds of busy work.
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
    // SAFETY: as above; `index < SCRIPT_ACTION_SLOTS` (checked by the indexing).
    let action = unsafe { read_volatile(addr_of!((*script).actions[index])) };
    validate_action(index, &action);
    Some(action)
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

/// The whole script buffer, for the chaos `scribble` action.
pub fn scribble_region() -> Region {
    Region { base: addr_of_mut!(NMIFUZZ_SCRIPT).cast(), len: size_of::<Script>() }
}
