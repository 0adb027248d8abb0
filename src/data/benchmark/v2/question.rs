//! v2 entailment questions: compositions that need more than spotting one object
//! (counting under occlusion, comparisons, relations, the n-th object in reading
//! order, negation), their text, their label, and how they are sampled.

use rand::Rng;
use serde::{Deserialize, Serialize};

use super::super::hypothesis::{number_word, with_article, Desc, Pred, Relation};
use super::super::Label;
use crate::data::scene::{Color, Object, Scene, Shape, Size};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Cmp {
    Exactly,
    AtLeast,
    FewerThan,
}

/// What a question asserts about the complete scene (visible and hidden cells).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// At least one object matches.
    Presence(Desc),
    /// The number of matching objects compares with `n`.
    Count(Desc, Cmp, usize),
    /// There is a matching object and every one has the property.
    All(Desc, Pred),
    /// Some object matching the first description stands in the relation to another
    /// matching the second.
    Relation(Desc, Relation, Desc),
    /// The `k`-th (1-based) matching object in reading order (row by row from the top
    /// left) exists and has the property.
    Nth(usize, Desc, Pred),
    /// More objects match the first description than the second.
    More(Desc, Desc),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Question {
    pub kind: Kind,
    pub negated: bool,
}

/// Hypothesis types of v2 (the `hyp_type` column of `meta_{split}.tsv`).
pub const TYPES: [&str; 7] = [
    "presence",
    "counting",
    "attribute",
    "relation",
    "nth",
    "comparison",
    "negation",
];

fn ordinal(k: usize) -> &'static str {
    ["first", "second", "third", "fourth"][k - 1]
}

fn pred_text(p: Pred) -> String {
    match p {
        Pred::Color(c) => c.name().to_string(),
        Pred::Size(s) => s.name().to_string(),
        Pred::Shape(s) => with_article(s.name()),
    }
}

impl Question {
    pub fn type_name(&self) -> &'static str {
        if self.negated {
            return "negation";
        }
        match self.kind {
            Kind::Presence(_) => "presence",
            Kind::Count(..) => "counting",
            Kind::All(..) => "attribute",
            Kind::Relation(..) => "relation",
            Kind::Nth(..) => "nth",
            Kind::More(..) => "comparison",
        }
    }

    /// How many steps of composition the question needs: 0 (spot one object) ..= 3.
    pub fn level(&self) -> u8 {
        let base = match self.kind {
            Kind::Presence(_) => 0,
            Kind::Count(..) | Kind::All(..) => 1,
            Kind::Relation(..) | Kind::Nth(..) | Kind::More(..) => 2,
        };
        (base + self.negated as u8).min(3)
    }

    pub fn text(&self) -> String {
        let inner = match self.kind {
            Kind::Presence(d) if self.negated => {
                return format!("there is no {} in the picture", d.singular())
            }
            Kind::Presence(d) => format!("there is {} in the picture", with_article(&d.singular())),
            Kind::Count(d, Cmp::Exactly, 1) => {
                format!("there is exactly one {} in the picture", d.singular())
            }
            Kind::Count(d, cmp, n) => {
                let c = match cmp {
                    Cmp::Exactly => "exactly",
                    Cmp::AtLeast => "at least",
                    Cmp::FewerThan => "fewer than",
                };
                format!(
                    "there are {c} {} {} in the picture",
                    number_word(n),
                    d.plural()
                )
            }
            Kind::All(d, p) => {
                format!("every {} in the picture is {}", d.singular(), pred_text(p))
            }
            Kind::Relation(a, r, b) => format!(
                "there is {} {} {}",
                with_article(&a.singular()),
                r.phrase(),
                with_article(&b.singular())
            ),
            Kind::Nth(k, d, p) => format!(
                "counting row by row from the top left, the {} {} is {}",
                ordinal(k),
                d.singular(),
                pred_text(p)
            ),
            Kind::More(a, b) => format!(
                "there are more {} than {} in the picture",
                a.plural(),
                b.plural()
            ),
        };
        if self.negated {
            format!("it is not true that {inner}")
        } else {
            inner
        }
    }

    /// Is the question true of a complete world (every object, none hidden)?
    pub fn holds(&self, world: &[Object]) -> bool {
        let count = |d: &Desc| world.iter().filter(|o| d.matches(o)).count();
        let v = match self.kind {
            Kind::Presence(d) => count(&d) > 0,
            Kind::Count(d, cmp, n) => {
                let k = count(&d);
                match cmp {
                    Cmp::Exactly => k == n,
                    Cmp::AtLeast => k >= n,
                    Cmp::FewerThan => k < n,
                }
            }
            Kind::All(d, p) => {
                count(&d) > 0 && world.iter().filter(|o| d.matches(o)).all(|o| p.holds(o))
            }
            Kind::Relation(a, r, b) => world.iter().enumerate().any(|(i, x)| {
                a.matches(x)
                    && world
                        .iter()
                        .enumerate()
                        .any(|(j, y)| i != j && b.matches(y) && r.holds(x.cell, y.cell))
            }),
            Kind::Nth(k, d, p) => {
                let mut m: Vec<&Object> = world.iter().filter(|o| d.matches(o)).collect();
                m.sort_by_key(|o| (o.cell.1, o.cell.0));
                m.get(k - 1).is_some_and(|o| p.holds(o))
            }
            Kind::More(a, b) => count(&a) > count(&b),
        };
        v != self.negated
    }

    fn descs_and_pred(&self) -> (Vec<Desc>, Option<Pred>) {
        match self.kind {
            Kind::Presence(d) | Kind::Count(d, ..) => (vec![d], None),
            Kind::All(d, p) | Kind::Nth(_, d, p) => (vec![d], Some(p)),
            Kind::Relation(a, _, b) | Kind::More(a, b) => (vec![a, b], None),
        }
    }

    /// What a hidden cell may hold, up to what the question can tell apart: every
    /// shape and colour it names plus one it does not, both sizes if it names one.
    fn hidden_kinds(&self) -> Vec<(Shape, Color, Size)> {
        let (descs, pred) = self.descs_and_pred();
        let mut shapes: Vec<Shape> = descs.iter().filter_map(|d| d.shape).collect();
        let mut colors: Vec<Color> = descs.iter().filter_map(|d| d.color).collect();
        let mut sized = descs.iter().any(|d| d.size.is_some());
        match pred {
            Some(Pred::Shape(s)) => shapes.push(s),
            Some(Pred::Color(c)) => colors.push(c),
            Some(Pred::Size(_)) => sized = true,
            None => {}
        }
        if let Some(&s) = Shape::ALL.iter().find(|s| !shapes.contains(s)) {
            shapes.push(s);
        }
        if let Some(&c) = Color::ALL.iter().find(|c| !colors.contains(c)) {
            colors.push(c);
        }
        shapes.dedup();
        colors.dedup();
        let sizes: &[Size] = if sized { &Size::ALL } else { &[Size::Small] };
        let mut out = Vec::new();
        for &s in &shapes {
            for &c in &colors {
                for &z in sizes {
                    if !out.contains(&(s, c, z)) {
                        out.push((s, c, z));
                    }
                }
            }
        }
        out
    }
}

