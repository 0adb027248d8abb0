//! mue: multiple-exiting (MuE) inference for unified vision-language encoder-decoder models.

pub mod cli;
pub mod data;
pub mod eval;
pub mod exit;
pub mod generate;
pub mod model;
pub mod paths;
pub mod pipeline;
pub mod run_meta;
pub mod serve;
pub mod task;
pub mod train;
