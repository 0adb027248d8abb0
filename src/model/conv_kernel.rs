//! The trunk's f32 convolution product on AVX-512, with gemm-f32's own `x4x6` microkernel
//! (64 output channels x 6 pixels) driven here instead of through `gemm::gemm`:
//! - the weight is packed once at load into the microkernel's 64-channel panels (`gemm`
//!   repacked it on every call, once per thread);
//! - the output is split into tiles of pixels (and, when they are too few for the threads,
//!   of channels) and each tile's im2col, product and epilogue run on one thread while the
//!   tile is in cache (`gemm` split each product, with a barrier per depth block, and left
//!   the im2col and the epilogue to separate passes).
//!
//! Each output is the same sum over depth blocks of `KC` whatever the tiling and thread
//! count: the results do not depend on the number of threads.

use rayon::prelude::*;

/// Output channels per panel (the microkernel's rows: 4 vectors of 16).
pub const MR: usize = 64;
/// Pixels per microkernel call.
const NR: usize = 6;
/// Depth block: a panel's block (64 x KC) stays in L2 while the pixels stream past it.
const KC: usize = 256;
/// Panels per pass over a pixel tile: their blocks (8 x 64 KiB) share L2.
const PANELS_PER_PASS: usize = 8;
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

/// How the output `[rows, n]` is cut: pixel tiles of `tile` rows, channel ranges of
/// `chunk` channels (a multiple of 64).
fn plan(rows: usize, n: usize, threads: usize) -> (usize, usize) {
    if threads <= 1 {
        return (TILE_MAX.min(rows.next_multiple_of(NR)), n);
    }
    // At least four tasks per thread keep them balanced.
    let want = 4 * threads;
    let tile = rows
        .div_ceil(want)
        .next_multiple_of(NR)
        .clamp(TILE_MIN, TILE_MAX);
    let tiles = rows.div_ceil(tile);
    let panels = n.div_ceil(MR);
    let splits = want.div_ceil(tiles).clamp(1, panels);
    (tile, panels.div_ceil(splits) * MR)
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
    let (tile, chunk) = plan(rows, n, threads);
    let (tiles, chunks) = (rows.div_ceil(tile), n.div_ceil(chunk));
    let dst = SendPtr(out.as_mut_ptr());
    let task = |t: usize| {
        let (r0, c0) = ((t / chunks) * tile, (t % chunks) * chunk);
        let (m, cn) = (tile.min(rows - r0), chunk.min(n - c0));
        let run = |a: &[f32]| {
            // SAFETY: task t alone writes rows r0..r0+m, channels c0..c0+cn of `out`
            // (tiles and chunks partition it); `a` holds m rows of k floats; the panels
            // hold every channel below n.div_ceil(64) * 64 for all k; `available()` holds.
            unsafe {
                let d = dst.get().add(r0 * n);
                tile_product(w, a, m, d, n, c0, cn, read_dst);
                tile_epilogue(d, n, m, c0, cn, bias, relu);
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

/// `dst[j][c0..c0 + cn] (+)= a[j] @ W[:, c0..c0 + cn]` for the `m` rows of `a` (stride k).
///
/// # Safety
/// `dst` holds `m` rows of stride `ldd` with columns `c0..c0 + cn`; `c0` is a multiple of
/// 64; `a` holds `m * w.k` floats; AVX-512F is available.
#[allow(clippy::too_many_arguments)]
#[cfg(target_arch = "x86_64")]
unsafe fn tile_product(
    w: &Panels,
    a: &[f32],
    m: usize,
    dst: *mut f32,
    ldd: usize,
    c0: usize,
    cn: usize,
    read_dst: bool,
) {
    use gemm_f32::microkernel::avx512f::f32::UKR;
    let k = w.k;
    debug_assert!(a.len() >= m * k && c0.is_multiple_of(MR));
    let (p0, p1) = (c0 / MR, (c0 + cn).div_ceil(MR));
    let mut k0 = 0;
    while k0 < k {
        let kc = KC.min(k - k0);
        let alpha_status = if k0 == 0 && !read_dst { 0 } else { 1 };
        for g in (p0..p1).step_by(PANELS_PER_PASS) {
            for j in (0..m).step_by(NR) {
                let nc = NR.min(m - j);
                let rhs = a.as_ptr().add(j * k + k0);
                for p in g..(g + PANELS_PER_PASS).min(p1) {
                    let mc = MR.min(c0 + cn - p * MR);
                    let lhs = w.data.as_ptr().add(p * k * MR + k0 * MR);
                    UKR[mc.div_ceil(16) - 1][nc - 1](
                        mc,
                        nc,
                        kc,
                        dst.add(j * ldd + p * MR),
                        lhs,
                        rhs,
                        ldd as isize, // dst_cs: next pixel
                        1,            // dst_rs: next channel
                        MR as isize,  // lhs_cs: next depth in the panel
                        1,            // rhs_rs: next depth in the pixel's row
                        k as isize,   // rhs_cs: next pixel
                        1.0,
                        1.0,
                        alpha_status,
                        false,
                        false,
                        false,
                        std::ptr::null(),
                    );
                }
            }
        }
        k0 += kc;
    }
}

#[allow(clippy::too_many_arguments)]
#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile_product(
    _: &Panels,
    _: &[f32],
    _: usize,
    _: *mut f32,
    _: usize,
    _: usize,
    _: usize,
    _: bool,
) {
    unreachable!("conv_kernel::available() is false off x86_64")
}

/// Bias and ReLU on the tile just written (still in cache).
///
/// # Safety
/// As [`tile_product`]'s `dst`.
unsafe fn tile_epilogue(
    dst: *mut f32,
    ldd: usize,
    m: usize,
    c0: usize,
    cn: usize,
    bias: &[f32],
    relu: bool,
) {
    let bias = &bias[c0..c0 + cn];
    for j in 0..m {
        let row = std::slice::from_raw_parts_mut(dst.add(j * ldd + c0), cn);
        if relu {
            for (v, b) in row.iter_mut().zip(bias) {
                *v = (*v + b).max(0.0);
            }
        } else {
            for (v, b) in row.iter_mut().zip(bias) {
                *v += b;
            }
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

    /// Tiles are whole microkernel calls (multiples of 6 pixels) within bounds, channel
    /// chunks whole panels (all channels on one thread); with several threads there are at
    /// least as many tasks as threads whenever the output has that many panels x tiles of
    /// the smallest size.
    #[test]
    fn plans_partition_the_output() {
        for rows in [1, 5, 6, 37, 256, 576, 4096, 16384] {
            for n in [5, 64, 130, 256, 1024] {
                for threads in [1, 2, 3, 16] {
                    let (tile, chunk) = plan(rows, n, threads);
                    assert!(
                        tile.is_multiple_of(NR)
                            && tile > 0
                            && (chunk.is_multiple_of(MR) || chunk == n)
                    );
                    assert!(chunk >= MR.min(n) && tile <= TILE_MAX);
                    let tasks = rows.div_ceil(tile) * n.div_ceil(chunk);
                    let possible = rows.div_ceil(TILE_MIN) * n.div_ceil(MR);
                    assert!(
                        threads == 1 || tasks >= threads.min(possible),
                        "{rows} {n} {threads}"
                    );
                }
            }
        }
    }
}
