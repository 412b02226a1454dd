//! The engine's run loop: stops, injections, IRETQ emulation, delivery bookkeeping and the
//! oracles at DONE. See the module documentation of [`super`] for the counting rule.

use std::time::Instant;

use nmifuzz_abi::{Report, port};

use super::returns::{self, Context};
use super::schedule::Trigger;
use super::trace::{Event, Injected};
use super::{DR6_BREAKPOINTS, DR6_BS, Engine, Run, RunOptions, WATCHED_VECTORS};
use crate::error::Result;
use crate::exit::Exit;
use crate::outcome::Verdict;
use crate::vm::{GuestDebug, IretFrame, Vm};

/// What moved the guest to the boundary `after_step` looks at.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Step {
    /// A KVM_RUN.
    Ran,
    /// The VMM's own IRETQ, without entering the guest.
    EmulatedIretq,
}

/// Most exits the probe NMI after DONE may take to come back to the guest's final HLT.
const PROBE_EXITS: u64 = 64;

impl Engine {
    /// Runs until a verdict.
    pub(super) fn drive(
        &mut self,
        vm: &mut Vm,
        run: &mut Run<'_>,
        options: &RunOptions,
        deadline: Instant,
    ) -> Result<Verdict> {
        self.apply_debug(vm, run, None)?;
        loop {
            if run.stepping
                && !std::mem::take(&mut run.skip_stop)
                && let Some(verdict) = self.at_stop(vm, run, options)?
            {
                return Ok(verdict);
            }
            if run.exits >= options.limits.max_exits {
                return Ok(Verdict::BudgetExhausted { exits: run.exits });
            }
            let resume = run.resume_breakpoint.take();
            if resume.is_some() {
                self.apply_debug(vm, run, resume)?;
            }
            let exit = vm.run_once()?;
            run.exits += 1;
            if resume.is_some() {
                self.apply_debug(vm, run, None)?;
            }
            if let Some(verdict) = self.on_exit(vm, run, &exit, options, deadline)? {
                return Ok(verdict);
            }
            if run.stepping && !run.wants_stepping() {
                run.stepping = false;
                run.note(Event::FreeRun);
                self.apply_debug(vm, run, None)?;
            }
        }
    }

    /// Handles one exit: counts what retired, keeps the NMI books, and decides whether the
    /// run ends.
    fn on_exit(
        &mut self,
        vm: &mut Vm,
        run: &mut Run<'_>,
        exit: &Exit,
        options: &RunOptions,
        deadline: Instant,
    ) -> Result<Option<Verdict>> {
        let retired = match *exit {
            Exit::Debug { pc, dr6 } if run.stepping => {
                if dr6 & DR6_BS != 0 {
                    match run.last_stop {
                        // Still inside a `rep` string instruction: nothing retired yet.
                        Some((last, insn)) if insn.is_rep_string && last == pc => 0,
                        // A host without IRETQ stops ran an IRETQ the VMM could not perform
                        // together with the next instruction.
                        Some((_, insn)) if insn.is_iretq && !self.profile.iretq_single_step => 2,
                        _ => 1,
                    }
                } else if dr6 & DR6_BREAKPOINTS != 0 {
                    let index = (dr6 & DR6_BREAKPOINTS).trailing_zeros() as usize;
                    run.resume_breakpoint = Some(index);
                    run.note(Event::Exception { vector: WATCHED_VECTORS[index] });
                    0
                } else {
                    return Ok(Some(unexpected(vm, exit)));
                }
            }
            Exit::IoOut { port: port::CONSOLE | port::PING, .. } => self.out_retired(vm, run)?,
            Exit::IoOut { port: port::REPORT, value, .. } => {
                let retired = self.out_retired(vm, run)?;
                run.retire(retired);
                run.note(Event::Report { code: value });
                if Report::from_code(value) == Some(Report::Done) {
                    return self.finish_done(vm, run).map(Some);
                }
                return Ok(vm.classify(exit, deadline, options.limits.wall));
            }
            // `Vm::run_once` performed the int3 the host could not and made #BP pending. The
            // next boundary is before the #BP handler's first instruction, reached by the
            // next KVM_RUN; RIP after the int3 is not a boundary of its own.
            Exit::Int3Performed => {
                run.skip_stop = true;
                1
            }
            Exit::Interrupted if Instant::now() < deadline => 0,
            _ => {
                return Ok(vm
                    .classify(exit, deadline, options.limits.wall)
                    .or_else(|| Some(unexpected(vm, exit))));
            }
        };
        if run.stepping {
            run.retire(retired);
            return Ok(self.after_step(vm, run, Step::Ran));
        }
        Ok(None)
    }

