//! OFA's ResNet image trunk: torchvision v1.5 bottleneck ResNet, stem plus
//! stages 1-3 (no layer4 / pooling / fc), output stride 16, 1024 channels.
//!
//! BatchNorm runs in inference mode; at load time each BatchNorm is folded
//! into the preceding (bias-free) convolution, so the forward pass is only
//! convolutions, additions and ReLUs.
//!
//! Inference on the CPU runs channels-last through [`super::conv`] (GEMMs with the bias,
//! residual and ReLU fused); weights that train (variables) keep candle's ops, which have
//! a backward pass.

use super::conv::{max_pool_3x3_s2, Nhwc, PackedConv};
use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;
use std::sync::Arc;

/// BatchNorm epsilon used by OFA's ResNet (torch default).
const BN_EPS: f64 = 1e-5;

/// Bottleneck blocks per stage (stages 1-3) for an OFA `resnet_type`.
pub fn blocks_for(resnet_type: &str) -> Option<[usize; 3]> {
    match resnet_type {
        "resnet50" => Some([3, 4, 6]),
        "resnet101" => Some([3, 4, 23]),
        "resnet152" => Some([3, 8, 36]),
        _ => None,
    }
}

/// A convolution with a BatchNorm folded in: `y = conv(x, w) + b`.
#[derive(Debug, Clone)]
struct ConvBn {
    /// `[out, in, k, k]` (for `k == 1` stored as `[out, in]` for a matmul).
    weight: Tensor,
    /// `[1, out, 1, 1]`.
    bias: Tensor,
    kernel: usize,
    stride: usize,
    padding: usize,
    /// The inference form (CPU, weights that do not train), packed once at load.
    packed: Option<Arc<PackedConv>>,
}

impl ConvBn {
    /// Loads `conv_name.weight` (no bias) and the BatchNorm `bn_name.*`
    /// (`weight`, `bias`, `running_mean`, `running_var`) and folds them:
    /// `w' = w * g / sqrt(var + eps)`, `b' = beta - mean * g / sqrt(var + eps)`.
    /// The folding is computed in f64 and rounded once to f32.
    fn load(
        vb: &VarBuilder,
        conv_name: &str,
        bn_name: &str,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
    ) -> Result<Self> {
        let w = vb
            .get(
                (c_out, c_in, kernel, kernel),
                &format!("{conv_name}.weight"),
            )?
            .to_dtype(DType::F64)?;
        let bn = vb.pp(bn_name);
        let gamma = bn.get(c_out, "weight")?.to_dtype(DType::F64)?;
        let beta = bn.get(c_out, "bias")?.to_dtype(DType::F64)?;
        let mean = bn.get(c_out, "running_mean")?.to_dtype(DType::F64)?;
        let var = bn.get(c_out, "running_var")?.to_dtype(DType::F64)?;
        let scale = (gamma / (var + BN_EPS)?.sqrt()?)?;
        let weight = w.broadcast_mul(&scale.reshape((c_out, 1, 1, 1))?)?;
        let bias = (beta - (mean * &scale)?)?;
        let weight = if kernel == 1 {
            weight.reshape((c_out, c_in))?
        } else {
            weight
        };
        let weight = weight.to_dtype(DType::F32)?.contiguous()?;
        let bias = bias.to_dtype(DType::F32)?;
        let packed = if weight.device().is_cpu() && !weight.track_op() && !bias.track_op() {
            Some(Arc::new(PackedConv::new(
                &weight,
                &bias,
                kernel,
                stride,
                kernel / 2,
            )?))
        } else {
            None
        };
        Ok(Self {
            weight,
            bias: bias.reshape((1, c_out, 1, 1))?,
            kernel,
            stride,
            padding: kernel / 2,
            packed,
        })
    }

    /// Output side for an input side `h` (torch's floor arithmetic; the strided 1x1 path
    /// keeps every `stride`-th pixel, which gives the same size).
    fn out_side(&self, h: usize) -> usize {
        (h + 2 * self.padding).saturating_sub(self.kernel) / self.stride + 1
    }

