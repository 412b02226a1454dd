//! Running one [`KernelSchedule`]: reset to the snapshot, hand the agent its operations, and
//! drive the kernel with hardware breakpoints until the agent is done.
//!
//! The four debug registers the VMM owns (KVM_SET_GUEST_DEBUG) do four jobs:
//!
//! - DR0, the next NMI's point: at its Nth execution the VMM injects the NMI (KVM_NMI). If NMIs
//!   are open, KVM delivers it before the instruction runs; if the kernel is handling an NMI,
//!   the CPU holds it until the next IRET, as real hardware would.
//! - DR1, the NMI entry (`asm_exc_nmi`): every delivery stops there, so the host knows each
//!   one, what it interrupted (the hardware frame on the NMI stack) and the kernel's NMI count
//!   at that moment.
//! - DR2, the return watch: the ring-0 instruction the outermost NMI interrupted. When it runs
//!   again with the same RSP, the NMI has returned, and CS, SS and RFLAGS must be what they
//!   were. (Returns to ring 3 are judged by the agent's register checks.)
//! - DR3, the guest's own watchpoint, mirrored: while the VMM debugs the guest, KVM gives the
//!   CPU the VMM's debug registers instead of the guest's, so the agent's `perf_event_open`
//!   breakpoint would never fire. The VMM watches the same address and, when the kernel
//!   touches it while the kernel's own DR7 has it enabled (exc_nmi clears DR7 while it runs),
//!   raises #DB in the guest with the kernel's DR6 set as the CPU would have. It never raises
//!   one the real CPU would not have.
//!
//! The VMM resumes past an instruction breakpoint with RFLAGS.RF set, except when it has just
//! injected an NMI that will be delivered at once: then RF is cleared, since the NMI's frame
//! must not carry it, or the instruction would not stop again when the NMI returns to it.

use std::time::{Duration, Instant};

use kvm_bindings::{KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_USE_HW_BP, kvm_guest_debug};
use nmifuzz_abi::agent::{AgentMailbox, AgentMessage, MAX_AGENT_OPS};
use serde::Serialize;
use zerocopy::{FromBytes, IntoBytes};

use super::KernelVm;
use super::exits::{Handled, flush_io, handle_exit, wake_if_idle};
use super::schedule::{KernelSchedule, NmiPoint, Operation, Place, START};
use super::verdict::{KernelVerdict, console_finding};
use crate::error::{Error, Result};
use crate::hash::Fnv1a;

/// How often a run that makes no exit is checked for an idle kernel (see `state`: the timer is
/// restored disarmed and fires only when the kernel waits for it).
const IDLE_CHECK: Duration = Duration::from_millis(20);

/// The size of Linux's NMI stack (EXCEPTION_STKSZ), what its stack test compares with.
const NMI_STACK_BYTES: u64 = 4096;

/// RFLAGS.RF, the resume flag.
const RF: u64 = 1 << 16;
/// RFLAGS bits a correct return need not restore: bit 1 (always one), TF and RF.
const RFLAGS_NOT_JUDGED: u64 = (1 << 1) | (1 << 8) | RF;
/// DR7 for DR3 as a read/write watch of 8 bytes: L3, R/W3 = 11b, LEN3 = 10b.
const DR7_WATCH3: u64 = (1 << 6) | (0b11 << 28) | (0b10 << 30);

/// One NMI delivery the host saw.
#[derive(Clone, Debug, Serialize)]
pub struct Delivery {
    /// The interrupted instruction, as `symbol+offset`.
    pub interrupted: String,
    /// Its address.
    pub rip: u64,
    /// The interrupted RSP.
    pub rsp: u64,
    /// 1 when the interrupted RSP was on the NMI stack: a nested NMI, or one the kernel's
    /// stack test takes for nested (RSP on the NMI stack in the SYSCALL gap); else 0.
    pub depth: u32,
    /// The kernel's NMI count at the delivery.
    pub nmi_count: u32,
}

