//! The user-mode half of the entry (issue 9) end to end, through the real binary: the user
//! sweep and campaigns on the 2015 CVE variants.
//!
//! They need the three pieces of issue 9 together: the guest's user workload and its CVE
//! variants (`guest/`, `entries/`), the engine's ring-3 support (`vmm/src/engine`) and the
//! fuzzer's (this crate).

mod common;

use std::process::Output;

use common::{kvm, run, workdir};

/// The variants whose bug only NMIs around ring 3 reach.
const CVE_VARIANTS: [&str; 3] = ["cve-2015-3291", "cve-2015-3290", "cve-2015-5157"];

fn json(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {stdout} {}", String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn kvm_the_user_sweep_kills_each_cve_variant() {
    if !kvm() {
        return;
    }
    let dir = workdir("user-sweep-cves");
    for variant in CVE_VARIANTS {
        let args =
            ["sweep", "--variant", variant, "--workload", "user", "--stop-on-first", "--json"];
        let out = run(&dir, &args);
        assert_eq!(out.status.code(), Some(1), "{variant}: {}", json(&out));
        let summary = json(&out);
        assert_eq!(summary["parts"][0]["workload"], "user", "{summary}");
        assert_eq!(summary["findings"].as_object().unwrap().len(), 1, "{variant}: {summary}");
        let seconds = summary["first_finding"][1].as_f64().unwrap();
        eprintln!("{variant}: found by the user sweep in {seconds:.1} s");
    }
}

#[test]
fn kvm_linux_survives_the_whole_user_sweep_in_bounded_time() {
    if !kvm() {
        return;
    }
    let dir = workdir("user-sweep-linux");
    // The full user sweep (second NMIs after the SYSCALL gaps too) is about ten times this:
    // 53,029 runs in 220-280 s here, all passing (docs/sweep.md, "The user sweep").
    let args =
        ["sweep", "--variant", "linux", "--workload", "user", "--user-pairs", "ring3", "--json"];
    let out = run(&dir, &args);
    let summary = json(&out);
    assert_eq!(out.status.code(), Some(0), "{summary}");
    assert!(summary["complete"].as_bool().unwrap(), "{summary}");
    let part = &summary["parts"][0];
    // Every region has places: single NMIs at the ring-3 points, in both SYSCALL gaps and on
    // the return to user; and second NMIs reach the entry's user path.
    for region in ["user-point", "syscall-gap", "sysret-gap", "return-to-user"] {
        assert!(part["places"][region].as_u64() > Some(0), "no places in {region}: {part}");
    }
    assert!(part["seconds_by_region"]["nmi-user-path"].as_u64() > Some(0), "{part}");
    assert!(part["pairs"].as_u64() > part["singles"].as_u64(), "{part}");
    // About 30 s on this host; ten times that fails.
    assert!(part["seconds"].as_f64().unwrap() < 300.0, "{part}");
}

#[test]
fn kvm_campaigns_find_each_cve_variant_from_an_empty_corpus() {
    if !kvm() {
        return;
    }
    for variant in CVE_VARIANTS {
        let dir = workdir(&format!("user-campaign-{variant}"));
        std::fs::create_dir_all(dir.join("corpus")).unwrap();
        let args = [
            "run",
            "corpus",
            "--variant",
            variant,
            "--max-total-time",
            "180",
            "--seed",
            "1",
            "--artifacts",
            "artifacts",
        ];
        let out = run(&dir, &args);
        assert_eq!(out.status.code(), Some(1), "no finding on {variant} in 180 s");
        let artifacts: Vec<_> = std::fs::read_dir(dir.join("artifacts")).unwrap().collect();
        assert!(!artifacts.is_empty(), "{variant}: exit 1 without an artifact");
    }
}
