//! `nmifuzz modes`: does the fast mode judge an entry as the stepped engine does? Random
//! symbolic schedules for one variant run in both modes ([`vmm::engine::agreement`]); every
//! disagreement is one line, its schedule saved for replay. For an entry of one's own, run it
//! once: the campaign runs the fast mode, and re-runs only its findings stepped.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use vmm::engine::agreement::Rng;

use crate::options::parse_variant;
use crate::progress::Progress;
use crate::store;
use crate::target::{self, Target};

/// Arguments of `nmifuzz modes`.
#[derive(Debug, Args)]
pub struct ModesArgs {
    /// The entry variant (`nmifuzz variants` lists them).
    #[arg(long, default_value = "linux", value_parser = parse_variant)]
    pub variant: String,
    /// Schedules to run in both modes.
    #[arg(long, default_value_t = 100)]
    pub schedules: u32,
    /// Seed of the schedules.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Wall-clock limit of one run, in milliseconds.
    #[arg(long, default_value_t = 5_000)]
    pub timeout_ms: u64,
    /// Where the schedules the modes disagree on are saved.
    #[arg(long, default_value = "artifacts")]
    pub artifacts: PathBuf,
}

/// Runs `modes`; returns whether the modes disagreed anywhere.
pub fn run(args: &ModesArgs) -> Result<bool> {
    let mut target = Target::new()?;
    let table = target.instruction_table(&args.variant)?;
    let options = target::run_options(args.timeout_ms);
    let mut rng = Rng::new(args.seed);
    let progress = Progress::new(args.schedules.into(), "schedules", true);
    let (mut disagreements, mut findings) = (0, 0);
    for _ in 0..args.schedules {
        let one = target.compare_modes(&mut rng, &args.variant, &table, &options)?;
        findings += u32::from(one.stepped.outcome.verdict.is_finding());
        if !one.agrees() {
            disagreements += 1;
            let (fast, stepped) =
                (one.fast.outcome.verdict.signature(), one.stepped.outcome.verdict.signature());
            let (fast, stepped) = if fast == stepped {
                let books = |e: &vmm::engine::Execution| format!("{fast}, NMIs {:?}", e.nmi);
                (books(&one.fast), books(&one.stepped))
            } else {
                (fast, stepped)
            };
            progress.note(&store::record_disagreement(
                &args.artifacts,
                &one.schedule,
                &fast,
                &stepped,
            ));
        }
        progress.inc(1);
    }
    progress.finish();
    println!(
        "{} schedules on {}: {} agree, {disagreements} disagree ({findings} findings of the \
         stepped engine)",
        args.schedules,
        args.variant,
        args.schedules - disagreements
    );
    Ok(disagreements > 0)
}
