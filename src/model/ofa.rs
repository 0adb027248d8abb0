//! Loading real OFA checkpoints in the Hugging Face layout: `config.json` (with
//! `"model_type": "ofa"`) beside `model.safetensors` or `pytorch_model.bin`.
//!
//! The engine implements one OFA variant (the fine-tuning one: pre-norm NormFormer
//! layers, type embeddings, disentangled positions, tied output projection, erf GELU).
//! A config that switches any of these off is rejected with an error naming the key.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use serde::Deserialize;
use serde_json::Value;

use super::config::{Config, EncoderMode, ImageEmbedder};
use super::{resnet, weights, Model};

/// True when a parsed `config.json` is a Hugging Face OFA config (our own model
/// directories store a mue `Config` there instead).
pub fn is_hf_ofa_config(json: &Value) -> bool {
    json.get("model_type").and_then(Value::as_str) == Some("ofa")
}

/// True when `dir/config.json` exists and is a Hugging Face OFA config.
pub fn is_hf_ofa_dir(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .is_some_and(|j| is_hf_ofa_config(&j))
}

/// The keys of a Hugging Face `OFAConfig` that the engine reads (others are ignored). A
/// missing optional key takes `OFAConfig`'s default; every boolean switch must have the
/// value the engine implements, which is also its default.
#[derive(Debug, Clone, Deserialize)]
struct HfConfig {
    vocab_size: usize,
    d_model: usize,
    encoder_layers: usize,
    decoder_layers: usize,
    encoder_attention_heads: usize,
    decoder_attention_heads: usize,
    encoder_ffn_dim: usize,
    decoder_ffn_dim: usize,
    max_position_embeddings: usize,
    resnet_type: String,
    token_bucket_size: Option<usize>,
    image_bucket_size: Option<usize>,
    attn_scale_factor: Option<f64>,
    activation_function: Option<String>,
    bos_token_id: Option<u32>,
    pad_token_id: Option<u32>,
    eos_token_id: Option<u32>,
    normformer: Option<bool>,
    encoder_normalize_before: Option<bool>,
    decoder_normalize_before: Option<bool>,
    layernorm_embedding: Option<bool>,
    patch_layernorm_embedding: Option<bool>,
    add_type_embedding: Option<bool>,
    share_decoder_input_output_embed: Option<bool>,
    entangle_position_embedding: Option<bool>,
    scale_embedding: Option<bool>,
}

/// Deserializes `json` as `T`; an error names the key it is about.
fn typed<T: serde::de::DeserializeOwned>(json: &Value) -> Result<T> {
    serde_path_to_error::deserialize(json).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            anyhow::anyhow!("OFA config: {}", e.inner())
        } else {
            anyhow::anyhow!("OFA config: `{path}`: {}", e.inner())
        }
    })
}

