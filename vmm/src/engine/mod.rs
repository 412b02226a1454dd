//! The exact NMI injection engine: executes a [`Plan`] so that every NMI arrives at exactly the
//! instruction boundary the schedule names, deterministically, and checks the host-side
//! invariants on the way.
//!
//! # Counting rule
//! Instructions are *retired* guest instructions, counted from the snapshot. The stepped
//! engine single-steps while an injection is due, while an NMI is pending, and while any NMI
//! handling is in progress, and runs freely otherwise; only stepped instructions are counted.
//! The fast mode ([`mode`]) stops at the same boundaries wherever its books and oracles need
//! them and steps far less. Each stop
//! is a boundary "before the instruction at RIP", and each step retires one instruction, with
//! these host quirks handled so the count stays exact:
//! - an event (NMI, exception) delivered during a step retires nothing itself, but the host
//!   runs the handler's first instruction before stopping: one instruction. Where a hardware
//!   breakpoint on a handler entry stops before that instruction, the stop retires nothing;
//! - IRETQ: where the host runs IRETQ and the next instruction as one step, the VMM performs
//!   the IRETQ itself at the stop before it (one instruction) and stops again after it;
//! - `out`: the stop after it is the I/O exit itself (kvm_pvm advances RIP before exiting);
//! - a `rep` string instruction counts as one instruction, however many stops KVM makes
//!   inside it (kvm_pvm stops every 1024 iterations);
//! - a ring-0 `int3` the host cannot execute is performed by the VMM: one instruction.
//!
//! # Host-side oracles (design.md section 4, items 4, 7 to 9)
//! Every delivery must be followed by the start of a `do_nmi` iteration and iterations never
//! outnumber deliveries; the VMM's NMI count must add up and agree with the guest's; at DONE
//! NMIs must be unblocked and a probe NMI must start an iteration. Every NMI must return exactly
//! to the context it interrupted ([`returns`]).

pub mod agreement;
mod books;
mod cursor;
pub mod decode;
mod deliver;
mod drive;
pub mod mode;
pub mod observe;
pub mod profile;
pub mod returns;
mod run;
pub mod schedule;
pub mod symbolic;
pub mod table;
pub mod trace;
mod traps;
mod user;
mod watch;

use std::time::Instant;

use nmifuzz_abi::Variant;
use serde::Serialize;

use self::decode::InsnCache;
pub use self::mode::Mode;
use self::profile::HostProfile;
use self::returns::Bounds;
use self::run::Run;
use self::schedule::Plan;
use self::trace::Step;
use self::traps::IretqTraps;
use crate::error::{Error, Result};
use crate::gate;
use crate::outcome::{Outcome, Verdict};
use crate::vm::{RunLimits, Vm};

/// The guest symbol at which every `do_nmi` iteration starts.
pub const ITERATION_SYMBOL: &str = nmifuzz_abi::ITERATION_SYMBOL;

/// The guest symbol of the IRETQ every handled exception returns with.
const EXCEPTION_RETURN_SYMBOL: &str = "exception_iretq";

/// The guest symbol of the SYSCALL entry (LSTAR), on hosts where SYSCALL enters CPL0.
const SYSCALL_ENTRY_SYMBOL: &str = "entry_SYSCALL_64";

/// DR6.BS: the stop is a single-step trap (Intel SDM vol. 3, 18.2.3).
const DR6_BS: u64 = 1 << 14;

/// Offset of IST1 in the 64-bit TSS (Intel SDM vol. 3, figure 8-11).
const TSS_IST1: u64 = 0x24;
/// The exception vectors whose gates the guest's IDT has (and the engine reads).
const EXCEPTION_VECTORS: usize = 32;

/// Options of one execution.
#[derive(Clone, Copy, Debug)]
pub struct RunOptions {
    /// Wall-clock and exit limits.
    pub limits: RunLimits,
    /// Most single-stepped instructions of a run; exceeding it is the deterministic
    /// [`Verdict::InstructionBudget`].
    pub max_instructions: u64,
    /// Most instructions in NMI context (an NMI delivered and not yet returned from, or
    /// pending) beyond the busy work the script asks for: the budget that ends an IRETQ
    /// looping on itself in NMI context, deterministically.
    pub max_nmi_instructions: u64,
    /// Keep the full per-step trace.
    pub keep_trace: bool,
    /// How the guest is moved between injections.
    pub mode: Mode,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            limits: RunLimits::default(),
            max_instructions: 1_000_000,
            max_nmi_instructions: 5_000,
            keep_trace: false,
            mode: Mode::Stepped,
        }
    }
}

