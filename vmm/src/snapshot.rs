//! The snapshot taken at READY and the reset back to it.
//!
//! Memory is restored page by page from KVM's dirty log (plus the pages the host wrote), so a
//! reset costs in proportion to what the run touched, not to the size of guest memory. The
//! vCPU's registers, system registers and events are restored through `kvm_run`'s sync-regs
//! area, which KVM applies on the next KVM_RUN without an ioctl of its own; the FPU and the
//! debug registers have no sync-regs form and are restored with their ioctls. A run whose
//! last exit left an instruction for KVM to finish (an `in`, a read of memory with nothing
//! behind it) has it finished before the restore, by [`crate::Vm::reset`]: KVM finishes it
//! at the next entry by writing back the registers it decoded it with, which would otherwise
//! land over the snapshot's (RIP one `in` further, on kvm_pvm, where ring 0 is emulated).
//!
//! The guest never changes XCR0, and its MSRs are not part of the snapshot: EFER and the GS
//! base are system registers; STAR, LSTAR and SFMASK are set at boot and never change; and
//! MSR_KERNEL_GS_BASE, which a run that stops in ring 3 leaves swapped, is set again by the
//! guest's user workload before it enters ring 3 (an ioctl per reset would cost ~4.5 µs).

use kvm_bindings::{kvm_debugregs, kvm_fpu, kvm_regs, kvm_sregs, kvm_vcpu_events};
use kvm_ioctls::{SyncReg, VcpuFd, VmFd};

use crate::error::{Error, Result};
use crate::memory::GuestRam;

/// The vCPU state and guest memory at READY.
pub struct Snapshot {
    /// A full copy of guest memory.
    pub memory: Vec<u8>,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// Exception, interrupt and NMI state (pending, injected, masked).
    pub events: kvm_vcpu_events,
    /// x87/SSE state.
    pub fpu: kvm_fpu,
    /// DR0-DR3, DR6, DR7.
    pub debugregs: kvm_debugregs,
}

impl Snapshot {
    /// Captures the current state. The caller has flushed any pending I/O completion first.
    pub fn take(vm: &VmFd, vcpu: &VcpuFd, ram: &mut GuestRam) -> Result<Self> {
        // Start the dirty log afresh: everything before this point is in the copy.
        ram.take_dirty_pages(vm)?;
        Ok(Self {
            memory: ram.copy_all()?,
            regs: vcpu.get_regs().map_err(Error::kvm("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?,
            events: vcpu.get_vcpu_events().map_err(Error::kvm("KVM_GET_VCPU_EVENTS"))?,
            fpu: vcpu.get_fpu().map_err(Error::kvm("KVM_GET_FPU"))?,
            debugregs: vcpu.get_debug_regs().map_err(Error::kvm("KVM_GET_DEBUGREGS"))?,
        })
    }

    /// Restores memory now and queues the register state for the next KVM_RUN. Returns the
    /// number of pages restored.
    pub fn restore(&self, vm: &VmFd, vcpu: &mut VcpuFd, ram: &mut GuestRam) -> Result<usize> {
        let pages = ram.restore_dirty_pages(vm, &self.memory)?;
        let sync = vcpu.sync_regs_mut();
        sync.regs = self.regs;
        sync.sregs = self.sregs;
        sync.events = self.events;
        for reg in [SyncReg::Register, SyncReg::SystemRegister, SyncReg::VcpuEvents] {
            vcpu.set_sync_dirty_reg(reg);
        }
        vcpu.set_fpu(&self.fpu).map_err(Error::kvm("KVM_SET_FPU"))?;
        vcpu.set_debug_regs(&self.debugregs).map_err(Error::kvm("KVM_SET_DEBUGREGS"))?;
        Ok(pages)
    }
}