/// Maps a Hugging Face OFA `config.json` to the engine's [`Config`] for square images of
/// side `image_size` and the given encoder mode.
pub fn config_from_hf(json: &Value, image_size: usize, mode: EncoderMode) -> Result<Config> {
    if !json.is_object() {
        bail!("OFA config: expected a JSON object");
    }
    // The kind first, so that another model's config is named as such.
    #[derive(Deserialize)]
    struct Kind {
        model_type: Option<Value>,
    }
    match typed::<Kind>(json)?.model_type {
        Some(Value::String(t)) if t == "ofa" => {}
        Some(other) => bail!("OFA config: `model_type` is {other}, expected \"ofa\""),
        None => bail!("OFA config: missing key `model_type` (expected \"ofa\")"),
    }
    let hf: HfConfig = typed(json)?;
    for (key, value, want) in [
        ("normformer", hf.normformer, true),
        (
            "encoder_normalize_before",
            hf.encoder_normalize_before,
            true,
        ),
        (
            "decoder_normalize_before",
            hf.decoder_normalize_before,
            true,
        ),
        ("layernorm_embedding", hf.layernorm_embedding, true),
        (
            "patch_layernorm_embedding",
            hf.patch_layernorm_embedding,
            true,
        ),
        ("add_type_embedding", hf.add_type_embedding, true),
        (
            "share_decoder_input_output_embed",
            hf.share_decoder_input_output_embed,
            true,
        ),
        (
            "entangle_position_embedding",
            hf.entangle_position_embedding,
            false,
        ),
        ("scale_embedding", hf.scale_embedding, false),
    ] {
        if let Some(b) = value.filter(|&b| b != want) {
            bail!(
                "OFA config: `{key}` = {b} is not supported (the engine implements only {key} = {want})"
            );
        }
    }
    if let Some(a) = hf.activation_function.as_deref().filter(|&a| a != "gelu") {
        bail!(
            "OFA config: `activation_function` = \"{a}\" is not supported (the engine implements only \"gelu\")"
        );
    }
    let blocks = resnet::blocks_for(&hf.resnet_type).with_context(|| {
        format!(
            "OFA config: `resnet_type` = \"{}\" is not supported (resnet50, resnet101 or resnet152)",
            hf.resnet_type
        )
    })?;
    let attn_scale_factor = hf.attn_scale_factor.unwrap_or(2.0);
    if attn_scale_factor.is_nan() || attn_scale_factor <= 0.0 {
        bail!("OFA config: `attn_scale_factor` must be positive, got {attn_scale_factor}");
    }
    let cfg = Config {
        vocab_size: hf.vocab_size,
        d_model: hf.d_model,
        encoder_layers: hf.encoder_layers,
        decoder_layers: hf.decoder_layers,
        encoder_heads: hf.encoder_attention_heads,
        decoder_heads: hf.decoder_attention_heads,
        encoder_ffn_dim: hf.encoder_ffn_dim,
        decoder_ffn_dim: hf.decoder_ffn_dim,
        max_positions: hf.max_position_embeddings,
        token_bucket_size: hf.token_bucket_size.unwrap_or(256),
        image_bucket_size: hf.image_bucket_size.unwrap_or(42),
        attn_scale_factor,
        layer_norm_eps: 1e-5,
        image_size,
        image_embedder: ImageEmbedder::Resnet { blocks },
        encoder_mode: mode,
        entangle_image_positions: false,
        bos_id: hf.bos_token_id.unwrap_or(0),
        pad_id: hf.pad_token_id.unwrap_or(1),
        eos_id: hf.eos_token_id.unwrap_or(2),
    };
    cfg.validate().context("OFA config")?;
    Ok(cfg)
}

/// A tensor map that remembers which names the model asked for.
struct Recording {
    tensors: HashMap<String, Tensor>,
    used: Mutex<BTreeSet<String>>,
}

impl SimpleBackend for Recording {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.used.lock().unwrap().insert(name.to_string());
        SimpleBackend::get(&self.tensors, s, name, h, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.used.lock().unwrap().insert(name.to_string());
        SimpleBackend::get_unchecked(&self.tensors, name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// Builds the model from f32 parameters under Hugging Face names and returns it with
/// the subset of parameters it reads (no buffers, the tied embedding once, under
/// `encoder.embed_tokens.weight`). A missing or mis-shaped tensor is an error naming it.
pub fn build_with_used(
    cfg: &Config,
    params: HashMap<String, Tensor>,
    device: &Device,
) -> Result<(Model, HashMap<String, Tensor>)> {
    cfg.validate()?;
    let params = params
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?)))
        .collect::<candle_core::Result<HashMap<_, _>>>()?;
    let rec = std::sync::Arc::new(Recording {
        tensors: params,
        used: Mutex::new(BTreeSet::new()),
    });
    struct Shared(std::sync::Arc<Recording>);
    impl SimpleBackend for Shared {
        fn get(
            &self,
            s: Shape,
            name: &str,
            h: candle_nn::Init,
            dtype: DType,
            dev: &Device,
        ) -> candle_core::Result<Tensor> {
            self.0.get(s, name, h, dtype, dev)
        }
        fn get_unchecked(
            &self,
            name: &str,
            dtype: DType,
            dev: &Device,
        ) -> candle_core::Result<Tensor> {
            self.0.get_unchecked(name, dtype, dev)
        }
        fn contains_tensor(&self, name: &str) -> bool {
            self.0.contains_tensor(name)
        }
    }
    let vb = VarBuilder::from_backend(Box::new(Shared(rec.clone())), DType::F32, device.clone());
    let model = Model::new(cfg, vb)?;
    let used = rec.used.lock().unwrap().clone();
    let subset = used
        .into_iter()
        .map(|name| {
            let t = rec.tensors[&name].clone();
            (name, t)
        })
        .collect();
    Ok((model, subset))
}

