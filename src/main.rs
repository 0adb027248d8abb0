use anyhow::Result;
use clap::{Parser, Subcommand};
use mue::cli;

#[derive(Parser)]
#[command(
    name = "mue",
    version,
    about = "Multiple-exiting (MuE) inference for vision-language models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the shipped model on example images, MuE beside full depth.
    Demo(cli::demo::DemoArgs),
    /// Caption an image or answer an entailment question with early exits.
    Run(cli::run::RunArgs),
    /// Serve the model over HTTP (dynamic batching, per-request exits, metrics, demo page).
    Serve(cli::serve::ServeArgs),
    /// Load figures for the server: throughput and p50/p99 at 1x and 2x saturation.
    ServeBench(cli::serve::ServeBenchArgs),
    /// Quality, exits and measured reductions of one policy on a TSV split.
    Eval(cli::eval::EvalArgs),
    /// Grid over thresholds / policy parameters: CSV, JSON, Pareto frontier, plots.
    Sweep(cli::eval::SweepArgs),
    /// Choose the cheapest thresholds that keep a target fraction of full-depth quality.
    Calibrate(cli::eval::CalibrateArgs),
    /// Regenerate docs/results.md: calibrate, sweep every baseline, ablations, the table.
    Report(cli::report::ReportArgs),
    /// Time the image / caption / entail workloads at full depth (issue 19's benchmark).
    Bench(cli::bench::BenchArgs),
    /// Convert a Hugging Face OFA checkpoint into an engine model directory.
    Convert(cli::convert::ConvertArgs),
    /// Fine-tune with the layer-wise loss (decomposed encoder) on CPU.
    Train(cli::train::TrainArgs),
    /// Benchmark data.
    #[command(subcommand)]
    Data(DataCommand),
}

#[derive(Subcommand)]
enum DataCommand {
    /// Generate the procedural benchmark (OFA-style TSV files).
    Generate(GenerateArgs),
    /// Write example images and hypotheses for the demo.
    Examples {
        #[arg(long, default_value = "examples")]
        out: std::path::PathBuf,
        #[arg(long, default_value_t = 4)]
        n: usize,
        /// Image side in pixels (default 64; v2: 128).
        #[arg(long)]
        image_size: Option<u32>,
        /// Benchmark version the examples come from (its test split, seed 0).
        #[arg(long = "version", default_value_t = 1)]
        bench_version: u32,
    },
}

#[derive(clap::Args)]
struct GenerateArgs {
    #[arg(long, default_value = "data/bench")]
    out: std::path::PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Training images (default 5000; v2: 30000).
    #[arg(long)]
    train: Option<usize>,
    /// Validation images (default 200; v2: 2000).
    #[arg(long)]
    valid: Option<usize>,
    /// Test images (default 200; v2: 2000).
    #[arg(long)]
    test: Option<usize>,
    /// Image side in pixels (default 64; v2: 128, at least 128).
    #[arg(long)]
    image_size: Option<u32>,
    /// Benchmark version: 1 (the original, default) or 2 (issue 23: 64 patches,
    /// compositional questions, splits disjoint by content).
    #[arg(long = "version", default_value_t = 1)]
    bench_version: u32,
}

// Freed activations stay with the process for the next layer or step (see
// `mue::model::memory`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        // Colours only on a terminal: log files and journald get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let command = Cli::parse().command;
    // The server gives idle memory back after a second; batch work keeps it.
    let serving = matches!(command, Command::Serve(_));
    mue::model::memory::keep_freed_memory(serving.then_some(1000));
    // `mue bench` sets the count from --threads itself.
    if !matches!(command, Command::Bench(_)) {
        mue::model::threads::fix_thread_count();
    }
    match command {
        Command::Demo(a) => cli::demo::main(a),
        Command::Run(a) => cli::run::main(a),
        Command::Serve(a) => cli::serve::main(a),
        Command::ServeBench(a) => cli::serve::bench_main(a),
        Command::Train(a) => cli::train::main(a),
        Command::Convert(a) => cli::convert::main(a),
        Command::Bench(a) => cli::bench::main(a),
        Command::Eval(a) => cli::eval::eval_main(a),
        Command::Sweep(a) => cli::eval::sweep_main(a),
        Command::Calibrate(a) => cli::eval::calibrate_main(a),
        Command::Report(a) => cli::report::main(a),
        Command::Data(DataCommand::Generate(a)) => {
            let v2 = a.bench_version == 2;
            let pick = |flag: Option<usize>, v1: usize, v2_default: usize| {
                flag.unwrap_or(if v2 { v2_default } else { v1 })
            };
            use mue::data::benchmark::v2::{DEFAULT_TEST, DEFAULT_TRAIN, DEFAULT_VALID};
            let opts = mue::data::GenerateOptions {
                out_dir: a.out,
                seed: a.seed,
                n_train: pick(a.train, 5000, DEFAULT_TRAIN),
                n_val: pick(a.valid, 200, DEFAULT_VALID),
                n_test: pick(a.test, 200, DEFAULT_TEST),
                image_size: a.image_size.unwrap_or(if v2 { 128 } else { 64 }),
            };
            let report = mue::data::benchmark::generate_version(&opts, a.bench_version)?;
            println!("{}", serde_json::to_string_pretty(&report.stats)?);
            for (split, t) in &report.twins {
                eprintln!(
                    "mue: {split} items with a verbatim twin in train: scenes {} of {}, \
                     hypotheses {} of {}, captions {} of {}",
                    t.scenes_with_train_twin,
                    t.images,
                    t.hypotheses_in_train,
                    t.hypotheses,
                    t.captions_in_train,
                    t.captions
                );
            }
            Ok(())
        }
        Command::Data(DataCommand::Examples {
            out,
            n,
            image_size,
            bench_version,
        }) => {
            let side = image_size.unwrap_or(if bench_version == 2 { 128 } else { 64 });
            cli::demo::write_examples(&out, bench_version, n, side)
        }
    }
}
