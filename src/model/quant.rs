//! Int8 matrix products for inference (`--precision int8`): `y = x W^T` with the weight
//! quantized once at load, per output channel (symmetric, [-127, 127]), and the
//! activations quantized per row on every call (dynamic, symmetric). The products of
//! bytes are summed exactly in i32, then scaled back to f32: the only error is the
//! rounding of the two operands.
//!
//! Kernels, picked at run time by CPU feature ([`Kernel::detect`]):
//! - `Avx512Vnni`: `vpdpbusd` (u8 x i8, four products per i32 lane). Activations are
//!   shifted to u8 (`q + 128`) and `128 * sum_k w` is subtracted per column afterwards.
//! - `Avx2`: `vpmaddubsw` on `|a|` and `sign(a) * w` (no i16 saturation: both <= 127),
//!   then `vpmaddwd` by ones into i32.
//! - `Scalar`: the same sums in plain Rust (every machine; also the tests' reference).
//!
//! All three produce the same i32 sums and the same f32 scaling, so they agree bit for bit.
//! The weight is packed in panels of 16 columns, four consecutive k per column
//! (`[n / 16][k / 4][16][4]` bytes), the layout `vpdpbusd` reads; rows are done in blocks
//! of [`MC`] (kept in L2 across the weight panels), panels in groups of three.

use rayon::prelude::*;

/// Columns per weight panel (one 512-bit vector of i32).
const NR: usize = 16;
/// Rows per block: the quantized activations of a block stay in cache across all panels.
const MC: usize = 64;
/// Elements below which the product runs on one thread.
const PAR_WORK: usize = 1 << 16;

/// Which int8 kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Avx512Vnni,
    Avx2,
    Scalar,
}

impl Kernel {
    /// The fastest kernel this CPU supports; `MUE_INT8_KERNEL=scalar|avx2|avx512vnni`
    /// picks a slower one (a faster one than the CPU has is refused: falls back to detection).
    pub fn detect() -> Kernel {
        static KERNEL: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *KERNEL.get_or_init(|| {
            let forced = std::env::var("MUE_INT8_KERNEL")
                .ok()
                .and_then(|v| match v.as_str() {
                    "scalar" => Some(Kernel::Scalar),
                    "avx2" => Some(Kernel::Avx2),
                    "avx512vnni" => Some(Kernel::Avx512Vnni),
                    _ => None,
                });
            match forced {
                Some(k) if k.supported() => k,
                _ => Kernel::available()
                    .into_iter()
                    .next()
                    .unwrap_or(Kernel::Scalar),
            }
        })
    }

