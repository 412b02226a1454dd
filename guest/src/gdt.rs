//! The guest's own GDT: null, kernel code, kernel data and the 64-bit TSS descriptor.
//!
//! The VMM's GDT lives in memory the guest does not own and has no usable TSS, and IST stacks
//! need a loaded TSS, so the guest brings its own and switches to it before loading its IDT.
//! The code and data descriptors are the ones the VMM entered with, so selectors 0x08 and 0x10
//! keep their meaning.

use core::arch::asm;
use core::mem::size_of;
use core::ptr::{addr_of, addr_of_mut};

use crate::scribble::Region;
use crate::tss;

/// Selector of the 64-bit kernel code segment (GDT index 1, RPL 0).
pub const KERNEL_CODE_SELECTOR: u16 = 0x08;
/// Selector of the kernel data segment (GDT index 2, RPL 0).
pub const KERNEL_DATA_SELECTOR: u16 = 0x10;
/// Selector of the TSS (GDT index 3; its descriptor takes indexes 3 and 4).
const TSS_SELECTOR: u16 = 0x18;

/// 64-bit code: limit 0xfffff, G=1, L=1, D=0; access 0x9b = present, DPL 0, code,
/// execute/read, accessed (SDM Vol. 3A §3.4.5 "Segment Descriptors", §5.2.1 for the L flag).
/// Accessed is preset so the CPU never writes the descriptor.
const KERNEL_CODE: u64 = 0x00af_9b00_0000_ffff;
/// Data: limit 0xfffff, G=1, D/B=1; access 0x93 = present, DPL 0, data, read/write, accessed.
const KERNEL_DATA: u64 = 0x00cf_9300_0000_ffff;
/// Access byte of an available 64-bit TSS: present (0x80), DPL 0, S=0 (system), type 0x9
/// (SDM Vol. 3A §8.2.3 "TSS Descriptor in 64-bit mode", Figure 8-4). `ltr` turns it busy (0xb).
const TSS_AVAILABLE: u64 = 0x89;

/// The in-memory operand of `lgdt` / `lidt` (SDM Vol. 3A §3.5.1, Figure 3-11).
#[repr(C, packed)]
pub struct TablePointer {
    /// Size of the table minus one.
    pub limit: u16,
    /// Linear address of the table.
    pub base: u64,
}

/// Number of 8-byte GDT slots: null, code, data and the two halves of the TSS descriptor.
const ENTRIES: usize = 5;

#[repr(C, align(16))]
struct Gdt([u64; ENTRIES]);

/// Written by `ltr` (busy bit), hence mutable.
static mut GDT: Gdt = Gdt([0, KERNEL_CODE, KERNEL_DATA, 0, 0]);

/// The 16-byte descriptor of an available 64-bit TSS at `base` with byte-granular `limit`
/// (SDM Vol. 3A Figure 8-4): low qword as a 32-bit descriptor, high qword base[63:32].
fn tss_descriptor(base: u64, limit: u64) -> [u64; 2] {
    let low = (limit & 0xffff)
        | (base & 0xff_ffff) << 16
        | TSS_AVAILABLE << 40
        | ((limit >> 16) & 0xf) << 48
        | ((base >> 24) & 0xff) << 56;
    [low, base >> 32]
}

/// Sets up the TSS, loads the GDT, reloads every segment register from it and loads the TR.
/// Must run before any IST is used, i.e. before the IDT is loaded.
pub fn init() {
    let [low, high] = tss_descriptor(tss::init(), tss::LIMIT);
    let gdt = addr_of_mut!(GDT);
    // SAFETY: in-bounds slots of the GDT static, which is not loaded yet.
    unsafe {
        (*gdt).0[TSS_SELECTOR as usize / 8] = low;
        (*gdt).0[TSS_SELECTOR as usize / 8 + 1] = high;
    }
    let pointer = TablePointer { limit: size_of::<Gdt>() as u16 - 1, base: addr_of!(GDT) as u64 };
    // SAFETY: the new GDT has the same code and data descriptors as the VMM's, so the reloads
    // change nothing but where the CPU finds them. CS can only be reloaded by a far transfer:
    // a far return to the next instruction. `ltr` needs the available TSS descriptor just
    // written, and marks it busy.
    unsafe {
        asm!(
            "lgdt [{pointer}]",
            "push {code}",               // far return frame: CS ...
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",                // ... and RIP
            "retfq",
            "2:",
            "mov ds, {data:x}",
            "mov es, {data:x}",
            "mov ss, {data:x}",
            "mov fs, {data:x}",
            "mov gs, {data:x}",
            "ltr {tss:x}",
            pointer = in(reg) &pointer,
            code = in(reg) u64::from(KERNEL_CODE_SELECTOR),
            data = in(reg) u64::from(KERNEL_DATA_SELECTOR),
            tss = in(reg) u64::from(TSS_SELECTOR),
            tmp = out(reg) _,
            options(preserves_flags)
        );
    }
}

/// The whole GDT, for the chaos `scribble` action.
pub fn scribble_region() -> Region {
    Region { base: addr_of_mut!(GDT).cast(), len: size_of::<Gdt>() }
}
