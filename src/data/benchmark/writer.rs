//! `generate`: the OFA-style TSV files of every split and `stats.json`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::record::{ImageRecord, ToRecord, TrainContent, TwinCounts};
use super::splits::{split_examples, Split};
use super::stats::{StatsAccumulator, SummaryStats};
use super::v2;
use crate::data::scene::{render, Scene};
use crate::data::tsv::{encode_png_base64, write_caption_row, write_ve_row};
use crate::task::Label;

/// Options of `mue data generate`.
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
    /// valid / test -> how many of its scenes, hypotheses and captions have a twin in train.
    pub twins: BTreeMap<String, TwinCounts>,
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
/// v2 only: one JSON scene record per image (objects, occluder, key), for
/// per-example analyses and the independent label check in `tests/benchmark_v2.rs`.
pub fn scenes_file(split: Split) -> String {
    format!("scenes_{}.jsonl", split.name())
}

/// A file written under a temporary name and renamed into place by `finish`.
struct Output {
    path: PathBuf,
    tmp: PathBuf,
    w: BufWriter<File>,
}

impl Output {
    fn create(path: PathBuf) -> Result<Output> {
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        Ok(Output {
            path,
            tmp,
            w: BufWriter::new(f),
        })
    }
    fn finish(mut self) -> Result<PathBuf> {
        self.w.flush()?;
        std::fs::rename(&self.tmp, &self.path)
            .with_context(|| format!("renaming {}", self.tmp.display()))?;
        Ok(self.path)
    }
}

/// Writes `snli_ve_{split}.tsv`, `caption_{split}.tsv` and `meta_{split}.tsv` for
/// train/valid/test, plus `stats.json` (and `scenes_{split}.jsonl` in v2). Same
/// options give identical bytes.
///
/// `meta_{split}.tsv` has columns `uniq_id, task, image_id, tier, hyp_type`
/// (hyp_type `-` for captions) so that evaluations can be broken down by difficulty.
pub fn generate(opts: &GenerateOptions) -> Result<GenerateReport> {
    generate_version(opts, 1)
}

/// `generate` for benchmark `version` 1 (the original) or 2 (`v2`: OFA's cost
/// structure, compositional questions, splits disjoint by content).
pub fn generate_version(opts: &GenerateOptions, version: u32) -> Result<GenerateReport> {
    check_version(version, opts.image_size)?;
    std::fs::create_dir_all(&opts.out_dir)
        .with_context(|| format!("creating {}", opts.out_dir.display()))?;
    let mut files = Vec::new();
    let mut stats = BTreeMap::new();
    let mut twins = BTreeMap::new();
    let mut train = TrainContent::default();
    for (split, n) in [
        (Split::Train, opts.n_train),
        (Split::Valid, opts.n_val),
        (Split::Test, opts.n_test),
    ] {
        let mut tw = TwinCounts::default();
        let st = if version == 1 {
            let exs = split_examples(opts.seed, split, n, opts.image_size);
            write_split(opts, version, split, exs, &mut train, &mut tw, &mut files)?
        } else {
            let exs = v2::split_examples(opts.seed, split, n, opts.image_size);
            write_split(opts, version, split, exs, &mut train, &mut tw, &mut files)?
        };
        stats.insert(split.name().to_string(), st);
        if split != Split::Train {
            twins.insert(split.name().to_string(), tw);
        }
    }
    let stats_path = opts.out_dir.join("stats.json");
    // The output directory is left out so that the bytes depend only on the content options.
    let mut json = serde_json::json!({
        "seed": opts.seed,
        "n_train": opts.n_train,
        "n_val": opts.n_val,
        "n_test": opts.n_test,
        "image_size": opts.image_size,
        "stats": &stats,
    });
    // v1's stats.json stays as it was; v2 records its version and twin counts.
    if version == 2 {
        json["version"] = serde_json::json!(2);
        json["twins_with_train"] = serde_json::to_value(&twins)?;
    }
    let mut out = Output::create(stats_path)?;
    writeln!(out.w, "{}", serde_json::to_string_pretty(&json)?)?;
    files.push(out.finish()?);
    Ok(GenerateReport {
        files,
        stats,
        twins,
    })
}

fn check_version(version: u32, image_size: u32) -> Result<()> {
    if !(1..=2).contains(&version) {
        bail!("--version must be 1 or 2, got {version}");
    }
    if version == 2 && image_size < v2::MIN_IMAGE_SIZE {
        bail!(
            "benchmark v2 needs images of at least {} px (its 8x8 grid of 16 px cells), got {}",
            v2::MIN_IMAGE_SIZE,
            image_size
        );
    }
    if version == 1 && image_size < 32 {
        bail!("--image-size must be at least 32, got {}", image_size);
    }
    Ok(())
}

