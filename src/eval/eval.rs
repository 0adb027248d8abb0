//! Evaluate an [`Engine`] with an exit policy on a TSV split: task quality (VE accuracy;
//! caption BLEU-4 / CIDEr-D / ROUGE-L), where rows exited, and the reduction of work three
//! ways (layers, executed multiply-adds, measured wall clock against a full-depth run of the
//! same split in the same process). Also the per-example oracle depth.

use super::metrics;
use crate::cli::Task;
use crate::data::{CaptionReader, CaptionRow, VeReader, VeRow};
use crate::exit::{ExitPolicy, FullDepth, StaticDepth};
use crate::generate::{Exits, SearchConfig};
use crate::pipeline::{Engine, EntailRequest};
use anyhow::{bail, Context, Result};
use image::DynamicImage;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::io::BufReader;
use std::path::Path;
use std::time::Instant;

/// An evaluation split.
#[derive(Debug, Clone)]
pub enum Dataset {
    Entail(Vec<VeRow>),
    Caption(Vec<CaptionRow>),
}

impl Dataset {
    /// Read an OFA TSV file (`snli_ve_*.tsv` or `caption_*.tsv`), at most `limit` rows.
    pub fn load(path: &Path, task: Task, limit: Option<usize>) -> Result<Self> {
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let reader = BufReader::new(file);
        let limit = limit.unwrap_or(usize::MAX);
        let ctx = || format!("reading {}", path.display());
        let data = match task {
            Task::Entail => Dataset::Entail(
                VeReader::new(reader)
                    .take(limit)
                    .collect::<Result<Vec<_>, _>>()
                    .with_context(ctx)?,
            ),
            Task::Caption => Dataset::Caption(
                CaptionReader::new(reader)
                    .take(limit)
                    .collect::<Result<Vec<_>, _>>()
                    .with_context(ctx)?,
            ),
        };
        if data.is_empty() {
            bail!("{} has no examples", path.display());
        }
        Ok(data)
    }

    pub fn task(&self) -> Task {
        match self {
            Dataset::Entail(_) => Task::Entail,
            Dataset::Caption(_) => Task::Caption,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Dataset::Entail(r) => r.len(),
            Dataset::Caption(r) => r.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How to run an evaluation.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Requests per engine call.
    pub batch: usize,
    pub search: SearchConfig,
    /// Show progress bars.
    pub progress: bool,
    /// Put the split's premise into the entailment prompt. Off by default: the project's
    /// models are trained on image + hypothesis, and a prompt format the model never saw
    /// silently costs accuracy.
    pub premise: bool,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            batch: 8,
            search: SearchConfig::default(),
            progress: false,
            premise: false,
        }
    }
}

/// What the engine answered for one example.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExampleOutput {
    pub id: String,
    /// Label name (entailment) or caption text.
    pub prediction: String,
    /// Caption token ids (empty for entailment).
    pub tokens: Vec<u32>,
    pub exits: Exits,
    pub macs_executed: u64,
    pub macs_full: u64,
}

/// One pass of a policy over a split.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunOutputs {
    pub policy: String,
    pub examples: Vec<ExampleOutput>,
    /// Wall time of all engine calls.
    pub wall_ms: f64,
}

impl RunOutputs {
    /// Whether example `i` has the same output as in `other`.
    pub fn same_output(&self, other: &RunOutputs, i: usize) -> bool {
        let (a, b) = (&self.examples[i], &other.examples[i]);
        a.prediction == b.prediction && a.tokens == b.tokens
    }
}

pub(crate) fn progress_bar(len: usize, show: bool, msg: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len as u64);
    if let Ok(style) =
        ProgressStyle::with_template("{msg:>24} [{bar:30}] {pos}/{len} ({elapsed}, eta {eta})")
    {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(msg.to_string());
    pb
}

