//! Inference kernels for the transformer: in-place epilogues on a fresh matrix-product
//! output, so that the bias, the query scaling, the GELU, the attention bias / mask and
//! the softmax cost one pass over the output and no new tensor (candle's composed ops
//! allocate a tensor per op and its exact GELU calls an f64 `erf` per element).
//! No backward pass: used only when nothing tracks gradients (see [`fuses_inference`]).

use candle_core::{CpuStorage, InplaceOp2, Layout, Result, Tensor};

static REFERENCE_KERNELS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Process-wide switch back to candle's composed ops everywhere (the trunk's convolutions
/// included): what `mue bench --reference-kernels` times the fast kernels against.
pub fn set_reference_kernels(on: bool) {
    REFERENCE_KERNELS.store(on, std::sync::atomic::Ordering::Relaxed);
}

pub fn reference_kernels() -> bool {
    REFERENCE_KERNELS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether `y` may be overwritten by an inference kernel: f32 on the CPU, contiguous,
/// and not part of a gradient graph.
pub fn fuses_inference(y: &Tensor) -> bool {
    !reference_kernels()
        && y.device().is_cpu()
        && y.dtype() == candle_core::DType::F32
        && y.is_contiguous()
        && !y.track_op()
}

/// Splits `data` (rows of `row_len`) over the rayon pool that candle and gemm use (its
/// threads persist: no spawn per call) when `work` is large enough to pay for the
/// hand-off, and runs `f(first_row, rows)` on each part.
fn par_rows<F: Fn(usize, &mut [f32]) + Sync>(data: &mut [f32], row_len: usize, work: usize, f: F) {
    use rayon::prelude::*;
    let rows = data.len() / row_len.max(1);
    let threads = candle_core::utils::get_num_threads().min(rows).max(1);
    if threads == 1 || work < 1 << 18 {
        f(0, data);
        return;
    }
    let per = rows.div_ceil(threads);
    data.par_chunks_mut(per * row_len)
        .enumerate()
        .for_each(|(i, part)| f(i * per, part));
}

fn f32_slice<'a>(s: &'a CpuStorage, what: &str) -> Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => Ok(v.as_slice()),
        _ => candle_core::bail!("{what}: only f32 is supported"),
    }
}

fn f32_slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout, what: &str) -> Result<&'a mut [f32]> {
    let (a, b) = match l.contiguous_offsets() {
        Some(o) => o,
        None => candle_core::bail!("{what}: the output must be contiguous"),
    };
    match s {
        CpuStorage::F32(v) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("{what}: only f32 is supported"),
    }
}

/// `y = act((y + bias) * scale)` on rows of `y`; `act` is the exact GELU or the identity.
struct BiasAct {
    scale: f32,
    gelu: bool,
}

impl InplaceOp2 for BiasAct {
    fn name(&self) -> &'static str {
        "mue-bias-act"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let bias = match l2.contiguous_offsets() {
            Some((a, b)) => &f32_slice(s2, self.name())?[a..b],
            None => candle_core::bail!("bias must be contiguous"),
        };
        let n = bias.len();
        if l1.dims().last() != Some(&n) || n == 0 {
            candle_core::bail!("bias of {n} does not match the output {:?}", l1.dims());
        }
        let y = f32_slice_mut(s1, l1, self.name())?;
        let (scale, gelu) = (self.scale, self.gelu);
        let work = y.len() * if gelu { 16 } else { 1 };
        par_rows(y, n, work, |_, part| {
            for row in part.chunks_exact_mut(n) {
                for (v, b) in row.iter_mut().zip(bias) {
                    *v = (*v + b) * scale;
                }
                if gelu {
                    super::fused::gelu_in_place(row);
                }
            }
        });
        Ok(())
    }
}

/// `y [..., n] = act((y + bias) * scale)` in place on a fresh product `y`, returned.
pub fn bias_act(y: Tensor, bias: &Tensor, scale: f32, gelu: bool) -> Result<Tensor> {
    y.inplace_op2(&bias.contiguous()?, &BiasAct { scale, gelu })?;
    Ok(y)
}

/// `s = softmax(s + bias)` over the last dimension; `bias` broadcasts to `s`'s shape
/// (any strides: padding masks `[b, 1, 1, n]`, position biases `[1, h, q, n]`).
struct BiasSoftmax;

