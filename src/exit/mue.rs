//! MuE: exit once a layer stops changing its input (cosine similarity above a threshold).

use super::{validate_threshold, ExitPolicy, LayerSignal, Site, Stream};
use serde::{Deserialize, Serialize};

/// Decoder threshold, constant or following CALM's schedule over the decoding step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
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

impl DecoderThreshold {
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

/// The MuE similarity policy: one threshold per encoder stream, one for decoder tokens.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MuePolicy {
    pub image: f32,
    pub text: f32,
    pub decoder: DecoderThreshold,
}

impl MuePolicy {
    pub fn new(image: f32, text: f32, decoder: f32) -> anyhow::Result<Self> {
        validate_threshold("image", image)?;
        validate_threshold("text", text)?;
        validate_threshold("decoder", decoder)?;
        Ok(Self {
            image,
            text,
            decoder: DecoderThreshold::Constant { tau: decoder },
        })
    }

    /// Thresholds that never exit.
    pub fn never() -> Self {
        Self {
            image: 1.0,
            text: 1.0,
            decoder: DecoderThreshold::Constant { tau: 1.0 },
        }
    }
}

impl ExitPolicy for MuePolicy {
    fn name(&self) -> String {
        "mue".into()
    }

    fn should_exit(&self, site: Site, history: &[LayerSignal], _num_layers: usize) -> bool {
        let Some(last) = history.last() else {
            return false;
        };
        let threshold = match site {
            Site::Encoder(Stream::Image) => self.image,
            Site::Encoder(Stream::Text) => self.text,
            Site::Decoder { step, max_len } => self.decoder.at(step, max_len),
        };
        // Strict: a similarity of exactly 1 never passes a threshold of 1.
        last.similarity > threshold
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sig(s: f32) -> LayerSignal {
        LayerSignal {
            similarity: s,
            prediction: None,
        }
    }

    #[test]
    fn thresholds_are_strict_per_site() {
        let p = MuePolicy::new(0.7, 0.99, 0.9).unwrap();
        let img = Site::Encoder(Stream::Image);
        let txt = Site::Encoder(Stream::Text);
        let dec = Site::Decoder {
            step: 3,
            max_len: 16,
        };
        assert!(p.should_exit(img, &[sig(0.71)], 6));
        assert!(!p.should_exit(img, &[sig(0.7)], 6));
        assert!(!p.should_exit(txt, &[sig(0.98)], 6));
        assert!(p.should_exit(dec, &[sig(0.95)], 6));
        assert!(!MuePolicy::never().should_exit(txt, &[sig(1.0)], 6));
        assert!(MuePolicy::new(f32::NAN, 0.9, 0.9).is_err());
    }

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