    /// Whether this CPU can run the kernel.
    pub fn supported(self) -> bool {
        match self {
            Kernel::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => is_x86_feature_detected!("avx2"),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The kernels this CPU supports, fastest first (the scalar one always).
    pub fn available() -> Vec<Kernel> {
        [Kernel::Avx512Vnni, Kernel::Avx2, Kernel::Scalar]
            .into_iter()
            .filter(|k| k.supported())
            .collect()
    }

    /// Activations as u8 (`q + 128`) rather than i8.
    fn shifted(self) -> bool {
        self == Kernel::Avx512Vnni
    }
}

/// A weight `[n, k]` quantized per output channel and packed for the kernels.
#[derive(Debug, Clone)]
pub struct QMatrix {
    /// `[panels][kp / 4][16][4]`, zero beyond `n` and `k`.
    packed: Vec<i8>,
    /// Per output channel: `w ~= scale * q`. Padded with zeros to whole panels.
    scale: Vec<f32>,
    /// Per output channel `128 * sum_k q` (undoes the u8 shift of the VNNI kernel).
    shift: Vec<i32>,
    n: usize,
    k: usize,
    /// `k` rounded up to a multiple of 4.
    kp: usize,
}

impl QMatrix {
    /// From `w [n, k]` row-major (a Linear's `[out, in]` weight).
    pub fn from_rows(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "weight size");
        Self::build(n, k, |j, i| w[j * k + i])
    }

    /// From `w [k, n]` row-major (the packed convolution's right operand).
    pub fn from_cols(w: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(w.len(), n * k, "weight size");
        Self::build(n, k, |j, i| w[i * n + j])
    }

    fn build(n: usize, k: usize, at: impl Fn(usize, usize) -> f32) -> Self {
        let kp = k.div_ceil(4) * 4;
        let panels = n.div_ceil(NR);
        let mut packed = vec![0i8; panels * kp * NR];
        let mut scale = vec![0f32; panels * NR];
        let mut shift = vec![0i32; panels * NR];
        for j in 0..n {
            let max = (0..k).map(|i| at(j, i).abs()).fold(0f32, f32::max);
            let s = max / 127.0;
            let inv = if max > 0.0 { 127.0 / max } else { 0.0 };
            scale[j] = s;
            let (p, c) = (j / NR, j % NR);
            let mut sum = 0i32;
            for i in 0..k {
                let q = (at(j, i) * inv).round_ties_even().clamp(-127.0, 127.0) as i8;
                packed[p * kp * NR + (i / 4) * NR * 4 + c * 4 + i % 4] = q;
                sum += q as i32;
            }
            shift[j] = 128 * sum;
        }
        Self {
            packed,
            scale,
            shift,
            n,
            k,
            kp,
        }
    }

    pub fn rows(&self) -> usize {
        self.n
    }

    pub fn cols(&self) -> usize {
        self.k
    }

    /// The dequantized weight `[n, k]` (tests, and the error bound).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.n * self.k];
        for j in 0..self.n {
            let (p, c) = (j / NR, j % NR);
            for i in 0..self.k {
                let q = self.packed[p * self.kp * NR + (i / 4) * NR * 4 + c * 4 + i % 4];
                out[j * self.k + i] = q as f32 * self.scale[j];
            }
        }
        out
    }
}

/// Activations of `m` rows quantized per row, rows padded to `kp` bytes.
#[derive(Default)]
struct QRows {
    bytes: Vec<u8>,
    scale: Vec<f32>,
}

thread_local! {
    /// Reused quantized-activation buffers (one per calling thread).
    static ROWS: std::cell::RefCell<QRows> =
        const { std::cell::RefCell::new(QRows { bytes: Vec::new(), scale: Vec::new() }) };
}

/// Quantizes one row `a [k]` into `out [kp]` (i8 bits, or u8 `q + 128` when `shifted`);
/// returns the scale. Written so that it vectorizes (lane-wise maxima, ties-to-even rounding).
#[inline(always)]
fn quantize_row_body(a: &[f32], out: &mut [u8], shifted: bool) -> f32 {
    let mut lanes = [0f32; 16];
    let chunks = a.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, v) in lanes.iter_mut().zip(c) {
            let v = v.abs();
            *m = if v > *m { v } else { *m };
        }
    }
    let mut max = tail.iter().fold(0f32, |m, v| m.max(v.abs()));
    for m in lanes {
        max = max.max(m);
    }
    let inv = if max > 0.0 { 127.0 / max } else { 0.0 };
    let bias = if shifted { 128i32 } else { 0 };
    for (o, v) in out.iter_mut().zip(a) {
        let q = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i32;
        *o = (q + bias) as u8;
    }
    out[a.len()..].fill(bias as u8);
    max / 127.0
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_row_avx2(a: &[f32], out: &mut [u8], shifted: bool) -> f32 {
    quantize_row_body(a, out, shifted)
}