impl InplaceOp2 for BiasSoftmax {
    fn name(&self) -> &'static str {
        "mue-bias-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let dims = l1.dims().to_vec();
        if l2.dims() != dims.as_slice() || dims.is_empty() {
            candle_core::bail!("bias {:?} not broadcast to scores {dims:?}", l2.dims());
        }
        let n = *dims.last().unwrap();
        if n == 0 {
            return Ok(());
        }
        let bias = f32_slice(s2, self.name())?;
        let (start, strides) = (l2.start_offset(), l2.stride().to_vec());
        let y = f32_slice_mut(s1, l1, self.name())?;
        let rank = dims.len();
        // Offset of row `r`'s first bias element (rows in row-major order of dims[..rank-1]).
        let row_offset = |mut r: usize| {
            let mut off = start;
            for d in (0..rank - 1).rev() {
                off += (r % dims[d]) * strides[d];
                r /= dims[d];
            }
            off
        };
        let sn = strides[rank - 1];
        par_rows(y, n, y.len() * 4, |first, part| {
            for (i, row) in part.chunks_exact_mut(n).enumerate() {
                let off = row_offset(first + i);
                let mut max = f32::NEG_INFINITY;
                for (j, v) in row.iter_mut().enumerate() {
                    *v += bias[off + j * sn];
                    max = max.max(*v);
                }
                let inv = exp_shifted(row, max);
                for v in row.iter_mut() {
                    *v *= inv;
                }
            }
        });
        Ok(())
    }
}

/// `row = exp(row - max)` in place; returns `1 / sum(row)`, summed in order. The softmax
/// of both attention paths (their probabilities are `row * inv`).
pub(super) fn exp_shifted(row: &mut [f32], max: f32) -> f32 {
    for v in row.iter_mut() {
        *v -= max;
    }
    super::expf::exp_in_place(row);
    let mut sum = 0f32;
    for v in row.iter() {
        sum += *v;
    }
    1.0 / sum
}

/// `softmax(scores + bias)` over the last dimension, in place on fresh `scores`.
pub fn bias_softmax(scores: Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let bias = match bias {
        Some(b) => b.broadcast_as(scores.shape())?,
        None => Tensor::zeros(1, scores.dtype(), scores.device())?.broadcast_as(scores.shape())?,
    };
    scores.inplace_op2(&bias, &BiasSoftmax)?;
    Ok(scores)
}

