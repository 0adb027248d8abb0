//! Parity with the reference OFA implementation (Hugging Face port, float32, CPU) on the
//! random-weight fixture in `tests/fixtures/ofa-parity` (see its README for inputs,
//! outputs and tolerances). Run with `--nocapture` to see the measured errors. Sizes
//! (image side, grid, layers, buckets, tensor counts) are read from the fixture's
//! config.json and tensors. The full float32 `pytorch_model.bin` (37 MB) is not in the
//! repository: `MUE_OFA_FIXTURE_FULL=/path/to/pytorch_model.bin` adds its parity run.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor, D};
use mue::exit::MuePolicy;
use mue::generate::{run_encoder, DecoderState, KvFill};
use mue::model::layers::Mode;
use mue::model::{ofa, position, weights, EncoderMode, Model};

// Tolerances recommended by the fixture README (max abs difference per tensor).
const TOL_FEATURES: f32 = 6e-4;
const TOL_ENCODER: f32 = 6e-5;
const TOL_DECODER: f32 = 3e-5;
const TOL_LOGITS: f32 = 8e-6;

fn fixture_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/ofa-parity"
    ))
}

fn outputs() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture_dir().join("outputs.safetensors"), &Device::Cpu).unwrap()
}

/// The fixture's image side: `patch_images` is [batch, 3, side, side].
fn image_side(out: &HashMap<String, Tensor>) -> usize {
    let (_, _, h, w) = out["patch_images"].dims4().unwrap();
    assert_eq!(h, w, "patch_images must be square");
    h
}

/// The fixture's config.json, read as our config at the fixture's image side.
fn fixture_config() -> mue::model::Config {
    ofa::read_hf_config(&fixture_dir(), image_side(&outputs()), EncoderMode::Joint).unwrap()
}

/// The fixture model from a state dict (tied embeddings checked).
fn build(params: HashMap<String, Tensor>) -> Model {
    weights::check_tied_embeddings(&params).unwrap();
    ofa::build_with_used(&fixture_config(), params, &Device::Cpu)
        .unwrap()
        .0
}

/// The fixture model from one of its weight files.
fn load(file: &Path) -> Model {
    build(weights::load_state_dict(file).unwrap())
}

/// The fixture's full float32 `pytorch_model.bin`, when `MUE_OFA_FIXTURE_FULL` gives it.
fn full_fixture() -> Option<PathBuf> {
    let p = PathBuf::from(std::env::var_os("MUE_OFA_FIXTURE_FULL")?);
    assert!(
        p.is_file(),
        "MUE_OFA_FIXTURE_FULL={} is not a file",
        p.display()
    );
    Some(p)
}

/// Tensors of the fixture that the text-output forward pass uses (counted from the weight
/// file, not assumed).
fn text_forward_tensors() -> usize {
    let all = weights::load_state_dict(&fixture_dir().join("model.safetensors")).unwrap();
    all.into_keys()
        .filter(|k| weights::used_for_text_output(k))
        .count()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    mue::model::max_abs_diff(a, b).unwrap()
}

/// Records the max abs error of one tensor and fails above `tol`.
struct Report {
    file: String,
    rows: Vec<(String, f32, f32)>,
}

impl Report {
    fn new(file: &str) -> Self {
        Report {
            file: file.to_string(),
            rows: Vec::new(),
        }
    }

    fn worst(&mut self, name: &str, err: f32, tol: f32) {
        if let Some(r) = self.rows.iter_mut().find(|r| r.0 == name) {
            r.1 = r.1.max(err);
        } else {
            self.rows.push((name.to_string(), err, tol));
        }
    }

    fn check(&mut self, name: &str, ours: &Tensor, reference: &Tensor, tol: f32) {
        let err = max_abs(ours, reference);
        self.worst(name, err, tol);
    }

    fn finish(&self) {
        println!("OFA parity ({}):", self.file);
        for (name, err, tol) in &self.rows {
            println!("  {name:<34} max abs {err:.3e} (tolerance {tol:.0e})");
        }
        for (name, err, tol) in &self.rows {
            assert!(
                err <= tol && err.is_finite(),
                "{}: {name} max abs error {err:.3e} > {tol:.0e}",
                self.file
            );
        }
    }
}

struct Inputs {
    images: Tensor,
    ids: Tensor,
    padding: Vec<Vec<bool>>,
    dec_ids: Vec<Vec<u32>>,
    dec_padding: Vec<Vec<bool>>,
}

fn ids_u32(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|r| r.into_iter().map(|v| v as u32).collect())
        .collect()
}

