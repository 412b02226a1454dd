//! The VMM's error type. Each variant's message says what went wrong and, where the user can do
//! something about it, what to do.

use std::path::PathBuf;

use crate::outcome::Verdict;

/// Errors of the VMM library. Guest misbehaviour is never an error: it is a [`Verdict`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/kvm` does not exist.
    #[error(
        "/dev/kvm does not exist: KVM is not available on this host. Load the module \
         (`modprobe kvm_intel` or `modprobe kvm_amd`), or run on a host with hardware \
         virtualization enabled"
    )]
    KvmMissing,
    /// `/dev/kvm` exists but cannot be opened.
    #[error(
        "cannot open /dev/kvm: {0}. Add your user to the group that owns it \
         (`sudo usermod -aG kvm $USER`, then log in again) or check its permissions"
    )]
    KvmAccess(#[source] std::io::Error),
    /// KVM lacks a capability nmifuzz needs.
    #[error("KVM lacks the capability {name}, which nmifuzz needs for {purpose}")]
    MissingCapability {
        /// KVM's name for it.
        name: &'static str,
        /// What nmifuzz uses it for.
        purpose: &'static str,
    },
    /// The memory size is unusable.
    #[error(
        "guest memory size {0:#x} is invalid: it must be a multiple of 2 MiB between 4 MiB and 1 GiB"
    )]
    MemorySize(u64),
    /// A KVM ioctl failed.
    #[error("KVM {what} failed: {source}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// The kernel's answer.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be set up or accessed.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The guest image could not be read.
    #[error("cannot read guest image {path}: {source}")]
    ReadImage {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The guest ELF is not one nmifuzz can boot.
    #[error("bad guest ELF: {0}")]
    BadElf(String),
    /// A symbol the VMM needs is missing from the guest.
    #[error("the guest ELF has no symbol `{0}`; is it an nmifuzz guest?")]
    MissingSymbol(String),
    /// The guest did not reach READY.
    #[error("the guest did not boot to READY: {verdict}{console}")]
    Boot {
        /// What happened instead.
        verdict: Box<Verdict>,
        /// The console output so far, if any.
        console: String,
    },
    /// The guest's mailbox does not carry the expected magic or ABI version.
    #[error("the guest speaks ABI version {found}, this VMM speaks {expected}")]
    AbiMismatch {
        /// The guest's version.
        found: u32,
        /// Ours.
        expected: u32,
    },
    /// KVM_RUN with `immediate_exit` did not return EINTR.
    #[error("flushing the vCPU state: KVM_RUN with immediate_exit returned {0} instead of EINTR")]
    Flush(String),
    /// Probing the host's stepping and NMI behaviour failed.
    #[error("host calibration failed: {0}")]
    Calibration(String),
    /// The watchdog could not be set up.
    #[error("cannot set up the watchdog: {0}")]
    Watchdog(#[source] std::io::Error),
    /// A real kernel ([`crate::kernel`]) could not be loaded, booted or driven.
    #[error("{0}")]
    Kernel(String),
    /// A schedule the VMM made itself does not fit the guest (`engine::agreement`).
    #[error("a generated schedule: {0}")]
    Schedule(#[from] crate::engine::schedule::Problem),
}

impl Error {
    /// Wraps a KVM error with the name of the operation.
    pub(crate) fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Self {
        move |source| Self::Kvm { what, source }
    }
}

/// The VMM's result type.
pub type Result<T> = std::result::Result<T, Error>;
