//! Classification by generation: score a fixed set of candidate answers after a prompt in
//! one teacher-forced decoder pass, with one exit decision per row.

use super::cost::{self, Macs};
use super::encoder::EncoderRun;
use super::rows::{signals, ExitRows};
use crate::exit::{row_similarity, ExitPolicy, Prediction, Site};
use crate::model::layers::{causal_bias, key_padding_bias, Mode};
use crate::model::{DecoderSelfBiases, Model};
use candle_core::{DType, IndexOp, Result, Tensor};

/// Scores of the candidates for one sample.
#[derive(Debug, Clone)]
pub struct Scored {
    /// Log-probability of each candidate (restricted to the candidates' tokens).
    pub scores: Vec<f32>,
    pub best: usize,
    /// Decoder layers run (one exit per row).
    pub decoder_exit: usize,
    pub macs: Macs,
}

/// Score `candidates` (token sequences) after each sample's decoder prefix (`[BOS] + prompt`).
/// When every candidate is one token, one row per sample suffices; otherwise one row per
/// sample and candidate.
pub fn score_candidates(
    model: &Model,
    enc: &EncoderRun,
    prefixes: &[Vec<u32>],
    candidates: &[Vec<u32>],
    policy: &dyn ExitPolicy,
) -> Result<Vec<Scored>> {
    let b = enc.memory.dim(0)?;
    if prefixes.len() != b {
        candle_core::bail!("{} decoder prefixes for {b} samples", prefixes.len());
    }
    if candidates.is_empty() || candidates.iter().any(|c| c.is_empty()) {
        candle_core::bail!("candidate answers must be non-empty");
    }
    let single = candidates.iter().all(|c| c.len() == 1);
    let mut rows: Vec<RowSpec> = Vec::new();
    for (sample, p) in prefixes.iter().enumerate() {
        if single {
            rows.push(RowSpec {
                sample,
                candidate: None,
                ids: p.clone(),
                scored: vec![p.len() - 1],
            });
        } else {
            for (c, cand) in candidates.iter().enumerate() {
                let mut ids = p.clone();
                ids.extend_from_slice(&cand[..cand.len() - 1]);
                rows.push(RowSpec {
                    sample,
                    candidate: Some(c),
                    ids,
                    scored: (p.len() - 1..p.len() - 1 + cand.len()).collect(),
                });
            }
        }
    }
    let (states, exits, macs) = run_rows(model, enc, &rows, candidates, policy)?;
    let mut out: Vec<Scored> = (0..b)
        .map(|_| Scored {
            scores: vec![0.0; candidates.len()],
            best: 0,
            decoder_exit: 0,
            macs: enc.macs[0],
        })
        .collect();
    for (s, o) in out.iter_mut().enumerate() {
        o.macs = enc.macs[s];
        o.macs += macs[s];
    }
    // Every row's scored positions in one vocabulary projection (one pass over the
    // embedding matrix for the batch, not one per row).
    let positions: Vec<Tensor> = rows
        .iter()
        .zip(&states)
        .map(|(row, h)| h.i((.., row.scored[0]..row.scored[0] + row.scored.len(), ..)))
        .collect::<Result<_>>()?;
    let all = if positions.is_empty() {
        Vec::new()
    } else {
        // f32 under --precision int8 too: a few positions per row (~0.3% of OFA-Tiny's
        // entailment MACs), and the answers' logits differ by less than int8's rounding.
        model
            .logits_f32(&Tensor::cat(&positions, 1)?, Mode::INFER)?
            .squeeze(0)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()? // [scored positions of all rows, V]
    };
    let mut start = 0;
    for (r, row) in rows.iter().enumerate() {
        let s = &row.sample;
        let lg = &all[start..start + row.scored.len()];
        start += row.scored.len();
        out[*s].decoder_exit = out[*s].decoder_exit.max(exits[r]);
        match &row.candidate {
            None => {
                let allowed: Vec<f32> = candidates.iter().map(|c| lg[0][c[0] as usize]).collect();
                let lse = log_sum_exp(&allowed);
                out[*s].scores = allowed.iter().map(|v| v - lse).collect();
            }
            Some(c) => {
                // At each position only tokens continuing some candidate's shared prefix count.
                let cand_toks = &candidates[*c];
                let mut total = 0.0;
                for (j, &tok) in cand_toks.iter().enumerate() {
                    let mut allowed: Vec<u32> = candidates
                        .iter()
                        .filter(|o| o.len() > j && o[..j] == cand_toks[..j])
                        .map(|o| o[j])
                        .collect();
                    allowed.sort_unstable();
                    allowed.dedup();
                    let vals: Vec<f32> = allowed.iter().map(|&t| lg[j][t as usize]).collect();
                    total += lg[j][tok as usize] - log_sum_exp(&vals);
                }
                out[*s].scores[*c] = total;
            }
        }
    }
    for o in out.iter_mut() {
        o.best = o
            .scores
            .iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |acc, (i, &v)| if v > acc.1 { (i, v) } else { acc },
            )
            .0;
    }
    // Candidate logits: one vocabulary projection per scored position.
    let vocab = model.cfg.vocab_size as u64;
    let d = model.cfg.d_model as u64;
    for row in &rows {
        out[row.sample]
            .macs
            .fixed(row.scored.len() as u64 * d * vocab);
    }
    Ok(out)
}

