//! Engine tests on tiny random models: exits, batching, caches, search, costs, I/O.

use candle_core::{Device, IndexOp, Tensor};
use mue::exit::{ExitPolicy, FullDepth, LayerSignal, MuePolicy, Site};
use mue::generate::{self, run_encoder, DecoderState, Input, KvFill, SearchConfig};
use mue::model::layers::Mode;
use mue::model::{Config, EncoderMode, ImageEmbedder, Model, StreamDepths};
use std::collections::HashMap;

const DEV: Device = Device::Cpu;

fn model(mode: EncoderMode) -> (Model, HashMap<String, Tensor>) {
    Model::random(&Config::tiny(mode), 7, &DEV).unwrap()
}

fn inputs(cfg: &Config, n: usize) -> Vec<Input> {
    (0..n)
        .map(|i| {
            let s = cfg.image_size;
            let image = Tensor::randn(0f32, 1.0, (3, s, s), &DEV).unwrap();
            // Seeded-looking but distinct images: scale by sample index to vary content.
            let image = (image * (0.5 + i as f64 * 0.3)).unwrap();
            let len = 3 + (i * 2) % 6;
            let mut ids = vec![cfg.bos_id];
            ids.extend((0..len).map(|j| 4 + ((i * 7 + j * 5) % (cfg.vocab_size - 4)) as u32));
            ids.push(cfg.eos_id);
            Input {
                image,
                text_ids: ids,
            }
        })
        .collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    mue::model::max_abs_diff(a, b).unwrap()
}

/// Teacher-forced full-depth logits `[t, V]` for one sample and decoder ids.
fn full_logits(m: &Model, inp: &Input, dec: &[u32]) -> Tensor {
    let (img, ids, pad) = generate::batch_inputs(m, std::slice::from_ref(inp)).unwrap();
    let enc = m.encode(&img, &ids, &pad, Mode::INFER).unwrap();
    let d = Tensor::from_vec(dec.to_vec(), (1, dec.len()), &DEV).unwrap();
    let hidden = m.decode(&d, None, &enc, Mode::INFER).unwrap();
    m.logits(hidden.last().unwrap(), Mode::INFER)
        .unwrap()
        .squeeze(0)
        .unwrap()
}

/// Step logits `[t, V]` from the incremental decoder with a policy.
fn step_logits(
    m: &Model,
    inp: &Input,
    dec: &[u32],
    policy: &dyn ExitPolicy,
    fill: KvFill,
) -> (Tensor, Vec<usize>) {
    let (img, ids, pad) = generate::batch_inputs(m, std::slice::from_ref(inp)).unwrap();
    let enc = run_encoder(m, &img, &ids, &pad, policy).unwrap();
    let mut st = DecoderState::new(m, &enc, policy, fill, dec.len()).unwrap();
    let mut rows = Vec::new();
    let mut exits = Vec::new();
    for &tok in dec {
        let out = st.step(&[tok]).unwrap();
        rows.push(out.logits);
        exits.push(out.exit_layer[0]);
    }
    (Tensor::cat(&rows, 0).unwrap(), exits)
}

#[test]
fn thresholds_at_one_reproduce_full_depth() {
    for mode in [EncoderMode::Joint, EncoderMode::Decomposed] {
        let (m, _) = model(mode);
        let inp = inputs(&m.cfg, 3);
        let (img, ids, pad) = generate::batch_inputs(&m, &inp).unwrap();
        let full = m.encode(&img, &ids, &pad, Mode::INFER).unwrap();
        let never = MuePolicy::never();
        let run = run_encoder(&m, &img, &ids, &pad, &never).unwrap();
        assert!(
            max_diff(&full.memory, &run.memory) <= 1e-5,
            "{mode:?} encoder"
        );
        assert!(run
            .image_exit
            .iter()
            .chain(&run.text_exit)
            .all(|&e| e == m.cfg.encoder_layers));
        let dec = [0u32, 9, 17, 5, 30];
        let want = full_logits(&m, &inp[1], &dec);
        let (got, exits) = step_logits(&m, &inp[1], &dec, &never, KvFill::Propagate);
        assert!(
            max_diff(&want, &got) <= 1e-5,
            "{mode:?} decoder: {}",
            max_diff(&want, &got)
        );
        assert!(exits.iter().all(|&e| e == m.cfg.decoder_layers));
        // Thresholds above 1 behave the same.
        let above = MuePolicy::new(1.5, 2.0, 1.01).unwrap();
        let (got2, _) = step_logits(&m, &inp[1], &dec, &above, KvFill::Copy);
        assert!(max_diff(&want, &got2) <= 1e-5);
    }
}

