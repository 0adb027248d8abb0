//! Training: gradients reach every parameter, the layer-wise loss is what it claims, the
//! optimiser lowers the loss, and `resume` continues a run exactly.

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use image::RgbImage;
use mue::model::layers::Mode;
use mue::model::{BranchInit, Config, EncoderMode, ImageEmbedder, Model, StreamDepths};
use mue::task::Task;
use mue::train::data::{batch_indices, make_batch, Batch, Dataset, Example};
use mue::train::{
    batch_loss, layer_loss, lr_at, task_loss, AdamW, AdamWParams, LossKind, StepPlan, TrainOptions,
};

const TRAIN: Mode = Mode::train(0.0);

fn tiny() -> (Model, VarMap) {
    let cfg = Config::tiny(EncoderMode::Decomposed);
    Model::init_trainable(&cfg, 7, BranchInit::Unit, &Device::Cpu).unwrap()
}

fn image(seed: u32, side: u32) -> RgbImage {
    RgbImage::from_fn(side, side, |x, y| {
        let v = (x * 31 + y * 17 + seed * 101) % 256;
        image::Rgb([v as u8, (v * 3 % 256) as u8, (255 - v) as u8])
    })
}

/// Two captions and two entailment questions of different lengths (padding on both sides).
fn dataset() -> Dataset {
    let cap = |image: usize, enc: Vec<u32>, cap: Vec<u32>| {
        let mut dec = vec![0];
        dec.extend(&cap);
        let targets = cap.iter().copied().chain([2]).map(Some).collect();
        Example {
            task: Task::Caption,
            image,
            enc_ids: enc,
            dec_ids: dec,
            targets,
        }
    };
    let ve = |image: usize, prompt: Vec<u32>, answer: u32| {
        let mut enc = vec![0];
        enc.extend(&prompt);
        enc.push(2);
        let mut dec = vec![0];
        dec.extend(&prompt);
        dec.push(answer);
        let mut targets = vec![None; dec.len()];
        targets[dec.len() - 2] = Some(answer);
        Example {
            task: Task::Entail,
            image,
            enc_ids: enc,
            dec_ids: dec,
            targets,
        }
    };
    Dataset {
        images: (0..3).map(|i| image(i, 16)).collect(),
        examples: vec![
            cap(0, vec![0, 10, 11, 12, 2], vec![20, 21, 22, 23, 24]),
            ve(1, vec![30, 31, 32, 33, 34, 35], 40),
            cap(2, vec![0, 10, 11, 12, 2], vec![25, 26]),
            ve(0, vec![30, 36, 37], 41),
        ],
        skipped: 0,
    }
}

fn batch(model: &Model, smoothing: f32) -> Batch {
    let ds = dataset();
    make_batch(
        &ds,
        &[0, 1, 2, 3],
        model.cfg.pad_id,
        model.cfg.vocab_size,
        smoothing,
        &Device::Cpu,
    )
    .unwrap()
}

fn scalar(t: &Tensor) -> f32 {
    t.to_scalar::<f32>().unwrap()
}

/// Largest absolute entry of `t`.
fn max_abs(t: &Tensor) -> f32 {
    scalar(&t.abs().unwrap().max_all().unwrap())
}

#[test]
fn every_parameter_gets_a_gradient_from_the_layerwise_loss() {
    assert_every_parameter_gets_a_gradient(tiny());
}

#[test]
fn every_conv_stem_parameter_gets_a_gradient() {
    let mut cfg = Config::tiny(EncoderMode::Decomposed);
    cfg.image_embedder = ImageEmbedder::Conv {
        stem: vec![4, 6],
        patch: 1,
    };
    assert_eq!(
        cfg.num_patches(),
        Config::tiny(EncoderMode::Decomposed).num_patches()
    );
    let (model, varmap) = Model::init_trainable(&cfg, 7, BranchInit::Unit, &Device::Cpu).unwrap();
    assert!(varmap
        .data()
        .lock()
        .unwrap()
        .contains_key("encoder.embed_images.stem.1.weight"));
    assert_every_parameter_gets_a_gradient((model, varmap));
}

#[test]
fn every_resnet_parameter_gets_a_gradient_and_none_when_frozen() {
    let mut cfg = Config::tiny(EncoderMode::Decomposed);
    cfg.image_embedder = ImageEmbedder::Resnet { blocks: [1, 1, 1] };
    // 32 px: a 2x2 feature map (with one image token its attention could not learn).
    cfg.image_size = 32;
    let mut ds = dataset();
    ds.images = (0..3).map(|i| image(i, 32)).collect();
    let trunk = |n: &str| n.starts_with("encoder.embed_images.");
    for frozen in [false, true] {
        let (mut model, varmap) =
            Model::init_trainable(&cfg, 7, BranchInit::Unit, &Device::Cpu).unwrap();
        mue::train::bind_image_trunk(&mut model, &varmap, frozen).unwrap();
        let b = make_batch(&ds, &[0, 1, 2, 3], 1, cfg.vocab_size, 0.1, &Device::Cpu).unwrap();
        let out = batch_loss(&model, &b, LossKind::LayerWise, TRAIN).unwrap();
        assert!(scalar(&out.total).is_finite());
        let grads = out.total.backward().unwrap();
        let data = varmap.data().lock().unwrap();
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        assert!(names.iter().filter(|n| trunk(n)).count() > 50);
        for name in names {
            let g = grads.get(data[name].as_tensor());
            // BatchNorm statistics are constants; a frozen trunk gets no gradient at all.
            if mue::train::is_running_stat(name) || (frozen && trunk(name)) {
                assert!(g.is_none(), "{name} has a gradient (frozen {frozen})");
            } else {
                let g = g.unwrap_or_else(|| panic!("{name} has no gradient (frozen {frozen})"));
                let max = max_abs(g);
                assert!(max.is_finite() && max > 0.0, "{name}: gradient {max}");
            }
        }
    }
}

