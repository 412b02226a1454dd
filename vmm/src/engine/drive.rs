//! The engine's run loop: stops, exits, injections and IRETQ emulation, for every mode. See
//! the module documentation of [`super`] for the counting rule and [`super::mode`] for what
//! each mode steps.

use std::time::Instant;

use nmifuzz_abi::{Report, USER_POINT_ADDRESS, port};

use super::deliver::Moved;
use super::observe::Moment;
use super::run::Run;
use super::trace::Event;
use super::user;
use super::watch::{self, Watch, Watches};
use super::{DR6_BS, Engine, RunOptions, unexpected};
use crate::error::Result;
use crate::exit::Exit;
use crate::outcome::Verdict;
use crate::vm::{GuestDebug, IretFrame, Vm};

/// RFLAGS.TF, the trap flag single-stepping sets.
const RFLAGS_TF: u64 = 1 << 8;

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
            let at_boundary = run.stepping || std::mem::take(&mut run.free_run_stop);
            if at_boundary && !std::mem::take(&mut run.skip_stop) {
                // Every stop sees the guest's own code.
                self.traps.set(vm, false)?;
                if let Some(verdict) = self.at_stop(vm, run, options)? {
                    return Ok(verdict);
                }
                self.step_from_stop(vm, run)?;
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
            // The faulting IRETQ to ring 3 has been stepped: the next stop watches as usual.
            run.faulting_return = false;
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
                if let Some((_, watch)) = run.watches.hit(dr6) {
                    // A handler entry: the boundary between a delivery and the handler's first
                    // instruction. Nothing retired, unless the step ran an `int3` (a trap: it
                    // retires, then #BP is delivered); where the host cannot run one, the VMM
                    // performed it and counted it already.
                    run.resume_breakpoint = Some(pc);
                    let int3_ran = self.profile.int3_native
                        && run.last_stop.is_some_and(|(_, insn)| insn.is_int3);
                    match watch {
                        Watch::Exception(vector) => self.at_exception_entry(vm, run, vector, pc),
                        // The NMI's frame holds the stepping TF too, which hardware without a
                        // debugger would not have pushed.
                        Watch::Nmi => clear_step_flag(vm, false),
                        _ => {}
                    }
                    u64::from(int3_ran && matches!(watch, Watch::Exception(_)))
                } else if dr6 & DR6_BS != 0 {
                    let Some((last, insn)) = run.last_stop else { return Ok(None) };
                    match insn {
                        // Still inside a `rep` string instruction: nothing retired yet.
                        insn if insn.is_rep_string && last == pc => 0,
                        // A host without IRETQ stops ran an IRETQ the VMM could not perform
                        // together with the next instruction.
                        insn if insn.is_iretq && !self.profile.iretq_single_step => 2,
                        _ => 1,
                    }
                } else {
                    return Ok(Some(unexpected(vm, exit)));
                }
            }
            // An excursion through ring 3 ends at the first ring-0 entry it watches.
            Exit::Debug { pc, dr6 } if run.excursion && run.watches.hit(dr6).is_some() => {
                run.excursion = false;
                run.free_run_stop = true;
                if let Some((_, Watch::Exception(vector))) = run.watches.hit(dr6) {
                    run.note(Event::Exception { vector });
                    let executing = run.nmi_executing(vm);
                    run.observe(Moment::HandlerEntry { vector }, pc, executing);
                }
                0
            }
            // A free run stops at the breakpoints its mode set, and before the IRETQs it
            // trapped (KVM_EXIT_HLT one byte past the site, which is moved back to it).
            Exit::Debug { dr6, .. } if run.watches.hit(dr6).is_some() => {
                run.free_run_stop = true;
                0
            }
            Exit::Hlt if let Some(site) = self.traps.trapped_at(vm.sync_state().regs.rip) => {
                vm.set_rip(site);
                run.free_run_stop = true;
                0
            }
            // A single-step trap while free-running is not the engine's: KVM single-steps the
            // IRET that unblocks NMIs itself on SVM without vNMI, to deliver a latched NMI
            // right after it; or the guest returned through a frame that still held the
            // stepping TF. The free run goes on, without that TF.
            Exit::Debug { dr6, .. } if dr6 & DR6_BS != 0 => {
                let rflags = vm.sync_state().regs.rflags;
                if rflags & RFLAGS_TF != 0 {
                    vm.set_rflags(rflags & !RFLAGS_TF);
                }
                0
            }
            Exit::IoOut { port: port::CONSOLE | port::PING, .. } => {
                // The boundary after an `out` is its I/O exit: a free run whose point is there
                // stops at it (the breakpoint is not relied on to fire on the re-entry).
                let pc = vm.sync_state().regs.rip;
                run.free_run_stop = !run.stepping && run.cursor.awaited_point() == Some(pc);
                self.out_retired(vm, run)?
            }
            // A ring-3 point: the MMIO exit is the boundary after the write (RIP is past it).
            // An excursion stops at every one and counts it; a free run stops where its point
            // is.
            Exit::Mmio { address: USER_POINT_ADDRESS, write: true } => {
                let pc = vm.sync_state().regs.rip;
                let point = std::mem::take(&mut run.excursion);
                run.free_run_stop =
                    point || (!run.stepping && run.cursor.awaited_point() == Some(pc));
                u64::from(point)
            }
            Exit::IoOut { port: port::REPORT, value, .. } => {
                let retired = self.out_retired(vm, run)?;
                run.retire(retired);
                if let Some(verdict) = self.settle_free_run(vm, run) {
                    return Ok(Some(verdict));
                }
                run.note(Event::Report { code: value });
                if Report::from_code(value) == Some(Report::Done) {
                    return self.finish_done(vm, run, deadline, options.limits.wall).map(Some);
                }
                return Ok(vm.classify(exit, deadline, options.limits.wall));
            }
            // `Vm::run_once` performed the int3 the host could not and made #BP pending. The
            // next boundary is before the #BP handler's first instruction, reached by the
            // next KVM_RUN; RIP after the int3 is not a boundary of its own.
            Exit::Int3Performed => {
                run.skip_stop = run.stepping;
                1
            }
            Exit::Interrupted if Instant::now() < deadline => 0,
            _ => {
                if let Some(verdict) = self.settle_free_run(vm, run) {
                    return Ok(Some(verdict));
                }
                return Ok(vm
                    .classify(exit, deadline, options.limits.wall)
                    .or_else(|| Some(unexpected(vm, exit))));
            }
        };
        if run.stepping || run.free_run_stop {
            run.retire(retired);
            return Ok(self.after_step(vm, run, Moved::Ran));
        }
        Ok(None)
    }

    /// The stepped guest stopped at exception `vector`'s handler entry, at `pc`: the trace and
    /// the observer see it, and the frame loses the stepping TF (see [`clear_step_flag`]).
    fn at_exception_entry(&mut self, vm: &mut Vm, run: &mut Run<'_>, vector: u8, pc: u64) {
        run.note(Event::Exception { vector });
        clear_step_flag(vm, watch::has_error_code(vector));
        let executing = run.nmi_executing(vm);
        run.observe(Moment::HandlerEntry { vector }, pc, executing);
    }

    /// A free run ends with this exit: the deliveries it made since its last stop are booked,
    /// as the stepped engine booked them at its steps. (Stepping, they are booked already.)
    fn settle_free_run(&mut self, vm: &mut Vm, run: &mut Run<'_>) -> Option<Verdict> {
        if run.stepping { None } else { self.account_deliveries(vm, run) }
    }

    /// How the guest moves on from a stop: single-stepped if the mode wants stepping now, and
    /// for one step if the stop is a breakpoint's own address or an IRETQ trap's site (a free
    /// run from there would stop again at once); otherwise a free run with the breakpoints and
    /// traps of what comes next. Ring 3 is never stepped.
    fn step_from_stop(&mut self, vm: &mut Vm, run: &mut Run<'_>) -> Result<()> {
        // Ring 3 is never stepped: where the mode would step it, an excursion runs it, and
        // otherwise a free run (a ring-3 stop is never a breakpoint's or a trap's own).
        if !run.excursion && user::cpl(vm) == 3 {
            run.excursion = run.stepping || run.wants_stepping();
            run.stepping = false;
        } else if !run.excursion {
            let stepping = run.wants_stepping() || self.on_free_run_stop(vm, run);
            if stepping && !run.stepping {
                // Stepping watches the handler entries; one the free run stopped at must be
                // left out for the first step, as after any stop at a breakpoint.
                let pc = vm.sync_state().regs.rip;
                run.resume_breakpoint = self.stepping_watches(run).position(pc).map(|_| pc);
            } else if !stepping && run.stepping {
                run.note(Event::FreeRun);
            }
            run.stepping = stepping;
        }
        self.apply_debug(vm, run, None)
    }

    /// Whether the guest is at a breakpoint or an IRETQ trap a free run from here would set.
    fn on_free_run_stop(&self, vm: &mut Vm, run: &Run<'_>) -> bool {
        let pc = vm.sync_state().regs.rip;
        self.free_run_watches(run).position(pc).is_some()
            || (run.traps_in_free_run() && self.traps.is_site(pc))
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
            let executing = run.nmi_executing(vm);
            run.record_stop(pc, executing);
            if run.insn >= options.max_instructions
                || run.nmi_insn >= run.nmi_budget(options.max_nmi_instructions)
            {
                return Ok(Some(Verdict::InstructionBudget {
                    instructions: run.insn,
                    symbol: vm.image().symbolize(pc),
                }));
            }
            run.cursor.reached(pc, run.insn);
            while let Some(index) = run.cursor.take_due(run.insn) {
                let how = self.inject(vm, run)?;
                run.recorder.event(Event::NmiInjected { index, how });
                run.observe(Moment::Injected { how }, pc, executing);
            }
            let insn = self.insns.get(vm.ram(), pc)?;
            run.last_stop = Some((pc, insn));
            // An NMI about to be delivered comes before the IRETQ or SYSRET, which then runs
            // later, if at all; an IRETQ whose frame is outside memory faults instead of
            // returning.
            if nmi_imminent(vm, run) {
                return Ok(None);
            }
            if insn.is_swapgs && !self.profile.swapgs_single_step {
                vm.emulate_swapgs()?;
                run.retire(1);
                if let Some(verdict) = self.after_step(vm, run, Moved::Emulated) {
                    return Ok(Some(verdict));
                }
                continue;
            }
            if insn.is_sysretq {
                self.sysretq_to_user(vm, run);
                return Ok(None);
            }
            if !insn.is_iretq {
                return Ok(None);
            }
            let Some(frame) = iret_frame(vm) else { return Ok(None) };
            if let Some(verdict) =
                run.books.judge_return(&self.facts.bounds, &frame, run.insn, pc, vm.image())
            {
                run.recorder.event(Event::WrongReturn { target: frame.rip });
                return Ok(Some(verdict));
            }
            run.observe(Moment::Iretq { target: frame.rip }, pc, executing);
            if user::returns_to_user(&frame) {
                self.iretq_to_user(vm, run, &frame);
                return Ok(None);
            }
            if self.profile.iretq_single_step || !vm.iretq_keeps_segments(&frame) {
                return Ok(None);
            }
            // A frame pushed while the engine stepped holds its TF, which must not become the
            // guest's (see `clear_step_flag`): the VMM's stepping never needs it where it
            // performs IRETQs, and a free run may start at the next stop.
            vm.emulate_iretq(&IretFrame { rflags: frame.rflags & !RFLAGS_TF, ..frame });
            run.retire(1);
            run.recorder.event(Event::Iretq { target: frame.rip, emulated: true });
            if let Some(verdict) = self.after_step(vm, run, Moved::Emulated) {
                return Ok(Some(verdict));
            }
        }
    }

    /// Single-stepping while `run.stepping`, with breakpoints on the handler entries
    /// ([`Watches::stepping`]; none at `without`, to move past it); otherwise the breakpoints
    /// and IRETQ traps of an excursion or of the mode's free run.
    fn apply_debug(&mut self, vm: &mut Vm, run: &mut Run<'_>, without: Option<u64>) -> Result<()> {
        let (watches, single_step, traps) = if run.excursion {
            (Watches::excursion(&self.facts, run.nmi_entry), false, false)
        } else if run.stepping {
            (self.stepping_watches(run), true, false)
        } else {
            (self.free_run_watches(run), false, run.traps_in_free_run())
        };
        self.traps.set(vm, traps)?;
        run.watches = watches;
        vm.set_debug(GuestDebug { single_step, breakpoints: watches.breakpoints(without) })
    }

    /// What the fast mode's free run from here watches.
    fn free_run_watches(&self, run: &Run<'_>) -> Watches {
        let exception_return =
            self.profile.rf_masks_breakpoints.then_some(self.facts.exception_return);
        run.free_run_watches(self.facts.iteration, exception_return)
    }

    /// What stepping watches: the handler entries, where the host does not stop there by
    /// itself.
    fn stepping_watches(&self, run: &Run<'_>) -> Watches {
        if self.profile.event_entry_stop {
            Watches::default()
        } else {
            Watches::stepping(&self.facts, run.nmi_entry, run.faulting_return)
        }
    }
}