fn inputs(out: &HashMap<String, Tensor>) -> Inputs {
    let ids = ids_u32(&out["input_ids"]);
    let padding = ids
        .iter()
        .map(|r| r.iter().map(|&v| v == 1).collect())
        .collect();
    let dec_ids = ids_u32(&out["decoder_input_ids"]);
    let dec_padding = out["decoder_attention_mask"]
        .to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|r| r.into_iter().map(|m| m == 0).collect())
        .collect();
    Inputs {
        images: out["patch_images"].clone(),
        ids: Tensor::new(ids, &Device::Cpu).unwrap(),
        padding,
        dec_ids,
        dec_padding,
    }
}

fn parity(file: &str, model: Model) {
    let out = outputs();
    let inp = inputs(&out);
    let mode = Mode::INFER;
    let mut rep = Report::new(file);
    let b = inp.dec_ids.len();
    let (enc_layers, dec_layers) = (model.cfg.encoder_layers, model.cfg.decoder_layers);

    // ResNet trunk.
    let feats = model.encoder.image_trunk.features(&inp.images).unwrap(); // [b, p, c]
    let (fb, c, gh, gw) = out["image_features"].dims4().unwrap();
    assert_eq!(fb, b);
    assert_eq!((gh, gw), (image_side(&out) / 16, image_side(&out) / 16));
    let want = out["image_features"]
        .reshape((b, c, gh * gw))
        .unwrap()
        .transpose(1, 2)
        .unwrap();
    rep.check("image_features", &feats, &want, TOL_FEATURES);

    // Encoder.
    let enc = model
        .encode(&inp.images, &inp.ids, &inp.padding, mode)
        .unwrap();
    let pos = enc.positions.joint().unwrap();
    for i in 0..b {
        rep.check(
            "encoder_position_embedding",
            &pos,
            &out["encoder_position_embedding"].get(i).unwrap(),
            TOL_ENCODER,
        );
    }
    let biases = model.encoder_biases(&enc.positions).unwrap();
    assert_eq!(biases.len(), enc_layers);
    for (l, bias) in biases.iter().enumerate() {
        let ours = bias
            .joint()
            .unwrap()
            .to_tensor()
            .unwrap()
            .squeeze(0)
            .unwrap();
        for i in 0..b {
            let want = out["encoder_attn_bias"].i((l, i)).unwrap();
            rep.check("encoder_attn_bias", &ours, &want, TOL_ENCODER);
        }
    }
    assert_eq!(enc.hidden.len(), enc_layers + 1);
    for (l, h) in enc.hidden.iter().enumerate() {
        let want = out["encoder_hidden_states"].get(l).unwrap();
        rep.check("encoder_hidden_states", h, &want, TOL_ENCODER);
    }
    rep.check(
        "encoder_last_hidden_state",
        &enc.memory,
        &out["encoder_last_hidden_state"],
        TOL_ENCODER,
    );
    let want_pad: Vec<Vec<bool>> = out["encoder_padding_mask"]
        .to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|r| r.into_iter().map(|v| v == 1).collect())
        .collect();
    assert_eq!(enc.padding, want_pad, "encoder padding mask");

    // Teacher-forced decoder with the decoder key padding mask.
    let t = inp.dec_ids[0].len();
    let dec_ids = Tensor::new(inp.dec_ids.clone(), &Device::Cpu).unwrap();
    let hidden = model
        .decode(&dec_ids, Some(&inp.dec_padding), &enc, mode)
        .unwrap();
    assert_eq!(hidden.len(), dec_layers + 1);
    for (l, h) in hidden.iter().enumerate() {
        let want = out["decoder_hidden_states"].get(l).unwrap();
        rep.check("decoder_hidden_states", h, &want, TOL_DECODER);
    }
    let logits = model.logits(hidden.last().unwrap(), mode).unwrap();
    rep.check(
        "decoder_logits",
        &logits,
        &out["decoder_logits"],
        TOL_LOGITS,
    );
    let dpos = model.decoder_positions(t, mode).unwrap();
    for (l, sb) in model.decoder_self_biases(&dpos).unwrap().iter().enumerate() {
        for i in 0..b {
            let want = out["decoder_self_attn_bias"].i((l, i)).unwrap();
            rep.check(
                "decoder_self_attn_bias",
                &sb.squeeze(0).unwrap(),
                &want,
                TOL_DECODER,
            );
        }
    }
    let cross = model
        .decoder_cross_bias(&dpos, &enc.positions)
        .unwrap()
        .squeeze(0)
        .unwrap();
    for i in 0..b {
        let want = out["decoder_cross_attn_bias"].get(i).unwrap();
        rep.check("decoder_cross_attn_bias", &cross, &want, TOL_DECODER);
    }

    // The engine's encoder (exits never taken) gives the same memory.
    let never = MuePolicy::never();
    let run = run_encoder(&model, &inp.images, &inp.ids, &inp.padding, &never).unwrap();
    rep.check(
        "run_encoder memory",
        &run.memory,
        &out["encoder_last_hidden_state"],
        TOL_ENCODER,
    );

    // Cached step-by-step decoding over decoder_input_ids. DecoderState::step has no
    // decoder key padding mask, so only real (non-pad) positions are compared; with right
    // padding, pad tokens only ever precede other pad positions in the cache.
    let mut st = DecoderState::new(&model, &run, &never, KvFill::Propagate, t - 1).unwrap();
    let mut compared = 0;
    for s in 0..t {
        let tokens: Vec<u32> = inp.dec_ids.iter().map(|r| r[s]).collect();
        let step = st.step(&tokens).unwrap();
        assert_eq!(step.exit_layer, vec![dec_layers; b]);
        for i in 0..b {
            if inp.dec_padding[i][s] {
                continue;
            }
            let want = out["decoder_logits"].i((i, s)).unwrap();
            rep.check(
                "cached decoder_logits (real pos)",
                &step.logits.get(i).unwrap(),
                &want,
                TOL_LOGITS,
            );
            compared += 1;
        }
    }
    let real: usize = inp.dec_padding.iter().flatten().filter(|p| !**p).count();
    assert!(real > 0);
    assert_eq!(compared, real);

    // Greedy decoding: 8 cached steps from BOS, argmax over the whole vocabulary.
    let want_ids = ids_u32(&out["greedy_ids"]);
    let steps = want_ids[0].len();
    let mut st = DecoderState::new(&model, &run, &never, KvFill::Propagate, steps - 1).unwrap();
    let mut tokens = vec![0u32; b];
    let mut got_ids = vec![Vec::new(); b];
    for s in 0..steps {
        let step = st.step(&tokens).unwrap();
        rep.check(
            "greedy_step_logits",
            &step.logits,
            &out["greedy_step_logits"].i((.., s)).unwrap(),
            TOL_LOGITS,
        );
        tokens = step
            .logits
            .argmax(D::Minus1)
            .unwrap()
            .to_vec1::<u32>()
            .unwrap();
        let chosen = step
            .logits
            .gather(
                &Tensor::new(tokens.clone(), &Device::Cpu)
                    .unwrap()
                    .unsqueeze(1)
                    .unwrap(),
                1,
            )
            .unwrap()
            .squeeze(1)
            .unwrap();
        rep.check(
            "greedy_chosen_logits",
            &chosen,
            &out["greedy_chosen_logits"].i((.., s)).unwrap(),
            TOL_LOGITS,
        );
        for (g, &tok) in got_ids.iter_mut().zip(&tokens) {
            g.push(tok);
        }
    }
    assert_eq!(got_ids, want_ids, "greedy ids");
    rep.finish();
}

