//! `mue convert`: a Hugging Face OFA checkpoint directory -> a mue model directory
//! (`config.json` with the engine's config, `model.safetensors` in f32 with only the
//! tensors the engine reads, and optionally `tokenizer.json`).

use crate::data::tokenizer::Tokenizer;
use crate::model::{ofa, EncoderMode, Model};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use std::path::PathBuf;

#[derive(Debug, Clone, clap::Args)]
pub struct ConvertArgs {
    /// Hugging Face OFA directory (config.json with "model_type": "ofa", and
    /// model.safetensors or pytorch_model.bin).
    #[arg(long)]
    pub ofa: PathBuf,
    /// Output model directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Side of the square input image in pixels (480 for OFA's caption / SNLI-VE fine-tuning).
    #[arg(long, default_value_t = 480)]
    pub image_size: usize,
    /// Encoder mode: joint (standard OFA) or decomposed (MuE; needs MuE fine-tuned weights).
    #[arg(long, default_value = "joint", value_parser = parse_mode)]
    pub mode: EncoderMode,
    /// GPT-2 BPE vocabulary (vocab.json of the OFA directory); with --merges writes tokenizer.json.
    #[arg(long)]
    pub vocab: Option<PathBuf>,
    /// GPT-2 BPE merges (merges.txt of the OFA directory).
    #[arg(long)]
    pub merges: Option<PathBuf>,
}

pub(crate) fn parse_mode(s: &str) -> Result<EncoderMode> {
    match s {
        "joint" => Ok(EncoderMode::Joint),
        "decomposed" => Ok(EncoderMode::Decomposed),
        _ => bail!("unknown encoder mode '{s}' (expected joint or decomposed)"),
    }
}

/// What [`convert`] wrote.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    pub tensors: usize,
    pub parameters: usize,
    pub tokenizer: bool,
}

/// Converts `args.ofa` into `args.out`.
pub fn convert(args: &ConvertArgs) -> Result<ConvertReport> {
    let tokenizer = match (&args.vocab, &args.merges) {
        (Some(v), Some(m)) => Some(
            Tokenizer::from_gpt2_files(v, m, true)
                .with_context(|| format!("cannot build the tokenizer from {}", v.display()))?,
        ),
        (None, None) => None,
        _ => bail!("--vocab and --merges must be given together"),
    };
    let (cfg, model, used) =
        ofa::load_ofa_dir_with_tensors(&args.ofa, args.image_size, args.mode, &Device::Cpu)?;
    if let Some(tok) = &tokenizer {
        // OFA ids are positional (<mask>, <code_*>, <bin_*> follow the BPE entries), so
        // the tokenizer must cover the model's vocabulary exactly.
        if tok.vocab_size() != cfg.vocab_size {
            bail!(
                "the tokenizer (BPE files + OFA tokens) has {} tokens but the model's vocabulary is {}",
                tok.vocab_size(),
                cfg.vocab_size
            );
        }
    }
    drop(model);
    let parameters = used.values().map(|t| t.elem_count()).sum();
    Model::save_dir(&args.out, &cfg, &used)?;
    if let Some(tok) = &tokenizer {
        tok.save(args.out.join("tokenizer.json"))?;
    }
    Ok(ConvertReport {
        tensors: used.len(),
        parameters,
        tokenizer: tokenizer.is_some(),
    })
}

pub fn main(args: ConvertArgs) -> Result<()> {
    let r = convert(&args)?;
    println!(
        "converted {} -> {}: {} tensors, {:.1}M parameters{}",
        args.ofa.display(),
        args.out.display(),
        r.tensors,
        r.parameters as f64 / 1e6,
        if r.tokenizer { ", tokenizer.json" } else { "" }
    );
    Ok(())
}

