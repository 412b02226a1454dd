//! What the engine tells the books at each boundary: injections, deliveries seen after a
//! KVM_RUN, returns to interrupted contexts, iteration starts, and the oracles at DONE with the
//! probe NMI after it. Every mode goes through these, so they judge every mode alike.

use std::time::{Duration, Instant};

use nmifuzz_abi::{Report, port};

use super::observe::Moment;
use super::run::Run;
use super::trace::{Event, Injected};
use super::{Engine, unexpected};
use crate::error::Result;
use crate::exit::Exit;
use crate::outcome::Verdict;
use crate::vm::{GuestDebug, IretFrame, Vm};

/// What moved the guest to the boundary `after_step` looks at.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Moved {
    /// A KVM_RUN.
    Ran,
    /// The VMM's own IRETQ or `swapgs`, without entering the guest.
    Emulated,
}

/// Most exits the probe NMI after DONE may take to come back to the guest's final HLT.
const PROBE_EXITS: u64 = 64;

impl Engine {
    /// Injects one NMI and books it as hardware takes it ([`super::books::Books::classify`]).
    pub(super) fn inject(&mut self, vm: &mut Vm, run: &mut Run<'_>) -> Result<Injected> {
        let masked = vm.sync_state().events.nmi.masked != 0;
        let how = run.books.classify(masked);
        // Even a dropped NMI goes to KVM, which drops it too: its state stays the hardware's.
        vm.inject_nmi()?;
        run.books.injected(how);
        Ok(how)
    }

    /// Bookkeeping after the guest moved to a new boundary: deliveries, returns to
    /// interrupted contexts, and iteration starts.
    pub(super) fn after_step(
        &mut self,
        vm: &mut Vm,
        run: &mut Run<'_>,
        moved: Moved,
    ) -> Option<Verdict> {
        // NMIs are delivered only inside KVM_RUN; after the VMM's own instruction, the sync-regs
        // events do not yet show a KVM_NMI made at this stop, so they must not be compared.
        if moved == Moved::Ran
            && let Some(verdict) = self.account_deliveries(vm, run)
        {
            return Some(verdict);
        }
        let sync = vm.sync_state();
        let (pc, rsp) = (sync.regs.rip, sync.regs.rsp);
        let returned = run.books.resume(pc, rsp);
        // A return to an NMI that struck right at the iteration's first instruction is not a
        // new iteration.
        if pc == self.facts.iteration && !returned {
            run.note(Event::NmiIteration);
            return run.books.iteration_started(run.insn);
        }
        None
    }

    /// Compares KVM's undelivered NMIs with the books after a KVM_RUN: each one fewer was
    /// delivered during that run, and its interrupted context is opened.
    pub(super) fn account_deliveries(&mut self, vm: &mut Vm, run: &mut Run<'_>) -> Option<Verdict> {
        let events = vm.sync_state().events;
        let undelivered = u64::from(events.nmi.pending) + u64::from(events.nmi.injected);
        if let Some(verdict) = run.books.compare_undelivered(undelivered, run.insn) {
            return Some(verdict);
        }
        let delivered = run.books.undelivered() - undelivered;
        // This host runs the handler's first instruction before the stop after a delivery. If
        // that already left the NMI-handling code (an entry that returns at once), the return
        // was never a stop of its own, and there is no open context to judge it by.
        let pc = vm.sync_state().regs.rip;
        let open = self.facts.bounds.nmi_code.contains(&pc);
        for _ in 0..delivered {
            let frame = self.nmi_frame(vm);
            run.books.delivered(frame, run.insn, open);
            run.note(Event::NmiDelivered { frame_rip: frame.rip });
            let executing = run.nmi_executing(vm);
            run.observe(Moment::Delivered, frame.rip, executing);
        }
        None
    }

    /// The hardware frame of the latest NMI, at the top of the NMI stack.
    fn nmi_frame(&self, vm: &Vm) -> IretFrame {
        let base = self.facts.nmi_frame_address();
        let word = |i: u64| vm.read_virtual_u64(base + 8 * i).unwrap_or(0);
        IretFrame { rip: word(0), cs: word(1), rflags: word(2), rsp: word(3), ss: word(4) }
    }

    /// The oracles at DONE, then the probe NMI, within the run's `deadline` (its wall-clock
    /// `limit` from the start).
    pub(super) fn finish_done(
        &mut self,
        vm: &mut Vm,
        run: &mut Run<'_>,
        deadline: Instant,
        limit: Duration,
    ) -> Result<Verdict> {
        let counters = vm.mailbox()?.counters;
        run.done_counters = Some(counters);
        let masked = vm.sync_state().events.nmi.masked != 0;
        if let Some(verdict) = run.books.at_done(&counters, masked) {
            return Ok(verdict);
        }
        self.probe(vm, run, counters.do_nmi_calls, deadline, limit)
    }

    /// Injects one more NMI after DONE and lets the guest run to its final HLT, without
    /// stepping or breakpoints: a guest whose NMIs are not blocked calls `do_nmi` once more.
    fn probe(
        &mut self,
        vm: &mut Vm,
        run: &mut Run<'_>,
        calls_at_done: u64,
        deadline: Instant,
        limit: Duration,
    ) -> Result<Verdict> {
        run.stepping = false;
        self.traps.set(vm, false)?;
        vm.set_debug(GuestDebug::default())?;
        vm.inject_nmi()?;
        run.note(Event::ProbeNmiInjected);
        for _ in 0..PROBE_EXITS {
            let exit = vm.run_once()?;
            run.exits += 1;
            match exit {
                Exit::Hlt => break,
                // Of the guest's reports, only a panic can come after DONE.
                Exit::IoOut { port: port::REPORT, value, .. }
                    if Report::from_code(value) != Some(Report::Panic) =>
                {
                    return Ok(unexpected(vm, &exit));
                }
                // Anything else as anywhere in a run: console output, an `int3` that
                // `Vm::run_once` performed and an early watchdog kick go on; a panic, a
                // triple fault, an emulation error or the watchdog at the deadline (the guest
                // ran on after the probe NMI: a timeout, which says nothing of whether NMIs
                // are blocked) end the run.
                _ => {
                    if let Some(verdict) = vm.classify(&exit, deadline, limit) {
                        return Ok(verdict);
                    }
                }
            }
        }
        let calls = vm.mailbox()?.counters.do_nmi_calls;
        let ok = calls == calls_at_done + 1;
        run.books.stats.probe = Some(ok);
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
}
