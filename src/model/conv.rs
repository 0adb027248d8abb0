//! Inference convolutions for the ResNet trunk: activations stay channels-last (NHWC, a
//! `[pixels, channels]` matrix), so a 1x1 convolution is one GEMM and a k x k one an
//! im2col (contiguous channel runs) followed by one GEMM, all through the `gemm` crate
//! (runtime CPU-feature dispatch). The folded BatchNorm bias, the residual sum and the
//! ReLU are applied in one pass over the output. No backward pass: training keeps
//! candle's ops (`resnet.rs`).

use super::conv_kernel::{self, Panels, Rows};
use candle_core::{DType, Device, Result, Tensor};
use std::borrow::Cow;

/// Largest im2col buffer (floats) per GEMM: bounds memory at large batches.
const IM2COL_FLOATS: usize = 1 << 22;

/// Buffers kept for reuse per thread (a bottleneck holds at most four at once).
const POOL_BUFFERS: usize = 4;

thread_local! {
    /// Freed activation buffers of this thread. A fresh large allocation is a new mapping
    /// whose pages the kernel faults in and zeroes on first touch: without reuse that was
    /// ~30% of the trunk's time (perf, OFA-Tiny at batch 8).
    static POOL: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A buffer of `n` floats, from the pool when one is large enough. Its contents are
/// unspecified (a pooled buffer keeps its old values): every caller overwrites it all.
pub(super) fn take(n: usize) -> Vec<f32> {
    let mut v = POOL
        .with(|p| {
            let mut p = p.borrow_mut();
            let fit = (0..p.len())
                .filter(|&i| p[i].capacity() >= n)
                .min_by_key(|&i| p[i].capacity());
            fit.map(|i| p.swap_remove(i))
        })
        .unwrap_or_default();
    // Zeroing what is then overwritten was 6% of the trunk's profile.
    v.truncate(n);
    v.resize(n, 0.0);
    v
}

/// Returns a buffer to the pool (the smallest is dropped when it is full).
pub(super) fn give(v: Vec<f32>) {
    if v.capacity() == 0 {
        return;
    }
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        p.push(v);
        if p.len() > POOL_BUFFERS {
            let i = (0..p.len()).min_by_key(|&i| p[i].capacity()).unwrap();
            p.swap_remove(i);
        }
    });
}

/// Activations `[b, h, w, c]`, row-major. Their buffer goes back to the pool on drop.
#[derive(Debug)]
pub struct Nhwc {
    pub data: Vec<f32>,
    pub b: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
}

impl Nhwc {
    /// From an NCHW f32 tensor `[b, c, h, w]`.
    pub fn from_nchw(x: &Tensor) -> Result<Self> {
        let (b, c, h, w) = x.dims4()?;
        let data = x
            .to_dtype(DType::F32)?
            .permute((0, 2, 3, 1))?
            .contiguous()?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(Self { data, b, h, w, c })
    }

    /// `[b, h * w, c]` (the trunk's patch features, row-major patch order).
    pub fn into_tokens(mut self, device: &Device) -> Result<Tensor> {
        let data = std::mem::take(&mut self.data);
        Tensor::from_vec(data, (self.b, self.h * self.w, self.c), device)
    }

    /// `[b, c, h, w]`.
    pub fn into_nchw(mut self, device: &Device) -> Result<Tensor> {
        let (b, h, w, c) = (self.b, self.h, self.w, self.c);
        let data = std::mem::take(&mut self.data);
        Tensor::from_vec(data, (b, h, w, c), device)?
            .permute((0, 3, 1, 2))?
            .contiguous()
    }
}

impl Drop for Nhwc {
    fn drop(&mut self) {
        give(std::mem::take(&mut self.data));
    }
}

/// A convolution (BatchNorm folded in) with its weight packed as the GEMM's right operand.
#[derive(Debug, Clone)]
pub struct PackedConv {
    /// `[k * k * c_in, c_out]`: row `(ky * k + kx) * c_in + ci`; empty when `panels` holds it.
    weight: Vec<f32>,
    /// The same weight packed for [`conv_kernel`] (CPUs that run it).
    panels: Option<Panels>,
    bias: Vec<f32>,
    c_in: usize,
    c_out: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    /// The same weight in int8 (`--precision int8`): then the products run in int8.
    int8: Option<super::quant::QMatrix>,
}

