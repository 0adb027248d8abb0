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

/// While alive, every candle op and inference kernel of the process runs on its calling
/// thread: `RAYON_NUM_THREADS` reads 1, which candle's matmul (gemm `Parallelism::None`)
/// and this crate's kernels ask before each call. For work split over threads by the
/// caller (the trainer's data-parallel shards), where per-op threads would only
/// oversubscribe the cores. Guards may overlap (from several threads): the first one in
/// saves the variable, the last one out restores it.
///
/// candle's element-wise ops over 64K elements also use its barrier pool, sized once from
/// `CANDLE_NUM_THREADS` (else `RAYON_NUM_THREADS`) on first use; its calls take a lock, so
/// a process that splits work itself should set `CANDLE_NUM_THREADS=1` before any tensor
/// work (`mue train` does). Under a guard no op's result can depend on the process's
/// thread count.
pub struct SerialOps(());

static SERIAL: std::sync::Mutex<(usize, Option<std::ffi::OsString>)> =
    std::sync::Mutex::new((0, None));

impl SerialOps {
    pub fn enter() -> Self {
        let mut s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        if s.0 == 0 {
            s.1 = std::env::var_os("RAYON_NUM_THREADS");
            std::env::set_var("RAYON_NUM_THREADS", "1");
        }
        s.0 += 1;
        SerialOps(())
    }
}

impl Drop for SerialOps {
    fn drop(&mut self) {
        let mut s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        s.0 -= 1;
        if s.0 == 0 {
            match s.1.take() {
                Some(v) => std::env::set_var("RAYON_NUM_THREADS", v),
                None => std::env::remove_var("RAYON_NUM_THREADS"),
            }
        }
    }
}
