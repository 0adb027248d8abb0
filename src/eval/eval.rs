//! Evaluate an [`Engine`] with an exit policy on a TSV split: task quality (VE accuracy;
//! caption BLEU-4 / CIDEr-D / ROUGE-L), where rows exited, and the reduction of work three
//! ways (layers, executed multiply-adds, measured wall clock against a full-depth run of the
//! same split in the same process). Also the per-example oracle depth.

use super::metrics;
use crate::data::{CaptionReader, CaptionRow, VeReader, VeRow};
use crate::exit::{ExitPolicy, FullDepth, StaticDepth};
use crate::generate::{Exits, SearchConfig};
use crate::pipeline::{Engine, EntailRequest};
use crate::task::Task;
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
    /// CPU time of the process (every thread) during those calls, where Linux's
    /// `/proc/self/task` tells it: unlike wall time, other work on the machine hardly moves it.
    #[serde(default)]
    pub cpu_ms: Option<f64>,
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
    let mut cpu_ms = Some(0.0);
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
                let (start, cpu) = (Instant::now(), process_cpu_ms());
                let outs = on_pool(|| engine.entail(&reqs, policy))?;
                wall_ms += start.elapsed().as_secs_f64() * 1e3;
                add_cpu(&mut cpu_ms, cpu);
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
                let (start, cpu) = (Instant::now(), process_cpu_ms());
                let outs = on_pool(|| engine.caption(&images, policy, &opts.search))?;
                wall_ms += start.elapsed().as_secs_f64() * 1e3;
                add_cpu(&mut cpu_ms, cpu);
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
        cpu_ms,
    })
}

/// Runs `f` on a worker of rayon's pool, so that the parallel kernels inside (candle's layer
/// norm, element-wise ops) run there or split across the pool, instead of each handing its
/// work from this thread to the pool and sleeping until it is done: a wake-up and a wait per
/// op. Evaluation only: in the server it cut `serve-bench` throughput (engine calls queued
/// behind the pool's other work).
fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

/// CPU time of this process so far in ms (user + system, every live thread: the engine's
/// work runs on rayon's workers), from `/proc/self/task/*/schedstat`; `None` without it.
pub fn process_cpu_ms() -> Option<f64> {
    let mut ns = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        ns += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(ns as f64 / 1e6)
}

/// Add the CPU time since `start` to `total` (which stays `None` once a reading failed).
fn add_cpu(total: &mut Option<f64>, start: Option<f64>) {
    *total = match (*total, start, process_cpu_ms()) {
        (Some(t), Some(a), Some(b)) => Some(t + (b - a)),
        _ => None,
    };
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
    Ok(quality_and_scores(data, run)?.0)
}

/// Quality of a run and each example's share of the primary metric, whose mean is
/// `primary`: 1 or 0 for a right or wrong answer, or the image's CIDEr-D (document
/// frequencies from the whole split's references, as pycocoevalcap averages them).
pub fn quality_and_scores(data: &Dataset, run: &RunOutputs) -> Result<(Quality, Vec<f64>)> {
    if run.examples.len() != data.len() {
        bail!("{} outputs for {} examples", run.examples.len(), data.len());
    }
    match data {
        Dataset::Entail(rows) => {
            let scores: Vec<f64> = rows
                .iter()
                .zip(&run.examples)
                .map(|(r, o)| f64::from(u8::from(r.label.as_str() == o.prediction)))
                .collect();
            let acc = scores.iter().sum::<f64>() / rows.len().max(1) as f64;
            let q = Quality {
                primary: acc,
                accuracy: Some(acc),
                bleu4: None,
                cider: None,
                rouge_l: None,
            };
            Ok((q, scores))
        }
        Dataset::Caption(rows) => {
            let refs: Vec<Vec<String>> = rows.iter().map(|r| r.captions.clone()).collect();
            let cands: Vec<&str> = run.examples.iter().map(|o| o.prediction.as_str()).collect();
            let s = metrics::evaluate_captions(&refs, &cands)?;
            let q = Quality {
                primary: s.corpus.cider,
                accuracy: None,
                bleu4: Some(s.corpus.bleu[3]),
                cider: Some(s.corpus.cider),
                rouge_l: Some(s.corpus.rouge_l),
            };
            Ok((q, s.per_sentence.cider))
        }
    }
}

/// Confidence level of the interval around `relative_quality`.
pub const INTERVAL_LEVEL: f64 = 0.9;
const BOOTSTRAP_RESAMPLES: usize = 2000;

/// A fraction as a percentage with one decimal ("n/a" when not finite, never "-0.0%").
pub fn percent(x: f64) -> String {
    if !x.is_finite() {
        return "n/a".into();
    }
    let t = format!("{:.1}%", 100.0 * x);
    if t == "-0.0%" {
        "0.0%".into()
    } else {
        t
    }
}

/// "90% bootstrap interval a% to b%": the one wording of the interval, for the CLI and the
/// report page alike.
pub fn interval_phrase([lo, hi]: [f64; 2]) -> String {
    format!(
        "{:.0}% bootstrap interval {} to {}",
        100.0 * INTERVAL_LEVEL,
        percent(lo),
        percent(hi)
    )
}

