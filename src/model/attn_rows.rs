//! Attention of decoding steps at inference: one query row per sample x beam, against
//! keys/values read in place from a `[rows, h, capacity, dh]` buffer (the self-attention
//! cache, or the cross-attention keys/values of the encoder memory).
//!
//! Per query row and head, one task computes the scores against positions `0..len`, adds
//! the position bias (and a key mask), takes the softmax, sums the values weighted by it
//! and scales by the head's `c_attn`, writing straight into the `[rows, h * dh]` layout the
//! output projection reads. The composed form (`Attention::attend`) gathers the active rows
//! of the cache, splits the queries into heads, runs `b * h` small matrix products twice,
//! the softmax, a broadcast multiply and a transposing copy: a tensor and often a thread
//! hand-off per op. Tasks are split over the threads by (row, head).
//!
//! Sums run in another order than gemm's (16-lane dot products over `dh`, one fused chain
//! over the positions for the weighted sum), so values differ from the composed form by
//! rounding only; tests compare the two on random shapes.

use candle_core::{CpuStorage, Layout, Result, Storage, Tensor};

/// Keys/values, biases and head scales of one call.
pub struct RowsAttention<'a> {
    /// Keys and values `[R, h, capacity, dh]`, contiguous f32; positions `0..len` are read.
    /// With `keys_t` the keys are stored transposed, `[R, h, dh, capacity]`: the scores are
    /// then fused chains over `dh` for all positions at once, without a horizontal sum per
    /// position (the cross keys/values, transposed once per request).
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub keys_t: bool,
    pub len: usize,
    /// For each query row, its row of `k` / `v`.
    pub kv_row: &'a [usize],
    /// Position bias `[1, h, tq, >= len]` (any strides); row `t` is this step's.
    pub bias: &'a Tensor,
    pub t: usize,
    /// Key masks `[M, 1, 1, >= len]` and for each query row its mask row: added to the bias
    /// before the bias meets the scores (as `bias.broadcast_add(mask)` does).
    pub mask: Option<(&'a Tensor, &'a [usize])>,
}

/// Whether the kernel serves `q`: f32 on the CPU with the inference kernels on.
pub fn takes(q: &Tensor) -> bool {
    !super::infer::reference_kernels()
        && q.device().is_cpu()
        && q.dtype() == candle_core::DType::F32
        && !q.track_op()
}

fn cpu_f32<'a>(s: &'a Storage, what: &str) -> Result<&'a [f32]> {
    match s {
        Storage::Cpu(CpuStorage::F32(v)) => Ok(v.as_slice()),
        _ => candle_core::bail!("row attention: {what} must be f32 on the CPU"),
    }
}

fn contiguous<'a>(s: &'a Storage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("row attention: {what} must be contiguous");
    };
    Ok(&cpu_f32(s, what)?[a..b])
}