/// Where the activation rows come from: a row-major matrix, or a function that writes
/// row `r` into a scratch row (the convolutions' im2col, so that no f32 im2col matrix is
/// written and read back).
#[derive(Clone, Copy)]
enum Src<'a> {
    Rows(&'a [f32]),
    Gather(&'a (dyn Fn(usize, &mut [f32]) + Sync)),
}

/// Rows quantized per call, in chunks of this many (one scratch row per chunk).
const QUANT_CHUNK: usize = 16;

fn quantize_rows(src: Src, m: usize, k: usize, kp: usize, kernel: Kernel, rows: &mut QRows) {
    // Whole blocks of rows, so that the kernels may read a full tile past `m`.
    let mp = m.div_ceil(8) * 8;
    rows.bytes.clear();
    rows.bytes.resize(mp * kp, 0);
    rows.scale.clear();
    rows.scale.resize(mp, 0.0);
    let shifted = kernel.shifted();
    #[cfg(target_arch = "x86_64")]
    let avx2 = kernel != Kernel::Scalar && is_x86_feature_detected!("avx2");
    let row = |a: &[f32], out: &mut [u8]| -> f32 {
        #[cfg(target_arch = "x86_64")]
        if kernel == Kernel::Avx512Vnni {
            // SAFETY: the VNNI kernel is only picked with AVX-512 F and BW present.
            return unsafe { x86::quantize_row_avx512(a, out, shifted) };
        }
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: the CPU has AVX2 and FMA (checked above; both kernels need them).
            return unsafe { quantize_row_avx2(a, out, shifted) };
        }
        quantize_row_body(a, out, shifted)
    };
    let work = |(c, (out, scales)): (usize, (&mut [u8], &mut [f32]))| {
        let mut buf = Vec::new();
        for (i, (o, s)) in out.chunks_exact_mut(kp).zip(scales).enumerate() {
            let r = c * QUANT_CHUNK + i;
            let a = match src {
                Src::Rows(x) => &x[r * k..(r + 1) * k],
                Src::Gather(gather) => {
                    buf.resize(k, 0.0);
                    gather(r, &mut buf);
                    &buf[..]
                }
            };
            *s = row(a, o);
        }
    };
    let (bytes, scales) = (&mut rows.bytes[..m * kp], &mut rows.scale[..m]);
    if m * k >= PAR_WORK && candle_core::utils::get_num_threads() > 1 {
        bytes
            .par_chunks_mut(QUANT_CHUNK * kp)
            .zip(scales.par_chunks_mut(QUANT_CHUNK))
            .enumerate()
            .for_each(work);
    } else {
        bytes
            .chunks_mut(QUANT_CHUNK * kp)
            .zip(scales.chunks_mut(QUANT_CHUNK))
            .enumerate()
            .for_each(work);
    }
}

/// Where one tile writes: `dst` rows of `n` floats.
#[derive(Clone, Copy)]
struct Out {
    dst: *mut f32,
    n: usize,
    read_dst: bool,
}
// SAFETY: tiles write disjoint parts of `dst` (distinct rows or column panels).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// `dst [m, n] (+)= x [m, k] W^T`, `W` the int8 weight. `x` is quantized per row here.
pub fn matmul(kernel: Kernel, x: &[f32], m: usize, w: &QMatrix, dst: &mut [f32], read_dst: bool) {
    assert_eq!(x.len(), m * w.k, "int8 matmul: sizes");
    product(kernel, Src::Rows(x), m, w, dst, read_dst);
}

/// [`matmul`] with row `r` of `x` written by `gather(r, row)` (`row` holds `k` floats).
pub fn matmul_gather(
    kernel: Kernel,
    m: usize,
    w: &QMatrix,
    dst: &mut [f32],
    read_dst: bool,
    gather: &(dyn Fn(usize, &mut [f32]) + Sync),
) {
    product(kernel, Src::Gather(gather), m, w, dst, read_dst);
}

