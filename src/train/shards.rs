//! Data-parallel training steps: a batch is split into a fixed number of shards, each
//! shard's forward and backward pass runs on its own thread with single-threaded ops
//! inside, and the gradients are summed in shard order before one optimiser step.
//!
//! At d 128 the ops of one step are too small to split across threads (a second thread
//! mostly waits at candle's barriers); whole shards are not. The loss is the same function
//! as on the whole batch: each shard's targets are weighted by the whole batch's row count
//! ([`Targets::part_of_batch`](super::loss::Targets::part_of_batch)), so the shard losses
//! sum to the batch loss, up to float rounding (shards are padded to their own longest
//! row). The result depends on the number of shards, never on the number of threads: the
//! shards, the ops inside them and the order of the sums are the same on any count.

use super::data::{active_rows, make_shard, n_tokens, Batch, Dataset};
use super::loss::{task_loss, LossKind, LossOutput};
use crate::model::layers::{seed_dropout, Mode};
use crate::model::threads::SerialOps;
use crate::model::{Model, StreamDepths};
use anyhow::{bail, Result};
use candle_core::backprop::GradStore;
use candle_core::Device;
use std::ops::Range;

/// Shard count of a fresh run when none is given.
pub const DEFAULT_SHARDS: usize = 2;

/// Stack of a shard thread: candle walks the autograd graph recursively.
const SHARD_STACK: usize = 64 << 20;

/// How one step's batch is split and run.
#[derive(Debug, Clone, Copy)]
pub struct StepPlan {
    /// Shards of the batch (1: the whole batch in one pass, ops threaded as candle does).
    pub shards: usize,
    /// Threads the shards run on (at most `shards`; 1: one after the other).
    pub threads: usize,
    pub kind: LossKind,
    pub mode: Mode,
    /// Stream depths of the step ([`super::sampled_depths`]), the same in every shard.
    pub depths: StreamDepths,
    /// Dropout seed of the step; shard `k` draws from `dropout_seed_of_shard(seed, k)`.
    pub dropout_seed: u64,
    pub pad_id: u32,
    pub vocab_size: usize,
    pub caption_smoothing: f32,
}

/// What one step's forward and backward passes give.
pub struct StepGrads {
    /// Loss of the batch (sum of the shards' losses, in shard order).
    pub loss: f32,
    /// Loss of each decoder layer that carries one (summed over shards).
    pub per_layer: Vec<f32>,
    /// Gradients of the whole batch (summed over shards, in shard order).
    pub grads: GradStore,
    /// Encoder text + decoder tokens in the batch.
    pub n_tokens: usize,
}

/// Forward pass of a batch and its task loss.
pub fn batch_loss(model: &Model, batch: &Batch, kind: LossKind, mode: Mode) -> Result<LossOutput> {
    batch_loss_at(model, batch, kind, mode, StreamDepths::default())
}

/// [`batch_loss`] with the encoder streams stopped after `depths` layers.
pub fn batch_loss_at(
    model: &Model,
    batch: &Batch,
    kind: LossKind,
    mode: Mode,
    depths: StreamDepths,
) -> Result<LossOutput> {
    let enc = model.encode_to_depths(
        &batch.images,
        &batch.enc_ids,
        &batch.enc_padding,
        depths,
        mode,
    )?;
    let hidden = model.decode(&batch.dec_ids, Some(&batch.dec_padding), &enc, mode)?;
    Ok(task_loss(model, &hidden, &batch.targets, kind, mode)?)
}

/// Contiguous ranges of a `batch`-row batch split into `shards` parts whose sizes differ
/// by at most one (the first parts take the extra rows).
pub fn shard_ranges(batch: usize, shards: usize) -> Vec<Range<usize>> {
    let shards = shards.max(1);
    let (q, r) = (batch / shards, batch % shards);
    let mut start = 0;
    (0..shards)
        .map(|k| {
            let len = q + usize::from(k < r);
            let range = start..start + len;
            start += len;
            range
        })
        .collect()
}

/// Dropout seed of shard `k` of a step seeded `seed`: shard 0 keeps the step's seed, so a
/// one-shard step draws the masks of the unsharded trainer.
pub fn dropout_seed_of_shard(seed: u64, k: usize) -> u64 {
    seed ^ (k as u64).wrapping_mul(0xA24B_AED4_963E_E407)
}

/// Checks a shard count against the batch size.
pub fn check_shards(shards: usize, batch_size: usize) -> Result<()> {
    if shards == 0 {
        bail!("--shards must be at least 1");
    }
    if shards > batch_size {
        bail!(
            "--shards {shards} is more than the batch size {batch_size}: every shard needs a row"
        );
    }
    Ok(())
}

