//! PABEE: exit a decoder token once its intermediate top-1 prediction has stayed the same
//! for `patience` consecutive layers. Encoder streams run at full depth.

use super::family::{Family, Flags, Marker, Params, Role, Style};
use super::{ExitPolicy, LayerSignal, Site};
use serde::{Deserialize, Serialize};

pub const FAMILY: Family = Family {
    name: "patience",
    title: "PABEE (patience)",
    help: "PABEE: decoder top-1 unchanged for --patience layers",
    role: Role::Baseline,
    calibrated: false,
    style: Style {
        color: (255, 127, 14),
        marker: Marker::Circle,
    },
};

fn grid(decoder_layers: usize) -> Vec<PatiencePolicy> {
    (1..decoder_layers.saturating_sub(1).max(2))
        .map(|patience| PatiencePolicy { patience })
        .collect()
}

fn from_flags(f: &Flags) -> anyhow::Result<PatiencePolicy> {
    Ok(PatiencePolicy {
        patience: f.patience,
    })
}

impl Params for PatiencePolicy {
    fn grid(decoder_layers: usize) -> Vec<Self> {
        grid(decoder_layers)
    }
    fn from_flags(flags: &Flags) -> anyhow::Result<Self> {
        from_flags(flags)
    }
    fn params(&self) -> String {
        format!("patience={}", self.patience)
    }
    fn build(&self) -> anyhow::Result<Box<dyn ExitPolicy>> {
        Ok(Box::new(*self))
    }
}

/// Exit after layer `i` when the predictions of layers `i - patience ..= i` all agree
/// (the prediction was unchanged `patience` times in a row). `patience = 0` exits at the
/// first layer with a prediction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatiencePolicy {
    pub patience: usize,
}

impl ExitPolicy for PatiencePolicy {
    fn name(&self) -> String {
        "patience".into()
    }

    fn needs_predictions(&self) -> bool {
        true
    }

    fn should_exit(&self, site: Site, history: &[LayerSignal], _num_layers: usize) -> bool {
        if !matches!(site, Site::Decoder { .. }) {
            return false;
        }
        let need = self.patience + 1;
        if history.len() < need {
            return false;
        }
        let mut tops = history[history.len() - need..]
            .iter()
            .map(|s| s.prediction.map(|p| p.top1));
        let Some(Some(first)) = tops.next() else {
            return false;
        };
        tops.all(|t| t == Some(first))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::{Prediction, Stream};

    fn h(tops: &[u32]) -> Vec<LayerSignal> {
        tops.iter()
            .map(|&top1| LayerSignal {
                similarity: 0.5,
                prediction: Some(Prediction {
                    top1,
                    entropy: 1.0,
                    margin: 0.1,
                }),
            })
            .collect()
    }

    /// First layer (1-based) after which the policy exits on `tops`, if any.
    fn exit_layer(p: &PatiencePolicy, tops: &[u32]) -> Option<usize> {
        let dec = Site::Decoder {
            step: 1,
            max_len: 8,
        };
        let hist = h(tops);
        (1..=hist.len()).find(|&n| p.should_exit(dec, &hist[..n], 12))
    }

    #[test]
    fn counts_consecutive_agreements() {
        let p2 = PatiencePolicy { patience: 2 };
        assert_eq!(exit_layer(&p2, &[5, 5, 5, 5]), Some(3));
        assert_eq!(exit_layer(&p2, &[5, 6, 6, 7, 7, 7]), Some(6));
        assert_eq!(exit_layer(&p2, &[1, 2, 1, 2, 1, 2]), None);
        assert_eq!(exit_layer(&p2, &[4, 4, 3, 3, 3]), Some(5));
        let p1 = PatiencePolicy { patience: 1 };
        assert_eq!(exit_layer(&p1, &[9, 8, 8]), Some(3));
        let p0 = PatiencePolicy { patience: 0 };
        assert_eq!(exit_layer(&p0, &[9, 8]), Some(1));
    }

    #[test]
    fn needs_predictions_and_skips_encoder() {
        let p = PatiencePolicy { patience: 1 };
        assert!(p.needs_predictions());
        let hist = h(&[3, 3, 3]);
        assert!(!p.should_exit(Site::Encoder(Stream::Image), &hist, 6));
        assert!(!p.should_exit(Site::Encoder(Stream::Text), &hist, 6));
        let missing = vec![LayerSignal::default(); 3];
        let dec = Site::Decoder {
            step: 0,
            max_len: 1,
        };
        assert!(!p.should_exit(dec, &missing, 6));
    }
}