#[test]
fn threshold_below_minus_one_equals_one_layer_model() {
    for mode in [EncoderMode::Joint, EncoderMode::Decomposed] {
        let (m, tensors) = model(mode);
        let mut cfg1 = m.cfg.clone();
        cfg1.encoder_layers = 1;
        cfg1.decoder_layers = 1;
        let m1 = Model::from_tensors(&cfg1, tensors, &DEV).unwrap();
        let inp = inputs(&m.cfg, 2);
        let (img, ids, pad) = generate::batch_inputs(&m, &inp).unwrap();
        let always = MuePolicy::new(-1.5, -1.5, -1.5).unwrap();
        let run = run_encoder(&m, &img, &ids, &pad, &always).unwrap();
        let one = m1.encode(&img, &ids, &pad, Mode::INFER).unwrap();
        assert!(max_diff(&one.memory, &run.memory) <= 1e-5, "{mode:?}");
        assert_eq!(run.image_exit, vec![1, 1]);
        assert_eq!(run.text_exit, vec![1, 1]);
        let dec = [0u32, 11, 3, 40];
        let want = full_logits(&m1, &inp[0], &dec);
        for fill in [KvFill::Propagate, KvFill::Copy] {
            let (got, exits) = step_logits(&m, &inp[0], &dec, &always, fill);
            assert!(max_diff(&want, &got) <= 1e-5, "{mode:?} {fill:?}");
            assert!(exits.iter().all(|&e| e == 1));
        }
    }
}

/// Exits the first token after layer 1; later tokens run to full depth.
#[derive(Debug)]
struct FirstTokenShallow;
impl ExitPolicy for FirstTokenShallow {
    fn name(&self) -> String {
        "first-token-shallow".into()
    }
    fn should_exit(&self, site: Site, h: &[LayerSignal], _: usize) -> bool {
        matches!(site, Site::Decoder { step: 0, .. }) && h.len() == 1
    }
}