/// The weight file of a Hugging Face OFA directory: `model.safetensors`, else
/// `pytorch_model.bin`.
pub fn weight_file(dir: &Path) -> Result<PathBuf> {
    for name in ["model.safetensors", "pytorch_model.bin"] {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "OFA directory {} has neither model.safetensors nor pytorch_model.bin",
        dir.display()
    )
}

/// Reads and maps the `config.json` of a Hugging Face OFA directory.
pub fn read_hf_config(dir: &Path, image_size: usize, mode: EncoderMode) -> Result<Config> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let json: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    if !is_hf_ofa_config(&json) {
        bail!(
            "{} is not a Hugging Face OFA config (no \"model_type\": \"ofa\"); \
             a converted mue model directory loads with Model::load_dir",
            path.display()
        );
    }
    config_from_hf(&json, image_size, mode).with_context(|| path.display().to_string())
}

/// Loads a Hugging Face OFA directory; returns the config, the model and the parameters
/// the model uses (see [`build_with_used`]).
pub fn load_ofa_dir_with_tensors(
    dir: &Path,
    image_size: usize,
    mode: EncoderMode,
    device: &Device,
) -> Result<(Config, Model, HashMap<String, Tensor>)> {
    if !dir.is_dir() {
        bail!("OFA directory {} does not exist", dir.display());
    }
    let cfg = read_hf_config(dir, image_size, mode)?;
    let path = weight_file(dir)?;
    let params = weights::load_state_dict(&path)?;
    weights::check_tied_embeddings(&params).with_context(|| path.display().to_string())?;
    let (model, used) = build_with_used(&cfg, params, device)
        .with_context(|| format!("weights {} do not match config.json", path.display()))?;
    Ok((cfg, model, used))
}

/// Loads a Hugging Face OFA directory (config.json + model.safetensors or
/// pytorch_model.bin) as a [`Model`].
pub fn load_ofa_dir(
    dir: &Path,
    image_size: usize,
    mode: EncoderMode,
    device: &Device,
) -> Result<Model> {
    Ok(load_ofa_dir_with_tensors(dir, image_size, mode, device)?.1)
}

/// Entry `[i, j]` of OFA's `token_rp_bucket` buffer (`[max_positions, max_positions]`).
pub fn token_rp_bucket(i: usize, j: usize, bucket_size: usize, max_positions: usize) -> usize {
    super::position::token_bucket(i as i64 - j as i64, bucket_size, max_positions)
}

