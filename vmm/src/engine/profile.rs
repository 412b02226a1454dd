//! The host profile: how this host's KVM single-steps and delivers NMIs, probed at start-up so
//! that the engine is exact both on kvm_pvm and on ordinary VMX/SVM KVM.

use std::fmt;

use nmifuzz_abi::{Report, Script, USER_POINT_ADDRESS, Variant, Workload, option, port};
use serde::{Deserialize, Serialize};

use super::GuestFacts;
use super::decode::InsnCache;
use super::watch;
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
    };

    /// The script options that make the guest use what this host gives: real SYSCALLs, a
    /// 16-bit SS from the LDT.
    pub fn guest_options(&self) -> u32 {
        let mut options = 0;
        if self.syscall_enters_cpl0 {
            options |= option::NATIVE_SYSCALL;
        }
        if self.ldt_ss16 {
            options |= option::LDT_SS16;
        }
        options
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
             ss16-leak={}",
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
            yes_no(self.ss16_keeps_rsp_high)
        )
    }
}

/// Probes the host with the guest's `naive` NMI entry and a short workload. Leaves the VM
/// reset, with single-stepping off, and set up to step as this host needs
/// ([`Vm::set_step_rearm`]).
pub fn calibrate(vm: &mut Vm) -> Result<HostProfile> {
    let facts = GuestFacts::read(vm)?;
    let mut insns = InsnCache::default();
    let entry = vm.image().symbol(Variant::NAIVE.entry_symbol())?;

    // 0. Does single-stepping survive a register write? Every later probe steps as it must.
    let sticky_single_step = probe_sticky_step(vm)?;
    vm.set_step_rearm(!sticky_single_step);

    // 1. An NMI during the workload: does the host stop at the handler's first instruction by
    // itself, and does IRETQ stop on its own?
    let event_entry_stop = probe_entry_stop(vm, &mut insns, entry)?;
    let target = start_nmi_and_step_to_iretq(vm, &mut insns, entry)?;
    let after = step(vm, entry)?;
    let iretq_single_step = after == target.rip;

    // 2. The same with a second NMI latched before the IRETQ: where does it arrive?
    let mut latched_nmi_at_iret = true;
    for _ in 0..LATCHED_NMI_TRIALS {
        if !latched_nmi_arrives_at_iret(vm, &mut insns, &facts, entry)? {
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
    let rf_masks_breakpoints = probe_rf_masks_breakpoints(vm)?;
    let native = if syscall_enters_cpl0 { option::NATIVE_SYSCALL } else { 0 };
    let ldt_ss16 = probe_ldt_ss16(vm, native)?;
    let ss16 = if ldt_ss16 { option::LDT_SS16 } else { 0 };
    let ss16_keeps_rsp_high = probe_ss16_rsp(vm, native | ss16)?;
    vm.set_debug(GuestDebug::default())?;
    vm.reset()?;
    Ok(HostProfile {
        iretq_single_step,
        event_entry_stop,
        int3_native,
        latched_nmi_at_iret,
        swapgs_single_step,
        syscall_enters_cpl0,
        cpl3_single_step,
        sticky_single_step,
        rf_masks_breakpoints,
        ldt_ss16,
        ss16_keeps_rsp_high,
    })
}

/// Probe 8: the user workload free-running with its 16-bit SS from the LDT (and the host's
/// system-call instruction, `options`): does it reach DONE with its one return through
/// espfix64, and no IRET repaired but `bad_return`'s? (Where an IRET to an LDT SS raises #GP,
/// the bad-IRET fixup repairs that return too.)
fn probe_ldt_ss16(vm: &mut Vm, options: u32) -> Result<bool> {
    let done = run_user_workload(vm, options | option::LDT_SS16, |_, _| false)?;
    let counters = vm.mailbox()?.counters;
    Ok(done && counters.espfix_returns == 1 && counters.bad_iret_fixups == 1)
}

/// Probe 9: the user workload free-running (with `options`) to its point after the return to a
/// 16-bit SS (in compatibility mode): are RSP[63:32] there the user's (0), or what the
/// kernel's RSP had?
fn probe_ss16_rsp(vm: &mut Vm, options: u32) -> Result<bool> {
    let point = vm.image().symbol("user_point_ss16")?;
    let mut leaked = None;
    run_user_workload(vm, options, |rip, rsp| {
        let at_point = (point..point + 16).contains(&rip);
        if at_point {
            leaked = Some(rsp >> 32 != 0);
        }
        at_point
    })?;
    leaked.ok_or_else(|| {
        let why = vm.mailbox().map(|m| vm.guest_panic(&m).message).unwrap_or_default();
        Error::Calibration(format!("user_point_ss16 was never reached; the guest said: {why}"))
    })
}

/// Resets and free-runs one iteration of the user workload with `options`, calling `at_point`
/// with RIP and RSP at each ring-3 point until it returns true. Returns whether the run reached
/// DONE.
fn run_user_workload(
    vm: &mut Vm,
    options: u32,
    mut at_point: impl FnMut(u64, u64) -> bool,
) -> Result<bool> {
    vm.reset()?;
    let mut script = Script::new(Variant::LINUX, Workload::User, 1);
    script.options = options;
    vm.write_script(&script)?;
    for _ in 0..CALIBRATION_STEPS {
        match vm.run_once()? {
            Exit::Mmio { address: USER_POINT_ADDRESS, write: true } => {
                let regs = vm.regs();
                if at_point(regs.rip, regs.rsp) {
                    return Ok(false);
                }
            }
            Exit::IoOut { port: port::REPORT, value, .. } => {
                return Ok(Report::from_code(value) == Some(Report::Done));
            }
            _ => {}
        }
    }
    Ok(false)
}

/// Probe 7: the loop workload's second iteration writes to its unmapped demand page; free-running
/// with a breakpoint on that write, and one on the #PF entry so that the first can be moved
/// out of the way meanwhile, is the write hit again when the #PF handler's IRETQ (RF = 1 in a
/// fault's frame) retries it?
fn probe_rf_masks_breakpoints(vm: &mut Vm) -> Result<bool> {
    vm.reset()?;
    vm.write_script(&Script::new(Variant::NAIVE, Workload::Loop, 2))?;
    let image = vm.image();
    // The phase's `popfq` (one byte), then the write.
    let write = image.symbol("workload_phase_pf")? + 1;
    let pf_entry = GuestFacts::read(vm)?.exception_entry(watch::PAGE_FAULT);
    let mut hits = 0;
    let mut watched = [Some(write), Some(pf_entry), None, None];
    for _ in 0..CALIBRATION_STEPS {
        vm.set_debug(GuestDebug { single_step: false, breakpoints: watched })?;
        match vm.run_once()? {
            Exit::Debug { pc, .. } if pc == write => {
                hits += 1;
                watched = [None, Some(pf_entry), None, None];
            }
            Exit::Debug { pc, .. } if pc == pf_entry => watched = [Some(write), None, None, None],
            Exit::IoOut { port: port::REPORT, .. } => break,
            _ => {}
        }
    }
    match hits {
        1 => Ok(true),
        2 => Ok(false),
        n => {
            Err(Error::Calibration(format!("the #PF phase's write was hit {n} times, not 1 or 2")))
        }
    }
}

/// Probe 0: single-stepping set at the workload loop's top (the guest free-ran there to a
/// breakpoint), then a reset, which writes the snapshot's registers: does the first run after it
/// stop after one instruction? Stock KVM sets TF for the RIP of KVM_SET_GUEST_DEBUG alone and
/// clears it when registers are written at another RIP, so there the run goes on to DONE.
fn probe_sticky_step(vm: &mut Vm) -> Result<bool> {
    vm.set_step_rearm(false);
    vm.reset()?;
    vm.write_script(&Script::new(Variant::NAIVE, Workload::Loop, 20))?;
    let top = vm.image().symbol("workload_loop_top")?;
    vm.set_debug(GuestDebug { breakpoints: [Some(top), None, None, None], single_step: false })?;
    let reached = (0..CALIBRATION_STEPS).map(|_| vm.run_once()).find_map(|exit| match exit {
        Ok(Exit::Debug { pc, .. }) if pc == top => Some(Ok(())),
        Ok(Exit::IoOut { port: port::REPORT, .. }) => {
            Some(Err(Error::Calibration("the workload loop's top was never reached".into())))
        }
        Ok(_) => None,
        Err(e) => Some(Err(e)),
    });
    reached
        .unwrap_or_else(|| Err(Error::Calibration("the loop's top was never reached".into())))?;
    vm.set_debug(GuestDebug { single_step: true, ..GuestDebug::default() })?;
    vm.reset()?;
    vm.write_script(&Script::new(Variant::NAIVE, Workload::Loop, 20))?;
    let exit = vm.run_once()?;
    vm.set_debug(GuestDebug::default())?;
    Ok(matches!(exit, Exit::Debug { .. }))
}

/// Probe 1a: an NMI made pending at an ordinary instruction of a stepped run: is the first stop
/// after it at the NMI entry, without a breakpoint there?
fn probe_entry_stop(vm: &mut Vm, insns: &mut InsnCache, entry: u64) -> Result<bool> {
    start_stepped_run(vm, insns, entry)?;
    vm.inject_nmi()?;
    vm.set_debug(GuestDebug { single_step: true, ..GuestDebug::default() })?;
    Ok(matches!(vm.run_once()?, Exit::Debug { pc, .. } if pc == entry))
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
            let after = vm.run_once()?;
            vm.set_debug(GuestDebug::default())?;
            let next = swapgs + u64::from(insns.get(vm.ram(), swapgs)?.len);
            return Ok(matches!(after, Exit::Debug { pc, .. } if pc == next));
        }
    }
    Err(Error::Calibration(format!("{SWAPGS_SYMBOL} was never reached")))
}

