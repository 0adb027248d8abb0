//! Command handlers behind the `mue` binary (kept in the library so they can be tested).

pub mod bench;
pub mod convert;
pub mod demo;
pub mod eval;
pub mod load;
pub mod report;
pub mod run;
pub mod serve;
pub mod train;

use crate::exit::{DecoderThreshold, MuePolicy};
use anyhow::Result;

pub use crate::paths::{find_default, model_dir, Found};
pub use crate::task::{Task, TaskThresholds};

/// clap reads a task by its name (`caption`, `entail`); the type itself knows no clap.
impl clap::ValueEnum for Task {
    fn value_variants<'a>() -> &'a [Self] {
        &Task::ALL
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.name()))
    }
}

/// Exit settings given on the command line, over the model's defaults.
#[derive(Debug, Clone, clap::Args)]
pub struct ExitArgs {
    /// Image-stream threshold (cosine similarity; >= 1 never exits, < -1 exits after layer 1).
    #[arg(long, allow_negative_numbers = true)]
    pub img_threshold: Option<f32>,
    /// Text-stream threshold.
    #[arg(long, allow_negative_numbers = true)]
    pub text_threshold: Option<f32>,
    /// Decoder threshold (per generated token). Alone it is a constant; with
    /// --dec-strict-fraction or --dec-decay it is the schedule's tau.
    #[arg(long, allow_negative_numbers = true)]
    pub dec_threshold: Option<f32>,
    /// Decoder schedule (the paper's, after CALM): no exit during this fraction of the
    /// maximum length, then `decay * tau + (1 - decay) * exp(-(t + 1) / (T + 1))`. Giving
    /// it or --dec-decay turns the schedule on (the other defaults to the paper's 1/3, 0.9).
    #[arg(long)]
    pub dec_strict_fraction: Option<f32>,
    /// Decay of the decoder schedule (see --dec-strict-fraction).
    #[arg(long)]
    pub dec_decay: Option<f32>,
    /// Keys/values of skipped decoder layers: propagate or copy.
    #[arg(long, default_value = "propagate")]
    pub kv_fill: String,
}

/// The command line's defaults: no overrides, `propagate`.
impl Default for ExitArgs {
    fn default() -> Self {
        Self {
            img_threshold: None,
            text_threshold: None,
            dec_threshold: None,
            dec_strict_fraction: None,
            dec_decay: None,
            kv_fill: "propagate".into(),
        }
    }
}

impl ExitArgs {
    pub fn policy(&self, base: MuePolicy) -> Result<MuePolicy> {
        let dec = decoder_threshold(
            base.decoder,
            self.dec_threshold,
            self.dec_strict_fraction,
            self.dec_decay,
        );
        MuePolicy::with_decoder(
            self.img_threshold.unwrap_or(base.image),
            self.text_threshold.unwrap_or(base.text),
            dec,
        )
    }
}

/// The decoder threshold from the command line over `base`: `--dec-threshold` alone is a
/// constant; a schedule flag makes (or adjusts) the schedule, keeping what is not given
/// from `base` (or the paper's values when `base` is a constant).
pub fn decoder_threshold(
    base: DecoderThreshold,
    tau: Option<f32>,
    strict_fraction: Option<f32>,
    decay: Option<f32>,
) -> DecoderThreshold {
    use crate::exit::mue::{PAPER_DECAY, PAPER_STRICT_FRACTION};
    let tau_v = tau.unwrap_or(base.tau());
    if strict_fraction.is_none() && decay.is_none() {
        return match tau {
            Some(tau) => DecoderThreshold::Constant { tau },
            None => base,
        };
    }
    let (s0, d0) = match base {
        DecoderThreshold::Calm {
            strict_fraction,
            decay,
            ..
        } => (strict_fraction, decay),
        DecoderThreshold::Constant { .. } => (PAPER_STRICT_FRACTION, PAPER_DECAY),
    };
    DecoderThreshold::Calm {
        tau: tau_v,
        strict_fraction: strict_fraction.unwrap_or(s0),
        decay: decay.unwrap_or(d0),
    }
}
