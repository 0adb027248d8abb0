//! Tasks on the procedural scenes: captioning and visual entailment, split
//! generation and summary statistics. See `docs/benchmark.md` for the scheme.
//!
//! By what it generates: `hypothesis` (entailment hypotheses and their labels),
//! `caption` (reference captions), `splits` (examples per image, the splits),
//! `stats` (summary statistics), `record` (what the writer sees; scene keys, twin
//! counts), `writer` (the TSV files), `v2` (benchmark v2: its scenes, questions, captions).

mod caption;
mod hypothesis;
mod record;
mod splits;
mod stats;
pub mod v2;
mod writer;

pub use crate::task::Label;
pub use caption::captions;
pub use hypothesis::{label, Desc, HypSpec, HypType, Pred, Relation};
pub use record::{scene_key, TwinCounts};
pub use splits::{
    image_id, image_seed, make_image_example, split_examples, ImageExample, Split, VeExample,
};
pub use stats::{summary_stats, SummaryStats};
pub use writer::{
    caption_file, generate, generate_version, meta_file, scenes_file, showcase, ve_file,
    GenerateOptions, GenerateReport, Showcase,
};

#[cfg(test)]
mod tests;
