//! CALM's softmax-response confidence: exit a decoder token once the gap between the top-1
//! and top-2 probabilities of its intermediate prediction exceeds a threshold. Encoder
//! streams run at full depth.

use super::family::{Family, Flags, Marker, Params, Role, Style};
use super::{latest_decoder_prediction, validate_threshold, ExitPolicy, LayerSignal, Site};
use serde::{Deserialize, Serialize};

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

impl Params for MarginPolicy {
    fn grid(_decoder_layers: usize) -> Vec<Self> {
        MARGIN_GRID.map(|threshold| Self { threshold }).to_vec()
    }
    fn from_flags(f: &Flags) -> anyhow::Result<Self> {
        let threshold = f.threshold(FAMILY.name)?;
        Ok(Self { threshold })
    }
    fn params(&self) -> String {
        format!("threshold={}", self.threshold)
    }
    fn build(&self) -> anyhow::Result<Box<dyn ExitPolicy>> {
        Ok(Box::new(MarginPolicy::new(self.threshold)?))
    }
}

/// Exit when `p_top1 - p_top2 > threshold` (strict).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MarginPolicy {
    pub threshold: f32,
}

impl MarginPolicy {
    pub fn new(threshold: f32) -> anyhow::Result<Self> {
        validate_threshold("margin", threshold)?;
        Ok(Self { threshold })
    }
}

impl ExitPolicy for MarginPolicy {
    fn name(&self) -> String {
        "margin".into()
    }

    fn needs_predictions(&self) -> bool {
        true
    }

    fn should_exit(&self, site: Site, history: &[LayerSignal], _num_layers: usize) -> bool {
        latest_decoder_prediction(site, history).is_some_and(|p| p.margin > self.threshold)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::{Prediction, Stream};

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
        let none = LayerSignal {
            similarity: 1.0,
            prediction: None,
        };
        assert!(!p.should_exit(dec, &[none], 6));
        // A margin can never exceed 1: threshold 1 never exits.
        assert!(!MarginPolicy::new(1.0)
            .unwrap()
            .should_exit(dec, &[pred(1.0)], 6));
        assert!(p.needs_predictions());
    }
}
