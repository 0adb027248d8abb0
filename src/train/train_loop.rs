//! The training loop: multi-task batches, layer-wise loss, AdamW, checkpoints, resume,
//! periodic validation.

use super::data::{self, batch_indices, Dataset, RawSplit};
use super::eval::{entail_accuracy_dir, evaluate, EvalResult};
use super::loss::LossKind;
use super::optim::{lr_at, AdamW, AdamWParams};
use super::shards::{check_shards, step_gradients, StepPlan, DEFAULT_SHARDS};
use crate::data::preprocess::resize_bicubic_pil;
use crate::data::tokenizer::Tokenizer;
use crate::model::layers::Mode;
use crate::model::resnet::ResNet;
use crate::model::stem::ConvStem;
use crate::model::{
    BranchInit, Config, EncoderMode, ImageEmbedder, ImageTrunk, Model, StreamDepths,
};
use crate::run_meta::TRAIN_STATE;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Everything a training run needs.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Benchmark directory (`snli_ve_{split}.tsv`, `caption_{split}.tsv`).
    pub data_dir: PathBuf,
    /// Model directory written: config.json, model.safetensors, tokenizer.json,
    /// optimizer.safetensors, train_state.json, train_log.jsonl.
    pub out_dir: PathBuf,
    pub d_model: usize,
    pub encoder_layers: usize,
    pub decoder_layers: usize,
    pub heads: usize,
    pub ffn_dim: usize,
    pub patch: usize,
    /// Output channels of the 3x3 stride-2 convolutions in front of the patches (empty:
    /// plain pixel patches).
    pub stem: Vec<usize>,
    /// How the residual branches of a fresh model start (ignored with `init`).
    pub branch_init: BranchInit,
    pub image_size: usize,
    /// Tokenizer vocabulary trained when none is given.
    pub vocab_size: usize,
    pub max_positions: usize,
    /// Total optimiser steps (the schedule spans them; `resume` continues up to them).
    pub steps: usize,
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    pub warmup_frac: f64,
    pub weight_decay: f64,
    /// Global gradient-norm clip.
    pub clip_norm: f64,
    pub dropout: f32,
    /// Label smoothing on caption targets (entailment answers get none).
    pub caption_smoothing: f32,
    pub seed: u64,
    pub loss: LossKind,
    /// Validate every this many steps (0: only at the end).
    pub eval_every: usize,
    /// Questions / captions used by the periodic validation.
    pub eval_examples: usize,
    /// Checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: usize,
    /// Continue from `out_dir/train_state.json`.
    pub resume: bool,
    /// Start from an existing model directory (its tokenizer too, if it has one); its
    /// encoder is switched to `encoder_mode`.
    pub init: Option<PathBuf>,
    /// Encoder of the trained model: decomposed (MuE) or joint (for a joint pre-training
    /// stage that a decomposed run then continues with `init`).
    pub encoder_mode: EncoderMode,
    /// Add the image position embeddings to the patch tokens of a fresh model
    /// ([`Config::entangle_image_positions`]).
    pub entangle_image_positions: bool,
    /// OFA's attention temperature: logits are scaled by `(head_dim * f)^-0.5`.
    pub attn_scale_factor: f64,
    /// Use only the first images of the train split.
    pub max_train_images: Option<usize>,
    /// Captions used per training image (the benchmark has 7; entailment rows are all used).
    pub captions_per_image: Option<usize>,
    /// Fraction of steps whose image stream stops at a depth drawn uniformly from
    /// `1..encoder_layers` (the rest run it in full), so that the decoder learns to read
    /// the image as it stands at an early exit (decomposed encoder only; 0: off).
    pub image_exit_sampling: f64,
    /// The same for the text stream, drawn independently of the image stream's depth.
    pub text_exit_sampling: f64,
    /// Keep the image trunk (`encoder.embed_images.*`: OFA's ResNet or the conv stem) as it
    /// starts: its weights are not updated and no gradient is computed for it.
    pub freeze_image_trunk: bool,
    /// Image trunk of a fresh model: OFA's ResNet with these bottlenecks per stage (see
    /// [`crate::model::resnet::blocks_for`]) instead of patches or the conv stem.
    pub resnet: Option<[usize; 3]>,
    /// Shards each batch is split into, run on their own threads and summed before the
    /// optimiser step ([`super::shards`]); part of the run (recorded in `train_state.json`).
    /// None: the recorded count when resuming (1 for runs recorded before shards existed),
    /// else [`DEFAULT_SHARDS`]. 1 is the unsharded step.
    pub shards: Option<usize>,
    /// Threads the shards run on (None: candle's thread count, `RAYON_NUM_THREADS`).
    /// Results do not depend on it.
    pub threads: Option<usize>,
    /// Stop early (with a checkpoint) after this many seconds.
    pub time_budget_secs: Option<f64>,
    /// Stop (with a checkpoint) once this step is reached, keeping the schedule of `steps`
    /// (to continue later with `resume`).
    pub stop_at: Option<usize>,
    /// After training, measure full-depth entailment accuracy of the saved model on the
    /// whole valid and test splits through the inference engine.
    pub final_eval: bool,
    pub progress: bool,
}

