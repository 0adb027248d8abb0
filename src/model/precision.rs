//! Inference precision (`--precision`): f32 (the default and the parity reference) or
//! int8 weights with per-output-channel scales and per-row dynamic activation scales
//! (`super::quant`). Chosen at load: [`apply`] converts the weights of the transformer's
//! dense layers and the image trunk's convolutions once. Embeddings, layer norms, the
//! position-bias projections and the tied vocabulary projection stay f32.

use super::quant::{self, QMatrix};
use super::Model;
use candle_core::{CpuStorage, DType, Result, Storage, Tensor};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Precision {
    #[default]
    F32,
    Int8,
}

impl Precision {
    pub const NAMES: &'static str = "f32, int8";

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Int8 => "int8",
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(Precision::F32),
            "int8" => Ok(Precision::Int8),
            "bf16" => Err("precision bf16 is not implemented yet (f32 or int8)".into()),
            other => Err(format!(
                "unknown precision {other:?} (one of: {})",
                Precision::NAMES
            )),
        }
    }
}

/// Converts `model`'s weights for inference at `precision` (f32: nothing to do).
pub fn apply(model: &mut Model, precision: Precision) -> Result<()> {
    if precision == Precision::F32 {
        return Ok(());
    }
    if !model.device.is_cpu() {
        candle_core::bail!("--precision {precision} runs on the CPU only");
    }
    let enc = &mut model.encoder;
    let mut linears = vec![&mut enc.image_proj];
    for l in &mut enc.layers {
        let a = &mut l.self_attn;
        linears.extend([&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.out_proj]);
        linears.extend([&mut l.fc1, &mut l.fc2]);
    }
    for l in &mut model.decoder.layers {
        for a in [&mut l.self_attn, &mut l.cross_attn] {
            linears.extend([&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.out_proj]);
        }
        linears.extend([&mut l.fc1, &mut l.fc2]);
    }
    for l in linears {
        let (n, k) = l.weight.dims2()?;
        let w = l
            .weight
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        l.int8 = Some(Arc::new(QMatrix::from_rows(&w, n, k)));
    }
    if let super::ImageTrunk::Resnet(net) = &mut enc.image_trunk {
        net.quantize_int8();
    }
    Ok(())
}

/// `x [..., k] W^T` through the int8 kernel: `[..., n]` f32.
pub fn int8_linear(x: &Tensor, w: &QMatrix) -> Result<Tensor> {
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
    let mut y = vec![0f32; m * n];
    {
        let (storage, layout) = x.storage_and_layout();
        let data = match (&*storage, layout.contiguous_offsets()) {
            (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => &v[a..b],
            _ => candle_core::bail!("int8 linear: f32 contiguous input expected"),
        };
        quant::matmul(quant::Kernel::detect(), data, m, w, &mut y, false);
    }
    let mut out = dims[..dims.len() - 1].to_vec();
    out.push(n);
    Tensor::from_vec(y, out, x.device())
}
