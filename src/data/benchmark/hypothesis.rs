//! Entailment hypotheses: their meaning (`HypSpec`), text, label, and sampling.

use rand::Rng;
use serde::{Deserialize, Serialize};

use super::Label;
use crate::data::scene::{Color, Object, Scene, Shape, Size};

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
    pub(super) fn adjectives(&self) -> String {
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
pub(super) fn with_article(phrase: &str) -> String {
    let an = phrase.starts_with(['a', 'e', 'i', 'o', 'u']);
    format!("{} {phrase}", if an { "an" } else { "a" })
}

pub(super) fn number_word(n: usize) -> &'static str {
    [
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        "eleven", "twelve",
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
    pub fn holds(&self, o: &Object) -> bool {
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

pub(super) fn random_desc(rng: &mut impl Rng, scene: &Scene) -> Desc {
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

pub(super) fn propose(rng: &mut impl Rng, scene: &Scene, t: HypType) -> HypSpec {
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

/// Finds a hypothesis with the wanted label, preferring hypothesis type `first`.
/// Chooses the hypothesis type for a wanted label so that, over the dataset, every
/// type gets each label about equally often (a text-only model that recognises the
/// type learns nothing). Some (type, label) pairs are impossible in some scenes:
/// with an occluder counting/attribute hypotheses are never entailed and presence is
/// never contradicted, so the other scenes make up for it. Returns an index into
/// `HypType::ALL` (presence, counting, attribute, relation).
pub(super) fn pick_type(rng: &mut impl Rng, occluded: bool, want: Label) -> usize {
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

pub(super) fn hypothesis_with_label(
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
