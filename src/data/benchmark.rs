//! Tasks on the procedural scenes: captioning and visual entailment, split
//! generation and summary statistics. See `docs/benchmark.md` for the scheme.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::scene::{render, Color, Object, Scene, Shape, Size, GRID};
use super::tsv::{encode_png_base64, write_caption_row, write_ve_row};
use crate::task::Label;

// ---------------------------------------------------------------------------
// Labels and hypothesis specifications
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum HypType {
    Presence,
    Counting,
    Attribute,
    Relation,
}

impl HypType {
    pub const ALL: [HypType; 4] = [
        HypType::Presence,
        HypType::Counting,
        HypType::Attribute,
        HypType::Relation,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            HypType::Presence => "presence",
            HypType::Counting => "counting",
            HypType::Attribute => "attribute",
            HypType::Relation => "relation",
        }
    }
}

/// A noun phrase: a conjunction of optional attributes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Desc {
    pub shape: Option<Shape>,
    pub color: Option<Color>,
    pub size: Option<Size>,
}

impl Desc {
    pub fn new(shape: Option<Shape>, color: Option<Color>, size: Option<Size>) -> Desc {
        Desc { shape, color, size }
    }
    pub fn matches(&self, o: &Object) -> bool {
        self.shape.is_none_or(|s| s == o.shape)
            && self.color.is_none_or(|c| c == o.color)
            && self.size.is_none_or(|s| s == o.size)
    }
    fn adjectives(&self) -> String {
        let mut w = Vec::new();
        if let Some(s) = self.size {
            w.push(s.name());
        }
        if let Some(c) = self.color {
            w.push(c.name());
        }
        w.join(" ")
    }
    /// "large red circle", "red shape", "shape".
    pub fn singular(&self) -> String {
        join_words(&self.adjectives(), self.shape.map_or("shape", |s| s.name()))
    }
    pub fn plural(&self) -> String {
        join_words(
            &self.adjectives(),
            self.shape.map_or("shapes", |s| s.plural()),
        )
    }
}

fn join_words(a: &str, b: &str) -> String {
    if a.is_empty() {
        b.to_string()
    } else {
        format!("{a} {b}")
    }
}

/// "a" / "an" + phrase.
fn with_article(phrase: &str) -> String {
    let an = phrase.starts_with(['a', 'e', 'i', 'o', 'u']);
    format!("{} {phrase}", if an { "an" } else { "a" })
}

fn number_word(n: usize) -> &'static str {
    [
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    ]
    .get(n)
    .copied()
    .unwrap_or("many")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Pred {
    Color(Color),
    Size(Size),
    Shape(Shape),
}

impl Pred {
    fn holds(&self, o: &Object) -> bool {
        match *self {
            Pred::Color(c) => o.color == c,
            Pred::Size(s) => o.size == s,
            Pred::Shape(s) => o.shape == s,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Relation {
    LeftOf,
    RightOf,
    Above,
    Below,
}

impl Relation {
    pub const ALL: [Relation; 4] = [
        Relation::LeftOf,
        Relation::RightOf,
        Relation::Above,
        Relation::Below,
    ];
    /// Does the relation hold between grid cells `(col, row)`?
    pub fn holds(self, a: (u32, u32), b: (u32, u32)) -> bool {
        match self {
            Relation::LeftOf => a.0 < b.0,
            Relation::RightOf => a.0 > b.0,
            Relation::Above => a.1 < b.1,
            Relation::Below => a.1 > b.1,
        }
    }
    pub fn phrase(self) -> &'static str {
        match self {
            Relation::LeftOf => "to the left of",
            Relation::RightOf => "to the right of",
            Relation::Above => "above",
            Relation::Below => "below",
        }
    }
}

/// The meaning of a hypothesis, from which both its text and its label derive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HypSpec {
    /// There is at least one object matching the description.
    Presence(Desc),
    /// There are exactly `n` objects matching the description.
    Count(Desc, usize),
    /// Every object matching the description has the property (and there is at least one).
    All(Desc, Pred),
    /// Some object matching the first description stands in the relation to some
    /// other object matching the second.
    Relation(Desc, Relation, Desc),
}

impl HypSpec {
    pub fn hyp_type(&self) -> HypType {
        match self {
            HypSpec::Presence(_) => HypType::Presence,
            HypSpec::Count(..) => HypType::Counting,
            HypSpec::All(..) => HypType::Attribute,
            HypSpec::Relation(..) => HypType::Relation,
        }
    }