pub use crate::model::ofa::is_hf_ofa_dir;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::layers::Mode;
    use candle_core::{DType, Tensor};

    fn fixture() -> PathBuf {
        PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/ofa-parity"
        ))
    }

    /// Tensors of the fixture that the text-output forward pass uses.
    fn text_forward_tensors() -> usize {
        let weights = crate::model::weights::load_state_dict(&fixture().join("model.safetensors"));
        let used = weights
            .unwrap()
            .into_keys()
            .filter(|k| crate::model::weights::used_for_text_output(k));
        used.count()
    }

    #[test]
    fn converted_fixture_reproduces_encoder() {
        let out_dir = tempfile::tempdir().unwrap();
        let out = out_dir.path().join("m");
        let o = candle_core::safetensors::load(fixture().join("outputs.safetensors"), &Device::Cpu)
            .unwrap();
        // The fixture's image side: patch_images is [batch, 3, side, side].
        let side = o["patch_images"].dims4().unwrap().3;
        let expected = text_forward_tensors();
        let args = ConvertArgs {
            ofa: fixture(),
            out: out.clone(),
            image_size: side,
            mode: EncoderMode::Joint,
            vocab: None,
            merges: None,
        };
        assert!(is_hf_ofa_dir(&fixture()));
        let r = convert(&args).unwrap();
        assert!(!r.tokenizer);
        assert_eq!(r.tensors, expected);
        assert!(!out.join("tokenizer.json").exists());
        assert!(!is_hf_ofa_dir(&out));

        let stored =
            candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
        assert_eq!(stored.len(), expected);
        assert!(stored.values().all(|t| t.dtype() == DType::F32));
        assert!(stored.contains_key("encoder.embed_tokens.weight"));
        assert!(!stored.contains_key("decoder.output_projection.weight"));
        assert!(!stored.keys().any(|k| crate::model::weights::is_buffer(k)));

        let model = Model::load_dir(&out, &Device::Cpu).unwrap();
        assert_eq!(model.cfg.image_size, side);
        let ids: Vec<Vec<u32>> = o["input_ids"]
            .to_vec2::<i64>()
            .unwrap()
            .into_iter()
            .map(|r| r.into_iter().map(|v| v as u32).collect())
            .collect();
        let padding: Vec<Vec<bool>> = ids
            .iter()
            .map(|r| r.iter().map(|&v| v == 1).collect())
            .collect();
        let ids = Tensor::new(ids, &Device::Cpu).unwrap();
        let enc = model
            .encode(&o["patch_images"], &ids, &padding, Mode::INFER)
            .unwrap();
        let err = crate::model::max_abs_diff(&enc.memory, &o["encoder_last_hidden_state"]).unwrap();
        assert!(err <= 6e-5, "encoder_last_hidden_state max abs error {err}");

        // --vocab without --merges is refused; a missing OFA directory is an error.
        let mut bad = args.clone();
        bad.vocab = Some(fixture().join("vocab.json"));
        assert!(convert(&bad).unwrap_err().to_string().contains("--merges"));
        // A tokenizer that does not cover the vocabulary exactly is refused (9 BPE
        // entries + <mask> + 9192 OFA tokens != the fixture's vocabulary).
        let tok_dir = tempfile::tempdir().unwrap();
        let vocab: std::collections::BTreeMap<&str, u32> = [
            "<s>", "<pad>", "</s>", "<unk>", ".", "\u{120}", "a", "b", "ab",
        ]
        .iter()
        .enumerate()
        .map(|(i, t)| (*t, i as u32))
        .collect();
        let vp = tok_dir.path().join("vocab.json");
        let mp = tok_dir.path().join("merges.txt");
        std::fs::write(&vp, serde_json::to_string(&vocab).unwrap()).unwrap();
        std::fs::write(&mp, "#version: 0.2\na b\n").unwrap();
        let mut bad = args.clone();
        bad.out = out_dir.path().join("with-tok");
        bad.vocab = Some(vp);
        bad.merges = Some(mp);
        let err = format!("{:#}", convert(&bad).unwrap_err());
        let vocab = model.cfg.vocab_size;
        assert!(err.contains(&format!("vocabulary is {vocab}")), "{err}");
        assert!(!bad.out.exists());
        let mut bad = args.clone();
        bad.ofa = out_dir.path().join("nope");
        assert!(convert(&bad).is_err());
    }
}
