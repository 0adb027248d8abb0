//! Exit policies: after each layer, decide per sample (encoder stream) or per row
//! (decoder token) whether to stop.

pub mod entropy;
pub mod family;
pub mod joint_similarity;
pub mod margin;
pub mod mue;
pub mod patience;
pub mod schedule;
pub mod spec;
pub mod static_depth;

use candle_core::{Result, Tensor, D};
use serde::{Deserialize, Serialize};

pub use entropy::EntropyPolicy;
pub use joint_similarity::{JointSimilarity, JointSpec};
pub use margin::MarginPolicy;
pub use mue::{DecoderThreshold, MuePolicy, MueSpec};
pub use patience::PatiencePolicy;
pub use spec::{PolicySpec, FAMILIES};
pub use static_depth::{StaticDepth, StaticSpec};

/// The two encoder streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Image,
    Text,
}

/// Where an exit decision is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Site {
    Encoder(Stream),
    /// Decoding step `step` (0-based) of at most `max_len` steps. Teacher-forced passes use step 0.
    Decoder {
        step: usize,
        max_len: usize,
    },
}

/// What a policy can see about one layer of one row.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LayerSignal {
    /// Cosine similarity of the layer's output and input (f32, padding excluded).
    pub similarity: f32,
    /// Only when the policy asks for intermediate predictions (decoder).
    pub prediction: Option<Prediction>,
}

impl LayerSignal {
    /// A signal with a similarity and no intermediate prediction.
    pub fn of_similarity(similarity: f32) -> Self {
        Self {
            similarity,
            prediction: None,
        }
    }
}

/// Summary of an intermediate output distribution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prediction {
    pub top1: u32,
    /// Entropy of the softmax (nats).
    pub entropy: f32,
    /// Top-1 minus top-2 probability.
    pub margin: f32,
}

impl Prediction {
    /// Top-1 token, entropy (nats) and top-1 minus top-2 probability of a distribution.
    pub fn from_probs(p: &[f32]) -> Self {
        let (mut i1, mut p1, mut p2) = (0usize, f32::MIN, f32::MIN);
        let mut entropy = 0.0f32;
        for (i, &v) in p.iter().enumerate() {
            if v > 0.0 {
                entropy -= v * v.ln();
            }
            if v > p1 {
                p2 = p1;
                p1 = v;
                i1 = i;
            } else if v > p2 {
                p2 = v;
            }
        }
        Prediction {
            top1: i1 as u32,
            entropy,
            margin: p1 - p2.max(0.0),
        }
    }
}

/// Decides, after each layer, whether a stream or a token stops.
pub trait ExitPolicy: Send + Sync + std::fmt::Debug {
    fn name(&self) -> String;

    /// Whether decoder layers must produce an output distribution for `Prediction` signals.
    /// Costly in generation (a full vocabulary projection per executed layer; classification
    /// projects onto the answer tokens only); MuE does not need it.
    fn needs_predictions(&self) -> bool {
        false
    }

    /// `history[i]` is the signal after layer `i + 1`. Called after every layer but the last;
    /// `true` stops the row with the latest layer's state as its output.
    fn should_exit(&self, site: Site, history: &[LayerSignal], num_layers: usize) -> bool;
}

/// Never exits: the full-depth model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct FullDepth;

pub const FULL: family::Family = family::Family {
    name: "full",
    title: "Full model",
    help: "Full depth: no exit",
    role: family::Role::Reference,
    calibrated: false,
    style: family::Style {
        color: (0, 0, 0),
        marker: family::Marker::Circle,
    },
};

impl family::Params for FullDepth {
    fn params(&self) -> String {
        String::new()
    }
    fn build(&self) -> anyhow::Result<Box<dyn ExitPolicy>> {
        Ok(Box::new(FullDepth))
    }
    fn grid(_: usize) -> Vec<Self> {
        vec![FullDepth]
    }
    fn from_flags(_: &family::Flags) -> anyhow::Result<Self> {
        Ok(FullDepth)
    }
}

impl ExitPolicy for FullDepth {
    fn name(&self) -> String {
        "full".into()
    }
    fn should_exit(&self, _: Site, _: &[LayerSignal], _: usize) -> bool {
        false
    }
}

