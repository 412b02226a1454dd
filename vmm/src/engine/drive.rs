//! The engine's run loop: stops, exits, injections and IRETQ emulation, for every mode. See
//! the module documentation of [`super`] for the counting rule and [`super::mode`] for what
//! each mode steps.

use std::time::Instant;

use nmifuzz_abi::{Report, USER_POINT_ADDRESS, port};

use super::deliver::Moved;
use super::mode::FREE_RUN_BREAKPOINTS;
use super::observe::Moment;
use super::run::Run;
use super::trace::Event;
use super::user::{self, UserEntry};
use super::{DR6_BREAKPOINTS, DR6_BS, Engine, RunOptions, WATCHED_VECTORS, unexpected};
use crate::error::Result;
use crate::exit::Exit;
use crate::outcome::Verdict;
use crate::vm::{GuestDebug, IretFrame, Vm};

/// RFLAGS.TF, the trap flag single-stepping sets.
const RFLAGS_TF: u64 = 1 << 8;
/// The page-fault vector, whose frame carries an error code.
const PAGE_FAULT_VECTOR: u8 = 14;

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
            // A free run must not start on one of its own stops: that boundary's bookkeeping
            // is done, and the breakpoint would stop there again at once.
            if run.stepping && !run.wants_stepping() && !self.on_free_run_stop(vm, run) {
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
                    clear_step_flag(vm, WATCHED_VECTORS[index]);
                    let executing = run.nmi_executing(vm.ram());
                    run.observe(
                        Moment::HandlerEntry { vector: WATCHED_VECTORS[index] },
                        pc,
                        executing,
                    );
                    0
                } else {
                    return Ok(Some(unexpected(vm, exit)));
                }
            }
            // An excursion through ring 3 ends at the first ring-0 entry it watches.
            Exit::Debug { pc, dr6 } if run.excursion && dr6 & DR6_BREAKPOINTS != 0 => {
                let index = (dr6 & DR6_BREAKPOINTS).trailing_zeros() as usize;
                run.excursion = false;
                run.free_run_stop = true;
                if let UserEntry::Exception { vector } = user::user_entry(index) {
                    run.note(Event::Exception { vector });
                    let executing = run.nmi_executing(vm.ram());
                    run.observe(Moment::HandlerEntry { vector }, pc, executing);
                }
                0
            }
            // A free run stops at the breakpoints its mode set, and before the IRETQs it
            // trapped (an emulation failure at the site, RIP unchanged).
            Exit::Debug { dr6, .. } if dr6 & FREE_RUN_BREAKPOINTS != 0 => {
                run.free_run_stop = true;
                0
            }
            Exit::EmulationFailure { .. }
                if self.traps.is_set() && self.traps.is_site(vm.sync_state().regs.rip) =>
            {
                run.free_run_stop = true;
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

    /// A free run ends with this exit: the deliveries it made since its last stop are booked,
    /// as the stepped engine booked them at its steps. (Stepping, they are booked already.)
    fn settle_free_run(&mut self, vm: &mut Vm, run: &mut Run<'_>) -> Option<Verdict> {
        if run.stepping { None } else { self.account_deliveries(vm, run) }
    }

    /// A free run that reached a stop single-steps on from it if the mode wants stepping now,
    /// and for one step if the stop is a breakpoint's own address or an IRETQ the engine did
    /// not perform (a free run from there would stop again at once); otherwise it free-runs on
    /// with the breakpoints and traps of what comes next. The stepped engine is always stepping
    /// at a stop.
    fn step_from_stop(&mut self, vm: &mut Vm, run: &mut Run<'_>) -> Result<()> {
        // Ring 3 is never stepped: where the mode would step it, an excursion runs it, and
        // otherwise a free run (a ring-3 stop is never a breakpoint's or a trap's own).
        if !run.excursion && user::cpl(vm) == 3 {
            run.excursion = run.stepping || run.wants_stepping();
            run.stepping = false;
            return self.apply_debug(vm, run, None);
        }
        if run.excursion {
            return self.apply_debug(vm, run, None);
        }
        if run.stepping {
            return Ok(());
        }
        let pc = vm.sync_state().regs.rip;
        let on_breakpoint = run.free_run_breakpoints(self.facts.iteration).contains(&Some(pc));
        let on_trap = run.traps_in_free_run() && self.traps.is_site(pc);
        if run.wants_stepping() || on_breakpoint || on_trap {
            run.stepping = true;
            // Stepping watches the exception entries; one the free run stopped at must be
            // left out for the first step, as after any stop at a breakpoint.
            run.resume_breakpoint = self.facts.exception_entries.iter().position(|&e| e == pc);
        }
        self.apply_debug(vm, run, None)
    }

    /// Whether the guest is at a breakpoint or an IRETQ trap a free run from here would set.
    fn on_free_run_stop(&self, vm: &mut Vm, run: &Run<'_>) -> bool {
        let pc = vm.sync_state().regs.rip;
        run.free_run_breakpoints(self.facts.iteration).contains(&Some(pc))
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
            let executing = run.nmi_executing(vm.ram());
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
            // A frame pushed while the engine stepped holds its TF; returning through it in a
            // free run would hand TF to the guest (see `clear_step_flag`).
            let rflags = if run.stepping { frame.rflags } else { frame.rflags & !RFLAGS_TF };
            vm.emulate_iretq(&IretFrame { rflags, ..frame });
            run.retire(1);
            run.recorder.event(Event::Iretq { target: frame.rip, emulated: true });
            if let Some(verdict) = self.after_step(vm, run, Moved::Emulated) {
                return Ok(Some(verdict));
            }
        }
    }

    /// Single-stepping while `run.stepping`, with breakpoints on the watched handler entries
    /// where the host does not stop there by itself (`without` leaves one out); otherwise the
    /// free run's breakpoints of the mode.
    fn apply_debug(&mut self, vm: &mut Vm, run: &Run<'_>, without: Option<usize>) -> Result<()> {
        if run.excursion {
            self.traps.set(vm, false)?;
            let breakpoints = user::excursion_breakpoints(&self.facts, run.nmi_entry);
            return vm.set_debug(GuestDebug { single_step: false, breakpoints });
        }
        if !run.stepping {
            self.traps.set(vm, run.traps_in_free_run())?;
            let breakpoints = run.free_run_breakpoints(self.facts.iteration);
            return vm.set_debug(GuestDebug { single_step: false, breakpoints });
        }
        self.traps.set(vm, false)?;
        let mut debug = GuestDebug { single_step: true, ..GuestDebug::default() };
        if !self.profile.event_entry_stop {
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
    run.books.undelivered() > 0 && vm.sync_state().events.nmi.masked == 0
}

/// The frame an IRETQ at this stop would pop; `None` if it lies outside guest memory (the
/// IRETQ then faults).
fn iret_frame(vm: &mut Vm) -> Option<IretFrame> {
    let rsp = vm.sync_state().regs.rsp;
    let ram = vm.ram();
    let word = |i: u64| ram.read_u64(rsp.checked_add(8 * i)?).ok();
    Some(IretFrame { rip: word(0)?, cs: word(1)?, rflags: word(2)?, rsp: word(3)?, ss: word(4)? })
}

/// An exception delivered during a single-step pushes the VMM's TF in its frame's RFLAGS, where
/// hardware without a debugger would not. An IRETQ through that frame after the engine stopped
/// stepping (the fast mode free-runs between injections) would make TF the guest's own, and
/// the guest would take a #DB it never asked for. At the handler-entry stop, before the
/// handler's first instruction, the frame is made the hardware's.
fn clear_step_flag(vm: &mut Vm, vector: u8) {
    // #PF pushes an error code below the frame; #BP and #UD do not.
    let error_code = u64::from(vector == PAGE_FAULT_VECTOR);
    let slot = vm.sync_state().regs.rsp.wrapping_add(8 * (2 + error_code));
    // A frame outside memory cannot be returned through: nothing to clear.
    if let Ok(rflags) = vm.ram().read_u64(slot)
        && rflags & RFLAGS_TF != 0
    {
        let _ = vm.ram_mut().write_u64(slot, rflags & !RFLAGS_TF);
    }
}