impl TrainOptions {
    /// The default model of the repository (d 128, 6+6 layers, 4 heads, ffn 512, patch 8,
    /// 64 px) with OFA-like fine-tuning hyper-parameters.
    pub fn new(data_dir: impl Into<PathBuf>, out_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            out_dir: out_dir.into(),
            d_model: 128,
            encoder_layers: 6,
            decoder_layers: 6,
            heads: 4,
            ffn_dim: 512,
            patch: 8,
            stem: Vec::new(),
            branch_init: BranchInit::ZeroEncoder,
            entangle_image_positions: false,
            image_size: 64,
            vocab_size: 1000,
            max_positions: 128,
            steps: 1000,
            batch_size: 32,
            lr: 5e-4,
            warmup_frac: 0.06,
            weight_decay: 0.01,
            clip_norm: 1.0,
            dropout: 0.1,
            caption_smoothing: 0.1,
            seed: 0,
            loss: LossKind::LayerWise,
            eval_every: 0,
            eval_examples: 100,
            checkpoint_every: 0,
            resume: false,
            init: None,
            encoder_mode: EncoderMode::Decomposed,
            attn_scale_factor: 2.0,
            max_train_images: None,
            captions_per_image: Some(3),
            image_exit_sampling: 0.0,
            text_exit_sampling: 0.0,
            freeze_image_trunk: false,
            resnet: None,
            shards: None,
            threads: None,
            time_budget_secs: None,
            stop_at: None,
            final_eval: false,
            progress: false,
        }
    }

    /// Model configuration of a fresh model with a `vocab_size`-token vocabulary.
    pub fn config(&self, vocab_size: usize) -> Config {
        let mut cfg = Config {
            vocab_size,
            d_model: self.d_model,
            encoder_layers: self.encoder_layers,
            decoder_layers: self.decoder_layers,
            encoder_heads: self.heads,
            decoder_heads: self.heads,
            encoder_ffn_dim: self.ffn_dim,
            decoder_ffn_dim: self.ffn_dim,
            max_positions: self.max_positions,
            token_bucket_size: 32.min(self.max_positions).max(2),
            // Set below from the patch grid, which the embedder determines.
            image_bucket_size: 1,
            attn_scale_factor: self.attn_scale_factor,
            layer_norm_eps: 1e-5,
            image_size: self.image_size,
            image_embedder: if let Some(blocks) = self.resnet {
                ImageEmbedder::Resnet { blocks }
            } else if self.stem.is_empty() {
                ImageEmbedder::Patch { patch: self.patch }
            } else {
                ImageEmbedder::Conv {
                    stem: self.stem.clone(),
                    patch: self.patch,
                }
            },
            encoder_mode: self.encoder_mode,
            entangle_image_positions: self.entangle_image_positions,
            bos_id: 0,
            pad_id: 1,
            eos_id: 2,
        };
        cfg.image_bucket_size = cfg.grid_side().max(1);
        cfg
    }
}

