//! How a run on a real kernel ends, and the oracles that decide it. None of them needs help
//! from the kernel: the agent's checks, the console, KVM's exits, the host's own record of the
//! NMIs it delivered and where they returned, and the kernel's per-CPU NMI count read from
//! guest memory.

use std::fmt;

use serde::Serialize;

/// Console lines that are findings, and the lines that look like them but are expected.
const CONSOLE_FINDINGS: &[&str] = &[
    "Kernel panic",
    "Oops",
    "BUG:",
    "WARNING:",
    "general protection fault",
    "double fault",
    "kernel stack overflow",
    "stack guard page was hit",
    "Unable to handle kernel",
];

/// What every injected NMI makes the kernel print: it finds no source for it (no perf
/// counter overflowed, no IPI was sent), so it reports an NMI "for unknown reason" and goes on.
/// That is the kernel handling the NMI, not a failure.
pub const EXPECTED_CONSOLE: &[&str] = &["NMI received for unknown reason", "Dazed and confused"];

/// The end of a run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum KernelVerdict {
    /// The agent finished every operation and every oracle held.
    Clean,
    /// The agent could not perform an operation on this kernel (a system call it needs
    /// failed, such as a breakpoint the kernel refuses): not a finding.
    Unperformable {
        /// What the agent reported.
        message: String,
    },
    /// The kernel printed a panic, Oops, BUG or warning.
    Console {
        /// The first such line.
        line: String,
    },
    /// The agent found a register (or SS, or RSP) changed after a return to ring 3.
    AgentCheck {
        /// What the agent reported.
        message: String,
    },
    /// An NMI was delivered and the kernel never handled it (its NMI count did not move).
    LostNmi {
        /// The deliveries and the counts.
        message: String,
    },
    /// An NMI's return did not resume exactly the context it interrupted.
    WrongReturn {
        /// What differed.
        message: String,
    },
    /// NMIs were still blocked, or one still pending, when the agent finished.
    NmiLeftBlocked {
        /// KVM's NMI state.
        message: String,
    },
    /// The guest triple-faulted.
    TripleFault {
        /// Where.
        rip: String,
    },
    /// The run did not finish in time (a hang).
    Hang {
        /// Where the guest was.
        rip: String,
    },
}

impl KernelVerdict {
    /// A short name for the kind, used in artifact names.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Clean => "clean",
            Self::Unperformable { .. } => "unperformable",
            Self::Console { .. } => "console",
            Self::AgentCheck { .. } => "agent-check",
            Self::LostNmi { .. } => "lost-nmi",
            Self::WrongReturn { .. } => "wrong-return",
            Self::NmiLeftBlocked { .. } => "nmi-left-blocked",
            Self::TripleFault { .. } => "triple-fault",
            Self::Hang { .. } => "hang",
        }
    }

    /// Whether the run found something.
    pub fn is_finding(&self) -> bool {
        !matches!(self, Self::Clean | Self::Unperformable { .. })
    }
}

impl fmt::Display for KernelVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Clean => write!(f, "clean"),
            Self::Unperformable { message } => write!(f, "not performed: {message}"),
            Self::Console { line } => write!(f, "the kernel printed: {line}"),
            Self::AgentCheck { message } => write!(f, "the agent's check failed: {message}"),
            Self::LostNmi { message } => write!(f, "lost NMI: {message}"),
            Self::WrongReturn { message } => write!(f, "wrong return from an NMI: {message}"),
            Self::NmiLeftBlocked { message } => write!(f, "NMIs left blocked: {message}"),
            Self::TripleFault { rip } => write!(f, "triple fault at {rip}"),
            Self::Hang { rip } => write!(f, "hang: the run did not finish in time (at {rip})"),
        }
    }
}

/// The first console line that is a finding, if any, without printk's timestamp (which
/// differs from run to run and would make one finding many).
pub fn console_finding(lines: &[String]) -> Option<&str> {
    lines
        .iter()
        .filter(|line| !EXPECTED_CONSOLE.iter().any(|e| line.contains(e)))
        .find(|line| CONSOLE_FINDINGS.iter().any(|f| line.contains(f)))
        .map(|line| without_timestamp(line))
}

/// `line` without a leading `[    4.499121] `.
fn without_timestamp(line: &str) -> &str {
    match line.strip_prefix('[').and_then(|rest| rest.split_once("] ")) {
        Some((stamp, rest)) if stamp.trim().parse::<f64>().is_ok() => rest,
        _ => line,
    }
}

/// The lost-NMI oracle: every delivered NMI must be followed by a pass of the kernel's
/// handler, which counts it in `irq_stat.__nmi_count`. Nested NMIs may share a pass (Linux
/// repeats the handler once for any number of NMIs that arrived during it), so what must hold
/// is that the count moved after the last delivery.
pub fn lost_nmi(deliveries: &[u32], final_count: u32) -> Option<String> {
    let last = *deliveries.last()?;
    (final_count == last).then(|| {
        format!(
            "{} NMIs delivered; the kernel's NMI count was {last} at the last delivery and is \
             still {final_count} at the end",
            deliveries.len()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unknown_reason_lines_are_not_findings_but_an_oops_is() {
        let lines: Vec<String> = [
            "Uhhuh. NMI received for unknown reason 30 on CPU 0.",
            "Dazed and confused, but trying to continue",
            "BUG: kernel NULL pointer dereference, address: 0000000000000000",
        ]
        .map(String::from)
        .into();
        assert_eq!(console_finding(&lines[..2]), None);
        assert_eq!(console_finding(&lines), Some(lines[2].as_str()));
        let stamped = vec!["[    4.499121] Kernel panic - not syncing: x".to_owned()];
        assert_eq!(console_finding(&stamped), Some("Kernel panic - not syncing: x"));
    }

    #[test]
    fn an_nmi_is_lost_when_the_count_does_not_move_after_it() {
        assert_eq!(lost_nmi(&[], 5), None);
        assert_eq!(lost_nmi(&[5, 6], 7), None);
        assert_eq!(lost_nmi(&[5, 5], 6), None, "two NMIs may share one repeated pass");
        let message = lost_nmi(&[5], 5).unwrap();
        assert!(message.contains("still 5"), "{message}");
    }
}
