//! The trunk's f32 convolution product on AVX-512, on this file's microkernel (64 output
//! channels x 6 pixels: 24 accumulators, the weight read as 4 vectors and each pixel's
//! input broadcast per depth step), driven directly instead of through `gemm::gemm`:
//! - the weight is packed once at load into 64-channel panels (`gemm` repacked it on every
//!   call, once per thread);
//! - the output is split into tiles of pixels (and, when they are too few for the threads,
//!   of channels) and each tile's im2col, product and epilogue run on one thread while the
//!   tile is in cache (`gemm` split each product, with a barrier per depth block, and left
//!   the im2col and the epilogue to separate passes);
//! - per depth block, one panel's block (64 x `KC`) meets every pixel of the tile in turn,
//!   and the last block's store adds the bias and applies the ReLU (no pass of its own).
//!
//! Each output is the same sum over depth blocks of `KC` (each block one fused multiply-add
//! chain in depth order, added to the partial sum) whatever the tiling and thread count:
//! the results do not depend on the number of threads. The sums are those gemm-f32's
//! `x4x6` microkernel computed here before, bit for bit.

use rayon::prelude::*;

/// Output channels per panel (the microkernel's rows: 4 vectors of 16).
pub const MR: usize = 64;
/// Pixels per microkernel call.
const NR: usize = 6;
/// Depth block: a panel's block (64 x KC floats) is read once per pixel group.
const KC: usize = 256;
/// Largest pixel tile.
const TILE_MAX: usize = 96;
/// Smallest pixel tile before the channels are split too.
const TILE_MIN: usize = 24;

/// Whether this CPU runs the kernel (else the caller keeps `gemm::gemm`).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

