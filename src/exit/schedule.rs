//! The decoder threshold of MuE: a constant, or the paper's schedule over the decoding step
//! (after CALM).

use super::validate_threshold;
use serde::{Deserialize, Serialize};

/// A constant decoder threshold is written as a plain number (as grid files have always
/// had it), the schedule as its tagged object; both read back.
pub mod decoder_number {
    use super::DecoderThreshold;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(d: &DecoderThreshold, s: S) -> Result<S::Ok, S::Error> {
        match d {
            DecoderThreshold::Constant { tau } => tau.serialize(s),
            calm => calm.serialize(s),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DecoderThreshold, D::Error> {
        DecoderThreshold::deserialize(d)
    }
}

/// Decoder threshold, constant or following CALM's schedule over the decoding step.
/// Stored as `{"kind": "constant", "tau": ..}` or `{"kind": "calm", ..}`; a plain number
/// also reads as a constant (sweep grids write it that way).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
#[serde(from = "DecoderThresholdRepr")]
pub enum DecoderThreshold {
    Constant {
        tau: f32,
    },
    /// No exit during the first `strict_fraction` of `max_len` steps, then
    /// `decay * tau + (1 - decay) * exp(-(t + 1) / (T + 1))`.
    Calm {
        tau: f32,
        strict_fraction: f32,
        decay: f32,
    },
}

/// What a stored decoder threshold may look like: a number or the tagged form.
#[derive(Deserialize)]
#[serde(untagged)]
enum DecoderThresholdRepr {
    Tau(f32),
    Tagged(TaggedThreshold),
}

#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum TaggedThreshold {
    Constant {
        tau: f32,
    },
    Calm {
        tau: f32,
        strict_fraction: f32,
        decay: f32,
    },
}

impl From<DecoderThresholdRepr> for DecoderThreshold {
    fn from(r: DecoderThresholdRepr) -> Self {
        match r {
            DecoderThresholdRepr::Tau(tau)
            | DecoderThresholdRepr::Tagged(TaggedThreshold::Constant { tau }) => {
                DecoderThreshold::Constant { tau }
            }
            DecoderThresholdRepr::Tagged(TaggedThreshold::Calm {
                tau,
                strict_fraction,
                decay,
            }) => DecoderThreshold::Calm {
                tau,
                strict_fraction,
                decay,
            },
        }
    }
}

/// The paper's schedule (after CALM): no exit in the first third of the maximum length.
pub const PAPER_STRICT_FRACTION: f32 = 1.0 / 3.0;
/// The paper's schedule: `0.9 * tau + 0.1 * exp(-(t + 1) / (T + 1))` after the strict part.
pub const PAPER_DECAY: f32 = 0.9;

impl DecoderThreshold {
    /// The paper's schedule around `tau`.
    pub fn paper(tau: f32) -> Self {
        DecoderThreshold::Calm {
            tau,
            strict_fraction: PAPER_STRICT_FRACTION,
            decay: PAPER_DECAY,
        }
    }

    /// The base threshold `tau` (the constant, or the schedule's).
    pub fn tau(&self) -> f32 {
        match *self {
            DecoderThreshold::Constant { tau } | DecoderThreshold::Calm { tau, .. } => tau,
        }
    }

    pub fn is_schedule(&self) -> bool {
        matches!(self, DecoderThreshold::Calm { .. })
    }

    /// Check that every parameter is usable.
    pub fn validate(&self) -> anyhow::Result<()> {
        validate_threshold("decoder", self.tau())?;
        if let DecoderThreshold::Calm {
            strict_fraction,
            decay,
            ..
        } = *self
        {
            if !(0.0..=1.0).contains(&strict_fraction) {
                anyhow::bail!(
                    "decoder schedule: strict_fraction must lie in [0, 1], got {strict_fraction}"
                );
            }
            if !(0.0..=1.0).contains(&decay) {
                anyhow::bail!("decoder schedule: decay must lie in [0, 1], got {decay}");
            }
        }
        Ok(())
    }

    /// `key=value` words as sweeps and reports print them: `decoder=0.9`, or
    /// `decoder=0.9 strict=0.333 decay=0.9` for the schedule.
    pub fn params(&self) -> String {
        match *self {
            DecoderThreshold::Constant { tau } => format!("decoder={tau}"),
            DecoderThreshold::Calm {
                tau,
                strict_fraction,
                decay,
            } => format!(
                "decoder={tau} strict={} decay={decay}",
                (strict_fraction * 1000.0).round() / 1000.0
            ),
        }
    }

    pub fn at(&self, step: usize, max_len: usize) -> f32 {
        match *self {
            DecoderThreshold::Constant { tau } => tau,
            DecoderThreshold::Calm {
                tau,
                strict_fraction,
                decay,
            } => {
                if (step as f32) < strict_fraction * max_len as f32 {
                    f32::INFINITY
                } else {
                    let e = (-((step + 1) as f32) / (max_len + 1) as f32).exp();
                    decay * tau + (1.0 - decay) * e
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calm_schedule_is_strict_early() {
        let s = DecoderThreshold::Calm {
            tau: 0.9,
            strict_fraction: 1.0 / 3.0,
            decay: 0.9,
        };
        assert!(s.at(0, 15).is_infinite());
        let late = s.at(10, 15);
        let want = 0.9 * 0.9 + 0.1 * (-(11.0f32) / 16.0).exp();
        assert!((late - want).abs() < 1e-6);
    }
}
