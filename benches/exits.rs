//! Latency of full depth vs. exits at a fixed depth on a random model of OFA-tiny size
//! (4+4 layers, d 256, 256 image patches), batch 1 and batch 16. Prints, from one run,
//! the measured time ratio beside the ratio of multiply-adds executed.
//!
//! Run: `cargo bench --bench exits` (set MUE_BENCH_ITERS to change repetitions).

use candle_core::{Device, Tensor};
use mue::exit::{ExitPolicy, FullDepth, StaticDepth};
use mue::generate::{self, Input, KvFill, SearchConfig};
use mue::model::{Config, EncoderMode, Model};
mod common;

fn inputs(cfg: &Config, n: usize) -> Vec<Input> {
    (0..n)
        .map(|i| Input {
            image: Tensor::randn(0f32, 1.0, (3, cfg.image_size, cfg.image_size), &Device::Cpu)
                .unwrap(),
            text_ids: std::iter::once(0)
                .chain((0..12).map(|j| 4 + ((i * 13 + j * 7) % 500) as u32))
                .chain(std::iter::once(2))
                .collect(),
        })
        .collect()
}

/// Median wall time (ms) of `f` over `iters` runs after warm-ups, and its MACs.
fn time<F: FnMut() -> (u64, u64)>(iters: usize, mut f: F) -> (f64, u64, u64) {
    let (ex, full) = f();
    let (_, median) = common::time(iters, || {
        f();
    });
    (median, ex, full)
}

fn main() {
    mue::model::memory::keep_freed_memory(None);
    let iters: usize = std::env::var("MUE_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let cfg = Config::ofa_tiny_patch(EncoderMode::Decomposed);
    let (model, _) = Model::random(&cfg, 0, &Device::Cpu).unwrap();
    let half = StaticDepth {
        image: 2,
        text: 2,
        decoder: 2,
    };
    let one = StaticDepth {
        image: 1,
        text: 1,
        decoder: 1,
    };
    let search = SearchConfig {
        beam: 1,
        max_len: 8,
        min_len: 8,
        no_repeat_ngram: 0,
        len_penalty: 1.0,
        kv_fill: KvFill::Propagate,
    };
    println!(
        "{:<10} {:>5} {:<16} {:>10} {:>12} {:>12}",
        "workload", "batch", "policy", "ms", "time ratio", "MAC ratio"
    );
    for batch in [1usize, 16] {
        let inp = inputs(&cfg, batch);
        let prefixes: Vec<Vec<u32>> = inp
            .iter()
            .map(|x| x.text_ids[..x.text_ids.len() - 1].to_vec())
            .collect();
        let cands = vec![vec![10u32], vec![11], vec![12]];
        for workload in ["entail", "caption"] {
            let mut base = None;
            let policies: [(&str, &dyn ExitPolicy); 3] = [
                ("full", &FullDepth),
                ("exit@2 of 4", &half),
                ("exit@1 of 4", &one),
            ];
            for (name, policy) in policies {
                let (ms, ex, full) = time(iters, || {
                    let costs: Vec<generate::Cost> = if workload == "entail" {
                        generate::classify(&model, &inp, &prefixes, &cands, policy)
                            .unwrap()
                            .into_iter()
                            .map(|r| r.cost)
                            .collect()
                    } else {
                        generate::caption(&model, &inp, policy, &search)
                            .unwrap()
                            .into_iter()
                            .map(|r| r.cost)
                            .collect()
                    };
                    (
                        costs.iter().map(|c| c.macs_executed).sum(),
                        costs.iter().map(|c| c.macs_full).sum(),
                    )
                });
                let b = *base.get_or_insert(ms);
                println!(
                    "{:<10} {:>5} {:<16} {:>10.1} {:>12.3} {:>12.3}",
                    workload,
                    batch,
                    name,
                    ms,
                    ms / b,
                    ex as f64 / full as f64
                );
            }
        }
    }
}