/// Run `policy` over every example of `data`.
pub fn run(
    engine: &Engine,
    data: &Dataset,
    policy: &dyn ExitPolicy,
    opts: &EvalOptions,
) -> Result<RunOutputs> {
    if opts.batch == 0 {
        bail!("batch size must be at least 1");
    }
    let pb = progress_bar(data.len(), opts.progress, &policy.name());
    let mut examples = Vec::with_capacity(data.len());
    let mut wall_ms = 0.0;
    match data {
        Dataset::Entail(rows) => {
            for chunk in rows.chunks(opts.batch) {
                let reqs: Vec<EntailRequest> = chunk
                    .iter()
                    .map(|r| EntailRequest {
                        image: DynamicImage::ImageRgb8(r.image.clone()),
                        hypothesis: r.hypothesis.clone(),
                        premise: Some(r.premise.clone())
                            .filter(|p| opts.premise && !p.trim().is_empty()),
                    })
                    .collect();
                let start = Instant::now();
                let outs = engine.entail(&reqs, policy)?;
                wall_ms += start.elapsed().as_secs_f64() * 1e3;
                for (r, o) in chunk.iter().zip(outs) {
                    examples.push(ExampleOutput {
                        id: r.id.clone(),
                        prediction: o.label,
                        tokens: Vec::new(),
                        macs_executed: o.cost.macs_executed,
                        macs_full: o.cost.macs_full,
                        exits: o.exits,
                    });
                }
                pb.inc(chunk.len() as u64);
            }
        }
        Dataset::Caption(rows) => {
            for chunk in rows.chunks(opts.batch) {
                let images: Vec<DynamicImage> = chunk
                    .iter()
                    .map(|r| DynamicImage::ImageRgb8(r.image.clone()))
                    .collect();
                let start = Instant::now();
                let outs = engine.caption(&images, policy, &opts.search)?;
                wall_ms += start.elapsed().as_secs_f64() * 1e3;
                for (r, o) in chunk.iter().zip(outs) {
                    examples.push(ExampleOutput {
                        id: r.id.clone(),
                        prediction: o.caption,
                        tokens: o.tokens,
                        macs_executed: o.cost.macs_executed,
                        macs_full: o.cost.macs_full,
                        exits: o.exits,
                    });
                }
                pb.inc(chunk.len() as u64);
            }
        }
    }
    pb.finish_and_clear();
    Ok(RunOutputs {
        policy: policy.name(),
        examples,
        wall_ms,
    })
}

/// Task quality of a run. `primary` is accuracy (entailment) or CIDEr-D (captioning).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Quality {
    pub primary: f64,
    pub accuracy: Option<f64>,
    pub bleu4: Option<f64>,
    pub cider: Option<f64>,
    pub rouge_l: Option<f64>,
}

/// Name of the primary quality metric of a task.
pub fn primary_metric(task: Task) -> &'static str {
    match task {
        Task::Entail => "accuracy",
        Task::Caption => "CIDEr",
    }
}

pub fn quality(data: &Dataset, run: &RunOutputs) -> Result<Quality> {
    if run.examples.len() != data.len() {
        bail!("{} outputs for {} examples", run.examples.len(), data.len());
    }
    match data {
        Dataset::Entail(rows) => {
            let correct = rows
                .iter()
                .zip(&run.examples)
                .filter(|(r, o)| r.label.as_str() == o.prediction)
                .count();
            let acc = correct as f64 / rows.len().max(1) as f64;
            Ok(Quality {
                primary: acc,
                accuracy: Some(acc),
                bleu4: None,
                cider: None,
                rouge_l: None,
            })
        }
        Dataset::Caption(rows) => {
            let refs: Vec<Vec<String>> = rows.iter().map(|r| r.captions.clone()).collect();
            let cands: Vec<&str> = run.examples.iter().map(|o| o.prediction.as_str()).collect();
            let s = metrics::score_captions(&refs, &cands)?;
            Ok(Quality {
                primary: s.cider,
                accuracy: None,
                bleu4: Some(s.bleu[3]),
                cider: Some(s.cider),
                rouge_l: Some(s.rouge_l),
            })
        }
    }
}

