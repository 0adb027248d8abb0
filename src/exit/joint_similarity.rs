//! MuE without modality decomposition (the paper's ablation): one similarity threshold
//! shared by the image and the text stream, plus the decoder threshold.
//!
//! The published ablation runs a single encoder over the concatenated sequence and exits
//! it as a whole. This engine always runs the two streams separately, so the simplest
//! faithful version is the same threshold for both streams: each stream still stops on
//! its own similarity, but neither can be tuned to its modality's saturation point.

use super::{validate_threshold, DecoderThreshold, ExitPolicy, LayerSignal, MuePolicy, Site};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct JointSimilarity {
    /// Threshold of both encoder streams.
    pub encoder: f32,
    pub decoder: DecoderThreshold,
}

impl JointSimilarity {
    pub fn new(encoder: f32, decoder: f32) -> anyhow::Result<Self> {
        validate_threshold("encoder", encoder)?;
        validate_threshold("decoder", decoder)?;
        Ok(Self {
            encoder,
            decoder: DecoderThreshold::Constant { tau: decoder },
        })
    }

    /// The equivalent decomposed policy (equal image and text thresholds).
    pub fn as_mue(&self) -> MuePolicy {
        MuePolicy {
            image: self.encoder,
            text: self.encoder,
            decoder: self.decoder,
        }
    }
}

impl ExitPolicy for JointSimilarity {
    fn name(&self) -> String {
        "joint".into()
    }

    fn should_exit(&self, site: Site, history: &[LayerSignal], num_layers: usize) -> bool {
        self.as_mue().should_exit(site, history, num_layers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::Stream;

    fn sig(s: f32) -> LayerSignal {
        LayerSignal {
            similarity: s,
            prediction: None,
        }
    }

    #[test]
    fn one_threshold_for_both_streams() {
        let p = JointSimilarity::new(0.9, 0.95).unwrap();
        for s in [Stream::Image, Stream::Text] {
            let site = Site::Encoder(s);
            assert!(!p.should_exit(site, &[sig(0.5), sig(0.9)], 6));
            assert!(p.should_exit(site, &[sig(0.5), sig(0.91)], 6));
        }
        let dec = Site::Decoder {
            step: 0,
            max_len: 4,
        };
        assert!(!p.should_exit(dec, &[sig(0.93)], 6));
        assert!(p.should_exit(dec, &[sig(0.96)], 6));
        assert!(!p.needs_predictions());
        assert!(JointSimilarity::new(f32::INFINITY, 0.9).is_err());
    }
}
