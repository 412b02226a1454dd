//! The 64-bit Task-State Segment and the interrupt stacks (IST) it points to.
//!
//! In 64-bit mode the TSS holds no task state: the CPU reads it only for stack pointers (Intel
//! SDM Vol. 3A §8.7 "Task Management in 64-bit Mode", Figure 8-11). A gate with a non-zero IST
//! field makes the CPU load RSP from `ist[n - 1]` on every delivery through it, nested or not
//! (§6.14.5 "Interrupt Stack Table"); that unconditional reload is what makes nested NMIs
//! overwrite each other's frames. (Section numbers are those of recent SDM editions, where Task
//! Management is chapter 8; older ones number it 7.)
//!
//! `rsp[0]` (TSS.RSP0) is the top of the kernel's "thread stack": the CPU loads it on every
//! exception or interrupt from ring 3 through a gate without IST, and the system-call entry,
//! the user-mode NMI path and the return to user mode run on it (Linux's
//! `cpu_current_top_of_stack` of the one task there is).
//!
//! Each of these stacks has guard qwords at both ends; [`check_guards`] verifies them whenever
//! an NMI handler iteration ends and at the end of a run (invariant 3 of the design: stack
//! discipline).

use core::mem::{offset_of, size_of};
use core::ops::Range;
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use crate::invariant;
use crate::scribble::Region;

/// The guest's IST stacks, as the 1-based numbers a gate's IST field holds (0 in that field
/// means "stay on the current stack").
#[derive(Clone, Copy)]
#[repr(u8)]
pub enum Ist {
    /// NMI (vector 2).
    Nmi = 1,
    /// #DF (vector 8), so that a double fault caused by a broken stack still has one.
    DoubleFault = 2,
    /// #BP and #DB (vectors 3 and 1), as Linux once had them (`DEBUG_STACK`).
    Debug = 3,
}

/// The 64-bit TSS (SDM Vol. 3A Figure 8-11). `packed(4)`: the 64-bit fields sit at offsets that
/// are multiples of 4 only.
#[repr(C, packed(4))]
struct Tss {
    reserved_0: u32,
    /// Stack pointers for privilege changes to rings 0-2: `rsp[0]` is the thread stack's top.
    rsp: [u64; 3],
    reserved_1: u64,
    /// IST1..IST7.
    ist: [u64; 7],
    reserved_2: u64,
    reserved_3: u16,
    /// Offset of the I/O permission bitmap; at the limit means "none" (ring 0 needs none).
    iomap_base: u16,
}

const _: () = assert!(size_of::<Tss>() == 0x68);
const _: () = assert!(offset_of!(Tss, ist) == 0x24);

/// The TSS descriptor's limit: the last byte of the TSS.
pub const LIMIT: u64 = size_of::<Tss>() as u64 - 1;

/// Bytes in each IST stack, guard qwords included.
const STACK_SIZE: usize = 16 * 1024;
const STACK_QWORDS: usize = STACK_SIZE / 8;
/// Guard qwords above the usable top: two, so the top stays 16-byte aligned.
const TOP_GUARDS: usize = 2;
/// The guard value: "ISTGUARD" in memory, easy to spot in a dump.
const GUARD: u64 = u64::from_le_bytes(*b"ISTGUARD");
/// Bytes from the NMI stack's lowest qword up to its usable top (IST1): the range an NMI
/// entry's "interrupted RSP on the NMI stack" test covers.
pub const NMI_STACK_SPAN: u64 = (STACK_SIZE - 8 * TOP_GUARDS) as u64;
// The host judges RSPs with the same span.
const _: () = assert!(NMI_STACK_SPAN == nmifuzz_abi::NMI_STACK_SPAN);

/// One IST stack (or the thread stack): `[GUARD, usable..., GUARD, GUARD]`, whole pages, between
/// unmapped guard pages (link.ld's `.stacks`, [`crate::stacks`]).
#[repr(C, align(4096))]
struct IstStack([u64; STACK_QWORDS]);

/// The NMI stack (IST1).
#[unsafe(no_mangle)]
#[unsafe(link_section = ".stack.nmi")]
static mut NMI_IST_STACK: IstStack = IstStack([0; STACK_QWORDS]);
/// The double-fault stack (IST2).
#[unsafe(no_mangle)]
#[unsafe(link_section = ".stack.double_fault")]
static mut DOUBLE_FAULT_IST_STACK: IstStack = IstStack([0; STACK_QWORDS]);
/// The breakpoint / debug stack (IST3).
#[unsafe(no_mangle)]
#[unsafe(link_section = ".stack.debug")]
static mut DEBUG_IST_STACK: IstStack = IstStack([0; STACK_QWORDS]);
/// The kernel thread stack (TSS.RSP0), for everything that enters the kernel from ring 3.
#[unsafe(no_mangle)]
#[unsafe(link_section = ".stack.thread")]
static mut THREAD_STACK: IstStack = IstStack([0; STACK_QWORDS]);

