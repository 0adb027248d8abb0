//! Transformer building blocks shared by encoder and decoder (OFA / NormFormer flavour).

use super::attn_block::Bias;
use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;
use std::sync::Arc;

thread_local! {
    static DROPOUT_RNG: std::cell::RefCell<rand_chacha::ChaCha8Rng> =
        std::cell::RefCell::new(rand::SeedableRng::seed_from_u64(0));
}

/// Restart this thread's dropout stream at `seed` (the trainer does so before every step,
/// from the run's seed and the step, so resumed runs draw the same masks).
pub fn seed_dropout(seed: u64) {
    DROPOUT_RNG.with(|rng| *rng.borrow_mut() = rand::SeedableRng::seed_from_u64(seed));
}

/// Switches between the fast inference kernels and the differentiable ones.
/// (candle's fused softmax / layer norm have no backward pass.)
#[derive(Debug, Clone, Copy, Default)]
pub struct Mode {
    pub train: bool,
    /// Dropout probability applied in training only.
    pub dropout: f32,
    /// Training on the CPU: layer norm and GELU through the fused kernels of
    /// [`super::fused`] (false: candle's composed ops, kept to compare against).
    pub fused: bool,
}

impl Mode {
    pub const INFER: Mode = Mode {
        train: false,
        dropout: 0.0,
        fused: false,
    };

    /// Training with this dropout and the fused kernels.
    pub const fn train(dropout: f32) -> Mode {
        Mode {
            train: true,
            dropout,
            fused: true,
        }
    }

    /// Whether `x` goes through the fused kernels: training with them on, f32 on the CPU.
    fn fuses(&self, x: &Tensor) -> bool {
        self.train && self.fused && x.device().is_cpu() && x.dtype() == DType::F32
    }

    /// Inverted dropout with masks drawn from this thread's seeded stream (see
    /// [`seed_dropout`]), so a training run is reproducible; candle's own dropout draws
    /// from an unseeded generator.
    pub fn dropout(&self, x: &Tensor) -> Result<Tensor> {
        if !(self.train && self.dropout > 0.0) {
            return Ok(x.clone());
        }
        let p = self.dropout;
        if !(0.0..1.0).contains(&p) {
            candle_core::bail!("dropout must be in [0, 1), got {p}");
        }
        let scale = 1.0 / (1.0 - p);
        let mask: Vec<f32> = DROPOUT_RNG.with(|rng| {
            use rand::Rng;
            let mut rng = rng.borrow_mut();
            (0..x.elem_count())
                .map(|_| if rng.random::<f32>() < p { 0.0 } else { scale })
                .collect()
        });
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x.mul(&mask)
    }

    pub fn softmax(&self, x: &Tensor) -> Result<Tensor> {
        if self.train {
            candle_nn::ops::softmax(x, D::Minus1)
        } else {
            candle_nn::ops::softmax_last_dim(x)
        }
    }
}

#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    pub fn load(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.0))?;
        let bias = vb.get_with_hints(dim, "bias", candle_nn::Init::Const(0.0))?;
        Ok(Self {
            weight,
            bias,
            eps: eps as f32,
        })
    }

    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        if mode.fuses(x) {
            // Differentiable, one pass each way (candle's fast path has no backward).
            super::fused::layer_norm(x, &self.weight, &self.bias, self.eps)
        } else if mode.train {
            // Differentiable; reductions run over the last dimension only (fast in candle).
            let mean = x.mean_keepdim(D::Minus1)?;
            let xc = x.broadcast_sub(&mean)?;
            let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
            let xhat = xc.broadcast_div(&(var + self.eps as f64)?.sqrt()?)?;
            xhat.mul(&rows_of(&self.weight, &xhat)?)?
                .add(&rows_of(&self.bias, &xhat)?)
        } else {
            candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, self.eps)
        }
    }
}

