//! DeeBERT: exit a decoder token once the entropy of its intermediate prediction falls
//! below a threshold. Encoder streams have no prediction head and run at full depth.

use super::confidence_baseline;
use super::family::{Family, Marker, Role, Style};

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

confidence_baseline!(
    /// Exit when `entropy(softmax(intermediate logits)) < threshold` (nats). In generation
    /// the softmax is over the vocabulary; in entailment over the answer tokens, the
    /// distribution the answer is chosen from (`generate::score`).
    EntropyPolicy, FAMILY, ENTROPY_GRID, |p, t| p.entropy < t
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::{ExitPolicy, LayerSignal, Prediction, Site, Stream};

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
        let plain = LayerSignal::of_similarity(1.0);
        assert!(!p.should_exit(DEC, &[plain], 6));
        assert!(!p.should_exit(DEC, &[], 6));
        assert!(p.needs_predictions());
        assert!(EntropyPolicy::new(f32::NAN).is_err());
    }
}