#[test]
fn skipped_layers_get_keys_values_from_the_exit_state() {
    let (m, _) = model(EncoderMode::Decomposed);
    let inp = &inputs(&m.cfg, 1)[0];
    let (img, ids, pad) = generate::batch_inputs(&m, std::slice::from_ref(inp)).unwrap();
    let policy = FirstTokenShallow;
    let enc = run_encoder(&m, &img, &ids, &pad, &FullDepth).unwrap();
    // Direct computation of token 0 through layer 1.
    let x0 = m
        .embed_decoder(&Tensor::new(&[[0u32]], &DEV).unwrap(), Mode::INFER)
        .unwrap();
    let pos = m.decoder_positions(1, Mode::INFER).unwrap();
    let sb = m.decoder_self_biases(&pos).unwrap();
    let cb = m.decoder_cross_bias(&pos, &enc.positions).unwrap();
    let l0 = &m.decoder.layers[0];
    let (ck, cv) = l0.cross_key_value(&enc.memory, Mode::INFER).unwrap();
    let (h1, _) = l0
        .forward(&x0, None, Some(&sb[0]), (&ck, &cv), Some(&cb), Mode::INFER)
        .unwrap();

    for fill in [KvFill::Propagate, KvFill::Copy] {
        let mut st = DecoderState::new(&m, &enc, &policy, fill, 4).unwrap();
        let out0 = st.step(&[0]).unwrap();
        assert_eq!(out0.exit_layer, vec![1]);
        for layer in 1..m.cfg.decoder_layers {
            let (k, v) = st.cache(layer).unwrap().unwrap();
            let (wk, wv) = match fill {
                KvFill::Propagate => m.decoder.layers[layer]
                    .self_key_value(&h1, Mode::INFER)
                    .unwrap(),
                KvFill::Copy => st.cache(0).unwrap().unwrap(),
            };
            assert!(
                max_diff(&k, &wk) <= 1e-6 && max_diff(&v, &wv) <= 1e-6,
                "{fill:?} layer {layer}"
            );
        }
        // The next token runs every layer and attends to those keys/values.
        let out1 = st.step(&[9]).unwrap();
        assert_eq!(out1.exit_layer, vec![m.cfg.decoder_layers]);
    }
    // With propagate, token 1's output differs from a full-depth run (it sees the exit state).
    let (full, _) = step_logits(&m, inp, &[0, 9], &FullDepth, KvFill::Propagate);
    let (shallow, _) = step_logits(&m, inp, &[0, 9], &policy, KvFill::Propagate);
    assert!(max_diff(&full.i(1).unwrap(), &shallow.i(1).unwrap()) > 1e-6);
}

/// A threshold in the middle of the widest gap between observed similarities, so that
/// rounding differences between batch shapes cannot flip a decision.
/// Taken over the first layer's similarities, it splits the samples.
fn gap_threshold(sims: &[Vec<f32>]) -> f32 {
    let mut s: Vec<f32> = sims.iter().map(|h| h[0]).collect();
    s.sort_by(f32::total_cmp);
    let (lo, hi) = s
        .windows(2)
        .map(|w| (w[0], w[1]))
        .max_by(|a, b| (a.1 - a.0).total_cmp(&(b.1 - b.0)))
        .unwrap();
    (lo + hi) / 2.0
}

fn mid_policy(run: &generate::EncoderRun, dec: f32) -> MuePolicy {
    MuePolicy::new(
        gap_threshold(&run.image_similarity),
        gap_threshold(&run.text_similarity),
        dec,
    )
    .unwrap()
}

