//! `cargo xtask <verb>`: the project's runner. Kept small: it drives cargo and reads results;
//! training and sampling live in the `moe-runner` crate, which it builds and calls.

mod bench;
mod runner;
mod train_bench;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "burn-moe tasks")]
struct Cli {
    #[command(subcommand)]
    verb: Verb,
}

// Parsed once per process: the size gap between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Verb {
    /// Run the criterion benches of the MoE layer and print a table.
    Bench(bench::BenchArgs),
    /// Train a DeepSeek-style MoE language model (`cargo xtask train --help` for the options).
    #[command(disable_help_flag = true)]
    Train(Forwarded),
    /// Sample from a trained run or an HF checkpoint.
    #[command(disable_help_flag = true)]
    Generate(Forwarded),
    /// Logits of an HF checkpoint for the input_ids of a safetensors file.
    #[command(disable_help_flag = true)]
    Logits(Forwarded),
    /// Simulate expert-parallel all-to-all traffic on a cluster.
    #[command(disable_help_flag = true)]
    Simulate(Forwarded),
    /// Train with no balancing, the aux loss and loss-free balancing; write docs/results.md.
    #[command(disable_help_flag = true)]
    CompareBalance(Forwarded),
}

/// Arguments handed unparsed to `moe-runner`, which documents them.
#[derive(clap::Args)]
struct Forwarded {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

fn main() -> ExitCode {
    let result = match Cli::parse().verb {
        Verb::Bench(args) => bench::run(&args),
        Verb::Train(f) => runner::run("train", &f.args),
        Verb::Generate(f) => runner::run("generate", &f.args),
        Verb::Logits(f) => runner::run("logits", &f.args),
        Verb::Simulate(f) => runner::run("simulate", &f.args),
        Verb::CompareBalance(f) => runner::run("compare-balance", &f.args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