    /// Instructions retired at an `out` exit: 1 where the host already moved RIP past the
    /// `out` (the exit is the boundary after it), 0 where it completes the `out` on the next
    /// entry (stock KVM; the next stop counts it).
    fn out_retired(&mut self, vm: &mut Vm, run: &Run<'_>) -> Result<u64> {
        if !run.stepping {
            return Ok(0);
        }
        let rip = vm.sync_state().regs.rip;
        Ok(if self.insns.get(vm.ram(), rip)?.is_out { 0 } else { 1 })
    }

    /// Work at a boundary: the trace, symbolic points, due injections and IRETQ emulation.
    fn at_stop(
        &mut self,
        vm: &mut Vm,
        run: &mut Run<'_>,
        options: &RunOptions,
    ) -> Result<Option<Verdict>> {
        loop {
            let pc = vm.sync_state().regs.rip;
            let executing = run.executing_address.and_then(|a| vm.ram().read_u64(a).ok());
            run.record_stop(pc, executing);
            if run.insn >= options.max_instructions
                || run.nmi_insn >= run.nmi_budget(options.max_nmi_instructions)
            {
                return Ok(Some(Verdict::InstructionBudget {
                    instructions: run.insn,
                    symbol: vm.image().symbolize(pc),
                }));
            }
            if run.due.is_none()
                && let Some(&Trigger::At { address, occurrence, extra }) =
                    run.plan.injections.get(run.next)
                && pc == address
            {
                run.hits += 1;
                if run.hits == occurrence {
                    run.due = Some(run.insn + extra);
                }
            }
            while run.due == Some(run.insn) {
                let how = self.inject(vm, run)?;
                run.recorder.event(Event::NmiInjected { index: run.next, how });
                run.next += 1;
                run.arm_next();
            }
            let insn = self.insns.get(vm.ram(), pc)?;
            run.last_stop = Some((pc, insn));
            // An NMI about to be delivered comes before the IRETQ, which then runs later, if
            // at all; an IRETQ whose frame is outside memory faults instead of returning.
            if !insn.is_iretq || nmi_imminent(vm, run) {
                return Ok(None);
            }
            let Some(frame) = iret_frame(vm) else { return Ok(None) };
            if let Some(verdict) =
                returns::judge(&run.contexts, &self.facts.bounds, &frame, run.insn, pc, vm.image())
            {
                run.recorder.event(Event::WrongReturn { target: frame.rip });
                return Ok(Some(verdict));
            }
            if self.profile.iretq_single_step || !same_privilege(vm, &frame) {
                return Ok(None);
            }
            vm.emulate_iretq(&frame);
            run.retire(1);
            run.recorder.event(Event::Iretq { target: frame.rip, emulated: true });
            if let Some(verdict) = self.after_step(vm, run, Step::EmulatedIretq) {
                return Ok(Some(verdict));
            }
        }
    }

    /// Injects one NMI and classifies it as hardware would: delivered if NMIs are unblocked
    /// and none is pending, latched if the one-deep latch is free, dropped otherwise. (KVM,
    /// like hardware, lets a second NMI wait while a first one is about to be delivered.)
    fn inject(&mut self, vm: &mut Vm, run: &mut Run<'_>) -> Result<Injected> {
        let masked = vm.sync_state().events.nmi.masked != 0;
        let capacity = if masked { 1 } else { 2 };
        let how = if run.undelivered >= capacity {
            Injected::Dropped
        } else if masked || run.undelivered > 0 {
            Injected::Latched
        } else {
            Injected::Delivered
        };
        // Even a dropped NMI goes to KVM, which drops it too: its state stays the hardware's.
        vm.inject_nmi()?;
        run.nmi.injected += 1;
        match how {
            Injected::Dropped => run.nmi.dropped += 1,
            Injected::Latched => {
                run.nmi.latched += 1;
                run.undelivered += 1;
            }
            Injected::Delivered => run.undelivered += 1,
        }
        Ok(how)
    }

