//! The unified vision-language encoder-decoder (OFA architecture) on candle.
//!
//! Structs hold weights only; they are immutable and can be shared across threads.
//! Per-request state (exit decisions, key/value caches) lives in `crate::generate`.

pub mod attn_block;
pub mod attn_rows;
pub mod config;
pub mod conv;
pub mod conv_kernel;
pub mod expf;
pub mod fused;
pub mod infer;
pub mod init;
pub mod layers;
pub mod memory;
pub mod ofa;
pub mod pool;
pub mod position;
pub mod precision;
pub mod quant;
pub mod resnet;
pub mod stem;
pub mod threads;
pub mod vocab;
pub mod weights;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use std::collections::HashMap;
use std::path::Path;

use attn_block::Bias;
pub use config::{Config, EncoderMode, ImageEmbedder};
use init::reinit_seeded;
pub use init::BranchInit;
use layers::{
    linear, matmul_flat, split_heads, DecoderLayer, EncoderLayer, LayerNorm, Linear, Mode,
};

/// Pixel patches or a small conv stem (the project's own models), or OFA's ResNet.
#[derive(Debug, Clone)]
pub enum ImageTrunk {
    Patch(usize),
    Conv(stem::ConvStem),
    Resnet(resnet::ResNet),
}

impl ImageTrunk {
    /// Multiply-adds of the trunk for one `side` x `side` image (0 for patches: their
    /// projection is counted with the encoder).
    pub fn macs(&self, side: usize) -> u64 {
        match self {
            ImageTrunk::Patch(_) => 0,
            ImageTrunk::Conv(s) => s.macs(side),
            ImageTrunk::Resnet(net) => net.macs(side, side),
        }
    }

    /// `[b, 3, s, s]` -> `[b, p, f]` features in row-major patch order.
    pub fn features(&self, images: &Tensor) -> Result<Tensor> {
        match self {
            ImageTrunk::Patch(p) => stem::patchify(images, *p),
            ImageTrunk::Conv(s) => stem::patchify(&s.feature_map(images)?, s.patch),
            ImageTrunk::Resnet(net) => net.features(images),
        }
    }
}

/// Largest absolute elementwise difference of two tensors of the same shape (in f32):
/// how parity and equivalence checks compare outputs.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    if a.dims() != b.dims() {
        candle_core::bail!("shape mismatch: {:?} vs {:?}", a.dims(), b.dims());
    }
    let a = a.to_dtype(DType::F32)?;
    let b = b.to_dtype(DType::F32)?;
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

/// Padding flags of the encoder memory `[image patches; text]`: patches are never padding.
pub fn memory_padding(text_padding: &[Vec<bool>], patches: usize) -> Vec<Vec<bool>> {
    text_padding
        .iter()
        .map(|r| {
            std::iter::repeat_n(false, patches)
                .chain(r.iter().copied())
                .collect()
        })
        .collect()
}

/// The query side of an absolute position bias, `q(Pq) * s` per head: `[1, h, n, dh]`.
fn position_query(q: &Linear, pq: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    split_heads(&(q.forward(&pq.unsqueeze(0)?)? * scale)?, heads)
}

/// The key side of an absolute position bias, `k(Pk)` per head: `[1, h, n, dh]`.
fn position_key(k: &Linear, pk: &Tensor, heads: usize) -> Result<Tensor> {
    split_heads(&k.forward(&pk.unsqueeze(0)?)?, heads)
}

/// Absolute position bias `<q(Pq), k(Pk)> * s` per head: `[1, h, nq, nk]`.
fn position_bias(
    q: &Linear,
    k: &Linear,
    pq: &Tensor,
    pk: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    position_query(q, pq, heads, scale)?.matmul(&position_key(k, pk, heads)?.t()?)
}

/// What the patch positions contribute to the absolute position biases. It depends on the
/// weights alone (the patch grid is fixed), so inference loads build it once
/// ([`Model::image_positions`]); per request the projections of the 576 patch positions of
/// OFA-Base were ~10% of a batch-1 request.
#[derive(Debug, Clone)]
pub struct ImagePositionBiases {
    /// The encoder's image-image bias `[1, h, p, p]`.
    pub bias: Tensor,
    /// The encoder's position query (scaled) and key of each patch, `[1, h, p, dh]`.
    pub query: Tensor,
    pub key: Tensor,
    /// The decoder cross-attention's position key of each patch, `[1, h, p, dh]`.
    pub cross_key: Tensor,
}