/// The label of a question about a scene. Each occluded cell may hold any one object
/// or nothing: *entailment* if the question is true in every such completion,
/// *contradiction* if false in every one, *neutral* otherwise.
pub fn label(scene: &Scene, q: &Question) -> Label {
    let hidden = scene.occluder.map(|o| o.cells()).unwrap_or_default();
    let kinds = q.hidden_kinds();
    let options = kinds.len() + 1; // + empty
    let mut world = scene.objects.clone();
    let (mut can_true, mut can_false) = (false, false);
    for code in 0..options.pow(hidden.len() as u32) {
        world.truncate(scene.objects.len());
        let mut c = code;
        for &cell in &hidden {
            let k = c % options;
            c /= options;
            if k > 0 {
                let (shape, color, size) = kinds[k - 1];
                world.push(Scene::make_object_in(
                    scene.grid,
                    scene.image_size,
                    shape,
                    color,
                    size,
                    cell,
                    (0.0, 0.0),
                ));
            }
        }
        if q.holds(&world) {
            can_true = true;
        } else {
            can_false = true;
        }
        if can_true && can_false {
            break;
        }
    }
    Label::from_possible(can_true, can_false)
}

/// A noun phrase about the scene: a visible object's (40%), a near miss that changes
/// one of its attributes (30%: the distractors a model must tell apart), or a random one.
fn desc(rng: &mut impl Rng, scene: &Scene) -> Desc {
    let random_kind = |rng: &mut dyn rand::RngCore| {
        (
            Shape::ALL[rng.random_range(0..Shape::ALL.len())],
            Color::ALL[rng.random_range(0..Color::ALL.len())],
            Size::ALL[rng.random_range(0..2)],
        )
    };
    let mode = rng.random_range(0..10);
    let (mut shape, mut color, size) = if scene.objects.is_empty() || mode >= 7 {
        random_kind(rng)
    } else {
        let o = &scene.objects[rng.random_range(0..scene.objects.len())];
        (o.shape, o.color, o.size)
    };
    if (4..7).contains(&mode) && !scene.objects.is_empty() {
        let (s, c, _) = random_kind(rng);
        if rng.random_bool(0.5) {
            shape = s;
        } else {
            color = c;
        }
    }
    let with_shape = rng.random_bool(0.8);
    let with_color = !with_shape || rng.random_bool(0.75);
    Desc {
        shape: with_shape.then_some(shape),
        color: with_color.then_some(color),
        size: rng.random_bool(0.2).then_some(size),
    }
}

