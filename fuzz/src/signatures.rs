//! `nmifuzz signatures`: the verdict signatures of a fixed set of schedules on this host, and
//! the comparison of two hosts' sets. Reproducers travel between hosts (users share them), so
//! the same schedule must give the same verdict on kvm_pvm and on stock KVM, but where the
//! hardware's own rules differ; every difference this finds is either such a rule, written
//! down in docs/engine.md ("Cross-host agreement"), or a bug.
//!
//! The set: every schedule in the corpus directory, then `--count` schedules from the
//! campaign's generator (the random baseline's), seeded by `--seed`, for each variant in
//! turn. They are drawn from the guest's instruction tables alone, so every host draws the
//! same ones from the same guest. Each runs on the stepped engine, the reference.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use libafl_bolts::rands::StdRand;
use nmifuzz_abi::Variant;
use serde::{Deserialize, Serialize};
use vmm::engine::schedule::{Fault, Schedule};

use crate::input::ScheduleGenerator;
use crate::progress::Progress;
use crate::store;
use crate::target::{self, Target};

/// Arguments of `nmifuzz signatures`.
#[derive(Debug, Args)]
pub struct SignaturesArgs {
    /// Generated schedules, after the corpus's (at least 500 for the cross-host figures).
    #[arg(long, default_value_t = 500)]
    pub count: u32,
    /// Seed of the generated schedules.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The corpus directory whose schedules come first.
    #[arg(long, default_value = "corpus")]
    pub corpus: PathBuf,
    /// Wall-clock limit of one run, in milliseconds (generous: emulated hosts are slow).
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
    /// Where to write this host's signatures (JSON).
    #[arg(long, conflicts_with = "compare")]
    pub output: Option<PathBuf>,
    /// Compare two hosts' signature files instead of running anything; exit 1 if they
    /// differ.
    #[arg(long, num_args = 2, value_names = ["MINE", "THEIRS"])]
    pub compare: Option<Vec<PathBuf>>,
}

/// One host's signatures.
#[derive(Debug, Serialize, Deserialize)]
struct Signatures {
    /// The host profile they were measured with.
    host_profile: String,
    /// The guest's hash: both files must come from the same guest.
    guest_hash: String,
    seed: u64,
    count: u32,
    entries: Vec<Entry>,
}

/// One schedule's verdict.
#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    /// `corpus/<file>` or `generated <i> (<variant>)`.
    name: String,
    /// The verdict's finding identity (`Verdict::signature`).
    signature: String,
    /// The verdict in full, numbers and all.
    verdict: String,
    /// The schedule, so that a difference can be replayed on its own.
    schedule: Schedule,
}

/// Runs `signatures`; returns whether two compared files differ.
pub fn run(args: &SignaturesArgs) -> Result<bool> {
    if let Some(files) = &args.compare {
        return compare(&files[0], &files[1]);
    }
    let signatures = measure(args)?;
    let json = serde_json::to_string_pretty(&signatures)?;
    match &args.output {
        Some(path) => {
            store::write_atomic(path, json.as_bytes())
                .with_context(|| format!("cannot write {}", path.display()))?;
            eprintln!("wrote {} signatures to {}", signatures.entries.len(), path.display());
        }
        None => println!("{json}"),
    }
    Ok(false)
}

/// The corpus's and the generated schedules' signatures on this host.
fn measure(args: &SignaturesArgs) -> Result<Signatures> {
    let mut target = Target::new()?;
    let options = target::run_options(args.timeout_ms);
    let mut schedules = corpus_schedules(&args.corpus)?;
    schedules.extend(generated_schedules(&mut target, args)?);
    let progress = Progress::new(schedules.len() as u64, "schedules", true);
    let mut entries = Vec::with_capacity(schedules.len());
    for (name, schedule) in schedules {
        let execution =
            target.execute(&schedule, &options, &mut []).with_context(|| name.clone())?;
        let verdict = &execution.outcome.verdict;
        entries.push(Entry {
            name,
            signature: verdict.signature(),
            verdict: verdict.to_string(),
            schedule,
        });
        progress.inc(1);
    }
    progress.finish();
    let origin = target.origin();
    Ok(Signatures {
        host_profile: origin.host_profile,
        guest_hash: origin.guest_hash,
        seed: args.seed,
        count: args.count,
        entries,
    })
}

/// Every schedule file of `dir`, by name.
fn corpus_schedules(dir: &Path) -> Result<Vec<(String, Schedule)>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("cannot read the corpus directory {}", dir.display()))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|path| path.extension().is_some_and(|e| e == "json"));
    files.sort();
    files
        .into_iter()
        .map(|path| Ok((format!("corpus/{}", display_name(&path)), Schedule::load(&path)?)))
        .collect()
}

fn display_name(path: &Path) -> String {
    path.file_name().unwrap_or_default().to_string_lossy().into_owned()
}

/// `args.count` generated schedules, each variant in turn, each variant's from its own
/// generator and seeded random stream.
fn generated_schedules(
    target: &mut Target,
    args: &SignaturesArgs,
) -> Result<Vec<(String, Schedule)>> {
    let mut streams = Vec::new();
    for (i, variant) in Variant::ALL.iter().enumerate() {
        let table = std::sync::Arc::new(target.points(variant.name())?);
        let generator = ScheduleGenerator::new(variant.name(), Fault::ALL, &table);
        streams.push((generator, StdRand::with_seed(args.seed.wrapping_add(i as u64))));
    }
    Ok((0..args.count as usize)
        .map(|i| {
            let (generator, rand) = &mut streams[i % Variant::ALL.len()];
            let schedule = generator.schedule(rand);
            (format!("generated {i} ({})", schedule.variant), schedule)
        })
        .collect())
}

/// Compares two hosts' files; prints every difference and a summary. Returns whether they
/// differ.
fn compare(mine: &Path, theirs: &Path) -> Result<bool> {
    let (a, b) = (read(mine)?, read(theirs)?);
    if a.guest_hash != b.guest_hash {
        bail!(
            "{} and {} come from different guests ({} and {}): build the same commit",
            mine.display(),
            theirs.display(),
            a.guest_hash,
            b.guest_hash
        );
    }
    if a.entries.len() != b.entries.len() || a.seed != b.seed {
        bail!(
            "{} and {} hold different sets ({} schedules, seed {}; {} schedules, seed {})",
            mine.display(),
            theirs.display(),
            a.entries.len(),
            a.seed,
            b.entries.len(),
            b.seed
        );
    }
    println!("{}: {}", mine.display(), a.host_profile);
    println!("{}: {}", theirs.display(), b.host_profile);
    let mut differences = 0;
    for (x, y) in a.entries.iter().zip(&b.entries) {
        if x.name != y.name {
            bail!("the sets differ at {} / {}", x.name, y.name);
        }
        if x.signature != y.signature {
            differences += 1;
            println!("differs: {}\n  {}\n  {}", x.name, x.verdict, y.verdict);
        }
    }
    let total = a.entries.len();
    println!("{total} schedules, {} agree, {differences} differ", total - differences);
    Ok(differences > 0)
}

fn read(path: &Path) -> Result<Signatures> {
    let text =
        fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not a signatures file of nmifuzz", path.display()))
}