#[derive(Debug, Clone)]
pub struct Encoder {
    pub image_trunk: ImageTrunk,
    pub image_proj: Linear,
    pub type_embedding: Tensor,
    pub layernorm_embedding: LayerNorm,
    pub patch_layernorm_embedding: LayerNorm,
    pub embed_positions: Tensor,
    pub embed_image_positions: Tensor,
    pub pos_ln: LayerNorm,
    pub image_pos_ln: LayerNorm,
    pub pos_q_linear: Linear,
    pub pos_k_linear: Linear,
    pub layers: Vec<EncoderLayer>,
    pub layer_norm: LayerNorm,
    pub token_rel_tables: Vec<Tensor>,
    pub image_rel_tables: Vec<Tensor>,
}

#[derive(Debug, Clone)]
pub struct Decoder {
    pub layernorm_embedding: LayerNorm,
    pub embed_positions: Tensor,
    pub pos_ln: LayerNorm,
    pub self_pos_q_linear: Linear,
    pub self_pos_k_linear: Linear,
    pub cross_pos_q_linear: Linear,
    pub cross_pos_k_linear: Linear,
    pub layers: Vec<DecoderLayer>,
    pub layer_norm: LayerNorm,
    pub token_rel_tables: Vec<Tensor>,
}

/// How embeddings and relative position tables start in a fresh model.
const EMBED_INIT: candle_nn::Init = candle_nn::Init::Randn {
    mean: 0.0,
    stdev: 0.02,
};

/// `load(vb.pp("{name}.{l}"))` for every layer `l`.
fn per_layer<T>(
    vb: &VarBuilder,
    name: &str,
    layers: usize,
    load: impl Fn(VarBuilder) -> Result<T>,
) -> Result<Vec<T>> {
    (0..layers)
        .map(|l| load(vb.pp(format!("{name}.{l}"))))
        .collect()
}

/// One relative position table `[rows, heads]` per layer.
fn rel_tables(
    vb: &VarBuilder,
    name: &str,
    layers: usize,
    shape: (usize, usize),
) -> Result<Vec<Tensor>> {
    per_layer(vb, name, layers, |v| {
        v.get_with_hints(shape, "weight", EMBED_INIT)
    })
}

/// Absolute position embeddings `[max_positions + 2, d]`.
fn position_embeddings(cfg: &Config, vb: &VarBuilder) -> Result<Tensor> {
    let shape = (cfg.max_positions + 2, cfg.d_model);
    vb.get_with_hints(shape, "embed_positions.weight", EMBED_INIT)
}

impl Encoder {
    /// The encoder's weights under `vb` (`encoder.` in a checkpoint).
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let (d, h, eps) = (cfg.d_model, cfg.encoder_heads, cfg.layer_norm_eps);
        let n = cfg.encoder_layers;
        let image_trunk = match &cfg.image_embedder {
            ImageEmbedder::Patch { patch } => ImageTrunk::Patch(*patch),
            ImageEmbedder::Conv { stem, patch } => {
                ImageTrunk::Conv(stem::ConvStem::load(stem, *patch, vb.pp("embed_images"))?)
            }
            ImageEmbedder::Resnet { blocks } => {
                ImageTrunk::Resnet(resnet::ResNet::load(vb.pp("embed_images"), *blocks)?)
            }
        };
        let n_img_pos = cfg.image_bucket_size * cfg.image_bucket_size + 1;
        let rel_rows = 2 * cfg.token_bucket_size - 1;
        let img_rel_rows = position::image_rel_rows(cfg.image_bucket_size);
        let ln = |name: &str| LayerNorm::load(d, eps, vb.pp(name));
        Ok(Self {
            image_trunk,
            image_proj: linear(cfg.image_feature_dim(), d, vb.pp("image_proj"))?,
            type_embedding: vb.get_with_hints((2, d), "type_embedding.weight", EMBED_INIT)?,
            layernorm_embedding: ln("layernorm_embedding")?,
            patch_layernorm_embedding: ln("patch_layernorm_embedding")?,
            embed_positions: position_embeddings(cfg, &vb)?,
            embed_image_positions: vb.get_with_hints(
                (n_img_pos, d),
                "embed_image_positions.weight",
                EMBED_INIT,
            )?,
            pos_ln: ln("pos_ln")?,
            image_pos_ln: ln("image_pos_ln")?,
            pos_q_linear: linear(d, d, vb.pp("pos_q_linear"))?,
            pos_k_linear: linear(d, d, vb.pp("pos_k_linear"))?,
            layers: per_layer(&vb, "layers", n, |v| {
                EncoderLayer::load(d, h, cfg.encoder_ffn_dim, cfg.attn_scale_factor, eps, v)
            })?,
            layer_norm: ln("layer_norm")?,
            token_rel_tables: rel_tables(&vb, "token_rel_pos_table_list", n, (rel_rows, h))?,
            image_rel_tables: rel_tables(&vb, "image_rel_pos_table_list", n, (img_rel_rows, h))?,
        })
    }
}

