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
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// How many folders above the executable's own are searched for a default resource, so
/// that `target/release/mue` (or `target/release/deps/...`) in a clone finds the
/// repository's `models/default` and `examples`.
const EXE_ANCESTORS: usize = 4;

/// A default resource found by [`find_default`]: where it is and why that one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub path: PathBuf,
    /// `$VAR`, `working directory` or `beside the executable`.
    pub source: String,
}

/// Finds a default resource the way an installed command should: the environment
/// variable `var` when set (used as given, existing or not: the user asked for it), then
/// `rel` under the working directory, then `rel` beside the executable and in up to
/// [`EXE_ANCESTORS`] folders above it. A candidate counts when it holds `marker`. The
/// error lists every place tried.
pub fn find_default(var: &str, rel: &str, marker: &str) -> Result<Found> {
    if let Some(v) = std::env::var_os(var).filter(|v| !v.is_empty()) {
        return Ok(Found {
            path: PathBuf::from(v),
            source: format!("${var}"),
        });
    }
    let mut tried = vec![format!("${var} (not set)")];
    let cwd = PathBuf::from(rel);
    if cwd.join(marker).is_file() {
        return Ok(Found {
            path: cwd,
            source: "working directory".into(),
        });
    }
    tried.push(format!("./{rel}"));
    if let Some(exe_dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.canonicalize().ok())
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        for dir in exe_dir.ancestors().take(EXE_ANCESTORS + 1) {
            let p = dir.join(rel);
            if p.join(marker).is_file() {
                return Ok(Found {
                    path: p,
                    source: "beside the executable".into(),
                });
            }
            tried.push(p.display().to_string());
        }
    }
    anyhow::bail!(
        "no {rel} found (a folder with {marker}); tried: {}",
        tried.join(", ")
    )
}

/// The model directory a command uses: `--model` when given, else the default model
/// (`$MUE_MODEL`, `./models/default`, then `models/default` beside the executable), and
/// says on stderr which default was used.
pub fn model_dir(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let found = find_default("MUE_MODEL", "models/default", "config.json")
        .context("no --model given and no default model")?;
    eprintln!("mue: model {} ({})", found.path.display(), found.source);
    Ok(found.path)
}

/// The two tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    Caption,
    Entail,
}

impl Task {
    /// The name on the command line and in file names.
    pub fn name(&self) -> &'static str {
        match self {
            Task::Caption => "caption",
            Task::Entail => "entail",
        }
    }
}

/// Per-task MuE thresholds, as `exits.json` in a model directory stores them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TaskThresholds {
    pub caption: MuePolicy,
    pub entail: MuePolicy,
}

impl Default for TaskThresholds {
    /// The paper's published settings: the image stream saturates early on entailment,
    /// the text prompt on captioning.
    fn default() -> Self {
        let c = |i: f32, t: f32, d: f32| MuePolicy {
            image: i,
            text: t,
            decoder: DecoderThreshold::Constant { tau: d },
        };
        TaskThresholds {
            caption: c(0.99, 0.7, 0.9),
            entail: c(0.7, 0.99, 0.9),
        }
    }
}

impl TaskThresholds {
    /// `exits.json` of the model directory if present, else the paper's settings.
    pub fn for_model(dir: &Path) -> Result<Self> {
        let path = dir.join("exits.json");
        if !path.is_file() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid thresholds file", path.display()))
    }

    pub fn get(&self, task: Task) -> MuePolicy {
        match task {
            Task::Caption => self.caption,
            Task::Entail => self.entail,
        }
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
