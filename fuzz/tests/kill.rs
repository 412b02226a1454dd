//! SIGKILL at random moments during `run`, `cmin --in-place` and `tmin`: no torn or lost
//! file, no temporary file that outlives the next command, and the next command works.
//! The delays come from a fixed seed, so a failure replays. They need /dev/kvm (see
//! `common::kvm`).

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use common::*;

/// Kills per command.
const KILLS: usize = 20;
/// Seed of the kill delays.
const DELAY_SEED: u64 = 0x6b11_1013;

/// Starts `nmifuzz ARGS`, SIGKILLs it after `delay`, and returns what it printed until then.
fn kill_after(dir: &Path, args: &[&str], delay: Duration) -> Output {
    let mut child = spawn_quiet(dir, args);
    std::thread::sleep(delay);
    // SIGKILL. One that has already exited is a zombie until waited for: no error either.
    child.kill().unwrap();
    child.wait_with_output().unwrap()
}

/// How long `nmifuzz ARGS` takes to complete, and its output: the range of kill delays.
fn timed(dir: &Path, args: &[&str]) -> (Duration, Output) {
    let started = Instant::now();
    let o = run(dir, args);
    (started.elapsed(), o)
}

/// The temporary files (hidden `*.tmp`) in `dir`.
fn temporary_files(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with('.') && name.ends_with(".tmp")
        })
        .collect()
}

/// Every visible file of `dir` by name, with its bytes.
fn contents(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    schedules_in(dir)
        .into_iter()
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), fs::read(&p).unwrap()))
        .collect()
}

#[test]
fn sigkill_during_run_loses_no_entry_and_the_next_run_resumes() {
    if !kvm() {
        return;
    }
    let dir = workdir("kill-run");
    let corpus = passing_corpus(&dir);
    let mut rng = Rng::new(DELAY_SEED);
    let mut entries = schedules_in(&corpus);
    let mut torn_writes = 0; // kills between writing a temporary file and renaming it
    for kill in 0..KILLS {
        let delay = Duration::from_millis(rng.below(50..1500));
        let o = kill_after(&dir, &passing_run(&["--max-total-time", "60"]), delay);
        // That run loaded what the one before it left: every file whole.
        assert!(!stderr(&o).contains("WARNING"), "kill {kill}: {}", stderr(&o));
        let now = schedules_in(&corpus); // every file parses, none duplicates another
        assert!(
            entries.iter().all(|p| now.contains(p)),
            "kill {kill} after {delay:?} lost entries"
        );
        entries = now;
        torn_writes += temporary_files(&corpus).len();
    }
    eprintln!("{} entries after {KILLS} kills, {torn_writes} left mid-write", entries.len());
    // The next run resumes on all of them and cleans up what the killed runs left half-done.
    let o = run(&dir, &passing_run(&["--runs", "5"]));
    assert_eq!(o.status.code(), Some(0));
    assert!(!stderr(&o).contains("WARNING"), "{}", stderr(&o));
    assert!(stdout(&o).contains(&format!("INFO: {} seeds from corpus-dir", entries.len())));
    assert_eq!(temporary_files(&corpus), Vec::<PathBuf>::new());
    assert_eq!(temporary_files(&dir.join("artifacts")), Vec::<PathBuf>::new());
    fs::remove_dir_all(dir).unwrap();
}

/// `cmin`'s report: the entries it would remove and the edges the corpus covers.
fn cmin_plan(dir: &Path) -> (Vec<String>, String) {
    let o = run(dir, &["cmin", "corpus-dir"]);
    assert_eq!(o.status.code(), Some(0));
    let out = stdout(&o);
    let removed = out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("would remove corpus-dir/"))
        .map(str::to_owned)
        .collect();
    let edges = out.lines().find(|l| l.contains(" edges")).unwrap();
    (removed, edges.rsplit("covering ").next().unwrap().to_owned())
}