fn product(kernel: Kernel, x: Src, m: usize, w: &QMatrix, dst: &mut [f32], read_dst: bool) {
    let (n, k) = (w.n, w.k);
    assert!(dst.len() == m * n, "int8 matmul: sizes");
    assert!(
        kernel.supported(),
        "int8 kernel {kernel:?} not supported here"
    );
    if m == 0 || n == 0 {
        return;
    }
    // Taken out of the thread-local, not borrowed: while it waits for rayon this thread
    // may run another request's product.
    let mut rows = ROWS.with(|r| std::mem::take(&mut *r.borrow_mut()));
    quantize_rows(x, m, k, w.kp, kernel, &mut rows);
    {
        let out = Out {
            dst: dst.as_mut_ptr(),
            n,
            read_dst,
        };
        let panels = n.div_ceil(NR);
        let row_blocks = m.div_ceil(MC);
        let threads = candle_core::utils::get_num_threads();
        // Few rows (decoding): split the panels too, so that every thread has work.
        let groups = if threads > 1 && row_blocks < 2 * threads {
            (2 * threads).div_ceil(row_blocks).min(panels.div_ceil(3))
        } else {
            1
        };
        let per_group = panels.div_ceil(groups).div_ceil(3) * 3;
        let groups = panels.div_ceil(per_group);
        let rows = &rows;
        let task = |t: usize| {
            let (rb, g) = (t / groups, t % groups);
            let r0 = rb * MC;
            let r1 = (r0 + MC).min(m);
            let p1 = ((g + 1) * per_group).min(panels);
            block(kernel, rows, w, out, r0, r1, g * per_group, p1);
        };
        let tasks = row_blocks * groups;
        if threads > 1 && m * n * k >= PAR_WORK && tasks > 1 {
            (0..tasks).into_par_iter().for_each(task);
        } else {
            (0..tasks).for_each(task);
        }
    }
    ROWS.with(|r| *r.borrow_mut() = rows);
}

/// Rows `r0..r1` times panels `p0..p1`: panel triples outside, row tiles inside.
#[allow(clippy::too_many_arguments)]
fn block(
    kernel: Kernel,
    rows: &QRows,
    w: &QMatrix,
    out: Out,
    r0: usize,
    r1: usize,
    p0: usize,
    p1: usize,
) {
    let mut p = p0;
    while p < p1 {
        let nv = (p1 - p).min(3);
        let mut r = r0;
        while r < r1 {
            let left = r1 - r;
            let mr = if left >= 8 {
                8
            } else if left >= 4 {
                4
            } else if left >= 2 {
                2
            } else {
                1
            };
            tile(kernel, rows, w, out, r, mr, p, nv);
            r += mr;
        }
        p += nv;
    }
}

/// One tile: `mr` rows from `r`, `nv` panels from `p`.
#[allow(clippy::too_many_arguments)]
fn tile(
    kernel: Kernel,
    rows: &QRows,
    w: &QMatrix,
    out: Out,
    r: usize,
    mr: usize,
    p: usize,
    nv: usize,
) {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Vnni => {
            macro_rules! go {
                ($($m:literal $v:literal),*) => {
                    match (mr, nv) {
                        // SAFETY: the CPU has the features (`matmul` asserts `supported`);
                        // rows and panels are in range of the padded buffers.
                        $(($m, $v) => unsafe { x86::tile_vnni::<$m, $v>(rows, w, out, r, p) },)*
                        _ => unreachable!(),
                    }
                };
            }
            go!(8 3, 8 2, 8 1, 4 3, 4 2, 4 1, 2 3, 2 2, 2 1, 1 3, 1 2, 1 1)
        }
        _ => {
            let mut acc = [0i32; 8 * 3 * NR];
            for v in 0..nv {
                let acc = &mut acc[v * 8 * NR..(v + 1) * 8 * NR];
                match kernel {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: AVX2 checked by `matmul`; rows / panel in range.
                    Kernel::Avx2 => unsafe { x86::tile_avx2(rows, w, r, mr, p + v, acc) },
                    _ => tile_scalar(rows, w, r, mr, p + v, acc),
                }
            }
            store_scalar(rows, w, out, r, mr, p, nv, &acc);
        }
    }
}