impl PackedConv {
    /// From a weight `[c_out, c_in, k, k]` (or `[c_out, c_in]` for k = 1) and a bias `[c_out]`.
    pub fn new(
        weight: &Tensor,
        bias: &Tensor,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        Self::build(
            weight,
            bias,
            kernel,
            stride,
            padding,
            conv_kernel::available(),
        )
    }

    /// [`Self::new`] on the portable path (`gemm::gemm`), as on CPUs without AVX-512.
    #[cfg(test)]
    fn portable(
        weight: &Tensor,
        bias: &Tensor,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        Self::build(weight, bias, kernel, stride, padding, false)
    }

    fn build(
        weight: &Tensor,
        bias: &Tensor,
        kernel: usize,
        stride: usize,
        padding: usize,
        packed_kernel: bool,
    ) -> Result<Self> {
        let (c_out, c_in) = (weight.dim(0)?, weight.dim(1)?);
        if weight.elem_count() != c_out * c_in * kernel * kernel || stride == 0 || kernel == 0 {
            candle_core::bail!(
                "packed conv: weight {:?} does not match kernel {kernel}, stride {stride}",
                weight.dims()
            );
        }
        let w = weight
            .to_dtype(DType::F32)?
            .reshape((c_out, c_in, kernel, kernel))?
            .permute((2, 3, 1, 0))? // [ky, kx, ci, o]
            .contiguous()?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let bias = bias.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        if bias.len() != c_out {
            candle_core::bail!("packed conv: bias has {} entries for {c_out}", bias.len());
        }
        let k = kernel * kernel * c_in;
        let (weight, panels) = if packed_kernel {
            (Vec::new(), Some(Panels::pack(&w, k, c_out)))
        } else {
            (w, None)
        };
        Ok(Self {
            weight,
            panels,
            bias,
            c_in,
            c_out,
            kernel,
            stride,
            padding,
            int8: None,
        })
    }

    /// This convolution with its products in int8 (weight quantized per output channel).
    pub fn to_int8(&self) -> PackedConv {
        let k = self.kernel * self.kernel * self.c_in;
        PackedConv {
            int8: Some(super::quant::QMatrix::from_cols(
                &self.weight_rows(),
                k,
                self.c_out,
            )),
            ..self.clone()
        }
    }

