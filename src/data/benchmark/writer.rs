//! `generate`: the OFA-style TSV files of every split and `stats.json`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::splits::{split_examples, Split};
use super::stats::{StatsAccumulator, SummaryStats};
use crate::data::scene::{render, Scene};
use crate::data::tsv::{encode_png_base64, write_caption_row, write_ve_row};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenerateOptions {
    pub out_dir: PathBuf,
    pub seed: u64,
    pub n_train: usize,
    pub n_val: usize,
    pub n_test: usize,
    pub image_size: u32,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            out_dir: PathBuf::from("data/bench"),
            seed: 0,
            n_train: 5000,
            n_val: 200,
            n_test: 200,
            image_size: 64,
        }
    }
}

/// What `generate` wrote.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GenerateReport {
    pub files: Vec<PathBuf>,
    pub stats: BTreeMap<String, SummaryStats>,
}

/// File names inside the output directory.
pub fn ve_file(split: Split) -> String {
    format!("snli_ve_{}.tsv", split.name())
}
pub fn caption_file(split: Split) -> String {
    format!("caption_{}.tsv", split.name())
}
pub fn meta_file(split: Split) -> String {
    format!("meta_{}.tsv", split.name())
}

fn create(path: &Path) -> Result<BufWriter<File>> {
    Ok(BufWriter::new(
        File::create(path).with_context(|| format!("creating {}", path.display()))?,
    ))
}

/// Writes `snli_ve_{split}.tsv`, `caption_{split}.tsv` and `meta_{split}.tsv` for
/// train/valid/test, plus `stats.json`. Same options give identical bytes.
///
/// `meta_{split}.tsv` has columns `uniq_id, task, image_id, tier, hyp_type`
/// (hyp_type `-` for captions) so that evaluations can be broken down by difficulty.
pub fn generate(opts: &GenerateOptions) -> Result<GenerateReport> {
    std::fs::create_dir_all(&opts.out_dir)
        .with_context(|| format!("creating {}", opts.out_dir.display()))?;
    let mut files = Vec::new();
    let mut stats = BTreeMap::new();
    for (split, n) in [
        (Split::Train, opts.n_train),
        (Split::Valid, opts.n_val),
        (Split::Test, opts.n_test),
    ] {
        let ve_path = opts.out_dir.join(ve_file(split));
        let cap_path = opts.out_dir.join(caption_file(split));
        let meta_path = opts.out_dir.join(meta_file(split));
        let mut ve_w = create(&ve_path)?;
        let mut cap_w = create(&cap_path)?;
        let mut meta_w = create(&meta_path)?;
        let mut st = StatsAccumulator::default();
        for ex in split_examples(opts.seed, split, n, opts.image_size) {
            let b64 = encode_png_base64(&render(&ex.scene))?;
            for v in &ex.ve {
                write_ve_row(
                    &mut ve_w,
                    &v.uniq_id,
                    &ex.image_id,
                    &b64,
                    &v.hypothesis,
                    &v.premise,
                    v.label,
                )?;
                writeln!(
                    meta_w,
                    "{}\tve\t{}\t{}\t{}",
                    v.uniq_id,
                    ex.image_id,
                    ex.tier,
                    v.hyp_type.as_str()
                )?;
            }
            let objects = object_labels(&ex.scene);
            if split == Split::Train {
                for (k, c) in ex.captions.iter().enumerate() {
                    let id = format!("{}{k}", ex.image_id);
                    write_caption_row(
                        &mut cap_w,
                        &id,
                        &ex.image_id,
                        std::slice::from_ref(c),
                        &objects,
                        &b64,
                    )?;
                    writeln!(meta_w, "{id}\tcaption\t{}\t{}\t-", ex.image_id, ex.tier)?;
                }
            } else {
                write_caption_row(
                    &mut cap_w,
                    &ex.image_id,
                    &ex.image_id,
                    &ex.captions,
                    &objects,
                    &b64,
                )?;
                writeln!(
                    meta_w,
                    "{}\tcaption\t{}\t{}\t-",
                    ex.image_id, ex.image_id, ex.tier
                )?;
            }
            st.add(&ex);
        }
        for mut w in [ve_w, cap_w, meta_w] {
            w.flush()?;
        }
        files.extend([ve_path, cap_path, meta_path]);
        stats.insert(split.name().to_string(), st.finish());
    }
    let stats_path = opts.out_dir.join("stats.json");
    // The output directory is left out so that the bytes depend only on the content options.
    let json = serde_json::to_string_pretty(&serde_json::json!({
        "seed": opts.seed,
        "n_train": opts.n_train,
        "n_val": opts.n_val,
        "n_test": opts.n_test,
        "image_size": opts.image_size,
        "stats": &stats,
    }))?;
    std::fs::write(&stats_path, json + "\n")
        .with_context(|| format!("writing {}", stats_path.display()))?;
    files.push(stats_path);
    Ok(GenerateReport { files, stats })
}

/// OFA's `object_labels` column: visible objects joined with `&&`.
fn object_labels(scene: &Scene) -> String {
    scene
        .objects
        .iter()
        .map(|o| format!("{} {} {}", o.size.name(), o.color.name(), o.shape.name()))
        .collect::<Vec<_>>()
        .join("&&")
}
