//! `nmifuzz run --kernel` and the replay of its reproducers, through the real binary.
//!
//! On a host with stock KVM (CI runs these on the emulated kvm_amd of .ci/stock-kvm, with
//! STOCK_KVM_ONE_CPU=1) they boot Debian's kernel from /boot. On kvm_pvm, where a real kernel
//! does not boot in useful time, they check that nmifuzz says so at once.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

fn nmifuzz(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nmifuzz")).args(args).output().expect("the binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nmifuzz-kernel-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn kvm_tests_skipped() -> bool {
    std::env::var_os("NMIFUZZ_SKIP_KVM_TESTS").is_some_and(|v| v == "1")
}

/// Debian's kernel, which the stock-KVM host's set-up installs.
fn debian_kernel() -> PathBuf {
    let mut kernels: Vec<PathBuf> = std::fs::read_dir("/boot")
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    kernels.retain(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")));
    kernels.sort();
    kernels.pop().expect("a kernel in /boot (apt-get install linux-image-amd64)")
}

fn on_kvm_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// A kernel schedule: `operations` and `nmis` as JSON arrays.
fn schedule(dir: &Path, name: &str, kernel: &Path, operations: &str, nmis: &str) -> PathBuf {
    let hash = kernel_hash(kernel);
    let path = dir.join(name);
    let json = format!(
        r#"{{"format": "nmifuzz-kernel-schedule/1", "kernel": {{"path": "{}", "hash": "{hash}"}},
            "operations": {operations}, "nmis": {nmis}}}"#,
        kernel.display()
    );
    std::fs::write(&path, json).unwrap();
    path
}

/// The kernel's hash as nmifuzz records it.
fn kernel_hash(kernel: &Path) -> String {
    format!("{:016x}", vmm::hash::fnv1a(&std::fs::read(kernel).unwrap()))
}

#[test]
fn kvm_pvm_refuses_a_real_kernel_up_front() {
    if kvm_tests_skipped() || !on_kvm_pvm() {
        return;
    }
    let started = Instant::now();
    let out = nmifuzz(&["run", "--kernel", "/boot/vmlinuz", "--max-total-time", "10"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stdout));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("kvm_pvm") && stderr.contains("VMX or SVM"), "{stderr}");
    assert!(started.elapsed().as_secs() < 10, "the refusal comes at once");
}

#[test]
fn kvm_a_campaign_on_debians_kernel_runs_clean_and_its_corpus_replays_the_same() {
    if kvm_tests_skipped() || on_kvm_pvm() {
        return;
    }
    let dir = scratch("campaign");
    let corpus = dir.join("corpus");
    std::fs::create_dir_all(&corpus).unwrap();
    let kernel = debian_kernel();
    let out = nmifuzz(&[
        "run",
        corpus.to_str().unwrap(),
        "--kernel",
        kernel.to_str().unwrap(),
        "--runs",
        "150",
        "--seed",
        "3",
        "--artifacts",
        dir.join("artifacts").to_str().unwrap(),
    ]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stderr.contains("symbols from the kernel's /proc/kallsyms"), "{stderr}");
    assert!(stdout.contains("Done 150 runs"), "{stdout}");
    let mut entries: Vec<PathBuf> =
        std::fs::read_dir(&corpus).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    assert!(entries.len() > 1, "the campaign kept inputs: {entries:?}");
    // The same entry three times in one process, and two more: one verdict each, every time.
    let files: Vec<&str> = [&entries[0], &entries[0], &entries[0], &entries[1], &entries[1]]
        .iter()
        .map(|p| p.to_str().unwrap())
        .collect();
    let mut args = vec!["replay", "--json"];
    args.extend(&files);
    let out = nmifuzz(&args);
    // Nothing but the JSON objects on stdout: boot progress goes to stderr.
    let lines: Vec<serde_json::Value> =
        text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 5, "{}\n{}", text(&out.stdout), text(&out.stderr));
    for (a, b) in [(0, 1), (0, 2), (3, 4)] {
        assert_eq!(lines[a]["message"], lines[b]["message"], "replays agree");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn kvm_an_nmi_in_the_syscall_gap_is_delivered_handled_and_returns() {
    if kvm_tests_skipped() || on_kvm_pvm() {
        return;
    }
    let dir = scratch("gap");
    let kernel = debian_kernel();
    // An NMI at the SYSCALL entry's first instruction (still on the user's stack) of the
    // second system call, whose RSP is the top of the NMI stack: the CVE-2015-3291
    // situation, which the DF test of asm_exc_nmi handles.
    let gap = schedule(
        &dir,
        "gap.json",
        &kernel,
        r#"[{"syscall": 1}, {"syscall_with_rsp": {"count": 1, "rsp": {"nmi_stack": 0}}}]"#,
        r#"[{"at": "entry_SYSCALL_64", "occurrence": 2}]"#,
    );
    // A hardware watchpoint on nmi_state: exc_nmi reads it before it clears DR7, so the CPU
    // raises #DB inside the NMI's handling, and the #DB's IRET opens NMIs again. The NMI comes
    // at the second system call: the first is the watchpoint's perf_event_open.
    let watch = schedule(
        &dir,
        "watch.json",
        &kernel,
        r#"[{"watch": {"per_cpu": "nmi_state"}}, {"syscall": 1}]"#,
        r#"[{"at": "entry_SYSCALL_64", "occurrence": 2}]"#,
    );
    let out = nmifuzz(&["replay", "--trace", gap.to_str().unwrap(), watch.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{}", text(&out.stderr));
    assert!(stdout.contains("NMI injected at entry_SYSCALL_64 (execution 2)"), "{stdout}");
    assert!(
        stdout.contains("NMI delivered: interrupted entry_SYSCALL_64 with RSP 0xfffffe"),
        "{stdout}"
    );
    assert!(stdout.contains("(on the NMI stack)"), "{stdout}");
    assert!(stdout.contains("NMI returned to entry_SYSCALL_64\n"), "{stdout}");
    assert!(stdout.contains("#DB raised by the kernel's watchpoint"), "{stdout}");
    assert!(stdout.contains("after exc_nmi+"), "the #DB came inside the NMI: {stdout}");
    assert_eq!(stdout.matches("clean [clean]").count(), 2, "{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
}