/// What one run did.
#[derive(Clone, Debug, Serialize)]
pub struct Execution {
    /// How it ended.
    pub verdict: KernelVerdict,
    /// NMIs injected.
    pub injected: u32,
    /// NMIs delivered, in order.
    pub deliveries: Vec<Delivery>,
    /// #DBs raised in the guest by its watchpoint, and where.
    pub debug_exceptions: Vec<String>,
    /// What happened, in order, one line each.
    pub trace: Vec<String>,
    /// Coverage: hashes of what the run reached (delivery places and depths, watchpoint hits).
    pub features: Vec<u64>,
    /// VM exits.
    pub exits: u64,
    /// Memory pages restored at the reset.
    pub pages_restored: usize,
}

/// The watch of the outermost NMI's return.
pub(super) struct ReturnWatch {
    rip: u64,
    rsp: u64,
    cs: u64,
    rflags: u64,
    ss: u64,
    pub(super) interrupted: String,
}

/// The state of a run in progress.
pub(super) struct Run {
    /// Resolved NMI points: (address, or None for `start`; occurrence).
    points: Vec<(Option<u64>, u32)>,
    next: usize,
    hits: u32,
    pub(super) watch: Option<ReturnWatch>,
    mirror: Option<u64>,
    pub(super) out: Execution,
}

impl Run {
    fn debug(&self, nmi_entry: u64) -> kvm_guest_debug {
        let mut debug = kvm_guest_debug {
            control: KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP,
            ..Default::default()
        };
        let mut enable = |slot: usize, address: u64| {
            debug.arch.debugreg[slot] = address;
            debug.arch.debugreg[7] |= 1 << (2 * slot);
        };
        if let Some(&(Some(address), _)) = self.points.get(self.next) {
            enable(0, address);
        }
        enable(1, nmi_entry);
        if let Some(watch) = &self.watch {
            enable(2, watch.rip);
        }
        if let Some(address) = self.mirror {
            debug.arch.debugreg[3] = address;
            debug.arch.debugreg[7] |= DR7_WATCH3;
        }
        debug
    }

    fn feature(&mut self, parts: &[&[u8]]) {
        let mut hash = Fnv1a::new();
        for part in parts {
            hash.write(part);
        }
        self.out.features.push(hash.finish());
    }
}

/// What the handling of a debug exit asks of the loop.
enum Next {
    Resume { rf: bool },
    End(KernelVerdict),
}

impl KernelVm {
    /// Runs `schedule` from the snapshot with a wall-clock `limit`. Errors are the VMM's own
    /// or a schedule that does not fit this kernel (a point naming a symbol it lacks).
    pub fn execute(&mut self, schedule: &KernelSchedule, limit: Duration) -> Result<Execution> {
        let ops = schedule.agent_ops(|place| self.resolve_place(place)).map_err(Error::Kernel)?;
        let points = schedule
            .nmis
            .iter()
            .map(|NmiPoint { at, occurrence }| {
                Ok((if at == START { None } else { Some(self.symbols.resolve(at)?) }, *occurrence))
            })
            .collect::<Result<Vec<_>>>()?;
        let mirror = schedule.operations.iter().find_map(|op| match op {
            Operation::Watch(place) => self.resolve_place(place).ok().map(|a| a & !7),
            _ => None,
        });
        let pages_restored = self.reset()?;
        self.write_ops(&ops)?;
        let mut run = Run {
            points,
            next: 0,
            hits: 0,
            watch: None,
            mirror,
            out: Execution {
                verdict: KernelVerdict::Clean,
                injected: 0,
                deliveries: Vec::new(),
                debug_exceptions: Vec::new(),
                trace: Vec::new(),
                features: Vec::new(),
                exits: 0,
                pages_restored,
            },
        };
        if let Some(&(None, _)) = run.points.first() {
            self.inject(&mut run, "start")?;
        }
        let verdict = self.drive(&mut run, Instant::now() + limit)?;
        let console = self.uart.writer_mut().take_lines();
        run.out.trace.extend(console.iter().map(|line| format!("console: {line}")));
        // A panic ends in a triple fault (reboot=t) and may hang first: the console says why.
        run.out.verdict = match (console_finding(&console), verdict) {
            (
                Some(line),
                KernelVerdict::Clean
                | KernelVerdict::TripleFault { .. }
                | KernelVerdict::Hang { .. },
            ) => KernelVerdict::Console { line: line.to_owned() },
            (_, verdict) => verdict,
        };
        run.out.trace.push(format!("end: {}", run.out.verdict));
        run.feature(&[b"verdict", run.out.verdict.kind().as_bytes()]);
        Ok(run.out)
    }