    /// The weight `[k * k * c_in, c_out]`, row-major.
    fn weight_rows(&self) -> Cow<'_, [f32]> {
        match &self.panels {
            Some(p) => Cow::Owned(p.unpack()),
            None => Cow::Borrowed(&self.weight),
        }
    }

    /// `dst [m, c_out] (+)= a [m, k] @ weight`, in int8 (then `epi` in its stores) when the
    /// convolution has it.
    fn gemm(
        &self,
        dst: &mut [f32],
        read_dst: bool,
        a: &[f32],
        m: usize,
        k: usize,
        epi: super::quant::Epilogue,
    ) {
        match &self.int8 {
            Some(q) => {
                let kernel = super::quant::Kernel::detect();
                super::quant::matmul_fused(kernel, a, m, q, dst, read_dst, epi)
            }
            None => gemm_rows(dst, read_dst, a, &self.weight_rows(), m, k, self.c_out),
        }
    }

    pub fn bias(&self) -> &[f32] {
        &self.bias
    }

    /// Output side for an input side (torch's floor arithmetic).
    pub fn out_side(&self, n: usize) -> usize {
        (n + 2 * self.padding).saturating_sub(self.kernel) / self.stride + 1
    }

    /// `conv(x) + bias`, then ReLU if `relu`.
    pub fn forward(&self, x: &Nhwc, relu: bool) -> Result<Nhwc> {
        self.fused(x, None, Some(&self.bias), relu)
    }

    /// The bare product `conv(x)` (no bias), added to `acc` when given (same output shape),
    /// else into a fresh buffer.
    pub fn product(&self, x: &Nhwc, acc: Option<Nhwc>) -> Result<Nhwc> {
        self.fused(x, acc, None, false)
    }

    /// `conv(x) (+ acc) (+ bias)`, then ReLU if `relu`: on [`conv_kernel`] in one pass
    /// per tile, else the product and then [`epilogue`].
    pub fn fused(
        &self,
        x: &Nhwc,
        acc: Option<Nhwc>,
        bias: Option<&[f32]>,
        relu: bool,
    ) -> Result<Nhwc> {
        if let Some(b) = bias {
            if b.len() != self.c_out {
                candle_core::bail!(
                    "packed conv: bias has {} entries for {}",
                    b.len(),
                    self.c_out
                );
            }
        }
        if self.int8.is_some() {
            // The bias and ReLU in the int8 kernels' stores.
            let zeros;
            let bias = match bias {
                Some(b) => Some(b),
                None if relu => {
                    zeros = vec![0.0; self.c_out];
                    Some(&zeros[..])
                }
                None => None,
            };
            return self.product_gemm(x, acc, bias.map(|b| (b, relu)));
        }
        let Some(panels) = &self.panels else {
            let mut y = self.product_gemm(x, acc, None)?;
            if bias.is_some() || relu {
                epilogue(&mut y.data, &[bias.unwrap_or(&vec![0.0; self.c_out])], relu);
            }
            return Ok(y);
        };
        let (rows, (oh, ow), mut out, read_dst) = self.output(x, acc)?;
        let zeros;
        let bias = match bias {
            Some(b) => b,
            None => {
                zeros = vec![0.0; self.c_out];
                &zeros
            }
        };
        let gather = |r0: usize, m: usize, buf: &mut [f32]| self.im2col(x, oh, ow, r0, m, buf);
        let a = if self.is_pointwise() {
            Rows::Stored(&x.data)
        } else {
            Rows::Gathered(&gather)
        };
        conv_kernel::conv(panels, a, rows, &mut out.data, read_dst, bias, relu);
        Ok(out)
    }

    fn is_pointwise(&self) -> bool {
        self.kernel == 1 && self.stride == 1 && self.padding == 0
    }

    /// The output's row count and sides, and its buffer: `acc`'s (checked, read) or fresh.
    #[allow(clippy::type_complexity)]
    fn output(&self, x: &Nhwc, acc: Option<Nhwc>) -> Result<(usize, (usize, usize), Nhwc, bool)> {
        if x.c != self.c_in {
            candle_core::bail!(
                "packed conv: input has {} channels, the weight {}",
                x.c,
                self.c_in
            );
        }
        let (oh, ow) = (self.out_side(x.h), self.out_side(x.w));
        let rows = x.b * oh * ow;
        let n = self.c_out;
        let (out, read_dst) = match acc {
            Some(a) => {
                if (a.b, a.h, a.w, a.c) != (x.b, oh, ow, n) {
                    candle_core::bail!("packed conv: accumulator shape does not match the output");
                }
                (a, true)
            }
            None => {
                let data = take(rows * n);
                (
                    Nhwc {
                        data,
                        b: x.b,
                        h: oh,
                        w: ow,
                        c: n,
                    },
                    false,
                )
            }
        };
        Ok((rows, (oh, ow), out, read_dst))
    }

    /// The product through `gemm::gemm` or int8 (CPUs without AVX-512, `--precision int8`);
    /// `epi` (int8 only) in the stores.
    fn product_gemm(
        &self,
        x: &Nhwc,
        acc: Option<Nhwc>,
        epi: super::quant::Epilogue,
    ) -> Result<Nhwc> {
        let (rows, (oh, ow), mut out, read_dst) = self.output(x, acc)?;
        let n = self.c_out;
        let dst = &mut out.data;
        let k = self.kernel * self.kernel * self.c_in;
        if self.is_pointwise() {
            self.gemm(dst, read_dst, &x.data, rows, k, epi);
        } else if let Some(q) = &self.int8 {
            // int8: each im2col row is gathered into a scratch row and quantized at once
            // (no f32 im2col matrix written and read back).
            let gather = |r: usize, row: &mut [f32]| self.im2col(x, oh, ow, r, 1, row);
            let kernel = super::quant::Kernel::detect();
            super::quant::matmul_gather(kernel, rows, q, dst, read_dst, &gather, epi);
        } else {
            // im2col in blocks of output pixels, each followed by its GEMM.
            let block = (IM2COL_FLOATS / k).clamp(1, rows);
            let mut cols = take(block * k);
            let mut r0 = 0;
            while r0 < rows {
                let m = block.min(rows - r0);
                self.im2col_par(x, oh, ow, r0, m, &mut cols[..m * k]);
                self.gemm(
                    &mut dst[r0 * n..(r0 + m) * n],
                    read_dst,
                    &cols[..m * k],
                    m,
                    k,
                    epi,
                );
                r0 += m;
            }
            give(cols);
        }
        Ok(out)
    }

    /// [`Self::im2col`] split over the rayon pool when large (a copy: the same bytes
    /// either way); on one thread it was a serial share of every 3x3 / 7x7 convolution.
    fn im2col_par(&self, x: &Nhwc, oh: usize, ow: usize, r0: usize, m: usize, cols: &mut [f32]) {
        use rayon::prelude::*;
        let k = cols.len() / m.max(1);
        let threads = candle_core::utils::get_num_threads();
        if threads == 1 || m * k < 1 << 16 {
            return self.im2col(x, oh, ow, r0, m, cols);
        }
        let per = m.div_ceil(4 * threads);
        cols.par_chunks_mut(per * k)
            .enumerate()
            .for_each(|(i, part)| self.im2col(x, oh, ow, r0 + i * per, part.len() / k, part));
    }

    /// Rows `r0..r0 + m` of the im2col matrix (output pixels in `[b, oh, ow]` order).
    fn im2col(&self, x: &Nhwc, oh: usize, ow: usize, r0: usize, m: usize, cols: &mut [f32]) {
        let (c, kk) = (self.c_in, self.kernel);
        let k = kk * kk * c;
        for (r, row) in (r0..r0 + m).zip(cols.chunks_exact_mut(k)) {
            let (bi, rest) = (r / (oh * ow), r % (oh * ow));
            let (oy, ox) = (rest / ow, rest % ow);
            // The taps of one kernel row that fall inside the image are one contiguous
            // run of the input (channels-last): one copy per kernel row, zeros around it.
            let left = ox * self.stride; // input column of tap kx, plus the padding
            let kx_lo = self.padding.saturating_sub(left).min(kk);
            let kx_hi = (x.w + self.padding).saturating_sub(left).clamp(kx_lo, kk);
            for (ky, out) in row.chunks_exact_mut(kk * c).enumerate() {
                let iy = (oy * self.stride + ky).wrapping_sub(self.padding);
                if iy >= x.h || kx_lo == kx_hi {
                    out.fill(0.0);
                    continue;
                }
                let ix = left + kx_lo - self.padding;
                let p = ((bi * x.h + iy) * x.w + ix) * c;
                out[..kx_lo * c].fill(0.0);
                out[kx_lo * c..kx_hi * c].copy_from_slice(&x.data[p..p + (kx_hi - kx_lo) * c]);
                out[kx_hi * c..].fill(0.0);
            }
        }
    }
}

