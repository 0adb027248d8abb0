//! `mue run`: one image and text through the model with exits, beside full depth.

use super::{ExitArgs, Task, TaskThresholds};
use crate::data::preprocess::load_image;
use crate::exit::MuePolicy;
use crate::generate::{KvFill, SearchConfig};
use crate::pipeline::{CaptionOutput, Engine, EntailOutput, EntailRequest};
use anyhow::{bail, Result};
use image::DynamicImage;
use serde::Serialize;
use std::path::PathBuf;

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Model directory (config.json, model.safetensors, tokenizer.json) [default:
    /// $MUE_MODEL, ./models/default, or models/default beside the executable].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Image file (PNG or JPEG).
    #[arg(long)]
    pub image: PathBuf,
    #[arg(long, value_enum)]
    pub task: Task,
    /// Hypothesis (entailment).
    #[arg(long)]
    pub text: Option<String>,
    /// Optional premise caption (entailment).
    #[arg(long)]
    pub premise: Option<String>,
    #[command(flatten)]
    pub exits: ExitArgs,
    #[command(flatten)]
    pub load: super::load::LoadArgs,
    /// Beam size for captioning.
    #[arg(long, default_value_t = 5)]
    pub beam: usize,
    #[arg(long, default_value_t = 16)]
    pub max_len: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Output {
    Caption {
        mue: CaptionOutput,
        full: CaptionOutput,
    },
    Entail {
        mue: EntailOutput,
        full: EntailOutput,
    },
}

/// Run a request twice (with exits, at full depth). Warm the engine up before the first call
/// ([`Engine::warm_up`]): otherwise one-time costs land in the first timed run only and make
/// the exits look slower than full depth.
pub fn execute(
    engine: &Engine,
    args: &RunArgs,
    image: DynamicImage,
    policy: &MuePolicy,
) -> Result<Output> {
    let full = MuePolicy::never();
    match args.task {
        Task::Caption => {
            let search = SearchConfig {
                beam: args.beam,
                max_len: args.max_len,
                kv_fill: args.exits.kv_fill.parse::<KvFill>()?,
                ..SearchConfig::default()
            };
            let imgs = [image];
            let mue = engine.caption(&imgs, policy, &search)?.remove(0);
            let full = engine.caption(&imgs, &full, &search)?.remove(0);
            Ok(Output::Caption { mue, full })
        }
        Task::Entail => {
            let Some(text) = args.text.clone() else {
                bail!("--task entail needs --text with the hypothesis");
            };
            let req = [EntailRequest {
                image,
                hypothesis: text,
                premise: args.premise.clone(),
            }];
            let mue = engine.entail(&req, policy)?.remove(0);
            let full = engine.entail(&req, &full)?.remove(0);
            Ok(Output::Entail { mue, full })
        }
    }
}

pub fn print_output(out: &Output) {
    match out {
        Output::Caption { mue, full } => {
            println!("caption (MuE):   {}", mue.caption);
            println!("caption (full):  {}", full.caption);
            println!(
                "exits: image stream layer {}/{}, text stream layer {}/{}, tokens {:?} of {}",
                mue.exits.image_layer,
                mue.exits.encoder_layers,
                mue.exits.text_layer,
                mue.exits.encoder_layers,
                mue.exits.token_layers,
                mue.exits.decoder_layers
            );
            print_cost(&mue.cost, &full.cost);
        }
        Output::Entail { mue, full } => {
            let p = |o: &EntailOutput| {
                format!(
                    "{} (yes {:.3}, no {:.3}, maybe {:.3})",
                    o.label, o.probabilities[0], o.probabilities[1], o.probabilities[2]
                )
            };
            println!("answer (MuE):    {}", p(mue));
            println!("answer (full):   {}", p(full));
            println!(
                "exits: image stream layer {}/{}, text stream layer {}/{}, decoder layer {}/{}",
                mue.exits.image_layer,
                mue.exits.encoder_layers,
                mue.exits.text_layer,
                mue.exits.encoder_layers,
                mue.exits.token_layers[0],
                mue.exits.decoder_layers
            );
            print_cost(&mue.cost, &full.cost);
        }
    }
}

fn print_cost(mue: &crate::generate::Cost, full: &crate::generate::Cost) {
    println!(
        "saved: {:.1}% of multiply-adds ({:.2} vs {:.2} MMAC), {:.1}% of layers; wall {:.1} ms vs {:.1} ms full depth",
        100.0 * mue.saved_fraction,
        mue.macs_executed as f64 / 1e6,
        mue.macs_full as f64 / 1e6,
        100.0 * mue.layer_reduction,
        mue.wall_ms,
        full.wall_ms
    );
}

pub fn main(args: RunArgs) -> Result<()> {
    let model = super::model_dir(args.model.as_deref())?;
    let engine = Engine::load_with(&model, &args.load.options())?;
    let image = DynamicImage::ImageRgb8(load_image(&args.image)?);
    let base = TaskThresholds::for_model(&model)?.get(args.task);
    let policy = args.exits.policy(base)?;
    engine.warm_up()?;
    let out = execute(&engine, &args, image, &policy)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_output(&out);
    }
    Ok(())
}
