//! Attention of many query rows at inference (the encoder, full decoder passes over long
//! memories): `softmax(q k^T + bias) v * c_attn` per head, one task per (sample, block of
//! query rows, head), written straight into the `[b, nq, h * dh]` layout the output
//! projection reads.
//!
//! The composed form (`Attention::attend`) writes the whole score tensor `[b, h, nq, nk]`
//! (at OFA-Base, 384 px, batch 8: ~140 MB), reads and writes it again in the softmax and
//! once more in the product with the values, then scales and transposes the result (a
//! copy). Here a task computes the scores of [`BLOCK`] rows against all keys into a
//! scratch block that stays in L2 (`gemm` on slices, no threads of its own), adds the bias
//! (`[b|1, h|1, nq, nk]`, any strides, or the joint encoder's four stream blocks; masks ride
//! in it), takes the softmax (lane-parallel maximum and sum, an all-f32 `exp`) and
//! multiplies the unnormalised exponentials by the values into the output, then scales
//! each row by `1 / sum * c_attn`. Queries, keys and values are read in place through
//! their strides (last stride 1): the projections' `[b, n, h*dh]` output viewed as
//! `[b, h, n, dh]` needs no head-splitting copy.
//!
//! Sums run in another order than the composed form's (the bias joins the product's
//! accumulator, the normalisation comes after the values), so values differ by rounding
//! only; tests compare the two on random shapes. A task's arithmetic does not depend on
//! the thread count (fixed blocks, one task per block and head), so neither do the bits.

use candle_core::{CpuStorage, Layout, Result, Storage, Tensor};

/// Query rows per task: a block's scores (`BLOCK * nk` f32, 307 KB at 600 keys) stay in L2,
/// and the packing of a head's keys is shared by this many rows.
pub const BLOCK: usize = 128;

/// Key length from which inference attention takes this kernel. Below it the score
/// tensor is small enough to stay in cache on the composed path, and the shipped model
/// (16 image tokens, short prompts, d 128) keeps the composed path's bits.
pub const MIN_KEYS: usize = 128;

/// Whether the kernel serves `q` against `nk` keys: f32 on the CPU, nothing tracking
/// gradients, the inference kernels on, and at least [`MIN_KEYS`] keys.
pub fn takes(q: &Tensor, nk: usize) -> bool {
    super::attn_rows::takes(q) && nk >= MIN_KEYS
}

/// A `[b, h, n, dh]` view: its storage and where element (bb, hh, i, 0) starts.
struct View<'a> {
    data: &'a [f32],
    start: usize,
    strides: [usize; 3],
}

impl View<'_> {
    fn at(&self, bb: usize, hh: usize, i: usize) -> usize {
        self.start + bb * self.strides[0] + hh * self.strides[1] + i * self.strides[2]
    }
}

fn cpu_f32<'a>(s: &'a Storage, what: &str) -> Result<&'a [f32]> {
    match s {
        Storage::Cpu(CpuStorage::F32(v)) => Ok(v.as_slice()),
        _ => candle_core::bail!("block attention: {what} must be f32 on the CPU"),
    }
}

fn view<'a>(s: &'a Storage, l: &Layout, what: &str) -> Result<View<'a>> {
    let st = l.stride();
    if l.dims().len() != 4 || (st[3] != 1 && l.dims()[3] > 1) {
        candle_core::bail!(
            "block attention: {what} {:?} (strides {st:?}) must be 4-d with unit last stride",
            l.dims()
        );
    }
    Ok(View {
        data: cpu_f32(s, what)?,
        start: l.start_offset(),
        strides: [st[0], st[1], st[2]],
    })
}

/// A rectangle of one bias term: rows `rows`, columns `c0..c0 + cols` of `[b, h, nq, nk]`.
struct Piece<'a> {
    /// Of the first term: the rectangles tile the scores, so they are copied, not added.
    first: bool,
    rows: std::ops::Range<usize>,
    c0: usize,
    cols: usize,
    data: &'a [f32],
    start: usize,
    strides: [usize; 4],
}