/// i32 sums of rows `r..r + mr` with panel `p` into `acc [8][16]`.
fn tile_scalar(rows: &QRows, w: &QMatrix, r: usize, mr: usize, p: usize, acc: &mut [i32]) {
    let kp = w.kp;
    let panel = &w.packed[p * kp * NR..(p + 1) * kp * NR];
    for i in 0..mr {
        let a = &rows.bytes[(r + i) * kp..(r + i + 1) * kp];
        let acc = &mut acc[i * NR..(i + 1) * NR];
        for (k4, wq) in panel.chunks_exact(4 * NR).enumerate() {
            let a4 = &a[4 * k4..4 * k4 + 4];
            for (c, w4) in wq.chunks_exact(4).enumerate() {
                let mut s = 0i32;
                for (x, y) in a4.iter().zip(w4) {
                    s += (*x as i8) as i32 * *y as i32;
                }
                acc[c] += s;
            }
        }
    }
}

/// Scales `acc [nv][8][16]` (signed sums) into `dst`: `acc * (sa * sw) (+ dst)`, one
/// fused multiply-add as the vector kernel does.
#[allow(clippy::too_many_arguments)]
fn store_scalar(
    rows: &QRows,
    w: &QMatrix,
    out: Out,
    r: usize,
    mr: usize,
    p: usize,
    nv: usize,
    acc: &[i32],
) {
    for v in 0..nv {
        for i in 0..mr {
            let sa = rows.scale[r + i];
            for c in 0..NR {
                let j = (p + v) * NR + c;
                if j >= out.n {
                    break;
                }
                let s = acc[v * 8 * NR + i * NR + c] as f32;
                // SAFETY: row r + i < m and column j < n: inside dst, and this tile's alone.
                unsafe {
                    let d = out.dst.add((r + i) * out.n + j);
                    let scale = sa * w.scale[j];
                    *d = if out.read_dst {
                        s.mul_add(scale, *d)
                    } else {
                        s * scale
                    };
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Out, QMatrix, QRows, NR};
    use std::arch::x86_64::*;

    /// `MR` rows x `NV` panels with `vpdpbusd`, scaled and stored (masked at the last column).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma")]
    pub unsafe fn tile_vnni<const MR: usize, const NV: usize>(
        rows: &QRows,
        w: &QMatrix,
        out: Out,
        r: usize,
        p: usize,
    ) {
        let kp = w.kp;
        let a = rows.bytes.as_ptr().add(r * kp);
        let b = w.packed.as_ptr().add(p * kp * NR);
        let mut acc = [[_mm512_setzero_si512(); NV]; MR];
        for k4 in 0..kp / 4 {
            let mut wv = [_mm512_setzero_si512(); NV];
            for (v, x) in wv.iter_mut().enumerate() {
                *x = _mm512_loadu_si512(b.add(v * kp * NR + k4 * 4 * NR) as *const _);
            }
            for (i, acc) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_epi32((a.add(i * kp + 4 * k4) as *const i32).read_unaligned());
                for v in 0..NV {
                    acc[v] = _mm512_dpbusd_epi32(acc[v], av, wv[v]);
                }
            }
        }
        for v in 0..NV {
            let j0 = (p + v) * NR;
            if j0 >= out.n {
                break;
            }
            let left = out.n - j0;
            let mask: __mmask16 = if left >= NR {
                0xffff
            } else {
                (1u16 << left) - 1
            };
            let shift = _mm512_loadu_si512(w.shift.as_ptr().add(j0) as *const _);
            let sw = _mm512_loadu_ps(w.scale.as_ptr().add(j0));
            for (i, acc) in acc.iter().enumerate() {
                let s = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[v], shift));
                let scale = _mm512_mul_ps(_mm512_set1_ps(rows.scale[r + i]), sw);
                let d = out.dst.add((r + i) * out.n + j0);
                let y = if out.read_dst {
                    _mm512_fmadd_ps(s, scale, _mm512_maskz_loadu_ps(mask, d))
                } else {
                    _mm512_mul_ps(s, scale)
                };
                _mm512_mask_storeu_ps(d, mask, y);
            }
        }
    }

    /// [`super::quantize_row_body`] in AVX-512 (same arithmetic: `vcvtps2dq` rounds ties
    /// to even, as `round_ties_even`).
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn quantize_row_avx512(a: &[f32], out: &mut [u8], shifted: bool) -> f32 {
        let n = a.len();
        let full = n / 16 * 16;
        let mut vmax = _mm512_setzero_ps();
        for i in (0..full).step_by(16) {
            vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(a.as_ptr().add(i))));
        }
        let mut max = _mm512_reduce_max_ps(vmax);
        for v in &a[full..] {
            max = max.max(v.abs());
        }
        let inv = if max > 0.0 { 127.0 / max } else { 0.0 };
        let bias = if shifted { 128i32 } else { 0 };
        let (vinv, vbias) = (_mm512_set1_ps(inv), _mm512_set1_epi32(bias));
        let (lo, hi) = (_mm512_set1_epi32(-127), _mm512_set1_epi32(127));
        for i in (0..full).step_by(16) {
            let q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(a.as_ptr().add(i)), vinv));
            let q = _mm512_add_epi32(_mm512_min_epi32(_mm512_max_epi32(q, lo), hi), vbias);
            _mm_storeu_si128(out.as_mut_ptr().add(i) as *mut _, _mm512_cvtepi32_epi8(q));
        }
        for (o, v) in out[full..].iter_mut().zip(&a[full..]) {
            let q = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i32;
            *o = (q + bias) as u8;
        }
        out[n..].fill(bias as u8);
        max / 127.0
    }

    /// i32 sums of `mr` (<= 8) rows with panel `p` into `acc [8][16]`, AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn tile_avx2(
        rows: &QRows,
        w: &QMatrix,
        r: usize,
        mr: usize,
        p: usize,
        acc: &mut [i32],
    ) {
        let kp = w.kp;
        let b = w.packed.as_ptr().add(p * kp * NR);
        let ones = _mm256_set1_epi16(1);
        for i in 0..mr {
            let a = rows.bytes.as_ptr().add((r + i) * kp);
            let (mut lo, mut hi) = (_mm256_setzero_si256(), _mm256_setzero_si256());
            for k4 in 0..kp / 4 {
                let av = _mm256_set1_epi32((a.add(4 * k4) as *const i32).read_unaligned());
                let abs = _mm256_abs_epi8(av);
                let w0 = _mm256_loadu_si256(b.add(k4 * 4 * NR) as *const _);
                let w1 = _mm256_loadu_si256(b.add(k4 * 4 * NR + 32) as *const _);
                // |a| * (sign(a) * w) = a * w; pairs fit i16 (127 * 127 * 2 < 2^15).
                let p0 = _mm256_maddubs_epi16(abs, _mm256_sign_epi8(w0, av));
                let p1 = _mm256_maddubs_epi16(abs, _mm256_sign_epi8(w1, av));
                lo = _mm256_add_epi32(lo, _mm256_madd_epi16(p0, ones));
                hi = _mm256_add_epi32(hi, _mm256_madd_epi16(p1, ones));
            }
            let dst = acc.as_mut_ptr().add(i * NR);
            _mm256_storeu_si256(dst as *mut _, lo);
            _mm256_storeu_si256(dst.add(8) as *mut _, hi);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn rand_vec(n: usize, rng: &mut rand_chacha::ChaCha8Rng) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect()
    }

    /// The f32 reference `x W^T` in f64 sums.
    fn reference(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k)
                    .map(|t| x[i * k + t] as f64 * w[j * k + t] as f64)
                    .sum();
                y[i * n + j] = s as f32;
            }
        }
        y
    }

    /// Every kernel this CPU has, on odd shapes (rows 1 to > one block, columns not a
    /// multiple of 16, k not a multiple of 4), plain and accumulating: within the rounding
    /// bound of the two operands against f32, and bit-identical across kernels.
    #[test]
    fn int8_kernels_match_f32_within_the_rounding_bound() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let kernels = Kernel::available();
        assert!(kernels.contains(&Kernel::Scalar));
        eprintln!("int8 kernels on this CPU: {kernels:?}");
        for &(m, n, k) in &[
            (1, 1, 1),
            (1, 17, 5),
            (3, 16, 64),
            (7, 33, 130),
            (9, 48, 256),
            (70, 50, 147),
            (130, 97, 515),
        ] {
            let x = rand_vec(m * k, &mut rng);
            let w = rand_vec(n * k, &mut rng);
            let q = QMatrix::from_rows(&w, n, k);
            let wt: Vec<f32> = (0..k * n).map(|t| w[(t % n) * k + t / n]).collect();
            let qt = QMatrix::from_cols(&wt, k, n);
            assert_eq!(q.packed, qt.packed, "from_rows and from_cols pack alike");
            let want = reference(&x, &w, m, n, k);
            // Error bound: |x w - xq wq| <= sum |x| |dw| + |dx| |wq|, |dx| <= sa / 2,
            // |dw| <= sw / 2 per element (round to nearest).
            let wq = q.dequantize();
            let bound = |i: usize, j: usize| {
                let sa = x[i * k..(i + 1) * k]
                    .iter()
                    .fold(0f32, |a, v| a.max(v.abs()))
                    / 127.0;
                let sw = q.scale[j];
                let s: f32 = (0..k)
                    .map(|t| x[i * k + t].abs() * sw / 2.0 + sa / 2.0 * wq[j * k + t].abs())
                    .sum();
                s * 1.001 + 1e-5
            };
            let mut first: Option<Vec<f32>> = None;
            for &kernel in &kernels {
                let mut y = vec![0f32; m * n];
                matmul(kernel, &x, m, &q, &mut y, false);
                for i in 0..m {
                    for j in 0..n {
                        let e = (y[i * n + j] - want[i * n + j]).abs();
                        assert!(e <= bound(i, j), "{kernel:?} {m}x{n}x{k} [{i},{j}]: {e}");
                    }
                }
                // Accumulating onto a residual.
                let res = rand_vec(m * n, &mut rng);
                let mut acc = res.clone();
                matmul(kernel, &x, m, &q, &mut acc, true);
                for t in 0..m * n {
                    let e = (acc[t] - res[t] - y[t]).abs();
                    assert!(
                        e <= 1e-5 * (1.0 + res[t].abs() + y[t].abs()),
                        "{kernel:?} acc"
                    );
                }
                // Rows gathered one at a time (the convolutions' path): the same bits.
                let mut g = vec![0f32; m * n];
                let gather = |r: usize, row: &mut [f32]| row.copy_from_slice(&x[r * k..][..k]);
                matmul_gather(kernel, m, &q, &mut g, false, &gather);
                assert!(g == y, "{kernel:?} gathered rows differ");
                match &first {
                    None => first = Some(y),
                    Some(f) => assert!(f == &y, "{kernel:?} differs from {:?}", kernels[0]),
                }
            }
        }
    }

    #[test]
    fn zero_rows_and_columns_stay_zero() {
        let (m, n, k) = (3, 20, 9);
        let mut w = vec![0.5f32; n * k];
        w[..k].fill(0.0); // column 0 all zero
        let mut x = vec![1f32; m * k];
        x[k..2 * k].fill(0.0); // row 1 all zero
        let q = QMatrix::from_rows(&w, n, k);
        for kernel in Kernel::available() {
            let mut y = vec![f32::NAN; m * n];
            matmul(kernel, &x, m, &q, &mut y, false);
            assert!(y.iter().all(|v| v.is_finite()), "{kernel:?}");
            assert_eq!(y[0], 0.0);
            assert!(y[n..2 * n].iter().all(|&v| v == 0.0));
            assert!((y[1] - 4.5).abs() < 1e-5, "{kernel:?}: {}", y[1]);
        }
    }
}