/// Probe 5: the user workload with real SYSCALLs, free-running. It reaches DONE only where SYSCALL
/// from CPL3 enters CPL0 (on kvm_pvm the entry's first `swapgs` faults at CPL3: a panic).
fn probe_native_syscall(vm: &mut Vm) -> Result<bool> {
    run_user_workload(vm, option::NATIVE_SYSCALL, |_, _| false)
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
    /// Where the NMI handler's IRETQ returns to.
    rip: u64,
}

/// Probe 2, one trial: an NMI latched while the handler's IRETQ is next; does it arrive right
/// after the IRETQ, interrupting its return target before it runs?
fn latched_nmi_arrives_at_iret(
    vm: &mut Vm,
    insns: &mut InsnCache,
    facts: &GuestFacts,
    entry: u64,
) -> Result<bool> {
    let target = start_nmi_and_step_to_iretq(vm, insns, entry)?;
    vm.inject_nmi()?;
    for _ in 0..3 {
        step(vm, entry)?;
        let nmi = vm.sync_state().events.nmi;
        if nmi.masked != 0 && nmi.pending == 0 {
            return Ok(vm.read_virtual_u64(facts.nmi_frame_address())? == target.rip);
        }
    }
    Ok(false)
}

/// Resets and single-steps into a run up to an ordinary instruction: an NMI made pending there
/// interrupts it. (After an IRETQ back into a `rep` string instruction KVM stops at the same
/// RIP again, which would look like an IRETQ stop.)
fn start_stepped_run(vm: &mut Vm, insns: &mut InsnCache, entry: u64) -> Result<()> {
    vm.reset()?;
    vm.write_script(&Script::new(Variant::NAIVE, Workload::Loop, 20))?;
    step(vm, entry)?;
    while insns.get(vm.ram(), vm.regs().rip)?.is_rep_string {
        step(vm, entry)?;
    }
    Ok(())
}