impl Piece<'_> {
    /// Writes (first term) or adds this piece's part of score row `r` of (`bb`, `hh`).
    fn apply(&self, bb: usize, hh: usize, r: usize, out: &mut [f32]) {
        let st = self.strides;
        let off = self.start + bb * st[0] + hh * st[1] + (r - self.rows.start) * st[2];
        match (self.first, st[3]) {
            (true, 1) => out.copy_from_slice(&self.data[off..off + self.cols]),
            (true, s3) => {
                for (j, s) in out.iter_mut().enumerate() {
                    *s = self.data[off + j * s3];
                }
            }
            (false, s3) => {
                for (j, s) in out.iter_mut().enumerate() {
                    *s += self.data[off + j * s3];
                }
            }
        }
    }
}

/// The output's base pointer, shared by tasks that write disjoint (rows, head) tiles.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes its own rows x head columns of the buffer only, and the buffer
// outlives the parallel loop.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The element `off` floats in (a method, so closures capture the whole wrapper).
    ///
    /// # Safety
    /// `off` lies inside the buffer.
    unsafe fn at(self, off: usize) -> *mut f32 {
        self.0.add(off)
    }
}

/// `softmax(q k^T + bias) v * c_attn`, heads side by side: `[b, nq, h * dh]` for scaled
/// queries `q` `[b, h, nq, dh]`, keys and values `[b, h, nk, dh]` (any strides with the
/// last one 1), `bias` broadcasting to `[b, h, nq, nk]`, per-head scales `c_attn` `[h]`.
pub fn attend_block(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    c_attn: &Tensor,
) -> Result<Tensor> {
    let bias = bias.map(Bias::Whole);
    attend_block_biases(q, k, v, bias.as_slice(), c_attn)
}

/// One term of an attention bias.
#[derive(Debug, Clone, Copy)]
pub enum Bias<'a> {
    /// A tensor broadcasting to `[b, h, nq, nk]`.
    Whole(&'a Tensor),
    /// The joint encoder's stream blocks, split at query row and key column `split` (the
    /// image tokens come first): image-image, image-text, text-image and text-text, each
    /// broadcasting to its block of `[b, h, nq, nk]`. The kernel reads the blocks where
    /// they are; concatenating them was ~5% of an OFA-Base request (a new `[h, n, n]`
    /// tensor per layer, written three times).
    Streams {
        split: usize,
        blocks: [&'a Tensor; 4],
    },
}

impl Bias<'_> {
    /// The term as one tensor (the composed path's form).
    pub fn to_tensor(&self) -> Result<Tensor> {
        match self {
            Bias::Whole(t) => Ok((*t).clone()),
            Bias::Streams {
                blocks: [ii, it, ti, tt],
                ..
            } => {
                let top = Tensor::cat(&[ii, it], 3)?;
                let bottom = Tensor::cat(&[ti, tt], 3)?;
                Tensor::cat(&[&top, &bottom], 2)
            }
        }
    }

    /// `(first row, first column, block)`: the rectangles the term covers, each block
    /// broadcast to its `[b, h, rows, columns]`.
    fn pieces(
        &self,
        b: usize,
        h: usize,
        nq: usize,
        nk: usize,
    ) -> Result<Vec<(usize, usize, Tensor)>> {
        match *self {
            Bias::Whole(t) => Ok(vec![(0, 0, t.broadcast_as((b, h, nq, nk))?)]),
            Bias::Streams { split, blocks } => {
                if split > nq.min(nk) {
                    candle_core::bail!("block attention: stream split {split} of {nq} x {nk}");
                }
                let spans = |n: usize| [(0, split), (split, n - split)];
                let mut out = Vec::new();
                for (i, t) in blocks.into_iter().enumerate() {
                    let ((r0, rows), (c0, cols)) = (spans(nq)[i / 2], spans(nk)[i % 2]);
                    out.push((r0, c0, t.broadcast_as((b, h, rows, cols))?));
                }
                Ok(out)
            }
        }
    }
}