fn log_sum_exp(v: &[f32]) -> f32 {
    let m = v.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    m + v.iter().map(|x| (x - m).exp()).sum::<f32>().ln()
}

/// The answer tokens allowed at each scored position of a row: the tokens continuing some
/// candidate's prefix, as the final score normalises over (for one-token answers, the
/// answers themselves).
fn allowed_tokens(candidates: &[Vec<u32>], cand: Option<usize>) -> Vec<Vec<u32>> {
    let Some(c) = cand else {
        let mut a: Vec<u32> = candidates.iter().map(|c| c[0]).collect();
        a.sort_unstable();
        a.dedup();
        return vec![a];
    };
    let cand_toks = &candidates[c];
    (0..cand_toks.len())
        .map(|j| {
            let mut a: Vec<u32> = candidates
                .iter()
                .filter(|o| o.len() > j && o[..j] == cand_toks[..j])
                .map(|o| o[j])
                .collect();
            a.sort_unstable();
            a.dedup();
            a
        })
        .collect()
}

/// Softmax of logits restricted to the answers: the distribution the answer is chosen from.
pub fn answer_distribution(logits: &[f32]) -> Vec<f32> {
    let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = logits.iter().map(|v| (v - m).exp()).collect();
    let sum: f32 = e.iter().sum();
    e.iter().map(|x| x / sum).collect()
}

/// Intermediate prediction of one row (`h`: `[1, t, d]`) over its scored positions, from
/// the same distribution the answer is chosen from (the fair form for the entropy, margin
/// and patience baselines): a softmax over the answer tokens allowed at each position
/// (`allowed[j]`), not over the whole vocabulary. Only those rows of the output
/// projection are computed. With several scored positions (multi-token candidates) the row
/// is as uncertain as its least certain position: the largest entropy, the smallest
/// margin, and the top-1 answer token of the first scored position.
fn row_prediction(
    model: &Model,
    h: &Tensor,
    scored: &[usize],
    allowed: &[Vec<u32>],
) -> Result<Prediction> {
    let hs = h.i((.., scored[0]..scored[0] + scored.len(), ..))?;
    let x = model
        .decoder
        .layer_norm
        .forward(&hs, Mode::INFER)?
        .squeeze(0)?; // [k, d]
    let mut out: Option<Prediction> = None;
    for (j, toks) in allowed.iter().enumerate() {
        let ids = Tensor::from_slice(toks, toks.len(), &model.device)?;
        let w = model.embed_tokens.index_select(&ids, 0)?; // [a, d]
        let lg = x
            .narrow(0, j, 1)?
            .matmul(&w.t()?)?
            .squeeze(0)?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        let mut q = Prediction::from_probs(&answer_distribution(&lg));
        q.top1 = toks[q.top1 as usize];
        out = Some(match out {
            None => q,
            Some(o) => Prediction {
                top1: o.top1,
                entropy: o.entropy.max(q.entropy),
                margin: o.margin.min(q.margin),
            },
        });
    }
    out.ok_or_else(|| candle_core::Error::Msg("row without scored positions".into()))
}

