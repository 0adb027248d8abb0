//! `mue bench`: the three full-depth workloads of issue 19, timed on a model directory,
//! printed in the same form as `bench_torch.py` (the PyTorch reference) so that the two
//! engines' lines can be compared side by side.
//!
//! Workloads (full depth, median of `--iters` runs after one warm-up):
//!   image    the image trunk alone on the batch of images
//!   caption  encoder, then `--steps` cached greedy decoder steps (no EOS stop)
//!   entail   encoder, then three answer candidates scored after BOS
//! Inputs: images N(0, 1) `[B, 3, S, S]` (seeded), text ids `[BOS, 12 ids, EOS]` per row
//! with the reference's ids `4 + (13 i + 7 j) % 500` (folded into a smaller vocabulary).

use crate::exit::FullDepth;
use crate::generate::{self, Input, KvFill, SearchConfig};
use crate::model::{Config, ImageEmbedder, Model};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Model directory (config.json, model.safetensors) [default: $MUE_MODEL,
    /// ./models/default, or models/default beside the executable].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Batch sizes, comma-separated.
    #[arg(long, default_value = "1,8", value_delimiter = ',')]
    pub batch: Vec<usize>,
    /// Greedy decoder steps of the caption workload.
    #[arg(long, default_value_t = 16)]
    pub steps: usize,
    /// Timed runs per workload (after one warm-up); the median and minimum are printed.
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    /// Worker threads (sets RAYON_NUM_THREADS unless it is already set).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Only these workloads (image, caption, entail), comma-separated.
    #[arg(long, default_value = "image,caption,entail", value_delimiter = ',')]
    pub workloads: Vec<String>,
    /// Time candle's composed ops instead of the inference kernels (the engine before
    /// issue 19), to compare the two in one sitting.
    #[arg(long)]
    pub reference_kernels: bool,
    #[command(flatten)]
    pub load: super::load::LoadArgs,
}

/// One timed workload.
#[derive(Debug, Clone)]
pub struct BenchLine {
    pub workload: String,
    pub batch: usize,
    pub median_ms: f64,
    pub min_ms: f64,
    /// Multiply-adds of one run (the whole batch).
    pub macs: u64,
    pub peak_rss_mib: f64,
}

impl BenchLine {
    /// Achieved GFLOP/s at the median (2 flops per multiply-add).
    pub fn gflops(&self) -> f64 {
        2.0 * self.macs as f64 / (self.median_ms * 1e6)
    }
}

/// The OFA size a configuration matches (`bench_torch.py`'s names), else its dimensions.
pub fn size_name(cfg: &Config) -> String {
    let resnet = |b: [usize; 3]| matches!(cfg.image_embedder, ImageEmbedder::Resnet { blocks } if blocks == b);
    let dims = (cfg.d_model, cfg.encoder_layers, cfg.decoder_layers);
    match dims {
        (256, 4, 4) if resnet([3, 4, 6]) => "tiny".into(),
        (512, 4, 4) if resnet([3, 4, 23]) => "medium".into(),
        (768, 6, 6) if resnet([3, 4, 23]) => "base".into(),
        (d, e, l) => format!("d{d}-{e}x{l}"),
    }
}

/// Seeded inputs of the model's image size: `batch` images N(0, 1) and the reference's ids.
pub fn bench_inputs(cfg: &Config, batch: usize, seed: u64) -> Result<Vec<Input>> {
    use rand::SeedableRng;
    use rand_distr::{Distribution, StandardNormal};
    if cfg.vocab_size <= 13 {
        bail!(
            "the model's vocabulary ({}) is too small for the benchmark's token ids",
            cfg.vocab_size
        );
    }
    let s = cfg.image_size;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let span = 500.min(cfg.vocab_size - 4);
    (0..batch)
        .map(|i| {
            let pixels: Vec<f32> = (0..3 * s * s)
                .map(|_| StandardNormal.sample(&mut rng))
                .collect();
            let text_ids = std::iter::once(cfg.bos_id)
                .chain((0..12).map(|j| 4 + ((i * 13 + j * 7) % span) as u32))
                .chain(std::iter::once(cfg.eos_id))
                .collect();
            Ok(Input {
                image: Tensor::from_vec(pixels, (3, s, s), &Device::Cpu)?,
                text_ids,
            })
        })
        .collect()
}

