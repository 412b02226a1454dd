//! The schedule: when NMIs arrive and what the guest's `do_nmi` does meanwhile. It is the
//! fuzzer's input and the reproducer format, JSON on disk.
//!
//! ```json
//! {
//!   "format": 1,
//!   "description": "second NMI right after the #UD handler's IRETQ re-opens NMIs",
//!   "variant": "naive",
//!   "workload": "loop",
//!   "workload_iterations": 100,
//!   "actions": [ { "busy": 3, "faults": ["ud"] } ],
//!   "injections": [ { "after": 40 }, { "at": { "symbol": "exception_common", "occurrence": 1 } } ],
//!   "origin": null
//! }
//! ```
//!
//! One concern per file: `format.rs` (the types on disk and their JSON), `io.rs` (reading files,
//! with their errors), `limits.rs` (validation against the format's limits), `plan.rs` (symbol
//! resolution into what the engine executes) and `origin.rs` (artifact provenance).
//!
//! Every enum is externally tagged and postcard gets every field (JSON leaves out only the
//! default `workload`), so the same types travel through postcard inside LibAFL.

mod format;
mod io;
mod limits;
mod origin;
mod plan;

pub use self::format::{
    Fault, HandlerAction, Injection, Point, SCHEDULE_FORMAT, Schedule, UserFlag, Workload,
};
pub use self::io::{MAX_FILE_SIZE, ScheduleError};
pub use self::limits::{
    MAX_OCCURRENCE, MAX_USER_ITERATIONS, MAX_WORKLOAD_ITERATIONS, Problem, SCHEDULE_MAX_DELAY,
    SCHEDULE_MAX_INJECTIONS, variant_names,
};
pub use self::origin::Origin;
pub use self::plan::{Plan, Trigger};

/// Parsing helpers shared by the tests of the submodules.
#[cfg(test)]
mod test_support {
    use std::path::Path;

    use super::Schedule;

    /// Parses `json` as the file `test.json`; the error as its message.
    pub fn parse(json: &str) -> Result<Schedule, String> {
        Schedule::from_json(json.as_bytes(), Path::new("test.json")).map_err(|e| e.to_string())
    }

    /// The smallest valid schedule.
    pub const MINIMAL: &str = r#"{"format": 1, "variant": "naive", "injections": [{"after": 5}]}"#;
}
