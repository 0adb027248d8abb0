//! Evaluation utilities: captioning metrics (BLEU, CIDEr-D, ROUGE-L) matching
//! the COCO caption evaluation toolkit, and classification accuracy.

pub mod breakdown;
pub mod calibrate;
#[allow(clippy::module_inception)]
pub mod eval;
pub mod metrics;
pub mod plot;
pub mod report;
pub mod sweep;

pub use eval::{evaluate, oracle, Dataset, EvalOptions, EvalReport, OracleReport, Quality};

use anyhow::{Context, Result};
use std::path::Path;

/// Write `v` as pretty JSON, creating the parent folder.
pub fn write_json(path: &Path, v: &impl serde::Serialize) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, serde_json::to_string_pretty(v)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

/// serde_json writes a non-finite float (a ratio against a zero quality) as null: read it
/// back as NaN so saved sweeps and reports load again.
pub(crate) fn f64_or_nan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    use serde::Deserialize;
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}