    /// Back to the snapshot, with the console emptied.
    pub(super) fn reset(&mut self) -> Result<usize> {
        if self.io_pending {
            flush_io(&mut self.vcpu)?;
            self.io_pending = false;
        }
        self.uart.writer_mut().take_lines();
        self.state.restore(&self.vm, &self.vcpu, &mut self.ram)
    }

    fn write_ops(&mut self, ops: &[nmifuzz_abi::agent::AgentOp]) -> Result<()> {
        let mut bytes = vec![0; size_of::<AgentMailbox>()];
        self.ram.read(self.mailbox, &mut bytes)?;
        let mut mailbox = AgentMailbox::read_from_bytes(&bytes)
            .map_err(|_| Error::Kernel("the agent's mailbox has the wrong size".into()))?;
        mailbox.op_count = ops.len().min(MAX_AGENT_OPS) as u32;
        mailbox.ops = Default::default();
        mailbox.ops[..ops.len()].copy_from_slice(ops);
        mailbox.status = u32::MAX;
        mailbox.completed = 0;
        self.ram.write(self.mailbox, mailbox.as_bytes())
    }

    /// The address a [`Place`] names on this boot.
    pub fn resolve_place(&self, place: &Place) -> std::result::Result<u64, String> {
        Ok(match place {
            Place::NmiStack(below) => self.facts.nmi_stack_top.wrapping_sub(*below),
            Place::DebugStack(below) => self.facts.debug_stack_top.wrapping_sub(*below),
            Place::PerCpu(name) => self
                .facts
                .per_cpu_base
                .wrapping_add(self.symbols.resolve(name).map_err(|e| e.to_string())?),
            Place::Symbol(name) => self.symbols.resolve(name).map_err(|e| e.to_string())?,
            Place::Address(address) => *address,
        })
    }

    fn inject(&mut self, run: &mut Run, at: &str) -> Result<()> {
        self.vcpu.nmi().map_err(Error::kvm("KVM_NMI"))?;
        run.out.injected += 1;
        run.out.trace.push(format!("NMI injected at {at}"));
        run.next += 1;
        run.hits = 0;
        Ok(())
    }

    fn drive(&mut self, run: &mut Run, deadline: Instant) -> Result<KernelVerdict> {
        loop {
            self.vcpu
                .set_guest_debug(&run.debug(self.facts.nmi_entry))
                .map_err(Error::kvm("KVM_SET_GUEST_DEBUG"))?;
            let now = Instant::now();
            if now >= deadline {
                let rip = self.vcpu.get_regs().map(|r| self.symbols.describe(r.rip));
                return Ok(KernelVerdict::Hang { rip: rip.unwrap_or_else(|e| e.to_string()) });
            }
            self.watchdog.arm((deadline - now).min(IDLE_CHECK));
            let exit = handle_exit(&mut self.vcpu, &mut self.uart, &mut self.cmos);
            self.watchdog.disarm();
            run.out.exits += 1;
            self.io_pending = matches!(exit, Ok(Handled::Agent(_)));
            match exit? {
                Handled::Continue => {}
                Handled::Interrupted => {
                    if wake_if_idle(&self.vcpu)? {
                        let rip = self.vcpu.get_regs().map_err(Error::kvm("KVM_GET_REGS"))?.rip;
                        let at = self.symbols.describe(rip);
                        run.out
                            .trace
                            .push(format!("the kernel went idle at {at}: its timer fires"));
                    }
                }
                Handled::Shutdown => {
                    let rip = self.vcpu.get_regs().map_err(Error::kvm("KVM_GET_REGS"))?.rip;
                    return Ok(KernelVerdict::TripleFault { rip: self.symbols.describe(rip) });
                }
                Handled::Agent(call) => {
                    if call.message == Some(AgentMessage::Done) {
                        return self.judge(run);
                    }
                }
                Handled::Debug(debug) => match self.on_debug(run, debug.dr6)? {
                    Next::Resume { rf } => {
                        // Set or cleared, never left as it is: some CPUs (QEMU's) set RF when
                        // they raise an instruction breakpoint's #DB.
                        let mut regs = self.vcpu.get_regs().map_err(Error::kvm("KVM_GET_REGS"))?;
                        regs.rflags = if rf { regs.rflags | RF } else { regs.rflags & !RF };
                        self.vcpu.set_regs(&regs).map_err(Error::kvm("KVM_SET_REGS"))?;
                    }
                    Next::End(verdict) => return Ok(verdict),
                },
            }
        }
    }

