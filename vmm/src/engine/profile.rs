//! The host profile: how this host's KVM single-steps and delivers NMIs, probed at start-up so
//! that the engine is exact both on kvm_pvm and on ordinary VMX/SVM KVM.

use std::fmt;

use nmifuzz_abi::{Report, Script, USER_POINT_ADDRESS, Variant, Workload, option, port};
use serde::{Deserialize, Serialize};

use super::GuestFacts;
use super::decode::InsnCache;
use crate::error::{Error, Result};
use crate::exit::Exit;
use crate::vm::{GuestDebug, Vm};

/// A `swapgs` the user workload passes before it first enters ring 3: the return to user.
const SWAPGS_SYMBOL: &str = "return_to_user_iret";

/// Steps the calibration allows itself to reach a point of interest.
const CALIBRATION_STEPS: usize = 5_000;

/// Trials of the latched-NMI probe that must all see hardware timing for the profile to say so.
/// On kvm_pvm a latched NMI arrives at the next VM entry, and a host interrupt that lands
/// between the IRETQ and the next instruction makes an extra entry there: then one trial sees
/// hardware timing. Measured on this host: 0 of 2,000 trials quiet, 1 of 2,000 while another
/// thread of the process churned memory (TLB-flush IPIs), 1 of 2,000 while a second VM ran.
/// Hardware timing never varies, so a "no" from any trial is the answer (and ends the trials).
const LATCHED_NMI_TRIALS: usize = 5;

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
    };

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
             syscall-cpl0={} cpl3-step={}",
            yes_no(self.iretq_single_step),
            yes_no(self.event_entry_stop),
            yes_no(self.int3_native),
            yes_no(self.latched_nmi_at_iret),
            yes_no(self.swapgs_single_step),
            yes_no(self.syscall_enters_cpl0),
            yes_no(self.cpl3_single_step)
        )
    }
}

/// Probes the host with the guest's `naive` NMI entry and a short workload. Leaves the VM
/// reset, with single-stepping off.
pub fn calibrate(vm: &mut Vm) -> Result<HostProfile> {
    let facts = GuestFacts::read(vm)?;
    let mut insns = InsnCache::default();
    let entry = vm.image().symbol(Variant::NAIVE.entry_symbol())?;

    // 1. An NMI during the workload: where is the first stop, and does IRETQ stop on its own?
    let target = start_nmi_and_step_to_iretq(vm, &mut insns)?;
    let event_entry_stop = target.entry_stop == entry;
    let after = step(vm)?;
    let iretq_single_step = after == target.rip;

    // 2. The same with a second NMI latched before the IRETQ: where does it arrive?
    let mut latched_nmi_at_iret = true;
    for _ in 0..LATCHED_NMI_TRIALS {
        if !latched_nmi_arrives_at_iret(vm, &mut insns, &facts)? {
            latched_nmi_at_iret = false;
            break;
        }
    }

    // 3. A ring-0 int3 outside of single-stepping.
    vm.set_debug(GuestDebug::default())?;
    vm.reset()?;
    vm.write_script(&Script::new(Variant::NAIVE, Workload::Breakpoint, 1))?;
    let mut int3_native = true;
    for _ in 0..CALIBRATION_STEPS {
        match vm.run_once()? {
            Exit::Int3Performed => int3_native = false,
            Exit::IoOut { port: port::REPORT, .. } => break,
            _ => {}
        }
    }
    let swapgs_single_step = probe_swapgs_step(vm, &mut insns)?;
    let syscall_enters_cpl0 = probe_native_syscall(vm)?;
    let cpl3_single_step = probe_cpl3_step(vm)?;
    vm.reset()?;
    Ok(HostProfile {
        iretq_single_step,
        event_entry_stop,
        int3_native,
        latched_nmi_at_iret,
        swapgs_single_step,
        syscall_enters_cpl0,
        cpl3_single_step,
    })
}

/// Probe 4: the user workload free-running to the kernel's first `swapgs` on its way into ring
/// 3 (a ring-0 breakpoint), then one single-step: does it stop right after the `swapgs`?
fn probe_swapgs_step(vm: &mut Vm, insns: &mut InsnCache) -> Result<bool> {
    vm.reset()?;
    vm.write_script(&Script::new(Variant::LINUX, Workload::User, 1))?;
    let swapgs = vm.image().symbol(SWAPGS_SYMBOL)?;
    if !insns.get(vm.ram(), swapgs)?.is_swapgs {
        return Err(Error::Calibration(format!("{SWAPGS_SYMBOL} is not a swapgs")));
    }
    vm.set_debug(GuestDebug { breakpoints: [Some(swapgs), None, None, None], single_step: false })?;
    for _ in 0..CALIBRATION_STEPS {
        if let Exit::Debug { pc, .. } = vm.run_once()?
            && pc == swapgs
        {
            vm.set_debug(GuestDebug { single_step: true, ..GuestDebug::default() })?;
            let after = step(vm)?;
            vm.set_debug(GuestDebug::default())?;
            return Ok(after == swapgs + u64::from(insns.get(vm.ram(), swapgs)?.len));
        }
    }
    Err(Error::Calibration(format!("{SWAPGS_SYMBOL} was never reached")))
}

