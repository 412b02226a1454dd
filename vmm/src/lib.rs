//! nmifuzz's VMM: a minimal KVM virtual machine that boots the nmifuzz guest kernel, takes a
//! snapshot when the guest reports READY, and runs it again and again from that snapshot.
//!
//! The VMM knows nothing about fuzzing: [`Vm::run`] takes limits and returns an [`Outcome`];
//! guest misbehaviour of any kind is a [`Verdict`], never a panic or an error of the VMM.
#![warn(missing_docs)]

pub mod boot;
pub mod engine;
pub mod error;
pub mod exit;
pub mod gate;
pub mod hash;
pub mod image;
pub mod kernel;
pub mod kvm;
pub mod layout;
pub mod memory;
pub mod outcome;
pub mod snapshot;
pub mod vm;
pub mod watchdog;

pub use error::{Error, Result};
pub use image::GuestImage;
pub use outcome::{GuestPanic, Outcome, Verdict};
pub use vm::{RunLimits, Vm, VmConfig};

/// The guest kernel built from `guest/` by this crate's build script.
pub static EMBEDDED_GUEST: &[u8] = include_bytes!(env!("NMIFUZZ_GUEST_ELF"));