/// A dense layer that multiplies all leading dimensions as one matrix: one large product
/// instead of a batch of small ones, and in training a weight gradient without a
/// per-batch copy to reduce (candle's `Linear` broadcasts the weight over the batch).
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// The weight in int8 (`--precision int8`, set at load): inference products use it.
    pub int8: Option<Arc<Int8Weight>>,
    /// The weight packed for products of a few rows (decoding steps; set at inference
    /// loads, f32, decoder layers): see [`super::vocab::few_rows`].
    pub panels: Option<std::sync::Arc<super::vocab::VocabPanels>>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            int8: None,
            panels: None,
        }
    }

    /// The int8 weight, when the layer has one and `x` takes int8 ([`takes_int8`]).
    fn int8_for(&self, x: &Tensor) -> Option<&Int8Weight> {
        self.int8.as_deref().filter(|_| takes_int8(x))
    }

    /// `x W^T` (no bias): in int8 when [`Linear::int8_for`] says so.
    fn product(&self, x: &Tensor) -> Result<Tensor> {
        match self.int8_for(x) {
            Some(q) => super::quant::int8_linear(x, &q.weight, None),
            None => match &self.panels {
                Some(p) => match super::vocab::few_rows(p, x)? {
                    Some(y) => Ok(y),
                    None => matmul_flat(x, &self.weight.t()?),
                },
                None => matmul_flat(x, &self.weight.t()?),
            },
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(q) = self.int8_for(x) {
            // The bias in the int8 kernel's stores: no pass of its own.
            let bias = self.bias.as_ref().map(|_| &q.bias[..]);
            return super::quant::int8_linear(x, &q.weight, bias);
        }
        let y = self.product(x)?;
        match &self.bias {
            // Inference: the bias goes into the fresh product in place.
            Some(b) if super::infer::fuses_inference(&y) => {
                super::infer::bias_act(y, b, 1.0, false)
            }
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

impl Linear {
    /// Training form: the bias enters through a product with a column of ones, so its
    /// gradient is a matrix product too (candle's backward of a broadcast sums over leading
    /// dimensions with a slow strided reduction).
    pub fn forward_t(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        if !mode.train {
            return self.forward(x);
        }
        let y = matmul_flat(x, &self.weight.t()?)?;
        match &self.bias {
            Some(b) => y.add(&rows_of(b, &y)?),
            None => Ok(y),
        }
    }
}

impl Linear {
    /// `act((x W^T + b) * scale)`, `act` the exact GELU when `gelu`, else the identity. At
    /// inference on the CPU the bias, scale and GELU are one pass over the fresh product
    /// (`super::infer`); otherwise the composed (differentiable) ops.
    pub fn forward_act(&self, x: &Tensor, mode: Mode, scale: f64, gelu: bool) -> Result<Tensor> {
        if !mode.train {
            let y = self.product(x)?;
            if super::infer::fuses_inference(&y) {
                let n = y.dim(D::Minus1)?;
                let b = match &self.bias {
                    Some(b) => b.clone(),
                    None => Tensor::zeros(n, y.dtype(), y.device())?,
                };
                return super::infer::bias_act(y, &b, scale as f32, gelu);
            }
        }
        let y = self.forward_t(x, mode)?;
        let y = if scale != 1.0 { (y * scale)? } else { y };
        if gelu {
            self::gelu(&y, mode)
        } else {
            Ok(y)
        }
    }
}

/// `v [n]` repeated over the leading dimensions of `like [..., n]`, built as a matrix
/// product so that its backward pass is one.
fn rows_of(v: &Tensor, like: &Tensor) -> Result<Tensor> {
    let n = v.dim(0)?;
    let rows = like.elem_count() / n.max(1);
    let ones = Tensor::ones((rows, 1), v.dtype(), v.device())?;
    ones.matmul(&v.reshape((1, n))?)?.reshape(like.shape())
}

/// `x [..., k] @ w [k, n]` with the leading dimensions of `x` flattened.
pub fn matmul_flat(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let k = dims[dims.len() - 1];
    let rows = x.elem_count() / k.max(1);
    let y = x.reshape((rows, k))?.matmul(w)?;
    let mut out = dims[..dims.len() - 1].to_vec();
    out.push(w.dim(1)?);
    y.reshape(out)
}

pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let init = candle_nn::Init::Randn {
        mean: 0.0,
        stdev: 0.02,
    };
    let w = vb.get_with_hints((out_dim, in_dim), "weight", init)?;
    let b = vb.get_with_hints(out_dim, "bias", candle_nn::Init::Const(0.0))?;
    Ok(Linear::new(w, Some(b)))
}

/// Split `[b, n, h*dh]` into heads `[b, h, n, dh]` (contiguous, ready for matmul).
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, d) = x.dims3()?;
    x.reshape((b, n, heads, d / heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// `[b, n, h*dh]` viewed as heads `[b, h, n, dh]` without a copy (strided): what
/// [`super::attn_block`] reads in place.
pub fn head_view(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, d) = x.dims3()?;
    x.reshape((b, n, heads, d / heads))?.transpose(1, 2)
}

/// Multi-head attention with additive biases and NormFormer per-head scaling (`c_attn`).
#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    pub c_attn: Tensor,
    pub heads: usize,
    pub head_dim: usize,
    scaling: f64,
    /// `--precision int8`: the query (scaled), key and value projections as one int8
    /// weight, so that self-attention quantizes its input once and runs one product.
    pub qkv_int8: Option<Arc<Int8Weight>>,
    /// `--precision int8`: the key and value projections as one int8 weight (the decoder's
    /// cross-attention over the encoder's memory).
    pub kv_int8: Option<Arc<Int8Weight>>,
}

/// Whether an input takes the int8 weights loaded for `--precision int8`: nothing tracks
/// its gradient and the reference kernels are off.
fn takes_int8(x: &Tensor) -> bool {
    !x.track_op() && !super::infer::reference_kernels()
}

/// A dense layer's weight in int8 (`--precision int8`) with its bias in f32, for the
/// kernel's stores; or several layers over the same input stacked as one.
#[derive(Debug)]
pub struct Int8Weight {
    pub weight: super::quant::QMatrix,
    pub bias: Vec<f32>,
}

impl Int8Weight {
    /// Stacks `parts` (layer, factor): each layer's rows and bias times its factor (a
    /// missing bias as zeros).
    pub fn stack(parts: &[(&Linear, f64)]) -> Result<Self> {
        let (mut w, mut bias, mut n) = (Vec::new(), Vec::new(), 0);
        let k = parts.first().map_or(Ok(0), |(l, _)| l.weight.dim(1))?;
        for &(l, f) in parts {
            let (rows, cols) = l.weight.dims2()?;
            if cols != k {
                candle_core::bail!("fused int8 weight: parts of {k} and {cols} inputs");
            }
            let f = f as f32;
            let flat = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
            w.extend(flat(&l.weight)?.into_iter().map(|v| v * f));
            match &l.bias {
                Some(b) => bias.extend(flat(b)?.into_iter().map(|v| v * f)),
                None => bias.extend(std::iter::repeat_n(0.0, rows)),
            }
            n += rows;
        }
        Ok(Int8Weight {
            weight: super::quant::QMatrix::from_rows(&w, n, k),
            bias,
        })
    }
}

impl Attention {
    /// The stacked int8 weight `f` for `x`, when there is one, `x` takes int8 and `mode`
    /// is inference.
    fn fused_for<'s>(
        f: &'s Option<Arc<Int8Weight>>,
        x: &Tensor,
        mode: Mode,
    ) -> Option<&'s Int8Weight> {
        f.as_deref().filter(|_| !mode.train && takes_int8(x))
    }

    /// `x` `[b, n, d]` through `f` (`N` stacked projections): each part's heads as a
    /// strided `[b, h, n, dh]` view of the one product.
    fn fused_heads<const N: usize>(&self, f: &Int8Weight, x: &Tensor) -> Result<[Tensor; N]> {
        let y = super::quant::int8_linear(x, &f.weight, Some(&f.bias))?;
        let (b, n, _) = y.dims3()?;
        let y = y.reshape((b, n, N, self.heads, self.head_dim))?;
        let parts = (0..N)
            .map(|i| y.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2))
            .collect::<Result<Vec<_>>>()?;
        parts
            .try_into()
            .map_err(|_| candle_core::Error::Msg(format!("stacked int8 weight: not {N} parts")))
    }

    /// Scaled queries over `xq` and keys and values over `xkv` (`None`: `xq` itself) as
    /// strided head views ([`head_view`]'s form); self-attention through
    /// [`Attention::qkv_int8`] when it applies.
    fn block_heads(
        &self,
        xq: &Tensor,
        xkv: Option<&Tensor>,
        mode: Mode,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        if let (None, Some(f)) = (xkv, Self::fused_for(&self.qkv_int8, xq, mode)) {
            let [q, k, v] = self.fused_heads(f, xq)?;
            return Ok((q, k, v));
        }
        let xkv = xkv.unwrap_or(xq);
        Ok((
            head_view(&self.query_rows(xq, mode)?, self.heads)?,
            head_view(&self.k_proj.forward(xkv)?, self.heads)?,
            head_view(&self.v_proj.forward(xkv)?, self.heads)?,
        ))
    }

    pub fn load(d: usize, heads: usize, scale_factor: f64, vb: VarBuilder) -> Result<Self> {
        let head_dim = d / heads;
        Ok(Self {
            q_proj: linear(d, d, vb.pp("q_proj"))?,
            k_proj: linear(d, d, vb.pp("k_proj"))?,
            v_proj: linear(d, d, vb.pp("v_proj"))?,
            out_proj: linear(d, d, vb.pp("out_proj"))?,
            c_attn: vb.get_with_hints(heads, "c_attn", candle_nn::Init::Const(1.0))?,
            heads,
            head_dim,
            scaling: (head_dim as f64 * scale_factor).powf(-0.5),
            qkv_int8: None,
            kv_int8: None,
        })
    }

    /// The factor applied to queries, `(dh * scale_factor)^-1/2`.
    pub fn scaling(&self) -> f64 {
        self.scaling
    }

    /// Scaled queries `[b, h, n, dh]`.
    pub fn query(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        split_heads(
            &self.q_proj.forward_act(x, mode, self.scaling, false)?,
            self.heads,
        )
    }

    /// Keys and values `[b, h, n, dh]`.
    pub fn key_value(&self, x: &Tensor, mode: Mode) -> Result<(Tensor, Tensor)> {
        if let Some(f) = Self::fused_for(&self.kv_int8, x, mode) {
            let [k, v] = self.fused_heads(f, x)?;
            return Ok((k.contiguous()?, v.contiguous()?));
        }
        let k = split_heads(&self.k_proj.forward_t(x, mode)?, self.heads)?;
        let v = split_heads(&self.v_proj.forward_t(x, mode)?, self.heads)?;
        Ok((k, v))
    }

    /// Scaled queries with the heads side by side, `[b, n, h * dh]`: what
    /// [`Attention::attend_rows`] reads.
    pub fn query_rows(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        self.q_proj.forward_act(x, mode, self.scaling, false)
    }

    /// Inference, one query row each (`q` `[rows, 1, d]` from [`Attention::query_rows`]):
    /// [`Attention::attend`] over keys/values read in place ([`super::attn_rows`]),
    /// projected: `[rows, 1, d]`.
    pub fn attend_rows(&self, q: &Tensor, a: &super::attn_rows::RowsAttention) -> Result<Tensor> {
        let out = super::attn_rows::attend_rows(q, a, &self.c_attn)?;
        self.out_proj.forward(&out)
    }

    /// Whether inference attention of `q` against `nk` keys goes through the block kernel
    /// ([`super::attn_block`]; long key sequences only, see its `MIN_KEYS`).
    pub fn fuses_block(q: &Tensor, nk: usize, mode: Mode) -> bool {
        !mode.train && super::attn_block::takes(q, nk)
    }

    /// softmax(q k^T + bias) v, head-scaled and projected: `[b, nq, d]`.
    /// `bias` broadcasts to `[b, h, nq, nk]` and carries masks too. At inference with long
    /// key sequences ([`Attention::fuses_block`]) one fused kernel, which also reads
    /// strided head views ([`head_view`]); else the composed ops on contiguous heads.
    pub fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bias: Option<&Tensor>,
        mode: Mode,
    ) -> Result<Tensor> {
        let bias = bias.map(Bias::Whole);
        self.attend_biases(q, k, v, bias.as_slice(), mode)
    }

    /// [`Attention::attend`] with the bias the sum of `biases` (left to right): the block
    /// kernel adds them per row; the composed path sums them first (`broadcast_add`).
    pub fn attend_biases(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        biases: &[Bias],
        mode: Mode,
    ) -> Result<Tensor> {
        if Self::fuses_block(q, k.dim(2)?, mode) {
            let out = super::attn_block::attend_block_biases(q, k, v, biases, &self.c_attn)?;
            return self.out_proj.forward(&out);
        }
        let bias = match biases {
            [] => None,
            [first, rest @ ..] => Some(rest.iter().try_fold(first.to_tensor()?, |acc, b| {
                acc.broadcast_add(&b.to_tensor()?)
            })?),
        };
        self.attend_composed(q, k, v, bias.as_ref(), mode)
    }

    /// [`Attention::attend`] through the composed ops (contiguous heads `[b, h, n, dh]`):
    /// the form the block kernel is checked and timed against, and the training path.
    pub fn attend_composed(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bias: Option<&Tensor>,
        mode: Mode,
    ) -> Result<Tensor> {
        let (b, h, nq, dh) = q.dims4()?;
        let mut scores = q.matmul(&k.t()?)?;
        let probs = if !mode.train && super::infer::fuses_inference(&scores) {
            // Inference: bias, mask and softmax in one pass, in place.
            super::infer::bias_softmax(scores, bias)?
        } else {
            if let Some(bias) = bias {
                scores = scores.broadcast_add(bias)?;
            }
            mode.softmax(&scores)?
        };
        let probs = mode.dropout(&probs)?;
        let out = probs.matmul(v)?; // [b, h, nq, dh]
        let out = out.broadcast_mul(&self.c_attn.reshape((1, h, 1, 1))?)?;
        let out = out.transpose(1, 2)?.reshape((b, nq, h * dh))?;
        self.out_proj.forward_t(&out, mode)
    }
}

