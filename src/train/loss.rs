//! The layer-wise task loss of MuE (section 4 of the design notes):
//!
//! `L = sum_l CE(W_out * LN_final(h_l), target)` over decoder layers `l = 1..L`, with the
//! shared final layer norm and tied projection, weight 1 per layer, label smoothing as
//! in fairseq, restricted to target positions.

use crate::model::layers::Mode;
use crate::model::Model;
use candle_core::{DType, Device, Result, Tensor, D};

pub use crate::run_meta::LossKind;

/// Target positions of a batch of decoder rows, flattened over `[b, t]`.
#[derive(Debug, Clone)]
pub struct Targets {
    /// `u32 [n]`: indices into the flattened `[b * t]` positions.
    pub positions: Tensor,
    /// `u32 [n]`: the target token at each position.
    pub tokens: Tensor,
    /// `f32 [n]`: weight of the NLL term, `(1 - eps - eps / (V - 1)) * w`.
    nll_coeff: Tensor,
    /// `f32 [n]`: weight of the smoothing term, `eps / (V - 1) * w`.
    smooth_coeff: Tensor,
    /// Number of target positions.
    pub n: usize,
    /// Target tokens on the host, in position order.
    pub host_tokens: Vec<u32>,
}

impl Targets {
    /// `rows[i][j]` is the target at decoder position `j` of row `i` (all rows the same
    /// length `t`), `smoothing[i]` the label smoothing of row `i`. Every row with targets
    /// weighs the same: a row's token losses are averaged, then rows are averaged.
    pub fn new(
        rows: &[Vec<Option<u32>>],
        smoothing: &[f32],
        vocab_size: usize,
        device: &Device,
    ) -> Result<Self> {
        Self::part_of_batch(rows, smoothing, vocab_size, None, device)
    }

    /// [`Targets::new`] for `rows` that are one shard of a larger batch with
    /// `batch_active` rows with targets (`None`: `rows` are the whole batch): rows are
    /// weighted `1 / (count * batch_active)`, so the losses of a batch's shards sum to the
    /// loss of the whole batch.
    pub fn part_of_batch(
        rows: &[Vec<Option<u32>>],
        smoothing: &[f32],
        vocab_size: usize,
        batch_active: Option<usize>,
        device: &Device,
    ) -> Result<Self> {
        if rows.len() != smoothing.len() {
            candle_core::bail!(
                "{} target rows but {} smoothings",
                rows.len(),
                smoothing.len()
            );
        }
        let t = rows.first().map(|r| r.len()).unwrap_or(0);
        if rows.iter().any(|r| r.len() != t) {
            candle_core::bail!("target rows must have the same length");
        }
        if vocab_size < 2 {
            candle_core::bail!("vocabulary too small for label smoothing");
        }
        let active = rows
            .iter()
            .filter(|r| r.iter().any(|x| x.is_some()))
            .count();
        if active == 0 {
            candle_core::bail!("batch has no target positions");
        }
        let active = match batch_active {
            Some(n) if n < active => candle_core::bail!(
                "a shard has {active} rows with targets, more than its batch's {n}"
            ),
            Some(n) => n,
            None => active,
        };
        let (mut pos, mut tok, mut cn, mut cs) = (vec![], vec![], vec![], vec![]);
        for (i, (row, &eps)) in rows.iter().zip(smoothing).enumerate() {
            let count = row.iter().filter(|x| x.is_some()).count();
            if count == 0 {
                continue;
            }
            if !(0.0..1.0).contains(&eps) {
                candle_core::bail!("label smoothing must be in [0, 1), got {eps}");
            }
            let w = 1.0 / (count as f64 * active as f64);
            let eps_i = eps as f64 / (vocab_size as f64 - 1.0);
            for (j, target) in row.iter().enumerate() {
                if let Some(target) = target {
                    if *target as usize >= vocab_size {
                        candle_core::bail!("target token {target} outside the vocabulary");
                    }
                    pos.push((i * t + j) as u32);
                    tok.push(*target);
                    cn.push(((1.0 - eps as f64 - eps_i) * w) as f32);
                    cs.push((eps_i * w) as f32);
                }
            }
        }
        let n = pos.len();
        Ok(Self {
            positions: Tensor::from_vec(pos, n, device)?,
            tokens: Tensor::from_vec(tok.clone(), n, device)?,
            nll_coeff: Tensor::from_vec(cn, n, device)?,
            smooth_coeff: Tensor::from_vec(cs, n, device)?,
            n,
            host_tokens: tok,
        })
    }
}

/// States `[n, d]` of a decoder layer's output `[b, t, d]` at the target positions.
fn gather_positions(h: &Tensor, targets: &Targets) -> Result<Tensor> {
    let (b, t, d) = h.dims3()?;
    h.reshape((b * t, d))?.index_select(&targets.positions, 0)
}

/// Label-smoothed cross-entropy of one decoder layer's output `[b, t, d]`: a scalar.
pub fn layer_loss(model: &Model, h: &Tensor, targets: &Targets, mode: Mode) -> Result<Tensor> {
    let x = gather_positions(h, targets)?;
    let lp = model.log_probs(&x, mode)?; // [n, V]
    let nll = lp
        .gather(&targets.tokens.unsqueeze(1)?, 1)?
        .squeeze(1)?
        .neg()?;
    let smooth = lp.sum(D::Minus1)?.neg()?;
    let per = ((nll * &targets.nll_coeff)? + (smooth * &targets.smooth_coeff)?)?;
    per.sum_all()
}

/// The loss and its per-layer parts.
#[derive(Debug, Clone)]
pub struct LossOutput {
    /// Scalar to differentiate.
    pub total: Tensor,
    /// Loss of each decoder layer included (layer 1..L for layer-wise, L for final-only).
    pub per_layer: Vec<Tensor>,
}

/// Task loss over decoder states as returned by [`Model::decode`] (index 0 = embeddings,
/// which carry no loss).
pub fn task_loss(
    model: &Model,
    hidden: &[Tensor],
    targets: &Targets,
    kind: LossKind,
    mode: Mode,
) -> Result<LossOutput> {
    if hidden.len() < 2 {
        candle_core::bail!("decoder states must include at least one layer");
    }
    let layers: &[Tensor] = match kind {
        LossKind::LayerWise => &hidden[1..],
        LossKind::FinalOnly => &hidden[hidden.len() - 1..],
    };
    let per_layer = layers
        .iter()
        .map(|h| layer_loss(model, h, targets, mode))
        .collect::<Result<Vec<_>>>()?;
    let mut total = per_layer[0].clone();
    for l in &per_layer[1..] {
        total = (total + l)?;
    }
    Ok(LossOutput { total, per_layer })
}

/// Number of target positions where the argmax of the layer's prediction is the target.
pub fn correct_tokens(model: &Model, h: &Tensor, targets: &Targets) -> Result<usize> {
    let x = gather_positions(h, targets)?;
    let pred = model
        .logits(&x, Mode::INFER)?
        .argmax(D::Minus1)?
        .to_dtype(DType::U32)?
        .to_vec1::<u32>()?;
    Ok(pred
        .iter()
        .zip(&targets.host_tokens)
        .filter(|(a, b)| a == b)
        .count())
}
