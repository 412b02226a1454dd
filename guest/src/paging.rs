//! The guest's own page tables: an identity map of the 16 MiB of guest memory (2 MiB pages, as
//! the VMM's boot tables have it) plus a small demand-paged region whose 4 KiB pages are not
//! present at READY and are mapped by the #PF handler, so that the workload and `do_nmi` can
//! take real page faults.
//!
//! ```text
//! virtual                         physical
//! [0, 16 MiB)                 ->  the same (PD_IDENTITY: 8 large pages)
//!   [6 MiB, 8 MiB)                of which the stacks' page: 4 KiB pages (PT_STACKS), the
//!                                 stacks only: their guard pages are not mapped
//!                                 (crate::stacks)
//!   [8 MiB, 10 MiB)               of which the user page: U/S = 1 (link.ld's `.user`)
//! [DEMAND_BASE, + 4 KiB * n)  ->  DEMAND_FRAMES[i], once the #PF handler mapped page i
//! [USER_POINT_ADDRESS, + 2 MiB) -> the same, no memory there: U/S = 1, the user workload's
//!                                 points, whose writes are MMIO exits
//! [ESPFIX_BASE, + 4 GiB)      ->  the espfix64 page, at every 64 KiB (the first 4 KiB of
//!                                 each), supervisor-only: espfix64's aliases
//! ```
//!
//! **espfix64's aliases** (Linux's `espfix_64.c`). An IRET to a 16-bit SS loads only SP and
//! leaves RSP[63:16] as they were, so espfix64 IRETs from a stack whose RSP[31:16] already are
//! the user's: the same physical page appears at every 64 KiB of a 4 GiB window whose base has
//! bits [31:0] clear, so `espfix_stack | (user RSP & 0xffff0000)` always points at the copied
//! frame. Four PDPT entries share one page directory, all of whose entries share one page table,
//! every sixteenth entry of which maps the page. The user then sees its own RSP[31:0], and
//! RSP[63:32] of the window (the leak Linux accepts). Linux maps the aliases read-only and turns
//! a fault on that IRETQ into a #GP through its #DF handler; here they are writable, so such a
//! fault pushes its frame below the copied one, on the same page.
//!
//! Ring 3 may touch only the user page: its PD entry has U/S = 1, and so do the PML4 and PDPT
//! entries above it (the CPU ANDs U/S over every level, SDM Vol. 3A §4.6.1). Every other page
//! stays supervisor-only, so a kernel RIP or a kernel address used at CPL3 is a #PF from ring 3,
//! which the exception handler reports as a broken privilege invariant. The kernel reads user
//! memory freely (CR4.SMAP is clear).
//!
//! Page 0 of the demand region belongs to the workload, which unmaps it again after each of its
//! faults; pages 1.. go to `do_nmi`'s #PF actions, one fresh page per action, left mapped for
//! the rest of the run. So a not-present page is always one whose fault is still to come, and
//! the #PF handler can tell whether CR2 is the address of its own fault.
//!
//! The host restores all of these tables at every reset, behind the guest's back: [`flush_tlb`]
//! at the start of each run drops whatever the previous run left in the TLB.

use core::arch::asm;
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use nmifuzz_abi::{SCRIPT_ACTION_SLOTS, USER_POINT_ADDRESS};

use crate::panic::fail;
use crate::scribble::Region;
use crate::{cpu, percpu, stacks};

/// Bytes of guest memory the identity map covers: the VMM's default guest memory.
const IDENTITY_BYTES: u64 = 16 << 20;
const LARGE_PAGE: u64 = 2 << 20;
const PAGE: u64 = 4096;
/// Page-table entry bits (SDM Vol. 3A §4.5, Tables 4-15 to 4-20).
const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const LARGE: u64 = 1 << 7;
/// The user page: one large page at 8 MiB, where link.ld puts `.user`.
pub const USER_PAGE_BASE: u64 = 8 << 20;
/// The stacks' page, where link.ld puts `.stacks`.
const STACKS_PAGE_BASE: u64 = 6 << 20;
/// Entries per table.
const ENTRIES: usize = 512;

