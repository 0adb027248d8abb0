//! Benchmark v2 (`mue data generate --version 2`): a benchmark on which depth and
//! adaptivity matter (issue 23).
//!
//! - OFA's cost structure: 128 px images on an 8x8 grid, 64 patches of 16 px, so
//!   image tokens are most of the encoder; hypotheses of 6-20 words.
//! - Compositional questions (`question`): counting under occlusion, comparisons,
//!   relations, attributes of the n-th object, negation; near-miss descriptions and
//!   clutter (distractor lines, noise, textures) as distractors.
//! - A difficulty mix inside every split: scene levels 0-3 (`scene`) and question
//!   levels 0-3; an example's difficulty (0 trivial ..= 3 hard) bands their sum
//!   (0-1 trivial, 2 easy, 3-4 medium, 5-6 hard; about 15/23/47/15%), written in the
//!   tier column of `meta_{split}.tsv`.
//! - No content leakage: a scene's split is a hash of its canonical key (grid,
//!   occluder, every object's cell, size, colour, shape), so no scene of test occurs
//!   in train; every hypothesis and caption text belongs, by a hash of the text, to
//!   train or to the evaluation splits, so none is repeated verbatim between them.

mod caption;
mod question;
mod scene;
mod weights;

pub use caption::{candidates as caption_candidates, region};
pub use question::{label, Cmp, Kind, Question, TYPES};
pub use scene::{generate_scene, GRID2, LEVELS};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::record::{scene_key, wanted_labels, ImageRecord, ToRecord, VeRecord};
use super::splits::{image_id, image_seed, Split};
use super::Label;
use crate::data::scene::Scene;

/// Example difficulty from scene level + question level.
const DIFFICULTY: [u8; 7] = [0, 0, 1, 2, 2, 3, 3];

/// Smallest image side: 16 px per cell of the 8x8 grid.
pub const MIN_IMAGE_SIZE: u32 = 128;
/// Default sizes of `mue data generate --version 2`: 30,000 training images give
/// about 90,000 questions and 200,000 captions, each seen a few times in a 2.5 h run.
pub const DEFAULT_TRAIN: usize = 30_000;
pub const DEFAULT_VALID: usize = 2_000;
pub const DEFAULT_TEST: usize = 2_000;

/// Stable 64-bit FNV-1a hash, finished with splitmix64 (the split of a scene or text
/// must not depend on the Rust version's hasher).
pub fn stable_hash(salt: &str, s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in salt.bytes().chain([0u8]).chain(s.bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^ (h >> 31)
}

/// The split a scene belongs to, from its canonical key: 80% train, 10% valid, 10% test.
pub fn scene_split(scene: &Scene) -> Split {
    match stable_hash("scene", &scene_key(scene)) % 100 {
        0..=79 => Split::Train,
        80..=89 => Split::Valid,
        _ => Split::Test,
    }
}

/// Whether a hypothesis or caption text may occur in `split`: every text belongs to
/// train or to the evaluation splits (valid and test), half and half.
pub fn text_allowed(split: Split, text: &str) -> bool {
    let eval = stable_hash("text", text) % 2 == 1;
    eval == (split != Split::Train)
}

/// One v2 entailment example.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VeExample {
    pub uniq_id: String,
    pub hypothesis: String,
    pub premise: String,
    pub label: Label,
    pub question: Question,
    /// 0 (trivial) ..= 3 (hard).
    pub difficulty: u8,
}

/// Everything generated for one v2 image.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImageExample {
    pub image_id: String,
    /// Scene level 0 (trivial) ..= 3 (hard).
    pub level: u8,
    pub scene: Scene,
    pub captions: Vec<String>,
    pub ve: Vec<VeExample>,
}

/// Generates image `image_id` of `split` from `seed`, deterministically: scenes are
/// drawn until one belongs to the split (by its key) and keeps enough captions of the
/// split's half (5 references in valid / test, 2 in train).
pub fn make_image_example(
    image_id: &str,
    split: Split,
    seed: u64,
    image_size: u32,
) -> ImageExample {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let min_captions = if split == Split::Train { 2 } else { 5 };
    loop {
        let level = rng.random_range(0..LEVELS);
        let scene = generate_scene(&mut rng, level, image_size);
        if scene_split(&scene) != split {
            continue;
        }
        let mut captions = caption_candidates(&scene, &mut rng);
        captions.retain(|c| text_allowed(split, c));
        if captions.len() < min_captions {
            continue;
        }
        let wanted = wanted_labels(scene.occluder.is_some());
        let mut ve = Vec::new();
        for (k, &want) in wanted.iter().enumerate() {
            let allowed = |t: &str| text_allowed(split, t);
            if let Some((q, text)) = question::question_with_label(&mut rng, &scene, want, allowed)
            {
                ve.push(VeExample {
                    uniq_id: format!("{image_id}{k}"),
                    hypothesis: text,
                    premise: captions[rng.random_range(0..captions.len())].clone(),
                    label: want,
                    difficulty: DIFFICULTY[(level + q.level()) as usize],
                    question: q,
                });
            }
        }
        return ImageExample {
            image_id: image_id.to_string(),
            level,
            scene,
            captions,
            ve,
        };
    }
}

/// Lazily generates the images of one v2 split (seed streams apart from v1's).
pub fn split_examples(
    seed: u64,
    split: Split,
    n: usize,
    image_size: u32,
) -> impl Iterator<Item = ImageExample> {
    let seed = seed ^ 0x7632_5f62_656e_6368; // "v2_bench"
    (0..n as u64).map(move |i| {
        make_image_example(
            &image_id(split, i),
            split,
            image_seed(seed, split, i),
            image_size,
        )
    })
}

impl ToRecord for ImageExample {
    fn record(&self) -> ImageRecord<'_> {
        // A v2 question carries its own difficulty, beside its image's level.
        let ve = self.ve.iter().map(|v| {
            let texts = [v.uniq_id.as_str(), &v.hypothesis, &v.premise];
            let (ty, d) = (v.question.type_name(), v.difficulty);
            VeRecord::new(texts, v.label, ty, d, Some(d))
        });
        ImageRecord {
            image_id: &self.image_id,
            tier: self.level,
            scene: &self.scene,
            captions: &self.captions,
            ve: ve.collect(),
        }
    }

    /// `{"image_id", "level", "key", "grid", "occluder": [col0, row0, cols, rows] | null,
    /// "background": [colour, texture], "objects": [[col, row, size, colour, shape], ...]}`.
    fn scene_line(&self) -> Option<String> {
        let s = &self.scene;
        let objects: Vec<_> = s
            .objects
            .iter()
            .map(|o| {
                serde_json::json!([
                    o.cell.0,
                    o.cell.1,
                    o.size.name(),
                    o.color.name(),
                    o.shape.name()
                ])
            })
            .collect();
        let line = serde_json::json!({
            "image_id": self.image_id,
            "level": self.level,
            "key": scene_key(s),
            "grid": s.grid,
            "occluder": s.occluder.map(|o| [o.col0, o.row0, o.cols, o.rows]),
            "background": [s.background.color.name(), s.background.texture.name().unwrap_or("plain")],
            "objects": objects,
        });
        Some(line.to_string())
    }
}