fn assert_every_parameter_gets_a_gradient((model, varmap): (Model, VarMap)) {
    let b = batch(&model, 0.1);
    let out = batch_loss(&model, &b, LossKind::LayerWise, TRAIN).unwrap();
    let grads = out.total.backward().unwrap();
    let data = varmap.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    assert!(names.len() > 50, "only {} variables", names.len());
    let mut zero = Vec::new();
    for name in names {
        let g = grads
            .get(data[name].as_tensor())
            .unwrap_or_else(|| panic!("{name} has no gradient"));
        let max = max_abs(g);
        assert!(max.is_finite(), "{name}: gradient not finite");
        if max == 0.0 {
            zero.push(name.clone());
        }
    }
    assert!(
        zero.is_empty(),
        "parameters with an all-zero gradient: {zero:?}"
    );
}

#[test]
fn fused_kernels_give_the_composed_ops_loss_and_gradients() {
    let (model, varmap) = tiny();
    let b = batch(&model, 0.1);
    let composed = Mode {
        fused: false,
        ..TRAIN
    };
    let fused = batch_loss(&model, &b, LossKind::LayerWise, TRAIN).unwrap();
    let slow = batch_loss(&model, &b, LossKind::LayerWise, composed).unwrap();
    let (lf, ls) = (scalar(&fused.total), scalar(&slow.total));
    assert!((lf - ls).abs() < 1e-4 * ls.abs(), "loss {lf} vs {ls}");
    let (gf, gs) = (
        fused.total.backward().unwrap(),
        slow.total.backward().unwrap(),
    );
    let data = varmap.data().lock().unwrap();
    for (name, var) in data.iter() {
        let (a, c) = (gf.get(var.as_tensor()), gs.get(var.as_tensor()));
        let (a, c) = (
            a.unwrap(),
            c.unwrap_or_else(|| panic!("{name}: no gradient")),
        );
        let diff = max_abs(&(a - c).unwrap());
        assert!(
            diff <= 1e-3 * max_abs(c).max(1e-3),
            "{name}: gradients differ by {diff} (max {})",
            max_abs(c)
        );
    }
}

#[test]
fn zero_encoder_branches_start_as_the_identity_and_still_learn() {
    let cfg = Config::tiny(EncoderMode::Decomposed);
    let (model, varmap) =
        Model::init_trainable(&cfg, 7, BranchInit::ZeroEncoder, &Device::Cpu).unwrap();
    let b = batch(&model, 0.1);
    let enc = model
        .encode(&b.images, &b.enc_ids, &b.enc_padding, TRAIN)
        .unwrap();
    let first = &enc.hidden[0];
    for (l, h) in enc.hidden.iter().enumerate().skip(1) {
        let d = mue::model::max_abs_diff(first, h).unwrap();
        assert_eq!(d, 0.0, "encoder layer {l} changed its input at init");
    }
    // The decoder keeps unit branches: its layers move the state from the start.
    let data = varmap.data().lock().unwrap();
    let gain = |name: &str| max_abs(data[name].as_tensor());
    assert_eq!(gain("encoder.layers.0.ffn_layer_norm.weight"), 0.0);
    assert_eq!(gain("decoder.layers.0.ffn_layer_norm.weight"), 1.0);
    // The zero gains get a gradient, so the branches open in the first step.
    let out = batch_loss(&model, &b, LossKind::LayerWise, TRAIN).unwrap();
    let grads = out.total.backward().unwrap();
    for l in 0..cfg.encoder_layers {
        for part in ["self_attn_mid_layer_norm", "ffn_layer_norm"] {
            let name = format!("encoder.layers.{l}.{part}.weight");
            let g = grads.get(data[&name].as_tensor()).unwrap();
            assert!(max_abs(g) > 0.0, "{name} gets no gradient");
        }
    }
}

#[test]
fn inference_kernels_would_not_train_every_parameter() {
    // The reason for Mode::train: candle's fused softmax / layer norm have no backward.
    let (model, varmap) = tiny();
    let b = batch(&model, 0.1);
    let out = batch_loss(&model, &b, LossKind::LayerWise, Mode::INFER).unwrap();
    match out.total.backward() {
        Err(_) => {}
        Ok(grads) => {
            let data = varmap.data().lock().unwrap();
            let missing = data
                .values()
                .filter(|v| grads.get(v.as_tensor()).is_none())
                .count();
            assert!(missing > 0, "inference mode unexpectedly trains everything");
        }
    }
}

/// Reference: fairseq's label-smoothed NLL, computed on the host from full log-probs.
fn reference_layer_loss(model: &Model, h: &Tensor, rows: &[(Vec<Option<u32>>, f32)]) -> f64 {
    let lp = model
        .log_probs(h, Mode::INFER)
        .unwrap()
        .to_vec3::<f32>()
        .unwrap();
    let v = model.cfg.vocab_size as f64;
    let active = rows
        .iter()
        .filter(|r| r.0.iter().any(|x| x.is_some()))
        .count() as f64;
    let mut total = 0.0;
    for (i, (targets, eps)) in rows.iter().enumerate() {
        let eps = *eps as f64;
        let eps_i = eps / (v - 1.0);
        let mut row = 0.0;
        let mut n = 0.0;
        for (j, t) in targets.iter().enumerate() {
            if let Some(t) = t {
                let nll = -(lp[i][j][*t as usize] as f64);
                let smooth = -lp[i][j].iter().map(|&x| x as f64).sum::<f64>();
                row += (1.0 - eps - eps_i) * nll + eps_i * smooth;
                n += 1.0;
            }
        }
        total += row / n / active;
    }
    total
}

