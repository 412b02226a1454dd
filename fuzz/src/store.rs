//! Files on disk: atomic writes, the names of corpus entries and artifacts, and reading a
//! corpus directory that may contain junk.
//!
//! Every file nmifuzz writes appears whole or not at all: it is written to a hidden temporary
//! file in the same directory and renamed (or hard-linked, for "create only if absent") into
//! place, so a campaign killed with SIGKILL never leaves a half-written schedule behind, and
//! the temporary files are dot-files that corpus loading skips. A process killed between
//! writing and renaming leaves its temporary file behind; [`remove_stale_temps`] removes
//! those of dead processes when a command starts on the directory.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail};
use vmm::engine::schedule::Schedule;
use vmm::hash::fnv1a;

/// Writes `bytes` to `path` atomically, replacing any file there.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let temp = temp_path(path);
    write_temp(&temp, bytes)?;
    fs::rename(&temp, path).inspect_err(|_| {
        let _ = fs::remove_file(&temp);
    })
}

/// Writes `bytes` to `path` atomically unless a file is already there; returns whether it
/// wrote. Two processes racing for the same name leave exactly one complete file.
pub fn write_new_atomic(path: &Path, bytes: &[u8]) -> io::Result<bool> {
    let temp = temp_path(path);
    write_temp(&temp, bytes)?;
    // link(2) fails with EEXIST instead of replacing: an atomic "create if absent".
    let linked = fs::hard_link(&temp, path);
    let _ = fs::remove_file(&temp);
    match linked {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

fn write_temp(temp: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = fs::File::create(temp)?;
    file.write_all(bytes)?;
    file.sync_data()?;
    Ok(())
}

/// A hidden, per-process, per-call unique name next to `path`.
fn temp_path(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let unique = COUNTER.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}.{}.{unique}.tmp", std::process::id()))
}

/// Removes from `dir` the temporary files of writers that are no longer running (killed
/// between writing and renaming); returns how many. A live writer's files are kept.
pub fn remove_stale_temps(dir: &Path) -> io::Result<usize> {
    let mut removed = 0;
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if temp_writer(&name).is_some_and(|pid| !running(pid)) {
            fs::remove_file(&path)?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// The writer's PID if `name` is one of [`temp_path`]'s names: `.{name}.{pid}.{n}.tmp`.
fn temp_writer(name: &str) -> Option<i32> {
    let rest = name.strip_prefix('.')?.strip_suffix(".tmp")?;
    let mut parts = rest.rsplitn(3, '.');
    let (_n, pid) = (parts.next()?.parse::<u64>().ok()?, parts.next()?.parse().ok()?);
    parts.next().map(|_| pid)
}

/// Whether process `pid` exists.
fn running(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists; nothing is sent.
    let alive = unsafe { libc::kill(pid, 0) } == 0;
    alive || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Identifies what a schedule does: its JSON without the description, the origin and the
/// variant (fixed per campaign), so that a seed written for another variant, or re-described,
/// is not saved again.
pub fn content_hash(schedule: &Schedule) -> u64 {
    let mut canonical = schedule.clone();
    canonical.description.clear();
    canonical.origin = None;
    canonical.variant.clear();
    fnv1a(serde_json::to_string(&canonical).expect("schedules serialize").as_bytes())
}

/// The file name of a corpus entry: `<content hash>.json`.
pub fn corpus_name(schedule: &Schedule) -> String {
    format!("{:016x}.json", content_hash(schedule))
}

/// The file name of an artifact: `crash-<verdict kind>-<hash of the finding's key>.json`
/// (its `Verdict::signature`): one file per distinct finding.
pub fn artifact_name(kind: &str, key: &str) -> String {
    format!("crash-{kind}-{:016x}.json", fnv1a(key.as_bytes()))
}

/// Saves `schedule`, on which the fast mode said `fast` and the stepped engine `stepped` (each
/// a one-line summary), into `dir` as `disagreement-<content hash>.json` (atomically; once per
/// schedule), with both in its description, and returns the one line that reports it: the two
/// modes must agree (docs/engine.md), so every disagreement is a defect to look at, and a line
/// holding the whole schedule helps nobody read a campaign's log.
pub fn record_disagreement(dir: &Path, schedule: &Schedule, fast: &str, stepped: &str) -> String {
    let path = dir.join(format!("disagreement-{:016x}.json", content_hash(schedule)));
    let described = Schedule {
        description: format!("the fast mode: {fast}; the stepped engine: {stepped}"),
        ..schedule.clone()
    };
    let saved = fs::create_dir_all(dir)
        .and_then(|()| write_new_atomic(&path, described.to_json().as_bytes()));
    let whereto = match saved {
        Ok(_) => format!("schedule in {}", path.display()),
        Err(e) => format!("the schedule could not be saved to {}: {e}", path.display()),
    };
    format!(
        "the fast mode and the stepped engine disagree: fast `{fast}`, stepped `{stepped}`; {whereto}"
    )
}

/// A corpus directory's valid schedules, and a warning for each file that is not one.
pub struct LoadedDir {
    /// The schedules, in file name order.
    pub entries: Vec<(PathBuf, Schedule)>,
    /// One line per skipped file, naming it and saying why.
    pub warnings: Vec<String>,
}

/// Reads every schedule in `dir` (not recursively). Dot-files (temporary files) are ignored;
/// anything else that is not a valid schedule is skipped with a warning. A missing or
/// unreadable directory is an error naming it.
pub fn load_dir(dir: &Path) -> Result<LoadedDir> {
    let metadata = fs::metadata(dir)
        .with_context(|| format!("corpus directory {}: cannot read it", dir.display()))?;
    if !metadata.is_dir() {
        bail!("corpus directory {}: not a directory", dir.display());
    }
    let mut paths = Vec::new();
    for entry in fs::read_dir(dir)
        .with_context(|| format!("corpus directory {}: cannot list it", dir.display()))?
    {
        let entry =
            entry.with_context(|| format!("corpus directory {}: cannot list it", dir.display()))?;
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        paths.push(entry.path());
    }
    paths.sort();
    let mut loaded = LoadedDir { entries: Vec::new(), warnings: Vec::new() };
    for path in paths {
        if path.is_dir() {
            loaded.warnings.push(format!("skipping {}: a directory", path.display()));
            continue;
        }
        match Schedule::load(&path) {
            Ok(schedule) => loaded.entries.push((path, schedule)),
            // The error names the file and says what is wrong with it.
            Err(e) => loaded.warnings.push(format!("skipping {e}")),
        }
    }
    Ok(loaded)
}

/// Makes `dir` ready for writing: creates it (and its parents) if needed and removes the
/// temporary files of dead writers; names it on failure.
pub fn prepare_dir(dir: &Path) -> Result<()> {
    ensure_dir(dir)?;
    remove_stale_temps(dir).with_context(|| format!("cannot clean up {}", dir.display()))?;
    Ok(())
}

/// Creates `dir` (and its parents) if needed, naming it on failure.
pub fn ensure_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create directory {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("nmifuzz-store-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn visible_files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporary_file() {
        let dir = scratch("replace");
        let path = dir.join("a.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(visible_files(&dir), vec!["a.json"]);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn write_new_keeps_the_first_file() {
        let dir = scratch("new");
        let path = dir.join("crash-x.json");
        assert!(write_new_atomic(&path, b"first").unwrap());
        assert!(!write_new_atomic(&path, b"second").unwrap());
        assert_eq!(fs::read(&path).unwrap(), b"first");
        assert_eq!(visible_files(&dir), vec!["crash-x.json"]);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn concurrent_writers_of_one_name_leave_one_whole_file() {
        let dir = scratch("race");
        let path = dir.join("same.json");
        let big = vec![b'x'; 1 << 16];
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..20 {
                        write_atomic(&path, &big).unwrap();
                        write_new_atomic(&path, &big).unwrap();
                    }
                });
            }
        });
        assert_eq!(fs::read(&path).unwrap(), big);
        assert_eq!(visible_files(&dir), vec!["same.json"]);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn stale_temporary_files_of_dead_writers_are_removed() {
        let dir = scratch("stale");
        // A child that exits at once: its PID is dead (and, in this short test, not reused).
        let mut dead = std::process::Command::new("true").spawn().unwrap();
        let dead_pid = dead.id();
        dead.wait().unwrap();
        let ours = temp_path(&dir.join("a.json"));
        fs::write(&ours, b"in progress").unwrap();
        let stale = dir.join(format!(".b.json.{dead_pid}.0.tmp"));
        fs::write(&stale, b"torn").unwrap();
        fs::write(dir.join(".notes"), b"not ours").unwrap();
        assert_eq!(remove_stale_temps(&dir).unwrap(), 1);
        assert!(ours.exists() && !stale.exists() && dir.join(".notes").exists());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn content_hash_ignores_description_origin_and_variant() {
        let a = Schedule::from_json(
            br#"{"format":1,"variant":"naive","injections":[{"after":3}]}"#,
            Path::new("a"),
        )
        .unwrap();
        let mut b = a.clone();
        b.description = "re-described".into();
        b.variant = "linux".into();
        assert_eq!(content_hash(&a), content_hash(&b));
        assert_eq!(corpus_name(&a), corpus_name(&b));
        b.injections.push(vmm::engine::schedule::Injection::After(1));
        assert_ne!(content_hash(&a), content_hash(&b));
    }

    #[test]
    fn load_dir_skips_junk_with_a_warning_naming_each_file() {
        let dir = scratch("junk");
        fs::write(dir.join("good.json"), br#"{"format":1,"variant":"naive","injections":[]}"#)
            .unwrap();
        fs::write(dir.join("notes.txt"), b"hello").unwrap();
        fs::write(dir.join("bad.json"), br#"{"format":1,"variant":"naive"}"#).unwrap();
        fs::write(dir.join(".hidden.tmp"), b"partial").unwrap();
        let loaded = load_dir(&dir).unwrap();
        assert_eq!(loaded.entries.len(), 1);
        assert_eq!(loaded.warnings.len(), 2, "{:?}", loaded.warnings);
        assert!(loaded.warnings[0].contains("bad.json"));
        assert!(loaded.warnings[1].contains("notes.txt"));
        fs::remove_dir_all(&dir).unwrap();
        let err = load_dir(&dir).err().unwrap();
        assert!(format!("{err:#}").contains(&dir.display().to_string()));
    }
}
