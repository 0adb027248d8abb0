//! Shared by the timing programs in benches/.

use std::time::Instant;

// The `mue` binary's allocator (`mue::model::memory`), so that the benches time what it runs.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Minimum and median milliseconds of `f` over `iters` calls after two warm-ups.
pub fn time(iters: usize, mut f: impl FnMut()) -> (f64, f64) {
    f();
    f();
    let mut t: Vec<f64> = (0..iters.max(1))
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    (t[0], t[t.len() / 2])
}
