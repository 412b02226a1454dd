//! Guest physical memory layout of a real kernel's VM. Everything the VMM writes besides the
//! kernel and the initramfs lives below 640 KiB, where Firecracker puts it
//! (`arch/x86_64/layout.rs`).

/// Boot GDT (see `boot::GDT`).
pub const BOOT_GDT: u64 = 0x500;
/// Boot IDT: one zero entry, so a fault before the kernel loads its own IDT triple-faults.
pub const BOOT_IDT: u64 = 0x520;
/// The zero page (`struct boot_params`); RSI points here at entry.
pub const ZERO_PAGE: u64 = 0x7000;
/// Initial stack pointer (the decompressor switches to its own stack at once).
pub const BOOT_STACK: u64 = 0x8ff0;
/// Level-4 page map; CR3 points here.
pub const PML4: u64 = 0x9000;
/// The page-directory-pointer table.
pub const PDPT: u64 = 0xa000;
/// First of [`PD_COUNT`] consecutive page directories (2 MiB pages).
pub const PD: u64 = 0xb000;
/// Page directories: each maps 1 GiB, so four identity-map the whole 32-bit space.
pub const PD_COUNT: u64 = 4;
/// Kernel command line.
pub const CMDLINE: u64 = 0x20000;
/// Command line capacity when the setup header does not give one.
pub const CMDLINE_MAX: usize = 2048;
/// Start of the extended BIOS data area: usable RAM below 1 MiB ends here, and the MP table
/// is written here, where Linux's `smp_scan_config` looks for it.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of high memory, where the bzImage's protected-mode code is loaded.
pub const HIMEM_START: u64 = 0x10_0000;
/// Where KVM puts its three-page TSS on Intel (ignored on AMD); Firecracker's address.
pub const KVM_TSS: usize = 0xfffb_d000;
/// The page just below it, for KVM's EPT identity map on Intel (ignored on AMD).
pub const KVM_IDENTITY_MAP: u64 = 0xfffb_c000;
/// Size of a 2 MiB large page.
pub const LARGE_PAGE: u64 = 0x20_0000;
