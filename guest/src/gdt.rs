//! The guest's own GDT: null, kernel code, kernel data, the user workload's segments and the
//! 64-bit TSS descriptor.
//!
//! The VMM's GDT lives in memory the guest does not own and has no usable TSS, and IST stacks
//! need a loaded TSS, so the guest brings its own and switches to it before loading its IDT.
//! The code and data descriptors are the ones the VMM entered with, so selectors 0x08 and 0x10
//! keep their meaning.
//!
//! ```text
//! index  selector  descriptor
//! 0      -         null
//! 1      0x08      kernel code64           STAR[47:32]: SYSCALL's CS (SS = 0x10)
//! 2      0x10      kernel data
//! 3      0x1b      user data, DPL 3        STAR[63:48] = 0x13: SYSRET's SS = 0x13 + 8
//! 4      0x23      user code64, DPL 3      ... and its CS = 0x13 + 16 (Linux's __USER_CS)
//! 5      0x2b      user data 16-bit, DPL 3 the SS espfix64 exists for (D/B = 0)
//! 6      0x33      user code64, DPL 3      the "alternate" CS, revocable (fault::REVOKE_CS)
//! 7-8    0x38      64-bit TSS
//! ```
//!
//! Linux's 16-bit SS lives in the LDT (modify_ldt); on the kvm_pvm host an IRETQ to an LDT
//! SS raises #GP, so this guest keeps it in the GDT (reference/kvm-on-this-host.md §9).

use core::arch::asm;
use core::mem::size_of;
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use crate::scribble::Region;
use crate::tss;

/// Selector of the 64-bit kernel code segment (GDT index 1, RPL 0).
pub const KERNEL_CODE_SELECTOR: u16 = 0x08;
/// Selector of the kernel data segment (GDT index 2, RPL 0).
pub const KERNEL_DATA_SELECTOR: u16 = 0x10;
/// Selector of the user data segment (GDT index 3, RPL 3): SYSRET's SS, Linux's __USER_DS.
pub const USER_DATA_SELECTOR: u16 = 0x1b;
/// Selector of the 64-bit user code segment (GDT index 4, RPL 3): SYSRET's CS, __USER_CS.
pub const USER_CODE_SELECTOR: u16 = 0x23;
/// Selector of the 16-bit user data segment (GDT index 5, RPL 3): an SS whose IRET takes
/// espfix64.
pub const USER_DATA16_SELECTOR: u16 = 0x2b;
/// Selector of the alternate 64-bit user code segment (GDT index 6, RPL 3), which an NMI
/// action or the `bad_return` system call may mark not-present.
pub const USER_ALT_CODE_SELECTOR: u16 = 0x33;
/// The STAR[63:48] base: SYSRET loads SS = base + 8 and CS = base + 16, RPL 3 forced.
pub const SYSRET_BASE_SELECTOR: u16 = 0x13;
/// Selector of the TSS (GDT index 7; its descriptor takes indexes 7 and 8).
const TSS_SELECTOR: u16 = 0x38;

const _: () = assert!(SYSRET_BASE_SELECTOR + 8 == USER_DATA_SELECTOR);
const _: () = assert!(SYSRET_BASE_SELECTOR + 16 == USER_CODE_SELECTOR);

/// 64-bit code: limit 0xfffff, G=1, L=1, D=0; access 0x9b = present, DPL 0, code,
/// execute/read, accessed (SDM Vol. 3A §3.4.5 "Segment Descriptors", §5.2.1 for the L flag).
/// Accessed is preset so the CPU never writes the descriptor.
const KERNEL_CODE: u64 = 0x00af_9b00_0000_ffff;
/// Data: limit 0xfffff, G=1, D/B=1; access 0x93 = present, DPL 0, data, read/write, accessed.
const KERNEL_DATA: u64 = 0x00cf_9300_0000_ffff;
/// User data: as [`KERNEL_DATA`] with DPL 3 (access 0xf3).
const USER_DATA: u64 = 0x00cf_f300_0000_ffff;
/// 64-bit user code: as [`KERNEL_CODE`] with DPL 3 (access 0xfb).
const USER_CODE: u64 = 0x00af_fb00_0000_ffff;
/// 16-bit user data: limit 0xffff, G=0, D/B=0 (a 16-bit stack: IRET loads only SP on
/// hardware), access 0xf3.
const USER_DATA16: u64 = 0x0000_f300_0000_ffff;
/// The descriptor's present bit (P, bit 47).
const PRESENT: u64 = 1 << 47;
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

/// Number of 8-byte GDT slots: null, two kernel and four user segments, and the two halves of
/// the TSS descriptor.
const ENTRIES: usize = 9;

#[repr(C, align(16))]
struct Gdt([u64; ENTRIES]);

/// Written by `ltr` (busy bit), hence mutable.
static mut GDT: Gdt =
    Gdt([0, KERNEL_CODE, KERNEL_DATA, USER_DATA, USER_CODE, USER_DATA16, USER_CODE, 0, 0]);

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

/// Marks the alternate user code segment ([`USER_ALT_CODE_SELECTOR`]) present or not, as
/// another CPU's `modify_ldt` would change a descriptor under a running task. A CS register
/// already loaded from it keeps working; the next load (an IRET onto it) sees the change.
pub fn set_alt_code_present(present: bool) {
    // SAFETY: an in-bounds slot of the GDT static; a volatile access, since the CPU reads the
    // descriptor behind the compiler's back at the next segment load.
    unsafe {
        let slot = addr_of_mut!(GDT.0[USER_ALT_CODE_SELECTOR as usize / 8]);
        let descriptor = read_volatile(slot);
        write_volatile(slot, if present { descriptor | PRESENT } else { descriptor & !PRESENT });
    }
}

/// The whole GDT, for the chaos `scribble` action.
pub fn scribble_region() -> Region {
    Region { base: addr_of_mut!(GDT).cast(), len: size_of::<Gdt>() }
}