    /// A stop at one or more of the VMM's breakpoints (DR6's B0-B3).
    fn on_debug(&mut self, run: &mut Run, dr6: u64) -> Result<Next> {
        let regs = self.vcpu.get_regs().map_err(Error::kvm("KVM_GET_REGS"))?;
        let mut rf = dr6 & 0b111 != 0;
        if dr6 & 0b10 != 0 {
            self.on_delivery(run, regs.rsp)?;
        }
        if dr6 & 0b100 != 0
            && let Some(verdict) = self.on_return(run, regs.rsp, regs.rflags)?
        {
            return Ok(Next::End(verdict));
        }
        if dr6 & 0b1 != 0
            && let Some(&(Some(_), occurrence)) = run.points.get(run.next)
        {
            run.hits += 1;
            if run.hits == occurrence {
                let at = format!("{} (execution {occurrence})", self.symbols.describe(regs.rip));
                self.inject(run, &at)?;
                // An NMI delivered at once must not carry the VMM's RF in its frame; one the CPU
                // holds (NMIs blocked) is delivered later, elsewhere.
                let events =
                    self.vcpu.get_vcpu_events().map_err(Error::kvm("KVM_GET_VCPU_EVENTS"))?;
                rf = events.nmi.masked != 0 || dr6 & 0b110 != 0;
            }
        }
        if dr6 & 0b1000 != 0 {
            self.on_watchpoint(run, regs.rip)?;
        }
        Ok(Next::Resume { rf })
    }

    fn on_delivery(&mut self, run: &mut Run, rsp: u64) -> Result<()> {
        let frame = self.read_virtual(rsp, 40).unwrap_or_default();
        let word = |i: usize| {
            frame
                .get(8 * i..8 * i + 8)
                .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
        };
        let (rip, cs, mut rflags, old_rsp, ss) = (word(0), word(1), word(2), word(3), word(4));
        // RF in the frame would hide the interrupted instruction from the return watch when
        // the NMI returns to it. The CPU puts it there when the NMI comes where the VMM's own
        // breakpoint has just stopped the guest (QEMU does), or at an instruction a fault
        // restarts; it only ever suppresses instruction breakpoints, which only the VMM sets,
        // so clearing it changes nothing the kernel can see.
        if rflags & RF != 0 {
            rflags &= !RF;
            self.write_virtual(rsp + 16, &rflags.to_le_bytes())?;
            run.out.trace.push("(RF in the NMI's frame cleared, for the return watch)".into());
        }
        let top = self.facts.nmi_stack_top;
        let depth = u32::from((top - NMI_STACK_BYTES..=top).contains(&old_rsp));
        let interrupted = self.symbols.describe(rip);
        let nmi_count = self.nmi_count();
        run.out.trace.push(format!(
            "NMI delivered: interrupted {interrupted} with RSP {old_rsp:#x}{}, CS {cs:#x}, SS \
             {ss:#x}, RFLAGS {rflags:#x}; kernel NMI count {nmi_count}",
            if depth == 1 { " (on the NMI stack)" } else { "" }
        ));
        run.out.trace.extend(self.stack_diagram(rsp));
        run.feature(&[b"delivery", interrupted.as_bytes(), &depth.to_le_bytes()]);
        run.out.deliveries.push(Delivery {
            interrupted: interrupted.clone(),
            rip,
            rsp: old_rsp,
            depth,
            nmi_count,
        });
        // An NMI that interrupted ring 3 is judged by the agent, which checks every register
        // after it: on the emulated kvm_amd the breakpoint at a ring-3 instruction never
        // stopped the return (not understood; returns to ring 0 stop as they should).
        if run.watch.is_none() && cs & 3 == 0 {
            run.watch = Some(ReturnWatch { rip, rsp: old_rsp, cs, rflags, ss, interrupted });
        }
        Ok(())
    }

