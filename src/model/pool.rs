//! 2-D max pooling with any kernel, stride and padding, and its backward pass.
//!
//! candle's `max_pool2d_with_stride` has no backward when the kernel differs from the
//! stride, and every OFA ResNet stem pools 3x3 with stride 2 (padding 1), so fine-tuning
//! a converted checkpoint needs this op. Padding acts as `-inf` (as in torch): a padded
//! position never wins a window.
//!
//! The gradient of each output goes to the input that won its window; on ties the first
//! position in row-major window order wins (torch's CPU rule), so the result is
//! deterministic. A NaN in a window wins it, so NaNs propagate as in torch.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

/// Output side of a pooled side `n` (torch's floor arithmetic; `n + 2 * padding` at least
/// `kernel`, `stride` positive).
pub fn pooled_side(n: usize, kernel: usize, stride: usize, padding: usize) -> usize {
    (n + 2 * padding).saturating_sub(kernel) / stride.max(1) + 1
}

/// `[b, c, h, w]` -> `[b, c, (h + 2p - k) / s + 1, (w + 2p - k) / s + 1]`: the maximum
/// of each `kernel` x `kernel` window, windows `stride` apart, over the input padded by
/// `padding` on every side. Differentiable (see the module notes).
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if kernel == 0 || stride == 0 {
        candle_core::bail!("max pool: kernel {kernel} and stride {stride} must be positive");
    }
    // torch's rule: every window then holds at least one real input.
    if padding > kernel / 2 {
        candle_core::bail!("max pool: padding {padding} exceeds half the kernel {kernel}");
    }
    if h == 0 || w == 0 {
        candle_core::bail!("max pool: empty input {h}x{w}");
    }
    if h + 2 * padding < kernel || w + 2 * padding < kernel {
        candle_core::bail!(
            "max pool: input {h}x{w} (padding {padding}) is smaller than the kernel {kernel}"
        );
    }
    x.contiguous()?.apply_op1(MaxPool2d {
        kernel,
        stride,
        padding,
    })
}

#[derive(Debug, Clone, Copy)]
struct MaxPool2d {
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl MaxPool2d {
    /// Index in an `h` x `w` plane of the input that wins output `(oy, ox)`.
    #[inline]
    fn argmax<T: Copy + PartialOrd>(
        &self,
        plane: &[T],
        (h, w): (usize, usize),
        (oy, ox): (usize, usize),
    ) -> usize {
        let y0 = (oy * self.stride).saturating_sub(self.padding);
        let x0 = (ox * self.stride).saturating_sub(self.padding);
        let y1 = (oy * self.stride + self.kernel - self.padding).min(h);
        let x1 = (ox * self.stride + self.kernel - self.padding).min(w);
        let mut best = y0 * w + x0;
        for y in y0..y1 {
            for x in x0..x1 {
                let i = y * w + x;
                let v = plane[i];
                // `v != v`: NaN wins, as in torch.
                #[allow(clippy::eq_op)]
                if v > plane[best] || v != v {
                    best = i;
                }
            }
        }
        best
    }

    fn out_dims(&self, dims: &[usize]) -> Result<(usize, usize, usize, usize, usize, usize)> {
        let [b, c, h, w] = dims else {
            candle_core::bail!("max pool expects [b, c, h, w], got {dims:?}");
        };
        let oh = pooled_side(*h, self.kernel, self.stride, self.padding);
        let ow = pooled_side(*w, self.kernel, self.stride, self.padding);
        Ok((*b, *c, *h, *w, oh, ow))
    }

    fn forward<T: Copy + PartialOrd>(&self, x: &[T], dims: &[usize]) -> Result<(Vec<T>, Shape)> {
        let (b, c, h, w, oh, ow) = self.out_dims(dims)?;
        let mut out = Vec::with_capacity(b * c * oh * ow);
        for plane in x.chunks_exact(h * w) {
            for oy in 0..oh {
                for ox in 0..ow {
                    out.push(plane[self.argmax(plane, (h, w), (oy, ox))]);
                }
            }
        }
        Ok((out, Shape::from((b, c, oh, ow))))
    }

    fn backward<T: Copy + PartialOrd + Default + std::ops::AddAssign>(
        &self,
        x: &[T],
        grad_out: &[T],
        dims: &[usize],
    ) -> Result<Vec<T>> {
        let (_, _, h, w, oh, ow) = self.out_dims(dims)?;
        let mut grad = vec![T::default(); x.len()];
        for ((plane, g_in), g_out) in x
            .chunks_exact(h * w)
            .zip(grad.chunks_exact_mut(h * w))
            .zip(grad_out.chunks_exact(oh * ow))
        {
            for oy in 0..oh {
                for ox in 0..ow {
                    g_in[self.argmax(plane, (h, w), (oy, ox))] += g_out[oy * ow + ox];
                }
            }
        }
        Ok(grad)
    }
}

/// The contiguous data of a storage in `layout`.
fn slice<'a, T>(data: &'a [T], layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("max pool needs a contiguous input"),
    }
}

