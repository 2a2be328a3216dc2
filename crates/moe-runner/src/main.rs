//! `moe-runner`: the CLI behind `cargo xtask train` and friends.

use std::path::PathBuf;
use std::process::ExitCode;

use burn::tensor::backend::AutodiffBackend;
use clap::{Parser, Subcommand, ValueEnum};
use moe_model::generate::GenerateConfig;
use moe_parallel::sim::{SimConfig, simulate};
use moe_runner::compare::{plot_path, run_arms, write_results};
use moe_runner::sample::{continue_text, load_run};
use moe_runner::settings::{Layers, RunConfig};
use moe_runner::sim_plot::plot_simulation;
use moe_runner::train::{RunOptions, train};
use moe_runner::{hf_checkpoint, report};

/// Runs `$body` with `$B` bound to the chosen autodiff backend and `$device` to its device;
/// a backend not compiled in is an error that says how to enable it.
macro_rules! with_backend {
    ($choice:expr, |$B:ident, $device:ident| $body:expr) => {
        match $choice {
            BackendChoice::Cpu => with_backend!(@arm "cpu", burn::backend::Flex, $B, $device, $body),
            BackendChoice::Cuda => with_backend!(@arm "cuda", burn::backend::Cuda, $B, $device, $body),
            BackendChoice::Wgpu => with_backend!(@arm "wgpu", burn::backend::Wgpu, $B, $device, $body),
        }
    };
    (@arm $feature:literal, $backend:ty, $B:ident, $device:ident, $body:expr) => {{
        #[cfg(feature = $feature)]
        {
            type $B = burn::backend::Autodiff<$backend>;
            let $device = Default::default();
            Ok::<_, Error>($body?)
        }
        #[cfg(not(feature = $feature))]
        Err::<_, Error>(missing($feature))
    }};
}

#[derive(Parser)]
#[command(name = "moe-runner", about = "Train, sample and compare DeepSeek-style MoE language models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum BackendChoice {
    Cpu,
    Cuda,
    Wgpu,
}

impl BackendChoice {
    fn is_gpu(self) -> bool {
        !matches!(self, Self::Cpu)
    }
}

/// Keeps cubecl's compiled kernels and autotune results in one directory for every run of a GPU
/// backend, whatever the working directory: `BURN_MOE_KERNEL_CACHE` (not `MOE_*`, which sets
/// the run's settings), else the user's cache directory (`~/.cache/burn-moe/kernels`). Without
/// it a run started outside the repository compiles and tunes every kernel again.
fn keep_kernel_caches(backend: BackendChoice) {
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    if backend.is_gpu() {
        let dir = std::env::var_os("BURN_MOE_KERNEL_CACHE")
            .map(PathBuf::from)
            .or_else(|| dirs::cache_dir().map(|d| d.join("burn-moe").join("kernels")));
        if let Some(dir) = dir {
            moe_kernels::cube::keep_kernel_caches_in(&dir);
        }
    }
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    let _ = backend;
}