impl Decoder {
    /// The decoder's weights under `vb` (`decoder.` in a checkpoint; the token embeddings
    /// are the encoder's, tied).
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let (d, h, eps) = (cfg.d_model, cfg.decoder_heads, cfg.layer_norm_eps);
        let n = cfg.decoder_layers;
        let rel_rows = 2 * cfg.token_bucket_size - 1;
        let ln = |name: &str| LayerNorm::load(d, eps, vb.pp(name));
        Ok(Self {
            layernorm_embedding: ln("layernorm_embedding")?,
            embed_positions: position_embeddings(cfg, &vb)?,
            pos_ln: ln("pos_ln")?,
            self_pos_q_linear: linear(d, d, vb.pp("self_pos_q_linear"))?,
            self_pos_k_linear: linear(d, d, vb.pp("self_pos_k_linear"))?,
            cross_pos_q_linear: linear(d, d, vb.pp("cross_pos_q_linear"))?,
            cross_pos_k_linear: linear(d, d, vb.pp("cross_pos_k_linear"))?,
            layers: per_layer(&vb, "layers", n, |v| {
                DecoderLayer::load(d, h, cfg.decoder_ffn_dim, cfg.attn_scale_factor, eps, v)
            })?,
            layer_norm: ln("layer_norm")?,
            token_rel_tables: rel_tables(&vb, "token_rel_pos_table_list", n, (rel_rows, h))?,
        })
    }
}

/// Position information of one encoder input: layer-normed position embeddings of the
/// image patches and text tokens. They only feed attention biases.
#[derive(Debug, Clone)]
pub struct EncoderPositions {
    pub image: Tensor,
    pub text: Tensor,
}

impl EncoderPositions {
    /// `[p + l, d]`: patch and text positions in the joint encoder's order (the reference
    /// model's encoder position embedding).
    pub fn joint(&self) -> Result<Tensor> {
        Tensor::cat(&[&self.image, &self.text], 0)
    }
}

/// Attention biases of the encoder for one layer, by block.
#[derive(Debug, Clone)]
pub struct EncoderBias {
    pub image_image: Tensor,
    pub image_text: Tensor,
    pub text_image: Tensor,
    pub text_text: Tensor,
}

impl EncoderBias {
    /// The joint encoder's bias over `[image tokens, text tokens]`, by block.
    pub fn joint(&self) -> Result<attn_block::Bias<'_>> {
        Ok(attn_block::Bias::Streams {
            split: self.image_image.dim(2)?,
            blocks: [
                &self.image_image,
                &self.image_text,
                &self.text_image,
                &self.text_text,
            ],
        })
    }
}

/// The encoder biases of one request, each layer's relative part built the first time a
/// stream reaches that layer: exited streams skip the layers they no longer run.
pub struct EncoderBiases<'a> {
    model: &'a Model,
    ii: Tensor,
    tt: Tensor,
    /// Absolute image-text / text-image blocks: the joint encoder's only.
    cross: Option<(Tensor, Tensor)>,
    tok: Tensor,
    img: Tensor,
    image_image: Vec<Option<Tensor>>,
    text_text: Vec<Option<Tensor>>,
}