/// Exact GELU; training on the CPU uses the fused kernel (same function to 1e-6, and a
/// several times cheaper backward than candle's).
pub fn gelu(x: &Tensor, mode: Mode) -> Result<Tensor> {
    if mode.fuses(x) {
        super::fused::gelu_erf(x)
    } else {
        x.gelu_erf()
    }
}

fn ffn(
    x: &Tensor,
    norm: &LayerNorm,
    fc1: &Linear,
    mid: &LayerNorm,
    fc2: &Linear,
    mode: Mode,
) -> Result<Tensor> {
    let h = fc1.forward_act(&norm.forward(x, mode)?, mode, 1.0, true)?;
    let h = mode.dropout(&h)?;
    let h = fc2.forward_t(&mid.forward(&h, mode)?, mode)?;
    mode.dropout(&h)
}

/// Pre-norm encoder layer with NormFormer extras.
#[derive(Debug, Clone)]
pub struct EncoderLayer {
    pub self_attn_layer_norm: LayerNorm,
    pub self_attn: Attention,
    pub self_attn_mid_layer_norm: LayerNorm,
    pub final_layer_norm: LayerNorm,
    pub fc1: Linear,
    pub ffn_layer_norm: LayerNorm,
    pub fc2: Linear,
}

impl EncoderLayer {
    pub fn load(
        d: usize,
        heads: usize,
        ffn_dim: usize,
        sf: f64,
        eps: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            self_attn_layer_norm: LayerNorm::load(d, eps, vb.pp("self_attn_layer_norm"))?,
            self_attn: Attention::load(d, heads, sf, vb.pp("self_attn"))?,
            self_attn_mid_layer_norm: LayerNorm::load(d, eps, vb.pp("self_attn_mid_layer_norm"))?,
            final_layer_norm: LayerNorm::load(d, eps, vb.pp("final_layer_norm"))?,
            fc1: linear(d, ffn_dim, vb.pp("fc1"))?,
            ffn_layer_norm: LayerNorm::load(ffn_dim, eps, vb.pp("ffn_layer_norm"))?,
            fc2: linear(ffn_dim, d, vb.pp("fc2"))?,
        })
    }

    /// Updates the query tokens `x_q`; keys/values come from `x_kv` (the full sequence the
    /// queries see; `None` means `x_q` itself). `bias`: `[b|1, h, nq, nk]`, masks included.
    pub fn forward(
        &self,
        x_q: &Tensor,
        x_kv: Option<&Tensor>,
        bias: Option<&Tensor>,
        mode: Mode,
    ) -> Result<Tensor> {
        let bias = bias.map(Bias::Whole);
        self.forward_biases(x_q, x_kv, bias.as_slice(), mode)
    }

    /// [`EncoderLayer::forward`] with the bias the sum of `biases` (a position bias and a
    /// padding mask: the block kernel adds them per row, without a `[b, h, n, n]` sum).
    pub fn forward_biases(
        &self,
        x_q: &Tensor,
        x_kv: Option<&Tensor>,
        biases: &[Bias],
        mode: Mode,
    ) -> Result<Tensor> {
        let hq = self.self_attn_layer_norm.forward(x_q, mode)?;
        let hkv = match x_kv {
            None => hq.clone(),
            Some(kv) => self.self_attn_layer_norm.forward(kv, mode)?,
        };
        let att = &self.self_attn;
        let (q, k, v) = if Attention::fuses_block(&hq, hkv.dim(1)?, mode) {
            // The block kernel reads the projections' outputs in place: no head splits.
            att.block_heads(&hq, x_kv.map(|_| &hkv), mode)?
        } else {
            let q = att.query(&hq, mode)?;
            let (k, v) = att.key_value(&hkv, mode)?;
            (q, k, v)
        };
        let a = att.attend_biases(&q, &k, &v, biases, mode)?;
        let a = mode.dropout(&self.self_attn_mid_layer_norm.forward(&a, mode)?)?;
        let x = (x_q + a)?;
        let h = ffn(
            &x,
            &self.final_layer_norm,
            &self.fc1,
            &self.ffn_layer_norm,
            &self.fc2,
            mode,
        )?;
        x + h
    }
}