#[test]
fn layerwise_loss_is_the_sum_of_per_layer_losses_and_final_only_the_last() {
    let (model, _) = tiny();
    let b = batch(&model, 0.1);
    let enc = model
        .encode(&b.images, &b.enc_ids, &b.enc_padding, TRAIN)
        .unwrap();
    let hidden = model
        .decode(&b.dec_ids, Some(&b.dec_padding), &enc, TRAIN)
        .unwrap();
    assert_eq!(hidden.len(), model.cfg.decoder_layers + 1);
    let lw = task_loss(&model, &hidden, &b.targets, LossKind::LayerWise, TRAIN).unwrap();
    let fo = task_loss(&model, &hidden, &b.targets, LossKind::FinalOnly, TRAIN).unwrap();
    assert_eq!(lw.per_layer.len(), model.cfg.decoder_layers);
    assert_eq!(fo.per_layer.len(), 1);

    // Targets and smoothing per row as the batch holds them (captions 0.1, answers 0).
    let ds = dataset();
    let t = b.dec_ids.dim(1).unwrap();
    let rows: Vec<(Vec<Option<u32>>, f32)> = ds
        .examples
        .iter()
        .map(|e| {
            let mut tg = e.targets.clone();
            tg.resize(t, None);
            (tg, if e.task == Task::Caption { 0.1 } else { 0.0 })
        })
        .collect();
    let mut sum = 0.0;
    for (l, h) in hidden.iter().enumerate().skip(1) {
        let separate = scalar(&layer_loss(&model, h, &b.targets, TRAIN).unwrap());
        let reference = reference_layer_loss(&model, h, &rows);
        assert!(
            (separate as f64 - reference).abs() < 1e-4,
            "layer {l}: {separate} vs reference {reference}"
        );
        assert!((scalar(&lw.per_layer[l - 1]) - separate).abs() < 1e-5);
        sum += reference;
    }
    let total = scalar(&lw.total) as f64;
    assert!(
        (total - sum).abs() < 1e-3,
        "layer-wise {total} vs sum {sum}"
    );
    let last = reference_layer_loss(&model, hidden.last().unwrap(), &rows);
    let fo_total = scalar(&fo.total) as f64;
    assert!(
        (fo_total - last).abs() < 1e-4,
        "final-only {fo_total} vs {last}"
    );
    // With several layers the two differ.
    assert!(total > fo_total + 1.0);
}

#[test]
fn label_smoothing_changes_the_loss_only_for_captions() {
    let (model, _) = tiny();
    let a = batch(&model, 0.0);
    let b = batch(&model, 0.1);
    let la = scalar(
        &batch_loss(&model, &a, LossKind::FinalOnly, TRAIN)
            .unwrap()
            .total,
    );
    let lb = scalar(
        &batch_loss(&model, &b, LossKind::FinalOnly, TRAIN)
            .unwrap()
            .total,
    );
    assert!((la - lb).abs() > 1e-6);
}

#[test]
fn one_optimiser_step_lowers_the_loss_on_a_fixed_batch() {
    let (model, varmap) = tiny();
    let b = batch(&model, 0.1);
    let mut opt = AdamW::new(&varmap, AdamWParams::default()).unwrap();
    assert_eq!(opt.num_vars(), varmap.all_vars().len());
    let out = batch_loss(&model, &b, LossKind::LayerWise, TRAIN).unwrap();
    let before = scalar(&out.total);
    let grads = out.total.backward().unwrap();
    let st = opt.step(&grads, 1e-3, Some(1.0)).unwrap();
    assert_eq!(st.missing, 0);
    assert!(st.grad_norm > 0.0);
    let after = scalar(
        &batch_loss(&model, &b, LossKind::LayerWise, TRAIN)
            .unwrap()
            .total,
    );
    assert!(after < before, "loss {before} -> {after}");
}

#[test]
fn gradient_clipping_bounds_the_global_norm() {
    let (model, varmap) = tiny();
    let b = batch(&model, 0.1);
    let mut opt = AdamW::new(&varmap, AdamWParams::default()).unwrap();
    let out = batch_loss(&model, &b, LossKind::LayerWise, TRAIN).unwrap();
    let grads = out.total.backward().unwrap();
    let norm = opt.grad_norm(&grads).unwrap();
    let max = norm as f64 / 4.0;
    let st = opt.step(&grads, 1e-4, Some(max)).unwrap();
    assert!((st.grad_norm - norm).abs() < 1e-4 * norm);
    assert!(((st.clip_scale * st.grad_norm) as f64 - max).abs() < 1e-3 * max);
    let st2 = {
        let out = batch_loss(&model, &b, LossKind::LayerWise, TRAIN).unwrap();
        opt.step(&out.total.backward().unwrap(), 1e-4, Some(1e9))
            .unwrap()
    };
    assert_eq!(st2.clip_scale, 1.0);
}

#[test]
fn learning_rate_warms_up_then_decays_linearly() {
    let peak = 1.0;
    let lrs: Vec<f64> = (0..100).map(|s| lr_at(s, 100, 0.06, peak)).collect();
    assert!((lrs[0] - 1.0 / 6.0).abs() < 1e-12);
    assert!((lrs[5] - 1.0).abs() < 1e-12);
    for s in 1..6 {
        assert!(lrs[s] > lrs[s - 1]);
    }
    for s in 6..100 {
        assert!(lrs[s] < lrs[s - 1] && lrs[s] > 0.0);
    }
    assert!(lrs[99] < 0.02);
}

#[test]
fn batches_cover_each_epoch_once_in_a_seeded_order() {
    let n = 10;
    let mut seen: Vec<usize> = (0..5).flat_map(|s| batch_indices(n, 3, 2, s)).collect();
    seen.sort();
    assert_eq!(seen, (0..10).collect::<Vec<_>>());
    // Batches straddling epochs: 3 per batch, 10 examples.
    let all: Vec<usize> = (0..10).flat_map(|s| batch_indices(n, 3, 3, s)).collect();
    for e in 0..3 {
        let mut ep = all[e * 10..e * 10 + 10].to_vec();
        ep.sort();
        assert_eq!(ep, (0..10).collect::<Vec<_>>());
    }
    assert_ne!(all[..10], all[10..20]);
    assert_eq!(batch_indices(n, 3, 3, 4), batch_indices(n, 3, 3, 4));
    assert_ne!(batch_indices(n, 3, 3, 0), batch_indices(n, 4, 3, 0));
}

