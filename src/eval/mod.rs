//! Evaluation utilities: captioning metrics (BLEU, CIDEr-D, ROUGE-L) matching
//! the COCO caption evaluation toolkit, and classification accuracy.

pub mod breakdown;
pub mod calibrate;
#[allow(clippy::module_inception)]
pub mod eval;
pub mod metrics;
pub mod plot;
pub mod sweep;

pub use eval::{evaluate, oracle, Dataset, EvalOptions, EvalReport, OracleReport, Quality};