/// `softmax(q k^T + bias) v * c_attn` per head, heads side by side: `[rows, 1, h * dh]`
/// for queries `q` `[rows, 1, h * dh]` (scaled, contiguous) and per-head scales `c_attn`
/// `[h]` (NormFormer's).
pub fn attend_rows(q: &Tensor, a: &RowsAttention, c_attn: &Tensor) -> Result<Tensor> {
    let (r_kv, h, cap, dh) = a.v.dims4()?;
    let k_dims = if a.keys_t {
        [r_kv, h, dh, cap]
    } else {
        [r_kv, h, cap, dh]
    };
    if a.k.dims() != k_dims {
        candle_core::bail!(
            "row attention: values {:?} vs keys {:?} (transposed: {})",
            a.v.dims(),
            a.k.dims(),
            a.keys_t
        );
    }
    let rows = a.kv_row.len();
    let d = h * dh;
    if q.elem_count() != rows * d {
        candle_core::bail!(
            "row attention: queries {:?} for {rows} rows of {d}",
            q.dims()
        );
    }
    let len = a.len;
    if len == 0 || len > cap {
        candle_core::bail!("row attention: {len} positions of a {cap}-position buffer");
    }
    if a.kv_row.iter().any(|&r| r >= r_kv) {
        candle_core::bail!("row attention: a key/value row beyond {r_kv}");
    }
    let (b0, bh, btq, bn) = a.bias.dims4()?;
    if b0 != 1 || bh != h || a.t >= btq || bn < len {
        candle_core::bail!(
            "row attention: bias {:?} for {h} heads, row {}, {len} keys",
            a.bias.dims(),
            a.t
        );
    }
    if c_attn.dims() != [h] {
        candle_core::bail!("row attention: c_attn {:?} for {h} heads", c_attn.dims());
    }
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = a.k.storage_and_layout();
    let (vs, vl) = a.v.storage_and_layout();
    let (bs, bl) = a.bias.storage_and_layout();
    let c_attn = c_attn.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
    let qd = contiguous(&qs, ql, "queries")?;
    let kd = contiguous(&ks, kl, "keys")?;
    let vd = contiguous(&vs, vl, "values")?;
    let bias_all = cpu_f32(&bs, "bias")?;
    let bst = bl.stride();
    let bias_at =
        |hh: usize, j: usize| bias_all[bl.start_offset() + hh * bst[1] + a.t * bst[2] + j * bst[3]];
    // Mask rows, when any: their storage and layout, and the row of each query.
    let mask_guard = a.mask.map(|(m, _)| m.storage_and_layout());
    let mask = match (&a.mask, &mask_guard) {
        (Some((m, mrows)), Some((ms, ml))) => {
            let (m0, m1, m2, mn) = m.dims4()?;
            let bad_rows = mrows.len() != rows || mrows.iter().any(|&r| r >= m0);
            if m1 != 1 || m2 != 1 || mn < len || bad_rows {
                candle_core::bail!("row attention: mask {:?} for {rows} rows", m.dims());
            }
            let st = ml.stride();
            Some((
                cpu_f32(ms, "mask")?,
                ml.start_offset(),
                st[0],
                st[3],
                *mrows,
            ))
        }
        _ => None,
    };
    let mask_at = |r: usize, j: usize| {
        mask.map(|(data, start, s0, s3, mrows)| data[start + mrows[r] * s0 + j * s3])
    };

    let mut out = vec![0f32; rows * d];
    let task = |i: usize, dst: &mut [f32], scores: &mut Vec<f32>| {
        let (r, hh) = (i / h, i % h);
        let base = (a.kv_row[r] * h + hh) * cap * dh;
        let keys = if a.keys_t {
            Keys::Cols(&kd[base..base + cap * dh], cap)
        } else {
            Keys::Rows(&kd[base..base + len * dh])
        };
        let vals = &vd[base..base + len * dh];
        let qrow = &qd[r * d + hh * dh..r * d + (hh + 1) * dh];
        scores.clear();
        scores.extend((0..len).map(|j| match mask_at(r, j) {
            Some(m) => bias_at(hh, j) + m,
            None => bias_at(hh, j),
        }));
        // Room for the transposed keys' chains.
        scores.resize(2 * len, 0.0);
        head(qrow, keys, vals, scores, dst, c_attn[hh]);
    };
    let work = rows * h * len * dh;
    let threads = candle_core::utils::get_num_threads();
    if threads > 1 && rows * h > 1 && work >= 1 << 14 {
        use rayon::prelude::*;
        out.par_chunks_mut(dh)
            .enumerate()
            .with_min_len((rows * h).div_ceil(threads))
            .for_each_init(Vec::new, |scores, (i, dst)| task(i, dst, scores));
    } else {
        let mut scores = Vec::with_capacity(len);
        for (i, dst) in out.chunks_mut(dh).enumerate() {
            task(i, dst, &mut scores);
        }
    }
    Tensor::from_vec(out, (rows, 1, d), q.device())
}

/// One (row, head)'s keys: `len` rows of `dh`, or `dh` rows of `capacity` (transposed).
#[derive(Clone, Copy)]
enum Keys<'a> {
    Rows(&'a [f32]),
    Cols(&'a [f32], usize),
}

/// One (row, head): `bias` holds the bias of each position on entry, then as many zeros
/// (scratch; overwritten).
fn head(q: &[f32], keys: Keys, vals: &[f32], bias: &mut [f32], dst: &mut [f32], c: f32) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
            // SAFETY: the features were just detected.
            unsafe { head_avx512(q, keys, vals, bias, dst, c) };
            return;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the features were just detected.
            unsafe { head_avx2(q, keys, vals, bias, dst, c) };
            return;
        }
    }
    head_body(q, keys, vals, bias, dst, c)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn head_avx512(q: &[f32], k: Keys, v: &[f32], s: &mut [f32], dst: &mut [f32], c: f32) {
    head_body(q, k, v, s, dst, c)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn head_avx2(q: &[f32], k: Keys, v: &[f32], s: &mut [f32], dst: &mut [f32], c: f32) {
    head_body(q, k, v, s, dst, c)
}

/// Lanes of the dot products (one AVX-512 register).
const LANES: usize = 16;

/// `sum_k a[k] b[k]`: 16 fused chains over `k` (the tail on lane 0), then the lanes
/// summed pairwise. The same bits on every CPU (`mul_add` is exact fma everywhere).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..LANES {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        acc[0] = x.mul_add(*y, acc[0]);
    }
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            acc[l] += acc[l + w];
        }
    }
    acc[0]
}