/// Pre-norm decoder layer: self-attention, cross-attention, FFN, each with NormFormer extras.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    pub self_attn_layer_norm: LayerNorm,
    pub self_attn: Attention,
    pub self_attn_mid_layer_norm: LayerNorm,
    pub cross_attn_layer_norm: LayerNorm,
    pub cross_attn: Attention,
    pub cross_attn_mid_layer_norm: LayerNorm,
    pub final_layer_norm: LayerNorm,
    pub fc1: Linear,
    pub ffn_layer_norm: LayerNorm,
    pub fc2: Linear,
}

impl DecoderLayer {
    pub fn load(
        d: usize,
        heads: usize,
        ffn_dim: usize,
        sf: f64,
        eps: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        // An encoder layer's weights under the same names, plus cross-attention.
        let EncoderLayer {
            self_attn_layer_norm,
            self_attn,
            self_attn_mid_layer_norm,
            final_layer_norm,
            fc1,
            ffn_layer_norm,
            fc2,
        } = EncoderLayer::load(d, heads, ffn_dim, sf, eps, vb.clone())?;
        Ok(Self {
            self_attn_layer_norm,
            self_attn,
            self_attn_mid_layer_norm,
            cross_attn_layer_norm: LayerNorm::load(d, eps, vb.pp("cross_attn_layer_norm"))?,
            cross_attn: Attention::load(d, heads, sf, vb.pp("cross_attn"))?,
            cross_attn_mid_layer_norm: LayerNorm::load(d, eps, vb.pp("cross_attn_mid_layer_norm"))?,
            final_layer_norm,
            fc1,
            ffn_layer_norm,
            fc2,
        })
    }