#[test]
fn sigkill_during_cmin_in_place_keeps_the_cover_whole() {
    if !kvm() {
        return;
    }
    let dir = workdir("kill-cmin");
    let corpus = passing_corpus(&dir);
    let o = run(&dir, &passing_run(&["--runs", "80", "--seed", "2"]));
    assert_eq!(o.status.code(), Some(0));
    let original = contents(&corpus);
    let (removed, edges) = cmin_plan(&dir);
    assert!(!removed.is_empty(), "the corpus has entries to remove");
    let (full_run, _) = timed(&dir, &["cmin", "corpus-dir"]);
    let mut rng = Rng::new(DELAY_SEED);
    for kill in 0..KILLS {
        // The whole corpus again, then cmin killed somewhere in its run.
        for (name, bytes) in &original {
            fs::write(corpus.join(name), bytes).unwrap();
        }
        let delay = Duration::from_millis(rng.below(0..full_run.as_millis() as u64 + 50));
        kill_after(&dir, &["cmin", "corpus-dir", "--in-place"], delay);
        // Left: the kept entries, all of them, and some of the others, each unchanged.
        let left = contents(&corpus);
        for (name, bytes) in &left {
            assert_eq!(Some(bytes), original.get(name), "kill {kill}: {name} changed");
        }
        for name in original.keys().filter(|n| !removed.contains(n)) {
            assert!(left.contains_key(name), "kill {kill} after {delay:?}: lost kept {name}");
        }
        assert_eq!(temporary_files(&corpus), Vec::<PathBuf>::new());
    }
    // Finished: exactly the kept entries, covering what the whole corpus covered.
    let o = run(&dir, &["cmin", "corpus-dir", "--in-place"]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(contents(&corpus).len(), original.len() - removed.len());
    let (none, edges_after) = cmin_plan(&dir);
    assert_eq!((none.len(), edges_after), (0, edges));
    let o = run(&dir, &passing_run(&["--runs", "5"]));
    assert_eq!(o.status.code(), Some(0));
    assert!(!stderr(&o).contains("WARNING"), "{}", stderr(&o));
    fs::remove_dir_all(dir).unwrap();
}

/// Crashes the naive variant (faults let a second NMI nest) and has plenty to minimize.
const CRASHING: &str = r#"{"format":1,"variant":"naive","actions":[{"busy":3,"faults":["ud"]},
    {"busy":5,"faults":["pf","bp"]},{"busy":1,"faults":[]}],"injections":[{"after":60},
    {"after":30},{"after":5},{"after":17},{"after":40},{"after":2},{"after":90},{"after":11}]}"#;

#[test]
fn sigkill_during_tmin_leaves_no_torn_output() {
    if !kvm() {
        return;
    }
    let dir = workdir("kill-tmin");
    fs::write(dir.join("crash.json"), CRASHING).unwrap();
    let tmin = ["tmin", "crash.json", "--output", "min"];
    let (full_run, o) = timed(&dir, &tmin);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let expected = contents(&dir.join("min"));
    assert_eq!(expected.len(), 1, "{expected:?}");
    fs::remove_dir_all(dir.join("min")).unwrap();
    let mut rng = Rng::new(DELAY_SEED);
    for kill in 0..KILLS {
        let delay = Duration::from_millis(rng.below(0..full_run.as_millis() as u64 + 50));
        kill_after(&dir, &tmin, delay);
        // Nothing yet, or the whole reproducer (tmin is deterministic).
        let Ok(_) = fs::metadata(dir.join("min")) else { continue };
        let written = contents(&dir.join("min"));
        assert!(written.is_empty() || written == expected, "kill {kill} after {delay:?}");
    }
    // A complete tmin afterwards leaves only its reproducer.
    let o = run(&dir, &tmin);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(contents(&dir.join("min")), expected);
    assert_eq!(temporary_files(&dir.join("min")), Vec::<PathBuf>::new());
    fs::remove_dir_all(dir).unwrap();
}
