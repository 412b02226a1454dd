//! Everything written into guest memory before the first KVM_RUN: the bzImage, the initramfs,
//! the command line, the zero page with its e820 map, the boot GDT/IDT, identity-mapped page
//! tables and an MP table. This follows the kernel's Documentation/x86/boot.rst, "64-bit boot
//! protocol", and Firecracker's `arch/x86_64/{mod,regs,gdt}.rs`.

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::{KernelLoader, load_cmdline};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::*;
use super::mptable;
use crate::error::{Error, Result};

/// Setup-header magics and values (boot.rst).
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// xloadflags bit 0: the kernel has the 64-bit entry point at load address + 0x200.
const XLF_KERNEL_64: u16 = 1;
/// Offset of `startup_64` from the start of the protected-mode code.
const STARTUP_64_OFFSET: u64 = 0x200;
/// Protocol 2.12 introduced xloadflags (and so a way to know the 64-bit entry exists).
const MIN_PROTOCOL: u16 = 0x020c;
/// e820 type for usable RAM.
const E820_RAM: u32 = 1;
/// Where a relocatable kernel decompresses itself by default (CONFIG_PHYSICAL_START).
const DEFAULT_PHYSICAL_START: u64 = 0x100_0000;

/// Page-table entry bits: present, writable, 2 MiB page.
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_LARGE: u64 = 1 << 7;

/// Boot GDT. The 64-bit boot protocol asks for __BOOT_CS at selector 0x10 and __BOOT_DS at
/// 0x18, flat; a busy TSS at 0x20 keeps TR valid until the kernel loads its own.
pub const GDT: [u64; 5] = [
    0,                     // 0x00 null
    0,                     // 0x08 unused
    0x00af_9b00_0000_ffff, // 0x10 __BOOT_CS: code, 64-bit, DPL 0
    0x00cf_9300_0000_ffff, // 0x18 __BOOT_DS: data, read/write, 4 GiB
    0x008f_8b00_0000_ffff, // 0x20 TSS (busy)
];
/// GDT index of the code descriptor.
pub const GDT_CODE: usize = 2;
/// GDT index of the data descriptor.
pub const GDT_DATA: usize = 3;
/// GDT index of the TSS descriptor.
pub const GDT_TSS: usize = 4;

/// What the vCPU set-up needs to know about the loaded kernel.
#[derive(Debug)]
pub struct Loaded {
    /// RIP at entry: the 64-bit `startup_64` of the bzImage.
    pub entry: u64,
    /// The command line as written.
    pub cmdline: String,
}

fn boot_error(what: impl std::fmt::Display) -> Error {
    Error::Kernel(format!("cannot load the kernel: {what}"))
}

/// Loads `kernel` (a bzImage's bytes), `initramfs` and `cmdline` into `mem`, which is
/// `mem_size` bytes of RAM at guest address 0.
pub fn load(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &[u8],
    initramfs: &[u8],
    cmdline: &str,
) -> Result<Loaded> {
    // BzImage::load copies everything after the real-mode setup sectors to 1 MiB and returns
    // the setup header it found at 0x1f1.
    let mut image = std::io::Cursor::new(kernel);
    let loaded = BzImage::load(mem, None, &mut image, Some(GuestAddress(HIMEM_START)))
        .map_err(|e| boot_error(format!("not a bzImage nmifuzz can boot ({e})")))?;
    let mut hdr =
        loaded.setup_header.ok_or_else(|| boot_error("the bzImage has no setup header"))?;
    let (protocol, xloadflags) = (hdr.version, hdr.xloadflags);
    if protocol < MIN_PROTOCOL || xloadflags & XLF_KERNEL_64 == 0 {
        return Err(boot_error(format!(
            "boot protocol {protocol:#x} (xloadflags {xloadflags:#x}) has no 64-bit entry point; \
             Linux 3.8 or later is needed"
        )));
    }
    let kernel_load = loaded.kernel_load.0;
    let init_size = u64::from(hdr.init_size);

    let capacity = match hdr.cmdline_size {
        0 => CMDLINE_MAX,
        n => n as usize + 1,
    };
    let line = Cmdline::try_from(cmdline, capacity)
        .map_err(|e| boot_error(format!("invalid command line ({e:?}): {cmdline:?}")))?;
    load_cmdline(mem, GuestAddress(CMDLINE), &line).map_err(boot_error)?;

    // The initramfs, page-aligned at the top of RAM (below initrd_addr_max), clear of the
    // kernel's decompression area [max(load, CONFIG_PHYSICAL_START), +init_size).
    let size = initramfs.len() as u64;
    let top = mem_size.min(u64::from(hdr.initrd_addr_max) + 1);
    let address = top.checked_sub(size).map(|a| a & !0xfff).unwrap_or(0);
    let decompress_end = kernel_load.max(DEFAULT_PHYSICAL_START) + init_size;
    if address < decompress_end.max(loaded.kernel_end) {
        return Err(boot_error(format!(
            "the initramfs ({size} bytes) does not fit beside the kernel in {} MiB of RAM",
            mem_size >> 20
        )));
    }
    mem.write_slice(initramfs, GuestAddress(address)).map_err(boot_error)?;
    hdr.ramdisk_image = address as u32;
    hdr.ramdisk_size = size as u32;

    // The zero page: the kernel's own setup header with the loader's fields filled in, and the
    // e820 map: RAM below the EBDA, a hole up to 1 MiB (EBDA, VGA, ROMs), RAM from 1 MiB on.
    hdr.type_of_loader = KERNEL_LOADER_OTHER;
    hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    hdr.header = KERNEL_HDR_MAGIC;
    hdr.cmd_line_ptr = CMDLINE as u32;
    let mut params = boot_params { hdr, ..Default::default() };
    let e820 = [(0, EBDA_START), (HIMEM_START, mem_size - HIMEM_START)];
    for (i, (addr, size)) in e820.into_iter().enumerate() {
        params.e820_table[i] = boot_e820_entry { addr, size, r#type: E820_RAM };
    }
    params.e820_entries = e820.len() as u8;
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE)),
        mem,
    )
    .map_err(boot_error)?;

    write_boot_tables(mem)?;
    // Without an MP table (and with acpi=off) Linux would find no IOAPIC and run the PIC in
    // virtual-wire mode.
    mem.write_slice(&mptable::build(EBDA_START), GuestAddress(EBDA_START)).map_err(boot_error)?;
    Ok(Loaded { entry: kernel_load + STARTUP_64_OFFSET, cmdline: cmdline.to_owned() })
}

/// Writes the boot GDT, a one-entry zero IDT, and page tables identity-mapping the first
/// `PD_COUNT` GiB with 2 MiB pages (the decompressor builds its own tables soon after).
fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<()> {
    let put = |addr: u64, value: u64| mem.write_obj(value, GuestAddress(addr)).map_err(boot_error);
    for (i, entry) in GDT.iter().enumerate() {
        put(BOOT_GDT + 8 * i as u64, *entry)?;
    }
    put(BOOT_IDT, 0)?;
    put(PML4, PDPT | PTE_PRESENT | PTE_WRITABLE)?;
    for gib in 0..PD_COUNT {
        let pd = PD + gib * 0x1000;
        put(PDPT + 8 * gib, pd | PTE_PRESENT | PTE_WRITABLE)?;
        for i in 0..512 {
            let frame = (gib * 512 + i) * LARGE_PAGE;
            put(pd + 8 * i, frame | PTE_PRESENT | PTE_WRITABLE | PTE_LARGE)?;
        }
    }
    Ok(())
}
