//! Fixed depths: the "smaller model" baseline.

use super::{ExitPolicy, LayerSignal, Site, Stream};
use serde::{Deserialize, Serialize};

/// Exit every stream / token after a fixed number of layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StaticDepth {
    pub image: usize,
    pub text: usize,
    pub decoder: usize,
}

impl ExitPolicy for StaticDepth {
    fn name(&self) -> String {
        format!("static-{}-{}-{}", self.image, self.text, self.decoder)
    }

    fn should_exit(&self, site: Site, history: &[LayerSignal], _num_layers: usize) -> bool {
        let depth = match site {
            Site::Encoder(Stream::Image) => self.image,
            Site::Encoder(Stream::Text) => self.text,
            Site::Decoder { .. } => self.decoder,
        };
        history.len() >= depth.max(1)
    }
}
