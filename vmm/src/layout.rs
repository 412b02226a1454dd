//! Guest physical memory layout.
//!
//! The VMM owns the first MiB: the boot page tables and the boot GDT live there, and the guest
//! ELF may not load into it. Everything from [`KERNEL_MIN`] up to the end of guest memory is
//! the guest's. The guest installs its own GDT, TSS and IDT before it reports READY; the boot
//! structures here only have to carry it into 64-bit mode.

/// Size of a guest page as the dirty log counts it.
pub const PAGE_SIZE: u64 = 0x1000;

/// Boot GDT: null, code (0x08), data (0x10), TSS (0x18), Firecracker's layout.
pub const BOOT_GDT: u64 = 0x500;
/// Boot IDT: limit 0, so an exception before the guest loads its own IDT triple-faults.
pub const BOOT_IDT: u64 = 0x520;
/// Level-4 page map; CR3 points here.
pub const PML4: u64 = 0x9000;
/// The one page-directory-pointer table.
pub const PDPT: u64 = 0xa000;
/// The one page directory: identity-maps guest memory with 2 MiB pages.
pub const PD: u64 = 0xb000;

/// Lowest address a guest ELF segment may occupy; below it is the VMM's.
pub const KERNEL_MIN: u64 = 0x10_0000;

/// Size of one page-directory mapping (a 2 MiB large page).
pub const LARGE_PAGE: u64 = 0x20_0000;
/// Most memory one page directory can map (512 large pages).
pub const MAX_MEMORY: u64 = 512 * LARGE_PAGE;
/// Default guest memory size.
pub const DEFAULT_MEMORY: u64 = 16 << 20;