/// [`attend_block`] with the bias the sum of `biases`, added left to right per row as
/// `broadcast_add` would: a position bias `[1, h, n, n]` and a padding mask `[b, 1, 1, n]`
/// need no `[b, h, n, n]` tensor.
pub fn attend_block_biases(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    biases: &[Bias],
    c_attn: &Tensor,
) -> Result<Tensor> {
    let (b, h, nq, dh) = q.dims4()?;
    let nk = k.dim(2)?;
    if k.dims() != [b, h, nk, dh] || v.dims() != [b, h, nk, dh] {
        candle_core::bail!(
            "block attention: queries {:?}, keys {:?}, values {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if nk == 0 || dh == 0 {
        candle_core::bail!("block attention: {nk} keys of {dh} values per head");
    }
    if c_attn.dims() != [h] {
        candle_core::bail!("block attention: c_attn {:?} for {h} heads", c_attn.dims());
    }
    let d = h * dh;
    let c_attn = c_attn.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
    // (term, first row, first column, block), terms in order.
    let mut pieces = Vec::new();
    for (term, bias) in biases.iter().enumerate() {
        for (r0, c0, t) in bias.pieces(b, h, nq, nk)? {
            pieces.push((term, r0, c0, t));
        }
    }
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (qv, kv, vv) = (
        view(&qs, ql, "queries")?,
        view(&ks, kl, "keys")?,
        view(&vs, vl, "values")?,
    );
    let bias_guards: Vec<_> = pieces.iter().map(|p| p.3.storage_and_layout()).collect();
    let bias = pieces
        .iter()
        .zip(&bias_guards)
        .map(|(&(term, r0, c0, ref t), (bs, bl))| {
            let st = bl.stride();
            Ok(Piece {
                first: term == 0,
                rows: r0..r0 + t.dim(2)?,
                c0,
                cols: t.dim(3)?,
                data: cpu_f32(bs, "bias")?,
                start: bl.start_offset(),
                strides: [st[0], st[1], st[2], st[3]],
            })
        })
        .collect::<Result<Vec<_>>>()?;

    let mut out = vec![0f32; b * nq * d];
    let blocks = nq.div_ceil(BLOCK);
    let tasks = b * blocks * h;
    let dst = OutPtr(out.as_mut_ptr());
    let task = |i: usize, scores: &mut Vec<f32>| {
        let hh = i % h;
        let blk = (i / h) % blocks;
        let bb = i / (h * blocks);
        let r0 = blk * BLOCK;
        let m = BLOCK.min(nq - r0);
        scores.resize(m * nk, 0.0);
        for p in &bias {
            for (r, row) in scores.chunks_exact_mut(nk).enumerate() {
                if p.rows.contains(&(r0 + r)) {
                    p.apply(bb, hh, r0 + r, &mut row[p.c0..p.c0 + p.cols]);
                }
            }
        }
        // The views' offsets and strides come from candle layouts of these shapes, so every
        // element the products read lies inside its storage.
        let qp = qv.data[qv.at(bb, hh, r0)..].as_ptr();
        let kp = kv.data[kv.at(bb, hh, 0)..].as_ptr();
        let vp = vv.data[vv.at(bb, hh, 0)..].as_ptr();
        // SAFETY: scores holds m x nk (row stride nk); q rows r0..r0+m, keys and values
        // 0..nk of this (sample, head) are in bounds (see above); the output tile rows
        // r0..r0+m, columns hh*dh.. of sample bb is written by this task alone.
        unsafe {
            // scores (+)= q k^T: lhs q [m, dh], rhs k^T [dh, nk] (k's rows as columns).
            gemm::gemm(
                m,
                nk,
                dh,
                scores.as_mut_ptr(),
                1,
                nk as isize,
                !bias.is_empty(),
                qp,
                1,
                qv.strides[2] as isize,
                kp,
                kv.strides[2] as isize,
                1,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        let mut scale = [0f32; BLOCK];
        for (row, sc) in scores.chunks_exact_mut(nk).zip(scale.iter_mut()) {
            *sc = exp_row(row) * c_attn[hh];
        }
        // SAFETY: row r0 of sample bb, column hh*dh lies inside the b x nq x d buffer.
        let out_tile = unsafe { dst.at((bb * nq + r0) * d + hh * dh) };
        // SAFETY: as above; the tile is m rows of dh at row stride d.
        unsafe {
            // out = exp(scores) v: lhs [m, nk], rhs v [nk, dh].
            gemm::gemm(
                m,
                dh,
                nk,
                out_tile,
                1,
                d as isize,
                false,
                scores.as_ptr(),
                1,
                nk as isize,
                vp,
                1,
                vv.strides[2] as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
            for (r, &sc) in scale[..m].iter().enumerate() {
                let row = std::slice::from_raw_parts_mut(out_tile.add(r * d), dh);
                for o in row.iter_mut() {
                    *o *= sc;
                }
            }
        }
    };
    let threads = candle_core::utils::get_num_threads();
    if threads > 1 && tasks > 1 && tasks * BLOCK.min(nq) * nk * dh >= 1 << 16 {
        use rayon::prelude::*;
        (0..tasks)
            .into_par_iter()
            .for_each_init(Vec::new, |scores, i| task(i, scores));
    } else {
        let mut scores = Vec::new();
        for i in 0..tasks {
            task(i, &mut scores);
        }
    }
    Tensor::from_vec(out, (b, nq, d), q.device())
}

/// Lanes of the row maximum and sum (one AVX-512 register).
const LANES: usize = 16;

/// `row = exp(row - max(row))` in place; returns `1 / sum(row)`. The maximum and the sum
/// run in 16 lanes (then pairwise), not in one chain as `infer::exp_shifted` does: a
/// block's rows are long, and one in-order chain is bound by the add's latency. The same
/// bits on every CPU: the lanes' order is fixed and [`exp_nonpositive`] uses IEEE
/// operations and fused multiply-adds only.
fn exp_row(row: &mut [f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
            // SAFETY: the features were just detected.
            return unsafe { exp_row_avx512(row) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the features were just detected.
            return unsafe { exp_row_avx2(row) };
        }
    }
    exp_row_body(row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn exp_row_avx512(row: &mut [f32]) -> f32 {
    exp_row_body(row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_row_avx2(row: &mut [f32]) -> f32 {
    exp_row_body(row)
}

/// Lane `l` of `acc` folded with lane `l + w` for halving `w`: lane 0 holds the result.
#[inline(always)]
fn fold(mut acc: [f32; LANES], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            acc[l] = f(acc[l], acc[l + w]);
        }
    }
    acc[0]
}

#[inline(always)]
fn exp_row_body(row: &mut [f32]) -> f32 {
    // `a > b` picks like `maxps` (vectorises; f32::max's NaN rule does not).
    let max_of = |a: f32, b: f32| if a > b { a } else { b };
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            acc[l] = max_of(c[l], acc[l]);
        }
    }
    for &x in chunks.remainder() {
        acc[0] = max_of(x, acc[0]);
    }
    let max = fold(acc, max_of);
    // One pass: shift, exponential and the lane sums.
    let mut acc = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            c[l] = exp_nonpositive(c[l] - max);
            acc[l] += c[l];
        }
    }
    for x in chunks.into_remainder() {
        *x = exp_nonpositive(*x - max);
        acc[0] += *x;
    }
    1.0 / fold(acc, |a, b| a + b)
}

/// `e^x` for `x <= 0` (a softmax's shifted scores), within 2 ulp of the exact value: `x`
/// split as `n ln 2 + r` with `|r| <= ln 2 / 2`, Cephes' degree-6 polynomial for `e^r`,
/// `2^n` from the exponent bits. All f32, so 16 values per AVX-512 instruction; libm's bits
/// (`expf::exp_in_place`, f64 inside) took 4x longer and were a third of this kernel's
/// time at OFA-Base sizes. Values below -87 (`e^-87` is 1.6e-38, below the sum's rounding)
/// and -inf (masked keys) give 0; NaN stays NaN.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
    const SHIFT: f32 = 12_582_912.0;
    // ln 2 in two parts: the first has few bits, so `n * LN2_HI` is exact.
    const LN2_HI: f32 = 355.0 / 512.0;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = if x < -87.0 { -87.0 } else { x };
    let t = xc.mul_add(std::f32::consts::LOG2_E, SHIFT);
    let n = t - SHIFT;
    let r = n.mul_add(-LN2_HI, xc);
    let r = n.mul_add(-LN2_LO, r);
    let mut p = 1.987_569_1e-4f32;
    for c in [1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
        p = p.mul_add(r, c);
    }
    let p = p.mul_add(r * r, r) + 1.0;
    // n in [-126, 0]: the biased exponent n + 127 is that of a normal number.
    let two_n = f32::from_bits((t.to_bits().wrapping_sub(SHIFT.to_bits()).wrapping_add(127)) << 23);
    if x < -87.0 {
        0.0
    } else {
        p * two_n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::max_abs_diff;
    use candle_core::{Device, D};

    /// The composed form: matmul, bias, softmax, matmul, head scale, heads side by side.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>, c: &Tensor) -> Tensor {
        let (b, h, nq, dh) = q.dims4().unwrap();
        let q = q.contiguous().unwrap();
        let k = k.contiguous().unwrap();
        let v = v.contiguous().unwrap();
        let mut s = q.matmul(&k.t().unwrap()).unwrap();
        if let Some(bias) = bias {
            s = s.broadcast_add(bias).unwrap();
        }
        candle_nn::ops::softmax(&s, D::Minus1)
            .unwrap()
            .matmul(&v)
            .unwrap()
            .broadcast_mul(&c.reshape((1, h, 1, 1)).unwrap())
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, nq, h * dh))
            .unwrap()
    }

    /// `[b, n, h*dh]` viewed as `[b, h, n, dh]` (no copy), as the encoder passes them.
    fn heads_view(x: &Tensor, h: usize) -> Tensor {
        let (b, n, d) = x.dims3().unwrap();
        x.reshape((b, n, h, d / h))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
    }

    /// `f` on one thread (every op serial), or in a two-thread pool of its own (the tasks
    /// spread over both, unless another test holds the serial guard meanwhile).
    fn with_threads<T: Send>(n: usize, f: impl FnOnce() -> T + Send) -> T {
        if n == 1 {
            let _serial = crate::model::threads::SerialOps::enter();
            return f();
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .unwrap()
            .install(f)
    }

    #[test]
    fn softmax_exp_is_within_two_ulp() {
        // Every 7th f32 from 0 down to -87, then the edges.
        let mut worst = 0f64;
        for bits in (0x8000_0000u32..=(-87f32).to_bits()).step_by(7) {
            let x = f32::from_bits(bits);
            let (got, want) = (exp_nonpositive(x) as f64, (x as f64).exp());
            // One ulp of the exact value (normal results only: e^-87 > 2^-126).
            let ulp = f64::from(f32::EPSILON) * want.max(f64::from(f32::MIN_POSITIVE));
            worst = worst.max((got - want).abs() / ulp);
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-0.0), 1.0);
        for x in [-87.5, -100.0, -1e30, f32::NEG_INFINITY] {
            assert_eq!(exp_nonpositive(x), 0.0, "{x}");
        }
        assert!(exp_nonpositive(f32::NAN).is_nan());
    }

    #[test]
    fn matches_composed_attention_on_random_shapes() {
        let dev = Device::Cpu;
        // (b, h, nq, nk, dh, bias dims as [b|1, h|1, nq|1, nk], masked keys)
        type Case = (usize, usize, usize, usize, usize, [bool; 3], bool);
        let cases: [Case; 9] = [
            (1, 1, 1, 1, 1, [true, true, true], false),
            // Rows fewer than a block; dh not a multiple of 16.
            (1, 3, 5, 130, 33, [false, true, true], false),
            // nq != nk, several blocks with a ragged last one, batch > 1.
            (2, 3, 261, 150, 17, [true, true, true], true),
            (2, 2, 97, 40, 64, [false, true, true], true),
            // Bias broadcast in each leading dimension.
            (2, 3, 33, 129, 24, [true, false, true], true),
            (2, 3, 33, 129, 24, [true, true, false], false),
            (2, 5, 40, 77, 7, [false, false, true], true),
            (4, 2, 64, 200, 64, [true, false, false], true),
            (2, 12, 65, 257, 64, [false, true, true], false),
        ];
        for (b, h, nq, nk, dh, [bb, bh, bq], masked) in cases {
            let case = format!("b {b} h {h} nq {nq} nk {nk} dh {dh} bias {bb} {bh} {bq}");
            let q = Tensor::randn(0f32, 0.5, (b, nq, h * dh), &dev).unwrap();
            let kv = Tensor::randn(0f32, 1.0, (b, nk, 2 * h * dh), &dev).unwrap();
            let k = kv.narrow(2, 0, h * dh).unwrap();
            let v = kv.narrow(2, h * dh, h * dh).unwrap();
            let (q, k, v) = (heads_view(&q, h), heads_view(&k, h), heads_view(&v, h));
            let bdims = (
                if bb { b } else { 1 },
                if bh { h } else { 1 },
                if bq { nq } else { 1 },
                nk,
            );
            let mut bias = Tensor::randn(0f32, 1.0, bdims, &dev).unwrap();
            if masked {
                // Key 0 of the first sample and the last key of every bias row masked
                // (f32::MIN, as padding masks are), and one fully -inf key column.
                let mut m = vec![0f32; bias.elem_count()];
                for (r, row) in m.chunks_exact_mut(nk).enumerate() {
                    if r == 0 {
                        row[0] = f32::MIN;
                    }
                    row[nk - 1] = f32::MIN;
                    if nk > 2 {
                        row[nk / 2] = f32::NEG_INFINITY;
                    }
                }
                let m = Tensor::from_vec(m, bdims, &dev).unwrap();
                bias = (bias + m).unwrap();
            }
            let c = Tensor::randn(1f32, 0.3, h, &dev).unwrap();
            let want = reference(&q, &k, &v, Some(&bias), &c);
            let one = with_threads(1, || attend_block(&q, &k, &v, Some(&bias), &c).unwrap());
            assert_eq!(one.dims(), &[b, nq, h * dh]);
            let err = max_abs_diff(&one, &want).unwrap();
            assert!(err < 2e-5, "{case}: {err}");
            // Same bits at two threads, and from contiguous (split-head) inputs.
            let two = with_threads(2, || attend_block(&q, &k, &v, Some(&bias), &c).unwrap());
            assert_eq!(max_abs_diff(&one, &two).unwrap(), 0.0, "{case}: threads");
            let (qc, kc, vc) = (
                q.contiguous().unwrap(),
                k.contiguous().unwrap(),
                v.contiguous().unwrap(),
            );
            let split = attend_block(&qc, &kc, &vc, Some(&bias), &c).unwrap();
            assert_eq!(max_abs_diff(&one, &split).unwrap(), 0.0, "{case}: layout");
            // A strided (transposed) bias reads the same values.
            let bt = bias
                .transpose(2, 3)
                .unwrap()
                .contiguous()
                .unwrap()
                .transpose(2, 3)
                .unwrap();
            let got = attend_block(&q, &k, &v, Some(&bt), &c).unwrap();
            assert_eq!(
                max_abs_diff(&one, &got).unwrap(),
                0.0,
                "{case}: bias strides"
            );
            // The bias as a sum of two (position bias + padding mask, as the encoder
            // passes them): the same bits as their sum computed first.
            let other = Tensor::randn(0f32, 1.0, (b, 1, 1, nk), &dev).unwrap();
            let sum = bias.broadcast_add(&other).unwrap();
            let want2 = attend_block(&q, &k, &v, Some(&sum), &c).unwrap();
            let got =
                attend_block_biases(&q, &k, &v, &[Bias::Whole(&bias), Bias::Whole(&other)], &c)
                    .unwrap();
            assert_eq!(
                max_abs_diff(&want2, &got).unwrap(),
                0.0,
                "{case}: two biases"
            );
            // The joint encoder's stream blocks, split at the edges and inside: the same
            // bits as the blocks concatenated first.
            for split in [0, nq.min(nk) / 3, nq.min(nk)] {
                let block = |rows: usize, cols: usize| {
                    Tensor::randn(0f32, 1.0, (1, h, rows, cols), &dev).unwrap()
                };
                let blocks = [
                    block(split, split),
                    block(split, nk - split),
                    block(nq - split, split),
                    block(nq - split, nk - split),
                ];
                let streams = Bias::Streams {
                    split,
                    blocks: [&blocks[0], &blocks[1], &blocks[2], &blocks[3]],
                };
                let joint = streams.to_tensor().unwrap();
                assert_eq!(joint.dims(), &[1, h, nq, nk]);
                let pad = Bias::Whole(&other);
                let want = attend_block_biases(&q, &k, &v, &[Bias::Whole(&joint), pad], &c);
                let got = attend_block_biases(&q, &k, &v, &[streams, pad], &c).unwrap();
                let err = max_abs_diff(&want.unwrap(), &got).unwrap();
                assert_eq!(err, 0.0, "{case}: streams split at {split}");
            }
            // No bias at all.
            let got = attend_block(&q, &k, &v, None, &c).unwrap();
            let err = max_abs_diff(&got, &reference(&q, &k, &v, None, &c)).unwrap();
            assert!(err < 2e-5, "{case}: no bias {err}");
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 3, 4, 8), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (2, 3, 6, 8), &dev).unwrap();
        let c = Tensor::ones(3, candle_core::DType::F32, &dev).unwrap();
        assert!(attend_block(&q, &k, &k, None, &c).is_ok());
        // Values of another length, keys of another head size, no keys, wrong c_attn,
        // a bias that does not broadcast, a non-unit last stride, f64: errors.
        let v5 = Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &dev).unwrap();
        assert!(attend_block(&q, &k, &v5, None, &c).is_err());
        let k7 = Tensor::randn(0f32, 1.0, (2, 3, 6, 7), &dev).unwrap();
        assert!(attend_block(&q, &k7, &k7, None, &c).is_err());
        let k0 = Tensor::zeros((2, 3, 0, 8), candle_core::DType::F32, &dev).unwrap();
        assert!(attend_block(&q, &k0, &k0, None, &c).is_err());
        let c2 = Tensor::ones(2, candle_core::DType::F32, &dev).unwrap();
        assert!(attend_block(&q, &k, &k, None, &c2).is_err());
        let bad = Tensor::zeros((2, 3, 4, 5), candle_core::DType::F32, &dev).unwrap();
        assert!(attend_block(&q, &k, &k, Some(&bad), &c).is_err());
        let kt = Tensor::randn(0f32, 1.0, (2, 3, 8, 6), &dev)
            .unwrap()
            .transpose(2, 3)
            .unwrap();
        assert!(attend_block(&q, &kt, &k, None, &c).is_err());
        let q64 = q.to_dtype(candle_core::DType::F64).unwrap();
        assert!(attend_block(&q64, &k, &k, None, &c).is_err());
        let blk = Tensor::zeros((1, 2, 3, 3), candle_core::DType::F32, &dev).unwrap();
        let far = Bias::Streams {
            split: 1000,
            blocks: [&blk; 4],
        };
        assert!(attend_block_biases(&q, &k, &k, &[far], &c).is_err());
        let wrong = Bias::Streams {
            split: 3,
            blocks: [&blk; 4],
        };
        assert!(attend_block_biases(&q, &k, &k, &[wrong], &c).is_err());
    }
}
