//! End-to-end tests of `--cores` campaigns at scale: what a SIGKILL leaves in shared memory,
//! a resume on a full corpus, and two campaigns joined by `--remote-broker`. They need
//! /dev/kvm (see `common::kvm`).

mod common;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

/// `nmifuzz run corpus-dir` on the naive variant, fault-free (so it passes), `--cores CORES`
/// with its broker on `port`, then `extra`.
fn cores_run<'a>(cores: &'a str, port: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = passing_run(&["--cores", cores, "--broker-port", port]);
    args.extend_from_slice(extra);
    args
}

/// Six distinct fault-free schedules, as a resumed campaign finds its corpus.
fn six_seeds(dir: &Path) {
    let corpus = passing_corpus(dir);
    for (i, after) in [11, 23, 37, 52, 71].iter().enumerate() {
        let seed = PASSING_SEED.replace(r#"{"after":60}"#, &format!(r#"{{"after":{after}}}"#));
        fs::write(corpus.join(format!("seed{i}.json")), seed).unwrap();
    }
}

/// The `#N` of every `INITED` line: the executions of each client's initial load.
fn initial_executions(out: &str) -> Vec<u64> {
    out.lines()
        .filter(|l| l.contains(" INITED "))
        .map(|l| l.trim_start_matches('#').split(' ').next().unwrap().parse().unwrap())
        .collect()
}

#[test]
fn sigkill_of_a_two_core_campaign_leaves_no_shared_memory() {
    if !kvm() {
        return;
    }
    let dir = workdir("shm-kill");
    let corpus = passing_corpus(&dir);
    let port = free_port();
    let child = spawn_group(&dir, &cores_run("2", &port, &["--max-total-time", "100"]));
    wait_for_entries(&corpus, 4, Duration::from_secs(60)); // both clients are fuzzing
    let group = processes_in_group(child.id());
    let segments = segments_made_by(&group);
    // (LibAFL's SysV provider: 7 segments of 256 MiB for 2 clients, all leaked by SIGKILL.)
    assert!(!segments.is_empty(), "the campaign {group:?} uses shared memory");
    eprintln!("{} segments before SIGKILL: {segments:?}", segments.len());

    signal_group(&child, libc::SIGKILL);
    child.wait_with_output().unwrap();
    // The kernel frees a segment when the last thread using it has exited: a killed
    // process's other threads (the broker's listener) can outlive its main thread by a
    // moment. A leaked segment stays for good.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut left = segments_made_by(&group);
    while !left.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        left = segments_made_by(&group);
    }
    assert_eq!(left, Vec::<String>::new(), "segments left by the killed run");

    // A restart on the same corpus works, and still finds nothing of the old run.
    let before = schedules_in(&corpus);
    let o = run(&dir, &cores_run("2", &port, &["--runs", "20"]));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!stderr(&o).contains("WARNING"), "{}", stderr(&o));
    assert!(before.iter().all(|p| schedules_in(&corpus).contains(p)));
    assert_eq!(segments_made_by(&group), Vec::<String>::new());
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_resumed_two_core_campaign_evaluates_each_seed_once() {
    if !kvm() {
        return;
    }
    let dir = workdir("resume-once");
    six_seeds(&dir);
    let port = free_port();
    let o = run(&dir, &cores_run("2", &port, &["--runs", "40", "--seed", "9"]));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    // Before the seeds were shared out, each client evaluated all six: #6 and #6.
    let initial = initial_executions(&out);
    assert_eq!(initial.len(), 2, "{out}");
    assert_eq!(initial.iter().sum::<u64>(), 6, "{out}");
    assert!(out.contains("(client 1, 3 of 6 seeds)") && out.contains("(client 2, 3 of 6 seeds)"));
    fs::remove_dir_all(dir).unwrap();
}

/// Whether `path` is a schedule with a handler fault in it.
fn has_a_fault(path: &Path) -> bool {
    let schedule: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap();
    schedule["actions"]
        .as_array()
        .is_some_and(|actions| actions.iter().any(|a| !a["faults"].as_array().unwrap().is_empty()))
}

/// A fault-free linux campaign on `dir`'s corpus with one broker per `--cores` campaign.
fn linux_campaign(dir: &Path, cores: &str, port: &str, extra: &[&str]) -> std::process::Child {
    let mut args = vec!["run", "corpus-dir", "--variant", "linux", "--faults", "none"];
    args.extend_from_slice(&["--cores", cores, "--broker-port", port, "--max-total-time", "60"]);
    args.extend_from_slice(extra);
    spawn_group(dir, &args)
}

#[test]
fn two_campaigns_joined_by_remote_broker_exchange_inputs() {
    if !kvm() {
        return;
    }
    // Both on the linux variant (it survives faults) with `--faults none`: their mutators and
    // generators never make a handler fault, so the only fault in the first campaign's
    // corpus can come from the second campaign's seed, through the brokers. One client each,
    // pinned to different cores.
    let dir = workdir("b2b");
    let (first, second) = (dir.join("first"), dir.join("second"));
    let first_corpus = passing_corpus(&first);
    let second_corpus = passing_corpus(&second);
    fs::write(
        second_corpus.join("seed.json"),
        PASSING_SEED.replace(r#""faults":[]"#, r#""faults":["ud"]"#),
    )
    .unwrap();
    let (first_port, second_port) = (free_port(), free_port());
    let a = linux_campaign(&first, "0-0", &first_port, &[]);
    wait_for_entries(&first_corpus, 2, Duration::from_secs(60)); // its broker is listening
    let remote = format!("127.0.0.1:{first_port}");
    let b = linux_campaign(&second, "1-1", &second_port, &["--remote-broker", &remote]);

    let started = Instant::now();
    let received = loop {
        let faulty: Vec<_> =
            schedules_in(&first_corpus).into_iter().filter(|p| has_a_fault(p)).collect();
        if !faulty.is_empty() || started.elapsed() > Duration::from_secs(45) {
            break faulty;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("after {:.1?}: {received:?}", started.elapsed());
    signal_group(&a, libc::SIGINT);
    signal_group(&b, libc::SIGINT);
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    for (name, o) in [("first", &a), ("second", &b)] {
        eprintln!("--- {name}\n{}{}", stdout(o), stderr(o));
        assert_eq!(o.status.code(), Some(72), "{name} stops cleanly at Ctrl-C");
    }
    assert!(stdout(&b).contains(&format!("INFO: connected to the remote broker {remote}")));
    assert!(!received.is_empty(), "the second campaign's seed never reached the first");
    // The first campaign's only client counted what it took from the other campaign.
    let imported = stdout(&a)
        .lines()
        .find_map(|l| l.trim().strip_prefix("inputs shared between clients: ")?.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(imported > 0, "{}", stdout(&a));
    fs::remove_dir_all(dir).unwrap();
}