#[test]
fn parity_safetensors_f16() {
    parity(
        "model.safetensors",
        load(&fixture_dir().join("model.safetensors")),
    );
}

/// The PyTorch-pickle reader (shared storages, tied names) from the repository alone:
/// every tensor outside the ResNet trunk from `pytorch_model_no_resnet.bin`, the trunk
/// from `model.safetensors` (the same values, README).
#[test]
fn parity_pytorch_bin_f32_without_resnet() {
    let dir = fixture_dir();
    let mut params = weights::load_state_dict(&dir.join("pytorch_model_no_resnet.bin")).unwrap();
    assert!(params
        .keys()
        .all(|k| !k.starts_with("encoder.embed_images.")));
    let st = weights::load_state_dict(&dir.join("model.safetensors")).unwrap();
    let mut trunk = 0;
    for (name, t) in st {
        if name.starts_with("encoder.embed_images.") {
            params.insert(name, t);
            trunk += 1;
        } else {
            // Outside the trunk the pickle holds every tensor, with the same values.
            let ours = params
                .get(&name)
                .unwrap_or_else(|| panic!("{name} missing"));
            assert_eq!(mue::model::max_abs_diff(ours, &t).unwrap(), 0.0, "{name}");
        }
    }
    assert!(trunk > 0);
    parity("pytorch_model_no_resnet.bin + ResNet trunk", build(params));
}

/// The full float32 pickle (outside the repository): set MUE_OFA_FIXTURE_FULL.
#[test]
fn parity_pytorch_bin_f32() {
    let Some(full) = full_fixture() else {
        // To stderr itself (println! is captured): a plain `cargo test` shows it.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "parity_pytorch_bin_f32: SKIPPED, the full pytorch_model.bin is not in the \
             repository (set MUE_OFA_FIXTURE_FULL=/path/to/pytorch_model.bin to run it)"
        );
        return;
    };
    parity("pytorch_model.bin", load(&full));
}

