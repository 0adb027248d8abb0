//! How long the `mue` process keeps the memory it frees.
//!
//! A forward pass allocates and frees the same large activations every layer (OFA-Base at
//! batch 8: 4800 x 3072 f32, 59 MB, per `fc1`), and a training step the same activations
//! and gradients every step. Handed back to the OS, each one is faulted in and zeroed page
//! by page again by the next layer or step. The binary therefore allocates through
//! mimalloc (`src/main.rs`), told here to keep freed memory for reuse. mimalloc replaced
//! glibc's malloc with raised thresholds (512 MiB in heap), which still spent ~8% of a v2
//! training step in `_int_malloc` and ~7% in memsets (docs/speed.md, "The allocator").

/// mimalloc's `mi_option_purge_delay` (the 16th entry of `mi_option_e` in both its v2 and
/// v3 `mimalloc.h`; `libmimalloc-sys` names the options around it but not this one):
/// milliseconds before freed memory goes back to the OS, -1 for never. Default 10 in v2,
/// 1000 in v3 (the crate's default build).
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// The user's override, read by mimalloc itself at start-up.
const PURGE_DELAY_ENV: &str = "MIMALLOC_PURGE_DELAY";

/// Freed memory stays with the process for reuse: for good (`None`: batch work such as
/// training, evaluation, benchmarks, whose next step needs the same buffers) or for
/// `Some(ms)` after it was freed (the server, whose idle memory should go back). Nothing
/// when the user set `MIMALLOC_PURGE_DELAY`. Affects mimalloc only, i.e. the `mue`
/// binary's allocator; a library's process keeps its own. Returns whether it was set.
pub fn keep_freed_memory(for_ms: Option<u32>) -> bool {
    if std::env::var_os(PURGE_DELAY_ENV).is_some() {
        return false;
    }
    let ms = for_ms.map_or(-1, |ms| ms as std::ffi::c_long);
    // SAFETY: sets one tuning value, before any other thread of this process allocates
    // through mimalloc (the binary calls it in `main` before starting any thread).
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, ms) };
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The option index is the purge delay: its documented default first (a wrong index
    /// would silently tune something else), then the value set.
    #[test]
    fn sets_mimallocs_purge_delay() {
        if std::env::var_os(PURGE_DELAY_ENV).is_some() {
            return;
        }
        // SAFETY: reads one tuning value.
        let get = || unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) };
        let default = get();
        assert!(
            [10, 1000].contains(&default),
            "not the purge delay's default: {default}"
        );
        assert!(keep_freed_memory(Some(1000)));
        assert_eq!(get(), 1000);
        assert!(keep_freed_memory(None));
        assert_eq!(get(), -1);
    }
}