#[derive(clap::Args)]
struct ConfigArgs {
    /// A TOML file layered over the built-in default (e.g. configs/small.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override one key, e.g. `--set train.steps=200` (repeatable; last wins).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

// Parsed once per process: the size gap between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Train a model (the default run: configs/tiny.toml on the shipped Shakespeare).
    Train {
        #[command(flatten)]
        config: ConfigArgs,
        /// Train on this UTF-8 text file instead of the shipped corpus.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Where the run's files go (default runs/<name>).
        #[arg(long)]
        run_dir: Option<PathBuf>,
        /// Continue the run in --run-dir from its newest checkpoint.
        #[arg(long)]
        resume: bool,
        /// Which backend trains.
        #[arg(long, value_enum, default_value = "cpu")]
        backend: BackendChoice,
        /// Time each step's phases (forward, loss read, backward, optimizer, balance) with a
        /// device sync after each; the split goes to metrics.jsonl and a summary line.
        #[arg(long)]
        profile: bool,
    },
    /// Sample from a trained run (--run) or an HF DeepSeek-V3 checkpoint (--checkpoint).
    Generate {
        /// A run directory of `train` (its newest checkpoint is used).
        #[arg(long, required_unless_present = "checkpoint", conflicts_with = "checkpoint")]
        run: Option<PathBuf>,
        /// An HF checkpoint folder (config.json + safetensors, tokenizer.json if it has one).
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// Text to continue.
        #[arg(long, default_value = "")]
        prompt: String,
        /// The prompt as token ids, comma-separated (--checkpoint; instead of --prompt).
        #[arg(long, value_delimiter = ',', requires = "checkpoint")]
        ids: Option<Vec<i64>>,
        /// Tokens (bytes, for a run) to generate.
        #[arg(long, default_value_t = 400)]
        length: usize,
        /// Softmax temperature (0: greedy).
        #[arg(long, default_value_t = 0.8)]
        temperature: f64,
        /// Nucleus sampling mass.
        #[arg(long, default_value_t = 0.95)]
        top_p: f64,
        /// Seeds the draws.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Which backend runs the model.
        #[arg(long, value_enum, default_value = "cpu")]
        backend: BackendChoice,
    },
    /// Logits of an HF checkpoint for the `input_ids` of a safetensors file (f32, written as `logits`).
    Logits {
        /// An HF checkpoint folder (config.json + safetensors).
        #[arg(long)]
        checkpoint: PathBuf,
        /// A safetensors file holding `input_ids` [B, T] (I64 or I32).
        #[arg(long)]
        input: PathBuf,
        /// Where to write `logits` [B, T, V] (F32).
        #[arg(long)]
        output: PathBuf,
        /// Which backend runs the model (f32).
        #[arg(long, value_enum, default_value = "cpu")]
        backend: BackendChoice,
    },
    /// Simulate expert-parallel all-to-all traffic on a cluster (defaults: DeepSeek-V3's).
    Simulate(SimulateArgs),
    /// Train with balance.mode none, aux_loss and loss_free on one budget; write a table and a plot.
    CompareBalance {
        #[command(flatten)]
        config: ConfigArgs,
        /// Where the three runs go (as <DIR>/compare-<mode>).
        #[arg(long, default_value = "runs")]
        runs: PathBuf,
        /// The markdown table; the plot goes beside it as results-balance.png.
        #[arg(long, default_value = "docs/results.md")]
        output: PathBuf,
        /// Which backend trains.
        #[arg(long, value_enum, default_value = "cpu")]
        backend: BackendChoice,
    },
}

/// Flags of `simulate`; each one unset keeps `SimConfig`'s default (DeepSeek-V3's setting).
#[derive(clap::Args)]
struct SimulateArgs {
    /// GPUs in the cluster.
    #[arg(long)]
    gpus: Option<usize>,
    /// GPUs per node.
    #[arg(long)]
    gpus_per_node: Option<usize>,
    /// GPUs in one expert-parallel group (default: gcd of --gpus and --experts).
    #[arg(long)]
    ep_gpus: Option<usize>,
    /// Routed experts.
    #[arg(long)]
    experts: Option<usize>,
    /// Experts per token.
    #[arg(long)]
    top_k: Option<usize>,
    /// Node limit M, or `none`.
    #[arg(long)]
    max_nodes: Option<String>,
    /// Shared experts.
    #[arg(long)]
    shared: Option<usize>,
    /// Token width d.
    #[arg(long)]
    hidden: Option<usize>,
    /// Width of one expert.
    #[arg(long)]
    expert_hidden: Option<usize>,
    /// Tokens each GPU routes per layer.
    #[arg(long)]
    tokens_per_gpu: Option<usize>,
    /// uniform | zipf:S | trace:FILE (a routing_trace.bin from a training run).
    #[arg(long)]
    routing: Option<String>,
    /// NVLink GB/s per GPU.
    #[arg(long)]
    nvlink_gbps: Option<f64>,
    /// InfiniBand GB/s per GPU.
    #[arg(long)]
    ib_gbps: Option<f64>,
    /// Bytes per element dispatched (1: FP8).
    #[arg(long)]
    dispatch_bytes: Option<usize>,
    /// Bytes per element combined (2: BF16).
    #[arg(long)]
    combine_bytes: Option<usize>,
    /// Achieved TFLOP/s of one GPU on the expert GEMMs.
    #[arg(long)]
    gpu_tflops: Option<f64>,
    /// Seeds the sampled routing.
    #[arg(long)]
    seed: Option<u64>,
    /// Also write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The bar charts (nodes, bytes and time per scenario) go here.
    #[arg(long, default_value = "runs/simulate.png")]
    png: PathBuf,
}