/// Largest resident set size of this process so far, in MiB (Linux; 0 elsewhere).
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Median and minimum wall time (ms) of `f` over `iters` runs after one warm-up, and the
/// multiply-adds the warm-up reported.
fn time<F: FnMut() -> Result<u64>>(iters: usize, mut f: F) -> Result<(f64, f64, u64)> {
    let macs = f()?;
    let mut t = Vec::with_capacity(iters);
    for _ in 0..iters {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(f64::total_cmp);
    Ok((t[t.len() / 2], t[0], macs))
}

/// Time `workload` at `batch` on `model`.
pub fn run_workload(
    model: &Model,
    workload: &str,
    batch: usize,
    steps: usize,
    iters: usize,
) -> Result<BenchLine> {
    if batch == 0 || iters == 0 || steps == 0 {
        bail!("--batch, --iters and --steps must be at least 1");
    }
    let inputs = bench_inputs(&model.cfg, batch, 1)?;
    let (median_ms, min_ms, macs) = match workload {
        "image" => {
            let images = generate::batch_inputs(model, &inputs)?.0;
            let macs = model.encoder.image_trunk.macs(model.cfg.image_size) * batch as u64;
            time(iters, || {
                model.encoder.image_trunk.features(&images)?;
                Ok(macs)
            })?
        }
        "caption" => {
            if steps < 2 {
                bail!("--steps must be at least 2 for the caption workload (its last step is the forced end of sequence)");
            }
            // min_len = max_len = steps - 1: `steps` decoder steps, the last one forced to EOS.
            let search = SearchConfig {
                beam: 1,
                max_len: steps - 1,
                min_len: steps - 1,
                no_repeat_ngram: 0,
                len_penalty: 1.0,
                kv_fill: KvFill::Propagate,
            };
            time(iters, || {
                let out = generate::caption(model, &inputs, &FullDepth, &search)?;
                Ok(out.iter().map(|r| r.cost.macs_executed).sum())
            })?
        }
        "entail" => {
            let prefixes = vec![vec![model.cfg.bos_id]; batch];
            let candidates = vec![vec![10u32], vec![11], vec![12]];
            time(iters, || {
                let out = generate::classify(model, &inputs, &prefixes, &candidates, &FullDepth)?;
                Ok(out.iter().map(|r| r.cost.macs_executed).sum())
            })?
        }
        other => bail!("unknown workload {other:?} (image, caption or entail)"),
    };
    Ok(BenchLine {
        workload: workload.to_string(),
        batch,
        median_ms,
        min_ms,
        macs,
        peak_rss_mib: peak_rss_mib(),
    })
}

pub fn main(args: BenchArgs) -> Result<()> {
    if args.threads == 0 {
        bail!("--threads must be at least 1");
    }
    // candle and gemm size their pools from RAYON_NUM_THREADS on first use.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", args.threads.to_string());
    }
    let threads: usize = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(args.threads);
    for w in &args.workloads {
        if !["image", "caption", "entail"].contains(&w.as_str()) {
            bail!("unknown workload {w:?} in --workloads (image, caption or entail)");
        }
    }
    let dir = super::model_dir(args.model.as_deref())?;
    let mut model = Model::load_dir(&dir, &Device::Cpu)
        .with_context(|| format!("cannot load the model in {}", dir.display()))?;
    crate::model::precision::apply(&mut model, args.load.precision)?;
    crate::model::infer::set_reference_kernels(args.reference_kernels);
    let size = size_name(&model.cfg);
    let engine = if args.reference_kernels {
        "mue-reference"
    } else {
        "mue"
    };
    let precision = args.load.precision;
    for &b in &args.batch {
        for w in &args.workloads {
            let line = run_workload(&model, w, b, args.steps, args.iters)?;
            println!(
                "{engine} size={size} side={} threads={threads} {} batch={} steps={} median_ms={:.2} \
                 min_ms={:.2} gflops={:.1} peak_rss_mib={:.0} precision={precision}",
                model.cfg.image_size,
                line.workload,
                line.batch,
                args.steps,
                line.median_ms,
                line.min_ms,
                line.gflops(),
                line.peak_rss_mib
            );
        }
    }
    Ok(())
}