    /// Multiply-adds on an `h` x `w` input, and the output size.
    fn macs(&self, h: usize, w: usize) -> (u64, usize, usize) {
        let (c_out, c_in) = (
            self.weight.dim(0).unwrap_or(0),
            self.weight.dim(1).unwrap_or(0),
        );
        let (oh, ow) = (self.out_side(h), self.out_side(w));
        let k2 = (self.kernel * self.kernel) as u64;
        ((oh * ow) as u64 * c_in as u64 * c_out as u64 * k2, oh, ow)
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = if self.kernel == 1 {
            // 1x1 convolution as a matrix product over the (subsampled) pixels.
            let x = if self.stride > 1 {
                let (_, _, h, w) = x.dims4()?;
                let rows: Vec<u32> = (0..h).step_by(self.stride).map(|i| i as u32).collect();
                let cols: Vec<u32> = (0..w).step_by(self.stride).map(|i| i as u32).collect();
                let rows = Tensor::new(rows.as_slice(), x.device())?;
                let cols = Tensor::new(cols.as_slice(), x.device())?;
                x.index_select(&rows, 2)?.index_select(&cols, 3)?
            } else {
                x.clone()
            };
            let (b, c, h, w) = x.dims4()?;
            let flat = x.reshape((b, c, h * w))?;
            self.weight
                .broadcast_matmul(&flat)?
                .reshape((b, (), h, w))?
        } else {
            x.conv2d(&self.weight, self.padding, self.stride, 1, 1)?
        };
        y.broadcast_add(&self.bias)
    }
}

/// torchvision v1.5 bottleneck: 1x1 -> 3x3 (stride here) -> 1x1 (x4), each
/// followed by BatchNorm; ReLU after the first two and after the residual sum.
#[derive(Debug, Clone)]
struct Bottleneck {
    conv1: ConvBn,
    conv2: ConvBn,
    conv3: ConvBn,
    downsample: Option<ConvBn>,
}

impl Bottleneck {
    fn load(vb: &VarBuilder, c_in: usize, width: usize, stride: usize) -> Result<Self> {
        let c_out = width * 4;
        let conv1 = ConvBn::load(vb, "conv1", "bn1", c_in, width, 1, 1)?;
        let conv2 = ConvBn::load(vb, "conv2", "bn2", width, width, 3, stride)?;
        let conv3 = ConvBn::load(vb, "conv3", "bn3", width, c_out, 1, 1)?;
        let downsample = if stride != 1 || c_in != c_out {
            Some(ConvBn::load(
                vb,
                "downsample.0",
                "downsample.1",
                c_in,
                c_out,
                1,
                stride,
            )?)
        } else {
            None
        };
        Ok(Self {
            conv1,
            conv2,
            conv3,
            downsample,
        })
    }

    fn macs(&self, h: usize, w: usize) -> (u64, usize, usize) {
        let (m1, h1, w1) = self.conv1.macs(h, w);
        let (m2, h2, w2) = self.conv2.macs(h1, w1);
        let (m3, h3, w3) = self.conv3.macs(h2, w2);
        let ds = self.downsample.as_ref().map_or(0, |d| d.macs(h, w).0);
        (m1 + m2 + m3 + ds, h3, w3)
    }

    /// Channels-last inference: the shortcut (or the downsample's product) is the buffer
    /// conv3 accumulates into, then both biases and the ReLU go in one pass.
    fn forward_packed(&self, x: Nhwc) -> Result<Nhwc> {
        let p = |c: &ConvBn| {
            c.packed
                .clone()
                .ok_or_else(|| candle_core::Error::Msg("ResNet: convolution not packed".into()))
        };
        let y = p(&self.conv1)?.forward(&x, true)?;
        let y = p(&self.conv2)?.forward(&y, true)?;
        let conv3 = p(&self.conv3)?;
        let (acc, ds_bias) = match &self.downsample {
            Some(ds) => {
                let ds = p(ds)?;
                (ds.product(&x, None)?, Some(ds))
            }
            None => (x, None),
        };
        let bias: Vec<f32> = match &ds_bias {
            Some(ds) => conv3
                .bias()
                .iter()
                .zip(ds.bias())
                .map(|(a, b)| a + b)
                .collect(),
            None => conv3.bias().to_vec(),
        };
        conv3.fused(&y, Some(acc), Some(&bias), true)
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.conv1.forward(x)?.relu()?;
        let y = self.conv2.forward(&y)?.relu()?;
        let y = self.conv3.forward(&y)?;
        let shortcut = match &self.downsample {
            Some(ds) => ds.forward(x)?,
            None => x.clone(),
        };
        (y + shortcut)?.relu()
    }
}

