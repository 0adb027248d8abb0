//! Incremental decoding with one exit per row (sample x beam) per generated token.
//!
//! All per-request state lives in `DecoderState`; the model is only read.

use super::cost::{self, Macs};
use super::encoder::EncoderRun;
use super::kv_cache::KvCache;
use super::rows::{signals, ExitRows};
use crate::exit::{row_similarity, ExitPolicy, Prediction, Site};
use crate::model::attn_rows::{self, RowsAttention};
use crate::model::layers::{key_padding_bias, Mode};
use crate::model::{DecoderSelfBiases, Model};
use candle_core::{DType, IndexOp, Result, Tensor};
use serde::{Deserialize, Serialize};

/// How skipped layers get keys/values for a token that exited early.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvFill {
    /// Each skipped layer projects the exit state with its own layer norm and K/V weights.
    #[default]
    Propagate,
    /// Skipped layers reuse the exit layer's keys/values.
    Copy,
}

impl KvFill {
    /// The name `FromStr` reads.
    pub fn as_str(&self) -> &'static str {
        match self {
            KvFill::Propagate => "propagate",
            KvFill::Copy => "copy",
        }
    }
}

impl std::str::FromStr for KvFill {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "propagate" => Ok(KvFill::Propagate),
            "copy" => Ok(KvFill::Copy),
            _ => anyhow::bail!("unknown key/value fill policy '{s}' (expected propagate or copy)"),
        }
    }
}

/// Output of one decoding step.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// `[rows, vocab]` logits, f32.
    pub logits: Tensor,
    /// Layers run by each row for this token (1..=decoder_layers).
    pub exit_layer: Vec<usize>,
}

/// Keys/values and exit bookkeeping of one decoding batch.
pub struct DecoderState<'a> {
    model: &'a Model,
    policy: &'a dyn ExitPolicy,
    fill: KvFill,
    max_len: usize,
    memory: Tensor,
    mem_mask: Tensor,
    memory_len: Vec<usize>,
    /// `[1, h, T, T]` per layer for positions 0..T, built when a row first reaches the layer.
    self_biases: DecoderSelfBiases<'a>,
    /// `[1, h, T, n]`.
    cross_bias: Tensor,
    /// Cross keys/values per layer, `[samples, h, n, dh]` each, a sample's row computed the
    /// first time a row of that sample reaches the layer (`cross_have`). Where the row
    /// attention reads them (`cross_keys_t`), the keys are kept transposed only,
    /// `[samples, h, dh, n]`: one copy of them, made once.
    cross_kv: Vec<Option<(Tensor, Tensor)>>,
    cross_have: Vec<Vec<bool>>,
    /// Whether the row attention serves this memory (then the cross keys are transposed).
    cross_keys_t: bool,
    /// Per layer, the last stack of cross keys/values built for a list of samples (one
    /// batched attention call for all of them), reused while the list stays the same.
    cross_stack: Vec<Option<(Vec<usize>, Tensor, Tensor)>>,
    /// This step's cross-attention bias with the memory masks of a list of samples, shared
    /// by the layers while the list stays the same.
    cross_bias_step: Option<(usize, Vec<usize>, Tensor)>,
    /// Self-attention keys/values per layer, written in place.
    cache: KvCache,
    /// Sample of each row.
    pub row_sample: Vec<usize>,
    /// Tokens fed so far.
    pub t: usize,
    /// Work per sample.
    pub macs: Vec<Macs>,
}