#[test]
fn load_ofa_dir_reads_fixture() {
    let side = image_side(&outputs());
    let (cfg, model, used) =
        ofa::load_ofa_dir_with_tensors(&fixture_dir(), side, EncoderMode::Joint, &Device::Cpu)
            .unwrap();
    assert_eq!(model.cfg, cfg);
    // The floating tensors, minus the two duplicate tied embeddings and the parameters
    // only image-code generation uses (decoder.embed_image_positions, image_pos_ln x2,
    // code_layernorm_embedding x2, image_rel_pos_table_list x decoder layers).
    assert!(used.contains_key("encoder.embed_tokens.weight"));
    assert!(!used.contains_key("decoder.embed_tokens.weight"));
    assert!(!used.contains_key("decoder.output_projection.weight"));
    assert!(!used.contains_key("decoder.embed_image_positions.weight"));
    assert!(used.keys().all(|k| !weights::is_buffer(k)));
    assert_eq!(used.len(), text_forward_tensors());
    assert!(used.values().all(|t| t.dtype() == DType::F32));
}

#[test]
fn bucket_buffers_match() {
    let out = outputs();
    let cfg = fixture_config();
    let (tb, ib, maxp) = (
        cfg.token_bucket_size,
        cfg.image_bucket_size,
        cfg.max_positions,
    );
    let grid = cfg.grid_side();
    assert_eq!(grid, out["image_features"].dims4().unwrap().2);
    let vec1 = |n: &str| -> Vec<usize> {
        out[n]
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|v| v as usize)
            .collect()
    };
    let first: Vec<usize> = (0..maxp)
        .map(|j| ofa::token_rp_bucket(0, j, tb, maxp))
        .collect();
    assert_eq!(first, vec1("token_rp_bucket_row_first"));
    let last: Vec<usize> = (0..maxp)
        .map(|j| ofa::token_rp_bucket(maxp - 1, j, tb, maxp))
        .collect();
    assert_eq!(last, vec1("token_rp_bucket_row_last"));

    let ids = vec1("image_position_ids");
    let ours: Vec<u32> = position::image_position_ids(grid, ib, &Device::Cpu)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(
        ours.iter().map(|&v| v as usize).collect::<Vec<_>>(),
        ids,
        "image position ids"
    );
    let used: Vec<Vec<usize>> = ids
        .iter()
        .map(|&a| {
            ids.iter()
                .map(|&b| ofa::image_rp_bucket(a, b, ib))
                .collect()
        })
        .collect();
    let want: Vec<Vec<usize>> = out["image_rp_bucket_used"]
        .to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|r| r.into_iter().map(|v| v as usize).collect())
        .collect();
    assert_eq!(used, want, "image_rp_bucket_used");
    // The model's own bucket matrix for the grid is the same block.
    let m: Vec<Vec<u32>> = position::image_bucket_matrix(grid, ib, &Device::Cpu)
        .unwrap()
        .to_vec2()
        .unwrap();
    let m: Vec<Vec<usize>> = m
        .into_iter()
        .map(|r| r.into_iter().map(|v| v as usize).collect())
        .collect();
    assert_eq!(m, want, "position::image_bucket_matrix");
    let n = ib * ib + 1;
    let row0: Vec<usize> = (0..n).map(|j| ofa::image_rp_bucket(0, j, ib)).collect();
    assert_eq!(row0, vec1("image_rp_bucket_row0"));
    let col0: Vec<usize> = (0..n).map(|i| ofa::image_rp_bucket(i, 0, ib)).collect();
    assert_eq!(col0, vec1("image_rp_bucket_col0"));
    let row1: Vec<usize> = (0..n).map(|j| ofa::image_rp_bucket(1, j, ib)).collect();
    assert_eq!(row1, vec1("image_rp_bucket_row1"));
}

/// A copy of the fixture directory with the weights edited by `edit`.
fn edited_copy(edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture_dir();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let mut t =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    edit(&mut t);
    candle_core::safetensors::save(&t, dir.path().join("model.safetensors")).unwrap();
    dir
}

fn load_err(dir: &Path) -> String {
    format!(
        "{:#}",
        ofa::load_ofa_dir(
            dir,
            image_side(&outputs()),
            EncoderMode::Joint,
            &Device::Cpu
        )
        .unwrap_err()
    )
}

