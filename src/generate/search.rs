//! Greedy and beam search over `DecoderState`, with exits in every step.

use super::cost::Macs;
use super::decoder::{DecoderState, KvFill};
use super::encoder::EncoderRun;
use crate::exit::ExitPolicy;
use crate::model::infer::log_softmax_rows;
use crate::model::Model;
use candle_core::Result;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SearchConfig {
    pub beam: usize,
    /// At most this many tokens before the forced EOS.
    pub max_len: usize,
    /// EOS is banned before this many tokens.
    pub min_len: usize,
    /// Ban repeating any n-gram of this size (0 = off).
    pub no_repeat_ngram: usize,
    /// Final scores are divided by length^len_penalty.
    pub len_penalty: f32,
    pub kv_fill: KvFill,
}

impl Default for SearchConfig {
    /// OFA's captioning settings.
    fn default() -> Self {
        Self {
            beam: 5,
            max_len: 16,
            min_len: 1,
            no_repeat_ngram: 3,
            len_penalty: 1.0,
            kv_fill: KvFill::Propagate,
        }
    }
}

impl SearchConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.beam == 0 {
            anyhow::bail!("beam size must be at least 1");
        }
        if self.max_len == 0 {
            anyhow::bail!("maximum length must be at least 1");
        }
        if self.min_len > self.max_len {
            anyhow::bail!(
                "minimum length {} exceeds maximum length {}",
                self.min_len,
                self.max_len
            );
        }
        if !self.len_penalty.is_finite() {
            anyhow::bail!("length penalty must be finite");
        }
        Ok(())
    }
}

/// A finished sequence (BOS and EOS not included).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hypothesis {
    pub tokens: Vec<u32>,
    /// Sum of token log-probabilities (EOS included) divided by length^len_penalty.
    pub score: f32,
    /// Decoder layers run for each generated token, EOS included.
    pub token_exits: Vec<usize>,
}

/// Per-sample generation result.
#[derive(Debug, Clone)]
pub struct Generation {
    pub best: Hypothesis,
    pub macs: Macs,
}

/// Apply bans to one row of log-probabilities. `prefix` = BOS + generated tokens.
fn ban(lp: &mut [f32], prefix: &[u32], step: usize, cfg: &SearchConfig, model: &Model) {
    let eos = model.cfg.eos_id as usize;
    lp[model.cfg.pad_id as usize] = f32::NEG_INFINITY;
    if step < cfg.min_len {
        lp[eos] = f32::NEG_INFINITY;
    }
    if step >= cfg.max_len {
        let keep = lp[eos];
        lp.iter_mut().for_each(|v| *v = f32::NEG_INFINITY);
        lp[eos] = keep;
    }
    let n = cfg.no_repeat_ngram;
    if n > 0 && prefix.len() >= n {
        let tail = &prefix[prefix.len() - (n - 1)..];
        for w in prefix.windows(n) {
            if &w[..n - 1] == tail {
                lp[w[n - 1] as usize] = f32::NEG_INFINITY;
            }
        }
    }
}

fn normalised(score: f32, len: usize, penalty: f32) -> f32 {
    score / (len as f32).powf(penalty)
}

/// Greedy decoding for every sample of `enc`.
pub fn greedy(
    model: &Model,
    enc: &EncoderRun,
    policy: &dyn ExitPolicy,
    cfg: &SearchConfig,
) -> Result<Vec<Generation>> {
    let b = enc.memory.dim(0)?;
    let bos = model.cfg.bos_id;
    let eos = model.cfg.eos_id;
    let mut state = DecoderState::new(model, enc, policy, cfg.kv_fill, cfg.max_len)?;
    let mut live: Vec<usize> = (0..b).collect(); // sample per row
    let mut seqs: Vec<Vec<u32>> = vec![vec![bos]; b];
    let mut scores = vec![0f32; b];
    let mut exits: Vec<Vec<usize>> = vec![Vec::new(); b];
    let mut done: Vec<Option<Hypothesis>> = vec![None; b];
    for step in 0..=cfg.max_len {
        let tokens: Vec<u32> = live.iter().map(|&s| *seqs[s].last().unwrap()).collect();
        let out = state.step(&tokens)?;
        let lp = log_softmax_rows(&out.logits)?;
        let mut keep = Vec::new();
        for (r, &s) in live.iter().enumerate() {
            let mut row = lp[r].clone();
            ban(&mut row, &seqs[s], step, cfg, model);
            let (tok, v) = argmax(&row);
            scores[s] += v;
            exits[s].push(out.exit_layer[r]);
            if tok == eos {
                let len = seqs[s].len(); // generated tokens + EOS
                done[s] = Some(Hypothesis {
                    tokens: seqs[s][1..].to_vec(),
                    score: normalised(scores[s], len, cfg.len_penalty),
                    token_exits: exits[s].clone(),
                });
            } else {
                seqs[s].push(tok);
                keep.push(r);
            }
        }
        if keep.is_empty() {
            break;
        }
        state.reorder(&keep)?;
        live = keep.iter().map(|&r| live[r]).collect();
    }
    done.into_iter()
        .zip(state.macs)
        .enumerate()
        .map(|(s, (h, macs))| match h {
            Some(best) => Ok(Generation { best, macs }),
            None => candle_core::bail!("sample {s}: every token was banned before EOS"),
        })
        .collect()
}