/// Paired bootstrap interval of `mean(a) / mean(b)`: the examples are drawn with
/// replacement `resamples` times (the same draw for both, since `a[i]` and `b[i]` score one
/// example) and the central `level` of the ratios is returned. The draws come from a fixed
/// seed, so the same scores give the same interval. None when there are no examples or
/// when a bound is not finite (some draws score 0 at full depth).
pub fn paired_bootstrap_ratio(
    a: &[f64],
    b: &[f64],
    level: f64,
    resamples: usize,
) -> Option<[f64; 2]> {
    use rand::{Rng, SeedableRng};
    let n = a.len();
    if n == 0 || b.len() != n || resamples == 0 || !(0.0..1.0).contains(&level) {
        return None;
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x5eed_b007);
    let mut ratios: Vec<f64> = (0..resamples)
        .map(|_| {
            let (mut sa, mut sb) = (0.0, 0.0);
            for _ in 0..n {
                let i = rng.random_range(0..n);
                sa += a[i];
                sb += b[i];
            }
            ratio(sa, sb)
        })
        .collect();
    ratios.sort_by(f64::total_cmp);
    let tail = (1.0 - level) / 2.0;
    let at = |q: f64| ratios[((q * resamples as f64).floor() as usize).min(resamples - 1)];
    let (lo, hi) = (at(tail), at(1.0 - tail));
    // Draws where the reference scores 0 have no ratio: then there is no interval either.
    (lo.is_finite() && hi.is_finite()).then_some([lo, hi])
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
    /// 90% paired-bootstrap interval of `relative_quality` over the examples: how far the
    /// figure could move on another split of the same size.
    #[serde(default)]
    pub relative_quality_interval: Option<[f64; 2]>,
    pub exits: ExitStats,
    pub reduction: Reduction,
    pub wall_ms: f64,
    pub wall_ms_full: f64,
    /// CPU time of the run and of the full-depth run ([`RunOutputs::cpu_ms`]).
    #[serde(default)]
    pub cpu_ms: Option<f64>,
    #[serde(default)]
    pub cpu_ms_full: Option<f64>,
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

/// Report of `run` beside the full-depth run of the same split, whose quality and
/// per-example scores ([`quality_and_scores`]) the caller computes once for all policies.
pub fn report(
    data: &Dataset,
    run: &RunOutputs,
    full: &RunOutputs,
    full_quality: Quality,
    full_scores: &[f64],
) -> Result<EvalReport> {
    let (q, scores) = quality_and_scores(data, run)?;
    Ok(EvalReport {
        task: data.task(),
        policy: run.policy.clone(),
        examples: data.len(),
        metric: primary_metric(data.task()).into(),
        quality: q,
        full_quality,
        relative_quality: ratio(q.primary, full_quality.primary),
        relative_quality_interval: paired_bootstrap_ratio(
            &scores,
            full_scores,
            INTERVAL_LEVEL,
            BOOTSTRAP_RESAMPLES,
        ),
        exits: exit_stats(run),
        reduction: reduction(run, full),
        wall_ms: run.wall_ms,
        wall_ms_full: full.wall_ms,
        cpu_ms: run.cpu_ms,
        cpu_ms_full: full.cpu_ms,
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
    let (full_quality, full_scores) = quality_and_scores(data, &full)?;
    let r = run(engine, data, policy, opts)?;
    Ok((
        report(data, &r, &full, full_quality, &full_scores)?,
        r,
        full,
    ))
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
        cpu_ms: None,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` examples all right at full depth, `wrong` of them wrong with exits.
    fn scores(n: usize, wrong: usize) -> (Vec<f64>, Vec<f64>) {
        let a = (0..n).map(|i| if i < wrong { 0.0 } else { 1.0 }).collect();
        (a, vec![1.0; n])
    }

    #[test]
    fn bootstrap_interval_has_the_binomial_width() {
        // Relative accuracy 0.95 over 600 examples: the binomial standard error is
        // sqrt(0.95 * 0.05 / 600) = 0.0089, so the 90% interval is about 0.95 +- 0.0146.
        let (a, b) = scores(600, 30);
        let [lo, hi] = paired_bootstrap_ratio(&a, &b, 0.9, 2000).unwrap();
        assert!((lo - 0.9354).abs() < 0.004, "{lo}");
        assert!((hi - 0.9646).abs() < 0.004, "{hi}");
        // Four times the examples, half the width.
        let (a4, b4) = scores(2400, 120);
        let [lo4, hi4] = paired_bootstrap_ratio(&a4, &b4, 0.9, 2000).unwrap();
        let ratio = (hi - lo) / (hi4 - lo4);
        assert!((ratio - 2.0).abs() < 0.3, "{ratio}");
    }

    #[test]
    fn bootstrap_interval_is_paired_and_deterministic() {
        // The same outputs as full depth: every draw gives exactly 1, however noisy the
        // scores themselves are.
        let a: Vec<f64> = (0..50).map(|i| (i % 7) as f64 * 0.3).collect();
        assert_eq!(paired_bootstrap_ratio(&a, &a, 0.9, 500), Some([1.0, 1.0]));
        let (a, b) = scores(100, 10);
        let first = paired_bootstrap_ratio(&a, &b, 0.9, 500);
        assert_eq!(first, paired_bootstrap_ratio(&a, &b, 0.9, 500));
        let [lo, hi] = first.unwrap();
        assert!(lo < 0.9 && 0.9 < hi);
        assert_eq!(paired_bootstrap_ratio(&[], &[], 0.9, 500), None);
        assert_eq!(paired_bootstrap_ratio(&a, &b[..5], 0.9, 500), None);
        assert_eq!(paired_bootstrap_ratio(&a, &b, 1.0, 500), None);
        // Full depth right on one example in ten: many draws miss it and have no ratio.
        let full: Vec<f64> = (0..10).map(|i| f64::from(u8::from(i == 0))).collect();
        assert_eq!(paired_bootstrap_ratio(&[1.0; 10], &full, 0.9, 500), None);
    }
}
