//! Tests of the v1 generator: labels, texts, balance, determinism, splits.

use super::hypothesis::*;
use super::splits::*;
use super::stats::*;
use super::writer::*;
use super::Label;
use crate::data::scene::Occluder;
use crate::data::scene::{render, Color, Scene, Shape, Size};
use crate::data::tsv::{CaptionReader, VeReader};
use std::collections::BTreeMap;
use std::fs::File;
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
