//! Command-line interface.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use nmifuzz_abi::Variant;
use vmm::engine::schedule::variant_names;

/// A hypervisor-based fuzzer for x86-64 NMI entry code.
///
/// nmifuzz boots a small guest kernel under KVM, injects NMIs at exactly chosen instructions
/// and checks that the guest's NMI entry survives.
#[derive(Debug, Parser)]
#[command(version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Replay reproducers (schedule JSON files) and print each verdict.
    ///
    /// Exits 1 if any replay ends in a finding, 0 if all pass.
    Replay(ReplayArgs),
    /// Check KVM and print this host's stepping and NMI profile and what it means.
    Doctor,
    /// Exhaustively place a second NMI at every instruction of a first NMI's handling, and a
    /// third in a window after the second. Exits 1 if any run fails.
    Sweep(SweepArgs),
    /// Measure the VMM's costs on this host: exit round trip, reset, reset + idle run.
    Bench(BenchArgs),
    /// List the NMI entry variants linked into the guest.
    Variants,
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Schedule files to replay (artifacts, corpus entries, hand-written seeds).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Replay against this entry variant instead of the one in the file (e.g. check that
    /// `linux` survives what kills `naive`).
    #[arg(long, value_parser = parse_variant)]
    pub variant: Option<String>,
    /// Print the per-step trace: instruction count, RIP as symbol+offset, disassembly, NMI
    /// depth and events.
    #[arg(long)]
    pub trace: bool,
    /// Print one JSON object per file instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SweepArgs {
    /// The entry variant to sweep.
    #[arg(long, default_value = "linux", value_parser = parse_variant)]
    pub variant: String,
    /// How many placements of the first NMI in the workload (1 to 5).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=5))]
    pub placements: u64,
    /// The third NMI goes at every instruction 1..=N after the second (0: no third NMI).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(0..=1000))]
    pub third_window: u64,
    /// Iterations of the workload loop.
    #[arg(long, default_value_t = 20)]
    pub workload_iterations: u32,
    /// Stop at the first failing run.
    #[arg(long)]
    pub stop_on_first: bool,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Accepts a variant name, or explains which names are valid.
pub fn parse_variant(name: &str) -> Result<String, String> {
    match Variant::from_name(name) {
        Some(_) => Ok(name.to_owned()),
        None => Err(format!("unknown variant `{name}`; valid variants: {}", variant_names())),
    }
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Samples per measurement (the median is reported).
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(10..))]
    pub samples: u32,
}

/// Prints the variants, one line each.
pub fn print_variants() {
    for v in Variant::ALL {
        println!("{:<20} {}", v.name(), v.summary());
    }
}
