//! The encoder with MuE exits: image and text streams, each sample exiting on its own.

use super::cost::{self, Macs};
use super::rows::{signals, ExitRows};
use crate::exit::{row_similarity, ExitPolicy, LayerSignal, Site, Stream};
use crate::model::attn_block::Bias;
use crate::model::layers::{key_padding_bias, Mode};
use crate::model::{memory_padding, EncoderBiases, EncoderMode, EncoderPositions, Model};
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

/// A layer's signals: the similarity of each row's output to its input.
fn similarity(y: &Tensor, x: &Tensor, keep: Option<&Tensor>) -> Result<Vec<LayerSignal>> {
    Ok(signals(row_similarity(y, x, keep)?, None))
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
    let mut biases = EncoderBiases::new(model, &pos, cfg.encoder_mode == EncoderMode::Joint)?;
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

    let site_i = Site::Encoder(Stream::Image);
    let site_t = Site::Encoder(Stream::Text);
    let mut si = ExitRows::new(&img, layers, site_i)?;
    let mut st = ExitRows::new(&txt, layers, site_t)?;
    // The text rows' padding bias and similarity mask, rebuilt only when rows exit.
    let mut text_masks: Option<(Vec<usize>, Tensor, Tensor)> = None;
    for (layer_idx, layer) in model.encoder.layers.iter().enumerate() {
        let ai = si.active();
        let at = st.active();
        if ai.is_empty() && at.is_empty() {
            break;
        }
        match cfg.encoder_mode {
            EncoderMode::Decomposed => {
                if !ai.is_empty() {
                    let x = si.gather(&ai)?;
                    let y = layer.forward(&x, None, Some(biases.image_image(layer_idx)?), mode)?;
                    si.charge(&ai, |_| cost::encoder_layer(p as u64, p as u64, d, ffn));
                    let s = similarity(&y, &x, None)?;
                    si.update(&ai, layer_idx, &y, s, policy)?;
                }
                if !at.is_empty() {
                    let x = st.gather(&at)?;
                    if text_masks.as_ref().is_none_or(|(rows, _, _)| *rows != at) {
                        let pad = key_padding_bias(&select(padding, &at), dev)?;
                        text_masks = Some((at.clone(), pad, keep_mask(padding, &at, dev)?));
                    }
                    let (_, pad, keep) = text_masks.as_ref().unwrap();
                    let mask = biases.text_text(layer_idx)?.broadcast_add(pad)?;
                    let y = layer.forward(&x, None, Some(&mask), mode)?;
                    st.charge(&at, |i| {
                        let lt = text_len[i] as u64;
                        cost::encoder_layer(lt, lt, d, ffn)
                    });
                    let s = similarity(&y, &x, Some(keep))?;
                    st.update(&at, layer_idx, &y, s, policy)?;
                }
            }
            EncoderMode::Joint => {
                let bias = biases.layer(layer_idx)?;
                // Samples fall in three groups: both streams running, only image, only text.
                // A stream that exited keeps its frozen states as keys/values.
                let both: Vec<usize> = ai.iter().copied().filter(|&i| st.is_active(i)).collect();
                let only_i: Vec<usize> = ai.iter().copied().filter(|&i| !st.is_active(i)).collect();
                let only_t: Vec<usize> = at.iter().copied().filter(|&i| !si.is_active(i)).collect();
                if !both.is_empty() {
                    let xi = si.gather(&both)?;
                    let xt = st.gather(&both)?;
                    let x = Tensor::cat(&[&xi, &xt], 1)?;
                    let pad = memory_padding(&select(padding, &both), p);
                    let pad = key_padding_bias(&pad, dev)?;
                    let y = layer.forward_biases(
                        &x,
                        None,
                        &[bias.joint()?, Bias::Whole(&pad)],
                        mode,
                    )?;
                    let (yi, yt) = (y.narrow(1, 0, p)?, y.narrow(1, p, l)?);
                    // One joint layer per sample, counted once (on the image stream's rows).
                    si.charge(&both, |i| {
                        let n = (p + text_len[i]) as u64;
                        cost::encoder_layer(n, n, d, ffn)
                    });
                    let s_i = similarity(&yi, &xi, None)?;
                    let s_t = similarity(&yt, &xt, Some(&keep_mask(padding, &both, dev)?))?;
                    si.update(&both, layer_idx, &yi, s_i, policy)?;
                    st.update(&both, layer_idx, &yt, s_t, policy)?;
                }
                for (group, image_queries) in [(&only_i, true), (&only_t, false)] {
                    if group.is_empty() {
                        continue;
                    }
                    let xi = si.gather(group)?;
                    let xt = st.gather(group)?;
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
                    let (rows, keep) = if image_queries {
                        (&mut si, None)
                    } else {
                        (&mut st, Some(keep_mask(padding, group, dev)?))
                    };
                    rows.charge(group, |i| {
                        let nk = (p + text_len[i]) as u64;
                        let nq = if image_queries { p } else { text_len[i] } as u64;
                        cost::encoder_layer(nq, nk, d, ffn)
                    });
                    let s = similarity(&y, xq, keep.as_ref())?;
                    rows.update(group, layer_idx, &y, s, policy)?;
                }
            }
        }
    }
    for (i, m) in macs.iter_mut().enumerate() {
        m.executed += si.macs[i] + st.macs[i];
    }

    let rows: Vec<Tensor> = (0..b)
        .map(|i| Tensor::cat(&[si.state(i), st.state(i)], 1))
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
        image_similarity: si.similarities(),
        text_similarity: st.similarities(),
        image_exit: si.exit,
        text_exit: st.exit,
        macs,
        memory_len: text_len.iter().map(|&t| p + t).collect(),
    })
}
