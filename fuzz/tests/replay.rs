//! `nmifuzz replay`, `doctor` and `variants` through the real binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn nmifuzz(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nmifuzz")).args(args).output().expect("the binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn seed() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../corpus/single-nmi-in-workload.json")
}

/// A scratch directory for this test process.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nmifuzz-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn kvm_tests_skipped() -> bool {
    std::env::var_os("NMIFUZZ_SKIP_KVM_TESTS").is_some_and(|v| v == "1")
}

#[test]
fn kvm_replay_prints_one_json_object_per_file() {
    if kvm_tests_skipped() {
        return;
    }
    let seed = seed();
    let out = nmifuzz(&["replay", "--json", seed.to_str().unwrap(), seed.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let lines: Vec<serde_json::Value> =
        text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    for line in &lines {
        assert_eq!(line["verdict"], "pass");
        assert!(line["instructions"].as_u64().unwrap() > 0);
        assert_eq!(line["trace_hash"], lines[0]["trace_hash"], "replays are identical");
        for key in ["file", "variant", "message", "nmi"] {
            assert!(!line[key].is_null(), "{key} missing in {line}");
        }
    }
}

#[test]
fn kvm_replay_trace_shows_symbolized_disassembled_steps() {
    if kvm_tests_skipped() {
        return;
    }
    let out = nmifuzz(&["replay", "--trace", seed().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("NMI #0 injected (Delivered)"), "{stdout}");
    assert!(stdout.contains("NMI delivered (frame RIP"), "{stdout}");
    assert!(stdout.contains("do_nmi iteration"), "{stdout}");
    assert!(stdout.lines().any(|l| l.contains("iretq")), "disassembly: {stdout}");
}

#[test]
fn kvm_replay_trace_marks_a_wrong_return_and_shows_both_frames() {
    if kvm_tests_skipped() {
        return;
    }
    let reproducer = Path::new(env!("CARGO_MANIFEST_DIR")).join("../corpus/no-repeat-window.json");
    let out = nmifuzz(&["replay", "--trace", reproducer.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    // The trace's last stop is the IRETQ that returns wrongly.
    let marked = stdout.lines().find(|l| l.contains("WRONG RETURN")).expect("a marked stop");
    assert!(marked.contains("iretq"), "{marked}");
    // Under the NMI-stack diagram, the two frames side by side: only RSP differs, and the
    // IRETQ's RSP is on the NMI stack.
    let table = stdout.split("\nWrong return: ").nth(1).expect("the frames after the diagram");
    assert!(
        stdout.find("NMI stack at the end").unwrap() < stdout.find("\nWrong return: ").unwrap()
    );
    let rows: Vec<&str> = table.lines().skip(2).take(5).collect();
    assert_eq!(rows.len(), 5, "{table}");
    for row in &rows {
        let differs = row.ends_with("<-- differs");
        assert_eq!(differs, row.trim_start().starts_with("RSP "), "{row}");
    }
    assert!(rows[3].contains("(on the NMI stack)"), "{}", rows[3]);
    assert!(stdout.contains("[wrong-return]"), "{stdout}");
}

#[test]
fn kvm_replay_trace_piped_into_a_reader_that_stops_early_ends_quietly() {
    if kvm_tests_skipped() {
        return;
    }
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::ExitStatusExt;
    // A trace far longer than a pipe's buffer (64 KiB), so that the reader goes away while
    // replay still writes.
    let long = Path::new(env!("CARGO_MANIFEST_DIR")).join("../corpus/linux-latched-at-iretq.json");
    let mut child = Command::new(env!("CARGO_BIN_EXE_nmifuzz"))
        .args(["replay", "--trace", long.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Like `| head -1`: read the header line, then close the pipe.
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
    assert!(first.contains("insn"), "{first}");
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?}", out.status);
    assert!(!text(&out.stderr).contains("panicked"), "{}", text(&out.stderr));
}

#[test]
fn kvm_replay_warns_about_another_guest_or_host() {
    if kvm_tests_skipped() {
        return;
    }
    let dir = scratch("origin");
    let mut schedule: serde_json::Value =
        serde_json::from_slice(&std::fs::read(seed()).unwrap()).unwrap();
    schedule["origin"] =
        serde_json::json!({"guest_hash": "0000000000000000", "host_profile": "elsewhere"});
    let file = dir.join("foreign.json");
    std::fs::write(&file, schedule.to_string()).unwrap();
    let out = nmifuzz(&["replay", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("recorded with guest 0000000000000000"), "{stderr}");
    assert!(stderr.contains("`elsewhere`"), "{stderr}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn kvm_doctor_explains_the_host_profile() {
    if kvm_tests_skipped() {
        return;
    }
    let out = nmifuzz(&["doctor"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("host profile: iretq-step="), "{stdout}");
    assert!(stdout.contains("IRETQ has its own single-step stop"), "{stdout}");
}

#[test]
fn bad_files_and_flags_are_usage_errors_naming_the_problem() {
    let dir = scratch("bad");
    let junk = dir.join("junk.json");
    std::fs::write(&junk, "not json").unwrap();
    let out = nmifuzz(&["replay", junk.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("junk.json") && stderr.contains("not a valid schedule"), "{stderr}");

    let out = nmifuzz(&["replay", "--variant", "bogus", junk.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("valid variants: "), "{}", text(&out.stderr));

    let out = nmifuzz(&["replay", dir.join("missing.json").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("missing.json: cannot read"));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn variants_lists_one_line_each() {
    let out = nmifuzz(&["variants"]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = text(&out.stdout);
    for line in stdout.lines() {
        let name = line.split_whitespace().next().unwrap();
        assert!(line.len() > name.len() + 10, "a description follows the name: {line}");
    }
    assert!(stdout.lines().any(|l| l.starts_with("naive ")));
}