    /// Number of surface templates for this spec.
    pub fn n_templates(&self) -> usize {
        match self {
            HypSpec::Presence(_) => 4,
            HypSpec::Count(..) => 3,
            HypSpec::All(..) => 3,
            HypSpec::Relation(..) => 3,
        }
    }

    /// Renders the hypothesis with template `variant` (taken modulo `n_templates`).
    pub fn text(&self, variant: usize) -> String {
        let v = variant % self.n_templates();
        match *self {
            HypSpec::Presence(d) => {
                let np = with_article(&d.singular());
                match v {
                    0 => format!("there is {np}"),
                    1 => format!("{np} is in the picture"),
                    2 => format!("the image contains {np}"),
                    _ => format!("i can see {np}"),
                }
            }
            HypSpec::Count(d, n) => {
                if n == 1 {
                    let s = d.singular();
                    match v {
                        0 => format!("there is exactly one {s}"),
                        1 => format!("the image shows exactly one {s}"),
                        _ => format!("there is only one {s} in the picture"),
                    }
                } else {
                    let p = d.plural();
                    let k = number_word(n);
                    match v {
                        0 => format!("there are {k} {p}"),
                        1 => format!("the image shows exactly {k} {p}"),
                        _ => format!("{k} {p} are in the picture"),
                    }
                }
            }
            HypSpec::All(d, p) => {
                let (pred_pl, pred_sg) = match p {
                    Pred::Color(c) => (c.name().to_string(), c.name().to_string()),
                    Pred::Size(s) => (s.name().to_string(), s.name().to_string()),
                    Pred::Shape(s) => (s.plural().to_string(), with_article(s.name())),
                };
                match v {
                    0 => format!("all the {} are {pred_pl}", d.plural()),
                    1 => format!("every {} is {pred_sg}", d.singular()),
                    _ => format!("each {} in the image is {pred_sg}", d.singular()),
                }
            }
            HypSpec::Relation(a, r, b) => {
                let a = with_article(&a.singular());
                let b = with_article(&b.singular());
                let r = r.phrase();
                match v {
                    0 => format!("there is {a} {r} {b}"),
                    1 => format!("{a} is {r} {b}"),
                    _ => format!("{a} appears {r} {b}"),
                }
            }
        }
    }
}

/// The label of a hypothesis about a scene, computed from the object list.
///
/// The image shows the visible objects; the occluder (if any) hides its cells, each
/// of which may hold any single object or nothing. A hypothesis is *entailed* if it
/// is true in every completion of the hidden cells, a *contradiction* if it is false
/// in every completion, and *neutral* if the image cannot decide it.
pub fn label(scene: &Scene, spec: &HypSpec) -> Label {
    let hidden: Vec<(u32, u32)> = scene.occluder.map(|o| o.cells()).unwrap_or_default();
    let cap = hidden.len();
    let vis = &scene.objects;
    match *spec {
        HypSpec::Presence(d) => {
            let v = vis.iter().any(|o| d.matches(o));
            Label::from_possible(v || cap > 0, !v)
        }
        HypSpec::Count(d, n) => {
            let v = vis.iter().filter(|o| d.matches(o)).count();
            // the total ranges over v ..= v + cap
            Label::from_possible(n >= v && n <= v + cap, v != n || cap > 0)
        }
        HypSpec::All(d, p) => {
            let counter = vis.iter().any(|o| d.matches(o) && !p.holds(o));
            let vd = vis.iter().filter(|o| d.matches(o)).count();
            // hidden cells can hold a `d` that satisfies `p` or one that does not
            // (both are satisfiable since `d` never constrains `p`'s attribute).
            let can_true = !counter && (vd > 0 || cap > 0);
            let can_false = counter || cap > 0 || vd == 0;
            Label::from_possible(can_true, can_false)
        }
        HypSpec::Relation(a, r, b) => {
            let visible_pair = vis.iter().enumerate().any(|(i, x)| {
                a.matches(x)
                    && vis
                        .iter()
                        .enumerate()
                        .any(|(j, y)| i != j && b.matches(y) && r.holds(x.cell, y.cell))
            });
            if visible_pair {
                return Label::Entailment;
            }
            let with_hidden = vis
                .iter()
                .filter(|x| a.matches(x))
                .any(|x| hidden.iter().any(|&h| r.holds(x.cell, h)))
                || vis
                    .iter()
                    .filter(|y| b.matches(y))
                    .any(|y| hidden.iter().any(|&h| r.holds(h, y.cell)))
                || hidden
                    .iter()
                    .any(|&h1| hidden.iter().any(|&h2| h1 != h2 && r.holds(h1, h2)));
            Label::from_possible(with_hidden, true)
        }
    }
}

// ---------------------------------------------------------------------------
// Captions
// ---------------------------------------------------------------------------

/// Groups visible objects by (colour, shape), in reading order.
fn groups(scene: &Scene) -> Vec<(Color, Shape, Vec<&Object>)> {
    let mut g: Vec<(Color, Shape, Vec<&Object>)> = Vec::new();
    for o in &scene.objects {
        if let Some(e) = g.iter_mut().find(|e| e.0 == o.color && e.1 == o.shape) {
            e.2.push(o);
        } else {
            g.push((o.color, o.shape, vec![o]));
        }
    }
    g
}

fn join_list(items: &[String]) -> String {
    match items.len() {
        0 => String::new(),
        1 => items[0].clone(),
        n => format!("{} and {}", items[..n - 1].join(", "), items[n - 1]),
    }
}

fn listing(scene: &Scene, with_sizes: bool) -> String {
    let items: Vec<String> = groups(scene)
        .iter()
        .map(|(c, s, objs)| {
            let size = if with_sizes && objs.iter().all(|o| o.size == objs[0].size) {
                Some(objs[0].size)
            } else {
                None
            };
            let d = Desc::new(Some(*s), Some(*c), size);
            if objs.len() == 1 {
                with_article(&d.singular())
            } else {
                format!("{} {}", number_word(objs.len()), d.plural())
            }
        })
        .collect();
    join_list(&items)
}

fn background_phrase(scene: &Scene) -> String {
    let c = scene.background.color.name();
    match scene.background.texture.name() {
        Some(t) => format!("a {t} {c} background"),
        None => format!("a {c} background"),
    }
}

fn region(cell: (u32, u32)) -> &'static str {
    let top = cell.1 < GRID / 2;
    let left = cell.0 < GRID / 2;
    match (top, left) {
        (true, true) => "top left",
        (true, false) => "top right",
        (false, true) => "bottom left",
        (false, false) => "bottom right",
    }
}

