//! Checked blocks: ring-3 code run with every register set to a known pattern, and checked after.
//!
//! A checked block is one `asm!` block ([`checked_asm!`]) of three parts:
//!
//! 1. [`load_patterns!`] saves RBX, RBP, RSP and SS (which `asm!` cannot declare clobbered) in
//!    [`SAVED`], sets RFLAGS and every general register except RSP from [`BEFORE`];
//! 2. the operation's own instructions (a `syscall`, a write that faults, a loop...), which may
//!    also point RSP anywhere or load SS;
//! 3. [`store_results!`] stores every general register, RSP included, and SS in [`AFTER`], then
//!    restores SS, RSP, RFLAGS (through the stack, once RSP is back: the stores are `mov`s,
//!    which leave the flags alone), RBX and RBP.
//!
//! Everything the block touches is a static addressed RIP-relative, so it needs no register and
//! no stack between the first and the last part. The Rust side ([`load`], [`results`],
//! [`compare`]) fills [`BEFORE`] and compares [`AFTER`] with what the operation should have left.
//! Registers are indexed as in [`AGENT_REGISTER_NAMES`], which the host uses to name them.

use core::cell::UnsafeCell;

use nmifuzz_abi::agent::AGENT_REGISTER_NAMES;

/// Every checked register's value, in [`AGENT_REGISTER_NAMES`] order.
pub type Regs = [u64; AGENT_REGISTER_NAMES.len()];

/// Indices into a [`Regs`] (checked against the names at compile time below).
pub const RAX: usize = 0;
pub const RCX: usize = 2;
pub const RDI: usize = 5;
pub const RSP: usize = 7;
pub const R11: usize = 11;
pub const RFLAGS: usize = 16;
pub const SS: usize = 17;

const fn names(index: usize, name: &str) -> bool {
    let (a, b) = (AGENT_REGISTER_NAMES[index].as_bytes(), name.as_bytes());
    let mut i = 0;
    while i < a.len() && i < b.len() && a[i] == b[i] {
        i += 1;
    }
    i == a.len() && i == b.len()
}
const _: () = assert!(names(RAX, "rax") && names(RCX, "rcx") && names(RDI, "rdi"));
const _: () = assert!(names(RSP, "rsp") && names(R11, "r11") && names(RFLAGS, "rflags"));
const _: () = assert!(names(SS, "ss") && names(1, "rbx") && names(6, "rbp") && names(15, "r15"));

/// RFLAGS bits a return may change without anything being wrong: RF (the CPU's "resume" flag,
/// set by exception returns) and TF (which a host that single-steps the guest may leave set).
const RFLAGS_IGNORED: u64 = 0x1_0000 | 0x100;
/// RFLAGS bits every ring-3 pattern has: bit 1 (always 1) and IF (ring 3 cannot clear it).
const RFLAGS_FIXED: u64 = 0x202;
/// RFLAGS bits the patterns vary: CF, PF, AF, ZF, SF, DF and OF, which ring 3 may set freely.
const RFLAGS_VARIED: u64 = 0x1 | 0x4 | 0x10 | 0x40 | 0x80 | 0x400 | 0x800;

/// A static that assembly (a block's, or the kernel's) reads and writes behind Rust's back.
/// Transparent: its symbol is the address of the value.
#[repr(transparent)]
pub struct Area<T>(UnsafeCell<T>);

// SAFETY: the agent is a single thread. Rust code accesses an `Area` only through raw pointers
// and never while a block that uses it runs; the signal handler only reads one (`FRAME`).
unsafe impl<T> Sync for Area<T> {}

impl<T> Area<T> {
    pub const fn new(value: T) -> Self {
        Self(UnsafeCell::new(value))
    }

    pub const fn get(&self) -> *mut T {
        self.0.get()
    }
}

/// What [`load_patterns!`] saves and [`store_results!`] restores.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Saved {
    pub rsp: u64,
    pub rbx: u64,
    pub rbp: u64,
    /// SS as the block found it (16 bits; the rest stays zero).
    pub ss: u64,
}

/// The registers a block starts with (RSP and SS only if the block's instructions load them).
pub static BEFORE: Area<Regs> = Area::new([0; AGENT_REGISTER_NAMES.len()]);
/// The registers a block ended with.
pub static AFTER: Area<Regs> = Area::new([0; AGENT_REGISTER_NAMES.len()]);
/// The registers a block saves for the code around it.
pub static SAVED: Area<Saved> = Area::new(Saved { rsp: 0, rbx: 0, rbp: 0, ss: 0 });

/// The patterns for iteration `iteration` of an operation: 0x5a5a_00ii_nnnn_nnnn in general
/// register `i` for iteration `n`, and RFLAGS with a varying mix of the flags ring 3 may set.
/// RSP and SS are placeholders: the block keeps its own unless the operation says otherwise.
pub fn patterns(iteration: u32) -> Regs {
    let mut regs = [0; AGENT_REGISTER_NAMES.len()];
    for (index, reg) in regs.iter_mut().enumerate().take(RFLAGS) {
        *reg = 0x5a5a_0000_0000_0000 | (index as u64) << 32 | u64::from(iteration);
    }
    regs[RFLAGS] = RFLAGS_FIXED | (u64::from(iteration).wrapping_mul(0x9e37) & RFLAGS_VARIED);
    regs
}

/// Sets up the next block: it will start with `regs`; [`AFTER`] is cleared (SS is stored as 16
/// bits into a zero).
pub fn load(regs: &Regs) {
    // SAFETY: no block is running; see `Area`'s `Sync`.
    unsafe {
        *BEFORE.get() = *regs;
        *AFTER.get() = [0; AGENT_REGISTER_NAMES.len()];
    }
}

