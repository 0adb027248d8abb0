//! Int8 matrix products for inference (`--precision int8`): `y = x W^T` with the weight
//! quantized once at load, per output channel (symmetric, [-127, 127]), and the
//! activations quantized per row on every call (dynamic, symmetric). The products of
//! bytes are summed exactly in i32, then scaled back to f32: the only error is the
//! rounding of the two operands.
//!
//! Kernels, picked at run time by CPU feature ([`Kernel::detect`]):
//! - `Amx`: the AMX tile unit's `tdpbusd` (u8 x i8, a 16 x 16 block of i32 sums per
//!   instruction, 64 bytes of depth), on the same shifted activations and packed weight as
//!   `Avx512Vnni` (its tiles read the packed panels as they are); products of fewer than
//!   [`AMX_MIN_ROWS`] rows take the VNNI kernel instead.
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

use candle_core::{CpuStorage, DType, Result, Storage, Tensor};
use rayon::prelude::*;

/// Columns per weight panel (one 512-bit vector of i32).
const NR: usize = 16;

/// `x.round_ties_even()` for |x| <= 2^22 (quantized values are within 128; a zero may lose
/// its sign, which the integer conversion drops anyway), in two adds:
/// at 1.5 * 2^23 the f32 grid is the integers, so the add rounds to nearest, ties to even.
/// The standard function is a libm call on the baseline x86-64 target (no SSE4.1).
#[inline(always)]
fn round_ties_even(x: f32) -> f32 {
    const SHIFT: f32 = 12_582_912.0;
    (x + SHIFT) - SHIFT
}

/// Rows per block: the quantized activations of a block stay in cache across all panels.
const MC: usize = 64;
/// Elements below which the product runs on one thread.
const PAR_WORK: usize = 1 << 16;
/// Fewest rows for the AMX kernel (its tiles are 16 rows; it runs two at once).
pub const AMX_MIN_ROWS: usize = 32;

/// Which int8 kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Amx,
    Avx512Vnni,
    Avx2,
    Scalar,
}

impl Kernel {
    /// The fastest kernel this CPU supports; `MUE_INT8_KERNEL=scalar|avx2|avx512vnni|amx`
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
                    "amx" => Some(Kernel::Amx),
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
            #[cfg(target_arch = "x86_64")]
            Kernel::Amx => Kernel::Avx512Vnni.supported() && x86::amx_usable(),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The kernels this CPU supports, fastest first (the scalar one always).
    pub fn available() -> Vec<Kernel> {
        [
            Kernel::Amx,
            Kernel::Avx512Vnni,
            Kernel::Avx2,
            Kernel::Scalar,
        ]
        .into_iter()
        .filter(|k| k.supported())
        .collect()
    }

    /// Activations as u8 (`q + 128`) rather than i8.
    fn shifted(self) -> bool {
        matches!(self, Kernel::Avx512Vnni | Kernel::Amx)
    }

