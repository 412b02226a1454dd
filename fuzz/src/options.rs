//! Command-line interface.

use clap::{Args, Parser, Subcommand};
use nmifuzz_abi::Variant;

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
    /// Measure the VMM's costs on this host: exit round trip, reset, reset + idle run.
    Bench(BenchArgs),
    /// List the NMI entry variants linked into the guest.
    Variants,
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
