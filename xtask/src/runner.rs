//! Verbs served by the `moe-runner` binary (`train`, `generate`, `compare-balance`): xtask builds
//! it in release mode with the features the chosen `--backend` needs and hands it the arguments.

use std::process::Command;

/// Runs `moe-runner <verb> <args>`; `--backend cuda|wgpu` among the args compiles that backend in.
pub(crate) fn run(verb: &str, args: &[String]) -> Result<(), String> {
    let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cargo.current_dir(crate::bench::workspace_root()).args(["run", "--quiet", "--release", "-p", "moe-runner"]);
    if let Some(backend) = backend(args)
        && backend != "cpu"
    {
        cargo.args(["--features", &backend]);
    }
    let status = cargo.arg("--").arg(verb).args(args).status().map_err(|e| format!("could not run cargo: {e}"))?;
    if status.success() { Ok(()) } else { Err(format!("moe-runner {verb} failed ({status})")) }
}

/// The value of `--backend X` or `--backend=X`.
fn backend(args: &[String]) -> Option<String> {
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if arg == "--backend" {
            return it.next().cloned();
        }
        if let Some(v) = arg.strip_prefix("--backend=") {
            return Some(v.to_owned());
        }
    }
    None
}
