//! The snapshot of a booted kernel at the agent's Ready, and the reset back to it.
//!
//! A real kernel depends on far more state than nmifuzz's own guest: besides memory (restored
//! page by page from KVM's dirty log, as for the built-in guest) and the vCPU's registers, its
//! next run depends on the LAPIC (the timer), the PIC and IOAPIC, the PIT, KVM's clock and the
//! MSRs (the TSC, the TSC deadline, kvmclock's and SYSCALL's MSRs). Every piece is restored at
//! every reset, so that every run starts from the same machine: the same TSC and the same
//! clock.
//!
//! With one exception, the timer: the kernel's tick would fire wherever the host's clock has
//! got to, a different instruction in every run, and the runs would drift apart (a reproducer
//! of the #DB-inside-NMI crash gave the same verdict 15 times in 20 with it). The LAPIC timer
//! is restored disarmed (TSC deadline and initial count zero): a run lasts milliseconds and
//! the kernel goes without its tick meanwhile. When the kernel does wait for its timer (it
//! halts in its idle loop: `perf_event_open` waits for an RCU grace period), the VMM makes the
//! timer fire at once ([`wake_timer`]): at the same instruction in every run.

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MP_STATE_RUNNABLE, Msrs,
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use crate::error::{Error, Result};
use crate::memory::GuestRam;

/// Everything a run starts from.
pub struct MachineState {
    memory: Vec<u8>,
    regs: kvm_regs,
    sregs: kvm_sregs,
    events: kvm_vcpu_events,
    xsave: kvm_xsave,
    xcrs: kvm_xcrs,
    debugregs: kvm_debugregs,
    lapic: kvm_lapic_state,
    msrs: Vec<kvm_msr_entry>,
    irqchips: Vec<kvm_irqchip>,
    pit: kvm_pit_state2,
    clock: kvm_clock_data,
}

