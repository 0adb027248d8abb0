//! Tasks on the procedural scenes: captioning and visual entailment, split
//! generation and summary statistics. See `docs/benchmark.md` for the scheme.
//!
//! By what it generates: `hypothesis` (entailment hypotheses and their labels),
//! `caption` (reference captions), `splits` (examples per image, the splits),
//! `stats` (summary statistics), `writer` (the TSV files).

mod caption;
mod hypothesis;
mod splits;
mod stats;
mod writer;

pub use super::label::Label;
pub use caption::captions;
pub use hypothesis::{label, Desc, HypSpec, HypType, Pred, Relation};
pub use splits::{
    image_id, image_seed, make_image_example, split_examples, ImageExample, Split, VeExample,
};
pub use stats::{summary_stats, SummaryStats};
pub use writer::{caption_file, generate, meta_file, ve_file, GenerateOptions, GenerateReport};

#[cfg(test)]
mod tests;
