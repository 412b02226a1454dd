//! What one run on a real kernel does: the agent's operations and the NMIs, each at an exact
//! instruction of the kernel named symbolically (`asm_exc_nmi+0x5d`, its Nth execution), so a
//! reproducer means the same on every boot of the same kernel.

use serde::{Deserialize, Serialize};

use nmifuzz_abi::agent::{AgentOp, MAX_AGENT_OPS, agent_op};

/// The format tag of a kernel schedule file.
pub const FORMAT: &str = "nmifuzz-kernel-schedule/1";
/// NMIs one schedule injects at most.
pub const MAX_NMIS: usize = 8;
/// The largest occurrence a point may name.
pub const MAX_OCCURRENCE: u32 = 64;
/// The largest repetition count of an operation.
pub const MAX_COUNT: u32 = 64;

/// The kernel a schedule was made for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KernelId {
    /// The bzImage's path when the schedule was written (replay boots it again).
    pub path: String,
    /// The System.map given with it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_map: Option<String>,
    /// FNV-1a of the bzImage's bytes, in hex: replay refuses another kernel.
    pub hash: String,
}

/// An address the agent uses: symbolic, so it survives another boot.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Place {
    /// The top of the NMI's IST stack (from the TSS) minus this many bytes.
    NmiStack(u64),
    /// The top of the #DB IST stack minus this many bytes.
    DebugStack(u64),
    /// This CPU's copy of a per-CPU symbol (`name+0xoffset`).
    PerCpu(String),
    /// A kernel symbol (`name+0xoffset`).
    Symbol(String),
    /// A plain address.
    Address(u64),
}

/// One agent operation ([`nmifuzz_abi::agent::agent_op`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    /// System calls in a loop.
    Syscall(u32),
    /// A system call with RSP at `rsp`.
    SyscallWithRsp {
        /// Repetitions.
        count: u32,
        /// RSP during the call.
        rsp: Place,
    },
    /// Page faults from ring 3.
    PageFault(u32),
    /// Page faults with a 16-bit SS (returns through espfix64).
    Espfix(u32),
    /// Returns to user that fault (`rt_sigreturn` with a bad CS).
    BadSigreturn(u32),
    /// A hardware data breakpoint on a place (perf_event_open): the CPU raises #DB when the
    /// kernel touches it.
    Watch(Place),
    /// Disarms the breakpoints armed so far.
    Unwatch,
    /// A ring-3 loop with every register checked.
    Spin(u32),
}

/// Where an NMI arrives.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NmiPoint {
    /// `symbol+0xoffset` in the kernel, or `start` (the first instruction of the run).
    pub at: String,
    /// Which execution of that instruction (1 = the first); ignored for `start`.
    #[serde(default = "first")]
    pub occurrence: u32,
}

fn first() -> u32 {
    1
}

/// The point that is the run's first instruction.
pub const START: &str = "start";

/// A run on a real kernel.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KernelSchedule {
    /// [`FORMAT`].
    pub format: String,
    /// Free text: where the schedule came from.
    #[serde(default)]
    pub description: String,
    /// The kernel.
    pub kernel: KernelId,
    /// The agent's operations, in order.
    pub operations: Vec<Operation>,
    /// The NMIs, in the order they are armed: each is armed once the one before it has been
    /// injected.
    pub nmis: Vec<NmiPoint>,
}

impl KernelSchedule {
    /// Checks the limits a hand-written file may break; the message names the problem.
    pub fn validate(&self) -> Result<(), String> {
        if self.format != FORMAT {
            return Err(format!("format is {:?}, expected {FORMAT:?}", self.format));
        }
        if self.operations.len() > MAX_AGENT_OPS {
            return Err(format!("{} operations (at most {MAX_AGENT_OPS})", self.operations.len()));
        }
        if self.nmis.len() > MAX_NMIS {
            return Err(format!("{} NMIs (at most {MAX_NMIS})", self.nmis.len()));
        }
        if let Some(n) =
            self.nmis.iter().find(|n| n.occurrence == 0 || n.occurrence > MAX_OCCURRENCE)
        {
            return Err(format!(
                "NMI at {}: occurrence {} (1..={MAX_OCCURRENCE})",
                n.at, n.occurrence
            ));
        }
        for op in &self.operations {
            let count = match op {
                Operation::Syscall(n)
                | Operation::PageFault(n)
                | Operation::Espfix(n)
                | Operation::BadSigreturn(n)
                | Operation::Spin(n)
                | Operation::SyscallWithRsp { count: n, .. } => *n,
                Operation::Watch(_) | Operation::Unwatch => 1,
            };
            if count > MAX_COUNT {
                return Err(format!("{op:?}: count {count} (at most {MAX_COUNT})"));
            }
        }
        Ok(())
    }

