//! Training data: the benchmark TSVs in memory, pre-tokenized exactly as
//! [`crate::pipeline::Engine`] formats requests, and deterministic multi-task batches.

use super::loss::Targets;
use crate::data::preprocess::rgb_to_tensor;
use crate::data::prompt::{entail_ids, is_too_long};
use crate::data::tokenizer::{Tokenizer, BOS_ID};
use crate::data::tsv::{CaptionReader, VeReader};
use crate::task::{ofa_ve_normalize, ve_prompt, Label, Task};
use crate::task::{CAPTION_PROMPT, VE_ANSWERS, VE_MAX_WORDS};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use image::RgbImage;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::collections::{HashMap, HashSet};
use std::io::BufReader;
use std::path::Path;

/// One split of the benchmark, images de-duplicated.
#[derive(Debug, Clone, Default)]
pub struct RawSplit {
    pub images: Vec<RgbImage>,
    /// (image index, reference captions)
    pub captions: Vec<(usize, Vec<String>)>,
    /// (image index, hypothesis, label)
    pub entail: Vec<(usize, String, Label)>,
}

/// Read `snli_ve_{split}.tsv` and `caption_{split}.tsv` from `dir`, keeping the rows of the
/// first `max_images` distinct images of each file (all when `None`).
pub fn read_split(dir: &Path, split: &str, max_images: Option<usize>) -> Result<RawSplit> {
    let mut raw = RawSplit::default();
    let mut index: HashMap<String, usize> = HashMap::new();
    let limit = max_images.unwrap_or(usize::MAX);
    let open = |name: String| -> Result<BufReader<std::fs::File>> {
        let path = dir.join(&name);
        let f = std::fs::File::open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(BufReader::new(f))
    };
    let mut cap_images = 0;
    for row in CaptionReader::new(open(format!("caption_{split}.tsv"))?) {
        let row = row.with_context(|| format!("caption_{split}.tsv"))?;
        let i = match index.get(&row.image_id) {
            Some(&i) => i,
            None => {
                if cap_images >= limit {
                    break;
                }
                cap_images += 1;
                raw.images.push(row.image);
                index.insert(row.image_id.clone(), raw.images.len() - 1);
                raw.images.len() - 1
            }
        };
        raw.captions.push((i, row.captions));
    }
    let mut ve_images: HashSet<String> = HashSet::new();
    for row in VeReader::new(open(format!("snli_ve_{split}.tsv"))?) {
        let row = row.with_context(|| format!("snli_ve_{split}.tsv"))?;
        if !ve_images.contains(&row.image_id) {
            if ve_images.len() >= limit {
                break;
            }
            ve_images.insert(row.image_id.clone());
        }
        let i = match index.get(&row.image_id) {
            Some(&i) => i,
            None => {
                raw.images.push(row.image);
                index.insert(row.image_id.clone(), raw.images.len() - 1);
                raw.images.len() - 1
            }
        };
        raw.entail.push((i, row.hypothesis, row.label));
    }
    if raw.captions.is_empty() && raw.entail.is_empty() {
        bail!("split {split} in {} has no rows", dir.display());
    }
    Ok(raw)
}

/// One pre-tokenized training example.
#[derive(Debug, Clone)]
pub struct Example {
    pub task: Task,
    pub image: usize,
    /// Encoder text ids with BOS/EOS.
    pub enc_ids: Vec<u32>,
    /// Decoder input ids (starting with BOS).
    pub dec_ids: Vec<u32>,
    /// Target per decoder position.
    pub targets: Vec<Option<u32>>,
}

/// Caption target text as OFA feeds it to the BPE: a leading space, single spaces.
pub fn caption_text(caption: &str) -> String {
    format!(
        " {}",
        caption.split_whitespace().collect::<Vec<_>>().join(" ")
    )
}

/// Encoder ids of the caption task: `[0] + bpe(CAPTION_PROMPT) + [2]`.
pub fn caption_prompt_ids(tok: &Tokenizer) -> Result<Vec<u32>> {
    tok.encode_with_bos_eos(CAPTION_PROMPT)
}

/// Encoder ids (at most `max_len`) and decoder prefix (`[BOS] + prompt`) of an
/// entailment question, built as [`crate::pipeline::Engine::entail_prompt`] builds them
/// (no premise).
pub fn entail_prompt(
    tok: &Tokenizer,
    hypothesis: &str,
    max_len: usize,
) -> Result<(Vec<u32>, Vec<u32>)> {
    entail_ids(tok, hypothesis, None, max_len, BOS_ID)
}