/// One teacher-forced decoder row: a sample's prefix, followed by one candidate's tokens
/// but its last when candidates are scored one row each.
struct RowSpec {
    sample: usize,
    /// The candidate this row scores; `None`: the row scores every (one-token) candidate.
    candidate: Option<usize>,
    /// Decoder input ids, BOS first.
    ids: Vec<u32>,
    /// Positions whose next-token logits score the candidate(s).
    scored: Vec<usize>,
}

/// Masks and memory of the rows still running, in row order.
struct ActiveRows {
    rows: Vec<usize>,
    /// Key padding bias of the rows' own tokens.
    pad: Tensor,
    /// Cross-attention bias with the memory's padding.
    cross_bias: Tensor,
    memory: Tensor,
    /// 1 at the scored positions (the similarity's mask).
    keep: Tensor,
}

/// Teacher-forced decoder over rows with exits. Returns each row's final state `[1, t, d]`
/// (before the final layer norm), its exit layer, and work per sample.
fn run_rows(
    model: &Model,
    enc: &EncoderRun,
    rows: &[RowSpec],
    candidates: &[Vec<u32>],
    policy: &dyn ExitPolicy,
) -> Result<(Vec<Tensor>, Vec<usize>, Vec<Macs>)> {
    let mode = Mode::INFER;
    let dev = &model.device;
    let cfg = &model.cfg;
    let layers = cfg.decoder_layers;
    let n = rows.len();
    let t = rows.iter().map(|r| r.ids.len()).max().unwrap_or(1);
    if t > cfg.max_positions {
        candle_core::bail!(
            "decoder input of {t} tokens exceeds the model's {} positions",
            cfg.max_positions
        );
    }
    let mut ids = Vec::with_capacity(n * t);
    let mut pad = Vec::with_capacity(n);
    let mut keep = Vec::with_capacity(n * t);
    for row in rows {
        ids.extend(
            row.ids
                .iter()
                .copied()
                .chain(std::iter::repeat_n(cfg.pad_id, t - row.ids.len())),
        );
        pad.push((0..t).map(|j| j >= row.ids.len()).collect::<Vec<bool>>());
        keep.extend((0..t).map(|j| if row.scored.contains(&j) { 1f32 } else { 0.0 }));
    }
    let ids = Tensor::from_vec(ids, (n, t), dev)?;
    let keep = Tensor::from_vec(keep, (n, t), dev)?;
    let pos = model.decoder_positions(t, mode)?;
    let mut self_biases = DecoderSelfBiases::new(model, &pos)?;
    let causal = causal_bias(t, dev)?;
    let cross_bias = model.decoder_cross_bias(&pos, &enc.positions)?;
    let sample_idx: Vec<u32> = rows.iter().map(|r| r.sample as u32).collect();
    let memory = enc
        .memory
        .index_select(&Tensor::from_vec(sample_idx, n, dev)?, 0)?;
    let mem_pad: Vec<Vec<bool>> = rows.iter().map(|r| enc.padding[r.sample].clone()).collect();

    let d = cfg.d_model as u64;
    let ffn = cfg.decoder_ffn_dim as u64;
    let mut macs = vec![Macs::default(); enc.memory.dim(0)?];
    // Work of one layer for row `r`: its tokens, and its sample's cross keys/values.
    let layer_macs = |r: usize| {
        let (tl, nm) = (
            rows[r].ids.len() as u64,
            enc.memory_len[rows[r].sample] as u64,
        );
        cost::decoder_layer(tl, tl, nm, d, ffn) + cost::cross_key_value(nm, d)
    };
    for (r, row) in rows.iter().enumerate() {
        let (tl, nm) = (row.ids.len() as u64, enc.memory_len[row.sample] as u64);
        macs[row.sample].full += layer_macs(r) * layers as u64;
        macs[row.sample].fixed(cost::position_bias(tl, tl, d) + cost::position_bias(tl, nm, d));
    }
    let site = Site::Decoder {
        step: 0,
        max_len: t,
    };
    let mut run = ExitRows::new(&model.embed_decoder(&ids, mode)?, layers, site)?;
    // What depends on the active rows only, rebuilt when rows exit.
    let mut of_rows: Option<ActiveRows> = None;
    for (l, layer) in model.decoder.layers.iter().enumerate() {
        let active = run.active();
        if active.is_empty() {
            break;
        }
        if of_rows.as_ref().is_none_or(|a| a.rows != active) {
            let idx = Tensor::from_vec(
                active.iter().map(|&r| r as u32).collect::<Vec<_>>(),
                active.len(),
                dev,
            )?;
            let pad_a: Vec<Vec<bool>> = active.iter().map(|&r| pad[r].clone()).collect();
            let mpad_a: Vec<Vec<bool>> = active.iter().map(|&r| mem_pad[r].clone()).collect();
            of_rows = Some(ActiveRows {
                pad: key_padding_bias(&pad_a, dev)?,
                cross_bias: cross_bias.broadcast_add(&key_padding_bias(&mpad_a, dev)?)?,
                memory: memory.index_select(&idx, 0)?,
                keep: keep.index_select(&idx, 0)?,
                rows: active.clone(),
            });
        }
        let a = of_rows.as_ref().unwrap();
        let x = run.gather(&active)?;
        let self_bias = self_biases
            .layer(l)?
            .broadcast_add(&causal)?
            .broadcast_add(&a.pad)?;
        let cb = &a.cross_bias;
        let (k, v) = layer.cross_key_value(&a.memory, Mode::INFER)?;
        let (y, _) = layer.forward(&x, None, Some(&self_bias), (&k, &v), Some(cb), mode)?;
        run.charge(&active, layer_macs);
        // No decision follows the last layer.
        let signals = if l + 1 == layers {
            Vec::new()
        } else {
            let preds = if policy.needs_predictions() {
                let mut p = Vec::with_capacity(active.len());
                for (j, &r) in active.iter().enumerate() {
                    let allowed = allowed_tokens(candidates, rows[r].candidate);
                    let outputs: usize = allowed.iter().map(|a| a.len()).sum();
                    run.charge(&[r], |_| outputs as u64 * d);
                    let h = y.narrow(0, j, 1)?;
                    p.push(row_prediction(model, &h, &rows[r].scored, &allowed)?);
                }
                Some(p)
            } else {
                None
            };
            let sims = row_similarity(&y, &x, Some(&a.keep))?;
            signals(sims, preds)
        };
        run.update(&active, l, &y, signals, policy)?;
    }
    for (r, row) in rows.iter().enumerate() {
        macs[row.sample].executed += run.macs[r];
    }
    let exit = run.exit.clone();
    Ok((run.into_states(), exit, macs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_distribution_sums_to_one_over_the_answers() {
        for lg in [
            vec![0.3f32, -1.2, 2.5],
            vec![40.0, 40.0, -40.0],
            vec![-1e3, -1e3 + 1.0, -1e3 - 1.0],
        ] {
            let p = answer_distribution(&lg);
            assert_eq!(p.len(), 3);
            let sum: f32 = p.iter().sum();
            assert!((sum - 1.0).abs() < 1e-6, "{p:?}");
            assert!(p.iter().all(|&x| (0.0..=1.0).contains(&x)));
            // Same order as the logits: the answer chosen is the distribution's top-1.
            let top = Prediction::from_probs(&p).top1 as usize;
            let best = (0..3).fold(0, |b, i| if lg[i] > lg[b] { i } else { b });
            assert_eq!(top, best);
            assert!(Prediction::from_probs(&p).entropy <= 3f32.ln() + 1e-6);
        }
    }

    #[test]
    fn allowed_tokens_follow_the_candidates_prefixes() {
        let one = vec![vec![7u32], vec![3], vec![9]];
        assert_eq!(allowed_tokens(&one, None), vec![vec![3, 7, 9]]);
        // " maybe" as two tokens sharing nothing with the others; " no" and " not" share 5.
        let multi = vec![vec![5u32], vec![5, 8], vec![4, 2]];
        assert_eq!(allowed_tokens(&multi, Some(1)), vec![vec![4, 5], vec![8]]);
        assert_eq!(allowed_tokens(&multi, Some(2)), vec![vec![4, 5], vec![2]]);
        assert_eq!(allowed_tokens(&multi, Some(0)), vec![vec![4, 5]]);
    }
}