fn argmax(v: &[f32]) -> (u32, f32) {
    let mut best = (0u32, f32::NEG_INFINITY);
    for (i, &x) in v.iter().enumerate() {
        if x > best.1 {
            best = (i as u32, x);
        }
    }
    best
}

struct Beam {
    sample: usize,
    tokens: Vec<u32>, // BOS + generated
    score: f32,
    exits: Vec<usize>,
}

/// Beam search (fairseq style: 2 x beam candidates per step, EOS candidates within the
/// top `beam` finish a hypothesis, a sample is done once it has `beam` finished ones).
pub fn beam_search(
    model: &Model,
    enc: &EncoderRun,
    policy: &dyn ExitPolicy,
    cfg: &SearchConfig,
) -> Result<Vec<Generation>> {
    let b = enc.memory.dim(0)?;
    let bos = model.cfg.bos_id;
    let eos = model.cfg.eos_id;
    let k = cfg.beam;
    let mut state = DecoderState::new(model, enc, policy, cfg.kv_fill, cfg.max_len)?;
    let mut beams: Vec<Beam> = (0..b)
        .map(|s| Beam {
            sample: s,
            tokens: vec![bos],
            score: 0.0,
            exits: Vec::new(),
        })
        .collect();
    let mut finished: Vec<Vec<Hypothesis>> = vec![Vec::new(); b];
    for step in 0..=cfg.max_len {
        let tokens: Vec<u32> = beams.iter().map(|bm| *bm.tokens.last().unwrap()).collect();
        let out = state.step(&tokens)?;
        let lp = log_softmax_rows(&out.logits)?;
        let mut next: Vec<Beam> = Vec::new();
        let mut origins: Vec<usize> = Vec::new();
        let mut r0 = 0;
        while r0 < beams.len() {
            let s = beams[r0].sample;
            let mut r1 = r0;
            while r1 < beams.len() && beams[r1].sample == s {
                r1 += 1;
            }
            // Candidates of this sample: (score, row, token), best first, ties by row then token.
            let mut cands: Vec<(f32, usize, u32)> = Vec::new();
            for r in r0..r1 {
                let mut row = lp[r].clone();
                ban(&mut row, &beams[r].tokens, step, cfg, model);
                for (tok, &v) in row.iter().enumerate() {
                    if v > f32::NEG_INFINITY {
                        cands.push((beams[r].score + v, r, tok as u32));
                    }
                }
            }
            let want = (2 * k).min(cands.len());
            let cmp = |a: &(f32, usize, u32), b: &(f32, usize, u32)| {
                b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2))
            };
            if want < cands.len() {
                cands.select_nth_unstable_by(want, cmp);
                cands.truncate(want);
            }
            cands.sort_by(cmp);
            let mut kept = 0;
            for (pos, &(score, r, tok)) in cands.iter().enumerate() {
                if finished[s].len() >= k {
                    break;
                }
                let mut exits = beams[r].exits.clone();
                exits.push(out.exit_layer[r]);
                if tok == eos {
                    if pos < k {
                        finished[s].push(Hypothesis {
                            tokens: beams[r].tokens[1..].to_vec(),
                            score: normalised(score, beams[r].tokens.len(), cfg.len_penalty),
                            token_exits: exits,
                        });
                    }
                } else if kept < k {
                    let mut tokens = beams[r].tokens.clone();
                    tokens.push(tok);
                    next.push(Beam {
                        sample: s,
                        tokens,
                        score,
                        exits,
                    });
                    origins.push(r);
                    kept += 1;
                }
            }
            if finished[s].len() >= k {
                // Done: drop this sample's new beams.
                while next.last().is_some_and(|bm| bm.sample == s) {
                    next.pop();
                    origins.pop();
                }
            }
            r0 = r1;
        }
        if next.is_empty() {
            break;
        }
        state.reorder(&origins)?;
        beams = next;
    }
    finished
        .into_iter()
        .zip(state.macs)
        .enumerate()
        .map(|(s, (hyps, macs))| {
            match hyps
                .into_iter()
                .reduce(|a, b| if b.score > a.score { b } else { a })
            {
                Some(best) => Ok(Generation { best, macs }),
                None => candle_core::bail!("sample {s}: every token was banned before EOS"),
            }
        })
        .collect()
}

/// Greedy for beam 1, beam search otherwise.
pub fn search(
    model: &Model,
    enc: &EncoderRun,
    policy: &dyn ExitPolicy,
    cfg: &SearchConfig,
) -> Result<Vec<Generation>> {
    if cfg.beam == 1 {
        greedy(model, enc, policy, cfg)
    } else {
        beam_search(model, enc, policy, cfg)
    }
}