impl SimulateArgs {
    fn config(&self) -> Result<SimConfig, Error> {
        let mut c = SimConfig::default();
        macro_rules! take {
            ($($field:ident),*) => { $( if let Some(v) = self.$field.clone() { c.$field = v; } )* };
        }
        take!(gpus, gpus_per_node, experts, top_k, shared, hidden, expert_hidden, tokens_per_gpu, nvlink_gbps, ib_gbps);
        take!(dispatch_bytes, combine_bytes, gpu_tflops, seed);
        if self.ep_gpus.is_some() {
            c.ep_gpus = self.ep_gpus;
        }
        if let Some(m) = &self.max_nodes {
            c.max_nodes = match m.as_str() {
                "none" => None,
                n => Some(n.parse().map_err(|_| format!("--max-nodes {n}: expected a number or `none`"))?),
            };
        }
        if let Some(r) = &self.routing {
            c.routing = r.parse()?;
        }
        Ok(c)
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

type Error = Box<dyn std::error::Error>;

fn run(cli: Cli) -> Result<(), Error> {
    let backend = match &cli.command {
        Command::Train { backend, .. }
        | Command::Generate { backend, .. }
        | Command::Logits { backend, .. }
        | Command::CompareBalance { backend, .. } => Some(*backend),
        Command::Simulate(_) => None,
    };
    if let Some(backend) = backend {
        keep_kernel_caches(backend);
    }
    match cli.command {
        Command::Train { config, data, run_dir, resume, backend, profile } => {
            let mut set = config.set;
            if let Some(data) = data {
                set.push(format!("data.path={}", data.display()));
            }
            let run = RunConfig::load(&Layers { file: config.config, env: true, set })?;
            let run_dir = run_dir.unwrap_or_else(|| PathBuf::from("runs").join(&run.name));
            let options = RunOptions {
                run_dir: run_dir.clone(),
                resume,
                progress: true,
                stop_at: None,
                gpu: backend.is_gpu(),
                profile,
            };
            println!("training `{}` into {}", run.name, run_dir.display());
            let summary = with_backend!(backend, |B, device| train::<B>(&run, &device, &options))?;
            println!(
                "done: {} steps in {:.0} s ({:.0} tokens/s); val loss {:.3} nats/byte ({:.3} bits/byte), val MaxVio {:.3}",
                summary.steps,
                summary.elapsed_s,
                summary.tokens_per_s,
                summary.eval.val_loss,
                summary.eval.val_bpb,
                summary.eval.val_max_vio
            );
            println!("\n{}", report::write(&run_dir, &run, &summary)?);
            println!("run files: {}", run_dir.display());
            println!("sample:    cargo xtask generate --run {} --prompt \"ROMEO:\"", run_dir.display());
            Ok(())
        }
        Command::Generate { run, checkpoint, prompt, ids, length, temperature, top_p, seed, backend } => {
            let sampling = hf_checkpoint::sampling(temperature, top_p);
            if let Some(dir) = checkpoint {
                let config = GenerateConfig { max_new_tokens: length, sampling, seed, eos_token_id: None };
                let out = with_backend!(backend, |B, device| {
                    hf_checkpoint::generate_from_checkpoint::<<B as AutodiffBackend>::InnerBackend>(
                        &dir, &prompt, ids, &config, &device,
                    )
                })?;
                match out.text {
                    Some(text) => println!("{prompt}{text}"),
                    None => println!("prompt ids {:?}\nnew ids {:?}", out.prompt_ids, out.ids),
                }
                return Ok(());
            }
            let run = run.ok_or("--run or --checkpoint is required")?;
            let text = with_backend!(backend, |B, device| {
                let (model, context) = load_run::<<B as AutodiffBackend>::InnerBackend>(&run, &device)?;
                continue_text(&model, context, prompt.as_bytes(), length, sampling, seed)
            })?;
            println!("{prompt}{}", String::from_utf8_lossy(&text));
            Ok(())
        }
        Command::Logits { checkpoint, input, output, backend } => {
            let shape = with_backend!(backend, |B, device| {
                hf_checkpoint::logits::<<B as AutodiffBackend>::InnerBackend>(&checkpoint, &input, &output, &device)
            })?;
            println!("wrote logits {shape:?} to {}", output.display());
            Ok(())
        }
        Command::Simulate(args) => {
            let report = simulate(&args.config()?)?;
            println!("{report}");
            if let Some(path) = &args.json {
                std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
            }
            if let Some(dir) = args.png.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            plot_simulation(&args.png, &report)?;
            println!("plot: {}", args.png.display());
            Ok(())
        }
        Command::CompareBalance { config, runs, output, backend } => {
            let run = RunConfig::load(&Layers { file: config.config, env: true, set: config.set.clone() })?;
            let arms = with_backend!(backend, |B, device| run_arms::<B>(&run, &runs, &device, backend.is_gpu()))?;
            let mut command = String::from("cargo xtask compare-balance");
            for item in &config.set {
                command.push_str(&format!(" --set {item}"));
            }
            let text = write_results(&arms, &run, &command, &output, &plot_path(&output))?;
            println!("\n{text}\nwritten to {}", output.display());
            Ok(())
        }
    }
}

#[allow(dead_code)]
fn missing(feature: &str) -> Error {
    format!(
        "the {feature} backend is not compiled in: build with `--features {feature}` \
         (cargo xtask train --backend {feature} does this for you)"
    )
    .into()
}