#[test]
fn batch_results_equal_single_sample_results() {
    for mode in [EncoderMode::Joint, EncoderMode::Decomposed] {
        let (m, _) = model(mode);
        let inp = inputs(&m.cfg, 4);
        let (img, ids, pad) = generate::batch_inputs(&m, &inp).unwrap();
        let probe = run_encoder(&m, &img, &ids, &pad, &FullDepth).unwrap();
        let policy = mid_policy(&probe, 1.0);
        let cfg = SearchConfig {
            beam: 3,
            max_len: 6,
            min_len: 1,
            no_repeat_ngram: 2,
            len_penalty: 1.0,
            kv_fill: KvFill::Propagate,
        };
        let batch = generate::caption(&m, &inp, &policy, &cfg).unwrap();
        let exits: Vec<(usize, usize)> = batch
            .iter()
            .map(|r| (r.exits.image_layer, r.exits.text_layer))
            .collect();
        assert!(
            exits.iter().any(|e| e.0 != exits[0].0) && exits.iter().any(|e| e.1 != exits[0].1),
            "{mode:?}: the test needs varied exits, got {exits:?}"
        );
        for (i, one) in inp.iter().enumerate() {
            let single = generate::caption(&m, std::slice::from_ref(one), &policy, &cfg).unwrap();
            assert_eq!(single[0].tokens, batch[i].tokens, "{mode:?} sample {i}");
            assert_eq!(single[0].exits, batch[i].exits, "{mode:?} sample {i}");
            assert!((single[0].score - batch[i].score).abs() < 1e-4);
            assert_eq!(single[0].cost.macs_executed, batch[i].cost.macs_executed);
        }
        // Greedy with decoder exits: every row is visible, so compare everything.
        let greedy_cfg = SearchConfig { beam: 1, ..cfg };
        let mut dec_policy = policy;
        dec_policy.decoder = mue::exit::DecoderThreshold::Constant { tau: 0.9995 };
        let batch = generate::caption(&m, &inp, &dec_policy, &greedy_cfg).unwrap();
        for (i, one) in inp.iter().enumerate() {
            let single =
                generate::caption(&m, std::slice::from_ref(one), &dec_policy, &greedy_cfg).unwrap();
            assert_eq!(single[0].tokens, batch[i].tokens, "{mode:?} sample {i}");
            assert_eq!(single[0].exits, batch[i].exits, "{mode:?} sample {i}");
            assert_eq!(single[0].cost.macs_executed, batch[i].cost.macs_executed);
        }
        // Classification, one row per sample.
        let prefixes: Vec<Vec<u32>> = inp
            .iter()
            .map(|x| vec![0, 20, 21, 22 + x.text_ids.len() as u32])
            .collect();
        let cands = vec![vec![40], vec![41], vec![42]];
        let b = generate::classify(&m, &inp, &prefixes, &cands, &policy).unwrap();
        for i in 0..inp.len() {
            let s = generate::classify(&m, &inp[i..i + 1], &prefixes[i..i + 1], &cands, &policy)
                .unwrap();
            assert_eq!(s[0].best, b[i].best);
            assert_eq!(s[0].exits, b[i].exits);
            for (x, y) in s[0].scores.iter().zip(&b[i].scores) {
                assert!((x - y).abs() < 1e-4);
            }
        }
    }
}

#[test]
fn beam_one_equals_greedy_and_runs_are_deterministic() {
    let (m, _) = model(EncoderMode::Decomposed);
    let inp = inputs(&m.cfg, 3);
    let (img, ids, pad) = generate::batch_inputs(&m, &inp).unwrap();
    let probe = run_encoder(&m, &img, &ids, &pad, &FullDepth).unwrap();
    let policy = mid_policy(&probe, 0.99);
    let enc = run_encoder(&m, &img, &ids, &pad, &policy).unwrap();
    let cfg = SearchConfig {
        beam: 1,
        max_len: 8,
        min_len: 2,
        no_repeat_ngram: 3,
        len_penalty: 1.0,
        kv_fill: KvFill::Propagate,
    };
    let g = generate::greedy(&m, &enc, &policy, &cfg).unwrap();
    let b = generate::beam_search(&m, &enc, &policy, &cfg).unwrap();
    for (x, y) in g.iter().zip(&b) {
        assert_eq!(x.best.tokens, y.best.tokens);
        assert_eq!(x.best.token_exits, y.best.token_exits);
        assert!((x.best.score - y.best.score).abs() < 1e-5);
        assert_eq!(x.macs, y.macs);
        assert!(x.best.tokens.len() >= 2 && x.best.tokens.len() <= 8);
    }
    let again = generate::greedy(&m, &enc, &policy, &cfg).unwrap();
    assert_eq!(
        g.iter().map(|x| &x.best).collect::<Vec<_>>(),
        again.iter().map(|x| &x.best).collect::<Vec<_>>()
    );
}

#[test]
fn beam_search_bans_repeats_and_respects_lengths() {
    let (m, _) = model(EncoderMode::Joint);
    let inp = inputs(&m.cfg, 2);
    let cfg = SearchConfig {
        beam: 4,
        max_len: 7,
        min_len: 3,
        no_repeat_ngram: 2,
        len_penalty: 1.0,
        kv_fill: KvFill::Copy,
    };
    for r in generate::caption(&m, &inp, &MuePolicy::never(), &cfg).unwrap() {
        assert!(r.tokens.len() >= 3 && r.tokens.len() <= 7, "{:?}", r.tokens);
        assert_eq!(r.exits.token_layers.len(), r.tokens.len() + 1);
        let mut seen = std::collections::HashSet::new();
        for w in r.tokens.windows(2) {
            assert!(seen.insert(w.to_vec()), "repeated bigram in {:?}", r.tokens);
        }
        assert!(!r.tokens.contains(&m.cfg.pad_id));
    }
}

