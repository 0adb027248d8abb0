//! The tied vocabulary projection at inference, `logits = x E^T`, for the few rows of a
//! decoding step.
//!
//! gemm multiplies `E x^T` for 2..16 rows with its general kernel: it repacks the whole
//! embedding matrix `E` (vocabulary x d) into panels on every call and fills only half
//! of its 16-row register tile at batch 8; the step reads ~61 MB (OFA's 59457 x 256)
//! either way. [`VocabPanels`] packs `E` once, at load, into panels of 16 vocabulary rows
//! laid out `[d][16]`, so a step streams it once with every lane busy.
//!
//! Same values as gemm up to `d <= 512` ([`MAX_DEPTH`]: OFA-Tiny, -Medium and the shipped
//! model): each logit is one fused multiply-add chain over `d` in order, starting from
//! zero, which is what gemm's kernel computes for these shapes while `d` fits one depth
//! block. There one row keeps gemm's matrix-vector path (another summation order), split
//! over the threads by vocabulary rows.
//!
//! Deeper products (OFA-Base's d 768, every model's `fc2` of depth ffn > 512) have no gemm
//! bits to keep (gemm splits the chain by the machine's cache sizes), so the panels take
//! them at 1..16 rows too, in their own order ([`deep_chains`]): two fused chains per
//! output, even and odd `k`, summed at the end, with the depth walked in blocks that keep
//! a panel's slice in L1 across the rows. The order depends on `d` alone (not on the row
//! count, the thread count or the CPU), so a row's outputs are the same at any batch.

use candle_core::{Result, Tensor};

/// Vocabulary rows per panel (one AVX-512 register of f32).
const LANES: usize = 16;
/// Most rows the panel kernel takes; more go to gemm's packed kernel, which then
/// does enough work per packed element.
pub const MAX_ROWS: usize = 16;
/// Deepest product the panels take: gemm computes one chain per output up to here.
pub const MAX_DEPTH: usize = 512;

/// Depth block of [`deep_chains`] (even): 128 x 16 floats of a panel (8 KiB) stay in L1
/// while every row group reads them.
const DEEP_BLOCK: usize = 128;

/// Whether `rows` x `n` logits of depth `d` take the panels. Up to [`MAX_DEPTH`]: where
/// gemm would run its general kernel (2+ rows; up to 256 outputs it computes dot products
/// another way) in one depth block, so that the bits are gemm's. Deeper: 1..16 rows.
pub fn takes(rows: usize, n: usize, d: usize) -> bool {
    if d > MAX_DEPTH {
        (1..=MAX_ROWS).contains(&rows)
    } else {
        (2..=MAX_ROWS).contains(&rows) && rows * n > 256
    }
}

/// `E` `[n, d]` as panels `[ceil(n / 16)][d][16]`, the last one zero-padded.
#[derive(Debug)]
pub struct VocabPanels {
    n: usize,
    d: usize,
    data: Vec<f32>,
}

impl VocabPanels {
    /// Packs row-major `e` of `n` rows of `d`.
    pub fn new(e: &[f32], n: usize, d: usize) -> Result<Self> {
        if e.len() != n * d || n == 0 || d == 0 {
            candle_core::bail!("vocabulary matrix of {} values is not {n} x {d}", e.len());
        }
        let panels = n.div_ceil(LANES);
        let mut data = vec![0f32; panels * d * LANES];
        for (i, row) in e.chunks_exact(d).enumerate() {
            let (p, lane) = (i / LANES, i % LANES);
            let panel = &mut data[p * d * LANES..(p + 1) * d * LANES];
            for (k, &v) in row.iter().enumerate() {
                panel[k * LANES + lane] = v;
            }
        }
        Ok(Self { n, d, data })
    }

    /// Packs the embedding matrix `e` `[n, d]` (f32 on the CPU).
    pub fn from_tensor(e: &Tensor) -> Result<Self> {
        let (n, d) = e.dims2()?;
        let v = e
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Self::new(&v, n, d)
    }