/// Start of the demand-paged region: 1 GiB, the second PDPT entry, far from anything else.
pub const DEMAND_BASE: u64 = 0x4000_0000;
/// Pages in the demand region: one for the workload, one per possible `do_nmi` action.
pub const DEMAND_PAGES: usize = 1 + SCRIPT_ACTION_SLOTS;
/// The workload's demand page.
pub const WORKLOAD_PAGE: usize = 0;

/// The base of espfix64's aliases: 512 GiB, the second PML4 entry; bits [31:0] are clear.
pub const ESPFIX_BASE: u64 = 1 << 39;
/// The aliases' window: every value of RSP[31:16].
const ESPFIX_WINDOW: u64 = 4 << 30;
/// One alias every 64 KiB: every sixteenth page-table entry.
const ESPFIX_ALIAS_STRIDE: usize = (64 << 10) / PAGE as usize;

#[repr(C, align(4096))]
struct Table([u64; ENTRIES]);

#[repr(C, align(4096))]
struct Frame([u8; PAGE as usize]);

static mut PML4: Table = Table([0; ENTRIES]);
static mut PDPT: Table = Table([0; ENTRIES]);
static mut PD_IDENTITY: Table = Table([0; ENTRIES]);
static mut PD_DEMAND: Table = Table([0; ENTRIES]);
static mut PT_STACKS: Table = Table([0; ENTRIES]);
static mut PDPT_ESPFIX: Table = Table([0; ENTRIES]);
static mut PD_ESPFIX: Table = Table([0; ENTRIES]);
static mut PT_ESPFIX: Table = Table([0; ENTRIES]);
/// The demand region's page table; the workload's assembly clears its own entry by symbol.
#[unsafe(no_mangle)]
static mut DEMAND_PT: Table = Table([0; ENTRIES]);
/// The physical pages behind the demand region (identity-mapped: their addresses are physical).
static mut DEMAND_FRAMES: [Frame; DEMAND_PAGES] =
    [const { Frame([0; PAGE as usize]) }; DEMAND_PAGES];
/// The next demand page `do_nmi` touches.
static mut NEXT_NMI_PAGE: usize = WORKLOAD_PAGE + 1;

// espfix64's window starts at a PML4 entry of its own, with RSP[31:0] free.
const _: () = assert!(ESPFIX_BASE.is_multiple_of(1 << 39) && ESPFIX_BASE >> 39 < ENTRIES as u64);
// The demand region sits in one page table, under the second PDPT entry.
const _: () = assert!(DEMAND_PAGES <= ENTRIES && DEMAND_BASE == 1 << 30);
const _: () = assert!(IDENTITY_BYTES / LARGE_PAGE <= ENTRIES as u64);
const _: () = assert!(USER_PAGE_BASE.is_multiple_of(LARGE_PAGE) && USER_PAGE_BASE < IDENTITY_BYTES);
const _: () =
    assert!(STACKS_PAGE_BASE.is_multiple_of(LARGE_PAGE) && STACKS_PAGE_BASE < USER_PAGE_BASE);
// The points' page: the second large page under the demand region's PD, above any RAM.
const _: () = assert!(USER_POINT_ADDRESS == DEMAND_BASE + LARGE_PAGE);

/// Builds the tables and switches CR3 to them. The mapping of guest memory stays what it was.
pub fn init() {
    let entry = |table: *const Table| table as u64 | PRESENT | WRITABLE;
    // SAFETY: the tables are statics nothing uses yet; each index is in bounds.
    unsafe {
        for i in 0..(IDENTITY_BYTES / LARGE_PAGE) as usize {
            PD_IDENTITY.0[i] = (i as u64 * LARGE_PAGE) | PRESENT | WRITABLE | LARGE;
        }
        PD_IDENTITY.0[(USER_PAGE_BASE / LARGE_PAGE) as usize] |= USER;
        for i in 0..ENTRIES {
            let page = STACKS_PAGE_BASE + i as u64 * PAGE;
            if stacks::is_stack_page(page) {
                PT_STACKS.0[i] = page | PRESENT | WRITABLE;
            }
        }
        PD_IDENTITY.0[(STACKS_PAGE_BASE / LARGE_PAGE) as usize] = entry(addr_of!(PT_STACKS));
        PD_DEMAND.0[0] = entry(addr_of!(DEMAND_PT));
        PD_DEMAND.0[1] = USER_POINT_ADDRESS | PRESENT | WRITABLE | LARGE | USER;
        PDPT.0[0] = entry(addr_of!(PD_IDENTITY)) | USER;
        PDPT.0[1] = entry(addr_of!(PD_DEMAND)) | USER;
        PML4.0[0] = entry(addr_of!(PDPT)) | USER;
        for i in (0..ENTRIES).step_by(ESPFIX_ALIAS_STRIDE) {
            PT_ESPFIX.0[i] = percpu::espfix_page() | PRESENT | WRITABLE;
        }
        PD_ESPFIX.0 = [entry(addr_of!(PT_ESPFIX)); ENTRIES];
        for i in 0..(ESPFIX_WINDOW >> 30) as usize {
            PDPT_ESPFIX.0[i] = entry(addr_of!(PD_ESPFIX));
        }
        PML4.0[(ESPFIX_BASE >> 39) as usize] = entry(addr_of!(PDPT_ESPFIX));
        cpu::write_cr3(addr_of!(PML4) as u64);
    }
}

