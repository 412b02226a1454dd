//! Helpers shared by the end-to-end test binaries: the nmifuzz binary, scratch directories,
//! corpora, and checks of what is on disk.

// Each test binary uses a different part of these helpers.
#![allow(dead_code)]

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const SKIP_KVM: &str = "NMIFUZZ_SKIP_KVM_TESTS";

/// Whether to run a KVM test: panics if /dev/kvm is unusable and skipping was not asked for.
pub fn kvm() -> bool {
    if std::env::var_os(SKIP_KVM).is_some_and(|v| v == "1") {
        eprintln!("{SKIP_KVM}=1: skipping a test that needs /dev/kvm");
        return false;
    }
    if let Err(e) = fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        panic!(
            "this test needs a working /dev/kvm: {e}\n(set {SKIP_KVM}=1 to skip the KVM tests explicitly)"
        );
    }
    true
}

/// A loopback TCP port nothing listens on, for a campaign's LLMP broker.
pub fn free_port() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port().to_string()
}

/// A fresh, empty working directory for one test.
pub fn workdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nmifuzz-cli-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn nmifuzz(dir: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_nmifuzz"));
    command.current_dir(dir).args(args);
    command
}

pub fn run(dir: &Path, args: &[&str]) -> Output {
    let output = nmifuzz(dir, args).output().unwrap();
    eprintln!(
        "$ nmifuzz {}\n--- stdout\n{}--- stderr\n{}--- status {:?}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        output.status.code()
    );
    output
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A schedule without handler faults: its NMIs cannot nest.
pub const PASSING_SEED: &str = r#"{"format":1,"variant":"naive","actions":[{"busy":2,"faults":[]}],
    "injections":[{"after":60},{"after":30}]}"#;

pub fn passing_corpus(dir: &Path) -> PathBuf {
    let corpus = dir.join("corpus-dir");
    fs::create_dir_all(&corpus).unwrap();
    fs::write(corpus.join("seed.json"), PASSING_SEED).unwrap();
    corpus
}

/// `nmifuzz run` on [`passing_corpus`]: `naive` without faults, which that seed passes, then
/// `extra`.
pub fn passing_run<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["run", "corpus-dir", "--variant", "naive", "--faults", "none"];
    args.extend_from_slice(extra);
    args
}

/// The visible files of `dir`, each checked to be a whole schedule; fails on duplicates.
pub fn schedules_in(dir: &Path) -> Vec<PathBuf> {
    let mut contents = HashSet::new();
    let mut paths = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let text = fs::read_to_string(&path).unwrap();
        let value: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{}: not whole JSON: {e}", path.display()));
        let mut canonical = value.clone();
        canonical["description"] = serde_json::Value::Null;
        canonical["origin"] = serde_json::Value::Null;
        canonical["variant"] = serde_json::Value::Null;
        assert!(
            contents.insert(canonical.to_string()),
            "{} duplicates another entry",
            path.display()
        );
        paths.push(path);
    }
    paths.sort();
    paths
}

pub fn artifacts(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir.join("artifacts")) else { return Vec::new() };
    let mut paths: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("crash-"))
        .collect();
    paths.sort();
    paths
}

/// Waits until `dir` has at least `n` visible files or `limit` passes.
pub fn wait_for_entries(dir: &Path, n: usize, limit: Duration) {
    let start = Instant::now();
    while start.elapsed() < limit {
        let count = fs::read_dir(dir)
            .unwrap()
            .filter(|e| !e.as_ref().unwrap().file_name().to_string_lossy().starts_with('.'))
            .count();
        if count >= n {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{} never had {n} entries", dir.display());
}

/// `nmifuzz ARGS` in the background, its output captured.
pub fn spawn_quiet(dir: &Path, args: &[&str]) -> Child {
    nmifuzz(dir, args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
}

/// `nmifuzz ARGS` in the background in a process group of its own, its output captured: like
/// a terminal's foreground job, so that a signal to the group reaches the Launcher's clients.
pub fn spawn_group(dir: &Path, args: &[&str]) -> Child {
    use std::os::unix::process::CommandExt;
    nmifuzz(dir, args)
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Sends `signal` to the process group of a child made by [`spawn_group`].
pub fn signal_group(child: &Child, signal: i32) {
    // SAFETY: signals the process group of our own child; no memory is involved.
    assert_eq!(unsafe { libc::kill(-(child.id() as i32), signal) }, 0);
}

/// The live processes of process group `group` (from /proc/PID/stat).
pub fn processes_in_group(group: u32) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").unwrap() {
        let Ok(pid) = entry.unwrap().file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // After the command name in parentheses: state, ppid, pgrp, ...
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 1..].split_whitespace().collect();
        if fields[2] == group.to_string() && fields[0] != "Z" {
            pids.push(pid);
        }
    }
    pids
}

/// The System V shared-memory segments (shmid) made by any of `pids`, from
/// /proc/sysvipc/shm: only these, since other programs on the machine have their own.
pub fn segments_made_by(pids: &[u32]) -> Vec<String> {
    let table = fs::read_to_string("/proc/sysvipc/shm").unwrap();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let creator: u32 = fields[4].parse().unwrap(); // key shmid perms size cpid ...
            pids.contains(&creator).then(|| fields[1].to_owned())
        })
        .collect()
}

/// A small deterministic random number generator (xorshift64*), for reproducible delays.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    /// A number in `range`.
    pub fn below(&mut self, range: std::ops::Range<u64>) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        range.start + self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % (range.end - range.start)
    }
}
