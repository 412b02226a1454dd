//! Checkpoints of a chaos soak (`nmifuzz chaos --checkpoint FILE`), so that a soak longer than
//! one sitting can be stopped (any signal, SIGKILL included) and resumed where it was.
//!
//! Each run's input depends only on the seed and the run's number, so a soak is fully described
//! by *which* soak it is ([`Soak`]: variant, seed, engine, wall-clock limit, and the nmifuzz
//! build, whose inputs and guest the verdicts are of) and its summary after its last completed
//! run. The file is written atomically before the first run (a path that cannot be written
//! fails the soak at once), after every [`super::SANITY_EVERY`] runs and at the end: a
//! stopped soak loses at most the runs since then, which the resumed one makes again from
//! the same inputs, with any number of jobs. Each process that works on the soak is one
//! [`super::Segment`] of its summary, with its own resident-memory figures: memory is a
//! property of one process.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::Summary;
use crate::options::ChaosArgs;
use crate::store::write_atomic;

/// The checkpoint file's format; a file of another format is refused.
const FORMAT: u32 = 2;

/// Which soak a checkpoint belongs to: everything that decides its inputs and their verdicts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Soak {
    pub variant: String,
    pub seed: u64,
    /// `fast` or `stepped`.
    pub engine: String,
    pub timeout_ms: u64,
    /// The FNV-1a hash of the nmifuzz executable ([`this_build`]): another build may draw
    /// other inputs or run another guest, and a soak is a measurement of one build.
    pub build: String,
}

impl Soak {
    /// The soak `args` ask for, made by this nmifuzz build.
    pub fn of(args: &ChaosArgs) -> Result<Self> {
        let engine = clap::ValueEnum::to_possible_value(&args.engine)
            .expect("every engine has a name")
            .get_name()
            .to_owned();
        Ok(Self {
            variant: args.variant.clone(),
            seed: args.seed,
            engine,
            timeout_ms: args.timeout_ms,
            build: this_build()?,
        })
    }
}

/// The identity of the running nmifuzz build: the FNV-1a hash of its executable.
fn this_build() -> Result<String> {
    let exe = std::fs::read("/proc/self/exe").context("cannot read /proc/self/exe")?;
    Ok(format!("{:016x}", vmm::hash::fnv1a(&exe)))
}

impl std::fmt::Display for Soak {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "--variant {} --seed {} --engine {} --timeout-ms {}, nmifuzz build {}",
            self.variant, self.seed, self.engine, self.timeout_ms, self.build
        )
    }
}

#[derive(Serialize, Deserialize)]
struct Checkpoint {
    format: u32,
    soak: Soak,
    summary: Summary,
}

/// The summary stored in `path` for `soak`, or `None` if there is no file yet. A file that
/// is not a checkpoint, or belongs to another soak, is an error naming it.
pub fn load(path: &Path, soak: &Soak) -> Result<Option<Summary>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let checkpoint: Checkpoint = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not a chaos checkpoint", path.display()))?;
    if checkpoint.format != FORMAT {
        bail!(
            "{} is a chaos checkpoint of format {}, this nmifuzz reads format {FORMAT}",
            path.display(),
            checkpoint.format
        );
    }
    if checkpoint.soak != *soak {
        bail!(
            "{} is the checkpoint of another soak ({}), not of this one ({soak}): give another \
             file, or the same options and the same nmifuzz executable",
            path.display(),
            checkpoint.soak
        );
    }
    Ok(Some(checkpoint.summary))
}

/// Replaces `path` with `summary` of `soak`, atomically.
pub fn save(path: &Path, soak: &Soak, summary: &Summary) -> Result<()> {
    let checkpoint = Checkpoint { format: FORMAT, soak: soak.clone(), summary: summary.clone() };
    let json = serde_json::to_vec(&checkpoint).expect("a summary serializes");
    write_atomic(path, &json).with_context(|| format!("cannot write {}", path.display()))
}