/// Rows of `log_softmax(logits)` over the last dimension of f32 `[rows, n]`, as candle's
/// composed `log_softmax` computes them, bit for bit (max, `x - max`, `exp`, candle's own
/// row sum, `ln`, subtraction), in one buffer per row instead of five tensors and a copy:
/// what greedy and beam search read after every decoding step.
pub fn log_softmax_rows(logits: &Tensor) -> Result<Vec<Vec<f32>>> {
    let (rows, n) = logits.dims2()?;
    let x = logits.to_dtype(candle_core::DType::F32)?;
    if reference_kernels() || !x.device().is_cpu() || n == 0 {
        return candle_nn::ops::log_softmax(&x, candle_core::D::Minus1)?.to_vec2();
    }
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("log-softmax rows: CPU tensor expected");
    };
    let (a, _) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("log-softmax rows: not contiguous".into()))?;
    let data = &f32_slice(cpu, "log-softmax rows")?[a..a + rows * n];
    let row = |src: &[f32]| -> Vec<f32> {
        let max = src.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut out: Vec<f32> = src.iter().map(|&v| v - max).collect();
        super::expf::exp_in_place(&mut out);
        let mut sum = 0f32;
        // SAFETY: `out` holds `n` values.
        unsafe {
            <f32 as candle_core::cpu::kernels::VecOps>::vec_reduce_sum(out.as_ptr(), &mut sum, n)
        };
        let log_sum = sum.ln();
        for (o, &v) in out.iter_mut().zip(src) {
            *o = (v - max) - log_sum;
        }
        out
    };
    if candle_core::utils::get_num_threads() > 1 && rows > 1 {
        use rayon::prelude::*;
        Ok(data.par_chunks(n).map(row).collect())
    } else {
        Ok(data.chunks(n).map(row).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::max_abs_diff;
    use candle_core::{Device, D};

    #[test]
    fn bias_act_matches_composed_ops() {
        let dev = Device::Cpu;
        // Odd sizes; large enough (> 2^16 work) to take the threaded path too.
        for (rows, n) in [(1, 7), (5, 33), (301, 257)] {
            let y = Tensor::randn(0f32, 3.0, (rows, n), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
            let composed = y.broadcast_add(&b).unwrap();
            let got = bias_act(y.copy().unwrap(), &b, 1.0, false).unwrap();
            assert_eq!(max_abs_diff(&got, &composed).unwrap(), 0.0);
            let scaled = (&composed * 0.125).unwrap();
            let got = bias_act(y.copy().unwrap(), &b, 0.125, false).unwrap();
            assert_eq!(max_abs_diff(&got, &scaled).unwrap(), 0.0);
            let gelu = composed.gelu_erf().unwrap();
            let got = bias_act(y.copy().unwrap(), &b, 1.0, true).unwrap();
            let err = max_abs_diff(&got, &gelu).unwrap();
            assert!(err < 1e-5, "{rows}x{n}: gelu {err}");
        }
        // A bias of the wrong width is an error.
        let y = Tensor::zeros((2, 3), candle_core::DType::F32, &dev).unwrap();
        let b = Tensor::zeros(4, candle_core::DType::F32, &dev).unwrap();
        assert!(bias_act(y, &b, 1.0, false).is_err());
    }

    #[test]
    fn log_softmax_rows_match_composed_ops_bit_for_bit() {
        let dev = Device::Cpu;
        for (rows, n) in [(1, 1), (1, 7), (3, 33), (8, 1001), (5, 59457)] {
            let x = Tensor::randn(0f32, 4.0, (rows, n), &dev).unwrap();
            let want = candle_nn::ops::log_softmax(&x, D::Minus1)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let got = log_softmax_rows(&x).unwrap();
            assert_eq!(got.len(), rows);
            for (g, w) in got.iter().zip(&want) {
                let same = g.iter().zip(w).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same && g.len() == n, "{rows}x{n}");
            }
        }
        // Banned (-inf) logits stay -inf; a non-matrix is an error.
        let x = Tensor::new(&[[0f32, f32::NEG_INFINITY, 1.0]], &dev).unwrap();
        let got = log_softmax_rows(&x).unwrap();
        assert_eq!(got[0][1], f32::NEG_INFINITY);
        assert!(
            log_softmax_rows(&Tensor::zeros(3, candle_core::DType::F32, &dev).unwrap()).is_err()
        );
    }

    #[test]
    fn bias_softmax_matches_composed_ops() {
        let dev = Device::Cpu;
        // (scores [b, h, q, k], bias shape broadcast to it)
        let cases: [(&[usize], &[usize]); 5] = [
            (&[1, 2, 1, 5], &[1, 2, 1, 5]),
            (&[3, 4, 7, 9], &[1, 4, 7, 9]),
            (&[3, 4, 7, 9], &[3, 1, 1, 9]),
            (&[2, 3, 1, 17], &[1, 3, 1, 17]),
            (&[4, 4, 64, 80], &[4, 1, 1, 80]),
        ];
        for (s, b) in cases {
            let scores = Tensor::randn(0f32, 2.0, s, &dev).unwrap();
            let mut bias = Tensor::randn(0f32, 1.0, b, &dev).unwrap();
            if b[1] == 1 {
                // A padding mask: the last two keys of batch row 0 masked.
                let mut v = vec![0f32; bias.elem_count()];
                let k = b[3];
                v[k - 2] = f32::MIN;
                v[k - 1] = f32::MIN;
                bias = Tensor::from_vec(v, b, &dev).unwrap();
            }
            let composed =
                candle_nn::ops::softmax(&scores.broadcast_add(&bias).unwrap(), D::Minus1).unwrap();
            let got = bias_softmax(scores.copy().unwrap(), Some(&bias)).unwrap();
            let err = max_abs_diff(&got, &composed).unwrap();
            assert!(err < 1e-6, "{s:?} + {b:?}: {err}");
            // Non-contiguous bias (a transposed view) too.
            let bt = bias
                .transpose(2, 3)
                .unwrap()
                .contiguous()
                .unwrap()
                .transpose(2, 3)
                .unwrap();
            let got = bias_softmax(scores.copy().unwrap(), Some(&bt)).unwrap();
            assert!(max_abs_diff(&got, &composed).unwrap() < 1e-6);
        }
        let scores = Tensor::randn(0f32, 2.0, (2, 3, 4), &dev).unwrap();
        let plain = candle_nn::ops::softmax(&scores, D::Minus1).unwrap();
        let got = bias_softmax(scores.copy().unwrap(), None).unwrap();
        assert!(max_abs_diff(&got, &plain).unwrap() < 1e-6);
    }
}
