//! IRETQ traps: how the fast mode free-runs through NMI handling and still stops at every
//! IRETQ.
//!
//! The return-integrity oracle judges every IRETQ while NMI contexts are open, and a latched
//! NMI must arrive right after the IRETQ that unblocks NMIs, which this host would deliver up
//! to ~1024 instructions late. Both need a stop before each IRETQ, and the guest has more
//! IRETQ sites than there are debug registers. So, while the fast mode free-runs, the first two
//! bytes of every IRETQ on the NMI paths are replaced by `fld1`, an x87 instruction this host's
//! ring-0 emulator cannot run: KVM_RUN ends with an emulation failure *at* the site, RIP
//! unchanged, and the engine treats that exit as the stop before the IRETQ. At every stop the
//! original bytes are back, so decoding, stepping and the stepped engine never see a trap.
//! Reset restores the code pages the traps wrote (host writes are tracked).
//!
//! On a host whose ring-0 code runs natively (ordinary VMX/SVM KVM) `fld1` would simply run,
//! so there the fast mode does not set traps and steps through NMI handling instead.

use crate::error::Result;
use crate::vm::Vm;

/// `iretq`: REX.W + IRET.
const IRETQ: [u8; 2] = [0x48, 0xcf];
/// `fld1`: ends KVM_RUN with an emulation failure on kvm_pvm (kvm-on-this-host.md, 4.x).
const TRAP: [u8; 2] = [0xd9, 0xe8];

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

    /// Whether the traps are set (a trap exit is then a stop).
    pub fn is_set(&self) -> bool {
        self.set
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