static mut TSS: Tss = Tss {
    reserved_0: 0,
    rsp: [0; 3],
    reserved_1: 0,
    ist: [0; 7],
    reserved_2: 0,
    reserved_3: 0,
    iomap_base: size_of::<Tss>() as u16,
};

/// Each guarded stack with the name its guard-check panic uses; the IST stacks first, in
/// [`stack_top_region`]'s order.
fn stacks() -> [(*mut IstStack, &'static str); 4] {
    [
        (addr_of_mut!(NMI_IST_STACK), "NMI IST"),
        (addr_of_mut!(DOUBLE_FAULT_IST_STACK), "double-fault IST"),
        (addr_of_mut!(DEBUG_IST_STACK), "debug IST"),
        (addr_of_mut!(THREAD_STACK), "thread"),
    ]
}

/// The four stacks of this module by name, for [`crate::stacks`].
pub fn stack_ranges() -> [(&'static str, Range<u64>); 4] {
    stacks().map(|(stack, name)| {
        let base = stack as u64;
        (name, base..base + STACK_SIZE as u64)
    })
}

/// Where the guard qwords of `stack` live: its lowest qword and the `TOP_GUARDS` (two) highest.
fn guard_slots(stack: *mut IstStack) -> [*mut u64; 1 + TOP_GUARDS] {
    let base = stack.cast::<u64>();
    // SAFETY: all three offsets are inside the stack's `STACK_QWORDS` qwords.
    unsafe { [base, base.add(STACK_QWORDS - TOP_GUARDS), base.add(STACK_QWORDS - 1)] }
}

/// The usable top of `stack`: just below its top guards, 16-byte aligned.
fn top(stack: *mut IstStack) -> u64 {
    // SAFETY: the offset is inside the stack.
    unsafe { stack.cast::<u64>().add(STACK_QWORDS - TOP_GUARDS) as u64 }
}

/// The NMI stack's usable top: what IST1 holds, where the CPU writes every NMI's frame.
pub fn nmi_stack_top() -> u64 {
    top(addr_of_mut!(NMI_IST_STACK))
}

/// The thread stack's usable top: TSS.RSP0, and the per-CPU `top_of_stack`.
pub fn thread_stack_top() -> u64 {
    top(addr_of_mut!(THREAD_STACK))
}

/// Whether `address` lies on the NMI stack, from its lowest qword up to and including its top.
pub fn on_nmi_stack(address: u64) -> bool {
    let top = nmi_stack_top();
    (top - NMI_STACK_SPAN..=top).contains(&address)
}

/// Writes the guard qwords and fills in the TSS; returns the TSS's address for its descriptor.
pub fn init() -> u64 {
    for (stack, _) in stacks() {
        for slot in guard_slots(stack) {
            // SAFETY: the slot is inside an IST stack that nothing uses yet.
            unsafe { write_volatile(slot, GUARD) };
        }
    }
    let mut ist = [0; 7];
    ist[Ist::Nmi as usize - 1] = top(addr_of_mut!(NMI_IST_STACK));
    ist[Ist::DoubleFault as usize - 1] = top(addr_of_mut!(DOUBLE_FAULT_IST_STACK));
    ist[Ist::Debug as usize - 1] = top(addr_of_mut!(DEBUG_IST_STACK));
    // SAFETY: fields of the TSS static, which the CPU does not read before `ltr`. The fields
    // are only 4-byte aligned, hence the unaligned writes.
    unsafe {
        addr_of_mut!(TSS.ist).write_unaligned(ist);
        addr_of_mut!(TSS.rsp).write_unaligned([thread_stack_top(), 0, 0]);
    }
    addr_of!(TSS) as u64
}

/// Panics if any guarded stack's guard qwords changed since [`init`]: something wrote past a
/// stack's end, below or above. Three loads and compares per stack on the good path.
pub fn check_guards() {
    for (stack, name) in stacks() {
        for slot in guard_slots(stack) {
            // SAFETY: the slot is inside an IST stack; guards are never written after `init`.
            let value = unsafe { read_volatile(slot) };
            if value != GUARD {
                smashed(name, slot, value);
            }
        }
    }
}

#[cold]
#[inline(never)]
fn smashed(name: &str, slot: *mut u64, value: u64) -> ! {
    invariant::violated(
        3,
        format_args!("{name} stack guard at {:#x} smashed: {value:#x}", slot as u64),
    );
}

/// The whole TSS, for the chaos `scribble` action.
pub fn scribble_region() -> Region {
    Region { base: addr_of_mut!(TSS).cast(), len: size_of::<Tss>() }
}

/// The top 512 bytes of IST stack `index` (0: NMI, 1: double fault, 2: debug), top guards
/// included: where every frame of an NMI or exception on it lives. For the chaos `scribble`.
pub fn stack_top_region(index: usize) -> Region {
    const LEN: usize = 512;
    let (stack, _) = stacks()[index];
    // SAFETY: `STACK_SIZE - LEN` is inside the stack, which is `STACK_SIZE` bytes long.
    Region { base: unsafe { stack.cast::<u8>().add(STACK_SIZE - LEN) }, len: LEN }
}
