//! One vCPU exit at a time: port I/O goes to the devices, the agent's doorbell writes come back
//! as [`AgentCall`]s, and what the caller must judge (a stop at a breakpoint, a shutdown) is
//! returned.

use kvm_ioctls::{VcpuExit, VcpuFd};
use nmifuzz_abi::agent::{AGENT_DOORBELL, AgentMessage};

use super::devices::{Cmos, SERIAL_BASE, SERIAL_PORTS, Uart};
use crate::error::{Error, Result};

/// What a doorbell write from the agent asked for, read from the registers at the exit.
pub(super) struct AgentCall {
    pub(super) message: Option<AgentMessage>,
    pub(super) rdi: u64,
    pub(super) rsi: u64,
}

/// Lets KVM finish the instruction of the last exit (an `in` or `out`) without running the
/// guest further, so the state read next is after it.
pub(super) fn flush_io(vcpu: &mut VcpuFd) -> Result<()> {
    vcpu.set_kvm_immediate_exit(1);
    let result = vcpu.run().map(|_| ());
    vcpu.set_kvm_immediate_exit(0);
    match result {
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        other => Err(Error::Flush(format!("{other:?}"))),
    }
}

/// An exit, once the devices have had it.
pub(super) enum Handled {
    Continue,
    Interrupted,
    Shutdown,
    Debug(kvm_bindings::kvm_debug_exit_arch),
    Agent(AgentCall),
}

/// Runs the vCPU to its next exit and gives port I/O to the devices.
pub(super) fn handle_exit(vcpu: &mut VcpuFd, uart: &mut Uart, cmos: &mut Cmos) -> Result<Handled> {
    let handled = match vcpu.run() {
        Ok(VcpuExit::IoOut(port, data)) => {
            let value = data.first().copied().unwrap_or(0);
            match port {
                p if SERIAL_PORTS.contains(&p) => {
                    // The only error is the IRQ eventfd's write failing: nothing to do.
                    let _ = uart.write((p - SERIAL_BASE) as u8, value);
                    Handled::Continue
                }
                Cmos::INDEX | Cmos::DATA => {
                    cmos.write(port, value);
                    Handled::Continue
                }
                _ => Handled::Continue,
            }
        }
        Ok(VcpuExit::IoIn(port, data)) => {
            // Nothing there: a floating ISA bus reads all ones.
            data.fill(0xff);
            match port {
                p if SERIAL_PORTS.contains(&p) => data[0] = uart.read((p - SERIAL_BASE) as u8),
                Cmos::INDEX | Cmos::DATA => data[0] = cmos.read(port),
                _ => {}
            }
            Handled::Continue
        }
        Ok(VcpuExit::MmioWrite(AGENT_DOORBELL, data)) => {
            let code = data.iter().rev().fold(0, |code, &b| (code << 8) | u32::from(b));
            let regs = vcpu.get_regs().map_err(Error::kvm("KVM_GET_REGS"))?;
            Handled::Agent(AgentCall {
                message: AgentMessage::from_code(code),
                rdi: regs.rdi,
                rsi: regs.rsi,
            })
        }
        Ok(VcpuExit::MmioRead(_, data)) => {
            data.fill(0xff);
            Handled::Continue
        }
        Ok(VcpuExit::Shutdown) => Handled::Shutdown,
        Ok(VcpuExit::Debug(debug)) => Handled::Debug(debug),
        Ok(VcpuExit::FailEntry(reason, _)) => {
            return Err(Error::Kernel(format!(
                "KVM could not enter the guest (reason {reason:#x})"
            )));
        }
        Ok(VcpuExit::InternalError) => {
            return Err(Error::Kernel("KVM reported an internal error running the kernel".into()));
        }
        Ok(_) => Handled::Continue,
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Handled::Interrupted,
        Err(e) => return Err(Error::kvm("KVM_RUN")(e)),
    };
    Ok(handled)
}

/// If the kernel halted waiting for its timer (which the snapshot's restore leaves disarmed:
/// `state`), makes the timer fire; returns whether it did.
pub(super) fn wake_if_idle(vcpu: &VcpuFd) -> Result<bool> {
    let state = vcpu.get_mp_state().map_err(Error::kvm("KVM_GET_MP_STATE"))?;
    if state.mp_state != kvm_bindings::KVM_MP_STATE_HALTED {
        return Ok(false);
    }
    super::state::wake_timer(vcpu)?;
    Ok(true)
}