impl CustomOp1 for MaxPool2d {
    fn name(&self) -> &'static str {
        "max-pool2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = layout.dims();
        match storage {
            CpuStorage::F32(d) => {
                let (v, s) = self.forward(slice(d, layout)?, dims)?;
                Ok((CpuStorage::F32(v), s))
            }
            CpuStorage::F64(d) => {
                let (v, s) = self.forward(slice(d, layout)?, dims)?;
                Ok((CpuStorage::F64(v), s))
            }
            s => candle_core::bail!("max pool supports f32 and f64, got {:?}", s.dtype()),
        }
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let grad = arg
            .contiguous()?
            .apply_op2_no_bwd(&grad_res.contiguous()?, &MaxPool2dGrad(*self))?;
        Ok(Some(grad))
    }
}

/// `(input, gradient of the output)` -> gradient of the input.
struct MaxPool2dGrad(MaxPool2d);

impl CustomOp2 for MaxPool2dGrad {
    fn name(&self) -> &'static str {
        "max-pool2d-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = l1.dims();
        let shape = Shape::from(dims);
        match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) => {
                let v = self.0.backward(slice(x, l1)?, slice(g, l2)?, dims)?;
                Ok((CpuStorage::F32(v), shape))
            }
            (CpuStorage::F64(x), CpuStorage::F64(g)) => {
                let v = self.0.backward(slice(x, l1)?, slice(g, l2)?, dims)?;
                Ok((CpuStorage::F64(v), shape))
            }
            (a, b) => candle_core::bail!(
                "max pool backward: dtypes {:?} and {:?}",
                a.dtype(),
                b.dtype()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var, D};

    fn randn(shape: (usize, usize, usize, usize), seed: u64, dtype: DType) -> Tensor {
        use rand::SeedableRng;
        use rand_distr::{Distribution, Normal};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let v: Vec<f64> = (0..n)
            .map(|_| Normal::new(0.0, 1.0).unwrap().sample(&mut rng))
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    /// Reference: candle's forward on the input padded with a value below every input.
    fn candle_pool(x: &Tensor, k: usize, s: usize, p: usize) -> Tensor {
        let low = (x.min_all().unwrap() - 1.0).unwrap();
        let (b, c, h, w) = x.dims4().unwrap();
        let padded = low
            .broadcast_as((b, c, h + 2 * p, w + 2 * p))
            .unwrap()
            .contiguous()
            .unwrap()
            .slice_assign(&[0..b, 0..c, p..p + h, p..p + w], x)
            .unwrap();
        padded.max_pool2d_with_stride(k, s).unwrap()
    }

    #[test]
    fn forward_matches_candle_on_random_inputs() {
        // Odd and even sizes, batch 1 and more, the ResNet stem's 3/2/1 and others.
        let cases = [
            ((1, 1, 7, 7), 3, 2, 1),
            ((2, 3, 9, 6), 3, 2, 1),
            ((3, 2, 8, 11), 3, 2, 1),
            ((1, 4, 13, 5), 3, 1, 1),
            ((2, 2, 10, 10), 2, 2, 0),
            ((2, 1, 9, 12), 5, 3, 2),
            ((1, 2, 6, 7), 3, 3, 0),
        ];
        for (i, (shape, k, s, p)) in cases.into_iter().enumerate() {
            for dtype in [DType::F32, DType::F64] {
                let x = randn(shape, i as u64, dtype);
                let got = max_pool2d(&x, k, s, p).unwrap();
                let want = candle_pool(&x, k, s, p);
                assert_eq!(got.dims(), want.dims(), "case {i}");
                let diff = crate::model::max_abs_diff(&got, &want).unwrap();
                assert_eq!(diff, 0.0, "case {i} {dtype:?}: forward differs by {diff}");
                assert_eq!(
                    got.dim(D::Minus1).unwrap(),
                    pooled_side(shape.3, k, s, p),
                    "case {i}"
                );
            }
        }
        // A strided (non-contiguous) input pools like its contiguous copy.
        let x = randn((2, 5, 3, 9), 9, DType::F32).transpose(1, 2).unwrap();
        let a = max_pool2d(&x, 3, 2, 1).unwrap();
        let b = max_pool2d(&x.contiguous().unwrap(), 3, 2, 1).unwrap();
        assert_eq!(crate::model::max_abs_diff(&a, &b).unwrap(), 0.0);
    }

    #[test]
    fn backward_matches_finite_differences() {
        // Central differences of L = sum(pool(x) * r) in f64 for every input element.
        let eps = 1e-6;
        for (i, (shape, k, s, p)) in [
            ((1, 1, 7, 7), 3, 2, 1),
            ((2, 3, 9, 6), 3, 2, 1),
            ((3, 1, 5, 8), 3, 1, 1),
            ((1, 2, 9, 9), 5, 3, 2),
        ]
        .into_iter()
        .enumerate()
        {
            let x = randn(shape, 100 + i as u64, DType::F64);
            let (b, c, h, w) = shape;
            let oh = pooled_side(h, k, s, p);
            let ow = pooled_side(w, k, s, p);
            let r = randn((b, c, oh, ow), 200 + i as u64, DType::F64);
            let var = Var::from_tensor(&x).unwrap();
            let loss = |t: &Tensor| -> Tensor {
                (max_pool2d(t, k, s, p).unwrap() * &r)
                    .unwrap()
                    .sum_all()
                    .unwrap()
            };
            let grads = loss(var.as_tensor()).backward().unwrap();
            let g: Vec<f64> = grads
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let xs: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
            let mut nonzero = 0;
            for j in 0..xs.len() {
                let at = |d: f64| {
                    let mut v = xs.clone();
                    v[j] += d;
                    let t = Tensor::from_vec(v, shape, &Device::Cpu).unwrap();
                    loss(&t).to_scalar::<f64>().unwrap()
                };
                let fd = (at(eps) - at(-eps)) / (2.0 * eps);
                assert!(
                    (fd - g[j]).abs() < 1e-6,
                    "case {i} element {j}: backward {} vs finite difference {fd}",
                    g[j]
                );
                nonzero += (g[j] != 0.0) as usize;
            }
            // Overlapping windows: some inputs win several windows, many win none.
            assert!(nonzero > 0 && nonzero < xs.len(), "case {i}: {nonzero}");
        }
    }

    #[test]
    fn ties_send_the_gradient_to_the_first_position_and_padding_never_wins() {
        // All-equal negative input: every window ties, zero padding would win if it were
        // used; the first real position in row-major window order takes the gradient.
        let x = Var::from_tensor(
            &(Tensor::ones((1, 1, 3, 3), DType::F32, &Device::Cpu).unwrap() * -2.0).unwrap(),
        )
        .unwrap();
        let y = max_pool2d(x.as_tensor(), 3, 2, 1).unwrap();
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![-2.0; 4]
        );
        let g = y.sum_all().unwrap().backward().unwrap();
        let g: Vec<f32> = g
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // Windows (rows, cols) start at (0,0), (0,1), (1,0), (1,1) of the unpadded input.
        assert_eq!(g, vec![1., 1., 0., 1., 1., 0., 0., 0., 0.]);
    }

    #[test]
    fn bad_arguments_are_errors() {
        let x = Tensor::zeros((1, 1, 4, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(max_pool2d(&x, 3, 2, 2)
            .unwrap_err()
            .to_string()
            .contains("padding"));
        assert!(max_pool2d(&x, 0, 2, 0).is_err());
        assert!(max_pool2d(&x, 5, 1, 0)
            .unwrap_err()
            .to_string()
            .contains("smaller"));
        let x = Tensor::zeros((1, 1, 4, 4), DType::U8, &Device::Cpu).unwrap();
        assert!(max_pool2d(&x, 3, 2, 1)
            .unwrap_err()
            .to_string()
            .contains("f32"));
        let x = Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(max_pool2d(&x, 3, 2, 1).is_err());
        let x = Tensor::zeros((1, 1, 0, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(max_pool2d(&x, 2, 2, 1)
            .unwrap_err()
            .to_string()
            .contains("empty"));
        // An empty batch pools to an empty batch.
        let x = Tensor::zeros((0, 3, 5, 5), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(max_pool2d(&x, 3, 2, 1).unwrap().dims(), &[0, 3, 3, 3]);
    }
}