    fn on_return(&mut self, run: &mut Run, rsp: u64, rflags: u64) -> Result<Option<KernelVerdict>> {
        let Some(watch) = &run.watch else { return Ok(None) };
        if rsp != watch.rsp {
            return Ok(None);
        }
        let sregs = self.vcpu.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
        let (cs, ss) = (u64::from(sregs.cs.selector), u64::from(sregs.ss.selector));
        let mut differences = Vec::new();
        if cs != watch.cs {
            differences.push(format!("CS {cs:#x}, was {:#x}", watch.cs));
        }
        if ss != watch.ss && !(ss == 0 && watch.ss & 3 == 0) {
            differences.push(format!("SS {ss:#x}, was {:#x}", watch.ss));
        }
        if (rflags ^ watch.rflags) & !RFLAGS_NOT_JUDGED != 0 {
            differences.push(format!("RFLAGS {rflags:#x}, was {:#x}", watch.rflags));
        }
        run.out.trace.push(format!("NMI returned to {}", watch.interrupted));
        let verdict = (!differences.is_empty()).then(|| KernelVerdict::WrongReturn {
            message: format!("back at {}: {}", watch.interrupted, differences.join(", ")),
        });
        run.watch = None;
        Ok(verdict)
    }

    /// The kernel touched the watched address: raise #DB in the guest if its own DR7 has a
    /// breakpoint there enabled now.
    fn on_watchpoint(&mut self, run: &mut Run, rip: u64) -> Result<()> {
        let Some(address) = run.mirror else { return Ok(()) };
        let mut guest = self.vcpu.get_debug_regs().map_err(Error::kvm("KVM_GET_DEBUGREGS"))?;
        let slot = (0..4).find(|&i| guest.db[i] & !7 == address && guest.dr7 & (3 << (2 * i)) != 0);
        let place = self.symbols.describe(rip);
        let Some(slot) = slot else {
            run.out
                .trace
                .push(format!("watched address touched at {place} (the kernel's DR7 has it off)"));
            return Ok(());
        };
        let in_nmi = run.watch.is_some();
        run.out.trace.push(format!("#DB raised by the kernel's watchpoint {slot} after {place}"));
        run.out.debug_exceptions.push(place.clone());
        run.feature(&[b"debug", place.as_bytes(), &[u8::from(in_nmi)]]);
        // DR6 as the CPU leaves it for a data breakpoint: Bn set, the reserved bits ones.
        guest.dr6 = 0xffff_0ff0 | (1 << slot);
        self.vcpu.set_debug_regs(&guest).map_err(Error::kvm("KVM_SET_DEBUGREGS"))?;
        let mut events = self.vcpu.get_vcpu_events().map_err(Error::kvm("KVM_GET_VCPU_EVENTS"))?;
        events.exception.injected = 1;
        events.exception.nr = 1;
        events.exception.has_error_code = 0;
        self.vcpu.set_vcpu_events(&events).map_err(Error::kvm("KVM_SET_VCPU_EVENTS"))
    }

    /// The top of the NMI stack at a delivery: the words above RSP, named where the layout of
    /// Linux's nested-NMI entry gives them a name.
    fn stack_diagram(&self, rsp: u64) -> Vec<String> {
        let top = self.facts.nmi_stack_top;
        let Some(words) = self.read_virtual(top - 8 * 16, 8 * 16) else { return Vec::new() };
        let names = ["SS", "RSP", "RFLAGS", "CS", "RIP", "\"NMI executing\"", "saved RDX"];
        (0..16)
            .map(|i| {
                let address = top - 8 * (i + 1);
                let at = (address - (top - 8 * 16)) as usize;
                let value = u64::from_le_bytes(words[at..at + 8].try_into().unwrap_or_default());
                let name = names.get(i as usize).copied().unwrap_or("");
                let here = if address == rsp { " <- RSP" } else { "" };
                format!("    top-{:#04x} {value:#018x} {name}{here}", 8 * (i + 1))
            })
            .collect()
    }
}