#[test]
fn mac_counter_matches_hand_count() {
    let mut cfg = Config::tiny(EncoderMode::Decomposed);
    cfg.encoder_layers = 2;
    cfg.decoder_layers = 2;
    let (m, _) = Model::random(&cfg, 3, &DEV).unwrap();
    let mut inp = inputs(&cfg, 1);
    inp[0].text_ids = vec![0, 10, 11, 12, 2]; // 5 text tokens
    let prefix = vec![vec![0u32, 20, 21]]; // 3 decoder tokens
    let cands = vec![vec![30u32], vec![31]];
    let r = generate::classify(&m, &inp, &prefix, &cands, &FullDepth).unwrap();
    // d = 32, ffn = 64, 16 patches of 48 values, V = 64.
    let (d, f, p, l, t, v) = (32u64, 64u64, 16u64, 5u64, 3u64, 64u64);
    let n = p + l;
    let enc_layer = |q: u64| 2 * q * d * d + 2 * q * d * d + 2 * q * q * d + 2 * q * d * f;
    let encoder = p * 48 * d + (2 * n * d * d + n * n * d) + 2 * (enc_layer(p) + enc_layer(l));
    let dec_layer = 4 * t * d * d
        + 2 * t * t * d
        + 2 * t * d * d
        + 2 * t * n * d
        + 2 * t * d * f
        + 2 * n * d * d;
    let biases = (2 * t * d * d + t * t * d) + ((t + n) * d * d + t * n * d);
    let decoder = biases + 2 * dec_layer + d * v;
    assert_eq!(r[0].cost.macs_full, encoder + decoder);
    assert_eq!(r[0].cost.macs_executed, encoder + decoder);
    // Exiting every stream after layer 1 removes exactly one layer of each.
    let always = MuePolicy::new(-2.0, -2.0, -2.0).unwrap();
    let r1 = generate::classify(&m, &inp, &prefix, &cands, &always).unwrap();
    assert_eq!(r1[0].cost.macs_full, encoder + decoder);
    assert_eq!(
        r1[0].cost.macs_executed,
        encoder + decoder - enc_layer(p) - enc_layer(l) - dec_layer
    );
    assert_eq!(r1[0].exits.token_layers, vec![1]);
}

#[test]
fn conv_stem_costs_are_counted_and_bad_strides_refused() {
    let patch_cfg = Config::tiny(EncoderMode::Decomposed);
    let mut cfg = patch_cfg.clone();
    cfg.image_embedder = ImageEmbedder::Conv {
        stem: vec![4],
        patch: 2,
    };
    cfg.validate().unwrap();
    assert_eq!(cfg.num_patches(), 16);
    assert_eq!(cfg.image_feature_dim(), 16);
    let macs = |cfg: &Config| {
        let (m, _) = Model::random(cfg, 3, &DEV).unwrap();
        let inp = inputs(cfg, 1);
        let cands = vec![vec![30u32], vec![31]];
        let r = generate::classify(&m, &inp, &[vec![0u32, 20]], &cands, &FullDepth).unwrap();
        r[0].cost.macs_full
    };
    // 8x8 outputs x 4 channels x 27 taps, and a 16-wide instead of 48-wide projection.
    let stem = 8 * 8 * 4 * 27;
    let proj_delta = 16 * 32 * (48 - 16);
    assert_eq!(macs(&cfg), macs(&patch_cfg) + stem - proj_delta);

    let mut bad = cfg.clone();
    bad.image_size = 18;
    let err = bad.validate().unwrap_err().to_string();
    assert!(err.contains("conv stem"), "{err}");
    bad.image_embedder = ImageEmbedder::Conv {
        stem: vec![0],
        patch: 2,
    };
    bad.image_size = 16;
    let err = bad.validate().unwrap_err().to_string();
    assert!(err.contains("channels must be positive"), "{err}");
}