/// At least five reference captions, all true of the image, lower-case, no
/// trailing punctuation. Wording is varied with `rng`.
pub fn captions(scene: &Scene, rng: &mut impl Rng) -> Vec<String> {
    let bg = background_phrase(scene);
    let list_sz = listing(scene, true);
    let list = listing(scene, false);
    let n = scene.objects.len();
    let first_is_plural = groups(scene).first().is_some_and(|g| g.2.len() > 1);
    let mut caps = Vec::new();

    caps.push(list_sz.clone());
    caps.push(match rng.random_range(0..2) {
        0 => format!("{list} on {bg}"),
        _ => format!("{list_sz} in front of {bg}"),
    });
    let there = if first_is_plural {
        "there are"
    } else {
        "there is"
    };
    caps.push(match rng.random_range(0..3) {
        0 => format!("{there} {list_sz}"),
        1 => format!("the image shows {list}"),
        _ => format!("a picture of {list}"),
    });

    // A relation caption between two visible objects, or a position caption.
    let mut rel_cap = None;
    'outer: for x in &scene.objects {
        for y in &scene.objects {
            if std::ptr::eq(x, y) {
                continue;
            }
            for r in Relation::ALL {
                if r.holds(x.cell, y.cell) && rng.random_bool(0.5) {
                    let a = with_article(
                        &Desc::new(Some(x.shape), Some(x.color), Some(x.size)).singular(),
                    );
                    let b = with_article(&Desc::new(Some(y.shape), Some(y.color), None).singular());
                    rel_cap = Some(match rng.random_range(0..2) {
                        0 => format!("there is {a} {} {b}", r.phrase()),
                        _ => format!("{a} {} {b}", r.phrase()),
                    });
                    break 'outer;
                }
            }
        }
    }
    let o = &scene.objects[0];
    let pos_cap = format!(
        "{} in the {} of the image",
        with_article(&Desc::new(Some(o.shape), Some(o.color), None).singular()),
        region(o.cell)
    );
    caps.push(rel_cap.unwrap_or_else(|| {
        format!(
            "one {} shape",
            Desc::new(None, Some(o.color), Some(o.size)).adjectives()
        )
    }));

    // Counting / colour summary.
    let mut colors: Vec<Color> = scene.objects.iter().map(|o| o.color).collect();
    colors.sort();
    colors.dedup();
    if n == 1 {
        caps.push(format!(
            "a single {} on {bg}",
            Desc::new(Some(o.shape), Some(o.color), None).singular()
        ));
    } else {
        let color_names: Vec<String> = colors.iter().map(|c| c.name().to_string()).collect();
        caps.push(match rng.random_range(0..2) {
            0 => format!("{} shapes on {bg}", number_word(n)),
            _ => format!("{} {} shapes", number_word(n), join_list(&color_names)),
        });
    }
    caps.push(pos_cap);
    if let Some(occ) = scene.occluder {
        let box_name = if occ.capacity() > 1 {
            "a large striped box"
        } else {
            "a striped box"
        };
        caps.push(format!("{list} next to {box_name}"));
    } else {
        let color_names: Vec<String> = colors.iter().map(|c| c.name().to_string()).collect();
        caps.push(format!("{} shapes on {bg}", join_list(&color_names)));
    }
    let mut seen = std::collections::HashSet::new();
    caps.retain(|c| seen.insert(c.clone()));
    caps
}