impl<'a> EncoderBiases<'a> {
    /// `cross`: also build the image-text blocks (joint attention).
    pub fn new(model: &'a Model, pos: &EncoderPositions, cross: bool) -> Result<Self> {
        let e = &model.encoder;
        let (h, s) = (model.cfg.encoder_heads, model.head_scale());
        let (qt, kt) = (
            position_query(&e.pos_q_linear, &pos.text, h, s)?,
            position_key(&e.pos_k_linear, &pos.text, h)?,
        );
        let (qi, ki, ii) = match model.image_positions_for(&pos.image) {
            Some(c) => (c.query.clone(), c.key.clone(), c.bias.clone()),
            None => model.encoder_patch_biases(&pos.image)?,
        };
        let cross = if cross {
            Some((qi.matmul(&kt.t()?)?, qt.matmul(&ki.t()?)?))
        } else {
            None
        };
        let tt = qt.matmul(&kt.t()?)?;
        let l = pos.text.dim(0)?;
        let cfg = &model.cfg;
        let dev = &model.device;
        let layers = cfg.encoder_layers;
        Ok(Self {
            model,
            ii,
            tt,
            cross,
            tok: position::token_bucket_matrix(l, cfg.token_bucket_size, cfg.max_positions, dev)?,
            img: position::image_bucket_matrix(cfg.grid_side(), cfg.image_bucket_size, dev)?,
            image_image: vec![None; layers],
            text_text: vec![None; layers],
        })
    }

    pub fn image_image(&mut self, layer: usize) -> Result<&Tensor> {
        let table = &self.model.encoder.image_rel_tables[layer];
        lazy_bias(&mut self.image_image[layer], &self.ii, table, &self.img)
    }

    pub fn text_text(&mut self, layer: usize) -> Result<&Tensor> {
        let table = &self.model.encoder.token_rel_tables[layer];
        lazy_bias(&mut self.text_text[layer], &self.tt, table, &self.tok)
    }

    /// Every block of `layer` (built with `cross`).
    pub fn layer(&mut self, layer: usize) -> Result<EncoderBias> {
        let Some((it, ti)) = self.cross.clone() else {
            candle_core::bail!("encoder biases built without the image-text blocks");
        };
        Ok(EncoderBias {
            image_image: self.image_image(layer)?.clone(),
            image_text: it,
            text_image: ti,
            text_text: self.text_text(layer)?.clone(),
        })
    }
}

/// `slot`, filled on first use with `base` plus the relative bias of `table` over `buckets`.
fn lazy_bias<'s>(
    slot: &'s mut Option<Tensor>,
    base: &Tensor,
    table: &Tensor,
    buckets: &Tensor,
) -> Result<&'s Tensor> {
    if slot.is_none() {
        *slot = Some(position::add_relative_bias(base, table, buckets)?);
    }
    Ok(slot.as_ref().unwrap())
}

/// Decoder self-attention biases for positions 0..t, each layer's built the first time a
/// row reaches it.
pub struct DecoderSelfBiases<'a> {
    model: &'a Model,
    abs: Tensor,
    tok: Tensor,
    layers: Vec<Option<Tensor>>,
}

impl<'a> DecoderSelfBiases<'a> {
    pub fn new(model: &'a Model, pos: &Tensor) -> Result<Self> {
        let dec = &model.decoder;
        let t = pos.dim(0)?;
        let abs = position_bias(
            &dec.self_pos_q_linear,
            &dec.self_pos_k_linear,
            pos,
            pos,
            model.cfg.decoder_heads,
            model.head_scale(),
        )?;
        let tok = position::token_bucket_matrix(
            t,
            model.cfg.token_bucket_size,
            model.cfg.max_positions,
            &model.device,
        )?;
        Ok(Self {
            model,
            abs,
            tok,
            layers: vec![None; dec.token_rel_tables.len()],
        })
    }

    /// `[1, h, t, t]` of `layer` (causal mask not included).
    pub fn layer(&mut self, layer: usize) -> Result<&Tensor> {
        if self.layers[layer].is_none() {
            let table = &self.model.decoder.token_rel_tables[layer];
            let b = position::add_relative_bias(&self.abs, table, &self.tok)?;
            self.layers[layer] = Some(b);
        }
        Ok(self.layers[layer].as_ref().unwrap())
    }
}

#[derive(Debug, Clone)]
pub struct Model {
    pub cfg: Config,
    pub embed_tokens: Tensor,
    /// `embed_tokens` in int8, per vocabulary row (`--precision int8`): the tied projection.
    pub vocab_int8: Option<std::sync::Arc<quant::QMatrix>>,
    /// `embed_tokens` packed for decoding steps' few rows, at inference loads only (a copy
    /// that training would leave stale).
    pub vocab_panels: Option<std::sync::Arc<vocab::VocabPanels>>,
    /// The patch positions' part of the position biases, at inference loads only (a copy
    /// that training would leave stale).
    pub image_positions: Option<ImagePositionBiases>,
    pub encoder: Encoder,
    pub decoder: Decoder,
    pub device: Device,
}