#[test]
fn save_load_round_trip() {
    let (m, tensors) = model(EncoderMode::Decomposed);
    let dir = tempfile::tempdir().unwrap();
    Model::save_dir(dir.path(), &m.cfg, &tensors).unwrap();
    let back = Model::load_dir(dir.path(), &DEV).unwrap();
    assert_eq!(back.cfg, m.cfg);
    let inp = inputs(&m.cfg, 2);
    let cfg = SearchConfig::default();
    let a = generate::caption(&m, &inp, &MuePolicy::never(), &cfg).unwrap();
    let b = generate::caption(&back, &inp, &MuePolicy::never(), &cfg).unwrap();
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.tokens, y.tokens);
        assert_eq!(x.score, y.score);
    }
}

#[test]
fn bad_inputs_are_clear_errors() {
    let (m, tensors) = model(EncoderMode::Decomposed);
    assert!(MuePolicy::new(f32::NAN, 0.9, 0.9)
        .unwrap_err()
        .to_string()
        .contains("image threshold"));
    let mut inp = inputs(&m.cfg, 1);
    inp[0].text_ids = vec![0, 2];
    let mut bad = inp.clone();
    bad[0].text_ids = vec![0];
    let err = generate::caption(&m, &bad, &FullDepth, &SearchConfig::default()).unwrap_err();
    assert!(err.to_string().contains("text is empty"), "{err}");
    let mut bad = inp.clone();
    bad[0].image = Tensor::zeros((3, 8, 8), candle_core::DType::F32, &DEV).unwrap();
    let err = generate::caption(&m, &bad, &FullDepth, &SearchConfig::default()).unwrap_err();
    assert!(err.to_string().contains("image tensor has shape"), "{err}");
    let mut bad = inp.clone();
    bad[0].text_ids = vec![0, 999, 2];
    let err = generate::caption(&m, &bad, &FullDepth, &SearchConfig::default()).unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");

    // A directory without config, and weights that do not match the config.
    let dir = tempfile::tempdir().unwrap();
    let err = Model::load_dir(dir.path(), &DEV).unwrap_err();
    assert!(format!("{err:#}").contains("config.json"), "{err:#}");
    let mut cfg = m.cfg.clone();
    cfg.d_model = 48;
    Model::save_dir(dir.path(), &cfg, &tensors).unwrap();
    let err = Model::load_dir(dir.path(), &DEV).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("do not match") && msg.contains("shape"),
        "{msg}"
    );
}

#[test]
fn entangled_image_positions_tell_equal_patches_apart() {
    let (m, tensors) = model(EncoderMode::Decomposed);
    let mut cfg = m.cfg.clone();
    cfg.entangle_image_positions = true;
    let vb = candle_nn::VarBuilder::from_tensors(tensors, candle_core::DType::F32, &DEV);
    let ent = Model::new(&cfg, vb).unwrap();
    // One colour everywhere: every patch is the same, so only positions can differ.
    let s = cfg.image_size;
    let image = Tensor::full(0.3f32, (1, 3, s, s), &DEV).unwrap();
    let spread = |m: &Model| {
        let x = m
            .embed_image(&image, Mode::INFER)
            .unwrap()
            .squeeze(0)
            .unwrap();
        max_diff(&x.i(0).unwrap(), &x.i(1).unwrap())
    };
    assert!(
        spread(&m) < 1e-6,
        "bias-only positions: equal patches, equal tokens"
    );
    assert!(
        spread(&ent) > 1e-2,
        "entangled positions: tokens differ by position"
    );
    // Configs written before the switch existed load with it off.
    let mut json = serde_json::to_value(&m.cfg).unwrap();
    json.as_object_mut()
        .unwrap()
        .remove("entangle_image_positions");
    let old: Config = serde_json::from_value(json).unwrap();
    assert!(!old.entangle_image_positions);
}

