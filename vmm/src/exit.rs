//! KVM exits as owned, typed events, so the run loop can match on them without holding a
//! borrow of the vCPU.

use kvm_bindings::KVM_INTERNAL_ERROR_EMULATION;
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::error::{Error, Result};

/// One return of KVM_RUN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    /// `out` to `port`: `value` holds the 1, 2 or 4 data bytes, little-endian.
    IoOut {
        /// The port.
        port: u16,
        /// The data.
        value: u32,
        /// 1, 2 or 4.
        size: u8,
    },
    /// `in` from `port` (never used by the guest; answered with zeroes).
    IoIn {
        /// The port.
        port: u16,
    },
    /// A single-step or breakpoint stop before the instruction at `pc`.
    Debug {
        /// RIP of the next instruction to execute.
        pc: u64,
        /// DR6 as KVM reported it.
        dr6: u64,
    },
    /// HLT (there is no in-kernel irqchip, so it always exits).
    Hlt,
    /// Triple fault.
    Shutdown,
    /// KVM could not emulate an instruction (code fetched where no memory is; on kvm_pvm also
    /// ring-0 `int3`, `popcnt`, SSE arithmetic).
    EmulationFailure {
        /// The instruction bytes, when KVM provides them.
        bytes: Vec<u8>,
    },
    /// A ring-0 `int3` the host could not execute, which [`crate::Vm::run_once`] performed
    /// (RIP moved past it, #BP injected for the next entry).
    Int3Performed,
    /// Any other internal error.
    InternalError {
        /// KVM's sub-error code.
        suberror: u32,
    },
    /// An access to guest physical memory with no RAM behind it.
    Mmio {
        /// The guest physical address.
        address: u64,
        /// Whether it was a write.
        write: bool,
    },
    /// KVM_RUN was interrupted by a signal (the watchdog) or an immediate exit.
    Interrupted,
    /// Any exit nmifuzz has no use for, by name.
    Other(String),
}

/// What a report says of an exit: addresses and ports in hex, as the guest's code has them.
impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::IoOut { port, value, size } => {
                write!(f, "out of {value:#x} ({size} bytes) to port {port:#x}")
            }
            Self::IoIn { port } => write!(f, "in from port {port:#x}"),
            Self::Debug { pc, dr6 } => write!(f, "debug stop before {pc:#x} (DR6 {dr6:#x})"),
            Self::Hlt => f.write_str("HLT"),
            Self::Shutdown => f.write_str("shutdown (triple fault)"),
            Self::EmulationFailure { bytes } => write!(f, "emulation failure (bytes {bytes:02x?})"),
            Self::Int3Performed => f.write_str("ring-0 int3 performed by the VMM"),
            Self::InternalError { suberror } => write!(f, "KVM internal error {suberror}"),
            Self::Mmio { address, write } => {
                let access = if *write { "write" } else { "read" };
                write!(f, "MMIO {access} at {address:#x}, where there is no guest memory")
            }
            Self::Interrupted => f.write_str("KVM_RUN interrupted"),
            Self::Other(name) => f.write_str(name),
        }
    }
}

/// KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES (linux/kvm.h): `insn_bytes` is valid.
const EMULATION_FLAG_INSTRUCTION_BYTES: u64 = 1;

/// Runs the vCPU once and converts the exit.
pub fn run(vcpu: &mut VcpuFd) -> Result<Exit> {
    let exit = match vcpu.run() {
        Ok(exit) => exit,
        Err(e) if e.errno() == libc::EINTR => return Ok(Exit::Interrupted),
        Err(e) if e.errno() == libc::EAGAIN => return Ok(Exit::Interrupted),
        Err(e) => return Err(Error::kvm("KVM_RUN")(e)),
    };
    Ok(match exit {
        VcpuExit::IoOut(port, data) => {
            let mut bytes = [0u8; 4];
            let n = data.len().min(4);
            bytes[..n].copy_from_slice(&data[..n]);
            Exit::IoOut { port, value: u32::from_le_bytes(bytes), size: n as u8 }
        }
        VcpuExit::IoIn(port, data) => {
            data.fill(0);
            Exit::IoIn { port }
        }
        VcpuExit::Debug(arch) => Exit::Debug { pc: arch.pc, dr6: arch.dr6 },
        VcpuExit::Hlt => Exit::Hlt,
        VcpuExit::Shutdown => Exit::Shutdown,
        VcpuExit::MmioRead(address, _) => Exit::Mmio { address, write: false },
        VcpuExit::MmioWrite(address, _) => Exit::Mmio { address, write: true },
        VcpuExit::InternalError => internal_error(vcpu),
        other => Exit::Other(format!("{other:?}")),
    })
}

fn internal_error(vcpu: &mut VcpuFd) -> Exit {
    let run = vcpu.get_kvm_run();
    // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, for which KVM fills the `internal` /
    // `emulation_failure` union members; both are plain integers.
    let failure = unsafe { run.__bindgen_anon_1.emulation_failure };
    if failure.suberror != KVM_INTERNAL_ERROR_EMULATION {
        return Exit::InternalError { suberror: failure.suberror };
    }
    // ndata counts the u64 words after suberror/ndata: flags, then 16 bytes of instruction.
    let bytes = if failure.ndata >= 3 && failure.flags & EMULATION_FLAG_INSTRUCTION_BYTES != 0 {
        // SAFETY: the flag says the instruction-bytes member of the union is valid.
        let insn = unsafe { failure.__bindgen_anon_1.__bindgen_anon_1 };
        insn.insn_bytes[..usize::from(insn.insn_size).min(15)].to_vec()
    } else {
        Vec::new()
    };
    Exit::EmulationFailure { bytes }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_read_with_hex_addresses() {
        let mmio = Exit::Mmio { address: 0x3a_9f00_0008, write: true };
        assert_eq!(mmio.to_string(), "MMIO write at 0x3a9f000008, where there is no guest memory");
        let out = Exit::IoOut { port: 0x3f8, value: 0x41, size: 1 };
        assert_eq!(out.to_string(), "out of 0x41 (1 bytes) to port 0x3f8");
    }
}