/// OFA's ResNet trunk (weights only, immutable).
#[derive(Debug, Clone)]
pub struct ResNet {
    stem: ConvBn,
    blocks: Vec<Bottleneck>,
}

impl ResNet {
    /// Number of channels of the feature map.
    pub const OUT_CHANNELS: usize = 1024;
    /// Ratio of the input side to the feature-map side.
    pub const OUTPUT_STRIDE: usize = 16;

    /// Loads the trunk from `vb` positioned at the `embed_images` prefix
    /// (`conv1`, `bn1`, `layer{1,2,3}.{b}.…`), with `blocks` bottlenecks per
    /// stage (see [`blocks_for`]). Weights are converted to f32 and BatchNorms
    /// folded into the convolutions.
    pub fn load(vb: VarBuilder, blocks: [usize; 3]) -> Result<Self> {
        if blocks.contains(&0) {
            candle_core::bail!("every ResNet stage needs at least one block, got {blocks:?}");
        }
        let stem = ConvBn::load(&vb, "conv1", "bn1", 3, 64, 7, 2)?;
        let mut all = Vec::with_capacity(blocks.iter().sum());
        let mut c_in = 64;
        for (s, (&n, width)) in blocks.iter().zip([64usize, 128, 256]).enumerate() {
            let stage = vb.pp(format!("layer{}", s + 1));
            for b in 0..n {
                let stride = if b == 0 && s > 0 { 2 } else { 1 };
                all.push(Bottleneck::load(&stage.pp(b), c_in, width, stride)?);
                c_in = width * 4;
            }
        }
        Ok(Self { stem, blocks: all })
    }

    /// Every packed convolution's products in int8 (`--precision int8`); convolutions
    /// without a packed form (weights that train) keep candle's f32 ops.
    pub fn quantize_int8(&mut self) {
        let convs = self.blocks.iter_mut().flat_map(|b| {
            [&mut b.conv1, &mut b.conv2, &mut b.conv3]
                .into_iter()
                .chain(b.downsample.as_mut())
        });
        for conv in std::iter::once(&mut self.stem).chain(convs) {
            if let Some(p) = &conv.packed {
                conv.packed = Some(Arc::new(p.to_int8()));
            }
        }
    }

    /// Multiply-adds of one `h` x `w` image through the trunk (convolutions only).
    pub fn macs(&self, h: usize, w: usize) -> u64 {
        let (mut total, h, w) = self.stem.macs(h, w);
        // 3x3/2 max pool, padding 1.
        let (mut h, mut w) = ((h + 2 - 3) / 2 + 1, (w + 2 - 3) / 2 + 1);
        for block in &self.blocks {
            let (m, bh, bw) = block.macs(h, w);
            total += m;
            (h, w) = (bh, bw);
        }
        total
    }