    /// This layer's self-attention keys/values for tokens whose layer input is `x`.
    /// Also how skipped layers fill their cache from an exit state ("propagate").
    pub fn self_key_value(&self, x: &Tensor, mode: Mode) -> Result<(Tensor, Tensor)> {
        self.self_attn
            .key_value(&self.self_attn_layer_norm.forward(x, mode)?, mode)
    }

    /// Cross-attention keys/values over the encoder memory.
    pub fn cross_key_value(&self, memory: &Tensor, mode: Mode) -> Result<(Tensor, Tensor)> {
        self.cross_attn.key_value(memory, mode)
    }

    /// One layer over tokens `x` `[b, n, d]`. `past` holds earlier self-attention keys/values
    /// (`[b, h, t, dh]`) for incremental decoding. Cross attention uses `cross_kv` with
    /// `cross_bias`. Returns the output and this layer's keys/values for the new tokens.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        x: &Tensor,
        past: Option<(&Tensor, &Tensor)>,
        self_bias: Option<&Tensor>,
        cross_kv: (&Tensor, &Tensor),
        cross_bias: Option<&Tensor>,
        mode: Mode,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        let (x, kv) = self.self_block(x, past, self_bias, mode)?;
        let x = self.cross_block(&x, cross_kv, cross_bias, mode)?;
        Ok((self.ffn_block(&x, mode)?, kv))
    }

    /// Self-attention sub-block; also returns the new tokens' keys/values.
    pub fn self_block(
        &self,
        x: &Tensor,
        past: Option<(&Tensor, &Tensor)>,
        bias: Option<&Tensor>,
        mode: Mode,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        let h = self.self_attn_layer_norm.forward(x, mode)?;
        let q = self.self_attn.query(&h, mode)?;
        let (k_new, v_new) = self.self_attn.key_value(&h, mode)?;
        let a = match past {
            Some((pk, pv)) => {
                let k = Tensor::cat(&[pk, &k_new], 2)?;
                let v = Tensor::cat(&[pv, &v_new], 2)?;
                self.self_attn.attend(&q, &k, &v, bias, mode)?
            }
            None => self.self_attn.attend(&q, &k_new, &v_new, bias, mode)?,
        };
        let a = mode.dropout(&self.self_attn_mid_layer_norm.forward(&a, mode)?)?;
        Ok(((x + a)?, (k_new, v_new)))
    }

    /// Cross-attention sub-block over precomputed memory keys/values.
    pub fn cross_block(
        &self,
        x: &Tensor,
        kv: (&Tensor, &Tensor),
        bias: Option<&Tensor>,
        mode: Mode,
    ) -> Result<Tensor> {
        let h = self.cross_attn_layer_norm.forward(x, mode)?;
        let q = self.cross_attn.query(&h, mode)?;
        let a = self.cross_attn.attend(&q, kv.0, kv.1, bias, mode)?;
        let a = mode.dropout(&self.cross_attn_mid_layer_norm.forward(&a, mode)?)?;
        x + a
    }

    /// [`DecoderLayer::cross_block`] at inference for one query row each, keys/values read
    /// in place ([`super::attn_rows`]).
    pub fn cross_block_rows(
        &self,
        x: &Tensor,
        kv: &super::attn_rows::RowsAttention,
    ) -> Result<Tensor> {
        let h = self.cross_attn_layer_norm.forward(x, Mode::INFER)?;
        let q = self.cross_attn.query_rows(&h, Mode::INFER)?;
        let a = self.cross_attn.attend_rows(&q, kv)?;
        x + self.cross_attn_mid_layer_norm.forward(&a, Mode::INFER)?
    }

    pub fn ffn_block(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let h = ffn(
            x,
            &self.final_layer_norm,
            &self.fc1,
            &self.ffn_layer_norm,
            &self.fc2,
            mode,
        )?;
        x + h
    }
}