    /// Bookkeeping after the guest moved to a new boundary: deliveries, returns to
    /// interrupted contexts, and iteration starts.
    fn after_step(&mut self, vm: &mut Vm, run: &mut Run<'_>, step: Step) -> Option<Verdict> {
        // NMIs are delivered only inside KVM_RUN; after the VMM's own IRETQ, the sync-regs
        // events do not yet show a KVM_NMI made at this stop, so they must not be compared.
        if step == Step::Ran
            && let Some(verdict) = self.account_deliveries(vm, run)
        {
            return Some(verdict);
        }
        let sync = vm.sync_state();
        let (pc, rsp) = (sync.regs.rip, sync.regs.rsp);
        // A return to an open context closes it and every NMI nested inside it (merged NMIs).
        let resumed = run.contexts.iter().position(|c| c.frame.rip == pc && c.frame.rsp == rsp);
        let returned = resumed.is_some();
        if let Some(index) = resumed {
            run.contexts.truncate(index);
        }
        // A return to an NMI that struck right at the iteration's first instruction is not a
        // new iteration.
        if pc == self.facts.iteration && !returned {
            run.nmi.iterations += 1;
            run.note(Event::NmiIteration);
            run.awaiting_iteration = None;
            // Cumulative: an NMI nested after the entry's point of no return (for Linux,
            // end_repeat_nmi) but before the iteration starts both precedes this iteration
            // and forces another one, so two deliveries give two iterations in a row.
            if run.nmi.iterations > run.nmi.delivered {
                return Some(Verdict::LostNmi {
                    message: format!(
                        "do_nmi iteration {} started at instruction {} although only {} NMIs \
                         were delivered (iterations outnumber deliveries)",
                        run.nmi.iterations, run.insn, run.nmi.delivered
                    ),
                });
            }
        }
        None
    }

    /// Compares KVM's undelivered NMIs with the engine's after a KVM_RUN: each one fewer was
    /// delivered during that run, and its interrupted context is pushed.
    fn account_deliveries(&mut self, vm: &mut Vm, run: &mut Run<'_>) -> Option<Verdict> {
        let events = vm.sync_state().events;
        let undelivered = u64::from(events.nmi.pending) + u64::from(events.nmi.injected);
        if undelivered > run.undelivered {
            return Some(Verdict::NmiCountMismatch {
                message: format!(
                    "KVM reports {undelivered} undelivered NMIs at instruction {}, but the VMM \
                     left only {} pending",
                    run.insn, run.undelivered
                ),
            });
        }
        // This host runs the handler's first instruction before the stop after a delivery. If
        // that already left the NMI-handling code (an entry that returns at once), the return
        // was never a stop of its own, and there is no open context to judge it by.
        let pc = vm.sync_state().regs.rip;
        let returned_at_once = !self.facts.bounds.nmi_code.contains(&pc);
        for _ in undelivered..run.undelivered {
            let frame = self.nmi_frame(vm);
            run.nmi.delivered += 1;
            if !returned_at_once {
                let nmi = run.nmi.delivered;
                run.contexts.push(Context { frame, nmi, delivered_at: run.insn });
            }
            run.awaiting_iteration.get_or_insert(run.insn);
            run.note(Event::NmiDelivered { frame_rip: frame.rip });
        }
        run.undelivered = undelivered;
        None
    }

    /// The hardware frame of the latest NMI, at the top of the NMI stack.
    fn nmi_frame(&self, vm: &Vm) -> IretFrame {
        let base = (self.facts.nmi_stack_top & !0xf) - 40;
        let word = |i: u64| vm.ram().read_u64(base + 8 * i).unwrap_or(0);
        IretFrame { rip: word(0), cs: word(1), rflags: word(2), rsp: word(3), ss: word(4) }
    }

    /// The oracles at DONE, then the probe NMI.
    fn finish_done(&mut self, vm: &mut Vm, run: &mut Run<'_>) -> Result<Verdict> {
        let counters = vm.mailbox()?.counters;
        run.done_counters = Some(counters);
        if let Some(at) = run.awaiting_iteration {
            return Ok(Verdict::LostNmi {
                message: format!(
                    "an NMI delivered at instruction {at} was never followed by a do_nmi \
                     iteration before DONE"
                ),
            });
        }
        let nmi = run.nmi;
        if nmi.injected != nmi.delivered + nmi.dropped + run.undelivered {
            return Ok(Verdict::NmiCountMismatch {
                message: format!(
                    "injected {} != delivered {} + dropped {} + still pending {}",
                    nmi.injected, nmi.delivered, nmi.dropped, run.undelivered
                ),
            });
        }
        if counters.nmi_iterations != nmi.iterations {
            return Ok(Verdict::NmiCountMismatch {
                message: format!(
                    "the guest counted {} do_nmi iterations, the VMM saw {} start",
                    counters.nmi_iterations, nmi.iterations
                ),
            });
        }
        if vm.sync_state().events.nmi.masked != 0 {
            return Ok(Verdict::NmiLeftBlocked {
                message: "KVM reports NMIs still masked when the workload reported DONE".into(),
            });
        }
        self.probe(vm, run, counters.do_nmi_calls)
    }

