//! MuE without modality decomposition (the paper's ablation): one similarity threshold
//! shared by the image and the text stream, plus the decoder threshold.
//!
//! The published ablation runs a single encoder over the concatenated sequence and exits
//! it as a whole. This engine always runs the two streams separately, so the simplest
//! faithful version is the same threshold for both streams: each stream still stops on
//! its own similarity, but neither can be tuned to its modality's saturation point.

use super::family::{Family, Flags, Marker, Params, Role, Style};
use super::mue::{decoder_number, SIMILARITY_GRID};
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
};

fn grid(_decoder_layers: usize) -> Vec<JointSpec> {
    let mut g = Vec::new();
    for &encoder in &SIMILARITY_GRID {
        for &tau in &[0.9f32, 0.99, 1.0] {
            g.push(JointSpec {
                encoder,
                decoder: DecoderThreshold::Constant { tau },
            });
        }
    }
    g
}

fn from_flags(f: &Flags) -> anyhow::Result<JointSpec> {
    Ok(JointSpec {
        encoder: f.threshold("joint")?,
        decoder: f.decoder,
    })
}

/// A joint grid point: `{"policy": "joint", "encoder": 0.9, "decoder": 0.99}` (the decoder
/// threshold written as MuE's is).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct JointSpec {
    pub encoder: f32,
    #[serde(with = "decoder_number")]
    pub decoder: DecoderThreshold,
}

impl JointSpec {
    /// The policy this point stands for, validated.
    pub fn policy(&self) -> anyhow::Result<JointSimilarity> {
        JointSimilarity::with_decoder(self.encoder, self.decoder)
    }
}

impl Params for JointSpec {
    fn grid(decoder_layers: usize) -> Vec<Self> {
        grid(decoder_layers)
    }
    fn from_flags(flags: &Flags) -> anyhow::Result<Self> {
        from_flags(flags)
    }
    fn params(&self) -> String {
        format!("encoder={} {}", self.encoder, self.decoder.params())
    }
    fn build(&self) -> anyhow::Result<Box<dyn ExitPolicy>> {
        Ok(Box::new(self.policy()?))
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
        LayerSignal::of_similarity(s)
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