/// A benchmark of 6 train, 3 valid and 3 test images of 32 px under `root/bench`.
fn tiny_benchmark(root: &std::path::Path) -> std::path::PathBuf {
    let data = root.join("bench");
    mue::data::generate(&mue::data::GenerateOptions {
        out_dir: data.clone(),
        seed: 1,
        n_train: 6,
        n_val: 3,
        n_test: 3,
        image_size: 32,
    })
    .unwrap();
    data
}

fn tiny_options(data: &std::path::Path, out: &std::path::Path) -> TrainOptions {
    let mut o = TrainOptions::new(data, out);
    o.d_model = 32;
    o.encoder_layers = 2;
    o.decoder_layers = 2;
    o.heads = 4;
    o.ffn_dim = 64;
    o.patch = 8;
    o.image_size = 32;
    o.vocab_size = 300;
    o.max_positions = 64;
    o.batch_size = 4;
    o.steps = 3;
    o.lr = 1e-3;
    // Dropout on: its masks are seeded per step, so resumed runs must still match exactly.
    o.dropout = 0.2;
    o.eval_examples = 4;
    o
}

#[test]
fn training_resumes_from_the_saved_step_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tiny_benchmark(tmp.path());

    // Uninterrupted: 3 steps.
    let full = tmp.path().join("full");
    let r = mue::train::train(&tiny_options(&data, &full)).unwrap();
    assert_eq!((r.start_step, r.end_step), (0, 3));
    assert_eq!(r.losses.len(), 3);

    // Interrupted after the checkpoint at step 2, then resumed.
    let part = tmp.path().join("part");
    let mut o = tiny_options(&data, &part);
    o.checkpoint_every = 2;
    o.stop_at = Some(2);
    let r1 = mue::train::train(&o).unwrap();
    assert_eq!(r1.end_step, 2);
    assert_eq!(mue::train::load_state(&part).unwrap().step, 2);
    for (x, y) in r1.losses.iter().zip(&r.losses) {
        assert!((x - y).abs() < 1e-5, "{x} vs {y}");
    }
    assert_eq!(r1.losses.len(), 2);
    o.stop_at = None;
    o.resume = true;
    let r2 = mue::train::train(&o).unwrap();
    assert_eq!((r2.start_step, r2.end_step), (2, 3));
    assert_eq!(r2.losses.len(), 1);
    assert!(
        (r2.losses[0] - r.losses[2]).abs() < 1e-4,
        "resumed step loss {} vs {}",
        r2.losses[0],
        r.losses[2]
    );
    let st = mue::train::load_state(&part).unwrap();
    assert_eq!(st.step, 3);
    assert_eq!(st.examples_seen, 12);

    // The saved weights load, as a model and through the engine, and match the
    // uninterrupted run.
    let a = Model::load_dir(&full, &Device::Cpu).unwrap();
    let b = Model::load_dir(&part, &Device::Cpu).unwrap();
    let diff = mue::model::max_abs_diff(&a.embed_tokens, &b.embed_tokens).unwrap();
    assert!(diff < 1e-4, "resumed weights differ by {diff}");
    let init = Model::init_trainable(&a.cfg, 0, BranchInit::Unit, &Device::Cpu)
        .unwrap()
        .0;
    let moved = mue::model::max_abs_diff(&a.embed_tokens, &init.embed_tokens).unwrap();
    assert!(moved > 1e-4, "training did not change the weights");
    assert_eq!(a.cfg.encoder_mode, EncoderMode::Decomposed);

    // Training formats inputs exactly as the engine does.
    let engine = mue::pipeline::Engine::load(&part).unwrap();
    let hyp = "There is a Red circle.";
    assert_eq!(
        engine.entail_prompt(hyp, None).unwrap(),
        mue::train::data::entail_prompt(&engine.tokenizer, hyp, engine.model.cfg.max_text_len())
            .unwrap()
    );
    // Resuming a finished run does nothing more.
    let r3 = mue::train::train(&o).unwrap();
    assert_eq!((r3.start_step, r3.end_step), (3, 3));
    // The engine answers with the trained model (accuracy itself is not meaningful here).
    let (acc, n) = mue::train::entail_accuracy_dir(&part, &data, "valid", None).unwrap();
    assert!(n > 0 && (0.0..=1.0).contains(&acc));
}

#[test]
fn joint_pretraining_continues_as_a_decomposed_model() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tiny_benchmark(tmp.path());
    let joint = tmp.path().join("joint");
    let mut o = tiny_options(&data, &joint);
    o.steps = 1;
    o.encoder_mode = EncoderMode::Joint;
    o.attn_scale_factor = 1.0;
    mue::train::train(&o).unwrap();
    let cfg = mue::model::Config::load(&joint.join("config.json")).unwrap();
    assert_eq!(cfg.encoder_mode, EncoderMode::Joint);
    assert_eq!(cfg.attn_scale_factor, 1.0);

    // Continue from it: same weights, decomposed encoder.
    let dec = tmp.path().join("dec");
    let mut o = tiny_options(&data, &dec);
    o.steps = 1;
    o.init = Some(joint.clone());
    mue::train::train(&o).unwrap();
    let cfg = mue::model::Config::load(&dec.join("config.json")).unwrap();
    assert_eq!(cfg.encoder_mode, EncoderMode::Decomposed);
    let st = mue::train::load_state(&dec).unwrap();
    assert_eq!(
        st.init.as_deref(),
        Some(joint.as_path()),
        "the start model is recorded"
    );
    assert_eq!(
        cfg.attn_scale_factor, 1.0,
        "the init model's architecture is kept"
    );
    let a = Model::load_dir(&joint, &Device::Cpu).unwrap();
    let b = Model::load_dir(&dec, &Device::Cpu).unwrap();
    assert_eq!(a.embed_tokens.dims(), b.embed_tokens.dims());
}

