//! `mue train`: fine-tune a model with the layer-wise loss on the benchmark.

use crate::model::BranchInit;
use crate::train::{run_shards, train, LossKind, TrainOptions};
use anyhow::Result;
use clap::builder::PossibleValue;
use std::path::PathBuf;

// clap reads the two enums by name; the types themselves know no clap. The help of each
// value is the CLI's text.
impl clap::ValueEnum for LossKind {
    fn value_variants<'a>() -> &'a [Self] {
        &LossKind::ALL
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        let help = match self {
            LossKind::LayerWise => "MuE: one cross-entropy per decoder layer, summed",
            LossKind::FinalOnly => "Ablation: the last decoder layer only (standard fine-tuning)",
        };
        Some(PossibleValue::new(self.name()).help(help))
    }
}

impl clap::ValueEnum for BranchInit {
    fn value_variants<'a>() -> &'a [Self] {
        &BranchInit::ALL
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        let help = match self {
            BranchInit::Unit => "Every branch adds a unit-scale output from the start",
            BranchInit::ZeroEncoder => {
                "Encoder branches start at zero: the gains of the layer norms that end each \
                 branch (`self_attn_mid_layer_norm`, `ffn_layer_norm`) are 0, so every encoder \
                 layer starts as the identity and the decoder first sees the patch embeddings \
                 themselves. With unit branches a 6-layer encoder kept the model image-blind \
                 for 2000 steps; with zero ones it learned to read the image within 500 \
                 (models/default/MODEL_CARD.md)"
            }
            BranchInit::ZeroAll => "Encoder and decoder branches start at zero",
        };
        Some(PossibleValue::new(self.name()).help(help))
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// Benchmark directory (from `mue data generate`).
    #[arg(long, default_value = "data/bench")]
    pub data: PathBuf,
    /// Output model directory (checkpoints go here too).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 1000)]
    pub steps: usize,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Peak learning rate (6% linear warm-up, then linear decay).
    #[arg(long, default_value_t = 5e-4)]
    pub lr: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// layer-wise (MuE) or final-only (ablation).
    #[arg(long, value_enum, default_value = "layer-wise")]
    pub loss: LossKind,
    #[arg(long, default_value_t = 128)]
    pub d_model: usize,
    #[arg(long, default_value_t = 6)]
    pub encoder_layers: usize,
    #[arg(long, default_value_t = 6)]
    pub decoder_layers: usize,
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    #[arg(long, default_value_t = 512)]
    pub ffn_dim: usize,
    /// Patch side, in pixels of the image (or of the conv stem's feature map).
    #[arg(long, default_value_t = 8)]
    pub patch: usize,
    /// Conv stem in front of the patches: output channels of each 3x3 stride-2
    /// convolution, e.g. `--stem 32` (none by default).
    #[arg(long, value_delimiter = ',')]
    pub stem: Vec<usize>,
    /// How a fresh model's residual branches start: zero-encoder makes every encoder
    /// layer the identity at step 0 (see the model card for why).
    #[arg(long, value_enum, default_value = "zero-encoder")]
    pub branch_init: BranchInit,
    /// Add the image position embeddings to the patch tokens of a fresh model, so that
    /// cross-attention reads where each patch is (OFA keeps positions in the attention
    /// biases only; its checkpoints load either way).
    #[arg(long)]
    pub entangle_image_positions: bool,
    #[arg(long, default_value_t = 64)]
    pub image_size: usize,
    /// Vocabulary of the tokenizer trained on the train split.
    #[arg(long, default_value_t = 1000)]
    pub vocab_size: usize,
    #[arg(long, default_value_t = 0.1)]
    pub dropout: f32,
    /// Validate every N steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    pub eval_every: usize,
    /// Questions / captions per validation.
    #[arg(long, default_value_t = 100)]
    pub eval_examples: usize,
    /// Checkpoint every N steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    pub checkpoint_every: usize,
    /// Continue from OUT/train_state.json.
    #[arg(long)]
    pub resume: bool,
    /// Start from an existing model directory (e.g. a converted OFA checkpoint).
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Encoder of the trained model: `decomposed` (MuE), or `joint` for a pre-training
    /// stage that a decomposed run continues with --init.
    #[arg(long, default_value = "decomposed", value_parser = crate::cli::convert::parse_mode)]
    pub encoder_mode: crate::model::EncoderMode,
    /// Attention temperature of a new model: logits scaled by (head_dim * F)^-0.5 (OFA: 2).
    #[arg(long, default_value_t = 2.0)]
    pub attn_scale_factor: f64,
    /// Use only the first N training images.
    #[arg(long)]
    pub max_train_images: Option<usize>,
    /// Captions used per training image.
    #[arg(long, default_value_t = 3)]
    pub captions_per_image: usize,
    /// Fraction of steps whose image stream stops at a random shallower depth (uniform over
    /// 1..encoder layers), so the decoder learns to read an early-exited image (0: off).
    #[arg(long, default_value_t = 0.0)]
    pub image_exit_sampling: f64,
    /// The same for the text stream (its depth drawn independently of the image's).
    #[arg(long, default_value_t = 0.0)]
    pub text_exit_sampling: f64,
    /// Keep the image trunk (OFA's ResNet, or the conv stem) as it starts: no updates and
    /// no gradient work for it (OFA fine-tuning commonly freezes it).
    #[arg(long)]
    pub freeze_image_trunk: bool,
    /// Image trunk of a fresh model: OFA's ResNet (resnet50, resnet101 or resnet152)
    /// instead of patches, e.g. to size an OFA-like model with random weights.
    #[arg(long, value_parser = parse_resnet)]
    pub resnet: Option<[usize; 3]>,
    /// Split each batch into N shards, each run on its own thread (up to RAYON_NUM_THREADS)
    /// with single-threaded ops, gradients summed before one optimiser step: the same loss
    /// up to float rounding, the same bits on any thread count. Default: the count recorded
    /// by the run when resuming (1 for runs from before shards), else 2. 1 is the unsharded
    /// step, each op threaded by candle.
    #[arg(long)]
    pub shards: Option<usize>,
    /// Stop (and checkpoint) after this many seconds.
    #[arg(long)]
    pub time_budget_secs: Option<f64>,
    /// Stop (with a checkpoint) at this step, keeping the schedule of --steps.
    #[arg(long)]
    pub stop_at: Option<usize>,
    /// Measure full-depth entailment accuracy on the whole valid and test splits at the end.
    #[arg(long)]
    pub final_eval: bool,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
}

impl TrainArgs {
    pub fn options(&self) -> TrainOptions {
        let mut o = TrainOptions::new(&self.data, &self.out);
        o.steps = self.steps;
        o.batch_size = self.batch_size;
        o.lr = self.lr;
        o.seed = self.seed;
        o.loss = self.loss;
        o.d_model = self.d_model;
        o.encoder_layers = self.encoder_layers;
        o.decoder_layers = self.decoder_layers;
        o.heads = self.heads;
        o.ffn_dim = self.ffn_dim;
        o.patch = self.patch;
        o.stem = self.stem.clone();
        o.branch_init = self.branch_init;
        o.entangle_image_positions = self.entangle_image_positions;
        o.image_size = self.image_size;
        o.vocab_size = self.vocab_size;
        o.dropout = self.dropout;
        o.eval_every = self.eval_every;
        o.eval_examples = self.eval_examples;
        o.checkpoint_every = self.checkpoint_every;
        o.resume = self.resume;
        o.init = self.init.clone();
        o.encoder_mode = self.encoder_mode;
        o.attn_scale_factor = self.attn_scale_factor;
        o.max_train_images = self.max_train_images;
        o.captions_per_image = Some(self.captions_per_image);
        o.image_exit_sampling = self.image_exit_sampling;
        o.text_exit_sampling = self.text_exit_sampling;
        o.freeze_image_trunk = self.freeze_image_trunk;
        o.resnet = self.resnet;
        o.shards = self.shards;
        o.time_budget_secs = self.time_budget_secs;
        o.stop_at = self.stop_at;
        o.final_eval = self.final_eval;
        o.progress = !self.quiet;
        o
    }
}

fn parse_resnet(s: &str) -> std::result::Result<[usize; 3], String> {
    crate::model::resnet::blocks_for(s)
        .ok_or_else(|| format!("unknown ResNet {s:?}: resnet50, resnet101 or resnet152"))
}

pub fn main(args: TrainArgs) -> Result<()> {
    let opts = args.options();
    // Shards bring their own threads: candle's barrier pool (sized on first use) would only
    // make them queue on its lock. Its ops give the same bits without it.
    let state = if opts.resume {
        crate::train::load_state(&opts.out_dir).ok()
    } else {
        None
    };
    if run_shards(&opts, state.as_ref()) > 1 && std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let report = train(&opts)?;
    let last: Vec<f32> = report.losses.iter().rev().take(20).copied().collect();
    let mean = last.iter().sum::<f32>() / last.len().max(1) as f32;
    println!(
        "steps {}..{} in {:.1}s ({:.0} tok/s), mean loss of the last {} steps {:.4}",
        report.start_step,
        report.end_step,
        report.wall_secs,
        report.tokens_per_sec,
        last.len(),
        mean
    );
    if let Some(e) = report.evals.last() {
        println!(
            "valid (first {} questions): VE accuracy {:.4}, caption token accuracy {:.4}",
            e.result.ve_n, e.result.ve_accuracy, e.result.caption_token_accuracy
        );
    }
    if let (Some(v), Some(t)) = (report.valid_ve_accuracy, report.test_ve_accuracy) {
        println!("full-depth VE accuracy: valid {v:.4}, test {t:.4}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    #[test]
    fn command_line_names_are_the_file_names() {
        for k in LossKind::ALL {
            assert_eq!(serde_json::to_string(&k).unwrap(), format!("\"{k}\""));
            assert_eq!(k.name().parse::<LossKind>().unwrap(), k);
            assert_eq!(<LossKind as ValueEnum>::from_str(k.name(), false), Ok(k));
        }
        for b in BranchInit::ALL {
            assert_eq!(serde_json::to_string(&b).unwrap(), format!("\"{b}\""));
            assert_eq!(b.name().parse::<BranchInit>().unwrap(), b);
            assert_eq!(<BranchInit as ValueEnum>::from_str(b.name(), false), Ok(b));
        }
        let e = "layerwise".parse::<LossKind>().unwrap_err();
        assert!(
            e.to_string().contains("expected layer-wise or final-only"),
            "{e}"
        );
        assert!("zero".parse::<BranchInit>().is_err());
    }
}
