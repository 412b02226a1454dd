//! Fixtures shared by the KVM integration tests.

use vmm::{Vm, VmConfig};

/// Environment variable that skips the tests needing `/dev/kvm`, for hosts without KVM. It must
/// be set explicitly: without it, a missing `/dev/kvm` fails every such test.
pub const SKIP_KVM: &str = "NMIFUZZ_SKIP_KVM_TESTS";

/// Boots the embedded guest, or returns `None` when the user opted out of KVM tests.
pub fn boot() -> Option<Vm> {
    if std::env::var_os(SKIP_KVM).is_some_and(|v| v == "1") {
        eprintln!("{SKIP_KVM}=1: skipping a test that needs /dev/kvm");
        return None;
    }
    match Vm::new(&VmConfig::default(), vmm::EMBEDDED_GUEST.to_vec()) {
        Ok(vm) => Some(vm),
        Err(e) => panic!(
            "this test needs a working /dev/kvm: {e}\n(set {SKIP_KVM}=1 to skip the KVM tests \
             explicitly on a host without KVM)"
        ),
    }
}
