//! Opening `/dev/kvm` and checking that it can do what nmifuzz needs.

use std::fs::OpenOptions;
use std::io::ErrorKind;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::path::Path;

use kvm_ioctls::{Cap, Kvm};

use crate::error::{Error, Result};

/// The KVM device.
pub const KVM_DEVICE: &str = "/dev/kvm";

/// Capabilities nmifuzz cannot work without, with what each is for.
const REQUIRED: &[(Cap, &str, &str)] = &[
    (Cap::UserNmi, "KVM_CAP_USER_NMI", "injecting NMIs (KVM_NMI)"),
    (Cap::SetGuestDebug, "KVM_CAP_SET_GUEST_DEBUG", "single-stepping the guest"),
    (Cap::VcpuEvents, "KVM_CAP_VCPU_EVENTS", "reading and restoring the NMI state"),
    (Cap::SyncRegs, "KVM_CAP_SYNC_REGS", "reading registers at every exit without ioctls"),
    (Cap::Debugregs, "KVM_CAP_DEBUGREGS", "snapshotting the debug registers"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT", "kicking a guest that never exits"),
];

/// Opens `path` (normally [`KVM_DEVICE`]) as KVM and checks the capabilities nmifuzz needs.
///
/// The errors say what to do: a missing device means KVM is not loaded, a permission problem
/// means the user is not in the `kvm` group.
pub fn open(path: &Path) -> Result<Kvm> {
    let file = OpenOptions::new().read(true).write(true).open(path).map_err(|e| {
        if e.kind() == ErrorKind::NotFound { Error::KvmMissing } else { Error::KvmAccess(e) }
    })?;
    // SAFETY: the descriptor was just opened on the KVM device and ownership moves to `Kvm`.
    let kvm = unsafe { Kvm::from_raw_fd(file.into_raw_fd()) };
    check_capabilities(&kvm)?;
    Ok(kvm)
}

fn check_capabilities(kvm: &Kvm) -> Result<()> {
    for &(cap, name, purpose) in REQUIRED {
        if !kvm.check_extension(cap) {
            return Err(Error::MissingCapability { name, purpose });
        }
    }
    // Dirty logging is part of the base KVM API (no capability bit); the memory slot flag
    // KVM_MEM_LOG_DIRTY_PAGES fails at registration if it is unsupported.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_device_says_to_load_kvm() {
        let err = open(Path::new("/nonexistent/kvm")).unwrap_err();
        assert!(matches!(err, Error::KvmMissing));
        assert!(err.to_string().contains("modprobe kvm"), "{err}");
    }

    #[test]
    fn an_inaccessible_device_says_to_join_the_group() {
        // A directory cannot be opened for writing: the same path as EACCES, without root games.
        let err = open(Path::new("/")).unwrap_err();
        assert!(matches!(err, Error::KvmAccess(_)), "{err:?}");
        assert!(err.to_string().contains("usermod -aG kvm"), "{err}");
    }
}