/// `train_state.json`: where a run stands. The data order is a pure function of
/// (seed, batch size, step), so the step is the whole data position.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    /// Optimiser steps completed.
    pub step: usize,
    pub total_steps: usize,
    pub seed: u64,
    pub batch_size: usize,
    pub loss: LossKind,
    /// Examples consumed (`step * batch_size`).
    pub examples_seen: usize,
    /// Whether `optimizer.safetensors` holds the AdamW moments of this step.
    pub optimizer_state: bool,
    /// `--image-exit-sampling` of the run; None in files written before it was recorded,
    /// where it is unknown (not necessarily 0).
    #[serde(default)]
    pub image_exit_sampling: Option<f64>,
    /// `--text-exit-sampling` of the run; None in files written before it existed (0).
    #[serde(default)]
    pub text_exit_sampling: Option<f64>,
    /// `--init`: the model this run started from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<PathBuf>,
    /// `--freeze-image-trunk` of the run; None in files written before it was recorded.
    #[serde(default)]
    pub freeze_image_trunk: Option<bool>,
    /// `--shards` of the run; None in files written before shards existed (one shard).
    #[serde(default)]
    pub shards: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalPoint {
    pub step: usize,
    pub result: EvalResult,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainReport {
    pub start_step: usize,
    pub end_step: usize,
    pub wall_secs: f64,
    /// Loss of every step run (sum over the layers that carry it).
    pub losses: Vec<f32>,
    pub evals: Vec<EvalPoint>,
    pub n_train_examples: usize,
    pub n_params: usize,
    pub tokens_per_sec: f64,
    /// Full-depth entailment accuracy of the saved model (valid, test), when asked for.
    pub valid_ve_accuracy: Option<f64>,
    pub test_ve_accuracy: Option<f64>,
    pub stopped_by_time_budget: bool,
}

/// Stream depths of training step `step` under `--image-exit-sampling` / `--text-exit-sampling`
/// (each stream drawn on its own by [`sampled_depth`]).
pub fn sampled_depths(opts: &TrainOptions, layers: usize, step: usize) -> StreamDepths {
    StreamDepths {
        image: sampled_depth(opts.image_exit_sampling, layers, opts.seed, step),
        // Another seed for the text stream, so its depth does not follow the image's.
        text: sampled_depth(
            opts.text_exit_sampling,
            layers,
            opts.seed ^ 0x5EED_7E47_0000_0001,
            step,
        ),
    }
}

/// A stream's depth at training step `step` under exit sampling with share `p`: `None`
/// (full depth) on a `1 - p` share of the steps, else uniform over `1..layers`. A pure
/// function of (seed, step), so resumed runs draw the same depths.
pub fn sampled_depth(p: f64, layers: usize, seed: u64, step: usize) -> Option<usize> {
    use rand::{Rng, SeedableRng};
    if p <= 0.0 || layers < 2 {
        return None;
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
        seed.wrapping_mul(0xD1B5_4A32_D192_ED03) ^ (step as u64).wrapping_add(0x1D3F_5E0B),
    );
    (rng.random::<f64>() < p).then(|| rng.random_range(1..layers))
}

/// Weights of the trainable model by name.
pub fn varmap_tensors(varmap: &VarMap) -> HashMap<String, Tensor> {
    varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect()
}

/// Overwrite every variable with the tensor of the same name in `model.safetensors` of
/// `dir`. Errors name a missing or mis-shaped tensor.
pub fn load_weights_into(varmap: &VarMap, dir: &Path, device: &Device) -> Result<()> {
    let path = dir.join("model.safetensors");
    let tensors = candle_core::safetensors::load(&path, device)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let data = varmap.data().lock().unwrap();
    for (name, var) in data.iter() {
        let Some(t) = tensors.get(name) else {
            bail!("{} lacks tensor {name}", path.display());
        };
        if t.dims() != var.dims() {
            bail!(
                "{}: tensor {name} has shape {:?}, the model needs {:?}",
                path.display(),
                t.dims(),
                var.dims()
            );
        }
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// Whether variable `name` is a BatchNorm running statistic of OFA's ResNet: a buffer of
/// inference-mode BatchNorm, never trained.
pub fn is_running_stat(name: &str) -> bool {
    name.ends_with(".running_mean") || name.ends_with(".running_var")
}

/// (Re)build the image trunk of `model` from the current values of `varmap`.
///
/// OFA's ResNet folds each BatchNorm into its convolution when it is built, so a trunk
/// built before the weights were loaded or updated computes with stale values: rebuild it
/// after every change. Its BatchNorms stay in inference mode: running statistics are
/// constants, convolutions and BatchNorm scales and shifts train. With `frozen`, the whole
/// trunk is built from constants, so no gradient is computed for it (its output does not
/// track the variables) and the optimiser, which skips variables without a gradient,
/// leaves it bit-unchanged.
pub fn bind_image_trunk(model: &mut Model, varmap: &VarMap, frozen: bool) -> Result<()> {
    const PREFIX: &str = "encoder.embed_images.";
    let tensors: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.starts_with(PREFIX))
        .map(|(k, v)| {
            let t = if frozen || is_running_stat(k) {
                v.as_tensor().detach()
            } else {
                v.as_tensor().clone()
            };
            (k.clone(), t)
        })
        .collect();
    let vb = candle_nn::VarBuilder::from_tensors(tensors, candle_core::DType::F32, &model.device);
    let vb = vb.pp("encoder.embed_images");
    model.encoder.image_trunk = match &model.cfg.image_embedder {
        ImageEmbedder::Patch { patch } => ImageTrunk::Patch(*patch),
        ImageEmbedder::Conv { stem, patch } => ImageTrunk::Conv(ConvStem::load(stem, *patch, vb)?),
        ImageEmbedder::Resnet { blocks } => ImageTrunk::Resnet(ResNet::load(vb, *blocks)?),
    };
    Ok(())
}

fn save_checkpoint(
    opts: &TrainOptions,
    shards: usize,
    cfg: &Config,
    varmap: &VarMap,
    tok: &Tokenizer,
    opt: &AdamW,
    step: usize,
) -> Result<()> {
    let dir = &opts.out_dir;
    // The state file goes last and is removed first, so a half-written checkpoint is never
    // taken for a complete one.
    let state_path = dir.join(TRAIN_STATE);
    if state_path.exists() {
        std::fs::remove_file(&state_path)?;
    }
    Model::save_dir(dir, cfg, &varmap_tensors(varmap))?;
    tok.save(dir.join("tokenizer.json"))?;
    opt.save(&dir.join("optimizer.safetensors"))?;
    let state = TrainState {
        step,
        total_steps: opts.steps,
        seed: opts.seed,
        batch_size: opts.batch_size,
        loss: opts.loss,
        examples_seen: step * opts.batch_size,
        optimizer_state: true,
        image_exit_sampling: Some(opts.image_exit_sampling),
        text_exit_sampling: Some(opts.text_exit_sampling),
        init: opts.init.clone(),
        freeze_image_trunk: Some(opts.freeze_image_trunk),
        shards: Some(shards),
    };
    std::fs::write(&state_path, serde_json::to_string_pretty(&state)? + "\n")
        .with_context(|| format!("cannot write {}", state_path.display()))?;
    Ok(())
}

/// Shard count of a run: `opts.shards`, else the one recorded in `state` when resuming (1
/// for runs recorded before shards existed), else [`DEFAULT_SHARDS`].
pub fn run_shards(opts: &TrainOptions, state: Option<&TrainState>) -> usize {
    match (opts.shards, state) {
        (Some(n), _) => n,
        (None, Some(s)) => s.shards.unwrap_or(1),
        (None, None) => DEFAULT_SHARDS,
    }
}

/// Read `train_state.json` of a model directory.
pub fn load_state(dir: &Path) -> Result<TrainState> {
    let p = dir.join(TRAIN_STATE);
    let text =
        std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is invalid", p.display()))
}

fn resize_images(raw: &mut RawSplit, size: usize) {
    for img in raw.images.iter_mut() {
        if img.width() as usize != size || img.height() as usize != size {
            *img = resize_bicubic_pil(img, size as u32, size as u32);
        }
    }
}

/// Train (or continue training) a model as `opts` says.
/// The path flags, checked before anything is read or created, so that a mistyped one is
/// named rather than the first file that could not be read.
fn check_paths(opts: &TrainOptions) -> Result<()> {
    if let Some(init) = &opts.init {
        if !init.is_dir() {
            bail!("--init {}: no such model directory", init.display());
        }
        if !init.join("config.json").is_file() {
            bail!("init model {} has no config.json", init.display());
        }
        if !init.join("tokenizer.json").is_file() {
            bail!("init model {} has no tokenizer.json", init.display());
        }
    }
    if opts.out_dir.exists() && !opts.out_dir.is_dir() {
        bail!(
            "--out {} is a file, not a directory",
            opts.out_dir.display()
        );
    }
    if opts.resume && !opts.out_dir.join(TRAIN_STATE).is_file() {
        bail!(
            "--resume: {} has no {TRAIN_STATE} to continue from",
            opts.out_dir.display()
        );
    }
    if !opts.data_dir.is_dir() {
        bail!(
            "--data {}: no such benchmark directory (`mue data generate` makes one)",
            opts.data_dir.display()
        );
    }
    Ok(())
}

pub fn train(opts: &TrainOptions) -> Result<TrainReport> {
    let t0 = Instant::now();
    if opts.batch_size == 0 || opts.steps == 0 {
        bail!("steps and batch size must be positive");
    }
    for (stream, p) in [
        ("image", opts.image_exit_sampling),
        ("text", opts.text_exit_sampling),
    ] {
        if !(0.0..=1.0).contains(&p) {
            bail!("{stream} exit sampling must be a fraction in [0, 1], got {p}");
        }
    }
    if opts.resnet.is_some() && !opts.stem.is_empty() {
        bail!("--resnet and --stem are two image trunks: give one");
    }
    check_paths(opts)?;
    let device = Device::Cpu;
    std::fs::create_dir_all(&opts.out_dir)
        .with_context(|| format!("cannot create {}", opts.out_dir.display()))?;
    let mut train_raw = data::read_split(&opts.data_dir, "train", opts.max_train_images)?;
    let mut valid_raw = data::read_split(&opts.data_dir, "valid", Some(opts.eval_examples))?;

    // Tokenizer, configuration and starting weights.
    let state = if opts.resume {
        let s = load_state(&opts.out_dir)?;
        if s.batch_size != opts.batch_size || s.seed != opts.seed {
            bail!(
                "cannot resume: checkpoint used batch size {} and seed {}, this run {} and {}",
                s.batch_size,
                s.seed,
                opts.batch_size,
                opts.seed
            );
        }
        // The sampled depths are a function of the share, so a different one would not
        // continue the same run.
        if let Some(p) = s
            .image_exit_sampling
            .filter(|&p| p != opts.image_exit_sampling)
        {
            bail!(
                "cannot resume: checkpoint used --image-exit-sampling {p}, this run {}",
                opts.image_exit_sampling
            );
        }
        let p = s.text_exit_sampling.unwrap_or(0.0);
        if p != opts.text_exit_sampling {
            bail!(
                "cannot resume: checkpoint used --text-exit-sampling {p}, this run {}",
                opts.text_exit_sampling
            );
        }
        // A frozen trunk kept its start weights; training it now (or freezing a trained
        // one) would be another run.
        if let Some(f) = s
            .freeze_image_trunk
            .filter(|&f| f != opts.freeze_image_trunk)
        {
            bail!(
                "cannot resume: checkpoint was trained {} --freeze-image-trunk, this run {}",
                if f { "with" } else { "without" },
                if opts.freeze_image_trunk {
                    "with it"
                } else {
                    "without it"
                }
            );
        }
        Some(s)
    } else {
        None
    };
    let shards = run_shards(opts, state.as_ref());
    check_shards(shards, opts.batch_size)?;
    if let Some(recorded) = state.as_ref().and_then(|s| s.shards) {
        if recorded != shards {
            tracing::warn!(
                recorded,
                shards,
                "resuming with another shard count: same loss, other float rounding"
            );
        }
    }
    let threads = opts
        .threads
        .unwrap_or_else(candle_core::utils::get_num_threads)
        .clamp(1, shards);
    let (cfg, tok) = if state.is_some() {
        let cfg = Config::load(&opts.out_dir.join("config.json"))?;
        let tok = Tokenizer::from_file(opts.out_dir.join("tokenizer.json"))?;
        (cfg, tok)
    } else if let Some(init) = &opts.init {
        let mut cfg = Config::load(&init.join("config.json"))?;
        cfg.encoder_mode = opts.encoder_mode;
        (cfg, Tokenizer::from_file(init.join("tokenizer.json"))?)
    } else {
        let tok = Tokenizer::train(
            data::tokenizer_texts(&train_raw).into_iter(),
            opts.vocab_size,
        )?;
        (opts.config(tok.vocab_size()), tok)
    };
    cfg.validate()?;
    if (opts.image_exit_sampling > 0.0 || opts.text_exit_sampling > 0.0)
        && cfg.encoder_mode != EncoderMode::Decomposed
    {
        bail!("exit sampling needs a decomposed encoder (image and text as two streams)");
    }
    if tok.vocab_size() > cfg.vocab_size {
        bail!(
            "tokenizer has {} tokens, the model only {}",
            tok.vocab_size(),
            cfg.vocab_size
        );
    }
    if opts.freeze_image_trunk && matches!(cfg.image_embedder, ImageEmbedder::Patch { .. }) {
        bail!("--freeze-image-trunk: the model has no image trunk (plain pixel patches)");
    }
    resize_images(&mut train_raw, cfg.image_size);
    resize_images(&mut valid_raw, cfg.image_size);
    let (mut model, varmap) = Model::init_trainable(&cfg, opts.seed, opts.branch_init, &device)?;
    let mut opt = AdamW::new(
        &varmap,
        AdamWParams {
            weight_decay: opts.weight_decay,
            ..AdamWParams::default()
        },
    )?;
    let start_step = match &state {
        Some(s) => {
            load_weights_into(&varmap, &opts.out_dir, &device)?;
            if s.optimizer_state {
                opt.load(&opts.out_dir.join("optimizer.safetensors"), s.step, &device)?;
            }
            s.step
        }
        None => {
            if let Some(init) = &opts.init {
                load_weights_into(&varmap, init, &device)?;
            }
            0
        }
    };
    bind_image_trunk(&mut model, &varmap, opts.freeze_image_trunk)?;
    // Only the ResNet folds its weights when built; the conv stem reads its variables.
    let rebind_each_step =
        !opts.freeze_image_trunk && matches!(cfg.image_embedder, ImageEmbedder::Resnet { .. });
    tok.save(opts.out_dir.join("tokenizer.json"))?;

    let ds = Dataset::build(
        &tok,
        &train_raw,
        opts.captions_per_image,
        cfg.max_text_len(),
    )?;
    drop(train_raw);
    let n_params: usize = varmap_tensors(&varmap)
        .values()
        .map(|t| t.elem_count())
        .sum();
    tracing::info!(
        examples = ds.examples.len(),
        skipped = ds.skipped,
        params = n_params,
        start_step,
        shards,
        threads,
        "training"
    );

    let mode = Mode::train(opts.dropout);
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(opts.out_dir.join("train_log.jsonl"))?;
    let pb = if opts.progress {
        indicatif::ProgressBar::new(opts.steps as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}",
        )
        .unwrap(),
    );
    pb.set_position(start_step as u64);
    pb.reset_eta();

    let mut losses = Vec::new();
    let mut evals = Vec::new();
    let (mut tokens, mut compute_secs) = (0usize, 0f64);
    let mut step = start_step;
    let mut stopped = false;
    while step < opts.steps && opts.stop_at.is_none_or(|s| step < s) {
        if let Some(budget) = opts.time_budget_secs {
            if t0.elapsed().as_secs_f64() > budget {
                stopped = true;
                break;
            }
        }
        let ts = Instant::now();
        let idx = batch_indices(ds.examples.len(), opts.seed, opts.batch_size, step);
        let depths = sampled_depths(opts, cfg.encoder_layers, step);
        let plan = StepPlan {
            shards,
            threads,
            kind: opts.loss,
            mode,
            depths,
            dropout_seed: opts.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ step as u64,
            pad_id: cfg.pad_id,
            vocab_size: cfg.vocab_size,
            caption_smoothing: opts.caption_smoothing,
        };
        let out = step_gradients(&model, &ds, &idx, &plan, &device)?;
        let loss = out.loss;
        if !loss.is_finite() {
            bail!("loss is not finite at step {step}");
        }
        let grads = out.grads;
        let lr = lr_at(step, opts.steps, opts.warmup_frac, opts.lr);
        let st = opt.step(&grads, lr, Some(opts.clip_norm))?;
        if rebind_each_step {
            bind_image_trunk(&mut model, &varmap, false)?;
        }
        step += 1;
        let dt = ts.elapsed().as_secs_f64();
        tokens += out.n_tokens;
        compute_secs += dt;
        losses.push(loss);
        let per_layer = out.per_layer;
        writeln!(
            log,
            "{}",
            serde_json::json!({"step": step, "loss": loss, "per_layer": per_layer, "lr": lr,
                "grad_norm": st.grad_norm, "secs": dt, "image_depth": depths.image,
                "text_depth": depths.text})
        )?;
        pb.set_message(format!(
            "loss {loss:.3} | last layer {:.3} | {:.0} tok/s",
            per_layer.last().copied().unwrap_or(0.0),
            tokens as f64 / compute_secs.max(1e-9)
        ));
        pb.set_position(step as u64);
        if opts.eval_every > 0 && step % opts.eval_every == 0 && step < opts.steps {
            let r = evaluate(&model, &tok, &valid_raw, opts.eval_examples)?;
            pb.println(format!(
                "step {step}: valid VE acc {:.3} ({}), caption token acc {:.3}",
                r.ve_accuracy, r.ve_n, r.caption_token_accuracy
            ));
            writeln!(log, "{}", serde_json::json!({"step": step, "eval": &r}))?;
            evals.push(EvalPoint { step, result: r });
        }
        if opts.checkpoint_every > 0 && step % opts.checkpoint_every == 0 && step < opts.steps {
            save_checkpoint(opts, shards, &cfg, &varmap, &tok, &opt, step)?;
        }
    }
    pb.finish_and_clear();
    save_checkpoint(opts, shards, &cfg, &varmap, &tok, &opt, step)?;
    let r = evaluate(&model, &tok, &valid_raw, opts.eval_examples)?;
    writeln!(log, "{}", serde_json::json!({"step": step, "eval": &r}))?;
    evals.push(EvalPoint { step, result: r });

    let (mut valid_acc, mut test_acc) = (None, None);
    if opts.final_eval {
        valid_acc = Some(entail_accuracy_dir(&opts.out_dir, &opts.data_dir, "valid", None)?.0);
        test_acc = Some(entail_accuracy_dir(&opts.out_dir, &opts.data_dir, "test", None)?.0);
    }
    let report = TrainReport {
        start_step,
        end_step: step,
        wall_secs: t0.elapsed().as_secs_f64(),
        losses,
        evals,
        n_train_examples: ds.examples.len(),
        n_params,
        tokens_per_sec: tokens as f64 / compute_secs.max(1e-9),
        valid_ve_accuracy: valid_acc,
        test_ve_accuracy: test_acc,
        stopped_by_time_budget: stopped,
    };
    std::fs::write(
        opts.out_dir.join("train_report.json"),
        serde_json::to_string_pretty(&report)? + "\n",
    )?;
    Ok(report)
}