/// Probe 5: the user workload with real SYSCALLs, free-running. It reaches DONE only where SYSCALL
/// from CPL3 enters CPL0 (on kvm_pvm the entry's first `swapgs` faults at CPL3: a panic).
fn probe_native_syscall(vm: &mut Vm) -> Result<bool> {
    vm.reset()?;
    let mut script = Script::new(Variant::LINUX, Workload::User, 1);
    script.options = option::NATIVE_SYSCALL;
    vm.write_script(&script)?;
    for _ in 0..CALIBRATION_STEPS {
        if let Exit::IoOut { port: port::REPORT, value, .. } = vm.run_once()? {
            return Ok(Report::from_code(value) == Some(Report::Done));
        }
    }
    Ok(false)
}

/// Probe 6: the user workload free-running to its first ring-3 point, then one single-step. Does it
/// stop at CPL3, or does the #DB leak into the guest?
fn probe_cpl3_step(vm: &mut Vm) -> Result<bool> {
    vm.reset()?;
    vm.write_script(&Script::new(Variant::LINUX, Workload::User, 1))?;
    for _ in 0..CALIBRATION_STEPS {
        match vm.run_once()? {
            Exit::Mmio { address: USER_POINT_ADDRESS, write: true } => {
                vm.set_debug(GuestDebug { single_step: true, ..GuestDebug::default() })?;
                let stopped = matches!(vm.run_once()?, Exit::Debug { .. });
                let at_cpl3 = vm.sync_state().sregs.cs.selector & 3 == 3;
                vm.set_debug(GuestDebug::default())?;
                return Ok(stopped && at_cpl3);
            }
            Exit::IoOut { port: port::REPORT, .. } => break,
            _ => {}
        }
    }
    Ok(false)
}

/// Where calibration stands after [`start_nmi_and_step_to_iretq`].
struct IretqStop {
    /// RIP of the first stop after the NMI was injected.
    entry_stop: u64,
    /// Where the NMI handler's IRETQ returns to.
    rip: u64,
}

/// Probe 2, one trial: an NMI latched while the handler's IRETQ is next; does it arrive right
/// after the IRETQ, interrupting its return target before it runs?
fn latched_nmi_arrives_at_iret(
    vm: &mut Vm,
    insns: &mut InsnCache,
    facts: &GuestFacts,
) -> Result<bool> {
    let target = start_nmi_and_step_to_iretq(vm, insns)?;
    vm.inject_nmi()?;
    for _ in 0..3 {
        step(vm)?;
        let nmi = vm.sync_state().events.nmi;
        if nmi.masked != 0 && nmi.pending == 0 {
            return Ok(vm.ram().read_u64(facts.nmi_frame_address())? == target.rip);
        }
    }
    Ok(false)
}

/// Resets, single-steps into a run up to an ordinary instruction, injects an NMI there and
/// steps to the NMI handler's IRETQ.
fn start_nmi_and_step_to_iretq(vm: &mut Vm, insns: &mut InsnCache) -> Result<IretqStop> {
    vm.reset()?;
    vm.write_script(&Script::new(Variant::NAIVE, Workload::Loop, 20))?;
    vm.set_debug(GuestDebug { single_step: true, ..GuestDebug::default() })?;
    step(vm)?;
    // The NMI must interrupt an ordinary instruction: after an IRETQ back into a `rep` string
    // instruction KVM stops at the same RIP again, which would look like an IRETQ stop.
    while insns.get(vm.ram(), vm.regs().rip)?.is_rep_string {
        step(vm)?;
    }
    vm.inject_nmi()?;
    let entry_stop = step(vm)?;
    for _ in 0..CALIBRATION_STEPS {
        let pc = vm.sync_state().regs.rip;
        if insns.get(vm.ram(), pc)?.is_iretq {
            let rsp = vm.sync_state().regs.rsp;
            return Ok(IretqStop { entry_stop, rip: vm.ram().read_u64(rsp)? });
        }
        step(vm)?;
    }
    Err(Error::Calibration("the NMI handler's IRETQ was never reached".into()))
}

/// One single-step; returns the new RIP.
fn step(vm: &mut Vm) -> Result<u64> {
    match vm.run_once()? {
        Exit::Debug { pc, .. } => Ok(pc),
        other => Err(Error::Calibration(format!("expected a single-step stop, got {other:?}"))),
    }
}
