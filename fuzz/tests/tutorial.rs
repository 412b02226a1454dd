//! Users' own entries, in copies of the repository: the tutorial, `docs/fuzz-your-entry.md`,
//! run as written (every `sh` block, in order, with bash; a block whose first line is `# exits
//! N: ...` must exit with N, every other block with 0, and what each step promises is checked
//! too), then a hand-written assembly entry, entries that leave NMIs without IRETQ (both modes
//! must judge them alike), and the errors a broken entry gets.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn kvm_tests_skipped() -> bool {
    std::env::var_os("NMIFUZZ_SKIP_KVM_TESTS").is_some_and(|v| v == "1")
}

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

/// The `sh` code blocks of a Markdown text.
fn sh_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```sh") => current = Some(String::new()),
            (Some(block), "```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            (Some(block), line) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

/// The exit status a block announces on its first line (`# exits 1: ...`), else 0.
fn expected_status(block: &str) -> i32 {
    block
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("# exits "))
        .and_then(|rest| rest.split(':').next())
        .map_or(0, |n| n.parse().expect("`# exits N:` names a number"))
}

/// A copy of the repository in a temporary directory whose `target/` is `target/<cache>` of
/// the repository itself, so that reruns of a test build incrementally.
fn copy_repository(name: &str, cache: &str) -> PathBuf {
    let to = std::env::temp_dir().join(format!("nmifuzz-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&to);
    let repo = repository();
    let listing = Command::new("git")
        .args(["ls-files", "-z", "--cached", "--others", "--exclude-standard"])
        .current_dir(&repo)
        .output()
        .expect("git runs");
    assert!(listing.status.success(), "git ls-files failed");
    for name in listing.stdout.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let name = std::str::from_utf8(name).unwrap();
        let (from, dest) = (repo.join(name), to.join(name));
        if from.is_file() {
            fs::create_dir_all(dest.parent().unwrap()).unwrap();
            fs::copy(&from, &dest).unwrap();
        }
    }
    let cache = repo.join("target").join(cache);
    fs::create_dir_all(&cache).unwrap();
    std::os::unix::fs::symlink(&cache, to.join("target")).unwrap();
    to
}

/// Runs `script` with bash in `dir`: its exit status and its stdout and stderr together.
fn bash(dir: &Path, script: &str) -> (Option<i32>, String) {
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("set -euo pipefail\n{script}"))
        .current_dir(dir)
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .output()
        .expect("bash runs");
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code(), text)
}

#[test]
fn kvm_the_tutorial_runs_as_written() {
    if kvm_tests_skipped() {
        return;
    }
    let tutorial = fs::read_to_string(repository().join("docs/fuzz-your-entry.md")).unwrap();
    let blocks = sh_blocks(&tutorial);
    assert_eq!(blocks.len(), 8, "the tutorial's steps changed: update this test");
    let copy = copy_repository("tutorial", "tutorial");
    let mut outputs = Vec::new();
    for (i, block) in blocks.iter().enumerate() {
        let (status, text) = bash(&copy, block);
        assert_eq!(status, Some(expected_status(block)), "block {i}:\n{block}\n{text}");
        outputs.push(text);
    }
    // 1: the scaffold wrote one file and said what to run next.
    assert!(outputs[0].contains("wrote ") && outputs[0].contains("entries/first_try.S"));
    assert!(outputs[0].contains("next: build it and fuzz it"), "{}", outputs[0]);
    // 2: listed with its one-line description.
    let listed = outputs[1].lines().find(|l| l.starts_with("first-try "));
    assert!(
        listed
            .is_some_and(|l| l.ends_with("`first-try`: my NMI entry (describe it in this line).")),
        "{}",
        outputs[1]
    );
    // 3: the campaign saved a crash.
    let artifacts: Vec<_> = fs::read_dir(copy.join("artifacts")).unwrap().collect();
    assert_eq!(artifacts.len(), 1, "{}", outputs[2]);
    // 4 and 5: a minimized reproducer whose trace shows the second NMI nesting into do_nmi.
    assert_eq!(fs::read_dir(copy.join("first-try-min")).unwrap().count(), 1, "{}", outputs[3]);
    assert!(outputs[4].contains("do_nmi entered while running (depth 2)"), "{}", outputs[4]);
    assert!(outputs[4].contains("NMI delivered (frame RIP"), "{}", outputs[4]);
    // 6 and 7: the fixed entry passes the reproducer and the pairs sweep, and has a diagram.
    assert!(
        copy.join("entries/first_try.rs").is_file() && !copy.join("entries/first_try.S").exists()
    );
    assert!(outputs[6].contains("pass: the workload reported DONE"), "{}", outputs[6]);
    assert!(outputs[7].contains("sweep of variant first-try: "), "{}", outputs[7]);
    assert!(
        outputs[7].contains("no findings") && !outputs[7].contains("stopped early"),
        "{}",
        outputs[7]
    );

    // An entry written by hand as an assembly file: naive's code, but claiming Linux's stack
    // layout. It is listed, and the first NMI's first iteration shows the contradiction.
    let naive = fs::read_to_string(copy.join("entries/naive.S")).unwrap();
    let body = naive.split_once("\n\n").unwrap().1.replace("nmi_naive", "nmi_hand_made");
    let hand_made =
        format!("# Written by hand, with a wrong layout.\n#\n# Layout: linux\n\n{body}");
    fs::write(copy.join("entries/hand_made.S"), hand_made).unwrap();
    let (status, text) = bash(
        &copy,
        "cargo build --release -q -p nmifuzz\n\
         ./target/release/nmifuzz variants\n\
         ./target/release/nmifuzz replay --variant hand-made corpus/single-nmi-in-workload.json",
    );
    assert_eq!(status, Some(1), "{text}");
    let listed = text.lines().find(|l| l.starts_with("hand-made "));
    assert!(listed.is_some_and(|l| l.ends_with("Written by hand, with a wrong layout.")), "{text}");
    assert!(text.contains("the entry's Layout: contradicts its code"), "{text}");
    fs::remove_dir_all(&copy).unwrap();
}

