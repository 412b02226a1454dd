//! vCPU state at entry: CPUID, boot MSRs, the LAPIC's LINT pins, and registers for the
//! 64-bit boot protocol (long mode, flat segments, RSI = zero page), as Firecracker sets them
//! (`arch/x86_64/{regs,msr,interrupts}.rs`, `cpu_config/x86_64/cpuid/normalize.rs`).

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, Msrs, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_sregs,
};
use kvm_ioctls::{Kvm, VcpuFd};

use super::boot::{GDT, GDT_CODE, GDT_DATA, GDT_TSS};
use super::layout::{BOOT_GDT, BOOT_IDT, BOOT_STACK, PML4, ZERO_PAGE};
use crate::boot::segment;
use crate::error::{Error, Result};

/// CR0: PE, MP, ET, NE, WP, AM, PG (what the kernel itself sets in `CR0_STATE`).
const CR0_BOOT: u64 = 0x8005_0033;
/// CR4: PAE (needed for long mode), OSFXSR, OSXMMEXCPT.
const CR4_BOOT: u64 = 0x620;
/// EFER: LME, LMA (Firecracker sets no more).
const EFER_BOOT: u64 = 0x500;

/// Applies everything; the VM's irqchip must exist before the vCPU was created.
pub fn setup(kvm: &Kvm, vcpu: &VcpuFd, entry: u64) -> Result<()> {
    setup_cpuid(kvm, vcpu)?;
    setup_msrs(vcpu)?;
    setup_lint(vcpu)?;
    setup_sregs(vcpu)?;
    let regs = kvm_regs {
        rip: entry,
        rsi: ZERO_PAGE,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rflags: 0x2, // reserved bit 1; IF clear as the protocol requires
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(Error::kvm("KVM_SET_REGS"))?;
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(Error::kvm("KVM_SET_FPU"))?;
    Ok(())
}

/// KVM's supported CPUID with the topology fixed up for one vCPU with APIC id 0 and the
/// hypervisor bit set (so the guest finds KVM's paravirtual leaves and uses kvm-clock).
fn setup_cpuid(kvm: &Kvm, vcpu: &VcpuFd) -> Result<()> {
    let mut cpuid: CpuId = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(Error::kvm("KVM_GET_SUPPORTED_CPUID"))?;
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                // EBX: APIC id 0 (31:24), 1 logical processor (23:16), CLFLUSH size kept.
                e.ebx = (e.ebx & 0xffff) | (1 << 16);
                e.ecx |= 1 << 31; // hypervisor present
                e.edx &= !(1 << 28); // no HTT
            }
            4 => {
                // Deterministic cache parameters (Intel): one core per package (31:26), one
                // thread sharing each cache (25:14).
                e.eax &= 0x3fff;
            }
            0xb | 0x1f => {
                // Extended topology (Intel): x2APIC id 0; one logical processor at the SMT and
                // core levels, shift 0.
                e.edx = 0;
                if e.index <= 1 {
                    e.eax = 0;
                    e.ebx = 1;
                }
            }
            0x8000_0008 => {
                // AMD: NC = 0 (one core), ApicIdSize = 0.
                e.ecx &= !0xf0ff;
            }
            0x8000_001e => {
                // AMD topology extensions: extended APIC id 0, core 0, one thread per core,
                // node 0.
                e.eax = 0;
                e.ebx &= !0xffff;
                e.ecx &= !0x7ff;
            }
            _ => {}
        }
    }
    vcpu.set_cpuid2(&cpuid).map_err(Error::kvm("KVM_SET_CPUID2"))
}

/// Firecracker's boot MSRs (`create_boot_msr_entries`).
fn setup_msrs(vcpu: &VcpuFd) -> Result<()> {
    const MSRS: [(u32, u64); 11] = [
        (0x174, 0),             // IA32_SYSENTER_CS
        (0x175, 0),             // IA32_SYSENTER_ESP
        (0x176, 0),             // IA32_SYSENTER_EIP
        (0xc000_0081, 0),       // STAR
        (0xc000_0083, 0),       // CSTAR
        (0xc000_0102, 0),       // KERNEL_GS_BASE
        (0xc000_0084, 0),       // SYSCALL_MASK
        (0xc000_0082, 0),       // LSTAR
        (0x10, 0),              // IA32_TSC
        (0x1a0, 1),             // IA32_MISC_ENABLE: fast strings
        (0x2ff, (1 << 11) | 6), // MTRRdefType: MTRRs enabled, default write-back
    ];
    let entries: Vec<kvm_msr_entry> = MSRS
        .iter()
        .map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() })
        .collect();
    let msrs = Msrs::from_entries(&entries)
        .map_err(|e| Error::Kernel(format!("cannot build the boot MSR list: {e:?}")))?;
    // KVM stops at the first MSR it refuses; the ones after it are optional for booting.
    vcpu.set_msrs(&msrs).map_err(Error::kvm("KVM_SET_MSRS"))?;
    Ok(())
}

/// LAPIC LVT registers (offsets into `kvm_lapic_state.regs`) and delivery modes.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// LINT0 delivers the PIC's interrupts (ExtINT) and LINT1 NMIs, as Firecracker's `set_lint`.
fn setup_lint(vcpu: &VcpuFd) -> Result<()> {
    let mut lapic = vcpu.get_lapic().map_err(Error::kvm("KVM_GET_LAPIC"))?;
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
        let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().into_iter().enumerate() {
            lapic.regs[reg + i] = b as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(Error::kvm("KVM_SET_LAPIC"))
}

/// Long mode with paging on the identity map, flat segments from the boot GDT.
fn setup_sregs(vcpu: &VcpuFd) -> Result<()> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
    let data = segment(GDT[GDT_DATA], GDT_DATA as u16);
    sregs.cs = segment(GDT[GDT_CODE], GDT_CODE as u16);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = segment(GDT[GDT_TSS], GDT_TSS as u16);
    sregs.gdt.base = BOOT_GDT;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT;
    sregs.idt.limit = 7;
    sregs.cr0 = CR0_BOOT;
    sregs.cr3 = PML4;
    sregs.cr4 = CR4_BOOT;
    sregs.efer = EFER_BOOT;
    vcpu.set_sregs(&sregs).map_err(Error::kvm("KVM_SET_SREGS"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_segments_match_the_boot_protocol() {
        let cs = segment(GDT[GDT_CODE], GDT_CODE as u16);
        assert_eq!((cs.selector, cs.type_, cs.l, cs.db, cs.g, cs.present), (0x10, 0xb, 1, 0, 1, 1));
        let ds = segment(GDT[GDT_DATA], GDT_DATA as u16);
        assert_eq!((ds.selector, ds.type_, ds.db, ds.s, ds.limit), (0x18, 3, 1, 1, 0xffff_ffff));
        let tr = segment(GDT[GDT_TSS], GDT_TSS as u16);
        assert_eq!((tr.selector, tr.type_, tr.s), (0x20, 0xb, 0));
    }
}