/// What the last block ended with, and what it saved.
pub fn results() -> (Regs, Saved) {
    // SAFETY: no block is running; see `Area`'s `Sync`. The block wrote both from assembly,
    // which the compiler assumes may write any memory.
    unsafe { (*AFTER.get(), *SAVED.get()) }
}

/// `regs` as a block that keeps RSP and SS should end with them.
pub fn with_own_stack(mut regs: Regs, saved: Saved) -> Regs {
    regs[RSP] = saved.rsp;
    regs[SS] = saved.ss;
    regs
}

/// A register that did not come back as it should have.
#[derive(Clone, Copy, Debug)]
pub struct Mismatch {
    /// Its index in [`AGENT_REGISTER_NAMES`].
    pub register: usize,
    pub expected: u64,
    pub found: u64,
}

/// Compares every register but `unchecked` (RFLAGS without [`RFLAGS_IGNORED`], SS as 16 bits);
/// the first difference, in register order, is the error.
pub fn compare(expected: &Regs, found: &Regs, unchecked: &[usize]) -> Result<(), Mismatch> {
    let significant = |index: usize, value: u64| match index {
        RFLAGS => value & !RFLAGS_IGNORED,
        SS => value & 0xffff,
        _ => value,
    };
    for (register, (&e, &f)) in expected.iter().zip(found).enumerate() {
        let (expected, found) = (significant(register, e), significant(register, f));
        if expected != found && !unchecked.contains(&register) {
            return Err(Mismatch { register, expected, found });
        }
    }
    Ok(())
}

/// The first part of a checked block. Uses `{before}` and `{saved}` with the offsets of
/// [`Saved`]'s fields; clobbers every register but RSP (RBX and RBP are saved).
macro_rules! load_patterns {
    () => {
        "
        mov [rip + {saved} + {saved_rsp}], rsp
        mov [rip + {saved} + {saved_rbx}], rbx
        mov [rip + {saved} + {saved_rbp}], rbp
        mov word ptr [rip + {saved} + {saved_ss}], ss
        push qword ptr [rip + {before} + 16*8]  /* rflags */
        popfq
        mov rax, [rip + {before} + 0*8]
        mov rbx, [rip + {before} + 1*8]
        mov rcx, [rip + {before} + 2*8]
        mov rdx, [rip + {before} + 3*8]
        mov rsi, [rip + {before} + 4*8]
        mov rdi, [rip + {before} + 5*8]
        mov rbp, [rip + {before} + 6*8]
        mov r8, [rip + {before} + 8*8]          /* (7 is rsp) */
        mov r9, [rip + {before} + 9*8]
        mov r10, [rip + {before} + 10*8]
        mov r11, [rip + {before} + 11*8]
        mov r12, [rip + {before} + 12*8]
        mov r13, [rip + {before} + 13*8]
        mov r14, [rip + {before} + 14*8]
        mov r15, [rip + {before} + 15*8]
        "
    };
}

/// The last part of a checked block: stores, then restores what the block saved. DF is clear
/// at the end, as Rust requires.
macro_rules! store_results {
    () => {
        "
        mov [rip + {after} + 0*8], rax
        mov [rip + {after} + 1*8], rbx
        mov [rip + {after} + 2*8], rcx
        mov [rip + {after} + 3*8], rdx
        mov [rip + {after} + 4*8], rsi
        mov [rip + {after} + 5*8], rdi
        mov [rip + {after} + 6*8], rbp
        mov [rip + {after} + 7*8], rsp
        mov [rip + {after} + 8*8], r8
        mov [rip + {after} + 9*8], r9
        mov [rip + {after} + 10*8], r10
        mov [rip + {after} + 11*8], r11
        mov [rip + {after} + 12*8], r12
        mov [rip + {after} + 13*8], r13
        mov [rip + {after} + 14*8], r14
        mov [rip + {after} + 15*8], r15
        mov word ptr [rip + {after} + 17*8], ss
        mov ss, word ptr [rip + {saved} + {saved_ss}]
        mov rsp, [rip + {saved} + {saved_rsp}]
        pushfq
        pop qword ptr [rip + {after} + 16*8]    /* rflags */
        cld
        mov rbx, [rip + {saved} + {saved_rbx}]
        mov rbp, [rip + {saved} + {saved_rbp}]
        "
    };
}

/// A checked block around the instructions `$body` (which may use `{before}`, `{after}`,
/// `{saved}` and the named `$operands` given after a `;`). Must be used inside `unsafe`.
macro_rules! checked_asm {
    ($($body:expr),+ $(; $($operands:tt)*)?) => {
        core::arch::asm!(
            $crate::checks::load_patterns!(),
            $($body,)+
            $crate::checks::store_results!(),
            before = sym $crate::checks::BEFORE,
            after = sym $crate::checks::AFTER,
            saved = sym $crate::checks::SAVED,
            saved_rsp = const core::mem::offset_of!($crate::checks::Saved, rsp),
            saved_rbx = const core::mem::offset_of!($crate::checks::Saved, rbx),
            saved_rbp = const core::mem::offset_of!($crate::checks::Saved, rbp),
            saved_ss = const core::mem::offset_of!($crate::checks::Saved, ss),
            $($($operands)*)?
            out("rax") _, out("rcx") _, out("rdx") _, out("rsi") _, out("rdi") _,
            out("r8") _, out("r9") _, out("r10") _, out("r11") _,
            out("r12") _, out("r13") _, out("r14") _, out("r15") _,
        )
    };
}

pub(crate) use {checked_asm, load_patterns, store_results};
