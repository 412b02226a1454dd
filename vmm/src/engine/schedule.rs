//! The schedule: when NMIs arrive and what the guest's `do_nmi` does meanwhile. It is the
//! fuzzer's input and the reproducer format, JSON on disk.
//!
//! ```json
//! {
//!   "format": 1,
//!   "description": "second NMI right after the #UD handler's IRETQ re-opens NMIs",
//!   "variant": "naive",
//!   "workload_iterations": 100,
//!   "actions": [ { "busy": 3, "faults": ["ud"] } ],
//!   "injections": [ { "after": 40 }, { "at": { "symbol": "exception_common", "occurrence": 1 } } ],
//!   "origin": null
//! }
//! ```
//!
//! Every enum is externally tagged and no field is skipped when serializing, so the same types
//! travel through postcard inside LibAFL.

use std::fmt;
use std::path::{Path, PathBuf};

use nmifuzz_abi::{Action, MAX_ACTIONS, Script, Variant, Workload, fault};
use serde::{Deserialize, Serialize};

use crate::image::GuestImage;

/// The current schedule format; files with another one are refused.
pub const SCHEDULE_FORMAT: u32 = 1;

/// Most injections in one schedule.
pub const MAX_INJECTIONS: usize = 64;
/// Largest `after` delay and `extra` count, in instructions: far beyond any run's budget.
pub const MAX_DELAY: u64 = 10_000_000;
/// Largest `occurrence` of a symbolic point.
pub const MAX_OCCURRENCE: u32 = 1_000_000;
/// Largest busy-work count of one action (two instructions each).
pub const MAX_BUSY: u32 = 2_000;
/// Largest workload length: runs stay in the milliseconds.
pub const MAX_WORKLOAD_ITERATIONS: u32 = 2_000;
/// Largest schedule file read; anything bigger is refused before parsing.
pub const MAX_FILE_SIZE: u64 = 1 << 20;

/// A schedule, as written on disk.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// [`SCHEDULE_FORMAT`].
    pub format: u32,
    /// What the schedule shows, for people.
    #[serde(default)]
    pub description: String,
    /// The NMI entry variant (`nmifuzz variants` lists them).
    pub variant: String,
    /// Iterations of the workload loop the NMIs interrupt (0: the guest's default).
    #[serde(default)]
    pub workload_iterations: u32,
    /// The `linux`-derived entries' stress mode (`nmifuzz_abi::option::STRESS_UNMASK`): NMIs
    /// unmasked right after `first_nmi`, as Linux's CONFIG_DEBUG_ENTRY does.
    #[serde(default)]
    pub stress_unmask: bool,
    /// `actions[i]` is what the i-th `do_nmi` call does; later calls return at once.
    #[serde(default)]
    pub actions: Vec<HandlerAction>,
    /// The NMIs, in order.
    pub injections: Vec<Injection>,
    /// Where the schedule came from, recorded in artifacts.
    #[serde(default)]
    pub origin: Option<Origin>,
}

/// What one `do_nmi` call does.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandlerAction {
    /// Iterations of busy work.
    #[serde(default)]
    pub busy: u32,
    /// Exceptions raised after the busy work, in this order.
    #[serde(default)]
    pub faults: Vec<Fault>,
}

/// An exception `do_nmi` raises on purpose; its IRETQ re-opens NMIs inside the handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// `ud2`: #UD on the current stack.
    Ud,
    /// A write to a demand-mapped page: #PF on the current stack, which maps it.
    Pf,
    /// `int3`: #BP, on the current stack while `do_nmi` runs.
    Bp,
}

impl Fault {
    /// Every fault, in the order `do_nmi` raises them.
    pub const ALL: &'static [Fault] = &[Fault::Ud, Fault::Pf, Fault::Bp];

    fn bit(self) -> u32 {
        match self {
            Self::Ud => fault::UD,
            Self::Pf => fault::PF,
            Self::Bp => fault::BP,
        }
    }
}

/// When one NMI arrives.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Injection {
    /// This many guest instructions after the previous injection (the first: after the start
    /// of the run). 0 means at the same boundary as the previous one.
    After(u64),
    /// At a symbolic point of the guest code.
    At(Point),
}

/// A place in the guest code, reached for the n-th time, plus a few instructions.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Point {
    /// A guest symbol.
    pub symbol: String,
    /// Bytes into the symbol.
    #[serde(default)]
    pub offset: u64,
    /// Which time the address is reached, counting from 1 (from the previous injection).
    #[serde(default = "first")]
    pub occurrence: u32,
    /// Instructions to run after reaching it before the NMI arrives.
    #[serde(default)]
    pub extra: u64,
}

fn first() -> u32 {
    1
}

/// Provenance of an artifact: replay warns when the guest or the host differs.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Origin {
    /// [`GuestImage::hash`] of the guest it was found with, in hex.
    pub guest_hash: String,
    /// The host profile's one-line summary.
    pub host_profile: String,
}