/// Drops every TLB entry (a CR3 reload): the host restored the tables at reset, and the TLB
/// may still hold the previous run's demand mappings.
pub fn flush_tlb() {
    // SAFETY: the same tables again.
    unsafe { cpu::write_cr3(cpu::read_cr3()) };
}

/// The address of demand page `page`.
pub const fn page_address(page: usize) -> u64 {
    DEMAND_BASE + page as u64 * PAGE
}

/// What the #PF handler found at CR2.
pub enum Fault {
    /// A not-present demand page: now mapped.
    Mapped,
    /// A demand page that is present: this fault cannot have been about it.
    AlreadyMapped,
    /// Not in the demand region at all.
    Elsewhere,
}

/// Handles a not-present fault at `cr2`: maps the demand page it lies in, if it is one.
pub fn demand_fault(cr2: u64) -> Fault {
    let page = cr2.wrapping_sub(DEMAND_BASE) / PAGE;
    if cr2 < DEMAND_BASE || page >= DEMAND_PAGES as u64 {
        return Fault::Elsewhere;
    }
    let page = page as usize;
    // SAFETY: in-bounds entries of the statics; the page-table entry is written with a
    // volatile store, since the CPU's page walker reads it behind the compiler's back.
    unsafe {
        let pte = addr_of_mut!(DEMAND_PT.0[page]);
        if read_volatile(pte) & PRESENT != 0 {
            return Fault::AlreadyMapped;
        }
        write_volatile(pte, addr_of!(DEMAND_FRAMES[page]) as u64 | PRESENT | WRITABLE);
    }
    Fault::Mapped
}

/// Writes to a demand page not touched before in this run, which raises #PF; the handler maps
/// it and the write completes. For `do_nmi`'s #PF action.
pub fn touch_fresh_page() {
    // SAFETY: the counter static is only used here, by `do_nmi`, which does not nest.
    let page = unsafe { NEXT_NMI_PAGE };
    if page >= DEMAND_PAGES {
        fail!("do_nmi: all {DEMAND_PAGES} demand pages are used up");
    }
    // SAFETY: as above.
    unsafe { NEXT_NMI_PAGE = page + 1 };
    // SAFETY: the address is a demand page: the #PF handler maps it to a frame of our own, and
    // the write then lands there. The `mov` may fault, so it is asm, not a plain write that the
    // compiler could assume cannot.
    unsafe {
        asm!(
            "mov qword ptr [{address}], {address}",
            address = in(reg) page_address(page) + 8,
            options(nostack, preserves_flags)
        );
    }
}

/// The first eight entries of one page-table page (`pick` chooses which): the live ones of
/// every table but the demand page table, for the chaos `scribble` action.
pub fn scribble_region(pick: u64) -> Region {
    let tables = [
        addr_of_mut!(PML4),
        addr_of_mut!(PDPT),
        addr_of_mut!(PD_IDENTITY),
        addr_of_mut!(PD_DEMAND),
        addr_of_mut!(DEMAND_PT),
    ];
    Region { base: tables[(pick % tables.len() as u64) as usize].cast(), len: 8 * 8 }
}
