//! The schedule format's limits and the check against them.

use std::fmt;

use nmifuzz_abi::{MAX_BUSY_ITERATIONS, SCRIPT_ACTION_SLOTS, USER_FLAG_SLOTS, Variant};

use super::{Injection, SCHEDULE_FORMAT, Schedule, Workload};

/// Most injections in one schedule file (the fuzzer's own limit, `FUZZER_MAX_INJECTIONS`, is
/// smaller).
pub const SCHEDULE_MAX_INJECTIONS: usize = 64;
/// Largest `after` delay and `extra` count in a schedule file, in instructions: far beyond any
/// run's budget.
pub const SCHEDULE_MAX_DELAY: u64 = 10_000_000;
/// Largest `occurrence` of a symbolic point.
pub const MAX_OCCURRENCE: u32 = 1_000_000;
/// Largest length of the loop workload: runs stay in the milliseconds.
pub const MAX_WORKLOAD_ITERATIONS: u32 = 2_000;
/// Largest length of the user workload. One of its iterations makes several system calls,
/// returns to user through espfix64 and through a faulting IRET, each path stepped by the
/// host while NMIs are due: far longer than a loop iteration, so runs stay under a second.
pub const MAX_USER_ITERATIONS: u32 = 100;

/// What is wrong with a parsed schedule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// Another format version.
    Format(u32),
    /// A variant the guest does not have.
    UnknownVariant(String),
    /// Too many of something.
    TooMany {
        /// Of what.
        what: &'static str,
        /// How many there are.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// A number out of range.
    OutOfRange {
        /// Which field.
        field: String,
        /// Its value.
        value: u64,
        /// The largest allowed.
        limit: u64,
    },
    /// A symbol the guest does not have.
    UnknownSymbol(String),
    /// A point outside its symbol.
    OffsetOutsideSymbol {
        /// The symbol.
        symbol: String,
        /// The offset.
        offset: u64,
        /// The symbol's size.
        size: u64,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Format(v) => write!(
                f,
                "schedule format {v} is not supported (this nmifuzz reads format {SCHEDULE_FORMAT})"
            ),
            Self::UnknownVariant(name) => {
                write!(f, "unknown variant `{name}`; valid variants: {}", variant_names())
            }
            Self::TooMany { what, count, limit } => {
                write!(f, "{count} {what} is too many (limit {limit})")
            }
            Self::OutOfRange { field, value, limit } => {
                write!(f, "{field} = {value} is out of range (limit {limit})")
            }
            Self::UnknownSymbol(s) => write!(f, "the guest has no symbol `{s}`"),
            Self::OffsetOutsideSymbol { symbol, offset, size } => {
                write!(f, "offset {offset:#x} is outside `{symbol}` ({size:#x} bytes)")
            }
        }
    }
}

/// The valid variant names, comma-separated.
pub fn variant_names() -> String {
    Variant::ALL.iter().map(|v| v.name()).collect::<Vec<_>>().join(", ")
}
impl Schedule {
    /// Checks every field against its limits (symbols are checked by [`Schedule::resolve`]).
    pub fn validate(&self) -> Result<(), Problem> {
        if self.format != SCHEDULE_FORMAT {
            return Err(Problem::Format(self.format));
        }
        self.variant()?;
        let too_many = |what, count, limit| {
            if count > limit { Err(Problem::TooMany { what, count, limit }) } else { Ok(()) }
        };
        too_many("injections", self.injections.len(), SCHEDULE_MAX_INJECTIONS)?;
        too_many("actions", self.actions.len(), SCRIPT_ACTION_SLOTS)?;
        too_many("user_flags", self.user_flags.len(), USER_FLAG_SLOTS)?;
        let range = |field: String, value: u64, limit: u64| {
            if value > limit { Err(Problem::OutOfRange { field, value, limit }) } else { Ok(()) }
        };
        let (field, limit) = match self.workload {
            Workload::Loop => ("workload_iterations", MAX_WORKLOAD_ITERATIONS),
            Workload::User => ("workload_iterations (user workload)", MAX_USER_ITERATIONS),
        };
        range(field.into(), self.workload_iterations.into(), limit.into())?;
        for (i, action) in self.actions.iter().enumerate() {
            range(format!("actions[{i}].busy"), action.busy.into(), MAX_BUSY_ITERATIONS.into())?;
            too_many("faults in one action", action.faults.len(), 8)?;
        }
        for (i, injection) in self.injections.iter().enumerate() {
            match injection {
                Injection::After(n) => {
                    range(format!("injections[{i}].after"), *n, SCHEDULE_MAX_DELAY)?
                }
                Injection::At(p) => {
                    range(format!("injections[{i}].at.extra"), p.extra, SCHEDULE_MAX_DELAY)?;
                    range(
                        format!("injections[{i}].at.occurrence"),
                        p.occurrence.into(),
                        MAX_OCCURRENCE.into(),
                    )?;
                    if p.occurrence == 0 {
                        return Err(Problem::OutOfRange {
                            field: format!("injections[{i}].at.occurrence (counts from 1)"),
                            value: 0,
                            limit: MAX_OCCURRENCE.into(),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// The entry variant.
    pub fn variant(&self) -> Result<Variant, Problem> {
        Variant::from_name(&self.variant)
            .ok_or_else(|| Problem::UnknownVariant(self.variant.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::schedule::test_support::parse;

    #[test]
    fn too_many_injections_are_refused_without_running() {
        let many = vec![r#"{"after":1}"#; SCHEDULE_MAX_INJECTIONS + 1].join(",");
        let json = format!(r#"{{"format":1,"variant":"naive","injections":[{many}]}}"#);
        assert!(parse(&json).unwrap_err().contains("65 injections is too many"));
    }

    #[test]
    fn each_workload_has_its_own_length_limit() {
        let json = |workload: &str, iterations: u32| {
            format!(
                r#"{{"format":1,"variant":"naive","workload":"{workload}",
                    "workload_iterations":{iterations},"injections":[]}}"#
            )
        };
        assert!(parse(&json("loop", MAX_WORKLOAD_ITERATIONS)).is_ok());
        assert!(parse(&json("user", MAX_USER_ITERATIONS)).is_ok());
        let err = parse(&json("user", MAX_USER_ITERATIONS + 1)).unwrap_err();
        assert!(err.starts_with("test.json: "), "{err}");
        assert!(
            err.ends_with(&format!(
                "workload_iterations (user workload) = {} is out of range (limit {MAX_USER_ITERATIONS})",
                MAX_USER_ITERATIONS + 1
            )),
            "{err}"
        );
        let err = parse(&json("loop", MAX_WORKLOAD_ITERATIONS + 1)).unwrap_err();
        assert!(err.ends_with("workload_iterations = 2001 is out of range (limit 2000)"), "{err}");
    }
}