/// A property along a dimension the description leaves open.
fn pred_for(rng: &mut impl Rng, d: &Desc) -> Pred {
    let dims: Vec<u8> = [
        (d.shape.is_none(), 0u8),
        (d.color.is_none(), 1),
        (d.size.is_none(), 2),
    ]
    .iter()
    .filter(|x| x.0)
    .map(|x| x.1)
    .collect();
    match dims[rng.random_range(0..dims.len())] {
        0 => Pred::Shape(Shape::ALL[rng.random_range(0..Shape::ALL.len())]),
        1 => Pred::Color(Color::ALL[rng.random_range(0..Color::ALL.len())]),
        _ => Pred::Size(Size::ALL[rng.random_range(0..2)]),
    }
}

/// Proposes a question of kind `k` (0..6, in the order of `Kind`).
pub fn propose(rng: &mut impl Rng, scene: &Scene, k: usize, negated: bool) -> Question {
    let kind = match k {
        0 => Kind::Presence(desc(rng, scene)),
        1 => {
            let d = desc(rng, scene);
            let v = scene.objects.iter().filter(|o| d.matches(o)).count();
            let n = if (1..=6).contains(&v) && rng.random_bool(0.5) {
                v
            } else {
                rng.random_range(1..=6)
            };
            let cmp = [Cmp::Exactly, Cmp::AtLeast, Cmp::FewerThan][rng.random_range(0..3)];
            let n = if cmp == Cmp::Exactly { n } else { n.max(2) };
            Kind::Count(d, cmp, n)
        }
        2 => {
            let mut d = desc(rng, scene);
            d.size = None;
            Kind::All(d, pred_for(rng, &d))
        }
        3 => {
            let (mut a, mut b) = (desc(rng, scene), desc(rng, scene));
            a.size = None;
            b.size = None;
            Kind::Relation(a, Relation::ALL[rng.random_range(0..4)], b)
        }
        4 => {
            let mut d = desc(rng, scene);
            d.size = None;
            Kind::Nth(rng.random_range(1..=3), d, pred_for(rng, &d))
        }
        _ => {
            // Two descriptions along one dimension: more red shapes than blue ones.
            let (a, b) = (desc(rng, scene), desc(rng, scene));
            if rng.random_bool(0.5) && a.color.is_some() && b.color.is_some() {
                Kind::More(
                    Desc::new(None, a.color, None),
                    Desc::new(None, b.color, None),
                )
            } else {
                let sa = a.shape.unwrap_or(Shape::ALL[rng.random_range(0..5)]);
                let sb = b.shape.unwrap_or(Shape::ALL[rng.random_range(0..5)]);
                Kind::More(
                    Desc::new(Some(sa), None, None),
                    Desc::new(Some(sb), None, None),
                )
            }
        }
    };
    let degenerate = match kind {
        Kind::More(a, b) => a == b,
        _ => false,
    };
    Question {
        kind: if degenerate {
            Kind::Presence(desc(rng, scene))
        } else {
            kind
        },
        negated,
    }
}

// How often each type is tried for a wanted label: some (type, label) pairs are much
// rarer than others among random proposals (every red circle being large is seldom
// entailed; a negated claim is usually true). The weights, fitted on a generated split,
// make every type carry each label about equally often, so that the question's form
// alone says little about its answer.
use super::weights::TYPE_WEIGHTS;

/// A question with the wanted label whose text `allowed` accepts (the split's half of
/// all texts): a type drawn by `TYPE_WEIGHTS`, up to 40 proposals of it, then another.
pub fn question_with_label(
    rng: &mut impl Rng,
    scene: &Scene,
    want: Label,
    allowed: impl Fn(&str) -> bool,
) -> Option<(Question, String)> {
    // Rows by name, not by `Label::ALL`'s order.
    let w = &TYPE_WEIGHTS[match want {
        Label::Entailment => 0,
        Label::Neutral => 1,
        Label::Contradiction => 2,
    }];
    let total: f64 = w.iter().sum();
    for _ in 0..12 {
        let mut r = rng.random_range(0.0..total);
        let t = w.iter().position(|&x| {
            r -= x;
            r < 0.0
        });
        let t = t.unwrap_or(6);
        for _ in 0..40 {
            let (k, negated) = if t == 6 {
                (rng.random_range(0..6), true)
            } else {
                (t, false)
            };
            let q = propose(rng, scene, k, negated);
            let text = q.text();
            if allowed(&text) && label(scene, &q) == want {
                return Some((q, text));
            }
        }
    }
    None
}
