//! Training kernels with their own backward pass, for the CPU.
//!
//! candle builds a differentiable layer norm out of ~9 broadcast ops (and ~20 in the
//! backward pass), and its exact GELU calls an f64 `erf` per element (a profile of a
//! step: broadcast ops ~25%, `erf` ~10%). These ops do each in one pass over the rows,
//! forward and backward; other devices and dtypes keep the composed ops
//! (`layers::LayerNorm`, `layers::gelu`).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(v) => v.as_slice(),
        _ => candle_core::bail!("{what}: only f32 is supported"),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what}: input must be contiguous"),
    }
}

/// Mean and reciprocal standard deviation of one row.
fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// Rows whose statistics [`rows_stats`] interleaves.
const STAT_ROWS: usize = 8;

/// [`row_stats`] of every `d`-wide row of `x`, bit for bit: each row's sums still run from
/// its first element to its last (from -0.0, as `Iterator::sum` starts), but the sums of
/// `STAT_ROWS` rows advance together, so the latency of one row's chain of adds hides
/// behind the others' (a lone row's sum is one serial chain).
fn rows_stats(x: &[f32], d: usize, eps: f32) -> Vec<(f32, f32)> {
    let n = d as f32;
    let mut out = Vec::with_capacity(x.len() / d);
    let mut blocks = x.chunks_exact(STAT_ROWS * d);
    for block in blocks.by_ref() {
        let mut sum = [-0.0f32; STAT_ROWS];
        for i in 0..d {
            for (r, s) in sum.iter_mut().enumerate() {
                *s += block[r * d + i];
            }
        }
        let mean = sum.map(|s| s / n);
        let mut sq = [-0.0f32; STAT_ROWS];
        for i in 0..d {
            for (r, s) in sq.iter_mut().enumerate() {
                let v = block[r * d + i];
                *s += (v - mean[r]) * (v - mean[r]);
            }
        }
        out.extend((0..STAT_ROWS).map(|r| (mean[r], 1.0 / (sq[r] / n + eps).sqrt())));
    }
    out.extend(
        blocks
            .remainder()
            .chunks_exact(d)
            .map(|r| row_stats(r, eps)),
    );
    out
}

/// The layer-norm kernels as one candle op: the forward pass (inputs x, weight, bias) or,
/// with `backward`, its gradients (inputs x, weight, output gradient).
struct LayerNormOp {
    eps: f32,
    backward: bool,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        if self.backward {
            "mue-layer-norm-bwd"
        } else {
            "mue-layer-norm"
        }
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(sx, lx, self.name())?;
        let w = contiguous_f32(sw, lw, self.name())?;
        let third = contiguous_f32(s3, l3, self.name())?;
        if self.backward {
            layer_norm_bwd(x, w, third, self.eps)
        } else {
            layer_norm_fwd(x, lx, w, third, self.eps)
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if self.backward {
            candle_core::bail!("{}: no second-order gradient", self.name());
        }
        let d = w.dim(0)?;
        let rows = x.elem_count() / d;
        // One pass gives [dx rows..., dw, db].
        let back = LayerNormOp {
            eps: self.eps,
            backward: true,
        };
        let all = x.apply_op3_no_bwd(w, &grad.contiguous()?, &back)?;
        let dx = all.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dw = all.get(rows)?;
        let db = all.get(rows + 1)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// Layer norm of the rows of `x` (last dimension `w.len()`).
fn layer_norm_fwd(
    x: &[f32],
    lx: &Layout,
    w: &[f32],
    b: &[f32],
    eps: f32,
) -> Result<(CpuStorage, Shape)> {
    let d = w.len();
    if d == 0 || b.len() != d || lx.dims().last() != Some(&d) {
        candle_core::bail!("layer norm: weight/bias do not match the last dimension");
    }
    let mut y = Vec::with_capacity(x.len());
    for (xr, (mean, rstd)) in x.chunks_exact(d).zip(rows_stats(x, d, eps)) {
        y.extend(
            xr.iter()
                .zip(w)
                .zip(b)
                .map(|((&x, &w), &b)| (x - mean) * rstd * w + b),
        );
    }
    Ok((CpuStorage::F32(y), lx.shape().clone()))
}

/// `[dx rows..., dw, db]` of layer norm for the output gradient `g`.
fn layer_norm_bwd(x: &[f32], w: &[f32], g: &[f32], eps: f32) -> Result<(CpuStorage, Shape)> {
    let d = w.len();
    let rows = x.len() / d;
    let mut out = vec![0f32; (rows + 2) * d];
    let (dx, rest) = out.split_at_mut(rows * d);
    let (dw, db) = rest.split_at_mut(d);
    let mut xhat = vec![0f32; d];
    let mut gw = vec![0f32; d];
    for (((xr, gr), dxr), (mean, rstd)) in x
        .chunks_exact(d)
        .zip(g.chunks_exact(d))
        .zip(dx.chunks_exact_mut(d))
        .zip(rows_stats(x, d, eps))
    {
        let (mut sum_gw, mut sum_gw_xhat) = (0f32, 0f32);
        for i in 0..d {
            xhat[i] = (xr[i] - mean) * rstd;
            gw[i] = gr[i] * w[i];
            sum_gw += gw[i];
            sum_gw_xhat += gw[i] * xhat[i];
            dw[i] += gr[i] * xhat[i];
            db[i] += gr[i];
        }
        let (m1, m2) = (sum_gw / d as f32, sum_gw_xhat / d as f32);
        for i in 0..d {
            dxr[i] = rstd * (gw[i] - m1 - xhat[i] * m2);
        }
    }
    Ok((CpuStorage::F32(out), Shape::from((rows + 2, d))))
}

/// Differentiable layer norm over the last dimension with a fused CPU kernel for the
/// forward and the backward pass (f32).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f32) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        LayerNormOp {
            eps,
            backward: false,
        },
    )
}

// Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), in f32 so the loop vectorises around `exp`.
fn erf(x: f32) -> f32 {
    let a = x.abs();
    erf_with_exp(x, (-a * a).exp())
}

/// [`erf`] given `e = exp(-x^2)`.
#[inline(always)]
fn erf_with_exp(x: f32, e: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_7,
        -1.453_152,
        1.061_405_4,
    ];
    let s = x.signum();
    let a = x.abs();
    let t = 1.0 / (1.0 + P * a);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    s * (1.0 - poly * e)
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
// 1 / sqrt(2 pi)
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// Exact GELU of one value (the erf to ~1e-7): the training kernel's forward, also the
/// inference epilogue of `fc1` (`super::infer`).
pub(crate) fn gelu_scalar(v: f32) -> f32 {
    0.5 * v * (1.0 + erf(v * FRAC_1_SQRT_2))
}

/// [`gelu_scalar`] on every value of `v`, the same bits, with the `exp`s of 64 values at a
/// time ([`super::expf`]).
pub(crate) fn gelu_in_place(v: &mut [f32]) {
    let mut e = [0f32; 64];
    for chunk in v.chunks_mut(64) {
        let n = chunk.len();
        for (ei, &x) in e.iter_mut().zip(chunk.iter()) {
            let a = (x * FRAC_1_SQRT_2).abs();
            *ei = -a * a;
        }
        super::expf::exp_in_place(&mut e[..n]);
        for (x, &ex) in chunk.iter_mut().zip(&e[..n]) {
            *x = 0.5 * *x * (1.0 + erf_with_exp(*x * FRAC_1_SQRT_2, ex));
        }
    }
}

struct GeluOp;

impl CustomOp1 for GeluOp {
    fn name(&self) -> &'static str {
        "mue-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        let y = x.iter().map(|&v| gelu_scalar(v)).collect();
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &GeluBwd)?))
    }
}

struct GeluBwd;

impl CustomOp2 for GeluBwd {
    fn name(&self) -> &'static str {
        "mue-gelu-erf-bwd"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(sx, lx, self.name())?;
        let g = contiguous_f32(sg, lg, self.name())?;
        if x.len() != g.len() {
            candle_core::bail!("gelu backward: gradient shape differs from the input's");
        }
        let dx = x
            .iter()
            .zip(g)
            .map(|(&v, &gr)| {
                let cdf = 0.5 * (1.0 + erf(v * FRAC_1_SQRT_2));
                let pdf = INV_SQRT_2PI * (-0.5 * v * v).exp();
                gr * (cdf + v * pdf)
            })
            .collect();
        Ok((CpuStorage::F32(dx), lx.shape().clone()))
    }
}