/// A schedule that cannot be used, with the file it came from.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    /// The file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is larger than any schedule.
    #[error("{path}: {size} bytes is too large for a schedule (limit {MAX_FILE_SIZE})")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// Not valid JSON, or not the schedule's shape.
    #[error("{path}: not a valid schedule: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The JSON error, with line and column.
        #[source]
        source: serde_json::Error,
    },
    /// Parsed, but a value is unusable.
    #[error("{path}: {problem}")]
    Invalid {
        /// The file (or `<input>`).
        path: PathBuf,
        /// What is wrong.
        problem: Problem,
    },
}

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
    /// Reads, parses and validates a schedule file.
    pub fn load(path: &Path) -> Result<Self, ScheduleError> {
        let read = |source| ScheduleError::Read { path: path.to_owned(), source };
        let size = std::fs::metadata(path).map_err(read)?.len();
        if size > MAX_FILE_SIZE {
            return Err(ScheduleError::TooLarge { path: path.to_owned(), size });
        }
        let text = std::fs::read(path).map_err(read)?;
        Self::from_json(&text, path)
    }

    /// Parses and validates JSON; `path` names the source in errors.
    pub fn from_json(text: &[u8], path: &Path) -> Result<Self, ScheduleError> {
        let schedule: Self = serde_json::from_slice(text)
            .map_err(|source| ScheduleError::Parse { path: path.to_owned(), source })?;
        schedule
            .validate()
            .map_err(|problem| ScheduleError::Invalid { path: path.to_owned(), problem })?;
        Ok(schedule)
    }

    /// Pretty JSON, as written to disk.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("schedules always serialize")
    }

    /// Checks every field against its limits (symbols are checked by [`Schedule::resolve`]).
    pub fn validate(&self) -> Result<(), Problem> {
        if self.format != SCHEDULE_FORMAT {
            return Err(Problem::Format(self.format));
        }
        self.variant()?;
        let too_many = |what, count, limit| {
            if count > limit { Err(Problem::TooMany { what, count, limit }) } else { Ok(()) }
        };
        too_many("injections", self.injections.len(), MAX_INJECTIONS)?;
        too_many("actions", self.actions.len(), MAX_ACTIONS)?;
        let range = |field: String, value: u64, limit: u64| {
            if value > limit { Err(Problem::OutOfRange { field, value, limit }) } else { Ok(()) }
        };
        range(
            "workload_iterations".into(),
            self.workload_iterations.into(),
            MAX_WORKLOAD_ITERATIONS.into(),
        )?;
        for (i, action) in self.actions.iter().enumerate() {
            range(format!("actions[{i}].busy"), action.busy.into(), MAX_BUSY.into())?;
            too_many("faults in one action", action.faults.len(), 8)?;
        }
        for (i, injection) in self.injections.iter().enumerate() {
            match injection {
                Injection::After(n) => range(format!("injections[{i}].after"), *n, MAX_DELAY)?,
                Injection::At(p) => {
                    range(format!("injections[{i}].at.extra"), p.extra, MAX_DELAY)?;
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

    /// The guest script of this schedule.
    pub fn script(&self) -> Result<Script, Problem> {
        let mut script = Script::new(self.variant()?, Workload::Loop, self.workload_iterations);
        if self.stress_unmask {
            script.options |= nmifuzz_abi::option::STRESS_UNMASK;
        }
        script.action_count = self.actions.len() as u32;
        for (slot, action) in script.actions.iter_mut().zip(&self.actions) {
            *slot = Action {
                busy: action.busy,
                faults: action.faults.iter().fold(0, |bits, f| bits | f.bit()),
            };
        }
        Ok(script)
    }

    /// Resolves symbols against `image` into the plan the engine executes.
    pub fn resolve(&self, image: &GuestImage) -> Result<Plan, Problem> {
        let script = self.script()?;
        let injections = self
            .injections
            .iter()
            .map(|injection| match injection {
                Injection::After(n) => Ok(Trigger::After(*n)),
                Injection::At(p) => {
                    let symbol = image
                        .symbols()
                        .iter()
                        .find(|s| s.name == p.symbol)
                        .ok_or_else(|| Problem::UnknownSymbol(p.symbol.clone()))?;
                    if symbol.size != 0 && p.offset >= symbol.size {
                        return Err(Problem::OffsetOutsideSymbol {
                            symbol: p.symbol.clone(),
                            offset: p.offset,
                            size: symbol.size,
                        });
                    }
                    Ok(Trigger::At {
                        address: symbol.address + p.offset,
                        occurrence: p.occurrence,
                        extra: p.extra,
                    })
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(Plan { script, injections })
    }
}

/// A schedule with its symbols resolved: what the engine executes.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Written into the guest before the run.
    pub script: Script,
    /// The NMIs, in order.
    pub injections: Vec<Trigger>,
}

/// When one NMI of a [`Plan`] arrives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// Instructions after the previous injection (or the start).
    After(u64),
    /// The `occurrence`-th time `address` is reached after the previous injection, plus
    /// `extra` instructions.
    At {
        /// Guest address.
        address: u64,
        /// Counting from 1.
        occurrence: u32,
        /// Instructions after reaching it.
        extra: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Schedule, String> {
        Schedule::from_json(json.as_bytes(), Path::new("test.json")).map_err(|e| e.to_string())
    }

    const MINIMAL: &str = r#"{"format": 1, "variant": "naive", "injections": [{"after": 5}]}"#;

    #[test]
    fn minimal_schedule_parses_with_defaults() {
        let s = parse(MINIMAL).unwrap();
        assert_eq!(s.injections, vec![Injection::After(5)]);
        assert!(s.actions.is_empty() && s.origin.is_none() && s.description.is_empty());
    }

    #[test]
    fn round_trips_through_json() {
        let mut s = parse(MINIMAL).unwrap();
        s.actions.push(HandlerAction { busy: 3, faults: vec![Fault::Ud] });
        s.injections.push(Injection::At(Point {
            symbol: "do_nmi".into(),
            offset: 4,
            occurrence: 2,
            extra: 1,
        }));
        assert_eq!(parse(&s.to_json()).unwrap(), s);
    }

    #[test]
    fn malformed_schedules_name_file_and_problem() {
        for (json, expected) in [
            ("{", "test.json: not a valid schedule"),
            (
                r#"{"format":1,"variant":"naive","injections":[],"bogus":1}"#,
                "unknown field `bogus`",
            ),
            (r#"{"format":2,"variant":"naive","injections":[]}"#, "format 2 is not supported"),
            (
                r#"{"format":1,"variant":"nope","injections":[]}"#,
                "valid variants: linux, early-clear, naive",
            ),
            (
                r#"{"format":1,"variant":"naive","injections":[{"after":99999999999}]}"#,
                "injections[0].after = 99999999999 is out of range",
            ),
            (
                r#"{"format":1,"variant":"naive","injections":[{"at":{"symbol":"x","occurrence":0}}]}"#,
                "counts from 1",
            ),
            (
                r#"{"format":1,"variant":"naive","injections":[{"sometime":1}]}"#,
                "unknown variant `sometime`",
            ),
            (r#"{"format":1,"variant":"naive","injections":[{"after":-1}]}"#, "invalid value"),
        ] {
            let err = parse(json).unwrap_err();
            assert!(err.contains(expected), "{json}: {err}");
            assert!(err.starts_with("test.json"), "{err}");
        }
    }

    #[test]
    fn too_many_injections_are_refused_without_running() {
        let many = vec![r#"{"after":1}"#; MAX_INJECTIONS + 1].join(",");
        let json = format!(r#"{{"format":1,"variant":"naive","injections":[{many}]}}"#);
        assert!(parse(&json).unwrap_err().contains("65 injections is too many"));
    }

    #[test]
    fn files_are_checked_before_parsing() {
        let dir =
            std::env::temp_dir().join(format!("nmifuzz-schedule-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.json");
        let err = Schedule::load(&missing).unwrap_err().to_string();
        assert!(
            err.starts_with(&missing.display().to_string()) && err.contains("cannot read"),
            "{err}"
        );
        // An absurdly large file is refused by its size, without reading it.
        let huge = dir.join("huge.json");
        std::fs::File::create(&huge).unwrap().set_len(MAX_FILE_SIZE + 1).unwrap();
        let err = Schedule::load(&huge).unwrap_err().to_string();
        assert!(err.contains("too large"), "{err}");
        let good = dir.join("good.json");
        std::fs::write(&good, MINIMAL).unwrap();
        assert_eq!(Schedule::load(&good).unwrap().injections.len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn symbols_resolve_against_the_guest() {
        let image = GuestImage::parse(crate::EMBEDDED_GUEST.to_vec(), 16 << 20).unwrap();
        let mut s = parse(MINIMAL).unwrap();
        s.injections = vec![Injection::At(Point {
            symbol: "do_nmi".into(),
            offset: 0,
            occurrence: 1,
            extra: 2,
        })];
        let plan = s.resolve(&image).unwrap();
        let address = image.symbol("do_nmi").unwrap();
        assert_eq!(plan.injections, vec![Trigger::At { address, occurrence: 1, extra: 2 }]);
        let Injection::At(point) = &mut s.injections[0] else { unreachable!() };
        point.symbol = "no_such_symbol".into();
        assert_eq!(s.resolve(&image).unwrap_err(), Problem::UnknownSymbol("no_such_symbol".into()));
        let Injection::At(point) = &mut s.injections[0] else { unreachable!() };
        point.symbol = "do_nmi".into();
        point.offset = 1 << 20;
        assert!(matches!(s.resolve(&image).unwrap_err(), Problem::OffsetOutsideSymbol { .. }));
    }

    #[test]
    fn script_carries_actions() {
        let mut s = parse(MINIMAL).unwrap();
        s.actions = vec![
            HandlerAction { busy: 7, faults: vec![Fault::Ud] },
            HandlerAction::default(),
            HandlerAction { busy: 0, faults: vec![Fault::Pf, Fault::Bp] },
        ];
        let script = s.script().unwrap();
        assert_eq!(script.action_count, 3);
        assert_eq!(script.actions[0], Action { busy: 7, faults: fault::UD });
        assert_eq!(script.actions[1], Action::default());
        assert_eq!(script.actions[2], Action { busy: 0, faults: fault::PF | fault::BP });
    }
}
