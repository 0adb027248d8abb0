//! CALM's softmax-response confidence: exit a decoder token once the gap between the top-1
//! and top-2 probabilities of its intermediate prediction exceeds a threshold. Encoder
//! streams run at full depth.

use super::confidence_baseline;
use super::family::{Family, Marker, Role, Style};

pub const FAMILY: Family = Family {
    name: "margin",
    title: "CALM (softmax margin)",
    help: "CALM softmax margin above --threshold",
    role: Role::Baseline,
    calibrated: false,
    style: Style {
        color: (148, 103, 189),
        marker: Marker::Circle,
    },
};

/// Softmax margin thresholds.
pub const MARGIN_GRID: [f32; 5] = [0.1, 0.3, 0.5, 0.7, 0.9];

confidence_baseline!(
    /// Exit when `p_top1 - p_top2 > threshold` (strict).
    MarginPolicy, FAMILY, MARGIN_GRID, |p, t| p.margin > t
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::{ExitPolicy, LayerSignal, Prediction, Site, Stream};

    fn pred(margin: f32) -> LayerSignal {
        LayerSignal {
            similarity: 0.0,
            prediction: Some(Prediction {
                top1: 7,
                entropy: 0.0,
                margin,
            }),
        }
    }

    #[test]
    fn exits_on_wide_margin_decoder_only() {
        let dec = Site::Decoder {
            step: 0,
            max_len: 1,
        };
        let p = MarginPolicy::new(0.6).unwrap();
        assert!(!p.should_exit(dec, &[pred(0.2)], 6));
        assert!(!p.should_exit(dec, &[pred(0.2), pred(0.6)], 6));
        assert!(p.should_exit(dec, &[pred(0.2), pred(0.61)], 6));
        assert!(!p.should_exit(dec, &[pred(0.9), pred(0.3)], 6));
        assert!(!p.should_exit(Site::Encoder(Stream::Text), &[pred(1.0)], 6));
        assert!(!p.should_exit(Site::Encoder(Stream::Image), &[pred(1.0)], 6));
        let none = LayerSignal::of_similarity(1.0);
        assert!(!p.should_exit(dec, &[none], 6));
        // A margin can never exceed 1: threshold 1 never exits.
        assert!(!MarginPolicy::new(1.0)
            .unwrap()
            .should_exit(dec, &[pred(1.0)], 6));
        assert!(p.needs_predictions());
    }
}