/// Differentiable exact (erf) GELU with a fused CPU kernel for both passes (f32).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(GeluOp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::layers::{LayerNorm, Mode};
    use crate::model::max_abs_diff;
    use candle_core::{DType, Device, Var};
    use candle_nn::{VarBuilder, VarMap};

    #[test]
    fn interleaved_row_statistics_are_row_stats_bit_for_bit() {
        for d in [1, 3, 16, 128] {
            for rows in [0, 1, 7, 8, 9, 17, 24] {
                let mut x: Vec<f32> = (0..rows * d)
                    .map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 0.0173 + (i % 5) as f32 * 1e3)
                    .collect();
                // An all -0.0 row and an all-equal row (variance 0).
                if rows > 2 {
                    x[..d].fill(-0.0);
                    x[d..2 * d].fill(2.5);
                }
                let got = rows_stats(&x, d, 1e-5);
                let want: Vec<(f32, f32)> = x.chunks_exact(d).map(|r| row_stats(r, 1e-5)).collect();
                assert_eq!(got.len(), rows);
                for (g, w) in got.iter().zip(&want) {
                    assert_eq!(
                        (g.0.to_bits(), g.1.to_bits()),
                        (w.0.to_bits(), w.1.to_bits()),
                        "d {d}, {rows} rows"
                    );
                }
            }
        }
    }

    #[test]
    fn gelu_in_place_is_gelu_scalar_bit_for_bit() {
        // Odd lengths (a partial last chunk of 64), large and tiny values, both signs.
        let mut xs: Vec<f32> = (0..1001).map(|i| (i as f32 - 500.0) * 0.037).collect();
        xs.extend([
            0.0,
            -0.0,
            9.5,
            -9.5,
            40.0,
            -40.0,
            1e-30,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ]);
        let want: Vec<f32> = xs.iter().map(|&v| gelu_scalar(v)).collect();
        let mut got = xs.clone();
        gelu_in_place(&mut got);
        for ((x, g), w) in xs.iter().zip(&got).zip(&want) {
            let same = g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan());
            assert!(same, "gelu({x}) = {g}, scalar {w}");
        }
    }

    #[test]
    fn fused_layer_norm_matches_the_composed_ops_forward_and_backward() {
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let ln =
            LayerNorm::load(16, 1e-5, VarBuilder::from_varmap(&varmap, DType::F32, &dev)).unwrap();
        for (name, mean) in [("weight", 1f32), ("bias", 0.0)] {
            varmap.data().lock().unwrap()[name]
                .set(&Tensor::randn(mean, 0.3, 16, &dev).unwrap())
                .unwrap();
        }
        let x = Var::from_tensor(&Tensor::randn(0.5f32, 2.0, (3, 5, 16), &dev).unwrap()).unwrap();
        // A non-uniform upstream gradient, so every term of the backward pass matters.
        let up = Tensor::randn(0f32, 1.0, (3, 5, 16), &dev).unwrap();
        let fused = Mode::train(0.0);
        let composed = Mode {
            fused: false,
            ..fused
        };
        let fast = ln.forward(&x, fused).unwrap();
        let slow = ln.forward(&x, composed).unwrap();
        assert!(max_abs_diff(&fast, &slow).unwrap() < 1e-5);
        let gf = (fast * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let gs = (slow * &up).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [x.as_tensor(), &ln.weight, &ln.bias] {
            let diff = max_abs_diff(gf.get(v).unwrap(), gs.get(v).unwrap()).unwrap();
            assert!(diff < 1e-4, "gradient differs by {diff}");
        }
    }

    #[test]
    fn fused_gelu_matches_candle_forward_and_backward() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(
            &Tensor::arange(-600f32, 600., &dev)
                .unwrap()
                .affine(0.01, 0.0)
                .unwrap()
                .reshape((40, 30))
                .unwrap(),
        )
        .unwrap();
        let fast = gelu_erf(&x).unwrap();
        let exact = x.as_tensor().gelu_erf().unwrap();
        assert!(max_abs_diff(&fast, &exact).unwrap() < 1e-6);
        let up = Tensor::randn(0f32, 1.0, (40, 30), &dev).unwrap();
        let gf = (&fast * &up)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let ge = (exact * &up)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let diff = max_abs_diff(gf.get(&x).unwrap(), ge.get(&x).unwrap()).unwrap();
        assert!(diff < 1e-5, "gradient differs by {diff}");
        assert_eq!(fast.dtype(), DType::F32);
    }
}
