//! v2 reference captions: the v1 listings plus relations and positions on the 8x8
//! grid; every caption is true of the visible content.

use rand::seq::SliceRandom;
use rand::Rng;

use super::super::caption::{background_phrase, groups, join_list, listing};
use super::super::hypothesis::{number_word, with_article, Desc, Relation};
use crate::data::scene::{Color, Object, Scene};

/// "top left", "middle", "bottom right", ...: thirds of the image.
pub fn region(scene: &Scene, cell: (u32, u32)) -> &'static str {
    let third = |v: u32| (v * 3 / scene.grid) as usize;
    let names = [
        ["top left", "top", "top right"],
        ["left", "middle", "right"],
        ["bottom left", "bottom", "bottom right"],
    ];
    names[third(cell.1)][third(cell.0)]
}

fn np(o: &Object, size: bool) -> String {
    let d = Desc::new(Some(o.shape), Some(o.color), size.then_some(o.size));
    with_article(&d.singular())
}

/// Candidate captions of a scene (distinct, lower-case, no final punctuation). The
/// generator keeps those whose text belongs to the split's half.
pub fn candidates(scene: &Scene, rng: &mut impl Rng) -> Vec<String> {
    let bg = background_phrase(scene);
    let list_sz = listing(scene, true);
    let list = listing(scene, false);
    let n = scene.objects.len();
    let plural = groups(scene).first().is_some_and(|g| g.2.len() > 1);
    let there = if plural { "there are" } else { "there is" };
    let mut caps = vec![
        list_sz.clone(),
        format!("{list} on {bg}"),
        format!("{there} {list_sz}"),
        format!("the image shows {list}"),
        format!("a picture of {list_sz} on {bg}"),
    ];
    let mut colors: Vec<Color> = scene.objects.iter().map(|o| o.color).collect();
    colors.sort();
    colors.dedup();
    let color_names: Vec<String> = colors.iter().map(|c| c.name().to_string()).collect();
    if n == 1 {
        let o = &scene.objects[0];
        let d = Desc::new(Some(o.shape), Some(o.color), None);
        caps.push(format!("a single {} on {bg}", d.singular()));
    } else {
        caps.push(format!("{} shapes on {bg}", number_word(n)));
        caps.push(format!(
            "{} {} shapes",
            number_word(n),
            join_list(&color_names)
        ));
    }
    // Up to three relations between visible objects.
    let mut pairs = Vec::new();
    for (i, x) in scene.objects.iter().enumerate() {
        for (j, y) in scene.objects.iter().enumerate() {
            for r in Relation::ALL {
                if i != j && r.holds(x.cell, y.cell) {
                    pairs.push((x, r, y));
                }
            }
        }
    }
    pairs.shuffle(rng);
    for (k, (x, r, y)) in pairs.into_iter().take(3).enumerate() {
        let (a, b) = (np(x, rng.random_bool(0.5)), np(y, false));
        caps.push(if k % 2 == 0 {
            format!("{a} {} {b}", r.phrase())
        } else {
            format!("there is {a} {} {b}", r.phrase())
        });
    }
    // Up to three positions.
    let mut objs: Vec<&Object> = scene.objects.iter().collect();
    objs.shuffle(rng);
    for o in objs.into_iter().take(3) {
        caps.push(format!(
            "{} in the {} of the image",
            np(o, false),
            region(scene, o.cell)
        ));
    }
    if scene.occluder.is_some() {
        caps.push(format!("{list} next to a striped box"));
    }
    let mut seen = std::collections::HashSet::new();
    caps.retain(|c| seen.insert(c.clone()));
    caps
}