/// Cosine similarity per row between `new` and `old` (`[b, n, d]`), over the tokens whose
/// `keep` entry is 1 (`[b, n]`, or all tokens when `None`). Computed in f32 and clamped to
/// [-1, 1] so that a threshold of 1 can never be passed.
pub fn row_similarity(new: &Tensor, old: &Tensor, keep: Option<&Tensor>) -> Result<Vec<f32>> {
    let new = new.to_dtype(candle_core::DType::F32)?;
    let old = old.to_dtype(candle_core::DType::F32)?;
    let (new, old) = match keep {
        Some(k) => {
            let k = k.unsqueeze(D::Minus1)?;
            (new.broadcast_mul(&k)?, old.broadcast_mul(&k)?)
        }
        None => (new, old),
    };
    let b = new.dim(0)?;
    let new = new.reshape((b, ()))?;
    let old = old.reshape((b, ()))?;
    let dot = (&new * &old)?.sum(1)?.to_vec1::<f32>()?;
    let nn = new.sqr()?.sum(1)?.to_vec1::<f32>()?;
    let no = old.sqr()?.sum(1)?.to_vec1::<f32>()?;
    Ok(dot
        .iter()
        .zip(nn.iter().zip(&no))
        .map(|(d, (a, b))| {
            let denom = (a * b).sqrt();
            if denom > 0.0 {
                (d / denom).clamp(-1.0, 1.0)
            } else {
                0.0
            }
        })
        .collect())
}

/// Check that a threshold is a usable number.
pub fn validate_threshold(name: &str, value: f32) -> anyhow::Result<()> {
    if !value.is_finite() {
        anyhow::bail!("{name} threshold must be a finite number, got {value}");
    }
    Ok(())
}

/// The latest layer's prediction of a decoder token: what the confidence baselines
/// (entropy, margin) decide on. Encoder streams have no prediction head, so none.
pub fn latest_decoder_prediction(site: Site, history: &[LayerSignal]) -> Option<Prediction> {
    match site {
        Site::Decoder { .. } => history.last().and_then(|s| s.prediction),
        Site::Encoder(_) => None,
    }
}

/// A baseline that exits a decoder token once one confidence of its latest prediction
/// passes a threshold (DeeBERT's entropy, CALM's margin). The policy type and what it
/// implements are the same for each: validation, grid, flags, `ExitPolicy`. `$exits`
/// says whether prediction `$p` exits at threshold `$t`.
macro_rules! confidence_baseline {
    ($(#[$doc:meta])* $ty:ident, $family:expr, $grid:expr, |$p:ident, $t:ident| $exits:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
        pub struct $ty {
            pub threshold: f32,
        }

        impl $ty {
            pub fn new(threshold: f32) -> anyhow::Result<Self> {
                $crate::exit::validate_threshold($family.name, threshold)?;
                Ok(Self { threshold })
            }
        }

        impl $crate::exit::family::Params for $ty {
            fn grid(_decoder_layers: usize) -> Vec<Self> {
                $grid.map(|threshold| Self { threshold }).to_vec()
            }
            fn from_flags(f: &$crate::exit::family::Flags) -> anyhow::Result<Self> {
                let threshold = f.threshold($family.name)?;
                Ok(Self { threshold })
            }
            fn params(&self) -> String {
                format!("threshold={}", self.threshold)
            }
            fn build(&self) -> anyhow::Result<Box<dyn $crate::exit::ExitPolicy>> {
                Ok(Box::new(Self::new(self.threshold)?))
            }
        }

        impl $crate::exit::ExitPolicy for $ty {
            fn name(&self) -> String {
                $family.name.into()
            }

            fn needs_predictions(&self) -> bool {
                true
            }

            fn should_exit(
                &self,
                site: $crate::exit::Site,
                history: &[$crate::exit::LayerSignal],
                _num_layers: usize,
            ) -> bool {
                let $t = self.threshold;
                $crate::exit::latest_decoder_prediction(site, history).is_some_and(|$p| $exits)
            }
        }
    };
}
pub(crate) use confidence_baseline;
