//! `nmifuzz`: a hypervisor-based fuzzer for x86-64 NMI entry code. See the README.

mod bench;
mod broker;
mod campaign;
mod chaos;
mod cmin;
mod corpus;
mod doctor;
mod eval;
mod executor;
mod feedback;
mod input;
mod kernel;
mod launch;
mod modes;
mod new_entry;
mod options;
mod points;
mod progress;
mod regenerate;
mod replay;
mod ring3;
mod shmem;
mod signatures;
mod smoke;
mod states;
mod stats;
mod status;
mod store;
mod sweep;
mod systematic;
mod target;
mod tmin;

use std::process::ExitCode;

use clap::Parser;

use crate::options::{Cli, Command};

/// Exit code for usage and setup errors (libFuzzer and cargo-fuzz use 1 for findings).
const EXIT_SETUP_ERROR: u8 = 2;
/// Exit code when a finding was made or reproduced.
const EXIT_FINDING: u8 = 1;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Replay(_) | Command::Variants) {
        end_quietly_on_closed_pipe();
    }
    let result = match cli.command {
        Command::Run(args) => launch::run(&args),
        Command::Tmin(args) => tmin::run(&args).map(|()| false),
        Command::Cmin(args) => cmin::run(&args).map(|()| false),
        Command::Smoke(args) => smoke::run(&args),
        Command::Replay(args) => replay::run(&args),
        Command::Doctor => doctor::run().map(|()| false),
        Command::Sweep(args) => sweep::run(&args),
        Command::Chaos(args) => chaos::run(&args),
        Command::Bench(args) => bench::run(&args).map(|()| false),
        Command::Signatures(args) => signatures::run(&args),
        Command::Modes(args) => modes::run(&args),
        Command::Eval(args) => eval::run(&args).map(|()| false),
        Command::EvalJob(args) => eval::run_job(&args).map(|()| false),
        Command::NewEntry(args) => new_entry::run(&args).map(|()| false),
        Command::Variants => {
            options::print_variants();
            Ok(false)
        }
    };
    match result {
        Ok(false) => ExitCode::SUCCESS,
        Ok(true) => ExitCode::from(EXIT_FINDING),
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            ExitCode::from(EXIT_SETUP_ERROR)
        }
    }
}

/// Lets a command whose output is piped (`replay --trace ... | head`) end like other Unix tools
/// when the reader goes away, instead of panicking at the next print: Rust ignores SIGPIPE. Only
/// for commands that just print; campaigns keep ignoring it, since their brokers talk over TCP
/// and must see a closed connection as an error, not die of it.
fn end_quietly_on_closed_pipe() {
    // SAFETY: restores the default disposition of one signal before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// The error and its causes, leaving out a cause that the message before it already quotes
/// (most of nmifuzz's errors include their source in their own message).
fn describe(error: &anyhow::Error) -> String {
    let mut text = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text = format!("{text}: {cause}");
        }
    }
    text
}