    /// Injects one more NMI after DONE and lets the guest run to its final HLT: a guest whose
    /// NMIs are not blocked calls `do_nmi` once more.
    fn probe(&mut self, vm: &mut Vm, run: &mut Run<'_>, calls_at_done: u64) -> Result<Verdict> {
        run.stepping = false;
        self.apply_debug(vm, run, None)?;
        vm.inject_nmi()?;
        run.note(Event::ProbeNmiInjected);
        for _ in 0..PROBE_EXITS {
            let exit = vm.run_once()?;
            run.exits += 1;
            match exit {
                Exit::Hlt => break,
                Exit::IoOut { port: port::REPORT, value, .. }
                    if Report::from_code(value) == Some(Report::Panic) =>
                {
                    return Ok(vm
                        .classify(&exit, Instant::now(), Default::default())
                        .unwrap_or_else(|| unexpected(vm, &exit)));
                }
                // Console output, and an `int3` of the probe's do_nmi action that
                // `Vm::run_once` already performed.
                Exit::IoOut { port: port::CONSOLE | port::PING, .. } => {}
                Exit::Int3Performed => {}
                Exit::Interrupted => {
                    return Ok(Verdict::NmiLeftBlocked {
                        message: "the guest never came back to its final HLT after the probe NMI"
                            .into(),
                    });
                }
                other => return Ok(unexpected(vm, &other)),
            }
        }
        let calls = vm.mailbox()?.counters.do_nmi_calls;
        let ok = calls == calls_at_done + 1;
        run.nmi.probe = Some(ok);
        Ok(if ok {
            Verdict::Done
        } else {
            Verdict::NmiLeftBlocked {
                message: format!(
                    "a probe NMI injected after DONE did not reach do_nmi (calls {calls_at_done} \
                     before, {calls} after)"
                ),
            }
        })
    }

    /// Single-stepping while `run.stepping`, with breakpoints on the watched handler entries
    /// where the host does not stop there by itself; `without` leaves one out.
    fn apply_debug(&self, vm: &mut Vm, run: &Run<'_>, without: Option<usize>) -> Result<()> {
        let mut debug = GuestDebug { single_step: run.stepping, ..GuestDebug::default() };
        if run.stepping && !self.profile.event_entry_stop {
            for (i, entry) in self.facts.exception_entries.iter().enumerate() {
                if Some(i) != without {
                    debug.breakpoints[i] = Some(*entry);
                }
            }
        }
        vm.set_debug(debug)
    }
}

/// Whether an NMI will be delivered on the next entry (so an IRETQ at this stop must not be
/// performed first: the NMI comes before it).
fn nmi_imminent(vm: &mut Vm, run: &Run<'_>) -> bool {
    run.undelivered > 0 && vm.sync_state().events.nmi.masked == 0
}

/// The frame an IRETQ at this stop would pop; `None` if it lies outside guest memory (the
/// IRETQ then faults).
fn iret_frame(vm: &mut Vm) -> Option<IretFrame> {
    let rsp = vm.sync_state().regs.rsp;
    let ram = vm.ram();
    let word = |i: u64| ram.read_u64(rsp.checked_add(8 * i)?).ok();
    Some(IretFrame { rip: word(0)?, cs: word(1)?, rflags: word(2)?, rsp: word(3)?, ss: word(4)? })
}

/// Whether an IRETQ popping `frame` returns to the same privilege level and segments (the only
/// IRETQ the VMM performs itself).
fn same_privilege(vm: &mut Vm, frame: &IretFrame) -> bool {
    let sregs = &vm.sync_state().sregs;
    frame.cs == u64::from(sregs.cs.selector) && frame.ss == u64::from(sregs.ss.selector)
}

fn unexpected(vm: &Vm, exit: &Exit) -> Verdict {
    Verdict::UnexpectedExit {
        description: format!("{exit:?} at {}", vm.image().symbolize(vm.regs().rip)),
    }
}