// ---------------------------------------------------------------------------
// Hypotheses
// ---------------------------------------------------------------------------

fn random_desc(rng: &mut impl Rng, scene: &Scene) -> Desc {
    // Same attribute-inclusion probabilities for grounded and random phrases, so the
    // wording does not reveal which one was used.
    let grounded = !scene.objects.is_empty() && rng.random_bool(0.5);
    let (shape, color, size) = if grounded {
        let o = &scene.objects[rng.random_range(0..scene.objects.len())];
        (o.shape, o.color, o.size)
    } else {
        (
            Shape::ALL[rng.random_range(0..Shape::ALL.len())],
            Color::ALL[rng.random_range(0..Color::ALL.len())],
            Size::ALL[rng.random_range(0..2)],
        )
    };
    Desc {
        shape: Some(shape),
        color: if rng.random_bool(0.8) {
            Some(color)
        } else {
            None
        },
        size: if rng.random_bool(0.25) {
            Some(size)
        } else {
            None
        },
    }
}

fn propose(rng: &mut impl Rng, scene: &Scene, t: HypType) -> HypSpec {
    match t {
        HypType::Presence => HypSpec::Presence(random_desc(rng, scene)),
        HypType::Counting => {
            let d = random_desc(rng, scene);
            let v = scene.objects.iter().filter(|o| d.matches(o)).count();
            let n = if v > 0 && v <= 4 && rng.random_bool(0.4) {
                v
            } else {
                rng.random_range(1..=4)
            };
            HypSpec::Count(d, n)
        }
        HypType::Attribute => {
            let g = random_desc(rng, scene);
            let h = random_desc(rng, scene);
            match rng.random_range(0..5) {
                0..=2 => HypSpec::All(
                    Desc::new(g.shape, None, None),
                    Pred::Color(h.color.unwrap_or(Color::ALL[rng.random_range(0..7)])),
                ),
                3 => HypSpec::All(
                    Desc::new(g.shape, g.color, None),
                    Pred::Size(Size::ALL[rng.random_range(0..2)]),
                ),
                _ => HypSpec::All(
                    Desc::new(None, g.color.or(h.color), None),
                    Pred::Shape(h.shape.unwrap()),
                ),
            }
        }
        HypType::Relation => {
            let mut a = random_desc(rng, scene);
            let mut b = random_desc(rng, scene);
            a.size = None;
            b.size = None;
            HypSpec::Relation(a, Relation::ALL[rng.random_range(0..4)], b)
        }
    }
}

/// One visual-entailment example.
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