/// Starts a stepped run, injects an NMI at an ordinary instruction and steps to the NMI
/// handler's IRETQ.
fn start_nmi_and_step_to_iretq(
    vm: &mut Vm,
    insns: &mut InsnCache,
    entry: u64,
) -> Result<IretqStop> {
    start_stepped_run(vm, insns, entry)?;
    vm.inject_nmi()?;
    step(vm, entry)?;
    for _ in 0..CALIBRATION_STEPS {
        let pc = vm.sync_state().regs.rip;
        if insns.get(vm.ram(), pc)?.is_iretq {
            let rsp = vm.sync_state().regs.rsp;
            return Ok(IretqStop { rip: vm.read_virtual_u64(rsp)? });
        }
        step(vm, entry)?;
    }
    Err(Error::Calibration("the NMI handler's IRETQ was never reached".into()))
}

/// One single-step, as the engine steps: with a hardware breakpoint on the NMI `entry`, where a
/// delivery would not stop by itself (none while at it: it would stop there again). Returns the
/// new RIP.
fn step(vm: &mut Vm, entry: u64) -> Result<u64> {
    let at_entry = vm.sync_state().regs.rip == entry;
    let breakpoints = [(!at_entry).then_some(entry), None, None, None];
    vm.set_debug(GuestDebug { single_step: true, breakpoints })?;
    match vm.run_once()? {
        Exit::Debug { pc, .. } => Ok(pc),
        other => Err(Error::Calibration(format!("expected a single-step stop, got {other:?}"))),
    }
}
