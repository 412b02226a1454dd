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
//! 9-10   0x48      the LDT                 one entry, loaded with `lldt` at boot:
//!          0x07      LDT 0: user data 16-bit, DPL 3
//! 11     0x5b      user code32, DPL 3      compatibility mode, where espfix64's leak shows
//! ```
//!
//! Linux's 16-bit SS lives in the LDT (modify_ldt), and so does this guest's where the host
//! lets an IRET load an SS from the LDT (`option::LDT_SS16`). On the kvm_pvm host such an IRETQ
//! raises #GP, so there the user workload's 16-bit SS is the GDT's 0x2b
//! (reference/kvm-on-this-host.md §9).

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
/// espfix64, on hosts without LDT stacks.
pub const USER_DATA16_SELECTOR: u16 = 0x2b;
/// Selector of the LDT's 16-bit user data segment (LDT index 0, TI = 1, RPL 3): the SS whose
/// IRET takes espfix64, as in Linux.
pub const USER_LDT_DATA16_SELECTOR: u16 = 0x07;
/// Selector of the alternate 64-bit user code segment (GDT index 6, RPL 3), which an NMI
/// action or the `bad_return` system call may mark not-present.
pub const USER_ALT_CODE_SELECTOR: u16 = 0x33;
/// Selector of the 32-bit user code segment (GDT index 11, RPL 3): compatibility mode, where
/// an IRET to a 16-bit SS loads only SP (Linux's __USER32_CS).
pub const USER_CODE32_SELECTOR: u16 = 0x5b;
/// The STAR[63:48] base: SYSRET loads SS = base + 8 and CS = base + 16, RPL 3 forced.
pub const SYSRET_BASE_SELECTOR: u16 = 0x13;
/// Selector of the TSS (GDT index 7; its descriptor takes indexes 7 and 8).
const TSS_SELECTOR: u16 = 0x38;
/// Selector of the LDT (GDT index 9; its descriptor takes indexes 9 and 10).
const LDT_SELECTOR: u16 = 0x48;

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
/// 32-bit user code: limit 0xfffff, G=1, D=1, L=0, access 0xfb.
const USER_CODE32: u64 = 0x00cf_fb00_0000_ffff;
/// 16-bit user data: limit 0xffff, G=0, D/B=0 (a 16-bit stack: IRET loads only SP on
/// hardware), access 0xf3.
const USER_DATA16: u64 = 0x0000_f300_0000_ffff;
/// The descriptor's present bit (P, bit 47).
const PRESENT: u64 = 1 << 47;
/// Access byte of an available 64-bit TSS: present (0x80), DPL 0, S=0 (system), type 0x9
/// (SDM Vol. 3A §8.2.3 "TSS Descriptor in 64-bit mode", Figure 8-4). `ltr` turns it busy (0xb).
const TSS_AVAILABLE: u64 = 0x89;
/// Access byte of an LDT descriptor: present (0x80), DPL 0, S=0 (system), type 0x2 (SDM Vol. 3A
/// §3.5, Table 3-2; in 64-bit mode a 16-byte descriptor like the TSS's).
const LDT_TYPE: u64 = 0x82;

/// The in-memory operand of `lgdt` / `lidt` (SDM Vol. 3A §3.5.1, Figure 3-11).
#[repr(C, packed)]
pub struct TablePointer {
    /// Size of the table minus one.
    pub limit: u16,
    /// Linear address of the table.
    pub base: u64,
}

/// Number of 8-byte GDT slots: null, two kernel and five user segments, and the two halves of
/// the TSS and of the LDT descriptors.
const ENTRIES: usize = 12;

#[repr(C, align(16))]
struct Gdt([u64; ENTRIES]);

/// Written by `ltr` (busy bit), hence mutable.
static mut GDT: Gdt = Gdt([
    0,
    KERNEL_CODE,
    KERNEL_DATA,
    USER_DATA,
    USER_CODE,
    USER_DATA16,
    USER_CODE,
    0,
    0,
    0,
    0,
    USER_CODE32,
]);

/// The LDT: the 16-bit user stack segment, as `modify_ldt` would install it.
#[repr(C, align(16))]
struct Ldt([u64; 1]);

static LDT: Ldt = Ldt([USER_DATA16]);

/// The 16-byte descriptor of a system segment of type `access` at `base` with byte-granular
/// `limit` (SDM Vol. 3A Figure 8-4): low qword as a 32-bit descriptor, high qword base[63:32].
fn system_descriptor(access: u64, base: u64, limit: u64) -> [u64; 2] {
    let low = (limit & 0xffff)
        | (base & 0xff_ffff) << 16
        | access << 40
        | ((limit >> 16) & 0xf) << 48
        | ((base >> 24) & 0xff) << 56;
    [low, base >> 32]
}

/// Sets up the TSS, loads the GDT, reloads every segment register from it and loads the TR.
/// Must run before any IST is used, i.e. before the IDT is loaded.
pub fn init() {
    let tss = system_descriptor(TSS_AVAILABLE, tss::init(), tss::LIMIT);
    let ldt = system_descriptor(LDT_TYPE, addr_of!(LDT) as u64, size_of::<Ldt>() as u64 - 1);
    let gdt = addr_of_mut!(GDT);
    for (selector, descriptor) in [(TSS_SELECTOR, tss), (LDT_SELECTOR, ldt)] {
        let slot = selector as usize / 8;
        // SAFETY: in-bounds slots of the GDT static, which is not loaded yet.
        unsafe {
            (*gdt).0[slot] = descriptor[0];
            (*gdt).0[slot + 1] = descriptor[1];
        }
    }
    let pointer = TablePointer { limit: size_of::<Gdt>() as u16 - 1, base: addr_of!(GDT) as u64 };
    // SAFETY: the new GDT has the same code and data descriptors as the VMM's, so the reloads
    // change nothing but where the CPU finds them. CS can only be reloaded by a far transfer:
    // a far return to the next instruction. `ltr` needs the available TSS descriptor just
    // written, and marks it busy; `lldt` the LDT descriptor.
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
            "lldt {ldt:x}",
            pointer = in(reg) &pointer,
            code = in(reg) u64::from(KERNEL_CODE_SELECTOR),
            data = in(reg) u64::from(KERNEL_DATA_SELECTOR),
            tss = in(reg) u64::from(TSS_SELECTOR),
            ldt = in(reg) u64::from(LDT_SELECTOR),
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
