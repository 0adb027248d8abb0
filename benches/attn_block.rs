//! Encoder self-attention at inference, OFA sizes: the composed ops (three head-splitting
//! copies, `q k^T`, the in-place bias + softmax, `p v`, head scale, a transposing copy)
//! against the block kernel (`model::attn_block`, heads read in place), both followed by
//! the output projection, which is also timed alone. Inputs are the projections' outputs
//! `[b, n, h*dh]` and a full `[b, h, n, n]` bias, as the joint encoder passes them.
//! The two paths alternate call by call; prints the minimum and median of each over
//! `MUE_BENCH_ITERS` calls (default 10) and the attention's GFLOP/s (4 n^2 dh per head
//! and sample) at the minimum, projection time subtracted.
//!
//! Run: `cargo bench --bench attn_block` (threads: `RAYON_NUM_THREADS`, default all cores).

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use mue::model::layers::{head_view, split_heads, Attention, Linear, Mode};
use std::time::Instant;

fn stats(mut t: Vec<f64>) -> (f64, f64) {
    t.sort_by(f64::total_cmp);
    (t[0], t[t.len() / 2])
}

// For the allocator only.
#[allow(dead_code)]
mod common;

fn ms(f: impl FnOnce()) -> f64 {
    let s = Instant::now();
    f();
    s.elapsed().as_secs_f64() * 1e3
}

fn main() {
    mue::model::memory::keep_freed_memory(None);
    let iters: usize = std::env::var("MUE_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let dev = Device::Cpu;
    println!(
        "threads={} iters={iters}",
        candle_core::utils::get_num_threads()
    );
    // (model, d, heads, sequence: image patches + 24 text tokens)
    let shapes = [("tiny", 256, 4, 256 + 24), ("base", 768, 12, 576 + 24)];
    for (name, d, h, n) in shapes {
        let mut att = Attention::load(d, h, 2.0, VarBuilder::zeros(DType::F32, &dev)).unwrap();
        att.c_attn = Tensor::randn(1f32, 0.1, h, &dev).unwrap();
        let w = Tensor::randn(0f32, 0.02, (d, d), &dev).unwrap();
        att.out_proj = Linear::new(w, Some(Tensor::zeros(d, DType::F32, &dev).unwrap()));
        for b in [1, 8] {
            let x = || Tensor::randn(0f32, 1.0, (b, n, d), &dev).unwrap();
            let (q, k, v) = (x(), x(), x());
            let bias = Tensor::randn(0f32, 1.0, (b, h, n, n), &dev).unwrap();
            let only_block = std::env::var_os("MUE_BENCH_BLOCK_ONLY").is_some();
            let composed = || {
                if only_block {
                    return;
                }
                let (q, k, v) = (split_heads(&q, h), split_heads(&k, h), split_heads(&v, h));
                att.attend_composed(
                    &q.unwrap(),
                    &k.unwrap(),
                    &v.unwrap(),
                    Some(&bias),
                    Mode::INFER,
                )
                .unwrap();
            };
            let fused = || {
                let (q, k, v) = (head_view(&q, h), head_view(&k, h), head_view(&v, h));
                att.attend(
                    &q.unwrap(),
                    &k.unwrap(),
                    &v.unwrap(),
                    Some(&bias),
                    Mode::INFER,
                )
                .unwrap();
            };
            let proj = || {
                candle_core::Module::forward(&att.out_proj, &q).unwrap();
            };
            for _ in 0..2 {
                composed();
                fused();
                proj();
            }
            let (mut tc, mut tf, mut tp) = (vec![], vec![], vec![]);
            for _ in 0..iters {
                tc.push(ms(composed));
                tf.push(ms(fused));
                tp.push(ms(proj));
            }
            let ((cmin, cmed), (fmin, fmed), (pmin, pmed)) = (stats(tc), stats(tf), stats(tp));
            let flop = (4 * b * h * n * n * (d / h)) as f64;
            let gf = |t: f64| flop / ((t - pmin).max(1e-3) * 1e6);
            println!(
                "{name} d={d} h={h} n={n} b={b}: composed min_ms={cmin:.2} median_ms={cmed:.2} \
                 ({:.1} GFLOP/s) | block min_ms={fmin:.2} median_ms={fmed:.2} ({:.1} GFLOP/s) \
                 | out_proj alone min_ms={pmin:.2} median_ms={pmed:.2}",
                gf(cmin),
                gf(fmin)
            );
        }
    }
}