    /// Bytes per quantized activation row for a weight of `kp` (padded) depth: AMX reads
    /// whole 64-byte tile columns, so its rows are padded with zeros to a multiple of 64.
    fn row_stride(self, kp: usize) -> usize {
        if self == Kernel::Amx {
            kp.next_multiple_of(64)
        } else {
            kp
        }
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

    fn build(n: usize, k: usize, at: impl Fn(usize, usize) -> f32 + Sync) -> Self {
        let kp = k.div_ceil(4) * 4;
        let panels = n.div_ceil(NR);
        // One tile (1 KiB) of slack after the last panel: the AMX kernel's last depth tile
        // may read past it (against zero activations).
        let mut packed = vec![0i8; panels * kp * NR + 1024];
        let mut scale = vec![0f32; panels * NR];
        let mut shift = vec![0i32; panels * NR];
        // One panel per task: the same bits at any thread count (each row is computed alone).
        packed[..panels * kp * NR]
            .par_chunks_mut(kp * NR)
            .zip(scale.par_chunks_mut(NR))
            .zip(shift.par_chunks_mut(NR))
            .enumerate()
            .for_each(|(p, ((panel, scale), shift))| {
                for c in 0..NR.min(n - p * NR) {
                    let j = p * NR + c;
                    let max = (0..k).map(|i| at(j, i).abs()).fold(0f32, f32::max);
                    let inv = if max > 0.0 { 127.0 / max } else { 0.0 };
                    scale[c] = max / 127.0;
                    let mut sum = 0i32;
                    for i in 0..k {
                        let q = round_ties_even(at(j, i) * inv).clamp(-127.0, 127.0) as i8;
                        panel[(i / 4) * NR * 4 + c * 4 + i % 4] = q;
                        sum += q as i32;
                    }
                    shift[c] = 128 * sum;
                }
            });
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

/// Activations of `m` rows quantized per row, rows `stride` bytes apart (depth padded to
/// `kp` with the zero point, then with zeros to `stride`).
#[derive(Default)]
struct QRows {
    bytes: Vec<u8>,
    scale: Vec<f32>,
    stride: usize,
}

thread_local! {
    /// Reused quantized-activation buffers (one per calling thread).
    static ROWS: std::cell::RefCell<QRows> = const {
        std::cell::RefCell::new(QRows { bytes: Vec::new(), scale: Vec::new(), stride: 0 })
    };
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
        let q = round_ties_even(v * inv).clamp(-127.0, 127.0) as i32;
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
    // Whole blocks of rows, so that the kernels may read a full tile past `m` (AMX: two
    // tiles of 16).
    let mp = if kernel == Kernel::Amx {
        m.div_ceil(2 * 16) * 2 * 16
    } else {
        m.div_ceil(8) * 8
    };
    let ks = kernel.row_stride(kp);
    rows.stride = ks;
    // Not cleared: rows past `m` are never stored (a row's sums depend on that row alone),
    // and each row below `m` is written in full here (zeroing the buffer was 4% of the
    // int8 trunk's profile).
    if rows.bytes.len() < mp * ks {
        rows.bytes.resize(mp * ks, 0);
    }
    if rows.scale.len() < mp {
        rows.scale.resize(mp, 0.0);
    }
    let shifted = kernel.shifted();
    #[cfg(target_arch = "x86_64")]
    let avx2 = kernel != Kernel::Scalar && is_x86_feature_detected!("avx2");
    let row = |a: &[f32], out: &mut [u8]| -> f32 {
        #[cfg(target_arch = "x86_64")]
        if kernel.shifted() {
            // SAFETY: the VNNI and AMX kernels are only picked with AVX-512 F and BW present.
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
        for (i, (o, s)) in out.chunks_exact_mut(ks).zip(scales).enumerate() {
            let r = c * QUANT_CHUNK + i;
            let a = match src {
                Src::Rows(x) => &x[r * k..(r + 1) * k],
                Src::Gather(gather) => {
                    buf.resize(k, 0.0);
                    gather(r, &mut buf);
                    &buf[..]
                }
            };
            *s = row(a, &mut o[..kp]);
            o[kp..].fill(0);
        }
    };
    let (bytes, scales) = (&mut rows.bytes[..m * ks], &mut rows.scale[..m]);
    if m * k >= PAR_WORK && candle_core::utils::get_num_threads() > 1 {
        bytes
            .par_chunks_mut(QUANT_CHUNK * ks)
            .zip(scales.par_chunks_mut(QUANT_CHUNK))
            .enumerate()
            .for_each(work);
    } else {
        bytes
            .chunks_mut(QUANT_CHUNK * ks)
            .zip(scales.chunks_mut(QUANT_CHUNK))
            .enumerate()
            .for_each(work);
    }
}

/// Where one tile writes: `dst` rows of `n` floats; then `+ bias[j]` (when not null) and
/// ReLU if `relu`.
#[derive(Clone, Copy)]
struct Out {
    dst: *mut f32,
    n: usize,
    read_dst: bool,
    bias: *const f32,
    relu: bool,
}
// SAFETY: tiles write disjoint parts of `dst` (distinct rows or column panels).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// `dst [m, n] (+)= x [m, k] W^T`, `W` the int8 weight. `x` is quantized per row here.
pub fn matmul(kernel: Kernel, x: &[f32], m: usize, w: &QMatrix, dst: &mut [f32], read_dst: bool) {
    matmul_fused(kernel, x, m, w, dst, read_dst, None);
}

/// `x [m, k] W^T`, then `epi`, into a new `[m, n]` buffer. The kernels' stores write every
/// element, so the buffer is not zeroed first (zeroing took 2% of an OFA-Base request).
pub fn matmul_new(kernel: Kernel, x: &[f32], m: usize, w: &QMatrix, epi: Epilogue) -> Vec<f32> {
    assert_eq!(x.len(), m * w.k, "int8 matmul: sizes");
    let mut y = Vec::with_capacity(m * w.n);
    // SAFETY: the capacity holds m x n floats; without `read_dst` the product writes each
    // of them (tests check on every kernel) and reads none, so all are set before `set_len`.
    unsafe {
        product(kernel, Src::Rows(x), m, w, y.as_mut_ptr(), false, epi);
        y.set_len(m * w.n);
    }
    y
}

/// A per-column bias added after the product (and the accumulated `dst`), then ReLU if
/// the flag is set: in the kernels' stores, not a pass of its own.
pub type Epilogue<'a> = Option<(&'a [f32], bool)>;

/// `x [..., k] W^T (+ bias)` through the int8 kernel (the bias in its stores): `[..., n]` f32.
pub fn int8_linear(x: &Tensor, w: &QMatrix, bias: Option<&[f32]>) -> Result<Tensor> {
    let dims = x.dims();
    let k = *dims.last().unwrap_or(&0);
    if k != w.cols() || x.dtype() != DType::F32 || !x.device().is_cpu() {
        candle_core::bail!(
            "int8 linear: input {:?} {:?} for a weight of {} inputs (f32 on the CPU)",
            dims,
            x.dtype(),
            w.cols()
        );
    }
    let m = x.elem_count() / k.max(1);
    let n = w.rows();
    let x = x.contiguous()?;
    if let Some(b) = bias.filter(|b| b.len() != n) {
        candle_core::bail!("int8 linear: a bias of {} for {n} outputs", b.len());
    }
    let y = {
        let (storage, layout) = x.storage_and_layout();
        let data = match (&*storage, layout.contiguous_offsets()) {
            (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => &v[a..b],
            _ => candle_core::bail!("int8 linear: f32 contiguous input expected"),
        };
        let epi = bias.map(|b| (b, false));
        matmul_new(Kernel::detect(), data, m, w, epi)
    };
    let mut out = dims[..dims.len() - 1].to_vec();
    out.push(n);
    Tensor::from_vec(y, out, x.device())
}

/// [`matmul`] followed by `epi`.
pub fn matmul_fused(
    kernel: Kernel,
    x: &[f32],
    m: usize,
    w: &QMatrix,
    dst: &mut [f32],
    read_dst: bool,
    epi: Epilogue,
) {
    assert_eq!(x.len(), m * w.k, "int8 matmul: sizes");
    assert_eq!(dst.len(), m * w.n, "int8 matmul: sizes");
    // SAFETY: `dst` is m x n initialised floats.
    unsafe { product(kernel, Src::Rows(x), m, w, dst.as_mut_ptr(), read_dst, epi) };
}

/// [`matmul_fused`] with row `r` of `x` written by `gather(r, row)` (`row` holds `k` floats).
pub fn matmul_gather(
    kernel: Kernel,
    m: usize,
    w: &QMatrix,
    dst: &mut [f32],
    read_dst: bool,
    gather: &(dyn Fn(usize, &mut [f32]) + Sync),
    epi: Epilogue,
) {
    assert_eq!(dst.len(), m * w.n, "int8 matmul: sizes");
    // SAFETY: `dst` is m x n initialised floats.
    unsafe {
        product(
            kernel,
            Src::Gather(gather),
            m,
            w,
            dst.as_mut_ptr(),
            read_dst,
            epi,
        )
    };
}

/// `dst [m, n] (+)= x W^T`, then `epi`: every element of `dst` written once.
///
/// # Safety
/// `dst` is valid for writes of `m * n` floats, which are initialised if `read_dst`.
unsafe fn product(
    kernel: Kernel,
    x: Src,
    m: usize,
    w: &QMatrix,
    dst: *mut f32,
    read_dst: bool,
    epi: Epilogue,
) {
    let (n, k) = (w.n, w.k);
    if let Some((bias, _)) = epi {
        assert_eq!(bias.len(), n, "int8 matmul: bias size");
    }
    assert!(
        kernel.supported(),
        "int8 kernel {kernel:?} not supported here"
    );
    if m == 0 || n == 0 {
        return;
    }
    // AMX's tiles are 16 rows: few rows (decoding) take the VNNI kernel (the same sums).
    let kernel = if kernel == Kernel::Amx && m < AMX_MIN_ROWS {
        Kernel::Avx512Vnni
    } else {
        kernel
    };
    // Taken out of the thread-local, not borrowed: while it waits for rayon this thread
    // may run another request's product.
    let mut rows = ROWS.with(|r| std::mem::take(&mut *r.borrow_mut()));
    quantize_rows(x, m, k, w.kp, kernel, &mut rows);
    {
        let out = Out {
            dst,
            n,
            read_dst,
            bias: epi.map_or(std::ptr::null(), |(b, _)| b.as_ptr()),
            relu: epi.is_some_and(|(_, relu)| relu),
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
    #[cfg(target_arch = "x86_64")]
    if kernel == Kernel::Amx {
        // SAFETY: AMX is usable (`product` asserts `supported`); the rows buffer holds
        // whole pairs of 16-row tiles of `stride` bytes past r1 and the panels one tile
        // of slack (see `quantize_rows`, `QMatrix::build`).
        unsafe { x86::block_amx(rows, w, out, r0, r1, p0, p1) };
        return;
    }
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
    let (kp, ks) = (w.kp, rows.stride);
    let panel = &w.packed[p * kp * NR..(p + 1) * kp * NR];
    for i in 0..mr {
        let a = &rows.bytes[(r + i) * ks..(r + i) * ks + kp];
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
                // SAFETY: row r + i < m and column j < n: inside dst, and this tile's alone;
                // a bias holds n floats.
                unsafe {
                    let d = out.dst.add((r + i) * out.n + j);
                    let scale = sa * w.scale[j];
                    let mut y = if out.read_dst {
                        s.mul_add(scale, *d)
                    } else {
                        s * scale
                    };
                    if !out.bias.is_null() {
                        y += *out.bias.add(j);
                        if out.relu {
                            y = y.max(0.0);
                        }
                    }
                    *d = y;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{round_ties_even, Out, QMatrix, QRows, NR};
    use std::arch::x86_64::*;

    /// `y + bias[j0..j0 + 16]` and ReLU as `out` asks (the scalar store's arithmetic).
    #[inline(always)]
    unsafe fn epilogue(y: __m512, out: Out, j0: usize, mask: __mmask16) -> __m512 {
        if out.bias.is_null() {
            return y;
        }
        let y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, out.bias.add(j0)));
        if out.relu {
            _mm512_max_ps(y, _mm512_setzero_ps())
        } else {
            y
        }
    }

    /// `MR` rows x `NV` panels with `vpdpbusd`, scaled and stored (masked at the last column).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma")]
    pub unsafe fn tile_vnni<const MR: usize, const NV: usize>(
        rows: &QRows,
        w: &QMatrix,
        out: Out,
        r: usize,
        p: usize,
    ) {
        let (kp, ks) = (w.kp, rows.stride);
        let a = rows.bytes.as_ptr().add(r * ks);
        let b = w.packed.as_ptr().add(p * kp * NR);
        let mut acc = [[_mm512_setzero_si512(); NV]; MR];
        for k4 in 0..kp / 4 {
            let mut wv = [_mm512_setzero_si512(); NV];
            for (v, x) in wv.iter_mut().enumerate() {
                *x = _mm512_loadu_si512(b.add(v * kp * NR + k4 * 4 * NR) as *const _);
            }
            for (i, acc) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_epi32((a.add(i * ks + 4 * k4) as *const i32).read_unaligned());
                for v in 0..NV {
                    acc[v] = _mm512_dpbusd_epi32(acc[v], av, wv[v]);
                }
            }
        }
        for v in 0..NV {
            let j0 = (p + v) * NR;
            let Some(cols) = columns(w, out, j0) else {
                break;
            };
            for (i, acc) in acc.iter().enumerate() {
                store(acc[v], rows.scale[r + i], cols, out, r + i, j0);
            }
        }
    }

    /// The 16 columns from `j0`: store mask, zero-point corrections and weight scales
    /// (None past the last column).
    #[inline(always)]
    unsafe fn columns(w: &QMatrix, out: Out, j0: usize) -> Option<(__mmask16, __m512i, __m512)> {
        if j0 >= out.n {
            return None;
        }
        let left = out.n - j0;
        let mask: __mmask16 = if left >= NR {
            0xffff
        } else {
            (1u16 << left) - 1
        };
        let shift = _mm512_loadu_si512(w.shift.as_ptr().add(j0) as *const _);
        Some((mask, shift, _mm512_loadu_ps(w.scale.as_ptr().add(j0))))
    }

    /// One row's 16 sums scaled (`sa` the row's scale) and stored at `row`, `j0`: onto
    /// `dst` when accumulating, then the epilogue.
    #[inline(always)]
    unsafe fn store(
        acc: __m512i,
        sa: f32,
        (mask, shift, sw): (__mmask16, __m512i, __m512),
        out: Out,
        row: usize,
        j0: usize,
    ) {
        let s = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc, shift));
        let scale = _mm512_mul_ps(_mm512_set1_ps(sa), sw);
        let d = out.dst.add(row * out.n + j0);
        let y = if out.read_dst {
            _mm512_fmadd_ps(s, scale, _mm512_maskz_loadu_ps(mask, d))
        } else {
            _mm512_mul_ps(s, scale)
        };
        _mm512_mask_storeu_ps(d, mask, epilogue(y, out, j0, mask));
    }

    /// Whether the AMX tile unit runs int8 products here: the CPU has AMX-TILE and
    /// AMX-INT8, the OS saves the tile state (XCR0 bits 17 and 18), and Linux grants this
    /// process the tile data (`arch_prctl(ARCH_REQ_XCOMP_PERM)`; asked once).
    pub fn amx_usable() -> bool {
        static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *OK.get_or_init(|| {
            // SAFETY: cpuid leaf 7 exists on every x86_64 CPU that has AVX-512 (checked by
            // the caller first); xgetbv only after cpuid reports OSXSAVE.
            unsafe {
                let leaf7 = __cpuid_count(7, 0);
                let (tile, int8) = ((leaf7.edx >> 24) & 1 == 1, (leaf7.edx >> 25) & 1 == 1);
                let osxsave = (__cpuid(1).ecx >> 27) & 1 == 1;
                if !(tile && int8 && osxsave) || (_xgetbv(0) >> 17) & 3 != 3 {
                    return false;
                }
                request_tile_data()
            }
        })
    }

    /// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`: Linux refuses AMX
    /// instructions (SIGILL) to a process that has not asked for the tile state.
    #[cfg(target_os = "linux")]
    unsafe fn request_tile_data() -> bool {
        const SYS_ARCH_PRCTL: i64 = 158;
        const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
        const XFEATURE_XTILEDATA: i64 = 18;
        let ret: i64;
        std::arch::asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
        ret == 0
    }

    #[cfg(not(target_os = "linux"))]
    unsafe fn request_tile_data() -> bool {
        false
    }

    /// Tile palette 1: tmm0-3 accumulators (16 rows of 16 i32), tmm4-5 activation tiles
    /// (16 rows of 64 bytes), tmm6-7 weight tiles (16 rows of 4-byte groups for 16 columns).
    #[repr(C, align(64))]
    struct TileConfig([u8; 64]);

    const TILE_CONFIG: TileConfig = {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut t = 0;
        while t < 8 {
            c[16 + 2 * t] = 64; // bytes per row
            c[48 + t] = 16; // rows
            t += 1;
        }
        TileConfig(c)
    };

    #[repr(C, align(64))]
    struct Sums([i32; 4 * 256]);

    /// Rows `r0..r1` x panels `p0..p1` on AMX: pairs of 16-row tiles x pairs of panels,
    /// the whole depth in 64-byte tiles, then scaled and stored as [`tile_vnni`] does.
    ///
    /// # Safety
    /// AMX usable ([`amx_usable`]) with AVX-512 F/BW; `rows` quantized for `Kernel::Amx`
    /// (row stride a multiple of 64, zero past `kp`, whole pairs of tiles past `r1`); `w`'s
    /// panels followed by a tile of slack; `out` as in [`super::block`].
    #[target_feature(enable = "avx512f,avx512bw,fma")]
    pub unsafe fn block_amx(
        rows: &QRows,
        w: &QMatrix,
        out: Out,
        r0: usize,
        r1: usize,
        p0: usize,
        p1: usize,
    ) {
        use std::arch::asm;
        let (kp, ks) = (w.kp, rows.stride);
        debug_assert!(ks.is_multiple_of(64) && ks >= kp);
        let depth_tiles = kp.div_ceil(64);
        let mut sums = Sums([0; 4 * 256]);
        asm!("ldtilecfg [{}]", in(reg) TILE_CONFIG.0.as_ptr(), options(nostack, readonly));
        let mut p = p0;
        while p < p1 {
            let two = p + 1 < p1;
            let b0 = w.packed.as_ptr().add(p * kp * NR);
            let b1 = b0.add(kp * NR);
            let mut r = r0;
            while r < r1 {
                let a0 = rows.bytes.as_ptr().add(r * ks);
                let a1 = a0.add(16 * ks);
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nomem, nostack)
                );
                for t in 0..depth_tiles {
                    asm!(
                        "tileloadd tmm4, [{a0} + {ks}*1]",
                        "tileloadd tmm5, [{a1} + {ks}*1]",
                        "tileloadd tmm6, [{b0} + {s64}*1]",
                        "tdpbusd tmm0, tmm4, tmm6",
                        "tdpbusd tmm1, tmm5, tmm6",
                        a0 = in(reg) a0.add(64 * t),
                        a1 = in(reg) a1.add(64 * t),
                        b0 = in(reg) b0.add(1024 * t),
                        ks = in(reg) ks,
                        s64 = in(reg) 64usize,
                        options(nostack, readonly)
                    );
                    if two {
                        asm!(
                            "tileloadd tmm7, [{b1} + {s64}*1]",
                            "tdpbusd tmm2, tmm4, tmm7",
                            "tdpbusd tmm3, tmm5, tmm7",
                            b1 = in(reg) b1.add(1024 * t),
                            s64 = in(reg) 64usize,
                            options(nostack, readonly)
                        );
                    }
                }
                let c = sums.0.as_mut_ptr();
                asm!(
                    "tilestored [{c0} + {s64}*1], tmm0",
                    "tilestored [{c1} + {s64}*1], tmm1",
                    "tilestored [{c2} + {s64}*1], tmm2",
                    "tilestored [{c3} + {s64}*1], tmm3",
                    c0 = in(reg) c,
                    c1 = in(reg) c.add(256),
                    c2 = in(reg) c.add(512),
                    c3 = in(reg) c.add(768),
                    s64 = in(reg) 64usize,
                    options(nostack)
                );
                for v in 0..1 + two as usize {
                    let j0 = (p + v) * NR;
                    let Some(cols) = columns(w, out, j0) else {
                        break;
                    };
                    for half in 0..2 {
                        let tile = &sums.0[(2 * v + half) * 256..][..256];
                        for i in 0..16 {
                            let row = r + 16 * half + i;
                            if row >= r1 {
                                break;
                            }
                            let acc = _mm512_loadu_si512(tile.as_ptr().add(16 * i) as *const _);
                            store(acc, rows.scale[row], cols, out, row, j0);
                        }
                    }
                }
                r += 32;
            }
            p += 1 + two as usize;
        }
        asm!("tilerelease", options(nomem, nostack));
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
            let q = round_ties_even(v * inv).clamp(-127.0, 127.0) as i32;
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
        let (kp, ks) = (w.kp, rows.stride);
        let b = w.packed.as_ptr().add(p * kp * NR);
        let ones = _mm256_set1_epi16(1);
        for i in 0..mr {
            let a = rows.bytes.as_ptr().add((r + i) * ks);
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

    #[test]
    fn two_add_rounding_is_round_ties_even() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let ties = (-300..300).map(|i| i as f32 + 0.5);
        let near = (-300..300).flat_map(|i| {
            let x = i as f32 + 0.5;
            [x.next_up(), x.next_down(), i as f32]
        });
        let random = (0..100_000).map(|_| rng.random_range(-130.0f32..130.0));
        let special = [0.0, -0.0, 1e-30, -1e-30, 4194304.0, -4194303.5];
        for x in ties.chain(near).chain(random).chain(special) {
            // The sign of a zero may differ (-0.5 gives +0): equal as the integer stored.
            assert_eq!(round_ties_even(x) as i32, x.round_ties_even() as i32, "{x}");
            assert_eq!(round_ties_even(x), x.round_ties_even(), "{x}");
        }
        assert!(round_ties_even(f32::NAN).is_nan());
    }

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
            (33, 31, 64),
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
                // NaN before: an element the stores missed fails the bound below.
                let mut y = vec![f32::NAN; m * n];
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
                // Bias and ReLU in the stores: the same bits as after them.
                let bias = rand_vec(n, &mut rng);
                let mut fused = res.clone();
                matmul_fused(kernel, &x, m, &q, &mut fused, true, Some((&bias, true)));
                for t in 0..m * n {
                    let want = (acc[t] + bias[t % n]).max(0.0);
                    assert!(fused[t] == want, "{kernel:?} fused epilogue at {t}");
                }
                // Into a new buffer with the bias in the stores: the same bits as after.
                let new = matmul_new(kernel, &x, m, &q, Some((&bias, false)));
                assert!(new
                    .iter()
                    .zip(&y)
                    .enumerate()
                    .all(|(t, (&a, &b))| a == b + bias[t % n]));
                // Rows gathered one at a time (the convolutions' path): the same bits.
                let mut g = vec![0f32; m * n];
                let gather = |r: usize, row: &mut [f32]| row.copy_from_slice(&x[r * k..][..k]);
                matmul_gather(kernel, m, &q, &mut g, false, &gather, None);
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
