//! Summary statistics: label balance, tier mix, caption and hypothesis lengths.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::record::{ImageRecord, ToRecord};
use super::splits::ImageExample;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SummaryStats {
    pub n_images: usize,
    pub n_ve: usize,
    pub label_counts: BTreeMap<String, usize>,
    pub hyp_type_counts: BTreeMap<String, usize>,
    /// hyp_type -> label -> count
    pub label_by_type: BTreeMap<String, BTreeMap<String, usize>>,
    /// tier -> number of images
    pub tier_counts: BTreeMap<u8, usize>,
    pub images_with_occluder: usize,
    pub captions_per_image_min: usize,
    pub captions_per_image_max: usize,
    pub captions_per_image_mean: f64,
    pub mean_caption_words: f64,
    pub mean_hypothesis_words: f64,
    pub mean_objects_per_image: f64,
    /// v2: difficulty (0 trivial ..= 3 hard) -> number of entailment examples.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ve_difficulty_counts: BTreeMap<u8, usize>,
}

#[derive(Default)]
pub(super) struct StatsAccumulator {
    s: SummaryStats,
    n_captions: usize,
    caption_words: usize,
    hyp_words: usize,
    objects: usize,
}

impl StatsAccumulator {
    pub(super) fn add(&mut self, ex: &ImageRecord) {
        let s = &mut self.s;
        s.captions_per_image_min = if s.n_images == 0 {
            ex.captions.len()
        } else {
            s.captions_per_image_min.min(ex.captions.len())
        };
        s.captions_per_image_max = s.captions_per_image_max.max(ex.captions.len());
        s.n_images += 1;
        *s.tier_counts.entry(ex.tier).or_default() += 1;
        s.images_with_occluder += ex.scene.occluder.is_some() as usize;
        self.objects += ex.scene.objects.len();
        self.n_captions += ex.captions.len();
        self.caption_words += ex
            .captions
            .iter()
            .map(|c| c.split_whitespace().count())
            .sum::<usize>();
        for v in &ex.ve {
            s.n_ve += 1;
            *s.label_counts.entry(v.label.as_str().into()).or_default() += 1;
            if let Some(d) = v.difficulty {
                *s.ve_difficulty_counts.entry(d).or_default() += 1;
            }
            *s.hyp_type_counts.entry(v.hyp_type.into()).or_default() += 1;
            *s.label_by_type
                .entry(v.hyp_type.into())
                .or_default()
                .entry(v.label.as_str().into())
                .or_default() += 1;
            self.hyp_words += v.hypothesis.split_whitespace().count();
        }
    }
    pub(super) fn finish(mut self) -> SummaryStats {
        let div = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        self.s.captions_per_image_mean = div(self.n_captions, self.s.n_images);
        self.s.mean_caption_words = div(self.caption_words, self.n_captions);
        self.s.mean_hypothesis_words = div(self.hyp_words, self.s.n_ve);
        self.s.mean_objects_per_image = div(self.objects, self.s.n_images);
        self.s
    }
}

/// Summary statistics of a set of generated images (label balance, tier mix,
/// captions per image, mean lengths).
pub fn summary_stats<'a>(examples: impl IntoIterator<Item = &'a ImageExample>) -> SummaryStats {
    let mut acc = StatsAccumulator::default();
    for ex in examples {
        acc.add(&ex.record());
    }
    acc.finish()
}
