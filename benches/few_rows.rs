//! A decoding step's weight products at OFA-Base sizes (d 768, ffn 3072, vocabulary
//! 59457) for 1 and 8 rows: gemm (candle's matmul, the path before the few-row panels
//! took depths > 512), the f32 panels (`vocab::few_rows`) and int8 (`--precision int8`).
//! Prints the minimum and median time of each product over `MUE_BENCH_ITERS` calls
//! (default 40) and the weight bytes streamed per second at the minimum, then a decoding
//! step's sum (6 layers: 6 square products, fc1, fc2; plus the vocabulary projection).
//!
//! Run: `cargo bench --bench few_rows` (threads: `RAYON_NUM_THREADS`, default all cores).

use candle_core::{Device, Module, Tensor};
use mue::model::layers::{Int8Weight, Linear};
use mue::model::vocab::VocabPanels;
use std::sync::Arc;
mod common;
use common::time;

fn main() {
    mue::model::memory::keep_freed_memory(None);
    let iters: usize = std::env::var("MUE_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let dev = Device::Cpu;
    // (name, outputs, depth, times per decoding step)
    let shapes = [
        ("square", 768, 768, 36),
        ("fc1", 3072, 768, 6),
        ("fc2", 768, 3072, 6),
        ("vocab", 59457, 768, 1),
    ];
    println!(
        "threads={} iters={iters}",
        candle_core::utils::get_num_threads()
    );
    for rows in [1, 8] {
        let mut step = [0f64; 3];
        for &(name, n, k, per_step) in &shapes {
            let w = Tensor::randn(0f32, 0.05, (n, k), &dev).unwrap();
            let x = Tensor::randn(0f32, 1.0, (rows, k), &dev).unwrap();
            let plain = Linear::new(w.clone(), None);
            let mut panels = plain.clone();
            panels.panels = Some(Arc::new(VocabPanels::from_tensor(&w).unwrap()));
            let mut int8 = plain.clone();
            int8.int8 = Some(Arc::new(Int8Weight::stack(&[(&plain, 1.0)]).unwrap()));
            let bytes = [4.0, 4.0, 1.0].map(|b| b * (n * k) as f64);
            for (i, (path, lin)) in [("gemm", &plain), ("panels", &panels), ("int8", &int8)]
                .into_iter()
                .enumerate()
            {
                let (min, med) = time(iters, || {
                    lin.forward(&x).unwrap();
                });
                step[i] += min * per_step as f64;
                println!(
                    "{name} {n}x{k} rows={rows} {path}: min_ms={min:.3} median_ms={med:.3} \
                     GB/s={:.1}",
                    bytes[i] / min / 1e6
                );
            }
        }
        println!(
            "decoding step, rows={rows} (sum of minima): gemm {:.1} ms, panels {:.1} ms, int8 {:.1} ms",
            step[0], step[1], step[2]
        );
    }
}