/// `dst [m, n] (+)= a [m, k] @ b [k, n]`, all row-major.
fn gemm_rows(dst: &mut [f32], read_dst: bool, a: &[f32], b: &[f32], m: usize, k: usize, n: usize) {
    assert!(dst.len() == m * n && a.len() == m * k && b.len() == k * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !read_dst {
            dst.fill(0.0);
        }
        return;
    }
    let threads = candle_core::utils::get_num_threads();
    let par = if threads > 1 && m * n * k >= 1 << 16 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the three buffers hold m*n, m*k and k*n floats (asserted above), with the
    // row and column strides given; dst does not alias a or b (distinct borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            read_dst,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// Adds the per-channel biases to every row of `y` (`[rows, c]`), then ReLU if `relu`:
/// one pass over the output.
pub fn epilogue(y: &mut [f32], biases: &[&[f32]], relu: bool) {
    let c = biases.first().map_or(0, |b| b.len());
    if c == 0 {
        return;
    }
    let bias: Vec<f32> = (0..c).map(|i| biases.iter().map(|b| b[i]).sum()).collect();
    for row in y.chunks_exact_mut(c) {
        if relu {
            for (v, b) in row.iter_mut().zip(&bias) {
                *v = (*v + b).max(0.0);
            }
        } else {
            for (v, b) in row.iter_mut().zip(&bias) {
                *v += b;
            }
        }
    }
}

/// 3x3 stride-2 max pool with padding 1 (padding never wins: torch's -inf padding).
pub fn max_pool_3x3_s2(x: &Nhwc) -> Nhwc {
    let (oh, ow) = ((x.h + 2 - 3) / 2 + 1, (x.w + 2 - 3) / 2 + 1);
    let c = x.c;
    let mut out = take(x.b * oh * ow * c);
    // One output row (all its pixels) per task.
    let pool_row = |(r, dst_row): (usize, &mut [f32])| {
        let (bi, oy) = (r / oh, r % oh);
        dst_row.fill(f32::NEG_INFINITY);
        for (ox, dst) in dst_row.chunks_exact_mut(c).enumerate() {
            for iy in (2 * oy).saturating_sub(1)..(2 * oy + 2).min(x.h) {
                for ix in (2 * ox).saturating_sub(1)..(2 * ox + 2).min(x.w) {
                    let p = ((bi * x.h + iy) * x.w + ix) * c;
                    for (d, v) in dst.iter_mut().zip(&x.data[p..p + c]) {
                        *d = d.max(*v);
                    }
                }
            }
        }
    };
    if ow * c > 0 {
        use rayon::prelude::*;
        if candle_core::utils::get_num_threads() > 1 && out.len() >= 1 << 16 {
            out.par_chunks_mut(ow * c).enumerate().for_each(pool_row);
        } else {
            out.chunks_mut(ow * c).enumerate().for_each(pool_row);
        }
    }
    Nhwc {
        data: out,
        b: x.b,
        h: oh,
        w: ow,
        c,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_distr::{Distribution, StandardNormal};

    fn randn(shape: &[usize], rng: &mut rand_chacha::ChaCha8Rng) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut *rng)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        crate::model::max_abs_diff(a, b).unwrap()
    }

    /// Every kernel shape the trunk uses, at odd sizes, batch 1 and > 1, with and without
    /// padding, against candle's conv2d + bias (+ residual) (+ ReLU).
    #[test]
    fn packed_conv_matches_candle_conv2d() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        // (batch, c_in, c_out, h, w, kernel, stride, padding)
        let cases = [
            (1, 3, 8, 17, 13, 7, 2, 3),
            (2, 3, 5, 15, 16, 7, 2, 3),
            (2, 5, 7, 9, 11, 3, 1, 1),
            (3, 6, 4, 10, 7, 3, 2, 1),
            (1, 16, 9, 5, 5, 3, 2, 1),
            (2, 4, 6, 6, 5, 3, 1, 0),
            (2, 8, 16, 7, 9, 1, 1, 0),
            (1, 8, 16, 9, 7, 1, 2, 0),
            (3, 12, 5, 11, 10, 1, 2, 0),
            (1, 33, 17, 3, 4, 1, 1, 0),
            // Large enough for the threaded im2col.
            (2, 16, 8, 41, 39, 3, 1, 1),
            // Several panels (a partial last one) and depth blocks, pixel tiles with a
            // remainder.
            (3, 20, 130, 13, 11, 3, 1, 1),
            (1, 300, 200, 12, 13, 1, 1, 0),
            (2, 64, 128, 15, 16, 3, 2, 1),
            (1, 3, 64, 37, 29, 7, 2, 3),
        ];
        for (i, &(b, ci, co, h, w, k, s, p)) in cases.iter().enumerate() {
            let x = randn(&[b, ci, h, w], &mut rng);
            let wt = randn(&[co, ci, k, k], &mut rng);
            let bias = randn(&[co], &mut rng);
            // Every other case on the portable path (CPUs without AVX-512).
            let conv = if i % 2 == 1 {
                PackedConv::portable(&wt, &bias, k, s, p).unwrap()
            } else {
                PackedConv::new(&wt, &bias, k, s, p).unwrap()
            };
            let reference = x
                .conv2d(&wt, p, s, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, co, 1, 1)).unwrap())
                .unwrap();
            let (oh, ow) = (reference.dim(2).unwrap(), reference.dim(3).unwrap());
            assert_eq!((conv.out_side(h), conv.out_side(w)), (oh, ow));
            let xn = Nhwc::from_nchw(&x).unwrap();
            let what = format!("b{b} c{ci}->{co} {h}x{w} k{k} s{s} p{p} case {i}");
            // Plain, and with the ReLU fused.
            let got = conv
                .forward(&xn, false)
                .unwrap()
                .into_nchw(&Device::Cpu)
                .unwrap();
            // f32 rounding of sums over the depth (a wrong tap or channel is off by O(1)).
            let tol = 1e-4 * (k * k * ci) as f32 / 64.0;
            let tol = tol.max(1e-4);
            assert!(
                max_diff(&got, &reference) < tol,
                "{what}: {}",
                max_diff(&got, &reference)
            );
            let got = conv
                .forward(&xn, true)
                .unwrap()
                .into_nchw(&Device::Cpu)
                .unwrap();
            let want = reference.relu().unwrap();
            assert!(max_diff(&got, &want) < tol, "{what} relu");
            // Accumulated onto a residual, bias and ReLU after the sum.
            let res = randn(&[b, co, oh, ow], &mut rng);
            let mut y = conv
                .product(&xn, Some(Nhwc::from_nchw(&res).unwrap()))
                .unwrap();
            epilogue(&mut y.data, &[conv.bias()], true);
            let got = y.into_nchw(&Device::Cpu).unwrap();
            let want = (&reference + &res).unwrap().relu().unwrap();
            assert!(max_diff(&got, &want) < tol, "{what} residual");
        }
    }

    /// The int8 form of a convolution (3x3 with padding, strided 1x1, 1x1) against f32:
    /// within 2% of the output's largest magnitude (a few rounding steps of 1/127 of the
    /// operands' maxima), at batch 1 and 3.
    #[test]
    fn int8_conv_is_close_to_f32() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        for &(b, ci, co, h, w, k, s, p) in &[
            (1, 16, 24, 13, 11, 3, 1, 1),
            (3, 16, 24, 13, 11, 3, 2, 1),
            (3, 32, 20, 9, 9, 1, 2, 0),
            (1, 40, 33, 7, 5, 1, 1, 0),
        ] {
            let x = randn(&[b, ci, h, w], &mut rng).relu().unwrap();
            let wt = randn(&[co, ci, k, k], &mut rng);
            let bias = randn(&[co], &mut rng);
            let conv = PackedConv::new(&wt, &bias, k, s, p).unwrap();
            let xn = Nhwc::from_nchw(&x).unwrap();
            let want = conv
                .forward(&xn, false)
                .unwrap()
                .into_nchw(&Device::Cpu)
                .unwrap();
            let got = conv
                .to_int8()
                .forward(&xn, false)
                .unwrap()
                .into_nchw(&Device::Cpu)
                .unwrap();
            let scale = want
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let err = max_diff(&got, &want);
            assert!(
                err < 0.02 * scale,
                "b{b} {ci}->{co} k{k} s{s}: {err} of {scale}"
            );
            // ReLU, and a residual with the bias and ReLU after the sum, in the int8 stores.
            let q = conv.to_int8();
            let got = q.forward(&xn, true).unwrap().into_nchw(&Device::Cpu);
            let err = max_diff(&got.unwrap(), &want.relu().unwrap());
            assert!(err < 0.02 * scale, "b{b} {ci}->{co} k{k} s{s} relu: {err}");
            let res = randn(want.dims(), &mut rng);
            let acc = Some(Nhwc::from_nchw(&res).unwrap());
            let got = q.fused(&xn, acc, Some(conv.bias()), true).unwrap();
            let want = (&want + &res).unwrap().relu().unwrap();
            let err = max_diff(&got.into_nchw(&Device::Cpu).unwrap(), &want);
            assert!(
                err < 0.02 * scale,
                "b{b} {ci}->{co} k{k} s{s} residual: {err}"
            );
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let wt = randn(&[4, 3, 3, 3], &mut rng);
        let bias = randn(&[4], &mut rng);
        assert!(PackedConv::new(&wt, &bias, 1, 1, 0).is_err());
        assert!(PackedConv::new(&wt, &randn(&[5], &mut rng), 3, 1, 1).is_err());
        let conv = PackedConv::new(&wt, &bias, 3, 1, 1).unwrap();
        let x = Nhwc::from_nchw(&randn(&[1, 5, 4, 4], &mut rng)).unwrap();
        assert!(conv.forward(&x, false).is_err());
    }

    #[test]
    fn max_pool_matches_candle() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for (b, c, h, w) in [(1, 3, 7, 9), (2, 5, 8, 8), (3, 4, 13, 6), (1, 2, 2, 3)] {
            // Signed values: torch's -inf padding, not zeros, must decide the edges.
            let x = randn(&[b, c, h, w], &mut rng);
            let reference = Tensor::full(f32::MIN, (b, c, h + 2, w + 2), &Device::Cpu)
                .unwrap()
                .slice_assign(&[0..b, 0..c, 1..h + 1, 1..w + 1], &x)
                .unwrap()
                .max_pool2d_with_stride(3, 2)
                .unwrap();
            let got = max_pool_3x3_s2(&Nhwc::from_nchw(&x).unwrap())
                .into_nchw(&Device::Cpu)
                .unwrap();
            assert_eq!(got.dims(), reference.dims());
            assert_eq!(max_diff(&got, &reference), 0.0, "{b}x{c}x{h}x{w}");
        }
    }
}
