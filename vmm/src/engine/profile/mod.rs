//! The host profile: how this host's KVM single-steps and delivers NMIs, and which of the
//! architecture's ring-3 mechanisms it gives, probed at start-up ([`calibrate`], in `probes`)
//! so that the engine is exact both on stock KVM (VMX, SVM) and on kvm_pvm.

mod probes;

pub use self::probes::calibrate;

use std::fmt;

use nmifuzz_abi::{Script, option, user_flag};
use serde::{Deserialize, Serialize};

/// What the engine must know about the host's KVM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HostProfile {
    /// IRETQ gets a single-step stop of its own. Where it does not (kvm_pvm), IRETQ and the
    /// next instruction run as one step, and the engine performs IRETQs itself.
    pub iretq_single_step: bool,
    /// Single-stepping stops at an event handler's first instruction. Where it does not
    /// (kvm_pvm), the engine puts hardware breakpoints on the exception entries.
    pub event_entry_stop: bool,
    /// A ring-0 `int3` raises #BP. Where it does not (kvm_pvm: an emulation error), the VMM
    /// performs the `int3` and injects #BP.
    pub int3_native: bool,
    /// A latched NMI is delivered right after the IRETQ that unblocks NMIs, as on hardware.
    /// Where it is not (kvm_pvm: at the next VM entry), the engine's own IRETQ gives the
    /// hardware timing.
    pub latched_nmi_at_iret: bool,
    /// `swapgs` gets a single-step stop of its own. Where it does not (kvm_pvm), `swapgs` and the
    /// next instruction run as one step, and the engine performs `swapgs` itself.
    #[serde(default)]
    pub swapgs_single_step: bool,
    /// SYSCALL from CPL3 enters CPL0, as on hardware. Where it does not (kvm_pvm: it jumps to
    /// LSTAR but stays at CPL3), the user workload's system call is a `ud2` that the guest's
    /// #UD entry turns into the SYSCALL entry; where it does, the engine has the guest use
    /// `syscall` itself (`option::NATIVE_SYSCALL`).
    #[serde(default)]
    pub syscall_enters_cpl0: bool,
    /// Single-stepping at CPL3 stops after each user instruction. Where it does not (kvm_pvm:
    /// the #DB leaks into the guest), it would break the guest; the engine never steps ring 3
    /// on any host (docs/engine.md, "Ring 3"), and this is reported for `nmifuzz doctor`.
    #[serde(default)]
    pub cpl3_single_step: bool,
    /// Single-stepping survives the VMM's register writes and the guest's own RFLAGS loads
    /// (kvm_pvm). Where it does not (stock KVM, VMX and SVM alike), stepping is the guest's
    /// TF: KVM sets it once, for the RIP of KVM_SET_GUEST_DEBUG, and a register write at
    /// another RIP, a `popfq` or `iretq`, an instruction KVM emulates and every event delivery
    /// clear it; the VMM sets it at every step (`Vm::set_step_rearm`) and watches the handler
    /// entries.
    #[serde(default = "yes")]
    pub sticky_single_step: bool,
    /// An IRET that restores RF = 1 (a fault's frame has it) suppresses the instruction
    /// breakpoint at its target for that one instruction, as the manuals say (stock KVM). Where
    /// it does not (kvm_pvm's emulator stops there anyway), nothing needs watching; where it
    /// does, the fast mode watches the exceptions' IRETQ while it waits for a point
    /// ([`super::watch`]).
    #[serde(default)]
    pub rf_masks_breakpoints: bool,
    /// An IRET to ring 3 can load an SS from the LDT, as on hardware. Where it cannot
    /// (kvm_pvm: #GP), the user workload's 16-bit SS is the GDT's; where it can, the LDT's, as
    /// Linux's (`option::LDT_SS16`).
    #[serde(default)]
    pub ldt_ss16: bool,
    /// An IRET to a 16-bit SS loads only SP and keeps RSP[63:16], as the manuals say: the leak
    /// espfix64 exists for, whose aliases hand the user back its RSP[31:16]. Where it does not
    /// (kvm_pvm loads the full RSP), there is nothing to leak.
    #[serde(default)]
    pub ss16_keeps_rsp_high: bool,
    /// Ring 3 keeps an NT flag it set (with `popfq`) across the host's exits, as hardware does.
    /// Where it does not (kvm_pvm), the user workload's checks would see NT vanish, so the
    /// user flags of a schedule lose NT there ([`HostProfile::fit`]): an NT-only bug cannot
    /// show on such a host.
    #[serde(default)]
    pub user_nt: bool,
}

/// The default of fields recorded before they existed: every profile then was kvm_pvm's.
fn yes() -> bool {
    true
}

impl HostProfile {
    /// kvm_pvm's measured behaviour (`shared/reference/kvm-on-this-host.md`), for tests that
    /// need a profile without calibrating.
    pub const KVM_PVM: Self = Self {
        iretq_single_step: false,
        event_entry_stop: false,
        int3_native: false,
        latched_nmi_at_iret: false,
        swapgs_single_step: false,
        syscall_enters_cpl0: false,
        cpl3_single_step: false,
        sticky_single_step: true,
        rf_masks_breakpoints: false,
        ldt_ss16: false,
        ss16_keeps_rsp_high: false,
        user_nt: false,
    };