impl<'a> DecoderState<'a> {
    /// A state with one row per sample of `enc`, able to run `max_len + 1` steps.
    pub fn new(
        model: &'a Model,
        enc: &EncoderRun,
        policy: &'a dyn ExitPolicy,
        fill: KvFill,
        max_len: usize,
    ) -> Result<Self> {
        let mode = Mode::INFER;
        let steps = max_len + 1;
        if steps > model.cfg.max_positions {
            candle_core::bail!(
                "maximum length {max_len} exceeds the model's {} decoder positions",
                model.cfg.max_positions
            );
        }
        let pos = model.decoder_positions(steps, mode)?;
        let b = enc.memory.dim(0)?;
        let d = model.cfg.d_model as u64;
        let mut macs = vec![Macs::default(); b];
        for (m, &n) in macs.iter_mut().zip(&enc.memory_len) {
            let (t, n) = (steps as u64, n as u64);
            m.fixed(cost::position_bias(t, t, d) + cost::position_bias(t, n, d));
        }
        Ok(Self {
            model,
            policy,
            fill,
            max_len,
            memory: enc.memory.clone(),
            mem_mask: key_padding_bias(&enc.padding, &model.device)?,
            memory_len: enc.memory_len.clone(),
            self_biases: DecoderSelfBiases::new(model, &pos)?,
            cross_bias: model.decoder_cross_bias(&pos, &enc.positions)?,
            cross_kv: vec![None; model.cfg.decoder_layers],
            cross_have: vec![vec![false; b]; model.cfg.decoder_layers],
            cross_keys_t: attn_rows::takes(&enc.memory),
            cross_stack: vec![None; model.cfg.decoder_layers],
            cross_bias_step: None,
            cache: KvCache::new(model.cfg.decoder_layers, steps),
            row_sample: (0..b).collect(),
            t: 0,
            macs,
        })
    }

    /// Self-attention keys/values of `layer` so far: `[rows, h, t, dh]` each.
    pub fn cache(&self, layer: usize) -> Result<Option<(Tensor, Tensor)>> {
        self.cache.get(layer, self.t)
    }

    /// Samples of the batch (rows of the encoder memory).
    fn row_sample_count(&self) -> usize {
        self.memory_len.len()
    }

    pub fn rows(&self) -> usize {
        self.row_sample.len()
    }

    /// Keep rows `origins` (in that order, repeats allowed): beam reordering and dropping
    /// finished rows.
    pub fn reorder(&mut self, origins: &[usize]) -> Result<()> {
        let identity =
            origins.len() == self.rows() && origins.iter().enumerate().all(|(i, &o)| i == o);
        if identity {
            return Ok(());
        }
        let idx = Tensor::from_vec(
            origins.iter().map(|&o| o as u32).collect::<Vec<_>>(),
            origins.len(),
            &self.model.device,
        )?;
        self.cache.reorder(&idx)?;
        self.row_sample = origins.iter().map(|&o| self.row_sample[o]).collect();
        Ok(())
    }

    fn ensure_cross_kv(&mut self, layer: usize, rows: &[usize]) -> Result<()> {
        let mut missing: Vec<usize> = rows
            .iter()
            .map(|&r| self.row_sample[r])
            .filter(|&s| !self.cross_have[layer][s])
            .collect();
        missing.sort_unstable();
        missing.dedup();
        if missing.is_empty() {
            return Ok(());
        }
        let idx = Tensor::from_vec(
            missing.iter().map(|&s| s as u32).collect::<Vec<_>>(),
            missing.len(),
            &self.model.device,
        )?;
        let mem = self.memory.index_select(&idx, 0)?;
        let (k, v) = self.model.decoder.layers[layer].cross_key_value(&mem, Mode::INFER)?;
        let k = if self.cross_keys_t {
            k.transpose(2, 3)?
        } else {
            k
        };
        let (k, v) = (k.contiguous()?, v.contiguous()?);
        let b = self.row_sample_count();
        if missing.len() == b {
            // Every sample at once (the first step): the product is the buffer.
            self.cross_kv[layer] = Some((k, v));
        } else {
            if self.cross_kv[layer].is_none() {
                // Room for every sample, each tensor in its own layout.
                let zeros = |t: &Tensor| {
                    let mut dims = t.dims().to_vec();
                    dims[0] = b;
                    Tensor::zeros(dims, t.dtype(), t.device())
                };
                self.cross_kv[layer] = Some((zeros(&k)?, zeros(&v)?));
            }
            let (bk, bv) = self.cross_kv[layer].as_ref().unwrap();
            for (j, &s) in missing.iter().enumerate() {
                bk.slice_set(&k.narrow(0, j, 1)?, 0, s)?;
                bv.slice_set(&v.narrow(0, j, 1)?, 0, s)?;
            }
        }
        let d = self.model.cfg.d_model as u64;
        for &s in &missing {
            self.cross_have[layer][s] = true;
            self.macs[s].executed += cost::cross_key_value(self.memory_len[s] as u64, d);
        }
        Ok(())
    }

