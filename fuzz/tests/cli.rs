//! End-to-end tests of `nmifuzz run`, `replay`, `tmin`, `cmin`, `smoke` and `bench` through
//! the real binary and the real /dev/kvm. They fail when /dev/kvm is missing unless
//! NMIFUZZ_SKIP_KVM_TESTS=1 is set.
//!
//! `naive` dies from nested NMIs, which need a handler fault whose IRETQ re-opens NMIs, so on
//! `naive` `--faults none` with fault-free seeds is a passing configuration.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

fn replay_kind(dir: &Path, file: &Path) -> (Option<i32>, String) {
    let o = run(dir, &["replay", "--json", file.to_str().unwrap()]);
    let json: serde_json::Value = serde_json::from_str(stdout(&o).lines().next().unwrap()).unwrap();
    (o.status.code(), json["verdict"].as_str().unwrap().to_owned())
}

#[test]
fn campaign_finds_the_naive_crash_then_replay_and_tmin_reproduce_it() {
    if !kvm() {
        return;
    }
    let dir = workdir("crash");
    fs::create_dir_all(dir.join("corpus-dir")).unwrap();
    let started = Instant::now();
    let o = run(
        &dir,
        &["run", "corpus-dir", "--variant", "naive", "--max-total-time", "120", "--seed", "7"],
    );
    assert_eq!(o.status.code(), Some(1), "a crash exits 1");
    assert!(started.elapsed() < Duration::from_secs(100), "it stops at the first crash");
    let out = stdout(&o);
    // (the first generated input may already crash: no NEW line is required here)
    assert!(out.contains(" INITED cov: ") && out.contains(" DONE cov: "), "{out}");
    assert!(stderr(&o).contains("Test unit written to artifacts/crash-"));
    let found = artifacts(&dir);
    assert_eq!(found.len(), 1, "{found:?}");
    let artifact = &found[0];
    let name = artifact.file_name().unwrap().to_string_lossy().into_owned();
    let text = fs::read_to_string(artifact).unwrap();
    assert!(text.contains("\"guest_hash\""), "origin is recorded: {text}");

    // replay gives the verdict kind the file name carries
    let (code, kind) = replay_kind(&dir, artifact);
    assert_eq!(code, Some(1));
    assert!(name.starts_with(&format!("crash-{kind}-")), "{name} vs {kind}");

    // tmin keeps the verdict and makes the schedule no larger
    let o = run(&dir, &["tmin", artifact.to_str().unwrap(), "--output", "min"]);
    assert_eq!(o.status.code(), Some(0));
    let minimized: Vec<PathBuf> =
        fs::read_dir(dir.join("min")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(minimized.len(), 1, "{minimized:?}");
    assert!(minimized[0].file_name().unwrap().to_string_lossy().starts_with("minimized-"));
    let (code, min_kind) = replay_kind(&dir, &minimized[0]);
    assert_eq!((code, min_kind), (Some(1), kind));
    let count = |p: &Path| {
        let v: serde_json::Value = serde_json::from_str(&fs::read_to_string(p).unwrap()).unwrap();
        (v["injections"].as_array().unwrap().len(), v["actions"].as_array().unwrap().len())
    };
    let (before, after) = (count(artifact), count(&minimized[0]));
    assert!(after.0 <= before.0 && after.1 <= before.1, "{before:?} -> {after:?}");
    assert!(stdout(&o).contains("before: ") && stdout(&o).contains("after: "));

    // tmin of a passing schedule is refused
    fs::write(dir.join("pass.json"), PASSING_SEED).unwrap();
    let o = run(&dir, &["tmin", "pass.json"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("does not end in a finding"));
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn passing_campaign_exits_zero_resumes_without_duplicates_and_cmin_keeps_coverage() {
    if !kvm() {
        return;
    }
    let dir = workdir("pass");
    let corpus = passing_corpus(&dir);
    let args = [
        "run",
        "corpus-dir",
        "--variant",
        "naive",
        "--faults",
        "none",
        "--runs",
        "60",
        "--seed",
        "3",
    ];
    let o = run(&dir, &args);
    assert_eq!(o.status.code(), Some(0), "nothing found exits 0");
    assert!(stdout(&o).contains("#60 DONE cov: "), "--runs is exact");
    assert!(stdout(&o).lines().any(|l| l.starts_with('#') && l.contains(" NEW cov: ")));
    assert!(artifacts(&dir).is_empty());
    let first = schedules_in(&corpus);
    assert!(first.len() > 1, "the campaign wrote new entries: {first:?}");
    assert!(first.contains(&corpus.join("seed.json")), "seeds stay");

    // The same campaign again: every entry is kept, none is written twice.
    let o = run(&dir, &args);
    assert_eq!(o.status.code(), Some(0));
    let second = schedules_in(&corpus);
    assert!(first.iter().all(|p| second.contains(p)), "nothing lost");

    // cmin: fewer (or as many) entries, same coverage, source untouched without --in-place.
    let o = run(&dir, &["cmin", "corpus-dir", "--output", "min"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).contains("cmin: kept "));
    let kept = schedules_in(&dir.join("min"));
    assert!(!kept.is_empty() && kept.len() <= second.len());
    assert_eq!(schedules_in(&corpus), second, "--output leaves the corpus as it was");
    let o = run(&dir, &["cmin", "min"]);
    assert!(stdout(&o).contains(&format!(
        "kept {} of {} entries, removed 0",
        kept.len(),
        kept.len()
    )));
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn sigint_and_sigkill_mid_campaign_leave_a_corpus_that_resumes() {
    if !kvm() {
        return;
    }
    let dir = workdir("kill");
    let corpus = passing_corpus(&dir);
    let args = passing_run(&["--max-total-time", "100"]);

    // SIGINT: stops after the current execution, prints the summary, exits 72 (libFuzzer's).
    let child = spawn_quiet(&dir, &args);
    wait_for_entries(&corpus, 4, Duration::from_secs(60));
    // SAFETY: signals the child spawned above.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(72), "{}", stderr(&o));
    assert!(stdout(&o).contains("run interrupted") && stdout(&o).contains(" DONE cov: "));
    let after_int = schedules_in(&corpus);

    // SIGKILL: no chance to clean up; only whole files are left.
    let mut child = spawn_quiet(&dir, &args);
    wait_for_entries(&corpus, after_int.len() + 2, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(300));
    child.kill().unwrap();
    child.wait().unwrap();
    let after_kill = schedules_in(&corpus);
    assert!(after_int.iter().all(|p| after_kill.contains(p)));

    // Resume: loads everything (no junk warnings: no partial file), adds no duplicate.
    let o = run(&dir, &passing_run(&["--runs", "5"]));
    assert_eq!(o.status.code(), Some(0));
    assert!(!stderr(&o).contains("WARNING"), "{}", stderr(&o));
    assert!(stdout(&o).contains(&format!("INFO: {} seeds from corpus-dir", after_kill.len())));
    let resumed = schedules_in(&corpus);
    assert!(after_kill.iter().all(|p| resumed.contains(p)));
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn two_cores_run_two_clients_that_share_inputs() {
    if !kvm() {
        return;
    }
    let dir = workdir("cores");
    passing_corpus(&dir);
    let port = free_port();
    let args = ["--cores", "2", "--broker-port", &port, "--max-total-time", "20", "--seed", "5"];
    let o = run(&dir, &passing_run(&args));
    assert_eq!(o.status.code(), Some(0));
    let out = stdout(&o);
    let executions = |client: &str| -> u64 {
        let line =
            out.lines().find(|l| l.trim_start().starts_with(&format!("client {client}:"))).unwrap();
        line.split_whitespace().nth(2).unwrap().parse().unwrap()
    };
    assert!(executions("1") > 0 && executions("2") > 0, "both clients executed");
    let shared_line = out.lines().find(|l| l.contains("inputs shared between clients:")).unwrap();
    let shared: u64 = shared_line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(shared > 0, "{shared_line}");
    // The one seed is evaluated once, by the first client.
    assert!(out.contains("(client 1, 1 of 1 seeds)") && out.contains("(client 2, 0 of 1 seeds)"));
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_linux_campaign_with_every_fault_finds_nothing_and_exits_zero() {
    if !kvm() {
        return;
    }
    let dir = workdir("linux");
    // From the generator (no ./corpus in the scratch directory), all faults, 30 seconds.
    let o = run(&dir, &["run", "--variant", "linux", "--max-total-time", "30", "--seed", "5"]);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains(" DONE cov: "), "{}", stdout(&o));
    assert!(artifacts(&dir).is_empty());
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_inputs_are_named() {
    if !kvm() {
        return;
    }
    let dir = workdir("bad");
    let o = run(&dir, &["run", "no-such-dir", "--variant", "naive"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("no-such-dir"), "{}", stderr(&o));

    let o = run(&dir, &["run", "--variant", "bogus"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains(
        "unknown variant `bogus`; valid variants: linux, cve-2015-3290, cve-2015-3291, cve-2015-5157, early-clear"
    ));

    let o = run(&dir, &["run", "--variant", "naive", "--faults", "xx"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("unknown fault `xx`; valid faults: ud, pf, bp"));

    let corpus = passing_corpus(&dir);
    fs::write(corpus.join("notes.txt"), "not a schedule").unwrap();
    fs::write(corpus.join("broken.json"), "{\"format\": 1,").unwrap();
    let o = run(&dir, &passing_run(&["--runs", "3"]));
    assert_eq!(o.status.code(), Some(0));
    let err = stderr(&o);
    assert!(
        err.contains("corpus-dir/notes.txt") && err.contains("corpus-dir/broken.json"),
        "{err}"
    );
    assert!(stdout(&o).contains("INFO: 1 seeds from corpus-dir (2 files skipped)"));
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn smoke_writes_summaries_and_fails_on_a_finding() {
    if !kvm() {
        return;
    }
    let dir = workdir("smoke");
    let o = run(
        &dir,
        &[
            "smoke",
            "--variant",
            "naive",
            "--faults",
            "none",
            "--max-total-time",
            "5",
            "--summary",
            "out",
        ],
    );
    assert_eq!(o.status.code(), Some(0));
    let md = fs::read_to_string(dir.join("out/smoke-summary.md")).unwrap();
    assert!(md.contains("nmifuzz smoke: passed"), "{md}");
    let json: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(dir.join("out/smoke-summary.json")).unwrap())
            .unwrap();
    assert_eq!(json["seed"], 1);
    assert!(json["executions"].as_u64().unwrap() > 0);

    let o =
        run(&dir, &["smoke", "--variant", "naive", "--max-total-time", "60", "--summary", "out"]);
    assert_eq!(o.status.code(), Some(1));
    let md = fs::read_to_string(dir.join("out/smoke-summary.md")).unwrap();
    assert!(md.contains("FAILED") && md.contains("nmifuzz replay"), "{md}");
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn ctrl_c_stops_every_client_of_a_two_core_campaign() {
    if !kvm() {
        return;
    }
    let dir = workdir("cores-int");
    let corpus = passing_corpus(&dir);
    let port = free_port();
    let args = ["--cores", "2", "--broker-port", &port, "--max-total-time", "100"];
    let child = spawn_group(&dir, &passing_run(&args));
    wait_for_entries(&corpus, 4, Duration::from_secs(60));
    let started = Instant::now();
    signal_group(&child, libc::SIGINT); // Ctrl-C reaches every process of the job
    let o = child.wait_with_output().unwrap();
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(o.status.code(), Some(72), "{}", stderr(&o));
    assert!(stdout(&o).contains("run interrupted") && stdout(&o).contains(" DONE cov: "));
    schedules_in(&corpus);
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bench_measures_every_figure_and_the_fast_mode_is_faster_than_stepping() {
    if !kvm() {
        return;
    }
    let dir = workdir("bench");
    // The bench's own checks (every run DONE, all three NMIs delivered, both modes agreeing)
    // make it fail on a guest its schedules no longer fit.
    let o = run(&dir, &["bench", "--samples", "10", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    let json: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    for field in ["exit_roundtrip_us", "reset_us", "step_us", "exec_3nmi_us", "free_run_floor_us"] {
        assert!(json[field].as_f64().is_some_and(|v| v > 0.0), "{field}: {json}");
    }
    assert!(json["fast_speedup"].as_f64().unwrap() > 1.0, "{json}");
    fs::remove_dir_all(dir).unwrap();
}
