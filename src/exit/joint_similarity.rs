//! MuE without modality decomposition (the paper's ablation): one similarity threshold
//! shared by the image and the text stream, plus the decoder threshold.
//!
//! The published ablation runs a single encoder over the concatenated sequence and exits
//! it as a whole. This engine always runs the two streams separately, so the simplest
//! faithful version is the same threshold for both streams: each stream still stops on
//! its own similarity, but neither can be tuned to its modality's saturation point.

use super::mue::{decoder_number, SIMILARITY_GRID};
use super::spec::{Family, Flags, Marker, Params, PolicySpec, Role, Style};
use super::{validate_threshold, DecoderThreshold, ExitPolicy, LayerSignal, MuePolicy, Site};
use serde::{Deserialize, Serialize};

pub const FAMILY: Family = Family {
    name: "joint",
    title: "MuE w/o modality decomposition (`joint`)",
    help: "One similarity threshold (--threshold) for both streams, --dec-threshold for tokens",
    role: Role::Ablation,
    calibrated: true,
    style: Style {
        color: (31, 119, 180),
        marker: Marker::Circle,
    },
    grid,
    from_flags,
};

fn grid(_decoder_layers: usize) -> Vec<PolicySpec> {
    let mut g = Vec::new();
    for &encoder in &SIMILARITY_GRID {
        for &tau in &[0.9f32, 0.99, 1.0] {
            g.push(PolicySpec::Joint(JointSpec {
                encoder,
                decoder: DecoderThreshold::Constant { tau },
            }));
        }
    }
    g
}

fn from_flags(f: &Flags) -> anyhow::Result<PolicySpec> {
    Ok(PolicySpec::Joint(JointSpec {
        encoder: f.threshold("joint")?,
        decoder: f.mue.decoder,
    }))
}

/// A joint grid point: `{"policy": "joint", "encoder": 0.9, "decoder": 0.99}` (the decoder
/// threshold written as MuE's is).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct JointSpec {
    pub encoder: f32,
    #[serde(with = "decoder_number")]
    pub decoder: DecoderThreshold,
}

impl Params for JointSpec {
    fn params(&self) -> String {
        format!("encoder={} {}", self.encoder, self.decoder.params())
    }
    fn build(&self) -> anyhow::Result<Box<dyn ExitPolicy>> {
        Ok(Box::new(JointSimilarity::with_decoder(
            self.encoder,
            self.decoder,
        )?))
    }
    fn as_mue(&self) -> Option<MuePolicy> {
        JointSimilarity::with_decoder(self.encoder, self.decoder)
            .ok()
            .map(|j| j.as_mue())
    }
}

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

    /// Any decoder threshold form, validated.
    pub fn with_decoder(encoder: f32, decoder: DecoderThreshold) -> anyhow::Result<Self> {
        validate_threshold("encoder", encoder)?;
        decoder.validate()?;
        Ok(Self { encoder, decoder })
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
