//! `mue demo`: the default model on the shipped example images, MuE beside full depth.

use super::{run, ExitArgs, Task, TaskThresholds};
use crate::data::benchmark::{make_image_example, showcase, Split};
use crate::data::preprocess::load_image;
use crate::data::tokenizer::Tokenizer;
use crate::model::{Config, EncoderMode, ImageEmbedder, Model};
use crate::pipeline::Engine;
use anyhow::{Context, Result};
use image::DynamicImage;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// One shipped example: an image and a hypothesis with its label.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Example {
    pub image: String,
    pub hypothesis: String,
    pub label: String,
    pub captions: Vec<String>,
}

pub use crate::paths::{examples_dir, find_examples_dir};

/// Write `n` test-split examples of benchmark `version` (PNG + examples.json) to `dir`.
pub fn write_examples(dir: &Path, version: u32, n: usize, image_size: u32) -> Result<()> {
    let shown = showcase(version, 0, Split::Test, n, image_size)?;
    std::fs::create_dir_all(dir)?;
    let mut list = Vec::new();
    for (i, ex) in shown.into_iter().enumerate() {
        let name = format!("example_{i}.png");
        crate::data::render(&ex.scene)
            .save(dir.join(&name))
            .with_context(|| format!("cannot write {name}"))?;
        list.push(Example {
            image: name,
            hypothesis: ex.hypothesis,
            label: ex.label.as_str().to_string(),
            captions: ex.captions,
        });
    }
    std::fs::write(
        dir.join("examples.json"),
        serde_json::to_string_pretty(&list)? + "\n",
    )?;
    Ok(())
}

/// The engine a command runs and its thresholds: with `random_weights` a RANDOM model and
/// the default thresholds (with a note on stderr saying what is `doing` with it), else the
/// model in `--model` (or the default model, see [`super::model_dir`]) with its
/// calibrated thresholds. A model directory that does not exist or does not load is an
/// error, never a silent fall back to random weights.
pub fn load_engine(
    model: Option<&Path>,
    random_weights: bool,
    doing: &str,
    opts: &crate::pipeline::LoadOptions,
) -> Result<(Engine, TaskThresholds)> {
    if random_weights {
        eprintln!(
            "note: --random-weights: {doing} a RANDOM model (predictions are meaningless, exits and costs are real)"
        );
        let mut engine = random_engine(0)?;
        crate::model::precision::apply(&mut engine.model, opts.precision)?;
        return Ok((engine, TaskThresholds::default()));
    }
    let dir = super::model_dir(model)?;
    let engine = Engine::load_with(&dir, opts)
        .with_context(|| format!("cannot load the model in {}", dir.display()))?;
    Ok((engine, TaskThresholds::for_model(&dir)?))
}

/// A random model with a tokenizer trained on benchmark text: what the demo runs when no
/// trained model is present.
pub fn random_engine(seed: u64) -> Result<Engine> {
    let (cfg, tokenizer) = random_parts()?;
    let (model, _) = Model::random(&cfg, seed, &candle_core::Device::Cpu)?;
    Engine::new(model, tokenizer, Path::new("<random>"))
}

/// Write a random model directory (config, weights, tokenizer), for tests and trials.
pub fn write_random_model(dir: &Path, seed: u64) -> Result<()> {
    let (cfg, tokenizer) = random_parts()?;
    let (_, tensors) = Model::random(&cfg, seed, &candle_core::Device::Cpu)?;
    Model::save_dir(dir, &cfg, &tensors)?;
    tokenizer.save(dir.join("tokenizer.json"))
}

fn random_parts() -> Result<(Config, Tokenizer)> {
    let texts: Vec<String> = (0..200u64)
        .flat_map(|i| {
            let ex = make_image_example("demo", i, 64);
            let mut t = ex.captions.clone();
            t.extend(ex.ve.iter().map(|v| v.hypothesis.clone()));
            t
        })
        .chain([
            crate::task::CAPTION_PROMPT.to_string(),
            " does the image describe \" a \"? yes no maybe".to_string(),
        ])
        .collect();
    let tokenizer = Tokenizer::train(texts.into_iter(), 400)?;
    let cfg = Config {
        vocab_size: tokenizer.vocab_size(),
        d_model: 128,
        encoder_layers: 6,
        decoder_layers: 6,
        encoder_heads: 4,
        decoder_heads: 4,
        encoder_ffn_dim: 512,
        decoder_ffn_dim: 512,
        max_positions: 256,
        token_bucket_size: 64,
        image_bucket_size: 42,
        attn_scale_factor: 2.0,
        layer_norm_eps: 1e-5,
        image_size: 64,
        image_embedder: ImageEmbedder::Patch { patch: 8 },
        encoder_mode: EncoderMode::Decomposed,
        entangle_image_positions: false,
        bos_id: 0,
        pad_id: 1,
        eos_id: 2,
    };
    Ok((cfg, tokenizer))
}

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Model directory [default: $MUE_MODEL, ./models/default, or models/default beside
    /// the executable].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Run a RANDOM model instead (predictions are meaningless; for trials).
    #[arg(long, conflicts_with = "model")]
    pub random_weights: bool,
    /// Number of examples to run.
    #[arg(long, default_value_t = 3)]
    pub examples: usize,
    #[command(flatten)]
    pub exits: ExitArgs,
    #[arg(long)]
    pub json: bool,
}

pub fn main(args: DemoArgs) -> Result<()> {
    let (engine, thresholds) = load_engine(
        args.model.as_deref(),
        args.random_weights,
        "running",
        &Default::default(),
    )?;
    let found = find_examples_dir()?;
    eprintln!("mue: examples {} ({})", found.path.display(), found.source);
    let dir = found.path;
    let list: Vec<Example> = serde_json::from_str(
        &std::fs::read_to_string(dir.join("examples.json"))
            .with_context(|| format!("cannot read {}", dir.join("examples.json").display()))?,
    )?;
    engine.warm_up()?;
    let mut outputs = Vec::new();
    for ex in list.iter().take(args.examples) {
        let image = DynamicImage::ImageRgb8(load_image(dir.join(&ex.image))?);
        for task in [Task::Caption, Task::Entail] {
            let run_args = run::RunArgs {
                model: args.model.clone(),
                image: dir.join(&ex.image),
                task,
                text: Some(ex.hypothesis.clone()),
                premise: None,
                exits: args.exits.clone(),
                load: Default::default(),
                beam: 5,
                max_len: 16,
                json: args.json,
            };
            let policy = args.exits.policy(thresholds.get(task))?;
            let out = run::execute(&engine, &run_args, image.clone(), &policy)?;
            if args.json {
                outputs.push(serde_json::json!({"image": ex.image, "task": task, "result": out}));
            } else {
                match task {
                    Task::Caption => {
                        println!("== {} (reference: \"{}\")", ex.image, ex.captions[0]);
                        println!("-- caption");
                    }
                    Task::Entail => {
                        println!("-- entailment: \"{}\" (gold: {})", ex.hypothesis, ex.label)
                    }
                }
                run::print_output(&out);
            }
        }
        if !args.json {
            println!();
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&outputs)?);
    }
    Ok(())
}
