//! The start-up calibration: each property of [`HostProfile`] measured by a short run of the
//! guest.

use nmifuzz_abi::{Report, Script, USER_POINT_ADDRESS, Variant, Workload, option, port, user_flag};

use super::HostProfile;
use crate::engine::GuestFacts;
use crate::engine::decode::InsnCache;
use crate::engine::watch;
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
    let user_nt = probe_user_nt(vm, native | ss16)?;
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
        user_nt,
    })
}

/// Probe 10: the user workload free-running (with `options`) with NT among its flags: does it
/// reach DONE, its own checks finding NT where it set it?
fn probe_user_nt(vm: &mut Vm, options: u32) -> Result<bool> {
    let mut script = Script::new(Variant::LINUX, Workload::User, 1);
    script.options = options;
    script.user_flag_count = 1;
    script.user_flags[0] = user_flag::NT;
    run_script(vm, &script, |_, _| false)
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
    at_point: impl FnMut(u64, u64) -> bool,
) -> Result<bool> {
    let mut script = Script::new(Variant::LINUX, Workload::User, 1);
    script.options = options;
    run_script(vm, &script, at_point)
}

/// Resets and free-runs `script`, as [`run_user_workload`] does.
fn run_script(
    vm: &mut Vm,
    script: &Script,
    mut at_point: impl FnMut(u64, u64) -> bool,
) -> Result<bool> {
    vm.reset()?;
    vm.write_script(script)?;
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
