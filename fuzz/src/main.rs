//! `nmifuzz`: a hypervisor-based fuzzer for x86-64 NMI entry code. See the README.

mod bench;
mod options;

use std::process::ExitCode;

use clap::Parser;

use crate::options::{Cli, Command};

/// Exit code for usage and setup errors (libFuzzer and cargo-fuzz use 1 for findings).
const EXIT_SETUP_ERROR: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(args) => bench::run(&args),
        Command::Variants => {
            options::print_variants();
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_SETUP_ERROR)
        }
    }
}
