//! Data: the project's procedural benchmark (scenes, captioning and visual entailment),
//! OFA-style TSV input/output, image preprocessing and tokenization.

pub mod benchmark;
pub mod coco;
pub mod label;
pub mod preprocess;
pub mod scene;
pub mod tokenizer;
pub mod tsv;

pub use benchmark::{
    generate, label, summary_stats, GenerateOptions, GenerateReport, HypSpec, HypType,
    ImageExample, Label, SummaryStats,
};
pub use scene::{render, Scene};
pub use tsv::{
    decode_base64_image, CaptionReader, CaptionRow, ImageLimits, TsvError, VeReader, VeRow,
};