impl MachineState {
    /// Captures the machine. The caller has let KVM finish the instruction of the last exit.
    pub fn take(kvm: &Kvm, vm: &VmFd, vcpu: &VcpuFd, ram: &mut GuestRam) -> Result<Self> {
        ram.take_dirty_pages(vm)?;
        let mut irqchips = Vec::new();
        for chip_id in [KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC] {
            let mut chip = kvm_irqchip { chip_id, ..Default::default() };
            vm.get_irqchip(&mut chip).map_err(Error::kvm("KVM_GET_IRQCHIP"))?;
            irqchips.push(chip);
        }
        let mut clock = vm.get_clock().map_err(Error::kvm("KVM_GET_CLOCK"))?;
        // Only the clock's value is given back; the flags KVM_GET_CLOCK reports are not inputs.
        clock.flags = 0;
        Ok(Self {
            memory: ram.copy_all()?,
            regs: vcpu.get_regs().map_err(Error::kvm("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?,
            events: vcpu.get_vcpu_events().map_err(Error::kvm("KVM_GET_VCPU_EVENTS"))?,
            xsave: vcpu.get_xsave().map_err(Error::kvm("KVM_GET_XSAVE"))?,
            xcrs: vcpu.get_xcrs().map_err(Error::kvm("KVM_GET_XCRS"))?,
            debugregs: vcpu.get_debug_regs().map_err(Error::kvm("KVM_GET_DEBUGREGS"))?,
            lapic: without_timer(vcpu.get_lapic().map_err(Error::kvm("KVM_GET_LAPIC"))?),
            msrs: restorable_msrs(kvm, vcpu)?
                .into_iter()
                .map(|mut msr| {
                    if msr.index == MSR_IA32_TSC_DEADLINE {
                        msr.data = 0;
                    }
                    msr
                })
                .collect(),
            irqchips,
            pit: vm.get_pit2().map_err(Error::kvm("KVM_GET_PIT2"))?,
            clock,
        })
    }

    /// Guest memory as it was at the snapshot.
    pub fn memory(&self) -> &[u8] {
        &self.memory
    }

    /// The snapshot's general registers.
    pub fn regs(&self) -> &kvm_regs {
        &self.regs
    }

    /// The snapshot's system registers.
    pub fn sregs(&self) -> &kvm_sregs {
        &self.sregs
    }

    /// Puts the machine back. Returns the number of memory pages restored.
    pub fn restore(&self, vm: &VmFd, vcpu: &VcpuFd, ram: &mut GuestRam) -> Result<usize> {
        let pages = ram.restore_dirty_pages(vm, &self.memory)?;
        for chip in &self.irqchips {
            vm.set_irqchip(chip).map_err(Error::kvm("KVM_SET_IRQCHIP"))?;
        }
        vm.set_pit2(&self.pit).map_err(Error::kvm("KVM_SET_PIT2"))?;
        vm.set_clock(&self.clock).map_err(Error::kvm("KVM_SET_CLOCK"))?;
        vcpu.set_sregs(&self.sregs).map_err(Error::kvm("KVM_SET_SREGS"))?;
        vcpu.set_regs(&self.regs).map_err(Error::kvm("KVM_SET_REGS"))?;
        // SAFETY: the buffer was filled by KVM_GET_XSAVE on this vCPU, whose CPUID has not
        // changed since, so it has the size and layout KVM_SET_XSAVE expects.
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(Error::kvm("KVM_SET_XSAVE"))?;
        vcpu.set_xcrs(&self.xcrs).map_err(Error::kvm("KVM_SET_XCRS"))?;
        // The LAPIC before the MSRs: the TSC deadline MSR arms the LAPIC timer, which
        // KVM_SET_LAPIC would cancel; and the TSC (MSR 0x10) comes before the deadline.
        vcpu.set_lapic(&self.lapic).map_err(Error::kvm("KVM_SET_LAPIC"))?;
        set_msrs(vcpu, &self.msrs)?;
        vcpu.set_vcpu_events(&self.events).map_err(Error::kvm("KVM_SET_VCPU_EVENTS"))?;
        vcpu.set_debug_regs(&self.debugregs).map_err(Error::kvm("KVM_SET_DEBUGREGS"))?;
        let runnable = kvm_mp_state { mp_state: KVM_MP_STATE_RUNNABLE };
        vcpu.set_mp_state(runnable).map_err(Error::kvm("KVM_SET_MP_STATE"))?;
        Ok(pages)
    }
}

/// The TSC.
const MSR_IA32_TSC: u32 = 0x10;
/// The TSC-deadline MSR: the LAPIC timer's next expiry in TSC-deadline mode (0: disarmed).
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// The LAPIC's initial-count register (one-shot and periodic modes; 0: stopped).
const APIC_TMICT: usize = 0x380;

/// `lapic` with its timer stopped.
fn without_timer(mut lapic: kvm_lapic_state) -> kvm_lapic_state {
    lapic.regs[APIC_TMICT..APIC_TMICT + 4].fill(0);
    lapic
}

/// The LAPIC's timer register (LVTT): bits 18:17 are the mode, 10b TSC-deadline.
const APIC_LVTT: usize = 0x320;

/// Makes the LAPIC timer fire now, in whatever mode the kernel runs it.
pub fn wake_timer(vcpu: &VcpuFd) -> Result<()> {
    let mut lapic = vcpu.get_lapic().map_err(Error::kvm("KVM_GET_LAPIC"))?;
    let register =
        |at: usize| u32::from_le_bytes(std::array::from_fn(|i| lapic.regs[at + i] as u8));
    if (register(APIC_LVTT) >> 17) & 3 == 0b10 {
        let mut tsc =
            Msrs::from_entries(&[kvm_msr_entry { index: MSR_IA32_TSC, ..Default::default() }])
                .map_err(|e| Error::Kernel(format!("cannot build the MSR list: {e:?}")))?;
        vcpu.get_msrs(&mut tsc).map_err(Error::kvm("KVM_GET_MSRS"))?;
        let now = tsc.as_slice()[0].data;
        return set_msrs(
            vcpu,
            &[kvm_msr_entry { index: MSR_IA32_TSC_DEADLINE, data: now, ..Default::default() }],
        );
    }
    for (i, byte) in 1u32.to_le_bytes().into_iter().enumerate() {
        lapic.regs[APIC_TMICT + i] = byte as _;
    }
    vcpu.set_lapic(&lapic).map_err(Error::kvm("KVM_SET_LAPIC"))
}

fn set_msrs(vcpu: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<()> {
    let msrs = Msrs::from_entries(entries)
        .map_err(|e| Error::Kernel(format!("cannot build the MSR list: {e:?}")))?;
    let written = vcpu.set_msrs(&msrs).map_err(Error::kvm("KVM_SET_MSRS"))?;
    if written != entries.len() {
        return Err(Error::Kernel(format!(
            "KVM_SET_MSRS restored {written} of {} MSRs (refused: {:#x})",
            entries.len(),
            entries[written].index
        )));
    }
    Ok(())
}

/// The MSRs KVM lists that this vCPU can both read and write back, with their values now.
/// KVM's list holds MSRs the guest's CPUID does not have; each is tried on its own.
fn restorable_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<kvm_msr_entry>> {
    let list = kvm.get_msr_index_list().map_err(Error::kvm("KVM_GET_MSR_INDEX_LIST"))?;
    let mut kept = Vec::new();
    for &index in list.as_slice() {
        let one = [kvm_msr_entry { index, ..Default::default() }];
        let Ok(mut msrs) = Msrs::from_entries(&one) else { continue };
        if vcpu.get_msrs(&mut msrs) != Ok(1) {
            continue;
        }
        let entry = msrs.as_slice()[0];
        if vcpu.set_msrs(&msrs) == Ok(1) {
            kept.push(entry);
        }
    }
    Ok(kept)
}
