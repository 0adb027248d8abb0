//! Model configuration, serialised as `config.json` beside `model.safetensors`.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// How the encoder treats the two modalities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncoderMode {
    /// OFA: image and text tokens attend to each other in every layer.
    Joint,
    /// MuE: image and text run as two independent streams through the shared layers.
    Decomposed,
}

/// The image embedder in front of `image_proj`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ImageEmbedder {
    /// Non-overlapping `patch x patch` RGB patches, flattened (channel-major) and projected.
    Patch { patch: usize },
    /// OFA's ResNet trunk (stages 1-3, output stride 16, 1024 channels).
    Resnet { blocks: [usize; 3] },
    /// 3x3 stride-2 convolutions with these output channels (GELU after each), then
    /// `patch` x `patch` patches of the feature map. The project's own models only.
    Conv { stem: Vec<usize>, patch: usize },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub encoder_layers: usize,
    pub decoder_layers: usize,
    pub encoder_heads: usize,
    pub decoder_heads: usize,
    pub encoder_ffn_dim: usize,
    pub decoder_ffn_dim: usize,
    /// Rows of the text position tables are `max_positions + 2`.
    pub max_positions: usize,
    pub token_bucket_size: usize,
    pub image_bucket_size: usize,
    pub attn_scale_factor: f64,
    pub layer_norm_eps: f64,
    /// Side of the square input image in pixels.
    pub image_size: usize,
    pub image_embedder: ImageEmbedder,
    pub encoder_mode: EncoderMode,
    /// Also add the image position embeddings to the patch tokens (OFA's
    /// `entangle_position_embedding`, image side only). OFA's fine-tuned checkpoints keep
    /// positions in the attention biases alone (false); the project's own models may set
    /// it so that cross-attention values carry where each patch is.
    #[serde(default)]
    pub entangle_image_positions: bool,
    pub bos_id: u32,
    pub pad_id: u32,
    pub eos_id: u32,
}

impl Config {
    /// A tiny model for tests.
    pub fn tiny(encoder_mode: EncoderMode) -> Self {
        Config {
            vocab_size: 64,
            d_model: 32,
            encoder_layers: 3,
            decoder_layers: 3,
            encoder_heads: 4,
            decoder_heads: 4,
            encoder_ffn_dim: 64,
            decoder_ffn_dim: 64,
            max_positions: 64,
            token_bucket_size: 16,
            image_bucket_size: 42,
            attn_scale_factor: 2.0,
            layer_norm_eps: 1e-5,
            image_size: 16,
            image_embedder: ImageEmbedder::Patch { patch: 4 },
            encoder_mode,
            entangle_image_positions: false,
            bos_id: 0,
            pad_id: 1,
            eos_id: 2,
        }
    }