/// Examples `run` may have made worse than `full`, which a `--delta` calibration bounds:
/// for entailment the answers correct at full depth and wrong in `run` (accuracy can drop
/// by no more than their rate); for captioning the captions that differ from full depth at
/// all (per-image CIDEr-D has no useful bound at these sample sizes).
pub fn harmed(data: &Dataset, run: &RunOutputs, full: &RunOutputs) -> Result<usize> {
    if run.examples.len() != data.len() || full.examples.len() != data.len() {
        bail!("runs and split differ in length");
    }
    Ok(match data {
        Dataset::Entail(rows) => rows
            .iter()
            .zip(run.examples.iter().zip(&full.examples))
            .filter(|(r, (o, f))| {
                r.label.as_str() == f.prediction && r.label.as_str() != o.prediction
            })
            .count(),
        Dataset::Caption(_) => (0..data.len())
            .filter(|&i| !run.same_output(full, i))
            .count(),
    })
}

/// Where rows exited, averaged over the split.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ExitStats {
    pub mean_image_layer: f64,
    pub mean_text_layer: f64,
    /// Over all generated tokens (or scoring passes) of the split.
    pub mean_token_layer: f64,
    /// Generated tokens (or scoring passes) per example.
    pub mean_tokens: f64,
    pub encoder_layers: usize,
    pub decoder_layers: usize,
}

/// Expected reduction of work, three ways (0 = none, 0.4 = 40% less).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Reduction {
    /// Mean over examples of `Exits::layer_reduction` (the paper's "time").
    pub layers: f64,
    /// 1 - sum of executed MACs / sum of full-depth MACs.
    pub macs: f64,
    /// 1 - wall time with exits / wall time at full depth (same split, same process).
    pub wall: f64,
}

pub fn exit_stats(run: &RunOutputs) -> ExitStats {
    let n = run.examples.len().max(1) as f64;
    let tokens: usize = run
        .examples
        .iter()
        .map(|e| e.exits.token_layers.len())
        .sum();
    let token_layers: usize = run
        .examples
        .iter()
        .flat_map(|e| e.exits.token_layers.iter())
        .sum();
    let first = run.examples.first();
    ExitStats {
        mean_image_layer: run
            .examples
            .iter()
            .map(|e| e.exits.image_layer as f64)
            .sum::<f64>()
            / n,
        mean_text_layer: run
            .examples
            .iter()
            .map(|e| e.exits.text_layer as f64)
            .sum::<f64>()
            / n,
        mean_token_layer: if tokens == 0 {
            0.0
        } else {
            token_layers as f64 / tokens as f64
        },
        mean_tokens: tokens as f64 / n,
        encoder_layers: first.map_or(0, |e| e.exits.encoder_layers),
        decoder_layers: first.map_or(0, |e| e.exits.decoder_layers),
    }
}

/// 1 - executed / full-depth multiply-adds summed over `examples` (0 when there are none).
pub fn mac_reduction(examples: &[ExampleOutput]) -> f64 {
    let exec: u64 = examples.iter().map(|e| e.macs_executed).sum();
    let all: u64 = examples.iter().map(|e| e.macs_full).sum();
    if all == 0 {
        0.0
    } else {
        1.0 - exec as f64 / all as f64
    }
}

/// Reduction of `run` against the full-depth run `full` of the same split.
pub fn reduction(run: &RunOutputs, full: &RunOutputs) -> Reduction {
    let n = run.examples.len().max(1) as f64;
    let layers = run
        .examples
        .iter()
        .map(|e| e.exits.layer_reduction())
        .sum::<f64>()
        / n;
    let macs = mac_reduction(&run.examples);
    let wall = if full.wall_ms > 0.0 {
        1.0 - run.wall_ms / full.wall_ms
    } else {
        0.0
    };
    Reduction { layers, macs, wall }
}

/// Everything an evaluation reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalReport {
    pub task: Task,
    pub policy: String,
    pub examples: usize,
    pub metric: String,
    pub quality: Quality,
    pub full_quality: Quality,
    /// quality.primary / full_quality.primary (1 when both are 0).
    #[serde(deserialize_with = "super::f64_or_nan")]
    pub relative_quality: f64,
    pub exits: ExitStats,
    pub reduction: Reduction,
    pub wall_ms: f64,
    pub wall_ms_full: f64,
}

/// `a / b`, 1 when both are 0.
pub fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 {
        if a == 0.0 {
            1.0
        } else {
            f64::INFINITY
        }
    } else {
        a / b
    }
}

