//! Inference with exits: encoder streams, incremental decoding, search, candidate scoring
//! and cost accounting.

pub mod cost;
pub mod decoder;
pub mod encoder;
pub mod kv_cache;
pub mod rows;
pub mod score;
pub mod search;

pub use cost::Macs;
pub use decoder::{DecoderState, KvFill};
pub use encoder::{run_encoder, EncoderRun};
pub use score::{score_candidates, Scored};
pub use search::{beam_search, greedy, search, Generation, Hypothesis, SearchConfig};

use crate::exit::ExitPolicy;
use crate::model::Model;
use anyhow::{bail, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// One encoder input: a preprocessed image `[3, s, s]` and text ids with BOS/EOS.
#[derive(Debug, Clone)]
pub struct Input {
    pub image: Tensor,
    pub text_ids: Vec<u32>,
}

/// Where each part of one request exited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exits {
    pub image_layer: usize,
    pub text_layer: usize,
    /// Decoder layers per generated token (EOS included), or the single exit of a scoring pass.
    pub token_layers: Vec<usize>,
    pub encoder_layers: usize,
    pub decoder_layers: usize,
}

impl Exits {
    /// Fraction of layers skipped, counting each encoder stream and each decoder token as
    /// one unit of `depth` layers (the paper's expected time reduction).
    pub fn layer_reduction(&self) -> f64 {
        let run = self.image_layer + self.text_layer + self.token_layers.iter().sum::<usize>();
        let full = 2 * self.encoder_layers + self.token_layers.len() * self.decoder_layers;
        if full == 0 {
            0.0
        } else {
            1.0 - run as f64 / full as f64
        }
    }
}

/// What a request cost.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cost {
    pub macs_executed: u64,
    pub macs_full: u64,
    /// 1 - executed / full multiply-adds.
    pub saved_fraction: f64,
    pub layer_reduction: f64,
    /// Wall time of the batch this request ran in.
    pub wall_ms: f64,
}

impl Cost {
    fn new(macs: Macs, exits: &Exits, wall_ms: f64) -> Self {
        Cost {
            macs_executed: macs.executed,
            macs_full: macs.full,
            saved_fraction: macs.saved_fraction(),
            layer_reduction: exits.layer_reduction(),
            wall_ms,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaptionResult {
    pub tokens: Vec<u32>,
    pub score: f32,
    pub exits: Exits,
    pub cost: Cost,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScoreResult {
    pub best: usize,
    pub scores: Vec<f32>,
    pub exits: Exits,
    pub cost: Cost,
}

/// Stack inputs into a padded batch: images `[b, 3, s, s]`, ids `[b, l]`, padding flags.
pub fn batch_inputs(model: &Model, inputs: &[Input]) -> Result<(Tensor, Tensor, Vec<Vec<bool>>)> {
    if inputs.is_empty() {
        bail!("empty batch");
    }
    let s = model.cfg.image_size;
    let mut images = Vec::with_capacity(inputs.len());
    for (i, inp) in inputs.iter().enumerate() {
        if inp.image.dims() != [3, s, s] {
            bail!(
                "input {i}: image tensor has shape {:?}, the model expects [3, {s}, {s}]",
                inp.image.dims()
            );
        }
        if inp.text_ids.len() < 2 {
            bail!("input {i}: text is empty");
        }
        if inp.text_ids.len() > model.cfg.max_text_len() {
            bail!(
                "input {i}: text has {} tokens, the model allows at most {}",
                inp.text_ids.len(),
                model.cfg.max_text_len()
            );
        }
        if let Some(&bad) = inp
            .text_ids
            .iter()
            .find(|&&t| t as usize >= model.cfg.vocab_size)
        {
            bail!(
                "input {i}: token id {bad} is outside the vocabulary of {}",
                model.cfg.vocab_size
            );
        }
        images.push(inp.image.unsqueeze(0)?);
    }
    let l = inputs.iter().map(|x| x.text_ids.len()).max().unwrap();
    let pad = model.cfg.pad_id;
    let mut ids = Vec::with_capacity(inputs.len() * l);
    let mut padding = Vec::with_capacity(inputs.len());
    for inp in inputs {
        ids.extend(
            inp.text_ids
                .iter()
                .copied()
                .chain(std::iter::repeat_n(pad, l - inp.text_ids.len())),
        );
        padding.push((0..l).map(|j| j >= inp.text_ids.len()).collect());
    }
    let images = Tensor::cat(&images, 0)?.to_device(&model.device)?;
    let ids = Tensor::from_vec(ids, (inputs.len(), l), &model.device)?;
    Ok((images, ids, padding))
}

/// Generate a caption for each input.
pub fn caption(
    model: &Model,
    inputs: &[Input],
    policy: &dyn ExitPolicy,
    cfg: &SearchConfig,
) -> Result<Vec<CaptionResult>> {
    cfg.validate()?;
    let start = Instant::now();
    let (images, ids, padding) = batch_inputs(model, inputs)?;
    let enc = run_encoder(model, &images, &ids, &padding, policy)?;
    let gens = search(model, &enc, policy, cfg)?;
    let wall_ms = start.elapsed().as_secs_f64() * 1e3;
    Ok(gens
        .into_iter()
        .enumerate()
        .map(|(i, g)| {
            let mut macs = enc.macs[i];
            macs += g.macs;
            let exits = Exits {
                image_layer: enc.image_exit[i],
                text_layer: enc.text_exit[i],
                token_layers: g.best.token_exits.clone(),
                encoder_layers: model.cfg.encoder_layers,
                decoder_layers: model.cfg.decoder_layers,
            };
            CaptionResult {
                tokens: g.best.tokens,
                score: g.best.score,
                cost: Cost::new(macs, &exits, wall_ms),
                exits,
            }
        })
        .collect())
}

/// Score candidate answers (e.g. " yes" / " no" / " maybe") after each input's decoder prefix.
pub fn classify(
    model: &Model,
    inputs: &[Input],
    prefixes: &[Vec<u32>],
    candidates: &[Vec<u32>],
    policy: &dyn ExitPolicy,
) -> Result<Vec<ScoreResult>> {
    let start = Instant::now();
    let (images, ids, padding) = batch_inputs(model, inputs)?;
    for (i, p) in prefixes.iter().enumerate() {
        if p.first() != Some(&model.cfg.bos_id) {
            bail!("decoder prefix {i} must start with BOS");
        }
    }
    let enc = run_encoder(model, &images, &ids, &padding, policy)?;
    let scored = score_candidates(model, &enc, prefixes, candidates, policy)?;
    let wall_ms = start.elapsed().as_secs_f64() * 1e3;
    Ok(scored
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let exits = Exits {
                image_layer: enc.image_exit[i],
                text_layer: enc.text_exit[i],
                token_layers: vec![s.decoder_exit],
                encoder_layers: model.cfg.encoder_layers,
                decoder_layers: model.cfg.decoder_layers,
            };
            ScoreResult {
                best: s.best,
                scores: s.scores,
                cost: Cost::new(s.macs, &exits, wall_ms),
                exits,
            }
        })
        .collect())
}
