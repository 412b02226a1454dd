//! Puts the vCPU straight into 64-bit long mode at the guest's entry point, the way Firecracker
//! does (`arch/x86_64/{regs,gdt}.rs`): identity-mapped page tables, a flat boot GDT, paging and
//! long mode on. The guest replaces the GDT and loads its own IDT and TSS before READY.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::{Kvm, VcpuFd};

use crate::error::{Error, Result};
use crate::layout::{BOOT_GDT, BOOT_IDT, LARGE_PAGE, PD, PDPT, PML4};
use crate::memory::GuestRam;

/// Page-table entry bits (Intel SDM vol. 3, 4.5): present, writable, 2 MiB page.
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_LARGE: u64 = 1 << 7;

/// CR0: protection, monitor coprocessor, extension type, numeric error, write protect,
/// alignment mask, paging.
const CR0_BOOT: u64 = 0x8005_0033;
/// CR4: PAE (required by long mode), OSFXSR, OSXMMEXCPT.
const CR4_BOOT: u64 = 0x620;
/// EFER: SYSCALL enable, long mode enable, long mode active, no-execute enable.
const EFER_BOOT: u64 = 0xd01;

/// Boot GDT entries (Firecracker's `gdt_entry(flags, base, limit)` values).
const GDT: [u64; 4] = [
    0,                     // null
    0x00af_9b00_0000_ffff, // 0x08: code, DPL 0, long mode
    0x00cf_9300_0000_ffff, // 0x10: data, DPL 0
    0x008f_8b00_0000_ffff, // 0x18: busy TSS (only so that TR is valid until the guest's ltr)
];

/// Writes the boot GDT, an empty IDT and the page tables that identity-map all of `ram`.
pub fn write_boot_tables(ram: &mut GuestRam) -> Result<()> {
    for (i, entry) in GDT.iter().enumerate() {
        ram.write_u64(BOOT_GDT + 8 * i as u64, *entry)?;
    }
    ram.write_u64(BOOT_IDT, 0)?;
    ram.write_u64(PML4, PDPT | PTE_PRESENT | PTE_WRITABLE)?;
    ram.write_u64(PDPT, PD | PTE_PRESENT | PTE_WRITABLE)?;
    for i in 0..ram.size() / LARGE_PAGE {
        ram.write_u64(PD + 8 * i, (i * LARGE_PAGE) | PTE_PRESENT | PTE_WRITABLE | PTE_LARGE)?;
    }
    Ok(())
}

/// Decodes a GDT entry into the segment KVM wants (Firecracker's `kvm_segment_from_gdt`).
pub(crate) fn segment(entry: u64, index: u16) -> kvm_segment {
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let granular = (entry >> 55) & 1 == 1;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: if granular { (limit << 12) | 0xfff } else { limit },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granular as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: (present == 0) as u8,
        padding: 0,
    }
}

/// Configures CPUID, segments, control registers, general registers and the FPU so that the
/// vCPU starts in long mode at `entry`.
pub fn setup_vcpu(kvm: &Kvm, vcpu: &VcpuFd, entry: u64) -> Result<()> {
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(Error::kvm("KVM_GET_SUPPORTED_CPUID"))?;
    vcpu.set_cpuid2(&cpuid).map_err(Error::kvm("KVM_SET_CPUID2"))?;

    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
    let code = segment(GDT[1], 1);
    let data = segment(GDT[2], 2);
    sregs.cs = code;
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = segment(GDT[3], 3);
    sregs.gdt.base = BOOT_GDT;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_BOOT;
    sregs.cr3 = PML4;
    sregs.cr4 = CR4_BOOT;
    sregs.efer = EFER_BOOT;
    vcpu.set_sregs(&sregs).map_err(Error::kvm("KVM_SET_SREGS"))?;

    let regs = kvm_regs { rip: entry, rflags: 0x2, ..Default::default() };
    vcpu.set_regs(&regs).map_err(Error::kvm("KVM_SET_REGS"))?;

    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(Error::kvm("KVM_SET_FPU"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_like_firecracker() {
        let cs = segment(GDT[1], 1);
        assert_eq!((cs.selector, cs.type_, cs.l, cs.db, cs.g, cs.present), (8, 0xb, 1, 0, 1, 1));
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment(GDT[2], 2);
        assert_eq!((ds.selector, ds.type_, ds.db, ds.s), (0x10, 3, 1, 1));
        let tr = segment(GDT[3], 3);
        assert_eq!((tr.selector, tr.type_, tr.s), (0x18, 0xb, 0));
    }
}
