//! Request-level API: a model directory (weights + tokenizer) answering captioning and
//! visual-entailment requests on raw images and text, with exits.

use crate::data::preprocess::{check_dimensions, ofa_image_tensor};
use crate::data::prompt::{answer_ids, encoder_ids, entail_ids};
use crate::data::tokenizer::Tokenizer;
use crate::exit::ExitPolicy;
use crate::generate::{self, Cost, Exits, Input, SearchConfig};
use crate::model::precision::{self, Precision};
use crate::model::Model;
use crate::task::{ofa_caption_postprocess, Label, CAPTION_PROMPT};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use image::DynamicImage;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Longest accepted request text, in characters (before tokenization).
pub use crate::task::MAX_TEXT_CHARS;

/// A loaded model with its tokenizer. Immutable; share it across threads.
pub struct Engine {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub dir: PathBuf,
    answers: Vec<Vec<u32>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaptionOutput {
    pub caption: String,
    pub tokens: Vec<u32>,
    pub exits: Exits,
    pub cost: Cost,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EntailOutput {
    /// entailment / contradiction / neutral
    pub label: String,
    pub answer: String,
    /// Probability of each label in the order yes / no / maybe (restricted to the answers).
    pub probabilities: [f32; 3],
    pub exits: Exits,
    pub cost: Cost,
}

/// One visual entailment request.
#[derive(Debug, Clone)]
pub struct EntailRequest {
    pub image: DynamicImage,
    pub hypothesis: String,
    pub premise: Option<String>,
}

/// Where and how a model directory is loaded.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// Weights converted at load (f32: as stored, the default and the reference).
    pub precision: Precision,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            precision: Precision::F32,
        }
    }
}

impl Engine {
    /// Load `config.json`, `model.safetensors` and `tokenizer.json` from `dir` (f32, CPU).
    pub fn load(dir: &Path) -> Result<Self> {
        Engine::load_with(dir, &LoadOptions::default())
    }

    /// [`Engine::load`] on `opts.device`, with the weights converted to `opts.precision`.
    pub fn load_with(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let mut model = Model::load_dir(dir, &opts.device)?;
        precision::apply(&mut model, opts.precision)?;
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tok_path)
            .with_context(|| format!("model directory {} needs tokenizer.json", dir.display()))?;
        Engine::new(model, tokenizer, dir)
    }

    pub fn new(model: Model, tokenizer: Tokenizer, dir: &Path) -> Result<Self> {
        if tokenizer.vocab_size() > model.cfg.vocab_size {
            bail!(
                "tokenizer has {} tokens but the model's vocabulary has {}",
                tokenizer.vocab_size(),
                model.cfg.vocab_size
            );
        }
        let answers = answer_ids(&tokenizer)?;
        Ok(Self {
            model,
            tokenizer,
            dir: dir.to_path_buf(),
            answers,
        })
    }

    /// Resize and normalise an image to the model's input.
    pub fn image_tensor(&self, image: &DynamicImage) -> Result<Tensor> {
        check_dimensions(image.width(), image.height())?;
        if image.width() == 0 || image.height() == 0 {
            bail!("image is empty (0 pixels)");
        }
        Ok(ofa_image_tensor(
            image,
            self.model.cfg.image_size as u32,
            &self.model.device,
        )?)
    }

    /// One untimed full-depth pass of each task (a mid-gray image of the model's size, two
    /// caption tokens): the first call of a process pays one-time costs (the thread pool's
    /// start, the first touch of the weights and buffers), which would otherwise land in the
    /// first timed run or the first request served.
    pub fn warm_up(&self) -> Result<()> {
        let s = self.model.cfg.image_size as u32;
        let image =
            DynamicImage::ImageRgb8(image::RgbImage::from_pixel(s, s, image::Rgb([128; 3])));
        let full = crate::exit::MuePolicy::never();
        let search = SearchConfig {
            beam: 1,
            max_len: 2,
            ..SearchConfig::default()
        };
        self.caption(std::slice::from_ref(&image), &full, &search)
            .context("warm-up caption")?;
        let req = EntailRequest {
            image,
            hypothesis: "there is a shape".into(),
            premise: None,
        };
        self.entail(&[req], &full).context("warm-up entailment")?;
        Ok(())
    }

    /// Caption each image.
    pub fn caption(
        &self,
        images: &[DynamicImage],
        policy: &dyn ExitPolicy,
        search: &SearchConfig,
    ) -> Result<Vec<CaptionOutput>> {
        let prompt = encoder_ids(
            &self.tokenizer,
            CAPTION_PROMPT,
            self.model.cfg.max_text_len(),
        )?;
        let inputs = images
            .iter()
            .map(|img| {
                Ok(Input {
                    image: self.image_tensor(img)?,
                    text_ids: prompt.clone(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let results = generate::caption(&self.model, &inputs, policy, search)?;
        results
            .into_iter()
            .map(|r| {
                let text = self.tokenizer.decode(&r.tokens)?;
                Ok(CaptionOutput {
                    caption: ofa_caption_postprocess(&text),
                    tokens: r.tokens,
                    exits: r.exits,
                    cost: r.cost,
                })
            })
            .collect()
    }

    /// Encoder text and decoder prefix of an entailment request (OFA's prompt; the decoder
    /// is fed `[BOS] + prompt` and scores the answer).
    pub fn entail_prompt(
        &self,
        hypothesis: &str,
        premise: Option<&str>,
    ) -> Result<(Vec<u32>, Vec<u32>)> {
        let cfg = &self.model.cfg;
        entail_ids(
            &self.tokenizer,
            hypothesis,
            premise,
            cfg.max_text_len(),
            cfg.bos_id,
        )
    }

    /// Visual entailment: score " yes" / " no" / " maybe".
    pub fn entail(
        &self,
        requests: &[EntailRequest],
        policy: &dyn ExitPolicy,
    ) -> Result<Vec<EntailOutput>> {
        let mut inputs = Vec::with_capacity(requests.len());
        let mut prefixes = Vec::with_capacity(requests.len());
        for (i, r) in requests.iter().enumerate() {
            let (ids, prefix) = self
                .entail_prompt(&r.hypothesis, r.premise.as_deref())
                .with_context(|| format!("request {i}"))?;
            inputs.push(Input {
                image: self.image_tensor(&r.image)?,
                text_ids: ids,
            });
            prefixes.push(prefix);
        }
        let results = generate::classify(&self.model, &inputs, &prefixes, &self.answers, policy)?;
        Ok(results
            .into_iter()
            .map(|r| {
                let label = Label::from_index(r.best).expect("one score per answer");
                let p: Vec<f32> = r.scores.iter().map(|s| s.exp()).collect();
                EntailOutput {
                    label: label.as_str().to_string(),
                    answer: label.answer().trim().to_string(),
                    probabilities: [p[0], p[1], p[2]],
                    exits: r.exits,
                    cost: r.cost,
                }
            })
            .collect())
    }
}