    /// Cross attention for active rows `rows` with states `x` `[a, 1, d]`; rows of one sample
    /// are attended together as a sequence of queries over that sample's memory.
    fn cross(&mut self, layer: usize, rows: &[usize], x: &Tensor) -> Result<Tensor> {
        let dl = &self.model.decoder.layers[layer];
        let mode = Mode::INFER;
        if attn_rows::takes(x) && self.cross_keys_t {
            // Each row reads its sample's keys/values and memory mask in place.
            let (kt, v) = self.cross_kv[layer].as_ref().unwrap();
            let samples: Vec<usize> = rows.iter().map(|&r| self.row_sample[r]).collect();
            let kv = RowsAttention {
                k: kt,
                v,
                keys_t: true,
                len: v.dim(2)?,
                kv_row: &samples,
                bias: &self.cross_bias,
                t: self.t,
                mask: Some((&self.mem_mask, &samples)),
            };
            return dl.cross_block_rows(x, &kv);
        }
        let bias_t = self.cross_bias.i((.., .., self.t..self.t + 1, ..))?;
        // Contiguous runs of rows of the same sample: (sample, first row, rows).
        let mut runs: Vec<(usize, usize, usize)> = Vec::new();
        for (j, &r) in rows.iter().enumerate() {
            let s = self.row_sample[r];
            match runs.last_mut() {
                Some((last, _, n)) if *last == s => *n += 1,
                _ => runs.push((s, j, 1)),
            }
        }
        let (a, _, dm) = x.dims3()?;
        let g = runs[0].2;
        if runs.iter().all(|&(_, _, n)| n == g) {
            // As many rows per sample (greedy: one; beam search: the beams): one batched
            // call, queries `[samples, g, d]` over the samples' stacked keys/values, instead
            // of one small call per sample.
            let samples: Vec<usize> = runs.iter().map(|&(s, _, _)| s).collect();
            let (k, v) = self.stacked_cross_kv(layer, &samples)?;
            let bias = self.step_cross_bias(&bias_t, &samples)?;
            let xs = x.reshape((samples.len(), g, dm))?;
            let y = dl.cross_block(&xs, (&k, &v), Some(&bias), mode)?;
            return y.reshape((a, 1, dm));
        }
        // Unequal runs: one call per run.
        let mut outs = Vec::new();
        let (bk, bv) = self.cross_kv_heads(layer)?;
        for (s, start, n) in runs {
            let (k, v) = (bk.narrow(0, s, 1)?, bv.narrow(0, s, 1)?);
            let bias = bias_t.broadcast_add(&self.mem_mask.narrow(0, s, 1)?)?;
            let xs = x.narrow(0, start, n)?.reshape((1, n, dm))?;
            outs.push(
                dl.cross_block(&xs, (&k, &v), Some(&bias), mode)?
                    .reshape((n, 1, dm))?,
            );
        }
        Tensor::cat(&outs, 0)
    }

    /// This step's cross-attention bias `bias_t` plus the memory masks `[m, 1, 1, n]` of
    /// `samples` (repeats allowed).
    fn step_cross_bias(&mut self, bias_t: &Tensor, samples: &[usize]) -> Result<Tensor> {
        if let Some((t, list, bias)) = &self.cross_bias_step {
            if *t == self.t && list == samples {
                return Ok(bias.clone());
            }
        }
        let idx = Tensor::from_vec(
            samples.iter().map(|&s| s as u32).collect::<Vec<_>>(),
            samples.len(),
            &self.model.device,
        )?;
        let bias = bias_t.broadcast_add(&self.mem_mask.index_select(&idx, 0)?)?;
        self.cross_bias_step = Some((self.t, samples.to_vec(), bias.clone()));
        Ok(bias)
    }

