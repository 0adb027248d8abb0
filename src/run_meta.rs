//! What a training run records about itself for the other commands: the loss it trained
//! with, in the model directory's `train_state.json`. Below both `train`, which writes the
//! file, and `eval::report`, which states the loss on the results page.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The training state file of a model directory.
pub const TRAIN_STATE: &str = "train_state.json";

/// Which decoder layers carry the task loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LossKind {
    /// MuE: one cross-entropy per decoder layer, summed.
    LayerWise,
    /// Ablation: the last decoder layer only (standard fine-tuning).
    FinalOnly,
}

impl LossKind {
    pub const ALL: [LossKind; 2] = [LossKind::LayerWise, LossKind::FinalOnly];

    /// The name on the command line and in `train_state.json`.
    pub fn name(self) -> &'static str {
        match self {
            LossKind::LayerWise => "layer-wise",
            LossKind::FinalOnly => "final-only",
        }
    }
}

impl std::fmt::Display for LossKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for LossKind {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                anyhow::anyhow!("unknown loss {s:?} (expected layer-wise or final-only)")
            })
    }
}

/// The loss the model in `dir` was trained with, from its `train_state.json`.
pub fn trained_loss(dir: &Path) -> Result<LossKind> {
    #[derive(Deserialize)]
    struct Record {
        loss: LossKind,
    }
    let p = dir.join(TRAIN_STATE);
    let text =
        std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
    let r: Record =
        serde_json::from_str(&text).with_context(|| format!("{} is invalid", p.display()))?;
    Ok(r.loss)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_loss_of_a_train_state() {
        let dir = tempfile::tempdir().unwrap();
        assert!(trained_loss(dir.path()).is_err());
        std::fs::write(
            dir.path().join(TRAIN_STATE),
            r#"{"step": 3, "loss": "final-only", "seed": 0}"#,
        )
        .unwrap();
        assert_eq!(trained_loss(dir.path()).unwrap(), LossKind::FinalOnly);
        std::fs::write(dir.path().join(TRAIN_STATE), r#"{"loss": "sideways"}"#).unwrap();
        let e = format!("{:#}", trained_loss(dir.path()).unwrap_err());
        assert!(e.contains("train_state.json is invalid"), "{e}");
    }
}
