//! IRETQ traps: how the fast mode free-runs through NMI handling and still stops at every
//! IRETQ.
//!
//! The return-integrity oracle judges every IRETQ while NMI contexts are open, and a latched
//! NMI must arrive right after the IRETQ that unblocks NMIs (kvm_pvm would deliver it up to
//! ~1024 instructions late unless the engine performs the IRETQ). Both need a stop before each
//! IRETQ, and the guest has more IRETQ sites than there are debug registers. So, while the fast
//! mode free-runs, the two bytes of every IRETQ on the NMI paths are replaced by `hlt; nop`.
//! The VMM has no in-kernel irqchip, so KVM does not emulate a halted vCPU itself: a ring-0
//! `hlt` ends KVM_RUN with KVM_EXIT_HLT, with RIP moved past the `hlt` (measured on stock
//! kvm_amd and on kvm_pvm alike; VMX exits on HLT the same way). The engine moves RIP back to
//! the site and treats that exit as the stop before the IRETQ. At every stop the original bytes
//! are back, so decoding, stepping and the stepped engine never see a trap. Reset restores the
//! code pages the traps wrote (host writes are tracked).
//!
//! The guest's only own `hlt`s are its final halt after DONE and, in ring 3, the user
//! workload's failed check (a #GP there): neither is at a trap site.

use crate::error::Result;
use crate::vm::Vm;

/// `iretq`: REX.W + IRET.
const IRETQ: [u8; 2] = [0x48, 0xcf];
/// `hlt; nop`: ends KVM_RUN with KVM_EXIT_HLT, RIP one byte on.
const TRAP: [u8; 2] = [0xf4, 0x90];

/// The IRETQ sites and whether their traps are set.
pub(super) struct IretqTraps {
    sites: Vec<u64>,
    set: bool,
}

impl IretqTraps {
    /// Traps for `sites` (see [`super::table::iretq_sites`]), not set.
    pub fn new(sites: Vec<u64>) -> Self {
        Self { sites, set: false }
    }

    /// Whether `address` is an IRETQ site.
    pub fn is_site(&self, address: u64) -> bool {
        self.sites.binary_search(&address).is_ok()
    }

    /// The site whose trap ended a KVM_RUN with KVM_EXIT_HLT at `rip`, if the traps are set
    /// and one did (the guest's own `hlt`s are elsewhere).
    pub fn trapped_at(&self, rip: u64) -> Option<u64> {
        let site = rip.checked_sub(1)?;
        (self.set && self.is_site(site)).then_some(site)
    }

    /// Sets or removes the traps.
    pub fn set(&mut self, vm: &mut Vm, set: bool) -> Result<()> {
        if set != self.set {
            let bytes = if set { TRAP } else { IRETQ };
            for &site in &self.sites {
                vm.ram_mut().write(site, &bytes)?;
            }
            self.set = set;
        }
        Ok(())
    }

    /// Forgets the traps after a reset restored the original code.
    pub fn reset(&mut self) {
        self.set = false;
    }
}
