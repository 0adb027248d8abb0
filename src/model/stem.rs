//! A small convolutional stem in front of the patch projection: a stack of 3x3,
//! stride-2 convolutions with GELU, then non-overlapping patches of the feature map.
//!
//! Why: a linear patch projection has to learn every shape once per offset inside
//! the patch; shared local filters see an edge or a corner the same wherever it is.
//! Vision transformers trained from scratch on little data learn much faster with
//! one ("Early convolutions help transformers see better", Xiao et al. 2021).
//!
//! The convolution is an explicit im2col and a matmul, so training gets the
//! gradients of plain tensor ops and inference computes exactly the same thing.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

/// One 3x3, stride-2, padding-1 convolution with a bias.
#[derive(Debug, Clone)]
pub struct Conv3x3 {
    /// `[c_out, c_in, 3, 3]`, as PyTorch stores it.
    pub weight: Tensor,
    pub bias: Tensor,
}

impl Conv3x3 {
    pub fn load(c_in: usize, c_out: usize, vb: VarBuilder) -> Result<Self> {
        // He initialisation: the stem feeds a GELU.
        let init = candle_nn::Init::Randn {
            mean: 0.0,
            stdev: (2.0 / (9 * c_in) as f64).sqrt(),
        };
        Ok(Conv3x3 {
            weight: vb.get_with_hints((c_out, c_in, 3, 3), "weight", init)?,
            bias: vb.get_with_hints(c_out, "bias", candle_nn::Init::Const(0.0))?,
        })
    }

    /// `[b, c_in, h, w]` (h, w even) -> `[b, c_out, h/2, w/2]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        if h % 2 != 0 || w % 2 != 0 {
            candle_core::bail!("conv stem: feature map {h}x{w} is not even");
        }
        let (ho, wo) = (h / 2, w / 2);
        let padded = x.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
        // Tap (ky, kx) of output (i, j) reads padded row 2i+ky, column 2j+kx.
        let mut taps = Vec::with_capacity(9);
        for ky in 0..3 {
            for kx in 0..3 {
                let t = padded
                    .narrow(2, ky, h)?
                    .narrow(3, kx, w)?
                    .reshape((b, c, ho, 2, wo, 2))?
                    .narrow(3, 0, 1)?
                    .narrow(5, 0, 1)?
                    .reshape((b, c, ho, wo))?;
                taps.push(t);
            }
        }
        let cols = Tensor::stack(&taps, 2)? // [b, c, 9, ho, wo]
            .permute((0, 3, 4, 1, 2))?
            .reshape((b * ho * wo, c * 9))?;
        let c_out = self.weight.dim(0)?;
        let w2 = self.weight.reshape((c_out, c * 9))?;
        cols.matmul(&w2.t()?)?
            .broadcast_add(&self.bias)?
            .reshape((b, ho, wo, c_out))?
            .permute((0, 3, 1, 2))?
            .contiguous()
    }

    /// Multiply-adds for an `h` x `w` input.
    pub fn macs(&self, h: usize, w: usize) -> u64 {
        let d = self.weight.dims();
        ((h / 2) * (w / 2) * d[0] * d[1] * 9) as u64
    }
}

/// The stem: convolutions with GELU, then `patch` x `patch` patches of the result.
#[derive(Debug, Clone)]
pub struct ConvStem {
    pub convs: Vec<Conv3x3>,
    pub patch: usize,
}

impl ConvStem {
    /// Weights under `vb` as `stem.{i}.weight` / `stem.{i}.bias`.
    pub fn load(channels: &[usize], patch: usize, vb: VarBuilder) -> Result<Self> {
        let mut c_in = 3;
        let mut convs = Vec::with_capacity(channels.len());
        for (i, &c_out) in channels.iter().enumerate() {
            convs.push(Conv3x3::load(c_in, c_out, vb.pp(format!("stem.{i}")))?);
            c_in = c_out;
        }
        Ok(ConvStem { convs, patch })
    }

    /// `[b, 3, s, s]` -> feature map `[b, c, s / 2^n, s / 2^n]`.
    pub fn feature_map(&self, images: &Tensor) -> Result<Tensor> {
        let mut x = images.clone();
        for conv in &self.convs {
            x = conv.forward(&x)?.gelu_erf()?;
        }
        Ok(x)
    }

    pub fn macs(&self, side: usize) -> u64 {
        let mut s = side;
        let mut total = 0;
        for conv in &self.convs {
            total += conv.macs(s, s);
            s /= 2;
        }
        total
    }
}

/// `[b, c, h, w]` -> `[b, (h/p)*(w/p), c*p*p]`: non-overlapping patches, row-major,
/// each flattened channel-major.
pub fn patchify(x: &Tensor, p: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (gh, gw) = (h / p, w / p);
    x.reshape((b, c, gh, p, gw, p))?
        .permute((0, 2, 4, 1, 3, 5))?
        .reshape((b, gh * gw, c * p * p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    /// A He-initialised convolution (a throwaway VarMap holds its weights).
    fn conv(c_in: usize, c_out: usize) -> Conv3x3 {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        Conv3x3::load(c_in, c_out, vb).unwrap()
    }

    #[test]
    fn im2col_convolution_matches_candle_conv2d() {
        let dev = Device::Cpu;
        let conv = conv(3, 5);
        let bias = Tensor::new(&[0.1f32, -0.2, 0.3, 0.0, 0.5], &dev).unwrap();
        let conv = Conv3x3 {
            weight: conv.weight,
            bias,
        };
        let x = Tensor::randn(0f32, 1.0, (2, 3, 8, 6), &dev).unwrap();
        let ours = conv.forward(&x).unwrap();
        let reference = x
            .conv2d(&conv.weight, 1, 2, 1, 1)
            .unwrap()
            .broadcast_add(&conv.bias.reshape((1, 5, 1, 1)).unwrap())
            .unwrap();
        assert_eq!(ours.dims(), &[2, 5, 4, 3]);
        let diff = crate::model::max_abs_diff(&ours, &reference).unwrap();
        assert!(diff < 1e-5, "im2col conv differs from conv2d by {diff}");
        assert_eq!(conv.macs(8, 6), (4 * 3 * 5 * 3 * 9) as u64);
    }

    #[test]
    fn odd_feature_maps_are_refused() {
        let x = Tensor::zeros((1, 3, 7, 8), DType::F32, &Device::Cpu).unwrap();
        let err = conv(3, 4).forward(&x).unwrap_err().to_string();
        assert!(err.contains("7x8"), "{err}");
    }
}