/// Report of `run` beside the full-depth run of the same split.
pub fn report(
    data: &Dataset,
    run: &RunOutputs,
    full: &RunOutputs,
    full_quality: Quality,
) -> Result<EvalReport> {
    let q = quality(data, run)?;
    Ok(EvalReport {
        task: data.task(),
        policy: run.policy.clone(),
        examples: data.len(),
        metric: primary_metric(data.task()).into(),
        quality: q,
        full_quality,
        relative_quality: ratio(q.primary, full_quality.primary),
        exits: exit_stats(run),
        reduction: reduction(run, full),
        wall_ms: run.wall_ms,
        wall_ms_full: full.wall_ms,
    })
}

/// Evaluate `policy` on `data`, with a full-depth run of the same split for reference.
pub fn evaluate(
    engine: &Engine,
    data: &Dataset,
    policy: &dyn ExitPolicy,
    opts: &EvalOptions,
) -> Result<EvalReport> {
    Ok(evaluate_with_outputs(engine, data, policy, opts)?.0)
}

/// `evaluate`, also returning the per-example outputs of the policy and of full depth.
pub fn evaluate_with_outputs(
    engine: &Engine,
    data: &Dataset,
    policy: &dyn ExitPolicy,
    opts: &EvalOptions,
) -> Result<(EvalReport, RunOutputs, RunOutputs)> {
    let full = run(engine, data, &FullDepth, opts)?;
    let full_quality = quality(data, &full)?;
    let r = run(engine, data, policy, opts)?;
    Ok((report(data, &r, &full, full_quality)?, r, full))
}

/// The oracle: for each example the shallowest uniform depth (every stream and token
/// stopping after the same number of layers) whose output equals the full-depth output.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OracleReport {
    pub task: Task,
    pub examples: usize,
    /// Oracle depth per example, in split order.
    pub depths: Vec<usize>,
    pub mean_depth: f64,
    /// `histogram[k - 1]`: examples whose oracle depth is `k`.
    pub histogram: Vec<usize>,
    /// Quality of the oracle outputs (equal to full depth by construction).
    pub quality: Quality,
    pub full_quality: Quality,
    pub reduction: Reduction,
}

/// Compute the oracle depths. Needs one pass per depth 1..=min(encoder, decoder layers).
pub fn oracle(engine: &Engine, data: &Dataset, opts: &EvalOptions) -> Result<OracleReport> {
    let cfg = &engine.model.cfg;
    if cfg.encoder_layers != cfg.decoder_layers {
        bail!(
            "a uniform depth needs as many encoder as decoder layers ({} vs {})",
            cfg.encoder_layers,
            cfg.decoder_layers
        );
    }
    let depth = cfg.decoder_layers;
    let full = run(engine, data, &FullDepth, opts)?;
    let full_quality = quality(data, &full)?;
    let n = data.len();
    let mut depths = vec![depth; n];
    let mut chosen: Vec<ExampleOutput> = full.examples.clone();
    let mut wall_ms = vec![0.0; n];
    let per_example_full = full.wall_ms / n.max(1) as f64;
    let mut settled = vec![false; n];
    for k in 1..depth {
        if settled.iter().all(|&s| s) {
            break;
        }
        let p = StaticDepth {
            image: k,
            text: k,
            decoder: k,
        };
        let r = run(engine, data, &p, opts)?;
        let per_example = r.wall_ms / n.max(1) as f64;
        for i in 0..n {
            if !settled[i] && r.same_output(&full, i) {
                settled[i] = true;
                depths[i] = k;
                chosen[i] = r.examples[i].clone();
                wall_ms[i] = per_example;
            }
        }
    }
    for i in 0..n {
        if !settled[i] {
            wall_ms[i] = per_example_full;
        }
    }
    let oracle_run = RunOutputs {
        policy: "oracle".into(),
        examples: chosen,
        wall_ms: wall_ms.iter().sum(),
    };
    let mut histogram = vec![0; depth];
    for &d in &depths {
        histogram[d - 1] += 1;
    }
    Ok(OracleReport {
        task: data.task(),
        examples: n,
        mean_depth: depths.iter().sum::<usize>() as f64 / n.max(1) as f64,
        depths,
        histogram,
        quality: quality(data, &oracle_run)?,
        full_quality,
        reduction: reduction(&oracle_run, &full),
    })
}
