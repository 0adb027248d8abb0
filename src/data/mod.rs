//! The project's procedural vision-language benchmark (scenes, captioning and
//! visual entailment tasks) and OFA-style TSV input/output.

pub mod benchmark;
pub mod scene;
pub mod tsv;

pub use benchmark::{
    generate, label, summary_stats, GenerateOptions, GenerateReport, HypSpec, HypType,
    ImageExample, Label, SummaryStats,
};
pub use scene::{render, Scene};
pub use tsv::{
    decode_base64_image, CaptionReader, CaptionRow, ImageLimits, TsvError, VeReader, VeRow,
};