    /// The agent's operations with their places resolved by `resolve`.
    pub fn agent_ops(
        &self,
        resolve: impl Fn(&Place) -> Result<u64, String>,
    ) -> Result<Vec<AgentOp>, String> {
        self.operations
            .iter()
            .map(|op| {
                let (kind, count, arg) = match op {
                    Operation::Syscall(n) => (agent_op::SYSCALL, *n, 0),
                    Operation::SyscallWithRsp { count, rsp } => {
                        (agent_op::SYSCALL_WITH_RSP, *count, resolve(rsp)?)
                    }
                    Operation::PageFault(n) => (agent_op::PAGE_FAULT, *n, 0),
                    Operation::Espfix(n) => (agent_op::ESPFIX, *n, 0),
                    Operation::BadSigreturn(n) => (agent_op::BAD_SIGRETURN, *n, 0),
                    Operation::Watch(place) => (agent_op::WATCH, 1, resolve(place)?),
                    Operation::Unwatch => (agent_op::WATCH, 0, 0),
                    Operation::Spin(n) => (agent_op::SPIN, *n, 0),
                };
                Ok(AgentOp { kind, count, arg })
            })
            .collect()
    }

    /// Reads a schedule file; the error names the file and what is wrong.
    pub fn load(path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let schedule: Self = serde_json::from_str(&text)
            .map_err(|e| format!("{} is not a kernel schedule: {e}", path.display()))?;
        schedule.validate().map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(schedule)
    }

    /// Whether a JSON file's text is a kernel schedule (rather than a built-in guest's).
    pub fn is_kernel_schedule(text: &str) -> bool {
        text.contains(FORMAT)
    }

    /// Whether the file at `path` is a kernel schedule; `false` if it cannot be read.
    pub fn is_kernel_schedule_file(path: &std::path::Path) -> bool {
        std::fs::read_to_string(path).is_ok_and(|text| Self::is_kernel_schedule(&text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule() -> KernelSchedule {
        KernelSchedule {
            format: FORMAT.into(),
            description: String::new(),
            kernel: KernelId::default(),
            operations: vec![
                Operation::Syscall(2),
                Operation::SyscallWithRsp { count: 1, rsp: Place::NmiStack(0) },
                Operation::Watch(Place::PerCpu("irq_stat".into())),
            ],
            nmis: vec![NmiPoint { at: "entry_SYSCALL_64+0x3".into(), occurrence: 2 }],
        }
    }

    #[test]
    fn a_schedule_round_trips_and_resolves_its_places() {
        let s = schedule();
        let text = serde_json::to_string_pretty(&s).unwrap();
        assert!(KernelSchedule::is_kernel_schedule(&text));
        assert_eq!(serde_json::from_str::<KernelSchedule>(&text).unwrap(), s);
        let ops = s
            .agent_ops(|p| match p {
                Place::NmiStack(off) => Ok(0x1000 - off),
                _ => Ok(7),
            })
            .unwrap();
        assert_eq!(ops[1], AgentOp { kind: agent_op::SYSCALL_WITH_RSP, count: 1, arg: 0x1000 });
        assert_eq!(ops[2].arg, 7);
    }

    #[test]
    fn limits_are_checked() {
        let mut s = schedule();
        s.nmis[0].occurrence = 0;
        assert!(s.validate().unwrap_err().contains("occurrence 0"));
        let mut s = schedule();
        s.operations = vec![Operation::Spin(1); MAX_AGENT_OPS + 1];
        assert!(s.validate().unwrap_err().contains("operations"));
    }
}
