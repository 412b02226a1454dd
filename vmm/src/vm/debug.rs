//! Single-stepping and hardware execute breakpoints: what KVM_SET_GUEST_DEBUG is given.

use kvm_bindings::{
    KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP, kvm_guest_debug,
};

use super::Vm;
use crate::error::{Error, Result};

/// DR7 local-enable bit of breakpoint `i` (Intel SDM vol. 3, 18.2.4); R/W and LEN stay 0,
/// which means "break on instruction execution".
const fn dr7_local_enable(i: usize) -> u64 {
    1 << (2 * i)
}

/// Single-stepping and hardware execute breakpoints, as set with KVM_SET_GUEST_DEBUG.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestDebug {
    /// Stop after every instruction.
    pub single_step: bool,
    /// Stop before executing these addresses (DR0-DR3).
    pub breakpoints: [Option<u64>; 4],
}

impl GuestDebug {
    pub(super) fn to_kvm(self) -> kvm_guest_debug {
        let mut debug = kvm_guest_debug::default();
        if self.single_step {
            debug.control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP;
        }
        for (i, address) in self.breakpoints.iter().enumerate() {
            if let Some(address) = address {
                debug.control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP;
                debug.arch.debugreg[i] = *address;
                debug.arch.debugreg[7] |= dr7_local_enable(i);
            }
        }
        debug
    }
}

impl Vm {
    /// Sets single-stepping and hardware breakpoints; no ioctl when nothing changes.
    pub fn set_debug(&mut self, debug: GuestDebug) -> Result<()> {
        if debug != self.debug {
            self.vcpu
                .set_guest_debug(&debug.to_kvm())
                .map_err(Error::kvm("KVM_SET_GUEST_DEBUG"))?;
            self.debug = debug;
        }
        Ok(())
    }
}
