//! What a run ends in: a [`Verdict`] plus the counters and statistics of the run.

use std::fmt;
use std::time::Duration;

use nmifuzz_abi::Counters;

pub use crate::engine::returns::WrongReturn;

/// A guest panic, as the guest reported it in its mailbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestPanic {
    /// The panic message.
    pub message: String,
    /// Source file, line and column of the panic.
    pub file: String,
    /// Line in `file`.
    pub line: u32,
    /// Column in `file`.
    pub column: u32,
    /// The instruction the panic is about: the faulting RIP of an unexpected exception, the
    /// panic site for a Rust panic (the panic handler's own RIP for a panic inside `core`); 0
    /// only if the record had none.
    pub rip: u64,
    /// `rip` as `symbol+offset`; empty when `rip` is 0.
    pub symbol: String,
}

/// How a run ended. Everything the guest can do ends in one of these; none is an error of
/// the VMM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The workload reported DONE.
    Done,
    /// The guest panicked (an invariant, an unexpected exception, a double fault...).
    GuestPanic(GuestPanic),
    /// The guest triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault {
        /// RIP at the shutdown.
        rip: u64,
        /// `rip` as `symbol+offset`.
        symbol: String,
    },
    /// KVM could not emulate a guest instruction.
    EmulationError {
        /// RIP of the instruction.
        rip: u64,
        /// `rip` as `symbol+offset`.
        symbol: String,
        /// The instruction bytes KVM reported (may be empty).
        bytes: Vec<u8>,
    },
    /// The run exceeded its wall-clock limit.
    Timeout {
        /// The limit.
        limit: Duration,
        /// RIP when the watchdog stopped the guest.
        rip: u64,
        /// `rip` as `symbol+offset`.
        symbol: String,
    },
    /// The run exceeded its exit budget.
    BudgetExhausted {
        /// The budget.
        exits: u64,
    },
    /// The single-stepped part of the run exceeded its instruction budget (deterministic,
    /// e.g. an IRETQ looping on itself in NMI context).
    InstructionBudget {
        /// The budget.
        instructions: u64,
        /// Where the guest was.
        symbol: String,
    },
    /// An NMI was delivered but no `do_nmi` iteration followed, or an iteration ran without
    /// a delivery.
    LostNmi {
        /// What was expected and what happened.
        message: String,
    },
    /// The VMM's count of NMIs (injected = delivered + dropped + pending) or the guest's
    /// count of `do_nmi` iterations does not add up.
    NmiCountMismatch {
        /// The two counts.
        message: String,
    },
    /// An NMI's return did not resume the context it interrupted (the return-integrity
    /// oracle, `engine::returns`).
    WrongReturn(WrongReturn),
    /// NMIs were still blocked when the workload finished.
    NmiLeftBlocked {
        /// What showed it: KVM's NMI mask or an ignored probe NMI.
        message: String,
    },
    /// An exit the guest never causes when it follows the contract.
    UnexpectedExit {
        /// What it was.
        description: String,
    },
}