#[test]
fn an_image_stream_stopped_early_trains_only_the_layers_it_ran() {
    let (model, varmap) = tiny();
    let b = batch(&model, 0.1);
    let layers = model.cfg.encoder_layers;
    assert!(layers >= 2);
    let image_at_1 = StreamDepths {
        image: Some(1),
        text: None,
    };
    let out =
        mue::train::batch_loss_at(&model, &b, LossKind::LayerWise, TRAIN, image_at_1).unwrap();
    let grads = out.total.backward().unwrap();
    let data = varmap.data().lock().unwrap();
    let grad = |name: &str| grads.get(data[name].as_tensor()).map(max_abs);
    // The image stream's relative-position table of layer 1 trains; the later ones are
    // only read by image tokens, which stopped after layer 1.
    let table = |l: usize| format!("encoder.image_rel_pos_table_list.{l}.weight");
    assert!(grad(&table(0)).unwrap() > 0.0);
    for l in 1..layers {
        assert!(
            grad(&table(l)).is_none_or(|g| g == 0.0),
            "layer {l}'s image table trained"
        );
        // The shared layer weights still train through the text stream.
        let w = format!("encoder.layers.{l}.fc1.weight");
        assert!(grad(&w).unwrap() > 0.0, "{w} gets no gradient");
    }
    // Full depth through the same entry point is the plain loss.
    let full = mue::train::batch_loss_at(
        &model,
        &b,
        LossKind::LayerWise,
        TRAIN,
        StreamDepths::default(),
    )
    .unwrap();
    let plain = batch_loss(&model, &b, LossKind::LayerWise, TRAIN).unwrap();
    assert_eq!(scalar(&full.total), scalar(&plain.total));
    assert_ne!(scalar(&full.total), scalar(&out.total));
}

#[test]
fn sampled_depths_are_seeded_and_cover_every_shallow_depth() {
    use mue::train::sampled_depth as depth;
    let layers = 6;
    assert!((0..200).all(|s| depth(0.0, layers, 3, s).is_none()));
    let all: Vec<usize> = (0..600)
        .map(|s| depth(1.0, layers, 3, s).expect("p = 1 always samples"))
        .collect();
    for d in 1..layers {
        assert!(all.contains(&d), "depth {d} never drawn");
    }
    assert!(all.iter().all(|&d| (1..layers).contains(&d)));
    let half = (0..2000)
        .filter(|&s| depth(0.5, layers, 3, s).is_some())
        .count();
    assert!((800..1200).contains(&half), "{half} of 2000 steps sampled");
    let run = |seed| {
        (0..50)
            .map(|s| depth(0.5, layers, seed, s))
            .collect::<Vec<_>>()
    };
    assert_eq!(run(3), run(3));
    assert_ne!(run(3), run(4));
    // The two streams of a step draw apart: the image's draws are those of `sampled_depth`
    // with the run's seed (as before text sampling existed), the text's are others.
    let mut o = TrainOptions::new("d", "o");
    (o.image_exit_sampling, o.text_exit_sampling, o.seed) = (0.5, 0.5, 3);
    let both: Vec<_> = (0..50)
        .map(|s| mue::train::sampled_depths(&o, layers, s))
        .collect();
    assert_eq!(both.iter().map(|d| d.image).collect::<Vec<_>>(), run(3));
    assert!(both.iter().any(|d| d.image != d.text));
    assert!(both.iter().filter(|d| d.text.is_some()).count() > 10);
    o.text_exit_sampling = 0.0;
    assert!((0..50).all(|s| mue::train::sampled_depths(&o, layers, s).text.is_none()));
}

#[test]
fn image_exit_sampling_trains_and_rejects_a_joint_encoder_or_bad_fraction() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tiny_benchmark(tmp.path());
    let out = tmp.path().join("sampled");
    let mut o = tiny_options(&data, &out);
    o.image_exit_sampling = 1.0;
    let r = mue::train::train(&o).unwrap();
    assert_eq!(r.end_step, 3);
    let log = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    let depths: Vec<u64> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["image_depth"].as_u64())
        .collect();
    // Two encoder layers: every sampled step stops the image stream after layer 1.
    assert_eq!(depths, vec![1, 1, 1]);
    // The share is recorded, and a resume with another share (other depths) is refused.
    assert_eq!(
        mue::train::load_state(&out).unwrap().image_exit_sampling,
        Some(1.0)
    );
    o.steps = 4;
    o.resume = true;
    o.image_exit_sampling = 0.5;
    let e = mue::train::train(&o).unwrap_err().to_string();
    assert!(e.contains("--image-exit-sampling 1, this run 0.5"), "{e}");
    // A state written before the share was recorded reads it as unknown, not as 0.
    let old = r#"{"step":3,"total_steps":3,"seed":0,"batch_size":4,"loss":"layer-wise","examples_seen":12,"optimizer_state":true}"#;
    let st: mue::train::TrainState = serde_json::from_str(old).unwrap();
    assert_eq!((st.image_exit_sampling, st.init), (None, None));

    let mut joint = tiny_options(&data, &tmp.path().join("joint"));
    joint.encoder_mode = EncoderMode::Joint;
    joint.image_exit_sampling = 0.5;
    let e = mue::train::train(&joint).unwrap_err().to_string();
    assert!(e.contains("decomposed"), "{e}");
    let mut bad = tiny_options(&data, &tmp.path().join("bad"));
    bad.image_exit_sampling = 1.5;
    let e = mue::train::train(&bad).unwrap_err().to_string();
    assert!(e.contains("image exit sampling"), "{e}");
}