/// Caption example: decoder input `[0] + caption`, targets `caption + [2]`.
pub fn caption_example(tok: &Tokenizer, caption: &str, image: usize) -> Result<Example> {
    let cap = tok.encode(&caption_text(caption))?;
    let mut dec_ids = vec![BOS_ID];
    dec_ids.extend_from_slice(&cap);
    let targets = cap
        .iter()
        .copied()
        .chain([crate::data::tokenizer::EOS_ID])
        .map(Some)
        .collect();
    Ok(Example {
        task: Task::Caption,
        image,
        enc_ids: caption_prompt_ids(tok)?,
        dec_ids,
        targets,
    })
}

/// Entailment example: decoder input `[0] + prompt + answer`, the loss only on the answer
/// token(s) (predicted from the last prompt position onwards). A prompt longer than
/// `max_len` tokens is an error that [`is_too_long`] recognises.
pub fn entail_example(
    tok: &Tokenizer,
    hypothesis: &str,
    label: Label,
    image: usize,
    max_len: usize,
) -> Result<Example> {
    let (enc_ids, prefix) = entail_prompt(tok, hypothesis, max_len)?;
    let answer = tok.encode(label.answer())?;
    let mut dec_ids = prefix.clone();
    dec_ids.extend_from_slice(&answer);
    let mut targets = vec![None; dec_ids.len()];
    for (k, &a) in answer.iter().enumerate() {
        targets[prefix.len() - 1 + k] = Some(a);
    }
    Ok(Example {
        task: Task::Entail,
        image,
        enc_ids,
        dec_ids,
        targets,
    })
}

/// Text the tokenizer is trained on: captions, both prompts (with the hypotheses) and the
/// answers.
pub fn tokenizer_texts(raw: &RawSplit) -> Vec<String> {
    let mut texts = vec![CAPTION_PROMPT.to_string()];
    texts.extend(VE_ANSWERS.iter().map(|a| a.to_string()));
    for (_, caps) in &raw.captions {
        texts.extend(caps.iter().map(|c| caption_text(c)));
    }
    for (_, hyp, label) in &raw.entail {
        let h = ofa_ve_normalize(hyp, VE_MAX_WORDS);
        texts.push(ve_prompt(&h, None));
        texts.push(label.answer().to_string());
    }
    texts
}

/// A tokenized data set.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub images: Vec<RgbImage>,
    pub examples: Vec<Example>,
    /// Rows left out because their text is longer than the model allows.
    pub skipped: usize,
}

impl Dataset {
    /// Examples of a split: up to `captions_per_image` captions of each caption row (all
    /// when `None`) and every entailment row. Texts longer than `max_len` tokens are
    /// skipped.
    pub fn build(
        tok: &Tokenizer,
        raw: &RawSplit,
        captions_per_image: Option<usize>,
        max_len: usize,
    ) -> Result<Self> {
        let mut examples = Vec::new();
        let mut skipped = 0;
        let mut per_image: HashMap<usize, usize> = HashMap::new();
        let cap_limit = captions_per_image.unwrap_or(usize::MAX);
        for (img, caps) in &raw.captions {
            for c in caps {
                let used = per_image.entry(*img).or_insert(0);
                if *used >= cap_limit {
                    break;
                }
                *used += 1;
                let ex = caption_example(tok, c, *img)?;
                if ex.enc_ids.len() > max_len || ex.dec_ids.len() > max_len {
                    skipped += 1;
                } else {
                    examples.push(ex);
                }
            }
        }
        for (img, hyp, label) in &raw.entail {
            let ex = match entail_example(tok, hyp, *label, *img, max_len) {
                Err(e) if is_too_long(&e) => {
                    skipped += 1;
                    continue;
                }
                r => r?,
            };
            if ex.dec_ids.len() > max_len {
                skipped += 1;
            } else {
                examples.push(ex);
            }
        }
        if examples.is_empty() {
            bail!("no training examples");
        }
        Ok(Self {
            images: raw.images.clone(),
            examples,
            skipped,
        })
    }
}

/// Order of the examples in `epoch`: a ChaCha8 shuffle seeded from `(seed, epoch)`.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ epoch.wrapping_add(1),
    );
    order.shuffle(&mut rng);
    order
}

