//! The encoder with MuE exits: image and text streams, each sample exiting on its own.

use super::cost::{self, Macs};
use crate::exit::{row_similarity, ExitPolicy, LayerSignal, Site, Stream};
use crate::model::layers::{key_padding_bias, Mode};
use crate::model::{memory_padding, EncoderMode, EncoderPositions, Model};
use candle_core::{Result, Tensor};

/// Encoder result for a batch, with per-sample exits and costs.
#[derive(Debug, Clone)]
pub struct EncoderRun {
    /// `[b, p + l, d]` after the final layer norm (image tokens first).
    pub memory: Tensor,
    /// `true` at text padding.
    pub padding: Vec<Vec<bool>>,
    pub positions: EncoderPositions,
    /// Layers run by each sample's image / text stream (1..=encoder_layers).
    pub image_exit: Vec<usize>,
    pub text_exit: Vec<usize>,
    /// Similarity after each layer run, per sample (image / text stream).
    pub image_similarity: Vec<Vec<f32>>,
    pub text_similarity: Vec<Vec<f32>>,
    pub macs: Vec<Macs>,
    /// Real (unpadded) memory length of each sample.
    pub memory_len: Vec<usize>,
}

fn gather(rows: &[Tensor], idx: &[usize]) -> Result<Tensor> {
    if idx.len() == 1 {
        return Ok(rows[idx[0]].clone());
    }
    let parts: Vec<&Tensor> = idx.iter().map(|&i| &rows[i]).collect();
    Tensor::cat(&parts, 0)
}

fn select(padding: &[Vec<bool>], idx: &[usize]) -> Vec<Vec<bool>> {
    idx.iter().map(|&i| padding[i].clone()).collect()
}

fn keep_mask(padding: &[Vec<bool>], idx: &[usize], dev: &candle_core::Device) -> Result<Tensor> {
    let l = padding[0].len();
    let v: Vec<f32> = idx
        .iter()
        .flat_map(|&i| padding[i].iter().map(|&p| if p { 0.0 } else { 1.0 }))
        .collect();
    Tensor::from_vec(v, (idx.len(), l), dev)
}

struct StreamState {
    rows: Vec<Tensor>,
    active: Vec<bool>,
    exit: Vec<usize>,
    history: Vec<Vec<LayerSignal>>,
}

impl StreamState {
    fn new(x: &Tensor, layers: usize) -> Result<Self> {
        let b = x.dim(0)?;
        Ok(Self {
            rows: (0..b).map(|i| x.narrow(0, i, 1)).collect::<Result<_>>()?,
            active: vec![true; b],
            exit: vec![layers; b],
            history: vec![Vec::new(); b],
        })
    }

    /// Store new states for `idx`, record similarities and apply the policy.
    #[allow(clippy::too_many_arguments)]
    fn update(
        &mut self,
        idx: &[usize],
        y: &Tensor,
        sims: &[f32],
        layer: usize,
        layers: usize,
        site: Site,
        policy: &dyn ExitPolicy,
    ) -> Result<()> {
        for (j, &i) in idx.iter().enumerate() {
            self.rows[i] = y.narrow(0, j, 1)?;
            self.history[i].push(LayerSignal {
                similarity: sims[j],
                prediction: None,
            });
            if layer + 1 < layers && policy.should_exit(site, &self.history[i], layers) {
                self.active[i] = false;
                self.exit[i] = layer + 1;
            }
        }
        Ok(())
    }

    fn active_idx(&self) -> Vec<usize> {
        (0..self.active.len()).filter(|&i| self.active[i]).collect()
    }
}

