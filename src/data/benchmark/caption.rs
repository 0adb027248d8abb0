//! Reference captions: every caption true of the visible content.

use rand::Rng;

use super::hypothesis::{number_word, with_article, Desc, Relation};
use crate::data::scene::{Color, Object, Scene, Shape, GRID};

/// Groups visible objects by (colour, shape), in reading order.
pub(super) fn groups(scene: &Scene) -> Vec<(Color, Shape, Vec<&Object>)> {
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

pub(super) fn join_list(items: &[String]) -> String {
    match items.len() {
        0 => String::new(),
        1 => items[0].clone(),
        n => format!("{} and {}", items[..n - 1].join(", "), items[n - 1]),
    }
}

pub(super) fn listing(scene: &Scene, with_sizes: bool) -> String {
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

pub(super) fn background_phrase(scene: &Scene) -> String {
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