/// Whether an NMI will be delivered on the next entry (so an IRETQ at this stop must not be
/// performed first: the NMI comes before it).
fn nmi_imminent(vm: &mut Vm, run: &Run<'_>) -> bool {
    run.books.undelivered() > 0 && vm.sync_state().events.nmi.masked == 0
}

/// The frame an IRETQ at this stop would pop; `None` if it lies outside guest memory (the
/// IRETQ then faults).
fn iret_frame(vm: &mut Vm) -> Option<IretFrame> {
    let rsp = vm.sync_state().regs.rsp;
    let word = |i: u64| vm.read_virtual_u64(rsp.checked_add(8 * i)?).ok();
    Some(IretFrame { rip: word(0)?, cs: word(1)?, rflags: word(2)?, rsp: word(3)?, ss: word(4)? })
}

/// An exception delivered during a single-step pushes the VMM's TF in its frame's RFLAGS, where
/// hardware without a debugger would not. An IRETQ through that frame after the engine stopped
/// stepping (the fast mode free-runs between injections) would make TF the guest's own, and
/// the guest would take a #DB it never asked for. At the handler-entry stop, before the
/// handler's first instruction, the frame is made the hardware's. `error_code`: one lies below
/// the frame (of the exceptions that push one).
fn clear_step_flag(vm: &mut Vm, error_code: bool) {
    let error_code = u64::from(error_code);
    let slot = vm.sync_state().regs.rsp.wrapping_add(8 * (2 + error_code));
    // A frame outside memory cannot be returned through: nothing to clear.
    if let Ok(rflags) = vm.read_virtual_u64(slot)
        && rflags & RFLAGS_TF != 0
    {
        let _ = vm.write_virtual_u64(slot, rflags & !RFLAGS_TF);
    }
}
