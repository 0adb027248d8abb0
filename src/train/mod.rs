//! Fine-tuning with MuE's layer-wise task loss on the decomposed encoder (design notes,
//! section 4): multi-task (captioning + visual entailment) batches formatted exactly as the
//! inference engine formats requests, AdamW with warm-up/linear decay and gradient
//! clipping, checkpoints with exact resume, and periodic validation.

pub mod data;
pub mod eval;
pub mod loss;
pub mod optim;
pub mod shards;
pub mod train_loop;

pub use eval::{entail_accuracy_dir, evaluate, EvalResult};
pub use loss::{layer_loss, task_loss, LossKind, LossOutput, Targets};
pub use optim::{lr_at, AdamW, AdamWParams};
pub use shards::{batch_loss, batch_loss_at, step_gradients, StepGrads, StepPlan, DEFAULT_SHARDS};
pub use train_loop::{
    bind_image_trunk, is_running_stat, load_state, load_weights_into, run_shards, sampled_depth,
    sampled_depths, train, varmap_tensors, EvalPoint, TrainOptions, TrainReport, TrainState,
};