/// Encoder layers each stream runs (`None`: every layer), as when it exits there; only a
/// decomposed encoder runs its streams to different depths.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamDepths {
    pub image: Option<usize>,
    pub text: Option<usize>,
}

/// Result of a plain, full-depth encoder pass.
#[derive(Debug, Clone)]
pub struct EncoderOutput {
    /// `[b, p + l, d]` after the final layer norm.
    pub memory: Tensor,
    /// `true` where the memory position is text padding.
    pub padding: Vec<Vec<bool>>,
    pub positions: EncoderPositions,
    /// Per layer (index 0 = embeddings) the states before the final layer norm, `[b, p + l, d]`.
    pub hidden: Vec<Tensor>,
}

impl Model {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let embed_tokens = vb.get_with_hints(
            (cfg.vocab_size, cfg.d_model),
            "encoder.embed_tokens.weight",
            EMBED_INIT,
        )?;
        Ok(Self {
            cfg: cfg.clone(),
            embed_tokens,
            vocab_int8: None,
            vocab_panels: None,
            image_positions: None,
            encoder: Encoder::new(cfg, vb.pp("encoder"))?,
            decoder: Decoder::new(cfg, vb.pp("decoder"))?,
            device: vb.device().clone(),
        })
    }

    /// A model whose weights live in a fresh `VarMap` (trainable), initialised
    /// deterministically from `seed`, its residual branches as `branches` says.
    pub fn init_trainable(
        cfg: &Config,
        seed: u64,
        branches: BranchInit,
        device: &Device,
    ) -> Result<(Self, VarMap)> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let model = Model::new(cfg, vb)?;
        reinit_seeded(&varmap, seed, branches)?;
        Ok((model, varmap))
    }

    /// A randomly initialised model (deterministic in `seed`) and its weights by name.
    /// The weights are plain tensors (detached from the variables that drew them), so the
    /// model runs the inference kernels exactly as the same weights loaded from disk do.
    pub fn random(
        cfg: &Config,
        seed: u64,
        device: &Device,
    ) -> Result<(Self, HashMap<String, Tensor>)> {
        let (_, varmap) = Model::init_trainable(cfg, seed, BranchInit::Unit, device)?;
        let tensors: HashMap<String, Tensor> = varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?.detach())))
            .collect::<Result<_>>()?;
        let vb = VarBuilder::from_tensors(tensors.clone(), DType::F32, device);
        Ok((Model::new(cfg, vb)?, tensors))
    }

    /// Load `config.json` + `model.safetensors` from a model directory.
    pub fn load_dir(dir: &Path, device: &Device) -> anyhow::Result<Self> {
        if !dir.is_dir() {
            bail!("model directory {} does not exist", dir.display());
        }
        if ofa::is_hf_ofa_dir(dir) {
            bail!(
                "{} is a Hugging Face OFA checkpoint; convert it first: mue convert --ofa {} --out DIR",
                dir.display(),
                dir.display()
            );
        }
        let cfg = Config::load(&dir.join("config.json"))?;
        let weights = dir.join("model.safetensors");
        if !weights.is_file() {
            bail!("model directory {} has no model.safetensors", dir.display());
        }
        let tensors = candle_core::safetensors::load(&weights, device)
            .with_context(|| format!("cannot read weights {}", weights.display()))?;
        Model::from_tensors(&cfg, tensors, device)
            .with_context(|| format!("weights {} do not match config.json", weights.display()))
    }

    /// Build from named tensors, converting them to f32. Errors name the first missing or
    /// mis-shaped tensor.
    pub fn from_tensors(
        cfg: &Config,
        tensors: HashMap<String, Tensor>,
        device: &Device,
    ) -> anyhow::Result<Self> {
        cfg.validate()?;
        let tensors = tensors
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        Ok(Model::new(cfg, vb)?)
    }

    pub fn save_dir(
        dir: &Path,
        cfg: &Config,
        tensors: &HashMap<String, Tensor>,
    ) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        cfg.save(&dir.join("config.json"))?;
        candle_core::safetensors::save(tensors, dir.join("model.safetensors"))
            .with_context(|| format!("cannot write weights to {}", dir.display()))
    }

    pub fn head_scale(&self) -> f64 {
        (self.cfg.head_dim() as f64 * self.cfg.attn_scale_factor).powf(-0.5)
    }

    // ---------------------------------------------------------------- encoder pieces

    /// Patch tokens `[b, p, d]` from preprocessed images `[b, 3, s, s]`.
    pub fn embed_image(&self, images: &Tensor, mode: Mode) -> Result<Tensor> {
        let e = &self.encoder;
        let feats = e.image_trunk.features(images)?;
        let x = e.image_proj.forward(&feats)?;
        let x = if self.cfg.entangle_image_positions {
            x.broadcast_add(&self.patch_positions(mode)?)?
        } else {
            x
        };
        let x = x.broadcast_add(&e.type_embedding.get(1)?)?;
        let x = e.patch_layernorm_embedding.forward(&x, mode)?;
        mode.dropout(&x)
    }

    /// Text tokens `[b, l, d]`; rows at padding are zero.
    pub fn embed_text(&self, ids: &Tensor, padding: &[Vec<bool>], mode: Mode) -> Result<Tensor> {
        let e = &self.encoder;
        let (b, l) = ids.dims2()?;
        let x = self
            .embed_tokens
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, l, ()))?;
        let x = x.broadcast_add(&e.type_embedding.get(0)?)?;
        let x = e.layernorm_embedding.forward(&x, mode)?;
        let keep: Vec<f32> = padding
            .iter()
            .flat_map(|r| r.iter().map(|&p| if p { 0.0 } else { 1.0 }))
            .collect();
        let keep = Tensor::from_vec(keep, (b, l, 1), &self.device)?;
        mode.dropout(&x.broadcast_mul(&keep)?)
    }

    /// [`Model::image_positions`] from the current weights.
    fn build_image_positions(&self) -> Result<ImagePositionBiases> {
        let pos = self.patch_positions(Mode::INFER)?;
        let (query, key, bias) = self.encoder_patch_biases(&pos)?;
        let cross_key = position_key(
            &self.decoder.cross_pos_k_linear,
            &pos,
            self.cfg.decoder_heads,
        )?;
        Ok(ImagePositionBiases {
            bias,
            query,
            key,
            cross_key,
        })
    }

    /// The encoder's position query (scaled) and key of each patch, `[1, h, p, dh]`, and
    /// the image-image bias `[1, h, p, p]` they make, for patch positions `patches`.
    fn encoder_patch_biases(&self, patches: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let e = &self.encoder;
        let (h, s) = (self.cfg.encoder_heads, self.head_scale());
        let query = position_query(&e.pos_q_linear, patches, h, s)?;
        let key = position_key(&e.pos_k_linear, patches, h)?;
        let bias = query.matmul(&key.t()?)?;
        Ok((query, key, bias))
    }

    /// The cached patch-position biases, when there are some and `patches` (the request's
    /// patch positions) tracks no gradient.
    fn image_positions_for(&self, patches: &Tensor) -> Option<&ImagePositionBiases> {
        self.image_positions
            .as_ref()
            .filter(|_| !patches.track_op())
    }

    /// Layer-normed position embeddings `[p, d]` of the patch grid.
    fn patch_positions(&self, mode: Mode) -> Result<Tensor> {
        let e = &self.encoder;
        let ids = position::image_position_ids(
            self.cfg.grid_side(),
            self.cfg.image_bucket_size,
            &self.device,
        )?;
        e.image_pos_ln
            .forward(&e.embed_image_positions.index_select(&ids, 0)?, mode)
    }

    /// Layer-normed position embeddings for a patch grid and `text_len` tokens.
    pub fn encoder_positions(&self, text_len: usize, mode: Mode) -> Result<EncoderPositions> {
        let e = &self.encoder;
        let image = self.patch_positions(mode)?;
        let text = e
            .pos_ln
            .forward(&e.embed_positions.narrow(0, 0, text_len)?, mode)?;
        Ok(EncoderPositions { image, text })
    }

    /// Biases of every encoder layer (absolute position bias + relative biases).
    pub fn encoder_biases(&self, pos: &EncoderPositions) -> Result<Vec<EncoderBias>> {
        let mut lazy = EncoderBiases::new(self, pos, true)?;
        (0..self.cfg.encoder_layers)
            .map(|layer| lazy.layer(layer))
            .collect()
    }

    /// Plain full-depth encoder over padded text ids `[b, l]` and images `[b, 3, s, s]`.
    pub fn encode(
        &self,
        images: &Tensor,
        ids: &Tensor,
        padding: &[Vec<bool>],
        mode: Mode,
    ) -> Result<EncoderOutput> {
        self.encode_to_depths(images, ids, padding, StreamDepths::default(), mode)
    }

    /// [`Model::encode`] with each stream stopped after its depth in `depths` (a decomposed
    /// encoder only): the memory the decoder reads when the streams exit there. Later
    /// entries of `hidden` repeat a stopped stream's exit state.
    pub fn encode_to_depths(
        &self,
        images: &Tensor,
        ids: &Tensor,
        padding: &[Vec<bool>],
        depths: StreamDepths,
        mode: Mode,
    ) -> Result<EncoderOutput> {
        let layers = self.cfg.encoder_layers;
        let image_depth = depths.image.unwrap_or(layers);
        let text_depth = depths.text.unwrap_or(layers);
        for (stream, d) in [("image", image_depth), ("text", text_depth)] {
            if d == 0 || d > layers {
                candle_core::bail!("{stream} depth {d} is outside 1..={layers}");
            }
            if d < layers && self.cfg.encoder_mode != EncoderMode::Decomposed {
                candle_core::bail!("a {stream} stream depth needs a decomposed encoder");
            }
        }
        let (_, l) = ids.dims2()?;
        let img = self.embed_image(images, mode)?;
        let txt = self.embed_text(ids, padding, mode)?;
        let pos = self.encoder_positions(l, mode)?;
        let biases = self.encoder_biases(&pos)?;
        let p = img.dim(1)?;
        let mem_padding = memory_padding(padding, p);
        let key_pad = layers::key_padding_bias(&mem_padding, &self.device)?;
        let txt_pad = layers::key_padding_bias(padding, &self.device)?;
        let mut hidden = vec![Tensor::cat(&[&img, &txt], 1)?];
        let (mut xi, mut xt) = (img, txt);
        for (i, (layer, bias)) in self.encoder.layers.iter().zip(&biases).enumerate() {
            match self.cfg.encoder_mode {
                EncoderMode::Joint => {
                    let x = Tensor::cat(&[&xi, &xt], 1)?;
                    let y = layer.forward_biases(
                        &x,
                        None,
                        &[bias.joint()?, Bias::Whole(&key_pad)],
                        mode,
                    )?;
                    xi = y.narrow(1, 0, p)?;
                    xt = y.narrow(1, p, l)?;
                }
                EncoderMode::Decomposed => {
                    if i < image_depth {
                        xi = layer.forward(&xi, None, Some(&bias.image_image), mode)?;
                    }
                    if i < text_depth {
                        let b = bias.text_text.broadcast_add(&txt_pad)?;
                        xt = layer.forward(&xt, None, Some(&b), mode)?;
                    }
                }
            }
            hidden.push(Tensor::cat(&[&xi, &xt], 1)?);
        }
        let memory = self
            .encoder
            .layer_norm
            .forward(hidden.last().unwrap(), mode)?;
        Ok(EncoderOutput {
            memory,
            padding: mem_padding,
            positions: pos,
            hidden,
        })
    }

    // ---------------------------------------------------------------- decoder pieces

    /// Decoder input embeddings `[b, t, d]`.
    pub fn embed_decoder(&self, ids: &Tensor, mode: Mode) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let x = self
            .embed_tokens
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, ()))?;
        let x = self.decoder.layernorm_embedding.forward(&x, mode)?;
        mode.dropout(&x)
    }

    /// Layer-normed decoder position embeddings for positions 0..t: `[t, d]`.
    pub fn decoder_positions(&self, t: usize, mode: Mode) -> Result<Tensor> {
        let dec = &self.decoder;
        dec.pos_ln
            .forward(&dec.embed_positions.narrow(0, 0, t)?, mode)
    }

    /// Self-attention bias of every decoder layer for positions 0..t: `[1, h, t, t]` each
    /// (causal mask not included).
    pub fn decoder_self_biases(&self, pos: &Tensor) -> Result<Vec<Tensor>> {
        let mut lazy = DecoderSelfBiases::new(self, pos)?;
        (0..self.cfg.decoder_layers)
            .map(|l| lazy.layer(l).cloned())
            .collect()
    }

    /// Cross-attention position bias `[1, h, t, p + l]` (the same for every decoder layer)
    /// of decoder positions against the encoder's patches and text tokens.
    pub fn decoder_cross_bias(
        &self,
        dec_pos: &Tensor,
        enc_pos: &EncoderPositions,
    ) -> Result<Tensor> {
        let dec = &self.decoder;
        let h = self.cfg.decoder_heads;
        let q = position_query(&dec.cross_pos_q_linear, dec_pos, h, self.head_scale())?;
        let key_image = match self.image_positions_for(&enc_pos.image) {
            Some(c) => c.cross_key.clone(),
            None => position_key(&dec.cross_pos_k_linear, &enc_pos.image, h)?,
        };
        let key_text = position_key(&dec.cross_pos_k_linear, &enc_pos.text, h)?;
        q.matmul(&Tensor::cat(&[&key_image, &key_text], 2)?.t()?)
    }

    /// Teacher-forced full-depth decoder. Returns the output of every layer (index 0 =
    /// embeddings), before the final layer norm.
    pub fn decode(
        &self,
        ids: &Tensor,
        dec_padding: Option<&[Vec<bool>]>,
        enc: &EncoderOutput,
        mode: Mode,
    ) -> Result<Vec<Tensor>> {
        let (_, t) = ids.dims2()?;
        let pos = self.decoder_positions(t, mode)?;
        let self_biases = self.decoder_self_biases(&pos)?;
        let mut self_mask = layers::causal_bias(t, &self.device)?;
        if let Some(pad) = dec_padding {
            self_mask = self_mask.broadcast_add(&layers::key_padding_bias(pad, &self.device)?)?;
        }
        let cross = self
            .decoder_cross_bias(&pos, &enc.positions)?
            .broadcast_add(&layers::key_padding_bias(&enc.padding, &self.device)?)?;
        let mut x = self.embed_decoder(ids, mode)?;
        let mut hidden = vec![x.clone()];
        for (layer, sb) in self.decoder.layers.iter().zip(&self_biases) {
            let (k, v) = layer.cross_key_value(&enc.memory, mode)?;
            let bias = sb.broadcast_add(&self_mask)?;
            x = layer
                .forward(&x, None, Some(&bias), (&k, &v), Some(&cross), mode)?
                .0;
            hidden.push(x.clone());
        }
        Ok(hidden)
    }

    /// Vocabulary logits from a decoder state: final layer norm, then the tied projection
    /// (in int8 under `--precision int8`).
    pub fn logits(&self, h: &Tensor, mode: Mode) -> Result<Tensor> {
        match &self.vocab_int8 {
            Some(q) if !mode.train && !infer::reference_kernels() => {
                quant::int8_linear(&self.decoder.layer_norm.forward(h, mode)?, q, None)
            }
            _ => self.logits_f32(h, mode),
        }
    }

    /// [`Model::logits`] in f32 at every precision.
    pub fn logits_f32(&self, h: &Tensor, mode: Mode) -> Result<Tensor> {
        let x = self.decoder.layer_norm.forward(h, mode)?;
        if mode.train {
            return matmul_flat(&x, &self.embed_tokens.t()?);
        }
        // Inference multiplies the vocabulary matrix as stored, `E x^T`: `x E^T` made gemm
        // repack all of E^T on every decoding step, most of a step's time (same sums, same
        // values; `mue bench` caption workload).
        let dims = x.dims().to_vec();
        let d = dims[dims.len() - 1];
        let rows = x.elem_count() / d.max(1);
        let x = x.reshape((rows, d))?;
        let n = self.embed_tokens.dim(0)?;
        let fast = !infer::reference_kernels() && x.device().is_cpu() && x.dtype() == DType::F32;
        let panels = match &self.vocab_panels {
            Some(p) if p.rows() == n => vocab::few_rows(p, &x)?,
            _ => None,
        };
        let y = match panels {
            Some(y) => y,
            None if fast && rows == 1 => vocab::single_row(&self.embed_tokens, &x)?,
            None => self.embed_tokens.matmul(&x.t()?)?.t()?.contiguous()?,
        };
        let mut out = dims[..dims.len() - 1].to_vec();
        out.push(n);
        y.reshape(out)
    }

    /// Log-probabilities over the vocabulary (differentiable).
    pub fn log_probs(&self, h: &Tensor, mode: Mode) -> Result<Tensor> {
        candle_nn::ops::log_softmax(&self.logits(h, mode)?, D::Minus1)
    }
}