impl Verdict {
    /// A short kebab-case name, stable for file names and JSON.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Done => "pass",
            Self::GuestPanic(_) => "guest-panic",
            Self::TripleFault { .. } => "triple-fault",
            Self::EmulationError { .. } => "emulation-error",
            Self::Timeout { .. } => "timeout",
            Self::BudgetExhausted { .. } => "budget-exhausted",
            Self::InstructionBudget { .. } => "instruction-budget",
            Self::LostNmi { .. } => "lost-nmi",
            Self::NmiCountMismatch { .. } => "nmi-count-mismatch",
            Self::WrongReturn(_) => "wrong-return",
            Self::NmiLeftBlocked { .. } => "nmi-left-blocked",
            Self::UnexpectedExit { .. } => "unexpected-exit",
        }
    }

    /// A key that is equal for findings of the same bug: the kind, plus the panic message and
    /// location or the code symbol, with numbers (depths, counts, addresses, offsets) left out.
    pub fn signature(&self) -> String {
        let without_numbers = |text: &str| {
            let mut out = String::with_capacity(text.len());
            let mut in_number = false;
            for c in text.chars() {
                let digit = c.is_ascii_digit()
                    || (in_number && c.is_ascii_hexdigit())
                    || (in_number && c == 'x');
                if digit {
                    if !in_number {
                        out.push('#');
                    }
                } else {
                    out.push(c);
                }
                in_number = digit;
            }
            out
        };
        let symbol_only = |symbol: &str| symbol.split('+').next().unwrap_or_default().to_owned();
        let detail = match self {
            Self::Done
            | Self::Timeout { .. }
            | Self::TripleFault { .. }
            | Self::BudgetExhausted { .. } => String::new(),
            Self::GuestPanic(p) => {
                format!("{} at {}:{}", without_numbers(&p.message), p.file, p.line)
            }
            Self::EmulationError { symbol, .. } | Self::InstructionBudget { symbol, .. } => {
                symbol_only(symbol)
            }
            Self::LostNmi { message }
            | Self::NmiCountMismatch { message }
            | Self::NmiLeftBlocked { message } => without_numbers(message),
            Self::UnexpectedExit { description } => without_numbers(description),
            // The same IRETQ restoring the same fields wrongly is the same bug.
            Self::WrongReturn(wrong) => {
                format!("{} at {}", wrong.differing_fields(), symbol_only(&wrong.iretq))
            }
        };
        if detail.is_empty() {
            self.kind().to_owned()
        } else {
            format!("{}: {detail}", self.kind())
        }
    }

    /// Whether the run is a finding.
    pub fn is_finding(&self) -> bool {
        !matches!(self, Self::Done)
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Done => write!(f, "pass: the workload reported DONE"),
            Self::GuestPanic(p) => {
                write!(f, "guest panic: {} (at {}", p.message, p.file)?;
                // A record without a source location has no line to show.
                if p.line != 0 {
                    write!(f, ":{}:{}", p.line, p.column)?;
                }
                if !p.symbol.is_empty() {
                    write!(f, ", rip {}", p.symbol)?;
                }
                write!(f, ")")
            }
            Self::TripleFault { symbol, .. } => write!(f, "triple fault at {symbol}"),
            Self::EmulationError { symbol, bytes, .. } => {
                write!(f, "KVM cannot emulate the instruction at {symbol} (bytes")?;
                for b in bytes {
                    write!(f, " {b:02x}")?;
                }
                write!(f, ")")
            }
            Self::Timeout { limit, symbol, .. } => {
                write!(f, "timeout: still running after {limit:?}, at {symbol}")
            }
            Self::BudgetExhausted { exits } => {
                write!(f, "budget exhausted: {exits} exits without finishing")
            }
            Self::InstructionBudget { instructions, symbol } => write!(
                f,
                "instruction budget exhausted: {instructions} stepped instructions, at {symbol}"
            ),
            Self::LostNmi { message } => write!(f, "lost NMI: {message}"),
            Self::NmiCountMismatch { message } => write!(f, "NMI count mismatch: {message}"),
            Self::NmiLeftBlocked { message } => write!(f, "NMIs left blocked: {message}"),
            Self::WrongReturn(wrong) => write!(f, "wrong NMI return: {wrong}"),
            Self::UnexpectedExit { description } => write!(f, "unexpected exit: {description}"),
        }
    }
}

/// The result of one run.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// How it ended.
    pub verdict: Verdict,
    /// The guest's counters at the end.
    pub counters: Counters,
    /// KVM_RUN round trips.
    pub exits: u64,
    /// Wall-clock time of the run.
    pub elapsed: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_ignore_numbers_but_not_meaning() {
        let budget =
            |symbol: &str| Verdict::InstructionBudget { instructions: 7, symbol: symbol.into() };
        assert_eq!(budget("nmi_naive+0x2a").signature(), budget("nmi_naive+0x31").signature());
        assert_ne!(budget("nmi_naive+0x2a").signature(), budget("do_nmi+0x3").signature());
        let lost = |m: &str| Verdict::LostNmi { message: m.into() };
        assert_eq!(
            lost("NMI delivered at instruction 40 lost").signature(),
            "lost-nmi: NMI delivered at instruction # lost"
        );
        let panic = |message: &str, line| {
            Verdict::GuestPanic(GuestPanic {
                message: message.into(),
                file: "src/nmi/mod.rs".into(),
                line,
                column: 1,
                rip: 0,
                symbol: String::new(),
            })
        };
        assert_eq!(
            panic("depth 2 at 0xdead", 10).signature(),
            panic("depth 3 at 0xbeef", 10).signature()
        );
        assert_ne!(panic("depth 2", 10).signature(), panic("depth 2", 11).signature());
    }
}