#[test]
fn text_exit_sampling_trains_records_its_share_and_refuses_another_on_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tiny_benchmark(tmp.path());
    let out = tmp.path().join("text");
    let mut o = tiny_options(&data, &out);
    o.text_exit_sampling = 1.0;
    mue::train::train(&o).unwrap();
    let log = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    let steps: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["loss"].is_number())
        .collect();
    // Two encoder layers: every step stops the text stream after layer 1; the image runs on.
    assert_eq!(steps.len(), 3);
    assert!(steps
        .iter()
        .all(|v| v["text_depth"] == 1 && v["image_depth"].is_null()));
    let st = mue::train::load_state(&out).unwrap();
    assert_eq!(st.text_exit_sampling, Some(1.0));
    (o.steps, o.resume, o.text_exit_sampling) = (4, true, 0.0);
    let e = mue::train::train(&o).unwrap_err().to_string();
    assert!(e.contains("--text-exit-sampling 1, this run 0"), "{e}");
    // A state from before text sampling existed resumes only without it.
    let old = r#"{"step":3,"total_steps":3,"seed":0,"batch_size":4,"loss":"layer-wise","examples_seen":12,"optimizer_state":true}"#;
    let st: mue::train::TrainState = serde_json::from_str(old).unwrap();
    assert_eq!(st.text_exit_sampling, None);

    let mut joint = tiny_options(&data, &tmp.path().join("joint"));
    joint.encoder_mode = EncoderMode::Joint;
    joint.text_exit_sampling = 0.5;
    let e = mue::train::train(&joint).unwrap_err().to_string();
    assert!(e.contains("decomposed"), "{e}");
    let mut bad = tiny_options(&data, &tmp.path().join("bad"));
    bad.text_exit_sampling = -0.1;
    let e = mue::train::train(&bad).unwrap_err().to_string();
    assert!(e.contains("text exit sampling"), "{e}");
}

/// The public OFA fixture (random weights, ResNet-50 trunk) converted to a mue model
/// directory with its 2000-id tokenizer, at `image_size`.
fn converted_fixture(root: &std::path::Path, image_size: usize) -> std::path::PathBuf {
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ofa-parity");
    let out = root.join("converted");
    mue::cli::convert::convert(&mue::cli::convert::ConvertArgs {
        ofa: fixture.clone(),
        out: out.clone(),
        image_size,
        mode: EncoderMode::Joint,
        vocab: None,
        merges: None,
    })
    .unwrap();
    std::fs::copy(fixture.join("tokenizer.json"), out.join("tokenizer.json")).unwrap();
    out
}

fn weights(dir: &std::path::Path) -> std::collections::HashMap<String, Vec<u32>> {
    candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, t)| {
            let v: Vec<f32> = t
                .to_dtype(candle_core::DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            (k, v.into_iter().map(f32::to_bits).collect())
        })
        .collect()
}

#[test]
fn a_converted_ofa_checkpoint_fine_tunes_with_and_without_a_frozen_trunk() {
    // 64 px keeps the ResNet-50 trunk cheap; the sizes come from the fixture's config.
    let side = 64;
    let tmp = tempfile::tempdir().unwrap();
    let init = converted_fixture(tmp.path(), side);
    let data = tmp.path().join("bench");
    mue::data::generate(&mue::data::GenerateOptions {
        out_dir: data.clone(),
        seed: 1,
        n_train: 2,
        n_val: 2,
        n_test: 2,
        image_size: side as u32,
    })
    .unwrap();
    let options = |out: &str, freeze: bool| {
        let mut o = TrainOptions::new(&data, tmp.path().join(out));
        o.init = Some(init.clone());
        o.encoder_mode = EncoderMode::Decomposed;
        o.freeze_image_trunk = freeze;
        o.captions_per_image = Some(1);
        // One batch holds every example, and no dropout: every step sees the same data,
        // so the loss must fall.
        o.batch_size = 10;
        o.dropout = 0.0;
        o.steps = 3;
        o.lr = 1e-3;
        o.eval_examples = 2;
        o
    };
    let start = weights(&init);
    let trunk = |n: &str| n.starts_with("encoder.embed_images.");
    let stat = mue::train::is_running_stat;
    assert!(start.keys().filter(|n| trunk(n)).count() > 100);

    let mut first_losses = Vec::new();
    let mut full_losses = Vec::new();
    for freeze in [false, true] {
        let name = if freeze { "frozen" } else { "full" };
        let o = options(name, freeze);
        let r = mue::train::train(&o).unwrap();
        assert!(r.n_train_examples <= o.batch_size, "{}", r.n_train_examples);
        eprintln!("{name}: losses {:?} in {:.1}s", r.losses, r.wall_secs);
        assert_eq!(r.losses.len(), 3);
        assert!(
            r.losses[2] < r.losses[0] && r.losses[1] < r.losses[0],
            "{name}: loss does not fall: {:?}",
            r.losses
        );
        first_losses.push(r.losses[0]);
        if !freeze {
            full_losses = r.losses.clone();
        }
        let st = mue::train::load_state(&o.out_dir).unwrap();
        assert_eq!(st.freeze_image_trunk, Some(freeze));

        let end = weights(&o.out_dir);
        assert_eq!(end.len(), start.len());
        let moved = |n: &str| start[n] != end[n];
        for n in start.keys() {
            if stat(n) {
                assert!(!moved(n), "{name}: BatchNorm statistic {n} changed");
            } else if trunk(n) && freeze {
                assert!(!moved(n), "{name}: frozen trunk weight {n} changed");
            } else if !trunk(n) {
                assert!(moved(n), "{name}: {n} did not move");
            }
        }
        let trunk_moved = start.keys().filter(|n| trunk(n) && moved(n)).count();
        if freeze {
            assert_eq!(trunk_moved, 0);
        } else {
            // Every convolution and BatchNorm scale / shift trains.
            let trainable = start.keys().filter(|n| trunk(n) && !stat(n)).count();
            assert_eq!(trunk_moved, trainable, "{name}: trunk weights moved");
        }
    }
    // The first step is the same model either way.
    assert_eq!(first_losses[0], first_losses[1]);

    // The trunk computes with the updated weights: a run interrupted after step 1 and
    // resumed (its trunk built afresh from the saved weights) repeats the uninterrupted
    // run's step 2, which a trunk left at the start weights would not.
    let mut o = options("part", false);
    o.checkpoint_every = 1;
    o.stop_at = Some(1);
    mue::train::train(&o).unwrap();
    o.stop_at = Some(2);
    o.resume = true;
    // A resume with another freezing setting is refused.
    o.freeze_image_trunk = true;
    let e = mue::train::train(&o).unwrap_err().to_string();
    assert!(e.contains("--freeze-image-trunk"), "{e}");
    o.freeze_image_trunk = false;
    let resumed = mue::train::train(&o).unwrap();
    assert_eq!((resumed.start_step, resumed.end_step), (1, 2));
    assert!(
        (resumed.losses[0] - full_losses[1]).abs() < 1e-4,
        "resumed {} vs uninterrupted {}",
        resumed.losses[0],
        full_losses[1]
    );
}

