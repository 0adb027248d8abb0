//! MuE: exit once a layer stops changing its input (cosine similarity above a threshold).

use super::family::{Family, Flags, Marker, Params, Role, Style};
pub use super::schedule::{decoder_number, DecoderThreshold, PAPER_DECAY, PAPER_STRICT_FRACTION};
use super::{validate_threshold, ExitPolicy, LayerSignal, Site, Stream};
use serde::{Deserialize, Serialize};

pub const FAMILY: Family = Family {
    name: "mue",
    title: "MuE",
    help: "MuE (thresholds from --img/--text/--dec-threshold over the model's exits.json)",
    role: Role::Proposed,
    calibrated: true,
    style: Style {
        color: (214, 39, 40),
        marker: Marker::Circle,
    },
};

/// Similarity thresholds of the default MuE / joint grids (1.0: never exit).
pub const SIMILARITY_GRID: [f32; 5] = [0.8, 0.9, 0.95, 0.99, 1.0];

/// Decoder thresholds of the default MuE grid: constants, and the paper's schedule.
pub fn default_decoder_thresholds() -> Vec<DecoderThreshold> {
    let mut d: Vec<DecoderThreshold> = [0.9f32, 0.99, 1.0]
        .iter()
        .map(|&tau| DecoderThreshold::Constant { tau })
        .collect();
    d.push(DecoderThreshold::paper(0.9));
    d
}

/// Entailment scores answers in a single decoder pass, so its decoder threshold matters
/// less than its stream thresholds; captioning gets the same grid for simplicity.
fn grid(_decoder_layers: usize) -> Vec<MueSpec> {
    let mut g = Vec::new();
    for &image in &SIMILARITY_GRID {
        for &text in &SIMILARITY_GRID {
            for decoder in default_decoder_thresholds() {
                g.push(MueSpec {
                    image,
                    text,
                    decoder,
                });
            }
        }
    }
    g
}

fn from_flags(f: &Flags) -> anyhow::Result<MueSpec> {
    Ok(MueSpec {
        image: f.image,
        text: f.text,
        decoder: f.decoder,
    })
}

/// A MuE grid point: the thresholds of [`MuePolicy`], its decoder threshold written as a
/// number when constant (as grid files have always had it), else the schedule's object,
/// `{"kind": "calm", "tau": 0.9, "strict_fraction": 0.333, "decay": 0.9}`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MueSpec {
    pub image: f32,
    pub text: f32,
    #[serde(with = "decoder_number")]
    pub decoder: DecoderThreshold,
}

impl MueSpec {
    /// The policy these thresholds stand for, validated.
    pub fn policy(&self) -> anyhow::Result<MuePolicy> {
        MuePolicy::with_decoder(self.image, self.text, self.decoder)
    }
}

impl Params for MueSpec {
    fn grid(decoder_layers: usize) -> Vec<Self> {
        grid(decoder_layers)
    }
    fn from_flags(flags: &Flags) -> anyhow::Result<Self> {
        from_flags(flags)
    }
    fn params(&self) -> String {
        format!(
            "image={} text={} {}",
            self.image,
            self.text,
            self.decoder.params()
        )
    }
    fn build(&self) -> anyhow::Result<Box<dyn ExitPolicy>> {
        Ok(Box::new(self.policy()?))
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

    /// Any decoder threshold form, validated.
    pub fn with_decoder(image: f32, text: f32, decoder: DecoderThreshold) -> anyhow::Result<Self> {
        validate_threshold("image", image)?;
        validate_threshold("text", text)?;
        decoder.validate()?;
        Ok(Self {
            image,
            text,
            decoder,
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
        LayerSignal::of_similarity(s)
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
    fn both_forms_round_trip_and_old_files_load() {
        let calm = DecoderThreshold::paper(0.8);
        for d in [DecoderThreshold::Constant { tau: 0.7 }, calm] {
            let p = MuePolicy::with_decoder(0.99, 0.9, d).unwrap();
            let back: MuePolicy =
                serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
            assert_eq!(back, p);
        }
        // exits.json as written before the schedule could be calibrated.
        let old = r#"{"image": 0.993, "text": 0.9, "decoder": {"kind": "constant", "tau": 0.7}}"#;
        let p: MuePolicy = serde_json::from_str(old).unwrap();
        assert_eq!(p.decoder, DecoderThreshold::Constant { tau: 0.7 });
        // A plain number reads as a constant.
        let p: MuePolicy =
            serde_json::from_str(r#"{"image": 1, "text": 1, "decoder": 0.9}"#).unwrap();
        assert_eq!(p.decoder, DecoderThreshold::Constant { tau: 0.9 });
        assert!(serde_json::from_str::<MuePolicy>(
            r#"{"image": 1, "text": 1, "decoder": {"kind": "cosine", "tau": 0.9}}"#
        )
        .is_err());
        // Bad schedule parameters are refused by name.
        let bad = DecoderThreshold::Calm {
            tau: 0.9,
            strict_fraction: 1.5,
            decay: 0.9,
        };
        let e = MuePolicy::with_decoder(0.9, 0.9, bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("strict_fraction"), "{e}");
        assert_eq!(calm.params(), "decoder=0.8 strict=0.333 decay=0.9");
        assert_eq!(
            DecoderThreshold::Constant { tau: 0.7 }.params(),
            "decoder=0.7"
        );
    }

    #[test]
    fn schedule_holds_early_tokens_a_constant_does_not() {
        let p = |d| MuePolicy::with_decoder(1.0, 1.0, d).unwrap();
        let constant = p(DecoderThreshold::Constant { tau: 0.7 });
        let calm = p(DecoderThreshold::paper(0.7));
        let at = |step| Site::Decoder { step, max_len: 16 };
        // Step 0 of 16 with a similarity of 0.8: the constant lets the token leave, the
        // schedule holds it (no exit in the first third), and releases it later.
        assert!(constant.should_exit(at(0), &[sig(0.8)], 6));
        assert!(!calm.should_exit(at(0), &[sig(0.8)], 6));
        assert!(!calm.should_exit(at(5), &[sig(0.8)], 6));
        assert!(calm.should_exit(at(6), &[sig(0.8)], 6));
        // The threshold decays over the steps after the strict part.
        assert!(calm.decoder.at(6, 16) > calm.decoder.at(15, 16));
    }
}