#[test]
fn loader_errors_name_the_tensor() {
    let name = "encoder.layers.1.fc2.bias";
    let d = edited_copy(|t| {
        t.remove(name);
    });
    let err = load_err(d.path());
    assert!(err.contains(name), "{err}");

    let name = "decoder.layers.0.cross_attn.k_proj.weight";
    let d_model = fixture_config().d_model;
    let d = edited_copy(|t| {
        t.insert(
            name.to_string(),
            Tensor::zeros((d_model, d_model / 2), DType::F16, &Device::Cpu).unwrap(),
        );
    });
    let err = load_err(d.path());
    assert!(err.contains(name), "{err}");

    let d = edited_copy(|t| {
        let e = t["decoder.output_projection.weight"]
            .affine(1.0, 0.5)
            .unwrap();
        t.insert("decoder.output_projection.weight".to_string(), e);
    });
    let err = load_err(d.path());
    assert!(err.contains("decoder.output_projection.weight"), "{err}");

    // A mue model directory (our own config.json) is not an HF OFA directory.
    let d = tempfile::tempdir().unwrap();
    mue::model::Config::tiny(EncoderMode::Joint)
        .save(&d.path().join("config.json"))
        .unwrap();
    let err = load_err(d.path());
    assert!(err.contains("model_type"), "{err}");

    let d = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture_dir().join("config.json"),
        d.path().join("config.json"),
    )
    .unwrap();
    let err = load_err(d.path());
    assert!(err.contains("pytorch_model.bin"), "{err}");

    // Model::load_dir on an unconverted HF OFA directory points to `mue convert`.
    let err = format!(
        "{:#}",
        Model::load_dir(&fixture_dir(), &Device::Cpu).unwrap_err()
    );
    assert!(err.contains("mue convert"), "{err}");
}

/// `--precision int8` on the fixture (f16 weights read as f32, then quantized): how far
/// the trunk features and the teacher-forced decoder logits move from the float32
/// reference, printed and bounded. The bounds are loose multiples of what the int8 path
/// measured (run with --nocapture): they catch a broken kernel, not rounding.
#[test]
fn parity_int8_logit_difference() {
    use mue::model::precision::{self, Precision};
    let out = outputs();
    let inp = inputs(&out);
    let mut model = load(&fixture_dir().join("model.safetensors"));
    precision::apply(&mut model, Precision::Int8).unwrap();
    let b = inp.dec_ids.len();
    let feats = model.encoder.image_trunk.features(&inp.images).unwrap();
    let (_, c, gh, gw) = out["image_features"].dims4().unwrap();
    let want = out["image_features"]
        .reshape((b, c, gh * gw))
        .unwrap()
        .transpose(1, 2)
        .unwrap();
    let feat_err = max_abs(&feats, &want);
    let feat_scale = want
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();

    let never = MuePolicy::never();
    let run = run_encoder(&model, &inp.images, &inp.ids, &inp.padding, &never).unwrap();
    let t = inp.dec_ids[0].len();
    let mut st = DecoderState::new(&model, &run, &never, KvFill::Propagate, t - 1).unwrap();
    let (mut logit_err, mut logit_scale, mut same_argmax, mut real) = (0f32, 0f32, 0, 0);
    for s in 0..t {
        let tokens: Vec<u32> = inp.dec_ids.iter().map(|r| r[s]).collect();
        let step = st.step(&tokens).unwrap();
        for i in 0..b {
            if inp.dec_padding[i][s] {
                continue;
            }
            let want = out["decoder_logits"].i((i, s)).unwrap();
            let got = step.logits.get(i).unwrap();
            logit_err = logit_err.max(max_abs(&got, &want));
            let scale = want.abs().unwrap().max_all().unwrap();
            logit_scale = logit_scale.max(scale.to_scalar::<f32>().unwrap());
            let am = |x: &Tensor| x.argmax(D::Minus1).unwrap().to_scalar::<u32>().unwrap();
            same_argmax += usize::from(am(&got) == am(&want));
            real += 1;
        }
    }
    println!(
        "int8 vs float32 reference: image_features max abs {feat_err:.3e} (max |x| {feat_scale:.3}), \
         decoder logits max abs {logit_err:.3e} (max |x| {logit_scale:.3}), same argmax at \
         {same_argmax} of {real} positions"
    );
    assert!(real > 0);
    assert!(
        feat_err < 0.1 * feat_scale,
        "features {feat_err} vs scale {feat_scale}"
    );
    assert!(
        logit_err < 0.05 * logit_scale,
        "logits {logit_err} vs scale {logit_scale}"
    );
    assert!(same_argmax * 10 >= real * 8, "{same_argmax} of {real}");
}
