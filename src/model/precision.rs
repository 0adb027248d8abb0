//! Inference precision (`--precision`): f32 (the default and the parity reference) or
//! int8 weights with per-output-channel scales and per-row dynamic activation scales
//! (`super::quant`). Chosen at load: [`apply`] converts the weights of the transformer's
//! dense layers, the image trunk's convolutions and the tied vocabulary projection (the
//! token embedding as the LM head, one scale per vocabulary row) once. The embedding
//! lookup of input tokens, layer norms and the position-bias projections stay f32.

use super::layers::Int8Weight;
use super::quant::QMatrix;
use super::Model;
use candle_core::{DType, Result};
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
    model.image_positions = Some(model.build_image_positions()?);
    if model.device.is_cpu() {
        // Every inference load: decoding steps project through the packed copy.
        let panels = super::vocab::VocabPanels::from_tensor(&model.embed_tokens)?;
        model.vocab_panels = Some(Arc::new(panels));
    }
    if precision == Precision::F32 {
        if model.device.is_cpu() {
            // The decoder's dense layers too (a decoding step multiplies a few rows): up to
            // depth 512 with gemm's bits, deeper (OFA-Tiny's fc2, all of OFA-Base) in the
            // panels' own order, one row included (`vocab::takes`).
            for l in &mut model.decoder.layers {
                let mut linears = vec![&mut l.fc1, &mut l.fc2];
                for a in [&mut l.self_attn, &mut l.cross_attn] {
                    linears.extend([&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.out_proj]);
                }
                for lin in linears {
                    lin.panels = Some(Arc::new(super::vocab::VocabPanels::from_tensor(
                        &lin.weight,
                    )?));
                }
            }
        }
        return Ok(());
    }
    if !model.device.is_cpu() {
        candle_core::bail!("--precision {precision} runs on the CPU only");
    }
    // Self-attention's input quantized once for its three projections, the decoder's
    // memory once for its keys and values.
    for l in &mut model.encoder.layers {
        let a = &mut l.self_attn;
        let q = (&a.q_proj, a.scaling());
        a.qkv_int8 = Some(Arc::new(Int8Weight::stack(&[
            q,
            (&a.k_proj, 1.0),
            (&a.v_proj, 1.0),
        ])?));
    }
    for l in &mut model.decoder.layers {
        let a = &mut l.cross_attn;
        a.kv_int8 = Some(Arc::new(Int8Weight::stack(&[
            (&a.k_proj, 1.0),
            (&a.v_proj, 1.0),
        ])?));
    }
    let enc = &mut model.encoder;
    let mut linears = vec![&mut enc.image_proj];
    for l in &mut enc.layers {
        let a = &mut l.self_attn;
        linears.extend([&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.out_proj]);
        linears.extend([&mut l.fc1, &mut l.fc2]);
    }
    for l in &mut model.decoder.layers {
        let a = &mut l.self_attn;
        linears.extend([&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.out_proj]);
        // The cross-attention's keys and values go through `kv_int8` alone.
        linears.extend([&mut l.cross_attn.q_proj, &mut l.cross_attn.out_proj]);
        linears.extend([&mut l.fc1, &mut l.fc2]);
    }
    for l in linears {
        l.int8 = Some(Arc::new(Int8Weight::stack(&[(l, 1.0)])?));
    }
    if let super::ImageTrunk::Resnet(net) = &mut enc.image_trunk {
        net.quantize_int8();
    }
    // Most of a decoding step's multiply-adds at OFA sizes: `[vocab, d]`, a scale per row.
    let (v, d) = model.embed_tokens.dims2()?;
    let e = model
        .embed_tokens
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    model.vocab_int8 = Some(Arc::new(QMatrix::from_rows(&e, v, d)));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::layers::Mode;
    use crate::model::{max_abs_diff, Config, EncoderMode};
    use candle_core::{Device, Tensor};
    use rand::{Rng, SeedableRng};

    /// The stacked int8 projections against the separate int8 layers: the decoder's
    /// cross-attention keys and values bit for bit (the same integer sums and scales), an
    /// encoder layer over 150 tokens (the block kernel's path) within rounding (the query
    /// scale moves into the weight's scales).
    #[test]
    fn fused_int8_projections_match_the_separate_layers() {
        let dev = Device::Cpu;
        let mut cfg = Config::tiny(EncoderMode::Joint);
        // Head size 12: a query scale that is not a power of two (folding one into the
        // weight's scales would keep the bits).
        cfg.d_model = 48;
        let (f32_model, _) = Model::random(&cfg, 5, &dev).unwrap();
        let mut model = f32_model.clone();
        apply(&mut model, Precision::Int8).unwrap();
        let d = cfg.d_model;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let x: Vec<f32> = (0..2 * 150 * d)
            .map(|_| rng.random_range(-2.0f32..2.0))
            .collect();
        let x = Tensor::from_vec(x, (2, 150, d), &dev).unwrap();

        let cross = &model.decoder.layers[0].cross_attn;
        assert!(cross.kv_int8.is_some());
        // No second int8 copy of the stacked layers: the reference quantizes its own.
        assert!(cross.k_proj.int8.is_none() && cross.v_proj.int8.is_none());
        let mut plain = cross.clone();
        plain.kv_int8 = None;
        for p in [&mut plain.k_proj, &mut plain.v_proj] {
            let q = Int8Weight::stack(&[(&*p, 1.0)]).unwrap();
            p.int8 = Some(Arc::new(q));
        }
        let (k, v) = cross.key_value(&x, Mode::INFER).unwrap();
        let (k0, v0) = plain.key_value(&x, Mode::INFER).unwrap();
        assert_eq!(k.dims(), k0.dims());
        assert_eq!(max_abs_diff(&k, &k0).unwrap(), 0.0);
        assert_eq!(max_abs_diff(&v, &v0).unwrap(), 0.0);

        let layer = &model.encoder.layers[0];
        assert!(layer.self_attn.qkv_int8.is_some());
        let mut plain = layer.clone();
        plain.self_attn.qkv_int8 = None;
        let y = layer.forward(&x, None, None, Mode::INFER).unwrap();
        let y0 = plain.forward(&x, None, None, Mode::INFER).unwrap();
        let err = max_abs_diff(&y, &y0).unwrap();
        // A query weight may round to the next int8 step once its row is scaled: well
        // inside int8's own error against f32 (a wrong head or part would not be).
        let f32_layer = &f32_model.encoder.layers[0];
        let y_f32 = f32_layer.forward(&x, None, None, Mode::INFER).unwrap();
        let int8_err = max_abs_diff(&y0, &y_f32).unwrap();
        assert!(
            err <= 0.25 * int8_err,
            "fused against separate {err}, int8 against f32 {int8_err}"
        );
        assert!(err > 0.0, "the same bits: the fused path did not run");
        // The separate layers' f32 weights, untouched: training reads those.
        assert_eq!(layer.self_attn.q_proj.weight.dims(), &[d, d]);
    }

    /// The int8 vocabulary projection against the f32 one on random models and states (odd
    /// vocabulary sizes, `d` not a multiple of 4 or 16, batch 1 and > 1, several
    /// positions): every logit within the rounding bound of its two operands, not
    /// bit-identical to f32 (the int8 path ran), the same on a second call, and
    /// `logits_f32` still the f32 bits.
    #[test]
    fn int8_logits_match_f32_within_the_rounding_bound() {
        let dev = Device::Cpu;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        for &(vocab, d, heads) in &[(37, 30, 3), (200, 32, 4), (1003, 68, 4)] {
            let mut cfg = Config::tiny(EncoderMode::Decomposed);
            cfg.vocab_size = vocab;
            cfg.d_model = d;
            cfg.encoder_heads = heads;
            cfg.decoder_heads = heads;
            let (f32_model, _) = Model::random(&cfg, 3, &dev).unwrap();
            let mut q_model = f32_model.clone();
            apply(&mut q_model, Precision::Int8).unwrap();
            assert!(f32_model.vocab_int8.is_none());
            let e = f32_model.embed_tokens.to_vec2::<f32>().unwrap();
            for &(b, t) in &[(1, 1), (3, 1), (2, 5)] {
                let h: Vec<f32> = (0..b * t * d)
                    .map(|_| rng.random_range(-3.0f32..3.0))
                    .collect();
                let h = Tensor::from_vec(h, (b, t, d), &dev).unwrap();
                let want = f32_model.logits(&h, Mode::INFER).unwrap();
                let got = q_model.logits(&h, Mode::INFER).unwrap();
                assert_eq!(got.dims(), &[b, t, vocab]);
                let again = q_model.logits(&h, Mode::INFER).unwrap();
                let (got, again) = (got.flatten_all().unwrap(), again.flatten_all().unwrap());
                let got = got.to_vec1::<f32>().unwrap();
                assert_eq!(got, again.to_vec1::<f32>().unwrap(), "deterministic");
                let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                // Answer scoring's f32 projection is untouched by the conversion.
                let f = q_model.logits_f32(&h, Mode::INFER).unwrap();
                assert_eq!(f.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
                // The projection's input: the final layer norm of `h`.
                let x = f32_model
                    .decoder
                    .layer_norm
                    .forward(&h, Mode::INFER)
                    .unwrap();
                let x = x.reshape((b * t, d)).unwrap().to_vec2::<f32>().unwrap();
                let mut moved = false;
                for (i, xi) in x.iter().enumerate() {
                    let sa = xi.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
                    for (j, ej) in e.iter().enumerate() {
                        let sw = ej.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
                        // |x e - xq eq| <= sum |x| |de| + |dx| |eq|, |de| <= sw / 2,
                        // |dx| <= sa / 2, |eq| <= |e| + sw / 2.
                        let bound: f32 = xi
                            .iter()
                            .zip(ej)
                            .map(|(xv, ev)| xv.abs() * sw / 2.0 + sa / 2.0 * (ev.abs() + sw / 2.0))
                            .sum();
                        let (g, w) = (got[i * vocab + j], want[i * vocab + j]);
                        let err = (g - w).abs();
                        assert!(
                            err <= bound * 1.001 + 1e-5,
                            "vocab {vocab} d {d} b {b} t {t} [{i},{j}]: {g} vs {w}, bound {bound}"
                        );
                        moved |= g != w;
                    }
                }
                assert!(
                    moved,
                    "int8 logits equal f32 bit for bit: int8 path not taken"
                );
            }
        }
    }
}
