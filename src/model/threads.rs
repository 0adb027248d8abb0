//! The worker-thread count, fixed once per process.
//!
//! candle asks `get_num_threads()` before every matmul and the inference kernels before every
//! parallel pass; without `RAYON_NUM_THREADS` that re-reads and parses `/proc/cpuinfo` each
//! time (`num_cpus::get_physical`). On the shipped model that was about half the CPU time of
//! `mue eval`, a per-op cost that exits do not remove. Setting the variable to the same count
//! once keeps every thread count, and so every result, unchanged.

use std::sync::Once;

/// Sets `RAYON_NUM_THREADS` to candle's own default when it is unset; a count the user set
/// is kept. Called by the `mue` binary before any work starts (a library leaves its
/// process's environment alone: child processes would inherit the count).
pub fn fix_thread_count() {
    static FIXED: Once = Once::new();
    FIXED.call_once(|| {
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            let n = candle_core::utils::get_num_threads();
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        }
    });
}