    /// OFA-tiny sizes (4+4 layers, d 256) with a patch embedder, for benchmarks.
    pub fn ofa_tiny_patch(encoder_mode: EncoderMode) -> Self {
        Config {
            vocab_size: 8000,
            d_model: 256,
            encoder_layers: 4,
            decoder_layers: 4,
            encoder_heads: 4,
            decoder_heads: 4,
            encoder_ffn_dim: 1024,
            decoder_ffn_dim: 1024,
            max_positions: 1024,
            token_bucket_size: 256,
            image_bucket_size: 42,
            attn_scale_factor: 2.0,
            layer_norm_eps: 1e-5,
            image_size: 128,
            image_embedder: ImageEmbedder::Patch { patch: 8 },
            encoder_mode,
            entangle_image_positions: false,
            bos_id: 0,
            pad_id: 1,
            eos_id: 2,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.d_model / self.encoder_heads
    }

    /// Side of the patch grid.
    pub fn grid_side(&self) -> usize {
        match &self.image_embedder {
            ImageEmbedder::Patch { patch } => self.image_size / (*patch).max(1),
            ImageEmbedder::Resnet { .. } => self.image_size.div_ceil(16),
            ImageEmbedder::Conv { stem, patch } => {
                let map = u32::try_from(stem.len())
                    .ok()
                    .and_then(|n| self.image_size.checked_shr(n))
                    .unwrap_or(0);
                map / (*patch).max(1)
            }
        }
    }

    pub fn num_patches(&self) -> usize {
        self.grid_side() * self.grid_side()
    }

    /// Width of the feature that enters `image_proj`.
    pub fn image_feature_dim(&self) -> usize {
        match &self.image_embedder {
            ImageEmbedder::Patch { patch } => 3 * patch * patch,
            ImageEmbedder::Resnet { .. } => 1024,
            ImageEmbedder::Conv { stem, patch } => {
                stem.last().copied().unwrap_or(3) * patch * patch
            }
        }
    }

    /// Longest text (in tokens, BOS/EOS included) the position tables allow.
    pub fn max_text_len(&self) -> usize {
        self.max_positions
    }

    pub fn validate(&self) -> Result<()> {
        let pos = |v: usize, n: &str| -> Result<()> {
            if v == 0 {
                bail!("config: {n} must be positive");
            }
            Ok(())
        };
        pos(self.vocab_size, "vocab_size")?;
        pos(self.d_model, "d_model")?;
        pos(self.encoder_layers, "encoder_layers")?;
        pos(self.decoder_layers, "decoder_layers")?;
        pos(self.encoder_heads, "encoder_heads")?;
        pos(self.decoder_heads, "decoder_heads")?;
        pos(self.encoder_ffn_dim, "encoder_ffn_dim")?;
        pos(self.decoder_ffn_dim, "decoder_ffn_dim")?;
        pos(self.image_size, "image_size")?;
        pos(self.max_positions, "max_positions")?;
        if !self.d_model.is_multiple_of(self.encoder_heads)
            || !self.d_model.is_multiple_of(self.decoder_heads)
        {
            bail!(
                "config: d_model {} is not divisible by the number of heads ({} / {})",
                self.d_model,
                self.encoder_heads,
                self.decoder_heads
            );
        }
        if self.encoder_heads != self.decoder_heads {
            bail!("config: encoder and decoder must have the same number of heads");
        }
        if self.token_bucket_size < 2 {
            bail!("config: token_bucket_size must be at least 2");
        }
        match &self.image_embedder {
            ImageEmbedder::Patch { patch } => {
                if *patch == 0 || !self.image_size.is_multiple_of(*patch) {
                    bail!(
                        "config: image_size {} is not a multiple of the patch size {patch}",
                        self.image_size
                    );
                }
            }
            ImageEmbedder::Conv { stem, patch } => {
                let stride = (1usize << stem.len().min(16)) * patch;
                if *patch == 0 || stem.len() > 16 || !self.image_size.is_multiple_of(stride) {
                    bail!(
                        "config: image_size {} is not a multiple of the conv stem's stride {} \
                         ({} stride-2 convolutions, patch {patch})",
                        self.image_size,
                        stride,
                        stem.len()
                    );
                }
                if stem.contains(&0) {
                    bail!("config: conv stem channels must be positive, got {stem:?}");
                }
            }
            ImageEmbedder::Resnet { .. } => {}
        }
        let side = self.grid_side();
        if side == 0 || side > self.image_bucket_size {
            bail!(
                "config: the patch grid is {side}x{side}, but image positions allow at most {}x{}",
                self.image_bucket_size,
                self.image_bucket_size
            );
        }
        for id in [self.bos_id, self.pad_id, self.eos_id] {
            if id as usize >= self.vocab_size {
                bail!("config: special token id {id} is outside the vocabulary");
            }
        }
        Ok(())
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read model config {}", path.display()))?;
        let cfg: Config = serde_json::from_str(&text).with_context(|| {
            format!("model config {} is not a valid mue config", path.display())
        })?;
        cfg.validate()
            .with_context(|| format!("model config {}", path.display()))?;
        Ok(cfg)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        std::fs::write(path, serde_json::to_string_pretty(self)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))
    }
}