/// The NMI bookkeeping of one execution.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NmiStats {
    /// NMIs injected by the schedule.
    pub injected: u64,
    /// Of those, delivered to the guest.
    pub delivered: u64,
    /// Of those, latched at injection (NMIs blocked); each is later delivered or still pending.
    pub latched: u64,
    /// Of those, dropped because one was already latched.
    pub dropped: u64,
    /// `do_nmi` iterations the VMM saw start.
    pub iterations: u64,
    /// Whether the probe NMI after DONE started an iteration (`None`: no probe was made).
    pub probe: Option<bool>,
}

/// The result of executing a plan.
#[derive(Clone, Debug)]
pub struct Execution {
    /// Verdict, guest counters, exits, time.
    pub outcome: Outcome,
    /// NMI bookkeeping.
    pub nmi: NmiStats,
    /// Retired instructions counted while stepping.
    pub instructions: u64,
    /// Hash of the stops and events; equal hashes mean equal paths.
    pub trace_hash: u64,
    /// The stops, if [`RunOptions::keep_trace`] was set.
    pub trace: Vec<Step>,
}

/// Addresses in the guest the engine needs, read once from the snapshot.
#[derive(Clone, Debug)]
struct GuestFacts {
    /// Where each `do_nmi` iteration starts.
    iteration: u64,
    /// IST1, the NMI stack's top.
    nmi_stack_top: u64,
    /// The handler entry of every exception vector, from the IDT at the snapshot.
    exception_entries: [u64; EXCEPTION_VECTORS],
    /// The SYSCALL entry, if the guest has one.
    syscall_entry: Option<u64>,
    /// The IRETQ every handled exception returns with.
    exception_return: u64,
    /// The NMI-handling code and the NMI stack, for the return-integrity oracle.
    bounds: Bounds,
}

impl GuestFacts {
    /// Where the CPU writes an NMI's frame: the five qwords below IST1's top (rounded down to
    /// 16 bytes, as the CPU aligns the stack before pushing).
    fn nmi_frame_address(&self) -> u64 {
        (self.nmi_stack_top & !0xf) - 40
    }

    /// The handler entry of exception `vector` (below 32).
    fn exception_entry(&self, vector: u8) -> u64 {
        self.exception_entries[usize::from(vector)]
    }

    fn read(vm: &Vm) -> Result<Self> {
        let snapshot = vm.snapshot();
        let memory = &snapshot.memory;
        let read_u64 = |address: u64| -> Result<u64> {
            let bytes = memory.get(address as usize..address as usize + 8).ok_or_else(|| {
                Error::Memory(format!("guest table at {address:#x} is outside memory"))
            })?;
            Ok(u64::from_le_bytes(bytes.try_into().expect("8 bytes")))
        };
        let idt = snapshot.sregs.idt.base;
        let gate_target = |vector: u8| -> Result<u64> {
            let gate = gate::gate_address(idt, vector.into());
            Ok(gate::gate_target(read_u64(gate)?, read_u64(gate + 8)?))
        };
        let mut exception_entries = [0; EXCEPTION_VECTORS];
        for (vector, entry) in exception_entries.iter_mut().enumerate() {
            *entry = gate_target(vector as u8)?;
        }
        let image = vm.image();
        let nmi_stack_top = read_u64(snapshot.sregs.tr.base + TSS_IST1)?;
        let bounds = Bounds {
            nmi_code: image.marker(nmifuzz_abi::NMI_CODE_START)?
                ..image.marker(nmifuzz_abi::NMI_CODE_END)?,
            nmi_stack: nmi_stack_top.saturating_sub(nmifuzz_abi::NMI_STACK_SPAN)..nmi_stack_top + 1,
        };
        Ok(Self {
            iteration: image.symbol(ITERATION_SYMBOL)?,
            nmi_stack_top,
            exception_entries,
            syscall_entry: image.symbol(SYSCALL_ENTRY_SYMBOL).ok(),
            exception_return: image.symbol(EXCEPTION_RETURN_SYMBOL)?,
            bounds,
        })
    }
}

