//! Examples per image and the train / valid / test splits (disjoint seed streams).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::caption::captions;
use super::hypothesis::{hypothesis_with_label, pick_type, HypSpec, HypType};
use super::record::{wanted_labels, ImageRecord, ToRecord, VeRecord};
use super::Label;
use crate::data::scene::Scene;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VeExample {
    pub uniq_id: String,
    pub hypothesis: String,
    pub premise: String,
    pub label: Label,
    pub hyp_type: HypType,
    pub spec: HypSpec,
}

/// Everything generated for one image.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImageExample {
    pub image_id: String,
    pub seed: u64,
    pub tier: u8,
    pub scene: Scene,
    pub captions: Vec<String>,
    pub ve: Vec<VeExample>,
}

/// Generates the scene, captions and hypotheses of one image, deterministically.
///
/// Hypothesis labels as `wanted_labels` gives them.
pub fn make_image_example(image_id: &str, seed: u64, image_size: u32) -> ImageExample {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let tier = rng.random_range(0..3u8);
    let scene = Scene::generate(rng.random(), tier, image_size);
    let captions = captions(&scene, &mut rng);
    let wanted = wanted_labels(scene.occluder.is_some());
    let mut ve = Vec::new();
    for (k, &want) in wanted.iter().enumerate() {
        let first = pick_type(&mut rng, scene.occluder.is_some(), want);
        if let Some(spec) = hypothesis_with_label(&mut rng, &scene, want, first) {
            let variant = rng.random_range(0..spec.n_templates());
            let premise = captions[rng.random_range(0..captions.len())].clone();
            ve.push(VeExample {
                uniq_id: format!("{image_id}{k}"),
                hypothesis: spec.text(variant),
                premise,
                label: want,
                hyp_type: spec.hyp_type(),
                spec,
            });
        }
    }
    ImageExample {
        image_id: image_id.to_string(),
        seed,
        tier,
        scene,
        captions,
        ve,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Split {
    Train,
    Valid,
    Test,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Valid, Split::Test];
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Valid => "valid",
            Split::Test => "test",
        }
    }
    fn tag(self) -> u64 {
        match self {
            Split::Train => 1,
            Split::Valid => 2,
            Split::Test => 3,
        }
    }
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Seed of image `index` of `split`: the splits draw from disjoint seed streams.
pub fn image_seed(seed: u64, split: Split, index: u64) -> u64 {
    splitmix64(splitmix64(splitmix64(seed) ^ split.tag()) ^ index)
}

/// Numeric image id: the split in the leading digit, then the index.
pub fn image_id(split: Split, index: u64) -> String {
    format!("{}{:08}", split.tag(), index)
}

/// Lazily generates the images of one split.
pub fn split_examples(
    seed: u64,
    split: Split,
    n: usize,
    image_size: u32,
) -> impl Iterator<Item = ImageExample> {
    (0..n as u64).map(move |i| {
        make_image_example(&image_id(split, i), image_seed(seed, split, i), image_size)
    })
}

impl ToRecord for ImageExample {
    fn record(&self) -> ImageRecord<'_> {
        ImageRecord {
            image_id: &self.image_id,
            tier: self.tier,
            scene: &self.scene,
            captions: &self.captions,
            ve: self
                .ve
                .iter()
                .map(|v| {
                    let texts = [v.uniq_id.as_str(), &v.hypothesis, &v.premise];
                    VeRecord::new(texts, v.label, v.hyp_type.as_str(), self.tier, None)
                })
                .collect(),
        }
    }
    fn scene_line(&self) -> Option<String> {
        None
    }
}