/// Additive key mask `[b, 1, 1, n]`: 0 for real tokens, f32::MIN for padding.
pub fn key_padding_bias(pad: &[Vec<bool>], device: &candle_core::Device) -> Result<Tensor> {
    let b = pad.len();
    let n = pad.first().map_or(0, |r| r.len());
    let data: Vec<f32> = pad
        .iter()
        .flat_map(|r| r.iter().map(|&p| if p { f32::MIN } else { 0.0 }))
        .collect();
    Tensor::from_vec(data, (b, 1, 1, n), device)
}

/// Causal mask `[1, 1, t, t]` (f32::MIN above the diagonal).
pub fn causal_bias(t: usize, device: &candle_core::Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { f32::MIN } else { 0.0 }))
        .collect();
    Tensor::from_vec(data, (1, 1, t, t), device)
}

pub fn to_f32(x: &Tensor) -> Result<Tensor> {
    x.to_dtype(DType::F32)
}

#[cfg(test)]
mod dropout_tests {
    use super::*;

    #[test]
    fn dropout_is_seeded_and_keeps_the_mean() {
        let x = Tensor::ones((64, 64), DType::F32, &candle_core::Device::Cpu).unwrap();
        let mode = Mode::train(0.25);
        let draw = |seed| {
            seed_dropout(seed);
            mode.dropout(&x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let (a, b, c) = (draw(3), draw(3), draw(4));
        assert_eq!(a, b, "same seed, different masks");
        assert_ne!(a, c, "different seeds, same mask");
        let zeros = a.iter().filter(|&&v| v == 0.0).count() as f64 / a.len() as f64;
        assert!((zeros - 0.25).abs() < 0.03, "dropped fraction {zeros}");
        let mean = a.iter().sum::<f32>() / a.len() as f32;
        assert!((mean - 1.0).abs() < 0.05, "mean {mean}");
        assert!(a.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
        let infer = Mode::INFER.dropout(&x).unwrap();
        assert_eq!(infer.sum_all().unwrap().to_scalar::<f32>().unwrap(), 4096.0);
    }
}
