//! The oracles that look at the end of a run (the agent's report, the kernel's NMI count, the
//! return watch, KVM's NMI state), and the calibration that finds the NMI count.

use std::time::Duration;

use nmifuzz_abi::agent::{AGENT_REGISTER_NAMES, AgentMailbox, agent_status};
use zerocopy::FromBytes;

use super::KernelVm;
use super::exec::Run;
use super::schedule::{KernelSchedule, NmiPoint, Operation, START};
use super::verdict::{KernelVerdict, lost_nmi};
use crate::error::{Error, Result};

impl KernelVm {
    fn read_mailbox(&self) -> Result<AgentMailbox> {
        let mut bytes = vec![0; size_of::<AgentMailbox>()];
        self.ram.read(self.mailbox, &mut bytes)?;
        AgentMailbox::read_from_bytes(&bytes)
            .map_err(|_| Error::Kernel("the agent's mailbox has the wrong size".into()))
    }

    /// The kernel's per-CPU NMI count now.
    pub(super) fn nmi_count(&self) -> u32 {
        self.read_virtual(self.facts.nmi_count, 4)
            .map_or(u32::MAX, |b| u32::from_le_bytes(b.try_into().unwrap_or_default()))
    }

    /// The agent is done: apply the oracles that look at the end state.
    pub(super) fn judge(&mut self, run: &mut Run) -> Result<KernelVerdict> {
        let mailbox = self.read_mailbox()?;
        if mailbox.status == agent_status::SETUP {
            return Ok(KernelVerdict::Unperformable { message: describe_status(&mailbox) });
        }
        if mailbox.status != agent_status::OK {
            return Ok(KernelVerdict::AgentCheck { message: describe_status(&mailbox) });
        }
        let counts: Vec<u32> = run.out.deliveries.iter().map(|d| d.nmi_count).collect();
        if let Some(message) = lost_nmi(&counts, self.nmi_count()) {
            return Ok(KernelVerdict::LostNmi { message });
        }
        if let Some(watch) = &run.watch {
            return Ok(KernelVerdict::WrongReturn {
                message: format!(
                    "the NMI that interrupted {} never returned there",
                    watch.interrupted
                ),
            });
        }
        let events = self.vcpu.get_vcpu_events().map_err(Error::kvm("KVM_GET_VCPU_EVENTS"))?;
        if events.nmi.masked != 0 || events.nmi.pending != 0 {
            return Ok(KernelVerdict::NmiLeftBlocked {
                message: format!(
                    "back in the agent with NMIs {}",
                    if events.nmi.masked != 0 { "masked" } else { "pending, never delivered" }
                ),
            });
        }
        Ok(KernelVerdict::Clean)
    }

    /// Finds `irq_stat.__nmi_count`: one NMI at the start of a run must add exactly one to it.
    /// Which field it is depends on the kernel's configuration (a byte for KVM's L1TF flush
    /// may come first).
    pub(super) fn calibrate_nmi_count(&mut self) -> Result<u64> {
        let irq_stat = self.facts.per_cpu_base.wrapping_add(
            self.symbols.require("irq_stat", "counting the NMIs the kernel handled")?,
        );
        let read = |vm: &Self| vm.read_virtual(irq_stat, 8);
        let before = read(self).ok_or_else(|| Error::Kernel("cannot read irq_stat".into()))?;
        let probe = KernelSchedule {
            format: super::schedule::FORMAT.into(),
            description: "calibration".into(),
            kernel: Default::default(),
            operations: vec![Operation::Spin(1)],
            nmis: vec![NmiPoint { at: START.into(), occurrence: 1 }],
        };
        self.facts.nmi_count = irq_stat;
        let run = self.execute(&probe, Duration::from_secs(60))?;
        let after = read(self).ok_or_else(|| Error::Kernel("cannot read irq_stat".into()))?;
        let field = |bytes: &[u8], at: usize| {
            u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or_default())
        };
        for at in [0, 4] {
            if field(&after, at) == field(&before, at).wrapping_add(1) {
                return Ok(irq_stat + at as u64);
            }
        }
        Err(Error::Kernel(format!(
            "cannot find irq_stat.__nmi_count: one NMI at the start of a run ({}) changed \
             irq_stat from {before:02x?} to {after:02x?}",
            run.verdict
        )))
    }
}

/// The agent's failure in words.
fn describe_status(mailbox: &AgentMailbox) -> String {
    let [a, b, c, d] = mailbox.detail;
    match mailbox.status {
        agent_status::REGISTER => format!(
            "{} is {c:#x}, expected {b:#x}, after operation {d}",
            AGENT_REGISTER_NAMES.get(a as usize).copied().unwrap_or("a register")
        ),
        agent_status::SETUP if b == u64::MAX => format!("the agent's set-up failed (errno {a})"),
        agent_status::SETUP => format!("operation {b} could not be performed (errno {a})"),
        agent_status::BAD_OP => format!("operation {b} has unknown kind {a}"),
        agent_status::SIGNAL => {
            format!("unexpected signal {a} at RIP {b:#x} (address {c:#x}) in operation {d}")
        }
        u32::MAX => "the agent never wrote a status".into(),
        other => format!("unknown status {other}"),
    }
}
