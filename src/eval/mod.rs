//! Evaluation utilities: captioning metrics (BLEU, CIDEr-D, ROUGE-L) matching
//! the COCO caption evaluation toolkit, and classification accuracy.

pub mod metrics;
