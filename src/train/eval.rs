//! Validation during and after training: visual-entailment accuracy at full depth (through
//! the same scoring path as inference) and teacher-forced caption token accuracy.

use super::data::{caption_example, entail_prompt, make_batch, Dataset, RawSplit};
use super::loss::correct_tokens;
use crate::data::preprocess::rgb_to_tensor;
use crate::data::prompt::answer_ids;
use crate::data::tokenizer::Tokenizer;
use crate::exit::MuePolicy;
use crate::generate::{self, Input};
use crate::model::layers::Mode;
use crate::model::Model;
use crate::pipeline::{Engine, EntailRequest};
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::Path;

const EVAL_BATCH: usize = 32;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EvalResult {
    /// Fraction of entailment questions answered correctly (full depth).
    pub ve_accuracy: f64,
    pub ve_n: usize,
    /// Teacher-forced next-token accuracy on the first reference caption (EOS included).
    pub caption_token_accuracy: f64,
    pub caption_tokens: usize,
}

/// Evaluate a model in memory on the first `limit` entailment rows and caption rows of
/// `raw` (images must already have the model's size).
pub fn evaluate(
    model: &Model,
    tok: &Tokenizer,
    raw: &RawSplit,
    limit: usize,
) -> Result<EvalResult> {
    let answers = answer_ids(tok)?;
    let never = MuePolicy::never();
    let rows: Vec<_> = raw.entail.iter().take(limit).collect();
    let mut correct = 0;
    for chunk in rows.chunks(EVAL_BATCH) {
        let mut inputs = Vec::with_capacity(chunk.len());
        let mut prefixes = Vec::with_capacity(chunk.len());
        for (img, hyp, _) in chunk {
            let (ids, prefix) = entail_prompt(tok, hyp, model.cfg.max_text_len())?;
            inputs.push(Input {
                image: rgb_to_tensor(&raw.images[*img], &model.device)?,
                text_ids: ids,
            });
            prefixes.push(prefix);
        }
        let res = generate::classify(model, &inputs, &prefixes, &answers, &never)?;
        for (r, (_, _, label)) in res.iter().zip(chunk) {
            if r.best == label.index() {
                correct += 1;
            }
        }
    }
    // Caption tokens, teacher-forced.
    let mut ds = Dataset {
        images: raw.images.clone(),
        examples: Vec::new(),
        skipped: 0,
    };
    for (img, caps) in raw.captions.iter().take(limit) {
        ds.examples.push(caption_example(tok, &caps[0], *img)?);
    }
    let (mut tok_correct, mut tok_total) = (0, 0);
    let idx: Vec<usize> = (0..ds.examples.len()).collect();
    for chunk in idx.chunks(EVAL_BATCH) {
        let b = make_batch(
            &ds,
            chunk,
            model.cfg.pad_id,
            model.cfg.vocab_size,
            0.0,
            &model.device,
        )?;
        let enc = model.encode(&b.images, &b.enc_ids, &b.enc_padding, Mode::INFER)?;
        let hidden = model.decode(&b.dec_ids, Some(&b.dec_padding), &enc, Mode::INFER)?;
        tok_correct += correct_tokens(model, hidden.last().unwrap(), &b.targets)?;
        tok_total += b.targets.n;
    }
    Ok(EvalResult {
        ve_accuracy: if rows.is_empty() {
            0.0
        } else {
            correct as f64 / rows.len() as f64
        },
        ve_n: rows.len(),
        caption_token_accuracy: if tok_total == 0 {
            0.0
        } else {
            tok_correct as f64 / tok_total as f64
        },
        caption_tokens: tok_total,
    })
}

/// Full-depth visual-entailment accuracy of a saved model directory on a benchmark split,
/// end to end through [`Engine::entail`] (image preprocessing included). Returns
/// (accuracy, number of questions).
pub fn entail_accuracy_dir(
    model_dir: &Path,
    data_dir: &Path,
    split: &str,
    limit: Option<usize>,
) -> Result<(f64, usize)> {
    let engine = Engine::load(model_dir)?;
    let raw = super::data::read_split(data_dir, split, None)?;
    let rows: Vec<_> = raw
        .entail
        .iter()
        .take(limit.unwrap_or(usize::MAX))
        .collect();
    let never = MuePolicy::never();
    let mut correct = 0;
    for chunk in rows.chunks(EVAL_BATCH) {
        let reqs: Vec<EntailRequest> = chunk
            .iter()
            .map(|(img, hyp, _)| EntailRequest {
                image: image::DynamicImage::ImageRgb8(raw.images[*img].clone()),
                hypothesis: hyp.clone(),
                premise: None,
            })
            .collect();
        let out = engine.entail(&reqs, &never)?;
        for (o, (_, _, label)) in out.iter().zip(chunk) {
            if o.label == label.as_str() {
                correct += 1;
            }
        }
    }
    if rows.is_empty() {
        anyhow::bail!("split {split} has no entailment rows");
    }
    Ok((correct as f64 / rows.len() as f64, rows.len()))
}