fn run_shard(
    model: &Model,
    ds: &Dataset,
    idx: &[usize],
    batch_active: Option<usize>,
    k: usize,
    plan: &StepPlan,
    device: &Device,
) -> Result<StepGrads> {
    seed_dropout(dropout_seed_of_shard(plan.dropout_seed, k));
    let batch = make_shard(
        ds,
        idx,
        batch_active,
        plan.pad_id,
        plan.vocab_size,
        plan.caption_smoothing,
        device,
    )?;
    let out = batch_loss_at(model, &batch, plan.kind, plan.mode, plan.depths)?;
    let loss = out.total.to_scalar::<f32>()?;
    let per_layer = out
        .per_layer
        .iter()
        .map(|t| t.to_scalar::<f32>())
        .collect::<candle_core::Result<_>>()?;
    let grads = out.total.backward()?;
    Ok(StepGrads {
        loss,
        per_layer,
        grads,
        n_tokens: batch.n_tokens,
    })
}

/// Forward and backward passes of the batch `idx` of `ds` as `plan` says. With one shard
/// this is the unsharded step (the whole batch, ops threaded by candle); with more, the
/// shards run on `plan.threads` threads with single-threaded ops ([`SerialOps`]).
pub fn step_gradients(
    model: &Model,
    ds: &Dataset,
    idx: &[usize],
    plan: &StepPlan,
    device: &Device,
) -> Result<StepGrads> {
    check_shards(plan.shards, idx.len())?;
    if plan.shards == 1 {
        return run_shard(model, ds, idx, None, 0, plan, device);
    }
    let active = Some(active_rows(ds, idx));
    let ranges = shard_ranges(idx.len(), plan.shards);
    let threads = plan.threads.clamp(1, plan.shards);
    let _serial = SerialOps::enter();
    // Thread `w` runs shards w, w + threads, ...; the calling thread is thread 0. A shard
    // without target rows adds nothing to the loss or the gradients: it is not run.
    let work = |w: usize| -> Vec<(usize, Result<Option<StepGrads>>)> {
        (w..plan.shards)
            .step_by(threads)
            .map(|k| {
                let part = &idx[ranges[k].clone()];
                if active_rows(ds, part) == 0 {
                    return (k, Ok(None));
                }
                (
                    k,
                    run_shard(model, ds, part, active, k, plan, device).map(Some),
                )
            })
            .collect()
    };
    let mut outs: Vec<Option<Result<Option<StepGrads>>>> = (0..plan.shards).map(|_| None).collect();
    std::thread::scope(|s| -> Result<()> {
        let handles = (1..threads)
            .map(|w| {
                std::thread::Builder::new()
                    .name(format!("mue-shard-{w}"))
                    .stack_size(SHARD_STACK)
                    .spawn_scoped(s, move || work(w))
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        for (k, r) in work(0) {
            outs[k] = Some(r);
        }
        for h in handles {
            let done = h
                .join()
                .map_err(|_| anyhow::anyhow!("a training shard thread panicked"))?;
            for (k, r) in done {
                outs[k] = Some(r);
            }
        }
        Ok(())
    })?;
    let mut total: Option<StepGrads> = None;
    for o in outs {
        let Some(s) = o.expect("every shard is run by one thread")? else {
            continue;
        };
        match total.as_mut() {
            None => total = Some(s),
            Some(t) => {
                t.loss += s.loss;
                for (a, b) in t.per_layer.iter_mut().zip(&s.per_layer) {
                    *a += b;
                }
                t.grads.extend(s.grads)?;
            }
        }
    }
    let Some(mut total) = total else {
        bail!("batch has no target positions");
    };
    total.n_tokens = n_tokens(ds, idx);
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_ranges_cover_the_batch_in_near_equal_parts() {
        assert_eq!(shard_ranges(32, 2), vec![0..16, 16..32]);
        assert_eq!(shard_ranges(4, 3), vec![0..2, 2..3, 3..4]);
        assert_eq!(shard_ranges(5, 1), vec![0..5]);
        for (b, s) in [(7, 3), (32, 5), (3, 3)] {
            let r = shard_ranges(b, s);
            assert_eq!(r.len(), s);
            assert_eq!(r.first().unwrap().start, 0);
            assert_eq!(r.last().unwrap().end, b);
            assert!(r.windows(2).all(|w| w[0].end == w[1].start));
            assert!(r.iter().all(|x| x.len() == b / s || x.len() == b / s + 1));
        }
        assert_eq!(dropout_seed_of_shard(9, 0), 9);
        assert_ne!(dropout_seed_of_shard(9, 1), 9);
        assert!(check_shards(0, 4).is_err() && check_shards(5, 4).is_err());
        assert!(check_shards(4, 4).is_ok());
    }
}