/// Run the encoder with exits. `ids`: `[b, l]` padded text ids (BOS/EOS included),
/// `padding[i][j]` true at padding; `images`: `[b, 3, s, s]` preprocessed.
pub fn run_encoder(
    model: &Model,
    images: &Tensor,
    ids: &Tensor,
    padding: &[Vec<bool>],
    policy: &dyn ExitPolicy,
) -> Result<EncoderRun> {
    let mode = Mode::INFER;
    let cfg = &model.cfg;
    let dev = &model.device;
    let layers = cfg.encoder_layers;
    let (b, l) = ids.dims2()?;
    let img = model.embed_image(images, mode)?;
    let txt = model.embed_text(ids, padding, mode)?;
    let p = img.dim(1)?;
    let pos = model.encoder_positions(l, mode)?;
    let biases = model.encoder_biases(&pos)?;
    let d = cfg.d_model as u64;
    let ffn = cfg.encoder_ffn_dim as u64;

    let text_len: Vec<usize> = padding
        .iter()
        .map(|r| r.iter().filter(|&&x| !x).count())
        .collect();
    let trunk_macs = model.encoder.image_trunk.macs(cfg.image_size);
    let mut macs = vec![Macs::default(); b];
    for (m, &lt) in macs.iter_mut().zip(&text_len) {
        let (pu, lu) = (p as u64, lt as u64);
        m.fixed(trunk_macs);
        m.fixed(pu * cfg.image_feature_dim() as u64 * d);
        // The absolute position bias is computed once for all layers.
        m.fixed(cost::position_bias(pu + lu, pu + lu, d));
        let full_layer = match cfg.encoder_mode {
            EncoderMode::Joint => cost::encoder_layer(pu + lu, pu + lu, d, ffn),
            EncoderMode::Decomposed => {
                cost::encoder_layer(pu, pu, d, ffn) + cost::encoder_layer(lu, lu, d, ffn)
            }
        };
        m.full += full_layer * layers as u64;
    }

    let mut si = StreamState::new(&img, layers)?;
    let mut st = StreamState::new(&txt, layers)?;
    let site_i = Site::Encoder(Stream::Image);
    let site_t = Site::Encoder(Stream::Text);
    for (layer_idx, (layer, bias)) in model.encoder.layers.iter().zip(&biases).enumerate() {
        let ai = si.active_idx();
        let at = st.active_idx();
        if ai.is_empty() && at.is_empty() {
            break;
        }
        match cfg.encoder_mode {
            EncoderMode::Decomposed => {
                if !ai.is_empty() {
                    let x = gather(&si.rows, &ai)?;
                    let y = layer.forward(&x, None, Some(&bias.image_image), mode)?;
                    let sims = row_similarity(&y, &x, None)?;
                    si.update(&ai, &y, &sims, layer_idx, layers, site_i, policy)?;
                    for &i in &ai {
                        macs[i].executed += cost::encoder_layer(p as u64, p as u64, d, ffn);
                    }
                }
                if !at.is_empty() {
                    let x = gather(&st.rows, &at)?;
                    let pad = select(padding, &at);
                    let mask = bias
                        .text_text
                        .broadcast_add(&key_padding_bias(&pad, dev)?)?;
                    let y = layer.forward(&x, None, Some(&mask), mode)?;
                    let sims = row_similarity(&y, &x, Some(&keep_mask(padding, &at, dev)?))?;
                    st.update(&at, &y, &sims, layer_idx, layers, site_t, policy)?;
                    for &i in &at {
                        let lt = text_len[i] as u64;
                        macs[i].executed += cost::encoder_layer(lt, lt, d, ffn);
                    }
                }
            }
            EncoderMode::Joint => {
                // Samples fall in three groups: both streams running, only image, only text.
                // A stream that exited keeps its frozen states as keys/values.
                let both: Vec<usize> = ai.iter().copied().filter(|i| st.active[*i]).collect();
                let only_i: Vec<usize> = ai.iter().copied().filter(|i| !st.active[*i]).collect();
                let only_t: Vec<usize> = at.iter().copied().filter(|i| !si.active[*i]).collect();
                if !both.is_empty() {
                    let xi = gather(&si.rows, &both)?;
                    let xt = gather(&st.rows, &both)?;
                    let x = Tensor::cat(&[&xi, &xt], 1)?;
                    let pad = memory_padding(&select(padding, &both), p);
                    let mask = bias.joint()?.broadcast_add(&key_padding_bias(&pad, dev)?)?;
                    let y = layer.forward(&x, None, Some(&mask), mode)?;
                    let (yi, yt) = (y.narrow(1, 0, p)?, y.narrow(1, p, l)?);
                    let sims_i = row_similarity(&yi, &xi, None)?;
                    let sims_t = row_similarity(&yt, &xt, Some(&keep_mask(padding, &both, dev)?))?;
                    si.update(&both, &yi, &sims_i, layer_idx, layers, site_i, policy)?;
                    st.update(&both, &yt, &sims_t, layer_idx, layers, site_t, policy)?;
                    for &i in &both {
                        let n = (p + text_len[i]) as u64;
                        macs[i].executed += cost::encoder_layer(n, n, d, ffn);
                    }
                }
                for (group, image_queries) in [(&only_i, true), (&only_t, false)] {
                    if group.is_empty() {
                        continue;
                    }
                    let xi = gather(&si.rows, group)?;
                    let xt = gather(&st.rows, group)?;
                    let kv = Tensor::cat(&[&xi, &xt], 1)?;
                    let pad = memory_padding(&select(padding, group), p);
                    let key_mask = key_padding_bias(&pad, dev)?;
                    let (xq, bq) = if image_queries {
                        (&xi, Tensor::cat(&[&bias.image_image, &bias.image_text], 3)?)
                    } else {
                        (&xt, Tensor::cat(&[&bias.text_image, &bias.text_text], 3)?)
                    };
                    let y =
                        layer.forward(xq, Some(&kv), Some(&bq.broadcast_add(&key_mask)?), mode)?;
                    if image_queries {
                        let sims = row_similarity(&y, xq, None)?;
                        si.update(group, &y, &sims, layer_idx, layers, site_i, policy)?;
                    } else {
                        let sims = row_similarity(&y, xq, Some(&keep_mask(padding, group, dev)?))?;
                        st.update(group, &y, &sims, layer_idx, layers, site_t, policy)?;
                    }
                    for &i in group.iter() {
                        let nk = (p + text_len[i]) as u64;
                        let nq = if image_queries {
                            p as u64
                        } else {
                            text_len[i] as u64
                        };
                        macs[i].executed += cost::encoder_layer(nq, nk, d, ffn);
                    }
                }
            }
        }
    }

    let rows: Vec<Tensor> = (0..b)
        .map(|i| Tensor::cat(&[&si.rows[i], &st.rows[i]], 1))
        .collect::<Result<_>>()?;
    let memory = model
        .encoder
        .layer_norm
        .forward(&Tensor::cat(&rows, 0)?, mode)?;
    let mem_padding = memory_padding(padding, p);
    Ok(EncoderRun {
        memory,
        padding: mem_padding,
        positions: pos,
        image_similarity: si
            .history
            .iter()
            .map(|h| h.iter().map(|x| x.similarity).collect())
            .collect(),
        text_similarity: st
            .history
            .iter()
            .map(|h| h.iter().map(|x| x.similarity).collect())
            .collect(),
        image_exit: si.exit,
        text_exit: st.exit,
        macs,
        memory_len: text_len.iter().map(|&t| p + t).collect(),
    })
}