    /// The layer's cross keys and values, both `[samples, h, n, dh]` (keys kept transposed
    /// are put back: a path the row attention does not serve).
    fn cross_kv_heads(&self, layer: usize) -> Result<(Tensor, Tensor)> {
        let (k, v) = self.cross_kv[layer].as_ref().unwrap();
        let k = if self.cross_keys_t {
            k.transpose(2, 3)?.contiguous()?
        } else {
            k.clone()
        };
        Ok((k, v.clone()))
    }

    /// Cross keys/values `[m, h, n, dh]` of `samples` (repeats allowed), stacked once per
    /// list of samples and layer.
    fn stacked_cross_kv(&mut self, layer: usize, samples: &[usize]) -> Result<(Tensor, Tensor)> {
        if let Some((list, k, v)) = &self.cross_stack[layer] {
            if list == samples {
                return Ok((k.clone(), v.clone()));
            }
        }
        let (bk, bv) = self.cross_kv_heads(layer)?;
        let idx = Tensor::from_vec(
            samples.iter().map(|&s| s as u32).collect::<Vec<_>>(),
            samples.len(),
            &self.model.device,
        )?;
        let (k, v) = (bk.index_select(&idx, 0)?, bv.index_select(&idx, 0)?);
        self.cross_stack[layer] = Some((samples.to_vec(), k.clone(), v.clone()));
        Ok((k, v))
    }

    fn predictions(&self, h: &Tensor) -> Result<Vec<Prediction>> {
        let logits = self.model.logits(h, Mode::INFER)?.squeeze(1)?;
        let probs = candle_nn::ops::softmax_last_dim(&logits)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        Ok(probs.iter().map(|p| Prediction::from_probs(p)).collect())
    }