#[test]
fn kvm_the_fast_mode_judges_entries_that_leave_without_iretq_as_the_stepped_engine_does() {
    if kvm_tests_skipped() {
        return;
    }
    // Two entries nobody should write, kept out of the product (fuzz/tests/entries/): naive's,
    // leaving a ring-0 NMI by popfq and RET, or every NMI by an indirect jump. The fast mode
    // free-runs through NMI handling and stops at IRETQs; it must still close an NMI's
    // context where execution resumes it, as the stepped engine does at every step.
    let copy = copy_repository("non-iretq-exits", "non-iretq-exits");
    for name in ["ret_exit", "jmp_exit"] {
        let fixture = repository().join(format!("fuzz/tests/entries/{name}.S"));
        let entry = naive_with_exit(&fs::read_to_string(fixture).unwrap(), name);
        fs::write(copy.join(format!("entries/{name}.S")), entry).unwrap();
    }
    let (status, text) = bash(
        &copy,
        "cargo build --release -q -p nmifuzz\n\
         ./target/release/nmifuzz modes --variant ret-exit --schedules 100\n\
         ./target/release/nmifuzz modes --variant jmp-exit --schedules 100",
    );
    assert_eq!(status, Some(0), "{text}");
    for variant in ["ret-exit", "jmp-exit"] {
        let line = text.lines().find(|l| l.starts_with(&format!("100 schedules on {variant}:")));
        let line = line.unwrap_or_else(|| panic!("no summary for {variant}: {text}"));
        assert!(line.contains(": 100 agree, 0 disagree ("), "{line}");
        // The schedules reach the exits: the stepped engine finds the entries' bugs in some.
        assert!(!line.contains("(0 findings"), "{line}");
    }
    fs::remove_dir_all(&copy).unwrap();
}

/// The entry `nmi_<name>` from `fixture`, which holds a header comment and an exit only: the
/// header, then naive's entry and body (entries/naive.S without its header, renamed) up to its
/// exit, then the fixture's exit, which starts where naive's does.
fn naive_with_exit(fixture: &str, name: &str) -> String {
    const EXIT: &str = "    test byte ptr [rsp + 8], 3  /* back to ring 3? */";
    let naive = fs::read_to_string(repository().join("entries/naive.S")).unwrap();
    let comment = |line: &&str| line.starts_with('#');
    let header = fixture.lines().take_while(comment);
    let mut exit = fixture.lines().skip_while(comment).peekable();
    assert_eq!(exit.peek(), Some(&EXIT), "the exit of {name}.S must start where naive's does");
    assert!(naive.lines().any(|line| line == EXIT), "entries/naive.S has no line {EXIT:?}");
    let body = naive.lines().skip_while(comment).take_while(|line| *line != EXIT);
    let renamed = |line: &str| line.replace("nmi_naive", &format!("nmi_{name}"));
    let lines: Vec<String> =
        header.map(str::to_owned).chain(body.map(renamed)).chain(exit.map(str::to_owned)).collect();
    lines.join("\n") + "\n"
}

#[test]
fn broken_entries_stop_the_build_with_the_file_and_the_problem() {
    let copy = copy_repository("broken-entries", "broken-entries");
    let naive = fs::read_to_string(copy.join("entries/naive.S")).unwrap();
    let cld_line = 1 + naive.lines().position(|l| l.starts_with("    cld ")).unwrap();
    let renamed = |symbol: &str| naive.replace("nmi_naive", symbol);
    // (file, text, what the error must say)
    let cases = [
        (
            "bad_syntax.S",
            renamed("nmi_bad_syntax").replace("    cld ", "    cldx "),
            format!("entries/bad_syntax.S:{cld_line}: Error: no such instruction: `cldx"),
        ),
        (
            "no_symbol.S",
            renamed("nmi_other"),
            "no_symbol.S: missing required symbol `nmi_no_symbol`".to_owned(),
        ),
        (
            "bad_layout.S",
            renamed("nmi_bad_layout").replace(
                "# Layout: none",
                "# Layout: original=40 temp_rdx=48 executing=48 iret=96 outermost=136",
            ),
            "bad_layout.S: Layout: temp_rdx and executing overlap".to_owned(),
        ),
        ("Bad-Name.S", renamed("nmi_bad_name"), "`Bad-Name` is not a valid entry name".to_owned()),
    ];
    for (file, text, message) in cases {
        fs::write(copy.join("entries").join(file), text).unwrap();
        let (status, output) = bash(&copy, "cargo check -q -p nmifuzz-abi");
        assert_ne!(status, Some(0), "{file} built");
        assert!(output.contains(&message), "{file}: {output}");
        fs::remove_file(copy.join("entries").join(file)).unwrap();
    }
    fs::remove_dir_all(&copy).unwrap();
}
