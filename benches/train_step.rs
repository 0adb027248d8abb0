//! Training-step time of the default model's architecture (6+6 layers, d 128, 16-px
//! patches on 64-px images, 471-token vocabulary) on a batch of 32 shaped like the
//! benchmark's (half captions, half entailment questions), split into forward (with the
//! layer-wise loss), backward and optimiser. The 90-minute training budget is spent here,
//! so this is the number to lower. Prints medians from one run, the speed-up of the fused
//! layer-norm / GELU kernels over candle's composed ops, and the cost of dropout.
//!
//! Run: `cargo bench --bench train_step` (RAYON_NUM_THREADS=1 or 2 to compare threads;
//! MUE_BENCH_ITERS to change repetitions).

use candle_core::Device;
use image::RgbImage;
use mue::model::layers::Mode;
use mue::model::{BranchInit, Model};
use mue::task::Task;
use mue::train::data::{make_batch, Dataset, Example};
use mue::train::{batch_loss, AdamW, AdamWParams, LossKind, TrainOptions};
use std::time::Instant;

/// 16 captions (prompt 7 tokens, caption 10) and 16 questions (prompt 16 tokens in both
/// encoder and decoder, one answer), over 32 distinct images.
fn dataset(vocab: u32) -> Dataset {
    let tok = |i: usize, j: usize| 4 + ((i * 31 + j * 7) as u32 % (vocab - 4));
    let mut examples = Vec::new();
    for i in 0..16 {
        let cap: Vec<u32> = (0..10).map(|j| tok(i, j)).collect();
        let mut dec = vec![0];
        dec.extend(&cap);
        examples.push(Example {
            task: Task::Caption,
            image: i,
            enc_ids: [0]
                .into_iter()
                .chain((0..5).map(|j| tok(0, j)))
                .chain([2])
                .collect(),
            dec_ids: dec,
            targets: cap.iter().copied().chain([2]).map(Some).collect(),
        });
    }
    for i in 16..32 {
        let prompt: Vec<u32> = (0..14 + i % 3).map(|j| tok(i, j)).collect();
        let mut dec = vec![0];
        dec.extend(&prompt);
        dec.push(5);
        let mut targets = vec![None; dec.len()];
        targets[dec.len() - 2] = Some(5);
        examples.push(Example {
            task: Task::Entail,
            image: i,
            enc_ids: [0].into_iter().chain(prompt).chain([2]).collect(),
            dec_ids: dec,
            targets,
        });
    }
    Dataset {
        images: (0..32u32)
            .map(|s| {
                RgbImage::from_fn(64, 64, |x, y| {
                    let v = (x * 7 + y * 13 + s * 29) % 256;
                    image::Rgb([v as u8, (255 - v) as u8, (v / 2) as u8])
                })
            })
            .collect(),
        examples,
        skipped: 0,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let iters: usize = std::env::var("MUE_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let mut o = TrainOptions::new("", "");
    o.patch = 16;
    let cfg = o.config(471);
    let dev = Device::Cpu;
    let ds = dataset(cfg.vocab_size as u32);
    let idx: Vec<usize> = (0..ds.examples.len()).collect();
    let batch = make_batch(&ds, &idx, cfg.pad_id, cfg.vocab_size, 0.1, &dev).unwrap();
    println!(
        "batch {} ({} tokens), RAYON_NUM_THREADS={}, median of {iters}",
        idx.len(),
        batch.n_tokens,
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "unset".into())
    );
    println!(
        "{:<22} {:>10} {:>10} {:>10} {:>10} {:>12}",
        "kernels, dropout", "forward", "backward", "optimiser", "step ms", "examples/s"
    );
    let mut steps = Vec::new();
    // Fused layer norm / GELU (what training uses) against candle's composed ops.
    for (fused, dropout) in [(false, 0.1f32), (true, 0.0), (true, 0.1)] {
        let (model, varmap) = Model::init_trainable(&cfg, 0, BranchInit::Unit, &dev).unwrap();
        let mut opt = AdamW::new(&varmap, AdamWParams::default()).unwrap();
        let mode = Mode {
            fused,
            ..Mode::train(dropout)
        };
        let (mut f, mut b, mut s) = (vec![], vec![], vec![]);
        for it in 0..=iters {
            mue::model::layers::seed_dropout(it as u64);
            let t0 = Instant::now();
            let out = batch_loss(&model, &batch, LossKind::LayerWise, mode).unwrap();
            out.total.to_scalar::<f32>().unwrap();
            let t1 = Instant::now();
            let grads = out.total.backward().unwrap();
            let t2 = Instant::now();
            opt.step(&grads, 1e-4, Some(1.0)).unwrap();
            let t3 = Instant::now();
            if it > 0 {
                f.push((t1 - t0).as_secs_f64() * 1e3);
                b.push((t2 - t1).as_secs_f64() * 1e3);
                s.push((t3 - t2).as_secs_f64() * 1e3);
            }
        }
        let total: Vec<f64> = (0..iters).map(|i| f[i] + b[i] + s[i]).collect();
        let step = median(total);
        steps.push(step);
        println!(
            "{:<22} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>12.1}",
            format!("{}, {dropout}", if fused { "fused" } else { "composed" }),
            median(f),
            median(b),
            median(s),
            step,
            idx.len() as f64 / step * 1e3
        );
    }
    println!(
        "step time, composed / fused kernels (dropout 0.1): {:.2}",
        steps[0] / steps[2]
    );
    println!(
        "step time, dropout 0.1 / dropout 0 (fused): {:.2}",
        steps[2] / steps[1]
    );
}