    /// `x`: `[B, 3, H, W]` f32 normalised pixels -> `[B, 1024, H/16, W/16]`
    /// (exactly torch's sizes for any H, W: conv/pool arithmetic with floor).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.packed_for(x) {
            return self.forward_packed(x)?.into_nchw(x.device());
        }
        self.forward_candle(x)
    }

    /// `x`: `[B, 3, H, W]` -> `[B, h * w, 1024]`: the feature map as tokens in row-major
    /// order (what the encoder reads; channels-last needs no transposition).
    pub fn features(&self, x: &Tensor) -> Result<Tensor> {
        if self.packed_for(x) {
            return self.forward_packed(x)?.into_tokens(x.device());
        }
        let f = self.forward_candle(x)?; // [b, 1024, h, w]
        let (b, c, h, w) = f.dims4()?;
        f.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()
    }

    /// Whether `x` can take the packed inference path: every convolution packed, and
    /// nothing that needs a gradient.
    fn packed_for(&self, x: &Tensor) -> bool {
        !super::infer::reference_kernels()
            && x.device().is_cpu()
            && !x.track_op()
            && self.stem.packed.is_some()
            && self.blocks.iter().all(|b| {
                [&b.conv1, &b.conv2, &b.conv3]
                    .into_iter()
                    .chain(&b.downsample)
                    .all(|c| c.packed.is_some())
            })
    }

    fn forward_packed(&self, x: &Tensor) -> Result<Nhwc> {
        let stem = self.stem.packed.as_ref().expect("checked by packed_for");
        let y = stem.forward(&Nhwc::from_nchw(x)?, true)?;
        let mut y = max_pool_3x3_s2(&y);
        for block in &self.blocks {
            y = block.forward_packed(y)?;
        }
        Ok(y)
    }

    /// candle's ops (differentiable): training, and the reference of the packed path.
    pub fn forward_candle(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.to_dtype(DType::F32)?;
        let y = self.stem.forward(&x)?.relu()?;
        // 3x3/2 max pool with padding 1 (with a backward, for fine-tuning).
        let mut y = super::pool::max_pool2d(&y, 3, 2, 1)?;
        for block in &self.blocks {
            y = block.forward(&y)?;
        }
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn macs_count_every_convolution() {
        let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
        let net = ResNet::load(vb, [1, 1, 1]).unwrap();
        // 64 x 64 input: stem -> 32, pool -> 16, stage 1 at 16, stage 2 -> 8, stage 3 -> 4.
        let stem = 32 * 32 * 3 * 64 * 49;
        let stage1 = 256 * (64 * 64 + 64 * 64 * 9 + 64 * 256 + 64 * 256);
        let stage2 = 256 * 256 * 128 + 64 * (128 * 128 * 9 + 128 * 512 + 256 * 512);
        let stage3 = 64 * 512 * 256 + 16 * (256 * 256 * 9 + 256 * 1024 + 512 * 1024);
        assert_eq!(net.macs(64, 64), (stem + stage1 + stage2 + stage3) as u64);
        // Every size halves exactly from 128 to 64.
        assert_eq!(net.macs(128, 128), 4 * net.macs(64, 64));
        // The count matches the shapes forward produces.
        let y = net.forward(&Tensor::zeros((1, 3, 48, 80), DType::F32, &Device::Cpu).unwrap());
        assert_eq!(y.unwrap().dims(), &[1, 1024, 3, 5]);
        assert!(net.macs(48, 80) > 0);
    }

    /// A ResNet with random weights (positive BatchNorm variances), and one built from
    /// variables (which trains, so it keeps candle's ops).
    fn random_resnet(blocks: [usize; 3], seed: u64) -> (ResNet, ResNet) {
        use rand::SeedableRng;
        use rand_distr::{Distribution, StandardNormal};
        let dev = Device::Cpu;
        let varmap = candle_nn::VarMap::new();
        let trains =
            ResNet::load(VarBuilder::from_varmap(&varmap, DType::F32, &dev), blocks).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let data = varmap.data().lock().unwrap();
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        let mut tensors = std::collections::HashMap::new();
        for name in names {
            let shape = data[name].shape().clone();
            let fan_in: usize = shape.dims()[1..].iter().product::<usize>().max(1);
            let v: Vec<f32> = (0..shape.elem_count())
                .map(|_| {
                    let z: f32 = StandardNormal.sample(&mut rng);
                    if name.ends_with("running_var") {
                        0.5 + z.abs()
                    } else if shape.rank() == 4 {
                        z * (2.0 / fan_in as f32).sqrt()
                    } else {
                        1.0 + 0.1 * z
                    }
                })
                .collect();
            let t = Tensor::from_vec(v, shape, &dev).unwrap();
            data[name].set(&t).unwrap();
            tensors.insert(name.clone(), t);
        }
        let fixed = ResNet::load(VarBuilder::from_tensors(tensors, DType::F32, &dev), blocks);
        (fixed.unwrap(), trains)
    }

    #[test]
    fn packed_trunk_matches_candle_ops() {
        let dev = Device::Cpu;
        let (net, trains) = random_resnet([2, 1, 2], 5);
        assert!(net.stem.packed.is_some(), "plain weights are packed");
        assert!(trains.stem.packed.is_none(), "variables keep candle's ops");
        // Odd sizes, batch 1 and 3.
        for (b, h, w) in [(1, 50, 37), (3, 33, 64)] {
            let x = Tensor::randn(0f32, 1.0, (b, 3, h, w), &dev).unwrap();
            let reference = net.forward_candle(&x).unwrap();
            let scale = reference
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let got = net.forward(&x).unwrap();
            assert_eq!(got.dims(), reference.dims());
            let err = max_abs_diff(&got, &reference);
            assert!(
                err <= 1e-5 * scale.max(1.0),
                "{b}x{h}x{w}: {err} (scale {scale})"
            );
            // Tokens: [b, h * w, c] in row-major order.
            let (_, c, fh, fw) = reference.dims4().unwrap();
            let tokens = reference
                .reshape((b, c, fh * fw))
                .unwrap()
                .transpose(1, 2)
                .unwrap();
            let err = max_abs_diff(&net.features(&x).unwrap(), &tokens);
            assert!(err <= 1e-5 * scale.max(1.0), "features: {err}");
        }
    }

    fn fixture(name: &str) -> std::path::PathBuf {
        std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/ofa-parity"
        ))
        .join(name)
    }

    /// Block counts of the fixture's `resnet_type`.
    fn fixture_blocks() -> [usize; 3] {
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture("config.json")).unwrap())
                .unwrap();
        blocks_for(cfg["resnet_type"].as_str().unwrap()).unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        crate::model::max_abs_diff(a, b).unwrap()
    }

    #[test]
    fn block_counts() {
        assert_eq!(blocks_for("resnet50"), Some([3, 4, 6]));
        assert_eq!(blocks_for("resnet101"), Some([3, 4, 23]));
        assert_eq!(blocks_for("resnet152"), Some([3, 8, 36]));
        assert_eq!(blocks_for("resnet18"), None);
    }

    #[test]
    fn resnet_parity_with_fixture() {
        let dev = Device::Cpu;
        let outputs = candle_core::safetensors::load(fixture("outputs.safetensors"), &dev).unwrap();
        let images = &outputs["patch_images"];
        let expected = &outputs["image_features"];
        // [batch, 1024 (layer3), side / 16, side / 16], sizes from the fixture.
        let (b, _, h, w) = images.dims4().unwrap();
        assert_eq!(expected.dims(), &[b, 1024, h / 16, w / 16]);
        let blocks = fixture_blocks();

        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(&[fixture("model.safetensors")], DType::F32, &dev)
                .unwrap()
        };
        let resnet = ResNet::load(vb.pp("encoder.embed_images"), blocks).unwrap();
        let t0 = std::time::Instant::now();
        let got = resnet.forward(images).unwrap();
        eprintln!("resnet forward {:?}: {:?}", images.dims(), t0.elapsed());
        assert_eq!(got.dims(), expected.dims());
        let err = max_abs_diff(&got, expected);
        eprintln!("image_features max abs diff: {err:e}");
        assert!(err <= 6e-4, "image_features max abs diff {err}");

        // A wrong block count must fail to load (one block more in the last stage).
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(&[fixture("model.safetensors")], DType::F32, &dev)
                .unwrap()
        };
        let more = [blocks[0], blocks[1], blocks[2] + 1];
        assert!(ResNet::load(vb.pp("encoder.embed_images"), more).is_err());
    }

    #[test]
    fn resnet_from_state_dict_single_image() {
        // The ResNet trunk's float32 pickle is only in the full pytorch_model.bin (37 MB,
        // outside the repository).
        let Some(full) = std::env::var_os("MUE_OFA_FIXTURE_FULL") else {
            // To stderr itself (eprintln! is captured): a plain `cargo test` shows it.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "resnet_from_state_dict_single_image: SKIPPED (set \
                 MUE_OFA_FIXTURE_FULL=/path/to/pytorch_model.bin to run it)"
            );
            return;
        };
        let dev = Device::Cpu;
        let outputs = candle_core::safetensors::load(fixture("outputs.safetensors"), &dev).unwrap();
        let sd = crate::model::weights::load_state_dict(std::path::Path::new(&full)).unwrap();
        let vb = VarBuilder::from_tensors(sd, DType::F32, &dev);
        let resnet = ResNet::load(vb.pp("encoder.embed_images"), fixture_blocks()).unwrap();
        // Batch of one: row 1 alone must give row 1 of the reference.
        let img = outputs["patch_images"].narrow(0, 1, 1).unwrap();
        let got = resnet.forward(&img).unwrap();
        let expected = outputs["image_features"].narrow(0, 1, 1).unwrap();
        let err = max_abs_diff(&got, &expected);
        assert!(err <= 6e-4, "image_features[1] max abs diff {err}");
    }
}