/// Finds a hypothesis with the wanted label, preferring hypothesis type `first`.
/// Chooses the hypothesis type for a wanted label so that, over the dataset, every
/// type gets each label about equally often (a text-only model that recognises the
/// type learns nothing). Some (type, label) pairs are impossible in some scenes:
/// with an occluder counting/attribute hypotheses are never entailed and presence is
/// never contradicted, so the other scenes make up for it. Returns an index into
/// `HypType::ALL` (presence, counting, attribute, relation).
fn pick_type(rng: &mut impl Rng, occluded: bool, want: Label) -> usize {
    let weights: [u32; 4] = match (occluded, want) {
        (false, Label::Entailment) => [0, 1, 1, 0],
        // relations need two objects: tier-0 scenes fall back to presence
        (true, Label::Entailment) => [1, 0, 0, 2],
        (_, Label::Neutral) => [1, 1, 1, 1],
        (false, Label::Contradiction) => [3, 1, 1, 1],
        (true, Label::Contradiction) => [0, 1, 1, 1],
    };
    let total: u32 = weights.iter().sum();
    let mut r = rng.random_range(0..total);
    for (i, &w) in weights.iter().enumerate() {
        if r < w {
            return i;
        }
        r -= w;
    }
    unreachable!()
}

fn hypothesis_with_label(
    rng: &mut impl Rng,
    scene: &Scene,
    want: Label,
    first: usize,
) -> Option<HypSpec> {
    for k in 0..HypType::ALL.len() {
        let t = HypType::ALL[(first + k) % HypType::ALL.len()];
        for _ in 0..200 {
            let spec = propose(rng, scene, t);
            if label(scene, &spec) == want {
                return Some(spec);
            }
        }
    }
    None
}

/// Generates the scene, captions and hypotheses of one image, deterministically.
///
/// Scenes with an occluder get hypotheses labelled (E, N, N, C), scenes without one
/// (E, C); occluders appear in half of the scenes, so the classes are balanced.
pub fn make_image_example(image_id: &str, seed: u64, image_size: u32) -> ImageExample {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let tier = rng.random_range(0..3u8);
    let scene = Scene::generate(rng.random(), tier, image_size);
    let captions = captions(&scene, &mut rng);
    let wanted: &[Label] = if scene.occluder.is_some() {
        &[
            Label::Entailment,
            Label::Neutral,
            Label::Neutral,
            Label::Contradiction,
        ]
    } else {
        &[Label::Entailment, Label::Contradiction]
    };
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

// ---------------------------------------------------------------------------
// Splits
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------

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
}

#[derive(Default)]
struct StatsAccumulator {
    s: SummaryStats,
    n_captions: usize,
    caption_words: usize,
    hyp_words: usize,
    objects: usize,
}

