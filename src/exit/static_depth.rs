//! Fixed depths: the "smaller model" baseline.

use super::family::{Family, Flags, Marker, Params, Role, Style};
use super::{ExitPolicy, LayerSignal, Site, Stream};
use serde::{Deserialize, Serialize};

pub const FAMILY: Family = Family {
    name: "static",
    title: "Smaller model (static depth)",
    help: "Every stream and token stops after --depth layers",
    role: Role::SmallerModel,
    calibrated: false,
    style: Style {
        color: (127, 127, 127),
        marker: Marker::Circle,
    },
};

fn grid(decoder_layers: usize) -> Vec<StaticSpec> {
    (1..decoder_layers)
        .map(|depth| StaticSpec { depth })
        .collect()
}

fn from_flags(f: &Flags) -> anyhow::Result<StaticSpec> {
    Ok(StaticSpec { depth: f.depth })
}

/// A static grid point: the same depth for both streams and every token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StaticSpec {
    pub depth: usize,
}

impl Params for StaticSpec {
    fn grid(decoder_layers: usize) -> Vec<Self> {
        grid(decoder_layers)
    }
    fn from_flags(flags: &Flags) -> anyhow::Result<Self> {
        from_flags(flags)
    }
    fn params(&self) -> String {
        format!("depth={}", self.depth)
    }
    fn build(&self) -> anyhow::Result<Box<dyn ExitPolicy>> {
        if self.depth == 0 {
            anyhow::bail!("a static depth must be at least 1 (--depth 0)");
        }
        Ok(Box::new(StaticDepth {
            image: self.depth,
            text: self.depth,
            decoder: self.depth,
        }))
    }
}

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
