//! What the VMM performs for the guest, on the vCPU's state: the instructions this host cannot
//! stop right after when it single-steps them (IRETQ, `swapgs`), so that the engine stops
//! between them and the next instruction, and the ring-0 `int3` it cannot run at all
//! (docs/engine.md, "Counting rule" and "Latched NMIs and IRETQ").

use kvm_bindings::{Msrs, kvm_msr_entry};
use kvm_ioctls::SyncReg;

use super::Vm;
use crate::error::{Error, Result};

/// x86 exception vector of #BP (Intel SDM vol. 3, table 6-1).
const BREAKPOINT_VECTOR: u8 = 3;
/// The `int3` opcode.
pub(super) const INT3: u8 = 0xcc;
/// RFLAGS.RF, the resume flag.
const RFLAGS_RF: u64 = 1 << 16;
/// MSR_KERNEL_GS_BASE, which `swapgs` exchanges with the GS base (SDM Vol. 4, Table 2-2).
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// Most stack segments [`Vm::iretq_keeps_segments`] remembers.
const MAX_STACK_SEGMENTS: usize = 8;
/// `swapgs` is `0f 01 f8`.
const SWAPGS_LEN: u64 = 3;

/// The five qwords IRETQ pops, in stack order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IretFrame {
    /// Return RIP.
    pub rip: u64,
    /// Return CS.
    pub cs: u64,
    /// Return RFLAGS.
    pub rflags: u64,
    /// Return RSP.
    pub rsp: u64,
    /// Return SS.
    pub ss: u64,
}

impl Vm {
    /// Completes an `int3` the host could not execute: RIP moves past it and #BP is injected,
    /// exactly the state hardware leaves before delivering #BP. Both go through the sync-regs
    /// area; the events keep `flags = 0` so that the NMI state KVM reported is left alone.
    pub(super) fn inject_breakpoint(&mut self) {
        let sync = self.vcpu.sync_regs_mut();
        sync.regs.rip += 1;
        sync.events.exception.injected = 1;
        sync.events.exception.nr = BREAKPOINT_VECTOR;
        sync.events.exception.has_error_code = 0;
        sync.events.flags = 0;
        self.vcpu.set_sync_dirty_reg(SyncReg::Register);
        self.vcpu.set_sync_dirty_reg(SyncReg::VcpuEvents);
    }

    /// Performs a same-privilege IRETQ that popped `frame`: RIP, RFLAGS and RSP from the
    /// frame, SS too if it is another (one [`Vm::iretq_keeps_segments`] has seen), and NMIs
    /// unblocked, as every IRET does. On hosts where IRETQ and the next
    /// instruction run as one single-step, this is how the VMM stops right after an IRETQ.
    /// The events go with `flags = 0`, so a KVM_NMI made at the same stop is kept.
    pub fn emulate_iretq(&mut self, frame: &IretFrame) {
        let reset_pending = self.reset_pending;
        let sync = self.vcpu.sync_regs_mut();
        if frame.ss != u64::from(sync.sregs.ss.selector)
            && let Some(ss) = self.stack_segments.iter().find(|s| u64::from(s.selector) == frame.ss)
        {
            sync.sregs.ss = *ss;
            self.vcpu.set_sync_dirty_reg(SyncReg::SystemRegister);
        }
        let sync = self.vcpu.sync_regs_mut();
        sync.regs.rip = frame.rip;
        // Bit 1 of RFLAGS always reads as 1; RF is cleared by a completed instruction.
        sync.regs.rflags = (frame.rflags | 0x2) & !RFLAGS_RF;
        sync.regs.rsp = frame.rsp;
        sync.events.nmi.masked = 0;
        if !reset_pending {
            sync.events.flags = 0;
        }
        self.vcpu.set_sync_dirty_reg(SyncReg::Register);
        self.vcpu.set_sync_dirty_reg(SyncReg::VcpuEvents);
    }

    /// Sets RIP for the next KVM_RUN (back to an IRETQ site whose trap moved past it).
    pub fn set_rip(&mut self, rip: u64) {
        self.vcpu.sync_regs_mut().regs.rip = rip;
        self.vcpu.set_sync_dirty_reg(SyncReg::Register);
    }

    /// Sets RFLAGS for the next KVM_RUN (without a stepping TF the guest kept).
    pub fn set_rflags(&mut self, rflags: u64) {
        self.vcpu.sync_regs_mut().regs.rflags = rflags;
        self.vcpu.set_sync_dirty_reg(SyncReg::Register);
    }

    /// Sets R11 for the next KVM_RUN (the RFLAGS a `sysretq` at this stop loads).
    pub fn set_r11(&mut self, value: u64) {
        self.vcpu.sync_regs_mut().regs.r11 = value;
        self.vcpu.set_sync_dirty_reg(SyncReg::Register);
    }

    /// Performs a `swapgs` at the current RIP (3 bytes): exchanges the GS base with
    /// MSR_KERNEL_GS_BASE and moves RIP past it. On hosts where `swapgs` and the next
    /// instruction run as one single-step (kvm_pvm), this is how the VMM stops right after it.
    pub fn emulate_swapgs(&mut self) -> Result<()> {
        let mut msrs = kernel_gs_base_msr(0);
        self.vcpu.get_msrs(&mut msrs).map_err(Error::kvm("KVM_GET_MSRS"))?;
        let kernel_gs_base = msrs.as_slice()[0].data;
        let sync = self.vcpu.sync_regs_mut();
        let gs_base = sync.sregs.gs.base;
        sync.sregs.gs.base = kernel_gs_base;
        sync.regs.rip += SWAPGS_LEN;
        self.vcpu.set_sync_dirty_reg(SyncReg::SystemRegister);
        self.vcpu.set_sync_dirty_reg(SyncReg::Register);
        self.vcpu.set_msrs(&kernel_gs_base_msr(gs_base)).map_err(Error::kvm("KVM_SET_MSRS"))?;
        Ok(())
    }

    /// Whether an IRETQ popping `frame` stays in the current code segment and loads an SS
    /// the guest has been seen with: the IRETQs [`Vm::emulate_iretq`] performs. The current SS
    /// is remembered here first: an exception from ring 3 leaves the null SS, and an IRETQ
    /// back to it (an NMI returning into that exception's handler, after an IRETQ that loaded
    /// the kernel's SS) must load it again; an IRETQ from that handler to the kernel's SS (the
    /// kvm_pvm system call) loads the snapshot's.
    pub fn iretq_keeps_segments(&mut self, frame: &IretFrame) -> bool {
        let sregs = self.vcpu.sync_regs_mut().sregs;
        // A handful is all a guest has (kernel, null); a guest scribbling its GDT gets no more.
        if !self.stack_segments.contains(&sregs.ss)
            && self.stack_segments.len() < MAX_STACK_SEGMENTS
        {
            self.stack_segments.push(sregs.ss);
        }
        frame.cs == u64::from(sregs.cs.selector)
            && self.stack_segments.iter().any(|s| u64::from(s.selector) == frame.ss)
    }
}

/// A KVM_GET_MSRS / KVM_SET_MSRS list of MSR_KERNEL_GS_BASE alone, holding `data`.
fn kernel_gs_base_msr(data: u64) -> Msrs {
    let entry = kvm_msr_entry { index: MSR_KERNEL_GS_BASE, data, ..Default::default() };
    // One entry is far below the list's capacity (KVM_MAX_MSR_ENTRIES).
    Msrs::from_entries(&[entry]).expect("a one-entry MSR list")
}