thread_local! {
    /// This thread's im2col tile, kept between tasks: a fresh one per task was a new
    /// mapping for the kernel to fault in and zero.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A weight `[k, n]` packed as `ceil(n / 64)` panels `[k][64]` (channels past `n` zero).
#[derive(Debug, Clone)]
pub struct Panels {
    data: Vec<f32>,
    k: usize,
    n: usize,
}

impl Panels {
    /// From a row-major `[k, n]` weight.
    pub fn pack(w: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(w.len(), k * n);
        let panels = n.div_ceil(MR);
        let mut data = vec![0.0; panels * k * MR];
        for (p, panel) in data.chunks_exact_mut(k * MR).enumerate() {
            let cols = MR.min(n - p * MR);
            for (kk, row) in panel.chunks_exact_mut(MR).enumerate() {
                row[..cols].copy_from_slice(&w[kk * n + p * MR..kk * n + p * MR + cols]);
            }
        }
        Self { data, k, n }
    }

    /// The row-major `[k, n]` weight back.
    pub fn unpack(&self) -> Vec<f32> {
        let (k, n) = (self.k, self.n);
        let mut w = vec![0.0; k * n];
        for (p, panel) in self.data.chunks_exact(k * MR).enumerate() {
            let cols = MR.min(n - p * MR);
            for (kk, row) in panel.chunks_exact(MR).enumerate() {
                w[kk * n + p * MR..kk * n + p * MR + cols].copy_from_slice(&row[..cols]);
            }
        }
        w
    }
}

/// A raw pointer that tasks on other threads may write through (disjoint tiles).
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: every task writes a disjoint tile of the output (see `conv`).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// Through a method, so that closures capture the wrapper, not its raw field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// How the output `[rows, n]` is cut: `tiles` pixel ranges (see [`tile_rows`]) and channel
/// ranges of `chunk` channels (a multiple of 64).
fn plan(rows: usize, n: usize, threads: usize) -> (usize, usize) {
    let groups = rows.div_ceil(NR);
    let fewest = groups.div_ceil(TILE_MAX / NR).max(1);
    if threads <= 1 {
        return (fewest, n);
    }
    // At least four tasks per thread keep them balanced; a multiple of the threads, so
    // that equal tiles split evenly (a short last tile left one thread a tile behind).
    let want = 4 * threads;
    let tiles = want
        .min(groups.div_ceil(TILE_MIN / NR))
        .max(fewest)
        .next_multiple_of(threads)
        .min(groups)
        .max(1);
    let panels = n.div_ceil(MR);
    let splits = want.div_ceil(tiles).clamp(1, panels);
    (tiles, panels.div_ceil(splits) * MR)
}

/// Rows of pixel tile `t` of `tiles`: whole groups of 6 pixels (the last one may be short),
/// tiles within one group of each other in size.
fn tile_rows(t: usize, tiles: usize, rows: usize) -> (usize, usize) {
    let groups = rows.div_ceil(NR);
    let r0 = (t * groups / tiles) * NR;
    let r1 = ((t + 1) * groups / tiles * NR).min(rows);
    (r0, r1)
}

/// The left operand `A` (`[rows, k]`, one row per output pixel).
pub enum Rows<'a> {
    /// Stored, row-major (a 1x1 stride-1 convolution's input).
    Stored(&'a [f32]),
    /// Written on demand: `f(r0, m, buf)` fills `buf` (`m * k`) with rows `r0..r0 + m`.
    Gathered(&'a (dyn Fn(usize, usize, &mut [f32]) + Sync)),
}

/// `out [rows, n] = (read_dst ? out : 0) + A W + bias`, then ReLU if `relu`.
pub fn conv(
    w: &Panels,
    a: Rows,
    rows: usize,
    out: &mut [f32],
    read_dst: bool,
    bias: &[f32],
    relu: bool,
) {
    let (k, n) = (w.k, w.n);
    assert!(out.len() == rows * n && bias.len() == n && available());
    if let Rows::Stored(a) = a {
        assert_eq!(a.len(), rows * k);
    }
    if rows == 0 || n == 0 {
        return;
    }
    let threads = candle_core::utils::get_num_threads();
    let (tiles, chunk) = plan(rows, n, threads);
    let chunks = n.div_ceil(chunk);
    let dst = SendPtr(out.as_mut_ptr());
    let task = |t: usize| {
        let ((r0, r1), c0) = (tile_rows(t / chunks, tiles, rows), (t % chunks) * chunk);
        let (m, cn) = (r1 - r0, chunk.min(n - c0));
        let run = |a: &[f32]| {
            // SAFETY: task t alone writes rows r0..r0+m, channels c0..c0+cn of `out`
            // (tiles and chunks partition it); `a` holds m rows of k floats; the panels
            // hold every channel below n.div_ceil(64) * 64 for all k; `available()` holds.
            unsafe {
                let d = dst.get().add(r0 * n);
                tile(w, a, m, d, n, c0, cn, read_dst, bias, relu);
            }
        };
        match &a {
            Rows::Stored(a) => run(&a[r0 * k..(r0 + m) * k]),
            Rows::Gathered(f) => SCRATCH.with(|s| {
                let mut s = s.borrow_mut();
                if s.len() < m * k {
                    s.resize(m * k, 0.0);
                }
                f(r0, m, &mut s[..m * k]);
                run(&s[..m * k]);
            }),
        }
    };
    let tasks = tiles * chunks;
    if threads <= 1 || tasks == 1 {
        (0..tasks).for_each(task);
    } else {
        (0..tasks).into_par_iter().for_each(task);
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    _: &Panels,
    _: &[f32],
    _: usize,
    _: *mut f32,
    _: usize,
    _: usize,
    _: usize,
    _: bool,
    _: &[f32],
    _: bool,
) {
    unreachable!("conv_kernel::available() is false off x86_64")
}

#[cfg(target_arch = "x86_64")]
use x86::tile;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Panels, KC, MR, NR};
    use std::arch::x86_64::*;

    /// One microkernel call: `kc` depth steps of a panel's block `lhs` (64 channels a step)
    /// against pixels `rhs` (one row of `rs` floats each), into `dst` (rows `ldd` apart).
    struct Call {
        kc: usize,
        lhs: *const f32,
        rhs: *const f32,
        rs: usize,
        dst: *mut f32,
        ldd: usize,
        /// The channels of each 16-channel vector that exist.
        masks: [u16; 4],
        /// Add the partial sum already in `dst` (else start it).
        add_dst: bool,
        /// Added last (then ReLU if `relu`); null before the last depth block.
        bias: *const f32,
        relu: bool,
    }

    /// `acc = sum_k lhs[k] * rhs[j][k]` for `NP` pixels x 4 vectors of 16 channels, then
    /// `dst (+)= acc`, `+ bias`, ReLU, stored under the channel masks.
    #[inline(always)]
    unsafe fn ukr<const NP: usize>(c: &Call) {
        let mut acc = [[_mm512_setzero_ps(); 4]; NP];
        for kk in 0..c.kc {
            let l = c.lhs.add(kk * MR);
            let mut a = [_mm512_setzero_ps(); 4];
            for (v, a) in a.iter_mut().enumerate() {
                *a = _mm512_loadu_ps(l.add(16 * v));
            }
            for (j, acc) in acc.iter_mut().enumerate() {
                let b = _mm512_set1_ps(*c.rhs.add(j * c.rs + kk));
                for v in 0..4 {
                    acc[v] = _mm512_fmadd_ps(a[v], b, acc[v]);
                }
            }
        }
        for (j, acc) in acc.iter().enumerate() {
            for (v, &mask) in c.masks.iter().enumerate() {
                let d = c.dst.wrapping_add(j * c.ldd + 16 * v);
                let mut y = acc[v];
                if c.add_dst {
                    y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, d));
                }
                if !c.bias.is_null() {
                    let b = _mm512_maskz_loadu_ps(mask, c.bias.wrapping_add(16 * v));
                    y = _mm512_add_ps(y, b);
                    if c.relu {
                        y = _mm512_max_ps(y, _mm512_setzero_ps());
                    }
                }
                _mm512_mask_storeu_ps(d, mask, y);
            }
        }
    }

    /// [`ukr`] for `nc` (1 to 6) pixels.
    #[target_feature(enable = "avx512f")]
    unsafe fn ukr_n(nc: usize, c: &Call) {
        match nc {
            1 => ukr::<1>(c),
            2 => ukr::<2>(c),
            3 => ukr::<3>(c),
            4 => ukr::<4>(c),
            5 => ukr::<5>(c),
            6 => ukr::<6>(c),
            _ => unreachable!("{nc} pixels"),
        }
    }

    /// `dst[j][c0..c0 + cn] (+)= a[j] @ W[:, c0..c0 + cn]` for the `m` rows of `a` (stride
    /// k), then `+ bias` and ReLU if `relu`.
    ///
    /// # Safety
    /// `dst` holds `m` rows of stride `ldd` with columns `c0..c0 + cn`, `c0 + cn <= ldd`;
    /// `c0` is a multiple of 64; `a` holds `m * w.k` floats; `bias` holds `c0 + cn`;
    /// AVX-512F is available.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile(
        w: &Panels,
        a: &[f32],
        m: usize,
        dst: *mut f32,
        ldd: usize,
        c0: usize,
        cn: usize,
        read_dst: bool,
        bias: &[f32],
        relu: bool,
    ) {
        let k = w.k;
        debug_assert!(a.len() >= m * k && c0.is_multiple_of(MR) && bias.len() >= c0 + cn);
        let (p0, p1, cend) = (c0 / MR, (c0 + cn).div_ceil(MR), c0 + cn);
        let mut k0 = 0;
        while k0 < k {
            let kc = KC.min(k - k0);
            // The first block starts the sum (unless accumulating), the last one adds the
            // bias and applies the ReLU.
            let add_dst = k0 > 0 || read_dst;
            let last = k0 + kc == k;
            for p in p0..p1 {
                let cb = p * MR;
                let mut masks = [0u16; 4];
                for (v, mask) in masks.iter_mut().enumerate() {
                    let cnt = cend.saturating_sub(cb + 16 * v).min(16);
                    *mask = ((1u32 << cnt) - 1) as u16;
                }
                let lhs = w.data.as_ptr().add(p * k * MR + k0 * MR);
                let b = if last {
                    bias.as_ptr().add(cb)
                } else {
                    std::ptr::null()
                };
                for j in (0..m).step_by(NR) {
                    let call = Call {
                        kc,
                        lhs,
                        rhs: a.as_ptr().add(j * k + k0),
                        rs: k,
                        dst: dst.add(j * ldd + cb),
                        ldd,
                        masks,
                        add_dst,
                        bias: b,
                        relu,
                    };
                    ukr_n(NR.min(m - j), &call);
                }
            }
            k0 += kc;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panels_round_trip() {
        for (k, n) in [(3, 5), (7, 64), (5, 130), (1, 1)] {
            let w: Vec<f32> = (0..k * n).map(|i| i as f32 * 0.5 - 3.0).collect();
            assert_eq!(Panels::pack(&w, k, n).unpack(), w, "{k}x{n}");
        }
    }

    /// Tiles partition the rows in whole microkernel calls (6 pixels; the last tile may end
    /// short), no larger than the largest tile, within one call of each other; channel
    /// chunks are whole panels (all channels on one thread); with several threads there are
    /// at least as many tasks as threads whenever the output has that many panels x tiles
    /// of the smallest size, and the tiles split evenly over the threads when there are
    /// enough pixels.
    #[test]
    fn plans_partition_the_output() {
        for rows in [1, 5, 6, 37, 256, 576, 1024, 4096, 16384] {
            for n in [5, 64, 130, 256, 1024] {
                for threads in [1, 2, 3, 16] {
                    let (tiles, chunk) = plan(rows, n, threads);
                    assert!(tiles > 0 && (chunk.is_multiple_of(MR) || chunk == n));
                    assert!(chunk >= MR.min(n));
                    let mut next = 0;
                    let (mut small, mut large) = (usize::MAX, 0);
                    for t in 0..tiles {
                        let (r0, r1) = tile_rows(t, tiles, rows);
                        assert!(r0 == next && r1 > r0 && r1 - r0 <= TILE_MAX, "{rows} {t}");
                        assert!(r0.is_multiple_of(NR));
                        let groups = (r1 - r0).div_ceil(NR);
                        (small, large) = (small.min(groups), large.max(groups));
                        next = r1;
                    }
                    assert!(next == rows && large - small <= 1, "{rows} {tiles}");
                    let tasks = tiles * n.div_ceil(chunk);
                    let possible = rows.div_ceil(TILE_MIN) * n.div_ceil(MR);
                    assert!(
                        threads == 1 || tasks >= threads.min(possible),
                        "{rows} {n} {threads}"
                    );
                    if threads > 1 && rows >= threads * TILE_MIN {
                        assert!(tiles.is_multiple_of(threads), "{rows} {threads}: {tiles}");
                    }
                }
            }
        }
    }
}
