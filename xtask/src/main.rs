//! `cargo xtask <verb>`: the project's runner. Kept small: it drives cargo and reads results.

mod bench;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "burn-moe tasks")]
struct Cli {
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Subcommand)]
enum Verb {
    /// Run the criterion benches of the MoE layer and print a table.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let result = match Cli::parse().verb {
        Verb::Bench(args) => bench::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
