//! DeeBERT: exit a decoder token once the entropy of its intermediate prediction falls
//! below a threshold. Encoder streams have no prediction head and run at full depth.

use super::family::{Family, Flags, Marker, Params, Role, Style};
use super::{latest_decoder_prediction, validate_threshold, ExitPolicy, LayerSignal, Site};
use serde::{Deserialize, Serialize};

pub const FAMILY: Family = Family {
    name: "entropy",
    title: "DeeBERT (entropy)",
    help: "DeeBERT: decoder entropy below --threshold",
    role: Role::Baseline,
    calibrated: false,
    style: Style {
        color: (44, 160, 44),
        marker: Marker::Circle,
    },
};

/// Entropy thresholds (nats: over the vocabulary in generation, over the three answers in
/// entailment, where the entropy is at most ln 3).
pub const ENTROPY_GRID: [f32; 5] = [0.1, 0.5, 1.0, 2.0, 3.0];

impl Params for EntropyPolicy {
    fn grid(_decoder_layers: usize) -> Vec<Self> {
        ENTROPY_GRID.map(|threshold| Self { threshold }).to_vec()
    }
    fn from_flags(f: &Flags) -> anyhow::Result<Self> {
        let threshold = f.threshold(FAMILY.name)?;
        Ok(Self { threshold })
    }
    fn params(&self) -> String {
        format!("threshold={}", self.threshold)
    }
    fn build(&self) -> anyhow::Result<Box<dyn ExitPolicy>> {
        Ok(Box::new(EntropyPolicy::new(self.threshold)?))
    }
}

/// Exit when `entropy(softmax(intermediate logits)) < threshold` (nats). In generation the
/// softmax is over the vocabulary; in entailment over the answer tokens, the distribution
/// the answer is chosen from (`generate::score`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EntropyPolicy {
    pub threshold: f32,
}

impl EntropyPolicy {
    pub fn new(threshold: f32) -> anyhow::Result<Self> {
        validate_threshold("entropy", threshold)?;
        Ok(Self { threshold })
    }
}

impl ExitPolicy for EntropyPolicy {
    fn name(&self) -> String {
        "entropy".into()
    }

    fn needs_predictions(&self) -> bool {
        true
    }

    fn should_exit(&self, site: Site, history: &[LayerSignal], _num_layers: usize) -> bool {
        latest_decoder_prediction(site, history).is_some_and(|p| p.entropy < self.threshold)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::{Prediction, Stream};

    fn pred(top1: u32, entropy: f32) -> LayerSignal {
        LayerSignal {
            similarity: 0.999,
            prediction: Some(Prediction {
                top1,
                entropy,
                margin: 0.5,
            }),
        }
    }

    const DEC: Site = Site::Decoder {
        step: 2,
        max_len: 16,
    };

    #[test]
    fn exits_on_low_entropy_decoder_only() {
        let p = EntropyPolicy::new(0.5).unwrap();
        assert!(!p.should_exit(DEC, &[pred(1, 2.0)], 6));
        assert!(!p.should_exit(DEC, &[pred(1, 2.0), pred(1, 0.5)], 6));
        assert!(p.should_exit(DEC, &[pred(1, 2.0), pred(1, 0.49)], 6));
        // Only the latest layer counts.
        assert!(!p.should_exit(DEC, &[pred(1, 0.1), pred(1, 0.9)], 6));
        // Encoder streams never exit, whatever the signal.
        for s in [Stream::Image, Stream::Text] {
            assert!(!p.should_exit(Site::Encoder(s), &[pred(1, 0.0)], 6));
        }
        // No prediction, no exit.
        let plain = LayerSignal {
            similarity: 1.0,
            prediction: None,
        };
        assert!(!p.should_exit(DEC, &[plain], 6));
        assert!(!p.should_exit(DEC, &[], 6));
        assert!(p.needs_predictions());
        assert!(EntropyPolicy::new(f32::NAN).is_err());
    }
}
