//! Reading schedule files: size first, then JSON, then the format's limits; every error names
//! the file.

use std::path::{Path, PathBuf};

use super::{Problem, Schedule};

/// Largest schedule file read; anything bigger is refused before parsing.
pub const MAX_FILE_SIZE: u64 = 1 << 20;

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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::schedule::test_support::{MINIMAL, parse};

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
                "valid variants: linux, cve-2015-3290, cve-2015-3291, cve-2015-5157, early-clear",
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
}
