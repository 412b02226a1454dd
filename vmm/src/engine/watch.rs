//! Hardware execute breakpoints: what each of the four debug registers watches, in each of the
//! ways the engine moves the guest.
//!
//! - **Stepping** watches the boundaries single-stepping cannot reach by itself: between an
//!   event's delivery and its handler's first instruction. On stock KVM, stepping is the guest's
//!   TF, which a delivery clears, so without a breakpoint there the whole handler would run
//!   unstepped; on kvm_pvm the handler's first instruction runs before the next stop. Either
//!   way a breakpoint on the entry makes that boundary a stop, the same one on every host. The
//!   four registers hold the #BP, #UD and #PF entries (the exceptions `do_nmi` and the
//!   workload raise) and the run's NMI entry; for the one step of an IRETQ to ring 3 that
//!   faults (a revoked CS), the #NP, #SS and #GP entries replace the first three.
//! - **An excursion** through ring 3 ([`super::user`]) watches the ring-0 code ring 3 can
//!   enter: the #UD and #PF entries, the NMI entry and the SYSCALL entry.
//! - **The fast mode's free runs** watch the awaited symbolic point and the start of a `do_nmi`
//!   iteration ([`super::mode`]); while NMIs are under way, the outermost interrupted ring-0
//!   context's RIP, so that an entry that returns there by another way than IRETQ (RET, a jump)
//!   closes the context where the stepped engine, which looks at every step, closes it; and on
//!   hosts where an IRET that restores RF suppresses the
//!   instruction breakpoint at its target (as the manuals say; kvm_pvm stops there anyway),
//!   the exceptions' common IRETQ: a fault's frame has RF set, so the return that retries the
//!   faulting instruction (or resumes after an `ud2` the handler skipped) would pass the
//!   awaited point without a stop. At that IRETQ the engine steps, and the stop after it
//!   counts as the stepped engine counts it.

use super::GuestFacts;

/// x86 exception vectors (Intel SDM vol. 3, table 6-1).
pub(super) const BREAKPOINT: u8 = 3;
pub(super) const INVALID_OPCODE: u8 = 6;
pub(super) const SEGMENT_NOT_PRESENT: u8 = 11;
pub(super) const STACK_FAULT: u8 = 12;
pub(super) const GENERAL_PROTECTION: u8 = 13;
pub(super) const PAGE_FAULT: u8 = 14;

/// The exceptions whose handler entries stepping watches, ordinarily and for the step of an
/// IRETQ to ring 3 that faults (SDM vol. 3, "IRET": #NP for a not-present CS, #SS for a
/// not-present SS, #GP for any other bad selector).
const STEPPING_VECTORS: [u8; 3] = [BREAKPOINT, INVALID_OPCODE, PAGE_FAULT];
const FAULTING_RETURN_VECTORS: [u8; 3] = [SEGMENT_NOT_PRESENT, STACK_FAULT, GENERAL_PROTECTION];

/// DR6.B0-B3: which hardware breakpoint stopped the guest.
pub(super) const DR6_BREAKPOINTS: u64 = 0xf;

/// What one hardware breakpoint stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Watch {
    /// The entry of exception `vector`'s handler.
    Exception(u8),
    /// The run's NMI entry.
    Nmi,
    /// The SYSCALL entry (LSTAR), reached from ring 3 on hosts where SYSCALL enters CPL0.
    Syscall,
    /// The symbolic point the fast mode waits for.
    Point,
    /// The start of a `do_nmi` iteration.
    Iteration,
    /// The exceptions' common IRETQ.
    ExceptionReturn,
    /// Where the outermost open NMI context resumes.
    ContextReturn,
}

/// What DR0 to DR3 watch, and where.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Watches([Option<(Watch, u64)>; 4]);

impl Watches {
    /// The breakpoints to set, with none at `without` (to move past that address: a
    /// breakpoint on the current RIP would stop again at once).
    pub fn breakpoints(&self, without: Option<u64>) -> [Option<u64>; 4] {
        self.0.map(|slot| slot.map(|(_, address)| address).filter(|&a| Some(a) != without))
    }

    /// The breakpoint that stopped the guest with `dr6`, if one did: its index and watch.
    pub fn hit(&self, dr6: u64) -> Option<(usize, Watch)> {
        let index = (dr6 & DR6_BREAKPOINTS).trailing_zeros() as usize;
        Some((index, self.0.get(index).copied().flatten()?.0))
    }

    /// Which breakpoint watches `address`, if one does.
    pub fn position(&self, address: u64) -> Option<usize> {
        self.0.iter().position(|slot| slot.is_some_and(|(_, a)| a == address))
    }

    /// The watches of a free run of the fast mode: the awaited point, the iteration start, the
    /// exceptions' common IRETQ and where the outermost open NMI context resumes.
    pub fn free_run(
        point: Option<u64>,
        iteration: Option<u64>,
        exception_return: Option<u64>,
        context_return: Option<u64>,
    ) -> Self {
        Self([
            point.map(|a| (Watch::Point, a)),
            iteration.map(|a| (Watch::Iteration, a)),
            exception_return.map(|a| (Watch::ExceptionReturn, a)),
            context_return.map(|a| (Watch::ContextReturn, a)),
        ])
    }

    /// The watches while stepping (see the module documentation); `faulting_return` for the
    /// step of an IRETQ to ring 3 that faults.
    pub fn stepping(facts: &GuestFacts, nmi_entry: Option<u64>, faulting_return: bool) -> Self {
        let vectors = if faulting_return { FAULTING_RETURN_VECTORS } else { STEPPING_VECTORS };
        let exception = |v: u8| Some((Watch::Exception(v), facts.exception_entry(v)));
        Self([
            exception(vectors[0]),
            exception(vectors[1]),
            exception(vectors[2]),
            nmi_entry.map(|a| (Watch::Nmi, a)),
        ])
    }

    /// The watches of an excursion through ring 3.
    pub fn excursion(facts: &GuestFacts, nmi_entry: Option<u64>) -> Self {
        let exception = |v: u8| Some((Watch::Exception(v), facts.exception_entry(v)));
        Self([
            exception(INVALID_OPCODE),
            exception(PAGE_FAULT),
            nmi_entry.map(|a| (Watch::Nmi, a)),
            facts.syscall_entry.map(|a| (Watch::Syscall, a)),
        ])
    }
}

/// Whether exception `vector` pushes an error code below its frame (SDM vol. 3, table 6-1).
pub(super) fn has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hit_names_the_lowest_breakpoint_that_fired() {
        let watches = Watches::free_run(Some(0x1000), Some(0x2000), None, None);
        assert_eq!(watches.hit(0xffff_0ff2), Some((1, Watch::Iteration)));
        assert_eq!(watches.hit(0xffff_0ff1), Some((0, Watch::Point)));
        assert_eq!(watches.hit(0xffff_4ff0), None, "a single-step stop is no breakpoint's");
        assert_eq!(watches.hit(0xffff_0ff4), None, "DR2 watches nothing");
        assert_eq!(watches.breakpoints(Some(0x1000)), [None, Some(0x2000), None, None]);
        assert_eq!(watches.position(0x2000), Some(1));
    }

    #[test]
    fn error_codes_follow_the_manual() {
        let with: Vec<u8> = (0..32).filter(|&v| has_error_code(v)).collect();
        assert_eq!(with, [8, 10, 11, 12, 13, 14, 17, 21, 29, 30]);
    }
}