/// Example indices of batch `step`: the next `batch_size` examples of the endless stream
/// of epochs, so a resumed run sees exactly what an uninterrupted one would.
pub fn batch_indices(n: usize, seed: u64, batch_size: usize, step: usize) -> Vec<usize> {
    let start = step * batch_size;
    let mut out = Vec::with_capacity(batch_size);
    let mut cached: Option<(u64, Vec<usize>)> = None;
    for k in start..start + batch_size {
        let epoch = (k / n) as u64;
        if cached.as_ref().map(|c| c.0) != Some(epoch) {
            cached = Some((epoch, epoch_order(n, seed, epoch)));
        }
        out.push(cached.as_ref().unwrap().1[k % n]);
    }
    out
}

/// A padded batch on the device.
pub struct Batch {
    pub images: Tensor,
    pub enc_ids: Tensor,
    pub enc_padding: Vec<Vec<bool>>,
    pub dec_ids: Tensor,
    pub dec_padding: Vec<Vec<bool>>,
    pub targets: Targets,
    /// Encoder text + decoder tokens (not padding) in the batch.
    pub n_tokens: usize,
}

fn pad_rows(rows: &[&[u32]], pad: u32) -> (Vec<u32>, Vec<Vec<bool>>, usize) {
    let l = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(rows.len() * l);
    let mut padding = Vec::with_capacity(rows.len());
    for r in rows {
        ids.extend(
            r.iter()
                .copied()
                .chain(std::iter::repeat_n(pad, l - r.len())),
        );
        padding.push((0..l).map(|j| j >= r.len()).collect());
    }
    (ids, padding, l)
}

/// Batch the examples `indices` of `ds`; captions get label smoothing
/// `caption_smoothing`, entailment answers none.
pub fn make_batch(
    ds: &Dataset,
    indices: &[usize],
    pad_id: u32,
    vocab_size: usize,
    caption_smoothing: f32,
    device: &Device,
) -> Result<Batch> {
    make_shard(
        ds,
        indices,
        None,
        pad_id,
        vocab_size,
        caption_smoothing,
        device,
    )
}

/// Examples of `indices` that have at least one target position: the row count that
/// weighs a batch's loss ([`Targets::part_of_batch`]).
pub fn active_rows(ds: &Dataset, indices: &[usize]) -> usize {
    indices
        .iter()
        .filter(|&&i| ds.examples[i].targets.iter().any(|t| t.is_some()))
        .count()
}

/// Encoder text + decoder tokens of the examples `indices`.
pub fn n_tokens(ds: &Dataset, indices: &[usize]) -> usize {
    indices
        .iter()
        .map(|&i| ds.examples[i].enc_ids.len() + ds.examples[i].dec_ids.len())
        .sum()
}

/// [`make_batch`] of a shard `indices` of a batch with `batch_active` rows with targets
/// ([`active_rows`] of the whole batch; `None`: the shard is the batch). The shard is
/// padded to its own longest row.
pub fn make_shard(
    ds: &Dataset,
    indices: &[usize],
    batch_active: Option<usize>,
    pad_id: u32,
    vocab_size: usize,
    caption_smoothing: f32,
    device: &Device,
) -> Result<Batch> {
    if indices.is_empty() {
        bail!("empty batch");
    }
    let exs: Vec<&Example> = indices.iter().map(|&i| &ds.examples[i]).collect();
    let images = exs
        .iter()
        .map(|e| rgb_to_tensor(&ds.images[e.image], device)?.unsqueeze(0))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let images = Tensor::cat(&images, 0)?;
    let b = exs.len();
    let enc: Vec<&[u32]> = exs.iter().map(|e| e.enc_ids.as_slice()).collect();
    let (enc_ids, enc_padding, le) = pad_rows(&enc, pad_id);
    let dec: Vec<&[u32]> = exs.iter().map(|e| e.dec_ids.as_slice()).collect();
    let (dec_ids, dec_padding, ld) = pad_rows(&dec, pad_id);
    let rows: Vec<Vec<Option<u32>>> = exs
        .iter()
        .map(|e| {
            let mut t = e.targets.clone();
            t.resize(ld, None);
            t
        })
        .collect();
    let smoothing: Vec<f32> = exs
        .iter()
        .map(|e| match e.task {
            Task::Caption => caption_smoothing,
            Task::Entail => 0.0,
        })
        .collect();
    let n_tokens = n_tokens(ds, indices);
    Ok(Batch {
        images,
        enc_ids: Tensor::from_vec(enc_ids, (b, le), device)?,
        enc_padding,
        dec_ids: Tensor::from_vec(dec_ids, (b, ld), device)?,
        dec_padding,
        targets: Targets::part_of_batch(&rows, &smoothing, vocab_size, batch_active, device)?,
        n_tokens,
    })
}