    /// Feed one token per row at position `self.t`; returns next-token logits.
    // The layer loop indexes the cache, the biases and the layers alike by `l`.
    #[allow(clippy::needless_range_loop)]
    pub fn step(&mut self, tokens: &[u32]) -> Result<StepOutput> {
        let model = self.model;
        let mode = Mode::INFER;
        let rows = self.rows();
        if tokens.len() != rows {
            candle_core::bail!("step got {} tokens for {rows} rows", tokens.len());
        }
        if self.t > self.max_len {
            candle_core::bail!("decoder state is full ({} steps)", self.max_len + 1);
        }
        let t = self.t;
        let layers = model.cfg.decoder_layers;
        let d = model.cfg.d_model as u64;
        let ffn = model.cfg.decoder_ffn_dim as u64;
        let vocab = model.cfg.vocab_size as u64;
        let dev = &model.device;
        let ids = Tensor::from_vec(tokens.to_vec(), (rows, 1), dev)?;
        let site = Site::Decoder {
            step: t,
            max_len: self.max_len,
        };
        let mut run = ExitRows::new(&model.embed_decoder(&ids, mode)?, layers, site)?;
        // This token's keys/values per layer, (rows, k, v) pieces: the copy fill reads them.
        let mut new_kv: Vec<Vec<(Vec<usize>, Tensor, Tensor)>> = vec![Vec::new(); layers];
        let needs_pred = self.policy.needs_predictions();

        for l in 0..layers {
            let active = run.active();
            if active.is_empty() {
                break;
            }
            self.ensure_cross_kv(l, &active)?;
            let dl = &model.decoder.layers[l];
            let h = run.gather(&active)?;
            // Self-attention as `DecoderLayer::self_block`, with this token's keys/values
            // written into the cache and attention reading the cache in place.
            let hn = dl.self_attn_layer_norm.forward(&h, mode)?;
            let (k, v) = dl.self_attn.key_value(&hn, mode)?;
            self.cache.write(l, rows, &active, t, &k, &v)?;
            let a = if attn_rows::takes(&hn) {
                let q = dl.self_attn.query_rows(&hn, mode)?;
                let (bk, bv) = self.cache.buffers(l)?;
                let kv = RowsAttention {
                    k: bk,
                    v: bv,
                    keys_t: false,
                    len: t + 1,
                    kv_row: &active,
                    bias: self.self_biases.layer(l)?,
                    t,
                    mask: None,
                };
                dl.self_attn.attend_rows(&q, &kv)?
            } else {
                let q = dl.self_attn.query(&hn, mode)?;
                let idx = if active.len() == rows {
                    None
                } else {
                    Some(Tensor::from_vec(
                        active.iter().map(|&r| r as u32).collect::<Vec<_>>(),
                        active.len(),
                        dev,
                    )?)
                };
                let bias = self.self_biases.layer(l)?.i((.., .., t..t + 1, 0..t + 1))?;
                let (pk, pv) = self.cache.read(l, idx.as_ref(), t + 1)?;
                dl.self_attn.attend(&q, &pk, &pv, Some(&bias), mode)?
            };
            let x = (&h + dl.self_attn_mid_layer_norm.forward(&a, mode)?)?;
            let x = self.cross(l, &active, &x)?;
            let y = dl.ffn_block(&x, mode)?;
            new_kv[l].push((active.clone(), k, v));
            run.charge(&active, |r| {
                let n_mem = self.memory_len[self.row_sample[r]] as u64;
                cost::decoder_layer(1, t as u64 + 1, n_mem, d, ffn)
            });
            // No decision follows the last layer.
            let signals = if l + 1 == layers {
                Vec::new()
            } else {
                let preds = if needs_pred {
                    run.charge(&active, |_| d * vocab);
                    Some(self.predictions(&y)?)
                } else {
                    None
                };
                signals(row_similarity(&y, &h, None)?, preds)
            };
            run.update(&active, l, &y, signals, self.policy)?;
        }
        let exit_layer = run.exit.clone();

        // Skipped layers still need this token's keys/values for later, deeper tokens.
        let mut exit_states: Option<(Vec<usize>, Tensor)> = None;
        for m in 1..layers {
            let fill_rows: Vec<usize> = (0..rows).filter(|&r| exit_layer[r] <= m).collect();
            if fill_rows.is_empty() {
                continue;
            }
            let (k, v) = match self.fill {
                KvFill::Propagate => {
                    // The same rows' exit states serve every layer above their exits.
                    if exit_states.as_ref().is_none_or(|(r, _)| *r != fill_rows) {
                        exit_states = Some((fill_rows.clone(), run.gather(&fill_rows)?));
                    }
                    let hs = &exit_states.as_ref().unwrap().1;
                    for &r in &fill_rows {
                        self.macs[self.row_sample[r]].executed += cost::propagate(d);
                    }
                    model.decoder.layers[m].self_key_value(hs, mode)?
                }
                KvFill::Copy => {
                    let mut ks = Vec::new();
                    let mut vs = Vec::new();
                    for &r in &fill_rows {
                        let src = exit_layer[r] - 1;
                        let (k, v) = row_kv(&new_kv[src], r)?;
                        ks.push(k);
                        vs.push(v);
                    }
                    (Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?)
                }
            };
            self.cache.write(m, rows, &fill_rows, t, &k, &v)?;
        }
        let hs = run.gather(&(0..rows).collect::<Vec<_>>())?;
        let logits = model.logits(&hs, mode)?.squeeze(1)?;
        for r in 0..rows {
            let s = self.row_sample[r];
            self.macs[s].executed += run.macs[r] + d * vocab;
            let full_step = layers as u64
                * cost::decoder_layer(1, t as u64 + 1, self.memory_len[s] as u64, d, ffn)
                + d * vocab;
            self.macs[s].full += full_step;
            if t == 0 {
                // Full depth computes every layer's cross keys/values once per sample.
                if r == 0 || self.row_sample[r - 1] != s {
                    self.macs[s].full +=
                        layers as u64 * cost::cross_key_value(self.memory_len[s] as u64, d);
                }
            }
        }
        self.t += 1;
        Ok(StepOutput {
            logits: logits.to_dtype(DType::F32)?,
            exit_layer,
        })
    }
}

fn row_kv(pieces: &[(Vec<usize>, Tensor, Tensor)], r: usize) -> Result<(Tensor, Tensor)> {
    for (rows, k, v) in pieces {
        if let Some(j) = rows.iter().position(|&x| x == r) {
            return Ok((k.narrow(0, j, 1)?, v.narrow(0, j, 1)?));
        }
    }
    candle_core::bail!("no keys/values recorded for row {r}")
}