impl StatsAccumulator {
    fn add(&mut self, ex: &ImageExample) {
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
            *s.hyp_type_counts
                .entry(v.hyp_type.as_str().into())
                .or_default() += 1;
            *s.label_by_type
                .entry(v.hyp_type.as_str().into())
                .or_default()
                .entry(v.label.as_str().into())
                .or_default() += 1;
            self.hyp_words += v.hypothesis.split_whitespace().count();
        }
    }
    fn finish(mut self) -> SummaryStats {
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
        acc.add(ex);
    }
    acc.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::scene::Occluder;
    use crate::data::tsv::{CaptionReader, VeReader};
    use Color::*;
    use Shape::*;
    use Size::*;

    fn d(shape: Option<Shape>, color: Option<Color>) -> Desc {
        Desc::new(shape, color, None)
    }

    #[test]
    fn presence_and_attribute_labels() {
        let s = Scene::simple(
            64,
            &[(Circle, Red, Large, (0, 0)), (Square, Blue, Small, (3, 0))],
            None,
        );
        let p = |sh, c| label(&s, &HypSpec::Presence(d(Some(sh), Some(c))));
        assert_eq!(p(Circle, Red), Label::Entailment);
        assert_eq!(p(Circle, Blue), Label::Contradiction);
        assert_eq!(
            label(
                &s,
                &HypSpec::Presence(Desc::new(Some(Circle), None, Some(Small)))
            ),
            Label::Contradiction
        );
        assert_eq!(
            label(&s, &HypSpec::All(d(Some(Circle), None), Pred::Color(Red))),
            Label::Entailment
        );
        assert_eq!(
            label(&s, &HypSpec::All(d(Some(Square), None), Pred::Size(Large))),
            Label::Contradiction
        );
        assert_eq!(
            label(&s, &HypSpec::All(d(None, Some(Blue)), Pred::Shape(Square))),
            Label::Entailment
        );
        // presupposition failure: no triangles at all
        assert_eq!(
            label(&s, &HypSpec::All(d(Some(Triangle), None), Pred::Color(Red))),
            Label::Contradiction
        );
    }

    #[test]
    fn counting_labels() {
        let s = Scene::simple(
            64,
            &[
                (Triangle, Green, Small, (0, 1)),
                (Triangle, Green, Small, (1, 1)),
                (Triangle, Red, Small, (2, 1)),
            ],
            None,
        );
        let c = |desc, n| label(&s, &HypSpec::Count(desc, n));
        assert_eq!(c(d(Some(Triangle), Some(Green)), 2), Label::Entailment);
        assert_eq!(c(d(Some(Triangle), Some(Green)), 3), Label::Contradiction);
        assert_eq!(c(d(Some(Triangle), None), 3), Label::Entailment);
        assert_eq!(c(d(Some(Triangle), None), 1), Label::Contradiction);
        assert_eq!(c(d(Some(Circle), None), 1), Label::Contradiction);
    }

    #[test]
    fn relation_labels() {
        // red circle at column 0, blue square at column 2 of the same row
        let s = Scene::simple(
            64,
            &[(Circle, Red, Large, (0, 1)), (Square, Blue, Large, (2, 1))],
            None,
        );
        let r = |a, rel, b| label(&s, &HypSpec::Relation(a, rel, b));
        let rc = d(Some(Circle), Some(Red));
        let bs = d(Some(Square), Some(Blue));
        assert_eq!(r(rc, Relation::LeftOf, bs), Label::Entailment);
        assert_eq!(r(rc, Relation::RightOf, bs), Label::Contradiction);
        assert_eq!(r(bs, Relation::RightOf, rc), Label::Entailment);
        // same row: neither above nor below
        assert_eq!(r(rc, Relation::Above, bs), Label::Contradiction);
        // an object cannot be related to itself
        assert_eq!(
            r(rc, Relation::LeftOf, d(Some(Circle), None)),
            Label::Contradiction
        );
    }

    #[test]
    fn neutral_labels_come_from_the_occluder() {
        // occluder over the 2x1 cells (2,0),(3,0): room for two hidden objects
        let occ = Occluder {
            col0: 2,
            row0: 0,
            cols: 2,
            rows: 1,
        };
        let s = Scene::simple(
            64,
            &[(Circle, Red, Large, (0, 0)), (Cross, Yellow, Small, (1, 3))],
            Some(occ),
        );
        let l = |spec| label(&s, &spec);
        let rc = d(Some(Circle), Some(Red));
        let bs = d(Some(Square), Some(Blue));
        // could be behind the box
        assert_eq!(l(HypSpec::Presence(bs)), Label::Neutral);
        assert_eq!(l(HypSpec::Presence(rc)), Label::Entailment);
        // one visible, up to two more hidden
        assert_eq!(l(HypSpec::Count(rc, 1)), Label::Neutral);
        assert_eq!(l(HypSpec::Count(rc, 3)), Label::Neutral);
        assert_eq!(l(HypSpec::Count(rc, 4)), Label::Contradiction);
        // a hidden blue square would be right of the red circle ...
        assert_eq!(
            l(HypSpec::Relation(rc, Relation::LeftOf, bs)),
            Label::Neutral
        );
        // ... and, with two hidden cells side by side, even a hidden blue square left
        // of a hidden red circle is possible
        assert_eq!(
            l(HypSpec::Relation(bs, Relation::LeftOf, rc)),
            Label::Neutral
        );
        // but nothing hidden (row 0) can be above the red circle (row 0) or below the
        // cross (row 3)
        assert_eq!(
            l(HypSpec::Relation(bs, Relation::Above, rc)),
            Label::Contradiction
        );
        assert_eq!(
            l(HypSpec::Relation(bs, Relation::Below, d(Some(Cross), None))),
            Label::Contradiction
        );
        // all circles red: true of the visible one, a hidden one might be green
        assert_eq!(
            l(HypSpec::All(d(Some(Circle), None), Pred::Color(Red))),
            Label::Neutral
        );
        assert_eq!(
            l(HypSpec::All(d(Some(Cross), None), Pred::Size(Large))),
            Label::Contradiction
        );
        // two hidden cells side by side: "a square left of a diamond" is possible
        assert_eq!(
            l(HypSpec::Relation(
                d(Some(Square), None),
                Relation::LeftOf,
                d(Some(Diamond), None)
            )),
            Label::Neutral
        );
        assert_eq!(
            l(HypSpec::Relation(
                d(Some(Square), None),
                Relation::Above,
                d(Some(Diamond), None)
            )),
            Label::Contradiction
        );
    }

    #[test]
    fn hypothesis_text_examples() {
        let rc = d(Some(Circle), Some(Red));
        assert_eq!(
            HypSpec::Presence(Desc::new(Some(Circle), Some(Orange), None)).text(0),
            "there is an orange circle"
        );
        assert_eq!(HypSpec::Count(rc, 2).text(0), "there are two red circles");
        assert_eq!(
            HypSpec::Count(rc, 1).text(0),
            "there is exactly one red circle"
        );
        assert_eq!(
            HypSpec::Relation(rc, Relation::LeftOf, d(Some(Square), Some(Blue))).text(1),
            "a red circle is to the left of a blue square"
        );
        assert_eq!(
            HypSpec::All(d(None, Some(Red)), Pred::Shape(Circle)).text(0),
            "all the red shapes are circles"
        );
    }

    #[test]
    fn generated_examples_are_consistent_and_balanced() {
        let exs: Vec<ImageExample> = split_examples(7, Split::Train, 150, 64).collect();
        let st = summary_stats(&exs);
        assert!(st.n_ve > 300, "{}", st.n_ve);
        for l in Label::ALL {
            let frac = st.label_counts[l.as_str()] as f64 / st.n_ve as f64;
            assert!((frac - 1.0 / 3.0).abs() < 0.07, "{l:?} fraction {frac}");
        }
        for t in 0..3u8 {
            assert!(st.tier_counts[&t] > 25, "tier {t}: {:?}", st.tier_counts);
        }
        assert!(st.captions_per_image_min >= 5);
        for ex in &exs {
            for v in &ex.ve {
                assert_eq!(label(&ex.scene, &v.spec), v.label);
            }
            for c in &ex.captions {
                assert_eq!(c, &c.to_lowercase());
                assert!(!c.ends_with(['.', '!', '?', ' ']) && !c.is_empty(), "{c:?}");
            }
        }
        // each hypothesis type occurs with every label, roughly equally often
        for t in HypType::ALL {
            let m = &st.label_by_type[t.as_str()];
            assert_eq!(m.len(), 3, "{t:?}: {m:?}");
            let n: usize = m.values().sum();
            for (l, &c) in m {
                let frac = c as f64 / n as f64;
                assert!((frac - 1.0 / 3.0).abs() < 0.12, "{t:?} {l}: {frac} {m:?}");
            }
        }
    }

    #[test]
    fn generate_is_deterministic_and_readable() {
        let tmp = tempfile::tempdir().unwrap();
        let mk = |sub: &str, seed| GenerateOptions {
            out_dir: tmp.path().join(sub),
            seed,
            n_train: 6,
            n_val: 3,
            n_test: 3,
            image_size: 64,
        };
        let ra = generate(&mk("a", 1)).unwrap();
        generate(&mk("b", 1)).unwrap();
        generate(&mk("c", 2)).unwrap();
        let read = |sub: &str, f: &str| std::fs::read(tmp.path().join(sub).join(f)).unwrap();
        for split in Split::ALL {
            for f in [ve_file(split), caption_file(split), meta_file(split)] {
                assert!(
                    read("a", &f) == read("b", &f),
                    "{f} differs for the same seed"
                );
                assert!(
                    read("a", &f) != read("c", &f),
                    "{f} equal for different seeds"
                );
            }
        }
        assert!(read("a", "stats.json") == read("b", "stats.json"));
        assert_eq!(ra.files.len(), 10);

        // read back
        let f = std::io::BufReader::new(
            File::open(tmp.path().join("a").join(ve_file(Split::Test))).unwrap(),
        );
        let rows: Vec<_> = VeReader::new(f).collect::<Result<_, _>>().unwrap();
        assert_eq!(rows.len(), ra.stats["test"].n_ve);
        assert_eq!(rows[0].image.dimensions(), (64, 64));
        let f = std::io::BufReader::new(
            File::open(tmp.path().join("a").join(caption_file(Split::Valid))).unwrap(),
        );
        let rows: Vec<_> = CaptionReader::new(f).collect::<Result<_, _>>().unwrap();
        assert_eq!(rows.len(), 3);
        assert!(rows.iter().all(|r| r.captions.len() >= 5));
        let exs: Vec<_> = split_examples(1, Split::Valid, 3, 64).collect();
        assert_eq!(rows[0].captions, exs[0].captions);
        assert_eq!(rows[0].image, render(&exs[0].scene));
        let f = std::io::BufReader::new(
            File::open(tmp.path().join("a").join(caption_file(Split::Train))).unwrap(),
        );
        let n_train_rows = CaptionReader::new(f).count();
        assert_eq!(
            n_train_rows as f64,
            ra.stats["train"].captions_per_image_mean * 6.0
        );
    }

    /// A hypothesis-only model (naive Bayes on word unigrams and bigrams) must stay
    /// near chance: the label has to come from the image.
    #[test]
    fn hypothesis_only_baseline_is_near_chance() {
        fn feats(h: &str) -> Vec<String> {
            let w: Vec<&str> = h.split_whitespace().collect();
            let mut f: Vec<String> = w.iter().map(|s| s.to_string()).collect();
            f.extend(w.windows(2).map(|p| format!("{} {}", p[0], p[1])));
            f
        }
        let mut counts: BTreeMap<(String, Label), f64> = BTreeMap::new();
        let mut totals: BTreeMap<Label, f64> = BTreeMap::new();
        let mut prior: BTreeMap<Label, f64> = BTreeMap::new();
        let mut vocab = std::collections::HashSet::new();
        for ex in split_examples(3, Split::Train, 1500, 64) {
            for v in &ex.ve {
                *prior.entry(v.label).or_default() += 1.0;
                for f in feats(&v.hypothesis) {
                    *counts.entry((f.clone(), v.label)).or_default() += 1.0;
                    *totals.entry(v.label).or_default() += 1.0;
                    vocab.insert(f);
                }
            }
        }
        let v = vocab.len() as f64;
        let (mut correct, mut n) = (0usize, 0usize);
        for ex in split_examples(3, Split::Test, 400, 64) {
            for ve in &ex.ve {
                let best = Label::ALL
                    .iter()
                    .map(|&l| {
                        let mut lp = prior[&l].ln();
                        for f in feats(&ve.hypothesis) {
                            let c = counts.get(&(f, l)).copied().unwrap_or(0.0);
                            lp += ((c + 1.0) / (totals[&l] + v)).ln();
                        }
                        (lp, l)
                    })
                    .max_by(|a, b| a.0.total_cmp(&b.0))
                    .unwrap()
                    .1;
                correct += (best == ve.label) as usize;
                n += 1;
            }
        }
        let acc = correct as f64 / n as f64;
        println!("hypothesis-only naive Bayes accuracy: {acc:.3} on {n}");
        assert!(acc < 0.45, "hypothesis-only accuracy {acc}");
    }

    #[test]
    fn splits_use_disjoint_seeds() {
        let mut seen = std::collections::HashSet::new();
        for split in Split::ALL {
            for i in 0..1000 {
                assert!(seen.insert(image_seed(0, split, i)));
            }
        }
    }

    /// Prints the statistics quoted in docs/benchmark.md:
    /// `cargo test --release --lib data::benchmark::tests::print_default_stats -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn print_default_stats() {
        let o = GenerateOptions::default();
        let exs: Vec<ImageExample> =
            split_examples(o.seed, Split::Test, o.n_test, o.image_size).collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&summary_stats(&exs)).unwrap()
        );
        if let Ok(dir) = std::env::var("MUE_DUMP_DIR") {
            for ex in exs.iter().take(8) {
                render(&ex.scene)
                    .save(format!("{dir}/{}.png", ex.image_id))
                    .unwrap();
            }
        }
        for ex in exs.iter().take(3) {
            println!(
                "--- image {} tier {} occluder {:?}",
                ex.image_id, ex.tier, ex.scene.occluder
            );
            for c in &ex.captions {
                println!("  caption: {c}");
            }
            for v in &ex.ve {
                println!(
                    "  {:?} [{}]: {}",
                    v.label,
                    v.hyp_type.as_str(),
                    v.hypothesis
                );
            }
        }
    }
}