    /// Fits `script` to this host: the guest uses what the host gives (real SYSCALLs, a 16-bit
    /// SS from the LDT), and the user workload sets no flag ring 3 cannot keep here.
    pub fn fit(&self, script: &mut Script) {
        if self.syscall_enters_cpl0 {
            script.options |= option::NATIVE_SYSCALL;
        }
        if self.ldt_ss16 {
            script.options |= option::LDT_SS16;
        }
        if !self.user_nt {
            for flags in &mut script.user_flags {
                *flags &= !user_flag::NT;
            }
        }
    }

    /// Explanations of each property, for `nmifuzz doctor`.
    pub fn explain(&self) -> Vec<(&'static str, bool, &'static str)> {
        vec![
            (
                "IRETQ has its own single-step stop",
                self.iretq_single_step,
                if self.iretq_single_step {
                    "the instruction after an IRETQ is reached by stepping"
                } else {
                    "IRETQ runs together with the next instruction; the VMM performs ring-0 IRETQs itself"
                },
            ),
            (
                "stepping stops at an event handler's first instruction",
                self.event_entry_stop,
                if self.event_entry_stop {
                    "NMIs can be placed before an exception handler's first instruction by stepping"
                } else {
                    "hardware breakpoints on the #BP, #UD and #PF entries make that boundary reachable"
                },
            ),
            (
                "ring-0 int3 raises #BP",
                self.int3_native,
                if self.int3_native {
                    "int3 runs natively"
                } else {
                    "KVM cannot emulate int3 at ring 0; the VMM advances RIP and injects #BP"
                },
            ),
            (
                "a latched NMI arrives right after the unblocking IRETQ",
                self.latched_nmi_at_iret,
                if self.latched_nmi_at_iret {
                    "hardware timing"
                } else {
                    "KVM delivers it at the next VM entry; the VMM's own IRETQ restores hardware timing while stepping"
                },
            ),
            (
                "swapgs has its own single-step stop",
                self.swapgs_single_step,
                if self.swapgs_single_step {
                    "the instruction after a swapgs is reached by stepping"
                } else {
                    "swapgs runs together with the next instruction; the VMM performs swapgs itself"
                },
            ),
            (
                "SYSCALL from ring 3 enters ring 0",
                self.syscall_enters_cpl0,
                if self.syscall_enters_cpl0 {
                    "the user workload's system calls are real SYSCALLs"
                } else {
                    "SYSCALL stays at CPL3; the user's system call is a ud2 whose #UD entry runs the SYSCALL entry's gap on the user's RSP"
                },
            ),
            (
                "single-stepping survives register writes and RFLAGS loads",
                self.sticky_single_step,
                if self.sticky_single_step {
                    "the VMM sets single-stepping once and it stays on"
                } else {
                    "stepping is the guest's TF, which register writes, popfq, iretq, emulated instructions and event deliveries clear; the VMM sets it at every step"
                },
            ),
            (
                "an IRET restoring RF suppresses the breakpoint at its target",
                self.rf_masks_breakpoints,
                if self.rf_masks_breakpoints {
                    "as the manuals say; the fast mode also stops at the exceptions' IRETQ while it waits for a point, so that a faulting instruction's retry is counted"
                } else {
                    "the breakpoint fires on the retried instruction anyway; the fast mode needs no more breakpoints"
                },
            ),
            (
                "an IRET to ring 3 can load an SS from the LDT",
                self.ldt_ss16,
                if self.ldt_ss16 {
                    "the user workload's 16-bit SS is the LDT's, as Linux's"
                } else {
                    "such an IRET raises #GP; the user workload's 16-bit SS is the GDT's"
                },
            ),
            (
                "an IRET to a 16-bit SS keeps RSP[63:16]",
                self.ss16_keeps_rsp_high,
                if self.ss16_keeps_rsp_high {
                    "as the manuals say: espfix64's aliases hand the user its RSP[31:16] back, and RSP[63:32] are the alias window's"
                } else {
                    "it loads the full RSP: espfix64 runs, but there is nothing to leak"
                },
            ),
            (
                "ring 3 keeps the NT flag it sets",
                self.user_nt,
                if self.user_nt {
                    "schedules' user flags reach the kernel with NT, as on hardware"
                } else {
                    "NT set by ring 3 vanishes at the host's exits; schedules' user flags lose NT here"
                },
            ),
            (
                "single-stepping works at CPL3",
                self.cpl3_single_step,
                if self.cpl3_single_step {
                    "as on hardware; the engine still never steps ring 3, so schedules mean the same on every host"
                } else {
                    "the #DB leaks into the guest; the engine never steps ring 3: excursions run it, ring-3 points are exits"
                },
            ),
        ]
    }
}

impl fmt::Display for HostProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let yes_no = |b: bool| if b { "yes" } else { "no" };
        write!(
            f,
            "iretq-step={} entry-stop={} int3-native={} latched-nmi-at-iret={} swapgs-step={} \
             syscall-cpl0={} cpl3-step={} sticky-step={} rf-masks-bp={} ldt-ss={} \
             ss16-leak={} user-nt={}",
            yes_no(self.iretq_single_step),
            yes_no(self.event_entry_stop),
            yes_no(self.int3_native),
            yes_no(self.latched_nmi_at_iret),
            yes_no(self.swapgs_single_step),
            yes_no(self.syscall_enters_cpl0),
            yes_no(self.cpl3_single_step),
            yes_no(self.sticky_single_step),
            yes_no(self.rf_masks_breakpoints),
            yes_no(self.ldt_ss16),
            yes_no(self.ss16_keeps_rsp_high),
            yes_no(self.user_nt)
        )
    }
}
