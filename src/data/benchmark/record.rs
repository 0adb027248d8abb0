//! What the writer and the statistics see of an image, whichever version generated
//! it; the canonical scene key; twin counts between splits.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::Label;
use crate::data::scene::Scene;

/// One image with its captions and entailment rows.
pub struct ImageRecord<'a> {
    pub image_id: &'a str,
    /// Difficulty tier of the image (v1: scene tier; v2: scene level).
    pub tier: u8,
    pub scene: &'a Scene,
    pub captions: &'a [String],
    pub ve: Vec<VeRecord<'a>>,
}

/// One entailment row.
pub struct VeRecord<'a> {
    pub uniq_id: &'a str,
    pub hypothesis: &'a str,
    pub premise: &'a str,
    pub label: Label,
    pub hyp_type: &'a str,
    /// Difficulty of this example (written to `meta_{split}.tsv`).
    pub tier: u8,
    /// `Some` in v2, where a question's difficulty is its own, not only its image's.
    pub difficulty: Option<u8>,
}

impl<'a> VeRecord<'a> {
    /// `[uniq_id, hypothesis, premise]`, the label, the type and the difficulty.
    pub fn new(
        [uniq_id, hypothesis, premise]: [&'a str; 3],
        label: Label,
        hyp_type: &'a str,
        tier: u8,
        difficulty: Option<u8>,
    ) -> VeRecord<'a> {
        VeRecord {
            uniq_id,
            hypothesis,
            premise,
            label,
            hyp_type,
            tier,
            difficulty,
        }
    }
}

/// The labels wanted of one image's hypotheses, in order: (E, N, N, C) when the scene has
/// an occluder (what hides behind it makes a question neutral), (E, C) without one;
/// occluders are in half of the scenes, so the three labels are balanced.
pub(super) fn wanted_labels(occluded: bool) -> &'static [Label] {
    if occluded {
        &[
            Label::Entailment,
            Label::Neutral,
            Label::Neutral,
            Label::Contradiction,
        ]
    } else {
        &[Label::Entailment, Label::Contradiction]
    }
}

/// An image of either benchmark version, as the writer needs it.
pub(super) trait ToRecord {
    fn record(&self) -> ImageRecord<'_>;
    /// The line of `scenes_{split}.jsonl` (v2), `None` for v1, which has no such file.
    fn scene_line(&self) -> Option<String>;
}

/// The canonical content key of a scene: the grid, the occluder and every visible
/// object (cell, size, colour, shape) in cell order. Backgrounds, noise, jitter and
/// distractor lines are left out, so two scenes with one key show the same thing.
pub fn scene_key(scene: &Scene) -> String {
    let mut objs: Vec<_> = scene
        .objects
        .iter()
        .map(|o| {
            (
                o.cell.1,
                o.cell.0,
                o.size.name(),
                o.color.name(),
                o.shape.name(),
            )
        })
        .collect();
    objs.sort();
    let mut key = format!("g{}", scene.grid);
    if let Some(o) = scene.occluder {
        key += &format!("|box {},{} {}x{}", o.col0, o.row0, o.cols, o.rows);
    }
    for (r, c, size, color, shape) in objs {
        key += &format!("|{c},{r} {size} {color} {shape}");
    }
    key
}

/// How many evaluation-split items have a verbatim twin in train.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TwinCounts {
    pub images: usize,
    /// Images whose canonical scene key also occurs in train.
    pub scenes_with_train_twin: usize,
    pub hypotheses: usize,
    /// Hypotheses whose text also occurs in train.
    pub hypotheses_in_train: usize,
    pub captions: usize,
    /// Reference captions whose text also occurs in train.
    pub captions_in_train: usize,
}

/// The content of the train split that twins are looked up in.
#[derive(Default)]
pub struct TrainContent {
    scenes: HashSet<String>,
    hypotheses: HashSet<String>,
    captions: HashSet<String>,
}

impl TrainContent {
    pub fn add(&mut self, r: &ImageRecord) {
        self.scenes.insert(scene_key(r.scene));
        self.hypotheses
            .extend(r.ve.iter().map(|v| v.hypothesis.to_string()));
        self.captions.extend(r.captions.iter().cloned());
    }

    pub fn count(&self, twins: &mut TwinCounts, r: &ImageRecord) {
        twins.images += 1;
        twins.scenes_with_train_twin += self.scenes.contains(&scene_key(r.scene)) as usize;
        for v in &r.ve {
            twins.hypotheses += 1;
            twins.hypotheses_in_train += self.hypotheses.contains(v.hypothesis) as usize;
        }
        for c in r.captions {
            twins.captions += 1;
            twins.captions_in_train += self.captions.contains(c) as usize;
        }
    }
}
