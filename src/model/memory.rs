//! How the process's allocator hands out the large, short-lived buffers of a forward pass.
//!
//! glibc serves every allocation above its mmap threshold (128 KiB, rising to at most 32 MiB
//! as buffers are freed) with a fresh `mmap`, and returns freed memory at the heap's top
//! once more than the trim threshold is free. A forward pass allocates and frees the same
//! large activations every layer (OFA-Base at batch 8: 4800 x 3072 f32, 59 MB, per `fc1`),
//! so each one is faulted in and zeroed page by page by the kernel again: 16% of the
//! profile and 2.8 million page faults for one `mue bench` entailment run at batch 8.
//! Raising both thresholds keeps those buffers in the heap for the next layer to reuse.

/// Both glibc thresholds (bytes). Up to this much freed memory stays in the process.
pub const KEEP_BYTES: usize = 512 << 20;

/// Keeps buffers up to [`KEEP_BYTES`] in the heap (glibc's `M_MMAP_THRESHOLD` and
/// `M_TRIM_THRESHOLD`), unless the user set either through glibc's own
/// `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_`. Called by the `mue` binary before
/// any work; a library leaves its process's allocator alone. Other C libraries: nothing.
/// Returns whether the thresholds were set.
pub fn keep_freed_buffers() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let user_set = ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"]
            .iter()
            .any(|v| std::env::var_os(v).is_some());
        if user_set {
            return false;
        }
        let bytes = KEEP_BYTES as libc::c_int;
        // SAFETY: mallopt only changes two of glibc's tuning values; both are in range.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, bytes) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, bytes) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_accepts_the_thresholds() {
        // Refused values would leave the page faults in place without a word.
        if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none()
            && std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_none()
        {
            assert!(super::keep_freed_buffers());
        }
    }
}