/// The engine: per-VM facts, the host profile and a decoded-instruction cache.
pub struct Engine {
    profile: HostProfile,
    facts: GuestFacts,
    insns: InsnCache,
    traps: IretqTraps,
}

impl Engine {
    /// An engine for `vm` on a host with `profile` (see [`profile::calibrate`]).
    pub fn new(vm: &Vm, profile: HostProfile) -> Result<Self> {
        let traps = IretqTraps::new(table::iretq_sites(vm.image(), vm.ram())?);
        Ok(Self { profile, facts: GuestFacts::read(vm)?, insns: InsnCache::default(), traps })
    }

    /// The top of the guest's NMI stack (IST1), where the hardware frame and the entry's
    /// nested-NMI state live.
    pub fn nmi_stack_top(&self) -> u64 {
        self.facts.nmi_stack_top
    }

    /// Whether a symbolic point at `address` is reached the same way by both modes: any
    /// instruction but a `rep` string instruction, which the stepped engine stops inside of
    /// several times (see [`symbolic::symbolic_triggers`]).
    pub fn anchorable(&mut self, vm: &Vm, address: u64) -> bool {
        self.insns.get(vm.ram(), address).is_ok_and(|insn| !insn.is_rep_string)
    }

    /// The host profile the engine works with.
    pub fn profile(&self) -> &HostProfile {
        &self.profile
    }

    /// Resets the VM and executes `plan`.
    pub fn run(&mut self, vm: &mut Vm, plan: &Plan, options: &RunOptions) -> Result<Execution> {
        self.run_observed(vm, plan, options, &mut ())
    }

    /// Resets the VM and executes `plan`, reporting every NMI state it sees to `observer`
    /// ([`observe`]).
    pub fn run_observed(
        &mut self,
        vm: &mut Vm,
        plan: &Plan,
        options: &RunOptions,
        observer: &mut dyn observe::NmiObserver,
    ) -> Result<Execution> {
        let start = Instant::now();
        vm.reset()?;
        self.traps.reset();
        let mut script = plan.script;
        self.profile.fit(&mut script);
        vm.write_script(&script)?;
        let variant = Variant::from_code(plan.script.variant);
        let executing = variant
            .and_then(Variant::stack_layout)
            .map(|layout| self.facts.nmi_stack_top - layout.executing);
        let nmi_entry = variant.and_then(|v| vm.image().symbol(v.entry_symbol()).ok());
        vm.set_step_rearm(!self.profile.sticky_single_step);
        let mut run =
            Run::new(plan, options.mode, observer, options.keep_trace, executing, nmi_entry);
        let deadline = vm.watchdog().arm(options.limits.wall);
        let verdict = self.drive(vm, &mut run, options, deadline);
        vm.watchdog().disarm();
        // Whoever reads guest memory after the run sees the guest's own code.
        self.traps.set(vm, false)?;
        let verdict = verdict?;
        // Events of the exit that ended the run belong to its last stop.
        for event in std::mem::take(&mut run.pending_events) {
            run.recorder.event(event);
        }
        let counters = match &verdict {
            // The probe after DONE changed the counters; report them as they were at DONE.
            Verdict::Done => run.done_counters.unwrap_or_default(),
            _ => vm.mailbox()?.counters,
        };
        Ok(Execution {
            outcome: Outcome { verdict, counters, exits: run.exits, elapsed: start.elapsed() },
            nmi: run.books.stats,
            instructions: run.insn,
            trace_hash: run.recorder.hash(),
            trace: run.recorder.into_steps(),
        })
    }
}

/// A verdict for an exit the engine has no use for.
fn unexpected(vm: &Vm, exit: &crate::exit::Exit) -> Verdict {
    Verdict::UnexpectedExit {
        description: format!("{exit} at {}", vm.image().symbolize(vm.regs().rip)),
    }
}
