//! The NMI books of one execution and the host-side oracles that judge them: how each
//! injection was taken, which NMIs are still undelivered, which interrupted contexts are open,
//! and whether every delivery was followed by a `do_nmi` iteration. Every execution mode keeps
//! the same books through this type, so the oracles are the same whatever runs the guest.

use nmifuzz_abi::Counters;

use super::NmiStats;
use super::returns::{self, Bounds, Context};
use super::trace::Injected;
use crate::image::GuestImage;
use crate::outcome::Verdict;
use crate::vm::IretFrame;

/// The books (see the module documentation).
#[derive(Default)]
pub(super) struct Books {
    /// What the run's NMIs became.
    pub stats: NmiStats,
    /// NMIs injected but not yet delivered (KVM's pending + injected).
    undelivered: u64,
    /// Interrupted contexts, innermost last: the NMI nesting depth is their number.
    contexts: Vec<Context>,
    /// Instruction count at the oldest delivery not yet followed by an iteration.
    awaiting_iteration: Option<u64>,
}

impl Books {
    /// Whether NMI handling is in progress or an NMI is pending.
    pub fn in_nmi_context(&self) -> bool {
        !self.contexts.is_empty() || self.undelivered > 0
    }

    /// Whether anything the oracles watch is under way: an NMI pending, a context open, or a
    /// delivery still waiting for its iteration. Every mode steps while this holds.
    pub fn busy(&self) -> bool {
        self.in_nmi_context() || self.awaiting_iteration.is_some()
    }

    /// NMIs injected and not yet delivered.
    pub fn undelivered(&self) -> u64 {
        self.undelivered
    }

    /// The NMI nesting depth: open interrupted contexts.
    pub fn depth(&self) -> u32 {
        self.contexts.len() as u32
    }

    /// How an NMI injected now is taken, as hardware would: delivered if NMIs are unblocked
    /// and none is pending, latched if the one-deep latch is free, dropped otherwise. (KVM,
    /// like hardware, lets a second NMI wait while a first one is about to be delivered.)
    pub fn classify(&self, masked: bool) -> Injected {
        let capacity = if masked { 1 } else { 2 };
        if self.undelivered >= capacity {
            Injected::Dropped
        } else if masked || self.undelivered > 0 {
            Injected::Latched
        } else {
            Injected::Delivered
        }
    }

    /// Books an injection taken as `how`.
    pub fn injected(&mut self, how: Injected) {
        self.stats.injected += 1;
        match how {
            Injected::Dropped => self.stats.dropped += 1,
            Injected::Latched => {
                self.stats.latched += 1;
                self.undelivered += 1;
            }
            Injected::Delivered => self.undelivered += 1,
        }
    }

    /// After a KVM_RUN, KVM reports `kvm_undelivered` NMIs not yet delivered: more than the
    /// books hold is a count mismatch (each one fewer was delivered during that run).
    pub fn compare_undelivered(&self, kvm_undelivered: u64, insn: u64) -> Option<Verdict> {
        (kvm_undelivered > self.undelivered).then(|| Verdict::NmiCountMismatch {
            message: format!(
                "KVM reports {kvm_undelivered} undelivered NMIs at instruction {insn}, but the VMM \
                 left only {} pending",
                self.undelivered
            ),
        })
    }

    /// Books one delivery at instruction `insn` whose hardware frame is `frame`. `open` says
    /// whether its interrupted context can be watched: on this host the handler's first
    /// instruction runs before the stop after a delivery, and if that already left the
    /// NMI-handling code (an entry that returns at once), the return was never a stop.
    pub fn delivered(&mut self, frame: IretFrame, insn: u64, open: bool) {
        self.undelivered -= 1;
        self.stats.delivered += 1;
        if open {
            let nmi = self.stats.delivered;
            self.contexts.push(Context { frame, nmi, delivered_at: insn });
        }
        self.awaiting_iteration.get_or_insert(insn);
    }

    /// Where the outermost open NMI context resumes, if it interrupted ring 0 (a return to
    /// ring 3 is always an IRETQ or SYSRET, which the engine stops at anyway).
    pub fn outermost_kernel_return(&self) -> Option<u64> {
        self.contexts.first().filter(|c| c.frame.cs & 3 == 0).map(|c| c.frame.rip)
    }

    /// The guest is at `pc` with `rsp`: a return to an open context closes it and every NMI
    /// nested inside it (merged NMIs). Returns whether it was such a return.
    pub fn resume(&mut self, pc: u64, rsp: u64) -> bool {
        let resumed = self.contexts.iter().position(|c| c.frame.rip == pc && c.frame.rsp == rsp);
        if let Some(index) = resumed {
            self.contexts.truncate(index);
        }
        resumed.is_some()
    }

    /// Books a `do_nmi` iteration starting at instruction `insn`; iterations must never
    /// outnumber deliveries. The count is cumulative: an NMI nested after the entry's point of
    /// no return (for Linux, end_repeat_nmi) but before the iteration starts both precedes this
    /// iteration and forces another one, so two deliveries give two iterations in a row.
    pub fn iteration_started(&mut self, insn: u64) -> Option<Verdict> {
        self.stats.iterations += 1;
        self.awaiting_iteration = None;
        (self.stats.iterations > self.stats.delivered).then(|| Verdict::LostNmi {
            message: format!(
                "do_nmi iteration {} started at instruction {insn} although only {} NMIs were \
                 delivered (iterations outnumber deliveries)",
                self.stats.iterations, self.stats.delivered
            ),
        })
    }

    /// The return-integrity oracle on an IRETQ at `iretq` (instruction `insn`) about to pop
    /// `frame` (see [`returns::judge`]).
    pub fn judge_return(
        &self,
        bounds: &Bounds,
        frame: &IretFrame,
        insn: u64,
        iretq: u64,
        image: &GuestImage,
    ) -> Option<Verdict> {
        returns::judge(&self.contexts, bounds, frame, insn, iretq, image)
    }

    /// The oracles at DONE, before the probe NMI: no delivery without its iteration, the
    /// counts add up, the guest counted the iterations the VMM saw, and NMIs are unblocked
    /// (`masked` is KVM's NMI mask).
    pub fn at_done(&self, counters: &Counters, masked: bool) -> Option<Verdict> {
        if let Some(at) = self.awaiting_iteration {
            return Some(Verdict::LostNmi {
                message: format!(
                    "an NMI delivered at instruction {at} was never followed by a do_nmi \
                     iteration before DONE"
                ),
            });
        }
        let nmi = &self.stats;
        if nmi.injected != nmi.delivered + nmi.dropped + self.undelivered {
            return Some(Verdict::NmiCountMismatch {
                message: format!(
                    "injected {} != delivered {} + dropped {} + still pending {}",
                    nmi.injected, nmi.delivered, nmi.dropped, self.undelivered
                ),
            });
        }
        if counters.nmi_iterations != nmi.iterations {
            return Some(Verdict::NmiCountMismatch {
                message: format!(
                    "the guest counted {} do_nmi iterations, the VMM saw {} start",
                    counters.nmi_iterations, nmi.iterations
                ),
            });
        }
        masked.then(|| Verdict::NmiLeftBlocked {
            message: "KVM reports NMIs still masked when the workload reported DONE".into(),
        })
    }
}