    pub fn rows(&self) -> usize {
        self.n
    }

    /// Columns of the packed matrix (`d`).
    pub fn depth(&self) -> usize {
        self.d
    }

    /// `y [m, n] = x [m, d] E^T`, threads splitting the panels.
    pub fn product(&self, x: &[f32], m: usize, y: &mut [f32]) -> Result<()> {
        let (n, d) = (self.n, self.d);
        if x.len() != m * d || y.len() != m * n {
            candle_core::bail!(
                "vocabulary product: {} inputs / {} outputs for {m} rows of {d} -> {n}",
                x.len(),
                y.len()
            );
        }
        let panels = n.div_ceil(LANES);
        let threads = candle_core::utils::get_num_threads().clamp(1, panels);
        let out = SharedOut(y.as_mut_ptr());
        let per = panels.div_ceil(threads);
        let run = |t: usize| {
            let ps = t * per..((t + 1) * per).min(panels);
            // SAFETY: each part writes only the columns of its own panels.
            unsafe { self.panels(x, m, ps, &out) }
        };
        if threads == 1 {
            run(0);
        } else {
            use rayon::prelude::*;
            (0..threads).into_par_iter().for_each(run);
        }
        Ok(())
    }

    /// Panels `ps` into their columns of `out` (`[m, n]`).
    unsafe fn panels(&self, x: &[f32], m: usize, ps: std::ops::Range<usize>, out: &SharedOut) {
        let (n, d) = (self.n, self.d);
        let mut acc = [[0f32; LANES]; MAX_ROWS];
        for p in ps {
            let panel = &self.data[p * d * LANES..(p + 1) * d * LANES];
            let cols = LANES.min(n - p * LANES);
            if d > MAX_DEPTH {
                deep_chains(panel, x, m, d, &mut acc[..m]);
                for (i, a) in acc[..m].iter().enumerate() {
                    let dst = out.0.add(i * n + p * LANES);
                    std::ptr::copy_nonoverlapping(a.as_ptr(), dst, cols);
                }
                continue;
            }
            // Groups of at most 8 rows: 8 accumulators and the panel's registers fit.
            let mut r0 = 0;
            while r0 < m {
                let r = (m - r0).min(8);
                let xs = &x[r0 * d..(r0 + r) * d];
                chains(panel, xs, r, d, &mut acc[..r]);
                for (i, a) in acc[..r].iter().enumerate() {
                    let dst = out.0.add((r0 + i) * n + p * LANES);
                    std::ptr::copy_nonoverlapping(a.as_ptr(), dst, cols);
                }
                r0 += r;
            }
        }
    }
}

struct SharedOut(*mut f32);
// SAFETY: threads write disjoint columns (see `VocabPanels::product`).
unsafe impl Sync for SharedOut {}

/// `acc[i][l] = sum_k panel[k][l] * xs[i][k]`, one fused chain per lane in `k` order.
fn chains(panel: &[f32], xs: &[f32], r: usize, d: usize, acc: &mut [[f32; LANES]]) {
    macro_rules! dispatch {
        ($f:ident) => {
            match r {
                1 => $f::<1>(panel, xs, d, acc),
                2 => $f::<2>(panel, xs, d, acc),
                3 => $f::<3>(panel, xs, d, acc),
                4 => $f::<4>(panel, xs, d, acc),
                5 => $f::<5>(panel, xs, d, acc),
                6 => $f::<6>(panel, xs, d, acc),
                7 => $f::<7>(panel, xs, d, acc),
                _ => $f::<8>(panel, xs, d, acc),
            }
        };
    }
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
            // SAFETY: the features were just detected.
            unsafe { dispatch!(chains_avx512) };
            return;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the features were just detected.
            unsafe { dispatch!(chains_avx2) };
            return;
        }
    }
    dispatch!(chains_body)
}