#[inline(always)]
fn head_body(q: &[f32], keys: Keys, vals: &[f32], s: &mut [f32], dst: &mut [f32], c: f32) {
    let dh = q.len();
    let (s, chains) = s.split_at_mut(s.len() / 2);
    // Scores plus bias, then the softmax as `infer::bias_softmax` computes it.
    match keys {
        Keys::Rows(k) => {
            for (j, v) in s.iter_mut().enumerate() {
                *v += dot(q, &k[j * dh..(j + 1) * dh]);
            }
        }
        Keys::Cols(k, cap) => {
            let len = s.len();
            for (i, &qi) in q.iter().enumerate() {
                for (a, &x) in chains.iter_mut().zip(&k[i * cap..i * cap + len]) {
                    *a = qi.mul_add(x, *a);
                }
            }
            for (v, a) in s.iter_mut().zip(chains.iter()) {
                *v += a;
            }
        }
    }
    let mut max = f32::NEG_INFINITY;
    for v in s.iter() {
        max = max.max(*v);
    }
    let inv = super::infer::exp_shifted(s, max);
    dst.fill(0.0);
    for (j, &p) in s.iter().enumerate() {
        let p = p * inv;
        for (o, &x) in dst.iter_mut().zip(&vals[j * dh..(j + 1) * dh]) {
            *o = p.mul_add(x, *o);
        }
    }
    for o in dst.iter_mut() {
        *o *= c;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::max_abs_diff;
    use candle_core::{Device, IndexOp, D};

    /// The composed form: gather rows, split heads, matmul, bias + mask, softmax, matmul,
    /// head scale, heads side by side.
    fn reference(q: &Tensor, a: &RowsAttention, c_attn: &Tensor) -> Tensor {
        let dev = Device::Cpu;
        let (_, h, _, dh) = a.k.dims4().unwrap();
        let rows = a.kv_row.len();
        let idx = Tensor::from_vec(
            a.kv_row.iter().map(|&r| r as u32).collect::<Vec<_>>(),
            rows,
            &dev,
        )
        .unwrap();
        let k =
            a.k.index_select(&idx, 0)
                .unwrap()
                .narrow(2, 0, a.len)
                .unwrap();
        let v =
            a.v.index_select(&idx, 0)
                .unwrap()
                .narrow(2, 0, a.len)
                .unwrap();
        let qh = q
            .reshape((rows, 1, h, dh))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap();
        let mut bias = a
            .bias
            .i((.., .., a.t..a.t + 1, 0..a.len))
            .unwrap()
            .contiguous()
            .unwrap();
        if let Some((m, mrows)) = a.mask {
            let mi = Tensor::from_vec(
                mrows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
                rows,
                &dev,
            )
            .unwrap();
            let m = m.index_select(&mi, 0).unwrap().narrow(3, 0, a.len).unwrap();
            bias = bias.broadcast_add(&m).unwrap();
        }
        let scores = qh.matmul(&k.t().unwrap()).unwrap();
        let probs =
            candle_nn::ops::softmax(&scores.broadcast_add(&bias).unwrap(), D::Minus1).unwrap();
        probs
            .matmul(&v)
            .unwrap()
            .broadcast_mul(&c_attn.reshape((1, h, 1, 1)).unwrap())
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((rows, 1, h * dh))
            .unwrap()
    }

    #[test]
    fn matches_composed_attention_on_random_shapes() {
        let dev = Device::Cpu;
        // (buffer rows, heads, capacity, dh, len, query rows -> buffer rows, masked keys)
        type Case = (usize, usize, usize, usize, usize, Vec<usize>, bool);
        let cases: Vec<Case> = vec![
            (1, 1, 1, 1, 1, vec![0], false),
            (1, 4, 32, 64, 1, vec![0], false),
            (3, 2, 8, 5, 7, vec![2, 0], false),
            (8, 4, 32, 64, 17, (0..8).collect(), false),
            // Exited rows left out, beams repeating a row.
            (5, 3, 20, 33, 13, vec![1, 1, 4, 4, 0], false),
            // Cross attention: memory with padding, odd sizes, rows over the threads.
            (4, 4, 271, 64, 271, vec![0, 1, 2, 3], true),
            (3, 12, 37, 24, 30, vec![2, 1, 1], true),
            (2, 2, 9, 17, 9, vec![1], true),
        ];
        for (r_kv, h, cap, dh, len, kv_row, masked) in cases {
            let rows = kv_row.len();
            let k = Tensor::randn(0f32, 1.0, (r_kv, h, cap, dh), &dev).unwrap();
            let kt = k.transpose(2, 3).unwrap().contiguous().unwrap();
            let v = Tensor::randn(0f32, 1.0, (r_kv, h, cap, dh), &dev).unwrap();
            let q = Tensor::randn(0f32, 0.5, (rows, 1, h * dh), &dev).unwrap();
            let tq = 3;
            let bias = Tensor::randn(0f32, 1.0, (1, h, tq, cap + 2), &dev).unwrap();
            let c_attn = Tensor::randn(1f32, 0.3, h, &dev).unwrap();
            // Masks: sample 0 has its last two keys masked.
            let mut mv = vec![0f32; r_kv * len];
            if len > 2 {
                mv[len - 2] = f32::MIN;
                mv[len - 1] = f32::MIN;
            }
            let mask = Tensor::from_vec(mv, (r_kv, 1, 1, len), &dev).unwrap();
            let mrows = kv_row.clone();
            for (t, keys_t) in [(0, false), (1, true), (2, false), (2, true)] {
                let a = RowsAttention {
                    k: if keys_t { &kt } else { &k },
                    v: &v,
                    keys_t,
                    len,
                    kv_row: &kv_row,
                    bias: &bias,
                    t,
                    mask: masked.then_some((&mask, mrows.as_slice())),
                };
                let got = attend_rows(&q, &a, &c_attn).unwrap();
                assert_eq!(got.dims(), &[rows, 1, h * dh]);
                let plain = RowsAttention {
                    k: &k,
                    keys_t: false,
                    ..a
                };
                let err = max_abs_diff(&got, &reference(&q, &plain, &c_attn)).unwrap();
                assert!(err < 2e-5, "{r_kv} {h} {cap} {dh} {len} {kv_row:?}: {err}");
                // Same call, same bits (the threaded split does not change a sum).
                let again = attend_rows(&q, &a, &c_attn).unwrap();
                assert_eq!(max_abs_diff(&got, &again).unwrap(), 0.0);
            }
        }
    }

    #[test]
    fn transposed_bias_and_bad_shapes() {
        let dev = Device::Cpu;
        let (h, dh, len) = (2, 8, 6);
        let k = Tensor::randn(0f32, 1.0, (2, h, len, dh), &dev).unwrap();
        let q = Tensor::randn(0f32, 1.0, (2, 1, h * dh), &dev).unwrap();
        let c = Tensor::ones(h, candle_core::DType::F32, &dev).unwrap();
        // A strided bias view reads the same values as its contiguous copy.
        let bt = Tensor::randn(0f32, 1.0, (1, h, len, 4), &dev)
            .unwrap()
            .transpose(2, 3)
            .unwrap();
        let bc = bt.contiguous().unwrap();
        let call = |bias: &Tensor, kv_row: &[usize], len: usize| {
            attend_rows(
                &q,
                &RowsAttention {
                    k: &k,
                    v: &k,
                    keys_t: false,
                    len,
                    kv_row,
                    bias,
                    t: 3,
                    mask: None,
                },
                &c,
            )
        };
        let a = call(&bt, &[0, 1], len).unwrap();
        let b = call(&bc, &[0, 1], len).unwrap();
        assert_eq!(max_abs_diff(&a, &b).unwrap(), 0.0);
        // A row beyond the buffer, more positions than it holds, a query count that does
        // not match: errors, not panics.
        assert!(call(&bc, &[0, 2], len).is_err());
        assert!(call(&bc, &[0, 1], len + 1).is_err());
        assert!(call(&bc, &[0], len).is_err());
        assert!(call(&bc, &[0, 1], 0).is_err());
    }
}