/// Entry `[a, b]` of OFA's `image_rp_bucket` buffer (`[n*n + 1]^2` for bucket size `n`),
/// indexed by image position ids (0 reserved). Row 0 maps to `rows - 3`, column 0 to
/// `rows - 2`, `[0, 0]` to `rows - 1`, with `rows` = [`super::position::image_rel_rows`].
pub fn image_rp_bucket(a: usize, b: usize, bucket_size: usize) -> usize {
    let rows = super::position::image_rel_rows(bucket_size);
    match (a, b) {
        (0, 0) => rows - 1,
        (_, 0) => rows - 2,
        (0, _) => rows - 3,
        _ => {
            let cell = |id: usize| ((id - 1) / bucket_size, (id - 1) % bucket_size);
            super::position::image_bucket(cell(a), cell(b), bucket_size)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_json() -> Value {
        let p = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/ofa-parity/config.json"
        ));
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    }

    #[test]
    fn fixture_config_maps() {
        let j = fixture_json();
        let n = |key: &str| j[key].as_u64().unwrap_or_else(|| panic!("{key}")) as usize;
        let cfg = config_from_hf(&j, 128, EncoderMode::Joint).unwrap();
        assert_eq!(cfg.vocab_size, n("vocab_size"));
        assert_eq!(cfg.d_model, n("d_model"));
        assert_eq!(
            (cfg.encoder_layers, cfg.decoder_layers),
            (n("encoder_layers"), n("decoder_layers"))
        );
        assert_eq!(
            (cfg.encoder_heads, cfg.decoder_heads),
            (n("encoder_attention_heads"), n("decoder_attention_heads"))
        );
        assert_eq!(
            (cfg.encoder_ffn_dim, cfg.decoder_ffn_dim),
            (n("encoder_ffn_dim"), n("decoder_ffn_dim"))
        );
        assert_eq!(cfg.max_positions, n("max_position_embeddings"));
        assert_eq!(
            (cfg.token_bucket_size, cfg.image_bucket_size),
            (n("token_bucket_size"), n("image_bucket_size"))
        );
        assert_eq!(
            cfg.attn_scale_factor,
            j["attn_scale_factor"].as_f64().unwrap()
        );
        let blocks = crate::model::resnet::blocks_for(j["resnet_type"].as_str().unwrap());
        assert_eq!(
            cfg.image_embedder,
            ImageEmbedder::Resnet {
                blocks: blocks.unwrap()
            }
        );
        assert_eq!(
            (cfg.bos_id, cfg.pad_id, cfg.eos_id),
            (
                n("bos_token_id") as u32,
                n("pad_token_id") as u32,
                n("eos_token_id") as u32
            )
        );
        // The ResNet trunk's output stride is 16.
        assert_eq!(cfg.image_size, 128);
        assert_eq!(cfg.grid_side(), 128 / 16);
        assert_eq!(cfg.encoder_mode, EncoderMode::Joint);
    }

    #[test]
    fn unsupported_switches_are_named() {
        for (key, bad) in [
            ("normformer", Value::Bool(false)),
            ("encoder_normalize_before", Value::Bool(false)),
            ("decoder_normalize_before", Value::Bool(false)),
            ("entangle_position_embedding", Value::Bool(true)),
            ("scale_embedding", Value::Bool(true)),
            ("add_type_embedding", Value::Bool(false)),
            ("share_decoder_input_output_embed", Value::Bool(false)),
            ("activation_function", Value::String("relu".into())),
            ("resnet_type", Value::String("resnet18".into())),
            ("model_type", Value::String("bart".into())),
        ] {
            let mut j = fixture_json();
            j[key] = bad;
            let err = format!(
                "{:#}",
                config_from_hf(&j, 128, EncoderMode::Joint).unwrap_err()
            );
            assert!(err.contains(key), "{key}: {err}");
        }
        for key in ["d_model", "vocab_size", "encoder_ffn_dim", "resnet_type"] {
            let mut j = fixture_json();
            j.as_object_mut().unwrap().remove(key);
            let err = format!(
                "{:#}",
                config_from_hf(&j, 128, EncoderMode::Joint).unwrap_err()
            );
            assert!(err.contains(key), "{key}: {err}");
        }
        // A value of the wrong type names its key too.
        for (key, bad) in [
            ("d_model", Value::String("256".into())),
            ("bos_token_id", serde_json::json!(-1)),
            ("attn_scale_factor", Value::Bool(true)),
            ("normformer", Value::String("yes".into())),
        ] {
            let mut j = fixture_json();
            j[key] = bad;
            let err = format!(
                "{:#}",
                config_from_hf(&j, 128, EncoderMode::Joint).unwrap_err()
            );
            assert!(err.contains(key), "{key}: {err}");
        }
        // The image grid must fit the image position table (image_bucket_size * 16 px).
        let largest = fixture_json()["image_bucket_size"].as_u64().unwrap() as usize * 16;
        assert!(config_from_hf(&fixture_json(), largest + 16, EncoderMode::Joint).is_err());
        assert!(config_from_hf(&fixture_json(), largest, EncoderMode::Joint).is_ok());
    }

    #[test]
    fn image_rp_bucket_conventions() {
        assert_eq!(image_rp_bucket(0, 0, 42), 6891);
        assert_eq!(image_rp_bucket(0, 5, 42), 6889);
        assert_eq!(image_rp_bucket(5, 0, 42), 6890);
        assert_eq!(image_rp_bucket(1, 1, 42), 41 * 83 + 41);
        // id 43 = (1, 0), id 3 = (0, 2)
        assert_eq!(image_rp_bucket(43, 3, 42), 42 * 83 + 39);
        assert_eq!(token_rp_bucket(0, 1023, 256, 1024), 0);
        assert_eq!(token_rp_bucket(1023, 0, 256, 1024), 510);
    }
}