/// One image of a split as the demo shows it: the scene, one of its hypotheses with the
/// label, and the reference captions.
pub struct Showcase {
    pub scene: Scene,
    pub hypothesis: String,
    pub label: Label,
    pub captions: Vec<String>,
}

/// The first `n` images of `split` of benchmark `version`, the `i`-th with its
/// `i mod k`-th hypothesis (so the labels vary along the list).
pub fn showcase(
    version: u32,
    seed: u64,
    split: Split,
    n: usize,
    image_size: u32,
) -> Result<Vec<Showcase>> {
    check_version(version, image_size)?;
    fn pick<E: ToRecord>(examples: impl Iterator<Item = E>) -> Vec<Showcase> {
        let one = |(i, ex): (usize, E)| {
            let r = ex.record();
            let ve = &r.ve[i % r.ve.len()];
            Showcase {
                scene: r.scene.clone(),
                hypothesis: ve.hypothesis.to_string(),
                label: ve.label,
                captions: r.captions.to_vec(),
            }
        };
        examples.enumerate().map(one).collect()
    }
    Ok(match version {
        1 => pick(split_examples(seed, split, n, image_size)),
        _ => pick(v2::split_examples(seed, split, n, image_size)),
    })
}

fn write_split<E: ToRecord>(
    opts: &GenerateOptions,
    version: u32,
    split: Split,
    examples: impl Iterator<Item = E>,
    train: &mut TrainContent,
    twins: &mut TwinCounts,
    files: &mut Vec<PathBuf>,
) -> Result<SummaryStats> {
    let mut ve_w = Output::create(opts.out_dir.join(ve_file(split)))?;
    let mut cap_w = Output::create(opts.out_dir.join(caption_file(split)))?;
    let mut meta_w = Output::create(opts.out_dir.join(meta_file(split)))?;
    let mut scene_w = if version == 2 {
        Some(Output::create(opts.out_dir.join(scenes_file(split)))?)
    } else {
        None
    };
    let mut st = StatsAccumulator::default();
    for ex in examples {
        let r = ex.record();
        write_image(&r, split, version, &mut ve_w.w, &mut cap_w.w, &mut meta_w.w)?;
        if let (Some(w), Some(line)) = (scene_w.as_mut(), ex.scene_line()) {
            writeln!(w.w, "{line}")?;
        }
        if split == Split::Train {
            train.add(&r);
        } else {
            train.count(twins, &r);
        }
        st.add(&r);
    }
    for out in [Some(ve_w), Some(cap_w), Some(meta_w), scene_w]
        .into_iter()
        .flatten()
    {
        files.push(out.finish()?);
    }
    Ok(st.finish())
}

/// The rows of one image: entailment rows, captions (one row per caption in train, all
/// references in one row elsewhere) and their metadata.
fn write_image(
    ex: &ImageRecord,
    split: Split,
    version: u32,
    ve_w: &mut impl Write,
    cap_w: &mut impl Write,
    meta_w: &mut impl Write,
) -> Result<()> {
    let b64 = encode_png_base64(&render(ex.scene))?;
    for v in &ex.ve {
        write_ve_row(
            ve_w,
            v.uniq_id,
            ex.image_id,
            &b64,
            v.hypothesis,
            v.premise,
            v.label,
        )?;
        writeln!(
            meta_w,
            "{}\tve\t{}\t{}\t{}",
            v.uniq_id, ex.image_id, v.tier, v.hyp_type
        )?;
    }
    let objects = object_labels(ex.scene);
    // v1 writes a training image's captions one row each; v2 all in one row, as in
    // valid / test (the training reader takes either), which keeps the files a quarter
    // of the size.
    if split == Split::Train && version == 1 {
        for (k, c) in ex.captions.iter().enumerate() {
            let id = format!("{}{k}", ex.image_id);
            write_caption_row(
                cap_w,
                &id,
                ex.image_id,
                std::slice::from_ref(c),
                &objects,
                &b64,
            )?;
            writeln!(meta_w, "{id}\tcaption\t{}\t{}\t-", ex.image_id, ex.tier)?;
        }
    } else {
        write_caption_row(cap_w, ex.image_id, ex.image_id, ex.captions, &objects, &b64)?;
        writeln!(
            meta_w,
            "{}\tcaption\t{}\t{}\t-",
            ex.image_id, ex.image_id, ex.tier
        )?;
    }
    Ok(())
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
