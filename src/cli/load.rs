//! Load options shared by `mue run`, `eval`, `serve` and `bench`.

use crate::model::precision::Precision;
use crate::pipeline::LoadOptions;

#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct LoadArgs {
    /// Inference precision: f32 (default; the reference) or int8 (weights quantized per
    /// output channel at load, activations per row; the ResNet trunk, the transformer's
    /// dense layers and the tied vocabulary projection).
    #[arg(long, default_value = "f32")]
    pub precision: Precision,
}

impl LoadArgs {
    pub fn options(&self) -> LoadOptions {
        LoadOptions {
            precision: self.precision,
            ..LoadOptions::default()
        }
    }
}