#[test]
fn a_fresh_model_with_a_resnet_trunk_trains_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tiny_benchmark(tmp.path());
    let out = tmp.path().join("resnet");
    let mue = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_mue"))
            .args(args)
            .output()
            .unwrap()
    };
    let (d, o) = (data.to_str().unwrap(), out.to_str().unwrap());
    let common = [
        "train",
        "--data",
        d,
        "--out",
        o,
        "--image-size",
        "32",
        "--d-model",
        "32",
        "--encoder-layers",
        "2",
        "--decoder-layers",
        "1",
        "--heads",
        "4",
        "--ffn-dim",
        "64",
        "--vocab-size",
        "300",
        "--batch-size",
        "2",
        "--steps",
        "1",
        "--eval-examples",
        "2",
        "--quiet",
    ];
    let run = mue(&[
        &common[..],
        &["--resnet", "resnet50", "--freeze-image-trunk"],
    ]
    .concat());
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let cfg = Config::load(&out.join("config.json")).unwrap();
    assert_eq!(
        cfg.image_embedder,
        ImageEmbedder::Resnet { blocks: [3, 4, 6] }
    );
    let st = mue::train::load_state(&out).unwrap();
    assert_eq!((st.step, st.freeze_image_trunk), (1, Some(true)));
    // The random trunk (BatchNorms start as the identity) gives a finite loss, and the
    // model loads for inference.
    let log = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    assert!(first["loss"].as_f64().unwrap().is_finite(), "{first}");
    Model::load_dir(&out, &Device::Cpu).unwrap();

    // Unknown trunks and freezing a model without a trunk are clear errors.
    let bad = mue(&[&common[..], &["--resnet", "resnet18"]].concat());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && err.contains("unknown ResNet"),
        "{err}"
    );
    let mut o = tiny_options(&data, &tmp.path().join("patch"));
    o.freeze_image_trunk = true;
    let e = mue::train::train(&o).unwrap_err().to_string();
    assert!(e.contains("no image trunk"), "{e}");
    o.freeze_image_trunk = false;
    o.resnet = Some([3, 4, 6]);
    o.stem = vec![8];
    let e = mue::train::train(&o).unwrap_err().to_string();
    assert!(e.contains("--resnet and --stem"), "{e}");
}

/// One step's gradients of the 4-example batch of [`dataset`] as `plan` says.
fn step(model: &Model, plan: &StepPlan) -> mue::train::StepGrads {
    mue::train::step_gradients(model, &dataset(), &[0, 1, 2, 3], plan, &Device::Cpu).unwrap()
}

fn plan(model: &Model, shards: usize, threads: usize, mode: Mode) -> StepPlan {
    StepPlan {
        shards,
        threads,
        kind: LossKind::LayerWise,
        mode,
        depths: StreamDepths::default(),
        dropout_seed: 11,
        pad_id: model.cfg.pad_id,
        vocab_size: model.cfg.vocab_size,
        caption_smoothing: 0.1,
    }
}

/// The gradient of every variable, in name order, as host vectors (None: no gradient).
fn grad_values(varmap: &VarMap, grads: &candle_core::backprop::GradStore) -> Vec<Option<Vec<f32>>> {
    let data = varmap.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            grads
                .get(data[n].as_tensor())
                .map(|g| g.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        })
        .collect()
}

