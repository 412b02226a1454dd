//! The state of one execution: its plan and mode, where it stands, the books, the trace.

use nmifuzz_abi::Counters;

use super::books::Books;
use super::cursor::Cursor;
use super::decode;
use super::mode::Mode;
use super::observe::{Moment, NmiObserver, NmiState};
use super::schedule::Plan;
use super::trace::{Event, Recorder};
use super::watch::Watches;
use crate::vm::Vm;

/// The state of one execution.
pub(super) struct Run<'p> {
    pub plan: &'p Plan,
    pub mode: Mode,
    /// The next injection.
    pub cursor: Cursor<'p>,
    /// The NMI books and their oracles.
    pub books: Books,
    /// Receives the NMI states of the run.
    observer: &'p mut dyn NmiObserver,
    /// Retired instructions counted so far (stepped instructions only).
    pub insn: u64,
    /// Of those, retired in NMI context.
    pub nmi_insn: u64,
    pub exits: u64,
    /// Whether the guest is single-stepped; otherwise it runs freely.
    pub stepping: bool,
    /// Whether the guest runs through ring 3 in an excursion ([`super::user`]).
    pub excursion: bool,
    /// Where the run's NMI entry starts, if its variant is known.
    pub nmi_entry: Option<u64>,
    /// The last exit of a free run is a boundary to stop at (a breakpoint the mode set).
    pub free_run_stop: bool,
    /// The stop before the last KVM_RUN and the instruction there.
    pub last_stop: Option<(u64, decode::Insn)>,
    /// What the hardware breakpoints watch now (set with them, read at a breakpoint stop).
    pub watches: Watches,
    /// A hardware breakpoint's address to leave out for one KVM_RUN, so execution can move
    /// past it.
    pub resume_breakpoint: Option<u64>,
    /// The next step executes an IRETQ to ring 3 that faults: stepping watches the entries
    /// of the exceptions it can raise.
    pub faulting_return: bool,
    /// Address of the variant's "NMI executing" variable, if it has one.
    executing_address: Option<u64>,
    /// The guest state after the last exit is not an instruction boundary: run on.
    pub skip_stop: bool,
    /// Events seen since the last stop, recorded at the stop they led to.
    pub pending_events: Vec<Event>,
    /// The guest's counters when it reported DONE, before the probe NMI.
    pub done_counters: Option<Counters>,
    pub recorder: Recorder,
}

impl<'p> Run<'p> {
    pub fn new(
        plan: &'p Plan,
        mode: Mode,
        observer: &'p mut dyn NmiObserver,
        keep_trace: bool,
        executing_address: Option<u64>,
        nmi_entry: Option<u64>,
    ) -> Self {
        let cursor = Cursor::new(&plan.injections);
        let books = Books::default();
        let stepping = mode.wants_stepping(&cursor, &books);
        Self {
            plan,
            mode,
            cursor,
            books,
            observer,
            insn: 0,
            nmi_insn: 0,
            exits: 0,
            stepping,
            excursion: false,
            nmi_entry,
            free_run_stop: false,
            last_stop: None,
            watches: Watches::default(),
            resume_breakpoint: None,
            faulting_return: false,
            executing_address,
            skip_stop: false,
            pending_events: Vec::new(),
            done_counters: None,
            recorder: Recorder::new(keep_trace),
        }
    }

    /// Whether a free run from here sets the IRETQ traps.
    pub fn traps_in_free_run(&self) -> bool {
        self.mode.free_run_traps(&self.books)
    }

    /// The hardware breakpoints of a free run from here (see [`Mode::free_run_watches`]).
    pub fn free_run_watches(&self, iteration: u64, exception_return: Option<u64>) -> Watches {
        self.mode.free_run_watches(&self.cursor, &self.books, iteration, exception_return)
    }

    /// Whether the mode wants the guest single-stepped from here on.
    pub fn wants_stepping(&self) -> bool {
        self.mode.wants_stepping(&self.cursor, &self.books)
    }

    /// Notes an event that belongs to the next stop.
    pub fn note(&mut self, event: Event) {
        self.pending_events.push(event);
    }

    /// Records the stop at `rip`, where the variant's "NMI executing" variable (if it has one)
    /// holds `executing`, and the events that led to it.
    pub fn record_stop(&mut self, rip: u64, executing: Option<u64>) {
        self.recorder.stop(self.insn, rip, self.books.depth(), executing);
        for event in std::mem::take(&mut self.pending_events) {
            self.recorder.event(event);
        }
    }

    /// The variant's "NMI executing" variable now, if it has one.
    pub fn nmi_executing(&self, vm: &Vm) -> Option<u64> {
        self.executing_address.and_then(|address| vm.read_virtual_u64(address).ok())
    }

    /// Reports `moment` at `rip` to the observer, with the NMI state now; `executing` is the
    /// variant's "NMI executing" variable.
    pub fn observe(&mut self, moment: Moment, rip: u64, executing: Option<u64>) {
        let state = NmiState {
            moment,
            rip,
            depth: self.books.depth(),
            nmi_executing: executing,
            undelivered: self.books.undelivered(),
        };
        self.observer.observe(&state);
    }

    /// Counts `n` retired instructions.
    pub fn retire(&mut self, n: u64) {
        self.insn += n;
        if self.books.in_nmi_context() {
            self.nmi_insn += n;
        }
    }

    /// The NMI-context budget of this plan: the base plus two instructions per busy-work
    /// iteration the script asks for (the busy loop is `dec; jnz`).
    pub fn nmi_budget(&self, base: u64) -> u64 {
        let script = &self.plan.script;
        let actions = &script.actions[..(script.action_count as usize).min(script.actions.len())];
        base + 2 * actions.iter().map(|a| u64::from(a.busy)).sum::<u64>()
    }
}
