//! AdamW (decoupled weight decay, as `torch.optim.AdamW` / `candle_nn::AdamW`) with global
//! gradient-norm clipping, a warm-up + linear-decay schedule, and moments that can be
//! saved and restored (candle's own `AdamW` keeps them private, so `--resume` could not
//! continue it exactly).

use anyhow::{bail, Context};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::VarMap;
use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, Clone, Copy)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        // OFA fine-tuning: Adam betas (0.9, 0.999), eps 1e-8, weight decay 0.01.
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

struct Slot {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
}

pub struct AdamW {
    slots: Vec<Slot>,
    /// Updates applied so far (for bias correction).
    pub t: usize,
    pub params: AdamWParams,
}

/// What one update did.
#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    /// Factor the gradients were multiplied by (1 when not clipped).
    pub clip_scale: f32,
    /// Variables without a gradient in this step.
    pub missing: usize,
}

impl AdamW {
    /// Optimise every variable of `varmap` (in name order).
    pub fn new(varmap: &VarMap, params: AdamWParams) -> Result<Self> {
        let data = varmap.data().lock().unwrap();
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        let slots = names
            .into_iter()
            .map(|n| {
                let var = data[n].clone();
                let m = var.zeros_like()?;
                let v = var.zeros_like()?;
                Ok(Slot {
                    name: n.clone(),
                    var,
                    m,
                    v,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            slots,
            t: 0,
            params,
        })
    }

    pub fn num_vars(&self) -> usize {
        self.slots.len()
    }

    /// Global L2 norm of the gradients of the optimised variables.
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f32> {
        let mut total = 0f64;
        for s in &self.slots {
            if let Some(g) = grads.get(s.var.as_tensor()) {
                total += g
                    .to_dtype(DType::F32)?
                    .sqr()?
                    .sum_all()?
                    .to_scalar::<f32>()? as f64;
            }
        }
        Ok(total.sqrt() as f32)
    }

    /// One update with learning rate `lr`; gradients are scaled so that their global norm
    /// is at most `max_norm` (when given).
    pub fn step(&mut self, grads: &GradStore, lr: f64, max_norm: Option<f64>) -> Result<StepStats> {
        let grad_norm = self.grad_norm(grads)?;
        if !grad_norm.is_finite() {
            candle_core::bail!("gradient norm is not finite ({grad_norm})");
        }
        let clip_scale = match max_norm {
            Some(m) if (grad_norm as f64) > m => m / (grad_norm as f64 + 1e-6),
            _ => 1.0,
        };
        self.t += 1;
        let p = self.params;
        let bc1 = 1.0 - p.beta1.powi(self.t as i32);
        let bc2 = 1.0 - p.beta2.powi(self.t as i32);
        let mut missing = 0;
        for s in self.slots.iter_mut() {
            let Some(g) = grads.get(s.var.as_tensor()) else {
                missing += 1;
                continue;
            };
            let g = (g * clip_scale)?;
            s.m = ((&s.m * p.beta1)? + (&g * (1.0 - p.beta1))?)?;
            s.v = ((&s.v * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let m_hat = (&s.m / bc1)?;
            let v_hat = (&s.v / bc2)?;
            let update = (m_hat / (v_hat.sqrt()? + p.eps)?)?;
            let theta = ((s.var.as_tensor() * (1.0 - lr * p.weight_decay))? - (update * lr)?)?;
            s.var.set(&theta)?;
        }
        Ok(StepStats {
            grad_norm,
            clip_scale: clip_scale as f32,
            missing,
        })
    }

    /// Save the moments (`m.NAME`, `v.NAME`) to a safetensors file.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let mut map: HashMap<String, Tensor> = HashMap::new();
        for s in &self.slots {
            map.insert(format!("m.{}", s.name), s.m.clone());
            map.insert(format!("v.{}", s.name), s.v.clone());
        }
        candle_core::safetensors::save(&map, path)
            .with_context(|| format!("cannot write optimizer state {}", path.display()))
    }

    /// Restore moments saved by [`AdamW::save`] after `t` updates.
    pub fn load(&mut self, path: &Path, t: usize, device: &Device) -> anyhow::Result<()> {
        let map = candle_core::safetensors::load(path, device)
            .with_context(|| format!("cannot read optimizer state {}", path.display()))?;
        for s in self.slots.iter_mut() {
            for (key, dst) in [("m", &mut s.m), ("v", &mut s.v)] {
                let k = format!("{key}.{}", s.name);
                let Some(x) = map.get(&k) else {
                    bail!("optimizer state {} lacks {k}", path.display());
                };
                if x.dims() != s.var.dims() {
                    bail!("optimizer state {k} has shape {:?}", x.dims());
                }
                *dst = x.to_dtype(s.var.dtype())?;
            }
        }
        self.t = t;
        Ok(())
    }
}

/// Learning rate at `step` (0-based) of `total`: linear warm-up over the first
/// `warmup_frac` of the steps to `peak`, then linear decay to 0 at `total`.
pub fn lr_at(step: usize, total: usize, warmup_frac: f64, peak: f64) -> f64 {
    let total = total.max(1) as f64;
    let warm = (warmup_frac * total).ceil().max(1.0);
    let s = step as f64 + 1.0;
    if s <= warm {
        peak * s / warm
    } else {
        (peak * (total - s + 1.0) / (total - warm + 1.0)).max(0.0)
    }
}
