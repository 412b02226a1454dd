//! `nmifuzz smoke`: the CI campaign. One process, a fixed seed, seeds from ./corpus (or
//! generated), a fixed length; stops at the first finding. Writes `smoke-summary.md` (for a
//! job summary or a PR comment) and `smoke-summary.json` (for tools) into `--summary`.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::executor::Limits;
use crate::launch::{self, Clients, Report, Setup};
use crate::options::SmokeArgs;
use crate::store;

/// `nmifuzz smoke`: returns whether anything was found.
pub fn run(args: &SmokeArgs) -> Result<bool> {
    let seeds = if Path::new("corpus").is_dir() {
        launch::load_seeds(Path::new("corpus"))?
    } else {
        Vec::new()
    };
    let limits = Limits {
        start: Instant::now(),
        max_time: Some(Duration::from_secs(args.max_total_time)),
        max_runs: None,
        stop_on_crash: true,
    };
    let config = launch::config(&args.campaign, seeds, None, args.seed, limits);
    let report = launch::run_campaign(Setup { config, clients: Clients::Single })?;
    launch::print_summary(&report);
    store::ensure_dir(&args.summary)?;
    let json = serde_json::to_string_pretty(&report)?;
    let json_path = args.summary.join("smoke-summary.json");
    store::write_atomic(&json_path, json.as_bytes())
        .with_context(|| format!("cannot write {}", json_path.display()))?;
    let md_path = args.summary.join("smoke-summary.md");
    store::write_atomic(&md_path, markdown(&report).as_bytes())
        .with_context(|| format!("cannot write {}", md_path.display()))?;
    println!("INFO: summary written to {} and {}", md_path.display(), json_path.display());
    Ok(report.crashes > 0 || !report.artifacts.is_empty())
}

/// The Markdown summary.
pub fn markdown(r: &Report) -> String {
    let mut md = String::new();
    let status = if r.crashes > 0 { "FAILED: finding" } else { "passed" };
    let _ = writeln!(md, "## nmifuzz smoke: {status}\n");
    let _ = writeln!(md, "| | |\n|---|---|");
    let _ = writeln!(md, "| variant | `{}` |", r.variant);
    let _ = writeln!(md, "| seed | {} |", r.seed);
    let _ = writeln!(md, "| duration | {:.1} s |", r.elapsed_secs);
    let _ = writeln!(md, "| executions | {} ({:.1}/s) |", r.executions, r.execs_per_sec);
    let _ = writeln!(md, "| corpus | {} entries, {} edges |", r.corpus, r.edges);
    let _ = writeln!(md, "| crashes | {} |", r.crashes);
    if !r.artifacts.is_empty() {
        let _ = writeln!(md, "\n### Findings\n");
        for (path, verdict) in &r.artifacts {
            let _ = writeln!(md, "- `{}`: {verdict}", path.display());
        }
        let _ = writeln!(
            md,
            "\nReproduce with `nmifuzz replay --trace {}`.",
            r.artifacts[0].0.display()
        );
    } else if r.crashes > 0 {
        let _ = writeln!(
            md,
            "\nThe finding was already saved as an artifact before this run (see the artifacts directory)."
        );
    }
    md
}