#[test]
fn stream_depths_in_training_give_the_memory_of_exits_there() {
    let (m, _) = model(EncoderMode::Decomposed);
    let inp = inputs(&m.cfg, 2);
    let (img, ids, pad) = generate::batch_inputs(&m, &inp).unwrap();
    let layers = m.cfg.encoder_layers;
    for k in 1..=layers {
        for (image, text) in [(k, layers), (layers, k), (k, 1)] {
            let depths = StreamDepths {
                image: Some(image),
                text: Some(text),
            };
            let trained = m
                .encode_to_depths(&img, &ids, &pad, depths, Mode::INFER)
                .unwrap();
            let policy = mue::exit::StaticDepth {
                image,
                text,
                decoder: m.cfg.decoder_layers,
            };
            let run = run_encoder(&m, &img, &ids, &pad, &policy).unwrap();
            assert_eq!(
                (run.image_exit, run.text_exit),
                (vec![image; 2], vec![text; 2])
            );
            assert!(
                max_diff(&trained.memory, &run.memory) <= 1e-5,
                "image depth {image}, text depth {text}: {}",
                max_diff(&trained.memory, &run.memory)
            );
        }
    }
    for bad in [0, layers + 1] {
        for (depths, stream) in [
            (
                StreamDepths {
                    image: Some(bad),
                    text: None,
                },
                "image depth",
            ),
            (
                StreamDepths {
                    image: None,
                    text: Some(bad),
                },
                "text depth",
            ),
        ] {
            let e = m
                .encode_to_depths(&img, &ids, &pad, depths, Mode::INFER)
                .unwrap_err();
            assert!(e.to_string().contains(stream), "{e}");
        }
    }
    let (j, _) = model(EncoderMode::Joint);
    let e = j
        .encode_to_depths(
            &img,
            &ids,
            &pad,
            StreamDepths {
                image: None,
                text: Some(1),
            },
            Mode::INFER,
        )
        .unwrap_err();
    assert!(e.to_string().contains("decomposed"), "{e}");
}

/// Decoder exits that vary by step and sample: a sample's rows reach a layer first at a later
/// step than the other samples' rows, so its cross keys/values join a buffer that exists
/// (the partial fill, with the keys kept transposed for the row attention). Batched runs
/// must still equal single-sample runs.
#[test]
fn late_cross_key_value_fill_matches_single_runs() {
    let (m, _) = model(EncoderMode::Decomposed);
    let inp = inputs(&m.cfg, 4);
    let cfg = SearchConfig {
        beam: 1,
        max_len: 6,
        min_len: 1,
        no_repeat_ngram: 0,
        len_penalty: 1.0,
        kv_fill: KvFill::Propagate,
    };
    let mut varied = false;
    for tau in [0.3f32, 0.6, 0.8, 0.9, 0.95, 0.98, 0.99] {
        let policy = MuePolicy::new(1.0, 1.0, tau).unwrap();
        let batch = generate::caption(&m, &inp, &policy, &cfg).unwrap();
        let layers: Vec<usize> = batch
            .iter()
            .flat_map(|r| r.exits.token_layers.clone())
            .collect();
        varied |= layers.iter().any(|&l| l != layers[0]);
        for (i, one) in inp.iter().enumerate() {
            let single = generate::caption(&m, std::slice::from_ref(one), &policy, &cfg).unwrap();
            assert_eq!(single[0].tokens, batch[i].tokens, "tau {tau} sample {i}");
            assert_eq!(single[0].exits, batch[i].exits, "tau {tau} sample {i}");
        }
    }
    assert!(varied, "no threshold gave varied decoder exits");
}