#[inline(always)]
fn chains_body<const R: usize>(panel: &[f32], xs: &[f32], d: usize, acc: &mut [[f32; LANES]]) {
    let mut a = [[0f32; LANES]; R];
    for (k, e) in panel.chunks_exact(LANES).enumerate().take(d) {
        for (i, ai) in a.iter_mut().enumerate() {
            let xv = xs[i * d + k];
            for (v, &el) in ai.iter_mut().zip(e) {
                *v = el.mul_add(xv, *v);
            }
        }
    }
    acc[..R].copy_from_slice(&a);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn chains_avx512<const R: usize>(
    panel: &[f32],
    xs: &[f32],
    d: usize,
    acc: &mut [[f32; LANES]],
) {
    chains_body::<R>(panel, xs, d, acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn chains_avx2<const R: usize>(
    panel: &[f32],
    xs: &[f32],
    d: usize,
    acc: &mut [[f32; LANES]],
) {
    chains_body::<R>(panel, xs, d, acc)
}

/// Rows per group of [`deep_chains`]: 4 rows x 2 chains x 16 lanes, 8 AVX-512 registers.
const DEEP_ROWS: usize = 4;

/// `acc[i][l] = sum_k panel[k][l] * x[i][k]` for all `m <= 16` rows of `x` (`[m, d]`):
/// per output two fused chains, over even and over odd `k` (from zero, in `k` order), then
/// their sum. The depth is walked in blocks of [`DEEP_BLOCK`], each block read by every
/// group of [`DEEP_ROWS`] rows while it is in L1; the chains carry across blocks, so the
/// blocking and the grouping leave the order (and the bits) as defined.
fn deep_chains(panel: &[f32], x: &[f32], m: usize, d: usize, acc: &mut [[f32; LANES]]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
            // SAFETY: the features were just detected.
            unsafe { deep_avx512(panel, x, m, d, acc) };
            return;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the features were just detected.
            unsafe { deep_avx2(panel, x, m, d, acc) };
            return;
        }
    }
    deep_body(panel, x, m, d, acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn deep_avx512(panel: &[f32], x: &[f32], m: usize, d: usize, acc: &mut [[f32; LANES]]) {
    deep_walk(panel, x, m, d, acc, |block, xs, k0, c| match c.len() {
        // SAFETY: AVX-512 F is present (the caller's target feature).
        1 => unsafe { deep_block_avx512::<1>(block, xs, d, k0, c) },
        2 => unsafe { deep_block_avx512::<2>(block, xs, d, k0, c) },
        3 => unsafe { deep_block_avx512::<3>(block, xs, d, k0, c) },
        _ => unsafe { deep_block_avx512::<4>(block, xs, d, k0, c) },
    })
}

/// [`deep_block`] with AVX-512 intrinsics (the compiler vectorizes the portable form
/// across rows, with gathers): the same fused operations in the same order, so the same
/// bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::needless_range_loop)] // rows index two register arrays and `x` in lockstep
unsafe fn deep_block_avx512<const R: usize>(
    block: &[f32],
    xs: &[f32],
    d: usize,
    k0: usize,
    ch: &mut [[[f32; LANES]; 2]],
) {
    use std::arch::x86_64::*;
    assert!(ch.len() >= R && xs.len() >= R * d && k0 + block.len() / LANES <= d);
    let mut a0 = [_mm512_setzero_ps(); R];
    let mut a1 = [_mm512_setzero_ps(); R];
    for i in 0..R {
        a0[i] = _mm512_loadu_ps(ch[i][0].as_ptr());
        a1[i] = _mm512_loadu_ps(ch[i][1].as_ptr());
    }
    let kk = block.len() / LANES;
    let (e, x) = (block.as_ptr(), xs.as_ptr());
    // SAFETY (the pointer reads): `j < kk / 2` keeps `2j + 1 < kk` inside the block and
    // `k0 + 2j + 1 < d` inside each row (asserted above).
    for j in 0..kk / 2 {
        let e0 = _mm512_loadu_ps(e.add(2 * j * LANES));
        let e1 = _mm512_loadu_ps(e.add((2 * j + 1) * LANES));
        let k = k0 + 2 * j;
        for i in 0..R {
            let x0 = _mm512_set1_ps(*x.add(i * d + k));
            let x1 = _mm512_set1_ps(*x.add(i * d + k + 1));
            a0[i] = _mm512_fmadd_ps(e0, x0, a0[i]);
            a1[i] = _mm512_fmadd_ps(e1, x1, a1[i]);
        }
    }
    if kk % 2 == 1 {
        let e0 = _mm512_loadu_ps(e.add((kk - 1) * LANES));
        let k = k0 + kk - 1;
        for i in 0..R {
            a0[i] = _mm512_fmadd_ps(e0, _mm512_set1_ps(*x.add(i * d + k)), a0[i]);
        }
    }
    for i in 0..R {
        _mm512_storeu_ps(ch[i][0].as_mut_ptr(), a0[i]);
        _mm512_storeu_ps(ch[i][1].as_mut_ptr(), a1[i]);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn deep_avx2(panel: &[f32], x: &[f32], m: usize, d: usize, acc: &mut [[f32; LANES]]) {
    deep_body(panel, x, m, d, acc)
}

#[inline(always)]
fn deep_body(panel: &[f32], x: &[f32], m: usize, d: usize, acc: &mut [[f32; LANES]]) {
    deep_walk(panel, x, m, d, acc, |block, xs, k0, c| match c.len() {
        1 => deep_block::<1>(block, xs, d, k0, c),
        2 => deep_block::<2>(block, xs, d, k0, c),
        3 => deep_block::<3>(block, xs, d, k0, c),
        _ => deep_block::<4>(block, xs, d, k0, c),
    })
}

/// The depth blocks and row groups of [`deep_chains`]: `block(depth slice, rows' x, k0,
/// rows' chains)` for each, then the two chains summed into `acc`.
#[inline(always)]
fn deep_walk(
    panel: &[f32],
    x: &[f32],
    m: usize,
    d: usize,
    acc: &mut [[f32; LANES]],
    mut block: impl FnMut(&[f32], &[f32], usize, &mut [[[f32; LANES]; 2]]),
) {
    // The two chains of every row, carried across the depth blocks.
    let mut ch = [[[0f32; LANES]; 2]; MAX_ROWS];
    let mut k0 = 0;
    while k0 < d {
        let k1 = (k0 + DEEP_BLOCK).min(d);
        let slice = &panel[k0 * LANES..k1 * LANES];
        let mut r0 = 0;
        while r0 < m {
            let r = (m - r0).min(DEEP_ROWS);
            block(slice, &x[r0 * d..(r0 + r) * d], k0, &mut ch[r0..r0 + r]);
            r0 += r;
        }
        k0 = k1;
    }
    for (a, c) in acc.iter_mut().zip(&ch[..m]) {
        for (l, v) in a.iter_mut().enumerate() {
            *v = c[0][l] + c[1][l];
        }
    }
}

/// Depth `k0..k0 + block.len() / 16` (`k0` even) of `R` rows into their chains.
#[inline(always)]
fn deep_block<const R: usize>(
    block: &[f32],
    xs: &[f32],
    d: usize,
    k0: usize,
    ch: &mut [[[f32; LANES]; 2]],
) {
    let mut a = [[[0f32; LANES]; 2]; R];
    a.copy_from_slice(&ch[..R]);
    let mut pairs = block.chunks_exact(2 * LANES);
    for (j, e) in (&mut pairs).enumerate() {
        let k = k0 + 2 * j;
        let (e0, e1) = e.split_at(LANES);
        for (i, ai) in a.iter_mut().enumerate() {
            let (x0, x1) = (xs[i * d + k], xs[i * d + k + 1]);
            for l in 0..LANES {
                ai[0][l] = e0[l].mul_add(x0, ai[0][l]);
                ai[1][l] = e1[l].mul_add(x1, ai[1][l]);
            }
        }
    }
    // An odd depth's last `k` (even): chain 0.
    let tail = pairs.remainder();
    if !tail.is_empty() {
        let k = k0 + block.len() / LANES - 1;
        for (i, ai) in a.iter_mut().enumerate() {
            let xv = xs[i * d + k];
            for (v, &el) in ai[0].iter_mut().zip(tail) {
                *v = el.mul_add(xv, *v);
            }
        }
    }
    ch[..R].copy_from_slice(&a);
}

/// `x [..., d] E^T` through the panels when `x` has a few rows ([`takes`]), f32 on the CPU
/// outside gradient graphs, else `None` (the caller multiplies with gemm). The decoder's
/// dense layers use it too, `E` being a weight `[out, in]`: gemm repacked the weight on
/// every call with 2..16 rows (a decoding step at batch 8), and its kernel computes the
/// same chains while `in <= 512`; deeper weights stream once per call at 1..16 rows.
pub fn few_rows(p: &VocabPanels, x: &Tensor) -> Result<Option<Tensor>> {
    let dims = x.dims();
    let d = *dims.last().unwrap_or(&0);
    let rows = x.elem_count() / d.max(1);
    let fast = !super::infer::reference_kernels()
        && x.device().is_cpu()
        && x.dtype() == candle_core::DType::F32
        && !x.track_op();
    if !fast || d != p.d || !takes(rows, p.n, d) {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let mut y = vec![0f32; rows * p.n];
    {
        let (storage, layout) = x.storage_and_layout();
        let xv = match (&*storage, layout.contiguous_offsets()) {
            (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) => &v[a..b],
            _ => candle_core::bail!("few-row product: f32 contiguous input expected"),
        };
        p.product(xv, rows, &mut y)?;
    }
    let mut out = dims[..dims.len() - 1].to_vec();
    out.push(p.n);
    Ok(Some(Tensor::from_vec(y, out, x.device())?))
}

/// `E x^T` through gemm's matrix-vector path for one row `x` `[1, d]`, the vocabulary
/// split over the threads (each logit computed exactly as one call would): `[1, n]`.
pub fn single_row(e: &Tensor, x: &Tensor) -> Result<Tensor> {
    let n = e.dim(0)?;
    let threads = candle_core::utils::get_num_threads().clamp(1, n);
    let xt = x.t()?;
    if threads == 1 {
        return e.matmul(&xt)?.t()?.contiguous();
    }
    use rayon::prelude::*;
    let per = n.div_ceil(threads);
    let parts: Vec<Tensor> = (0..threads)
        .into_par_iter()
        .map(|t| {
            let (a, len) = (t * per, per.min(n - (t * per).min(n)));
            e.narrow(0, a, len)?.matmul(&xt)
        })
        .collect::<Result<_>>()?;
    Tensor::cat(&parts, 0)?.t()?.contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// The composed reference: candle's `E x^T` (gemm), as `[m, n]`.
    fn reference(e: &Tensor, x: &Tensor) -> Tensor {
        e.matmul(&x.t().unwrap())
            .unwrap()
            .t()
            .unwrap()
            .contiguous()
            .unwrap()
    }

    /// A random `[n, d]` matrix, `m` random rows of `d`, and the matrix's panels.
    fn random_case(n: usize, d: usize, m: usize) -> (Tensor, Tensor, VocabPanels) {
        let dev = Device::Cpu;
        let e = Tensor::randn(0f32, 1.0, (n, d), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (m, d), &dev).unwrap();
        let p = VocabPanels::from_tensor(&e).unwrap();
        (e, x, p)
    }

    fn fma_cpu() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    #[test]
    fn panels_match_gemm_on_random_shapes() {
        // (vocabulary, d, rows): odd sizes, a last panel of 1..15 rows, 2..16 rows.
        let cases = [
            (1, 1, 2),
            (17, 5, 2),
            (33, 31, 3),
            (100, 128, 8),
            (257, 64, 9),
            (1001, 256, 16),
            (59, 77, 5),
        ];
        for (n, d, m) in cases {
            let (e, x, p) = random_case(n, d, m);
            let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let mut y = vec![f32::NAN; m * n];
            p.product(&xv, m, &mut y).unwrap();
            // The definition: one fused chain per logit, in `d` order.
            let ev = e.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (i, &got) in y.iter().enumerate() {
                let (r, c) = (i / n, i % n);
                let want = (0..d).fold(0f32, |a, k| ev[c * d + k].mul_add(xv[r * d + k], a));
                assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "{n}x{d}, {m} rows, [{r}, {c}]"
                );
            }
            // gemm's general kernel (more than 256 outputs) fuses the same chain on FMA
            // machines: the same bits.
            let want = reference(&e, &x)
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let err = y
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let bound = if fma_cpu() && m * n > 256 {
                0.0
            } else {
                1e-4 * d as f32
            };
            assert!(err <= bound, "{n}x{d}, {m} rows: {err}");
        }
    }

    #[test]
    fn few_rows_match_a_dense_layer_product() {
        let dev = Device::Cpu;
        // (outputs, inputs, leading dims of x): a dense layer's `x W^T` (gemm over the
        // transposed weight), 2..16 rows of odd and OFA sizes, in <= 512.
        let cases: [(usize, usize, &[usize]); 7] = [
            (256, 256, &[8, 1]),
            (1024, 256, &[2, 1]),
            (256, 512, &[16, 1]),
            (33, 77, &[9, 1]),
            (128, 512, &[5]),
            (129, 3, &[2, 1]),
            (512, 128, &[3, 2]),
        ];
        for (out, inp, lead) in cases {
            let w = Tensor::randn(0f32, 1.0, (out, inp), &dev).unwrap();
            let mut shape = lead.to_vec();
            shape.push(inp);
            let x = Tensor::randn(0f32, 1.0, shape.as_slice(), &dev).unwrap();
            let p = VocabPanels::from_tensor(&w).unwrap();
            let got = few_rows(&p, &x)
                .unwrap()
                .expect("a few rows take the panels");
            let want = crate::model::layers::matmul_flat(&x, &w.t().unwrap()).unwrap();
            assert_eq!(got.dims(), want.dims());
            let err = crate::model::max_abs_diff(&got, &want).unwrap();
            let bound = if fma_cpu() { 0.0 } else { 1e-4 * inp as f32 };
            assert!(err <= bound, "{out}x{inp}, {lead:?}: {err}");
        }
        // One row, more than 16, or another depth: gemm's (None).
        let w = Tensor::randn(0f32, 1.0, (64, 32), &dev).unwrap();
        let p = VocabPanels::from_tensor(&w).unwrap();
        for shape in [(1, 32), (17, 32), (4, 31)] {
            let x = Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
            assert!(few_rows(&p, &x).unwrap().is_none(), "{shape:?}");
        }
    }

    /// The deep order's definition for one output: chains over even and odd `k`, summed.
    fn deep_reference(e: &[f32], x: &[f32], d: usize) -> f32 {
        let (mut c0, mut c1) = (0f32, 0f32);
        for k in 0..d {
            if k % 2 == 0 {
                c0 = e[k].mul_add(x[k], c0);
            } else {
                c1 = e[k].mul_add(x[k], c1);
            }
        }
        c0 + c1
    }

    #[test]
    fn deep_panels_match_their_definition_and_gemm() {
        let dev = Device::Cpu;
        // (outputs, depth > 512, rows): odd depths (a last `k` alone), depths across several
        // blocks and not a multiple of one, a last panel of 1..15 columns, 1..16 rows.
        let cases = [
            (1, 513, 1),
            (17, 515, 1),
            (33, 768, 2),
            (100, 769, 3),
            (257, 1031, 5),
            (768, 768, 8),
            (59, 3072, 16),
            (31, 600, 13),
        ];
        for (n, d, m) in cases {
            let (e, x, p) = random_case(n, d, m);
            let got = few_rows(&p, &x)
                .unwrap()
                .expect("1..16 deep rows take the panels");
            assert_eq!(got.dims(), &[m, n]);
            let y = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let ev = e.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (i, &g) in y.iter().enumerate() {
                let (r, c) = (i / n, i % n);
                let want = deep_reference(&ev[c * d..(c + 1) * d], &xv[r * d..(r + 1) * d], d);
                assert_eq!(g.to_bits(), want.to_bits(), "{n}x{d}, {m} rows, [{r}, {c}]");
            }
            // The composed product (gemm): another order, within rounding.
            let err = crate::model::max_abs_diff(&got, &reference(&e, &x)).unwrap();
            assert!(err <= 1e-5 * d as f32, "{n}x{d}, {m} rows: {err}");
            // A row's outputs do not depend on the rows beside it (batch size).
            for r in [0, m - 1] {
                let one = few_rows(&p, &x.narrow(0, r, 1).unwrap()).unwrap().unwrap();
                let diff = crate::model::max_abs_diff(&one, &got.narrow(0, r, 1).unwrap());
                assert_eq!(diff.unwrap(), 0.0, "{n}x{d}, row {r} of {m}");
            }
        }
        // The portable form (machines without AVX-512) against the dispatched one.
        for (n, d, m) in [(16, 515, 5), (16, 1031, 16), (16, 768, 1)] {
            let e: Vec<f32> = (0..n * d)
                .map(|i| ((i * 7919) % 1013) as f32 / 500.0 - 1.0)
                .collect();
            let x: Vec<f32> = (0..m * d)
                .map(|i| ((i * 104729) % 997) as f32 / 400.0 - 1.2)
                .collect();
            let p = VocabPanels::new(&e, n, d).unwrap();
            let (mut a, mut b) = ([[0f32; LANES]; MAX_ROWS], [[1f32; LANES]; MAX_ROWS]);
            deep_chains(&p.data, &x, m, d, &mut a[..m]);
            deep_body(&p.data, &x, m, d, &mut b[..m]);
            assert_eq!(a[..m], b[..m], "{d}, {m} rows");
        }
        // 17 rows: gemm's.
        let p = VocabPanels::from_tensor(&Tensor::ones((8, 600), DType::F32, &dev).unwrap());
        let x = Tensor::ones((17, 600), DType::F32, &dev).unwrap();
        assert!(few_rows(&p.unwrap(), &x).unwrap().is_none());
    }

    #[test]
    fn one_row_split_over_threads_matches_gemm_exactly() {
        let dev = Device::Cpu;
        for (n, d) in [(1, 3), (7, 16), (1001, 256), (4099, 33)] {
            let e = Tensor::randn(0f32, 1.0, (n, d), &dev).unwrap();
            let x = Tensor::randn(0f32, 1.0, (1, d), &dev).unwrap();
            let got = single_row(&e, &x).unwrap();
            assert_eq!(got.dims(), &[1, n]);
            let diff = crate::model::max_abs_diff(&got, &reference(&e, &x)).unwrap();
            assert_eq!(diff, 0.0, "{n}x{d}");
        }
    }

    #[test]
    fn mismatched_sizes_are_errors() {
        assert!(VocabPanels::new(&[0.0; 5], 2, 3).is_err());
        assert!(VocabPanels::new(&[], 0, 3).is_err());
        let p = VocabPanels::new(&[1.0; 6], 2, 3).unwrap();
        let mut y = vec![0f32; 4];
        assert!(p.product(&[1.0; 5], 2, &mut y).is_err());
        assert!(p.product(&[1.0; 6], 2, &mut y[..3]).is_err());
        p.product(&[1.0; 6], 2, &mut y).unwrap();
        assert_eq!(y, vec![3.0; 4]);
    }
}