#[test]
fn sharded_steps_give_the_whole_batch_loss_and_gradients() {
    let (model, varmap) = tiny();
    // Shard 1 equals the unsharded forward and backward pass, bit for bit.
    let whole = step(&model, &plan(&model, 1, 2, TRAIN));
    let b = batch(&model, 0.1);
    let direct = batch_loss(&model, &b, LossKind::LayerWise, TRAIN).unwrap();
    assert_eq!(whole.loss, scalar(&direct.total));
    assert_eq!(
        grad_values(&varmap, &whole.grads),
        grad_values(&varmap, &direct.total.backward().unwrap())
    );
    let reference = grad_values(&varmap, &whole.grads);
    // 2 shards (2 + 2 rows) and 3 (2 + 1 + 1), each padded to its own longest row: the
    // same loss and gradients up to float rounding (stated tolerance: 1e-5 of the loss,
    // 1e-4 of each variable's largest gradient entry, plus 1e-8).
    for shards in [2, 3] {
        let s = step(&model, &plan(&model, shards, 2, TRAIN));
        assert!(
            (s.loss - whole.loss).abs() <= 1e-5 * whole.loss.abs(),
            "{shards} shards: loss {} vs {}",
            s.loss,
            whole.loss
        );
        for (a, c) in s.per_layer.iter().zip(&whole.per_layer) {
            assert!((a - c).abs() <= 1e-5 * c.abs(), "layer loss {a} vs {c}");
        }
        assert_eq!(s.n_tokens, whole.n_tokens);
        let got = grad_values(&varmap, &s.grads);
        for (g, r) in got.iter().zip(&reference) {
            // Every parameter still gets a gradient, and not an all-zero one.
            let (g, r) = (g.as_ref().expect("a gradient"), r.as_ref().unwrap());
            assert!(g.iter().any(|&x| x != 0.0));
            let scale = r.iter().fold(0f32, |m, x| m.max(x.abs()));
            let diff = g.iter().zip(r).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                diff <= 1e-4 * scale + 1e-8,
                "{shards} shards: gradient differs by {diff} (max {scale})"
            );
        }
    }
}

#[test]
fn sharded_steps_give_the_same_bits_on_one_and_two_threads() {
    let (model, varmap) = tiny();
    // Dropout on and the streams stopped early: masks and depths are per shard and step.
    let mut p = plan(&model, 2, 1, Mode::train(0.2));
    p.depths = StreamDepths {
        image: Some(1),
        text: Some(1),
    };
    for shards in [2, 3] {
        p.shards = shards;
        p.threads = 1;
        let one = step(&model, &p);
        p.threads = 2;
        let two = step(&model, &p);
        assert_eq!(one.loss.to_bits(), two.loss.to_bits(), "{shards} shards");
        assert_eq!(one.per_layer, two.per_layer);
        let (g1, g2) = (
            grad_values(&varmap, &one.grads),
            grad_values(&varmap, &two.grads),
        );
        assert!(
            g1 == g2,
            "{shards} shards: gradients differ across thread counts"
        );
        // Another dropout seed draws other masks.
        p.dropout_seed += 1;
        assert_ne!(step(&model, &p).loss, two.loss);
        p.dropout_seed -= 1;
    }
    // Bad shard counts are errors, not panics.
    for shards in [0, 5] {
        p.shards = shards;
        let e = mue::train::step_gradients(&model, &dataset(), &[0, 1, 2, 3], &p, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("--shards"), "{e}");
    }
}

#[test]
fn a_shard_without_targets_adds_nothing() {
    let (model, varmap) = tiny();
    // Examples 0 and 1 (the first of two shards) lose their targets.
    let mut ds = dataset();
    for e in &mut ds.examples[..2] {
        e.targets.iter_mut().for_each(|t| *t = None);
    }
    let run = |ds: &Dataset, shards| {
        mue::train::step_gradients(
            &model,
            ds,
            &[0, 1, 2, 3],
            &plan(&model, shards, 2, TRAIN),
            &Device::Cpu,
        )
    };
    let (one, two) = (run(&ds, 1).unwrap(), run(&ds, 2).unwrap());
    assert!(one.loss > 0.0 && (two.loss - one.loss).abs() <= 1e-5 * one.loss);
    assert_eq!(two.n_tokens, one.n_tokens);
    let (g1, g2) = (
        grad_values(&varmap, &one.grads),
        grad_values(&varmap, &two.grads),
    );
    for (a, b) in g1.iter().zip(&g2) {
        let (Some(a), Some(b)) = (a, b) else {
            assert_eq!(a.is_some(), b.is_some());
            continue;
        };
        let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
        let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff <= 1e-4 * scale + 1e-8, "gradient differs by {diff}");
    }
    // A batch without any target is an error, sharded or not.
    for e in &mut ds.examples {
        e.targets.iter_mut().for_each(|t| *t = None);
    }
    for shards in [1, 2] {
        let e = run(&ds, shards).err().unwrap().to_string();
        assert!(e.contains("no target positions"), "{shards}: {e}");
    }
}

#[test]
fn a_resumed_run_keeps_its_shard_count() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tiny_benchmark(tmp.path());
    let full_dir = tmp.path().join("full");
    let mut o = tiny_options(&data, &full_dir);
    o.shards = Some(3);
    let full = mue::train::train(&o).unwrap();
    assert_eq!(mue::train::load_state(&full_dir).unwrap().shards, Some(3));

    let part = tmp.path().join("part");
    let mut o = tiny_options(&data, &part);
    o.shards = Some(3);
    o.checkpoint_every = 2;
    o.stop_at = Some(2);
    mue::train::train(&o).unwrap();
    // Resumed without a shard count: the recorded one, so the very same steps.
    o.shards = None;
    o.stop_at = None;
    o.resume = true;
    let r = mue::train::train(&o).unwrap();
    assert_eq!((r.start_step, r.end_step), (2, 3));
    assert_eq!(r.losses[0], full.losses[2]);
    let st = mue::train::load_state(&part).unwrap();
    assert_eq!(st.shards, Some(3));
    // A fresh run defaults to 2 shards; a run recorded before shards had one.
    assert_eq!(mue::train::run_shards(&tiny_options(&data, &part), None), 2);
    let old = r#"{"step":3,"total_steps":3,"seed":0,"batch_size":4,"loss":"layer-wise","examples_seen":12,"optimizer_state":true}"#;
    let old: mue::train::TrainState = serde_json::from_str(old).unwrap();
    assert_eq!(old.shards, None);
    assert_eq!(mue::train::run_shards(&o, Some(&old)), 1);
    // More shards than rows is refused before any work.
    let mut bad = tiny_options(&data, &tmp.path().join("bad"));
    bad.shards = Some(5);
    let e = mue::train::train(&bad).unwrap_err().to_string();
    assert!(e.contains("more than the batch size"), "{e}");
}
