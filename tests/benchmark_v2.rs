//! Benchmark v2 (`mue data generate --version 2`): determinism, splits disjoint by
//! content, label balance and the difficulty mix, and every answer and caption checked
//! by an evaluator written here from the files alone (the scene records in
//! `scenes_{split}.jsonl` and the texts in the TSVs), not by the generator's code.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use mue::data::benchmark::generate_version;
use mue::data::GenerateOptions;

const SPLITS: [&str; 3] = ["train", "valid", "test"];

fn gen(dir: &Path, seed: u64) -> mue::data::GenerateReport {
    let opts = GenerateOptions {
        out_dir: dir.to_path_buf(),
        seed,
        n_train: 240,
        n_val: 40,
        n_test: 60,
        image_size: 128,
    };
    generate_version(&opts, 2).unwrap()
}

fn lines(dir: &Path, file: &str) -> Vec<String> {
    std::fs::read_to_string(dir.join(file))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

// ---------------------------------------------------------------------------
// The scene records, read back
// ---------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
struct Obj {
    col: i64,
    row: i64,
    size: String,
    color: String,
    shape: String,
}

struct SceneRec {
    grid: i64,
    objects: Vec<Obj>,
    hidden: Vec<(i64, i64)>,
    background: (String, String),
}

fn scenes(dir: &Path, split: &str) -> HashMap<String, SceneRec> {
    let mut out = HashMap::new();
    for l in lines(dir, &format!("scenes_{split}.jsonl")) {
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        let s = |x: &serde_json::Value| x.as_str().unwrap().to_string();
        let objects = v["objects"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| Obj {
                col: o[0].as_i64().unwrap(),
                row: o[1].as_i64().unwrap(),
                size: s(&o[2]),
                color: s(&o[3]),
                shape: s(&o[4]),
            })
            .collect();
        let mut hidden = Vec::new();
        if let Some(b) = v["occluder"].as_array() {
            let b: Vec<i64> = b.iter().map(|x| x.as_i64().unwrap()).collect();
            for r in b[1]..b[1] + b[3] {
                for c in b[0]..b[0] + b[2] {
                    hidden.push((c, r));
                }
            }
        }
        let bg = (s(&v["background"][0]), s(&v["background"][1]));
        let rec = SceneRec {
            grid: v["grid"].as_i64().unwrap(),
            objects,
            hidden,
            background: bg,
        };
        out.insert(s(&v["image_id"]), rec);
    }
    out
}

/// The test's own content key: grid, hidden cells and the sorted object tuples.
fn content_key(s: &SceneRec) -> String {
    let mut o: Vec<String> = s
        .objects
        .iter()
        .map(|o| format!("{},{},{},{},{}", o.row, o.col, o.size, o.color, o.shape))
        .collect();
    o.sort();
    format!("{}|{:?}|{}", s.grid, s.hidden, o.join(";"))
}

// ---------------------------------------------------------------------------
// An independent reading of the hypotheses
// ---------------------------------------------------------------------------

const SHAPES: [&str; 5] = ["circle", "square", "triangle", "cross", "diamond"];
const COLORS: [&str; 7] = [
    "red", "green", "blue", "yellow", "purple", "orange", "white",
];
const SIZES: [&str; 2] = ["small", "large"];
const NUMBERS: [&str; 13] = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve",
];

#[derive(Clone, Debug, Default)]
struct Np {
    size: Option<String>,
    color: Option<String>,
    shape: Option<String>,
}

impl Np {
    fn parse(s: &str) -> Np {
        let s = s
            .strip_prefix("an ")
            .or_else(|| s.strip_prefix("a "))
            .unwrap_or(s);
        let w: Vec<&str> = s.split(' ').collect();
        let noun = *w.last().unwrap();
        let sing = match noun {
            "crosses" => "cross",
            "cross" => "cross",
            n => n.strip_suffix('s').unwrap_or(n),
        };
        let shape = if sing == "shape" {
            None
        } else {
            assert!(SHAPES.contains(&sing), "not a shape: {noun:?} in {s:?}");
            Some(sing.to_string())
        };
        let mut np = Np {
            shape,
            ..Np::default()
        };
        for a in &w[..w.len() - 1] {
            if SIZES.contains(a) {
                np.size = Some(a.to_string());
            } else {
                assert!(COLORS.contains(a), "not an adjective: {a:?} in {s:?}");
                np.color = Some(a.to_string());
            }
        }
        np
    }
    fn matches(&self, o: &Obj) -> bool {
        self.size.as_ref().is_none_or(|x| *x == o.size)
            && self.color.as_ref().is_none_or(|x| *x == o.color)
            && self.shape.as_ref().is_none_or(|x| *x == o.shape)
    }
}

/// A property: "red", "small", "a circle".
fn prop(s: &str) -> impl Fn(&Obj) -> bool {
    let s = s.to_string();
    move |o: &Obj| {
        if let Some(sh) = s.strip_prefix("an ").or_else(|| s.strip_prefix("a ")) {
            o.shape == sh
        } else if SIZES.contains(&s.as_str()) {
            o.size == s
        } else {
            assert!(COLORS.contains(&s.as_str()), "property {s:?}");
            o.color == s
        }
    }
}

fn relation(rel: &str, a: &Obj, b: &Obj) -> bool {
    match rel {
        "to the left of" => a.col < b.col,
        "to the right of" => a.col > b.col,
        "above" => a.row < b.row,
        "below" => a.row > b.row,
        _ => panic!("relation {rel:?}"),
    }
}

const RELATIONS: [&str; 4] = ["to the left of", "to the right of", "above", "below"];

fn number(w: &str) -> usize {
    NUMBERS
        .iter()
        .position(|n| *n == w)
        .unwrap_or_else(|| panic!("number {w:?}"))
}

/// Truth of a hypothesis text in a complete world.
fn truth(h: &str, world: &[Obj]) -> bool {
    let count = |np: &Np| world.iter().filter(|o| np.matches(o)).count();
    if let Some(rest) = h.strip_prefix("it is not true that ") {
        return !truth(rest, world);
    }
    if let Some(x) = h
        .strip_prefix("there is no ")
        .and_then(|x| x.strip_suffix(" in the picture"))
    {
        return count(&Np::parse(x)) == 0;
    }
    if let Some(x) = h
        .strip_prefix("there is exactly one ")
        .and_then(|x| x.strip_suffix(" in the picture"))
    {
        return count(&Np::parse(x)) == 1;
    }
    if let Some(x) = h
        .strip_prefix("there are more ")
        .and_then(|x| x.strip_suffix(" in the picture"))
    {
        let (a, b) = x.split_once(" than ").unwrap();
        return count(&Np::parse(a)) > count(&Np::parse(b));
    }
    for (cmp, f) in [
        ("exactly", (|c, n| c == n) as fn(usize, usize) -> bool),
        ("at least", |c, n| c >= n),
        ("fewer than", |c, n| c < n),
    ] {
        if let Some(x) = h
            .strip_prefix(&format!("there are {cmp} "))
            .and_then(|x| x.strip_suffix(" in the picture"))
        {
            let (n, np) = x.split_once(' ').unwrap();
            return f(count(&Np::parse(np)), number(n));
        }
    }
    if let Some(x) = h.strip_prefix("every ") {
        let (np, p) = x.split_once(" in the picture is ").unwrap();
        let (np, p) = (Np::parse(np), prop(p));
        let m: Vec<&Obj> = world.iter().filter(|o| np.matches(o)).collect();
        return !m.is_empty() && m.iter().all(|o| p(o));
    }
    if let Some(x) = h.strip_prefix("counting row by row from the top left, the ") {
        let (ord, rest) = x.split_once(' ').unwrap();
        let k = ["first", "second", "third", "fourth"]
            .iter()
            .position(|o| *o == ord)
            .unwrap();
        let (np, p) = rest.split_once(" is ").unwrap();
        let (np, p) = (Np::parse(np), prop(p));
        let mut m: Vec<&Obj> = world.iter().filter(|o| np.matches(o)).collect();
        m.sort_by_key(|o| (o.row, o.col));
        return m.get(k).is_some_and(|o| p(o));
    }
    if let Some(x) = h
        .strip_prefix("there is ")
        .and_then(|x| x.strip_suffix(" in the picture"))
    {
        return count(&Np::parse(x)) > 0;
    }
    let x = h.strip_prefix("there is ").expect(h);
    for rel in RELATIONS {
        if let Some((a, b)) = x.split_once(&format!(" {rel} ")) {
            let (a, b) = (Np::parse(a), Np::parse(b));
            return world.iter().enumerate().any(|(i, p)| {
                a.matches(p)
                    && world
                        .iter()
                        .enumerate()
                        .any(|(j, q)| i != j && b.matches(q) && relation(rel, p, q))
            });
        }
    }
    panic!("hypothesis not understood: {h:?}")
}

/// The label by brute force: every hidden cell holds nothing or any of the 70 objects.
fn brute_force_label(s: &SceneRec, h: &str) -> &'static str {
    assert!(s.hidden.len() <= 2, "v2 occluders hide at most two cells");
    let mut kinds = vec![None];
    for sh in SHAPES {
        for c in COLORS {
            for z in SIZES {
                kinds.push(Some((z, c, sh)));
            }
        }
    }
    let (mut t, mut f) = (false, false);
    let n = kinds.len().pow(s.hidden.len() as u32);
    for code in 0..n {
        let mut world = s.objects.clone();
        let mut c = code;
        for &(col, row) in &s.hidden {
            if let Some((z, co, sh)) = kinds[c % kinds.len()] {
                world.push(Obj {
                    col,
                    row,
                    size: z.into(),
                    color: co.into(),
                    shape: sh.into(),
                });
            }
            c /= kinds.len();
        }
        if truth(h, &world) {
            t = true
        } else {
            f = true
        }
    }
    match (t, f) {
        (true, false) => "entailment",
        (false, true) => "contradiction",
        _ => "neutral",
    }
}

// ---------------------------------------------------------------------------
// An independent reading of the captions
// ---------------------------------------------------------------------------

fn check_background(s: &SceneRec, bg: &str) {
    let (color, texture) = &s.background;
    let want = if texture == "plain" {
        format!("a {color} background")
    } else {
        format!("a {texture} {color} background")
    };
    assert_eq!(bg, want);
}

/// A listing names every (colour, shape) group once with its exact count (and a size
/// only when the whole group has it).
fn check_listing(s: &SceneRec, list: &str) {
    let items: Vec<&str> = list.split(", ").flat_map(|x| x.split(" and ")).collect();
    let mut groups: HashSet<(String, String)> = HashSet::new();
    let mut total = 0;
    for it in items {
        let (n, np) = match it.split_once(' ').unwrap() {
            ("a" | "an", _) => (1, Np::parse(it)),
            (w, rest) => (number(w), Np::parse(rest)),
        };
        let (c, sh) = (np.color.clone().unwrap(), np.shape.clone().unwrap());
        let group: Vec<&Obj> = s
            .objects
            .iter()
            .filter(|o| o.color == c && o.shape == sh)
            .collect();
        assert_eq!(group.len(), n, "{it:?} in {list:?}");
        assert!(group.iter().all(|o| np.matches(o)), "{it:?}");
        assert!(groups.insert((c, sh)), "group named twice in {list:?}");
        total += n;
    }
    assert_eq!(total, s.objects.len(), "{list:?} leaves objects out");
}

fn region(s: &SceneRec, o: &Obj) -> String {
    let v = ["top", "", "bottom"][(o.row * 3 / s.grid) as usize];
    let h = ["left", "", "right"][(o.col * 3 / s.grid) as usize];
    match (v, h) {
        ("", "") => "middle".into(),
        ("", h) => h.into(),
        (v, "") => v.into(),
        (v, h) => format!("{v} {h}"),
    }
}

fn check_caption(s: &SceneRec, c: &str) {
    let visible = |np: &Np| s.objects.iter().filter(|o| np.matches(o)).count();
    if let Some(x) = c.strip_suffix(" of the image") {
        let (np, r) = x.split_once(" in the ").unwrap();
        let np = Np::parse(np);
        assert!(
            s.objects.iter().any(|o| np.matches(o) && region(s, o) == r),
            "{c:?}"
        );
        return;
    }
    let body = c.strip_prefix("there is ").unwrap_or(c);
    for rel in RELATIONS {
        if let Some((a, b)) = body.split_once(&format!(" {rel} ")) {
            let (a, b) = (Np::parse(a), Np::parse(b));
            let ok = s.objects.iter().any(|p| {
                a.matches(p)
                    && s.objects
                        .iter()
                        .any(|q| p != q && b.matches(q) && relation(rel, p, q))
            });
            assert!(ok, "{c:?}");
            return;
        }
    }
    if let Some(x) = c.strip_prefix("a single ") {
        let (np, bg) = x.split_once(" on ").unwrap();
        check_background(s, bg);
        assert_eq!(s.objects.len(), 1);
        assert_eq!(visible(&Np::parse(np)), 1, "{c:?}");
        return;
    }
    let first = c.split(' ').next().unwrap();
    if NUMBERS.contains(&first) && c.contains(" shapes") {
        let n = number(first);
        assert_eq!(n, s.objects.len(), "{c:?}");
        let rest = &c[first.len() + 1..];
        if let Some(bg) = rest.strip_prefix("shapes on ") {
            check_background(s, bg);
        } else {
            let colors = rest.strip_suffix(" shapes").unwrap();
            let mut named: Vec<&str> = colors.split(", ").flat_map(|x| x.split(" and ")).collect();
            named.sort();
            let mut have: Vec<&str> = s.objects.iter().map(|o| o.color.as_str()).collect();
            have.sort();
            have.dedup();
            assert_eq!(named, have, "{c:?}");
        }
        return;
    }
    let mut list = c;
    for p in [
        "a picture of ",
        "there is ",
        "there are ",
        "the image shows ",
    ] {
        list = list.strip_prefix(p).unwrap_or(list);
    }
    if let Some(x) = list.strip_suffix(" next to a striped box") {
        assert!(!s.hidden.is_empty(), "{c:?} but no box");
        list = x;
    }
    if let Some((x, bg)) = list.split_once(" on ") {
        check_background(s, bg);
        list = x;
    }
    check_listing(s, list);
}

// ---------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------

#[test]
fn v2_same_seed_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    gen(&tmp.path().join("a"), 5);
    gen(&tmp.path().join("b"), 5);
    gen(&tmp.path().join("c"), 6);
    let mut names: Vec<_> = std::fs::read_dir(tmp.path().join("a"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names.len(), 13, "{names:?}");
    for n in &names {
        let read = |d: &str| std::fs::read(tmp.path().join(d).join(n)).unwrap();
        assert!(read("a") == read("b"), "{n:?} differs for the same seed");
        if n != "stats.json" {
            assert!(read("a") != read("c"), "{n:?} equal for another seed");
        }
    }
}

#[test]
fn v2_splits_are_disjoint_by_content() {
    let tmp = tempfile::tempdir().unwrap();
    let report = gen(tmp.path(), 1);
    let d = tmp.path();
    let train: HashSet<String> = scenes(d, "train").values().map(content_key).collect();
    let ve_text = |split: &str| -> HashSet<String> {
        lines(d, &format!("snli_ve_{split}.tsv"))
            .iter()
            .map(|l| l.split('\t').nth(3).unwrap().to_string())
            .collect()
    };
    let cap_text = |split: &str| -> HashSet<String> {
        lines(d, &format!("caption_{split}.tsv"))
            .iter()
            .flat_map(|l| {
                let c = l.split('\t').nth(2).unwrap().to_string();
                c.split("&&").map(str::to_string).collect::<Vec<_>>()
            })
            .collect()
    };
    let (train_h, train_c) = (ve_text("train"), cap_text("train"));
    for split in ["valid", "test"] {
        let sc = scenes(d, split);
        for (id, s) in &sc {
            assert!(
                !train.contains(&content_key(s)),
                "{split} image {id} shows a training scene"
            );
        }
        let h = ve_text(split);
        assert!(h.len() > 50);
        assert_eq!(h.intersection(&train_h).count(), 0, "{split} hypotheses");
        assert_eq!(cap_text(split).intersection(&train_c).count(), 0);
        let t = &report.twins[split];
        assert_eq!(
            (
                t.scenes_with_train_twin,
                t.hypotheses_in_train,
                t.captions_in_train
            ),
            (0, 0, 0)
        );
        assert_eq!(t.images, sc.len());
    }
    // the counts are recorded next to the data
    let st: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("stats.json")).unwrap()).unwrap();
    assert_eq!(st["version"], 2);
    assert_eq!(st["twins_with_train"]["test"]["hypotheses_in_train"], 0);
}

#[test]
fn v2_labels_balanced_and_difficulty_mixed() {
    let tmp = tempfile::tempdir().unwrap();
    gen(tmp.path(), 2);
    for split in SPLITS {
        let ve = lines(tmp.path(), &format!("snli_ve_{split}.tsv"));
        let meta: HashMap<String, (String, String)> =
            lines(tmp.path(), &format!("meta_{split}.tsv"))
                .iter()
                .map(|l| {
                    let f: Vec<&str> = l.split('\t').collect();
                    assert_eq!(f.len(), 5);
                    (f[0].to_string(), (f[3].to_string(), f[4].to_string()))
                })
                .collect();
        let mut labels: BTreeMap<&str, usize> = BTreeMap::new();
        let mut by_type: BTreeMap<String, BTreeMap<&str, usize>> = BTreeMap::new();
        let mut difficulty: BTreeMap<String, usize> = BTreeMap::new();
        for l in &ve {
            let f: Vec<&str> = l.split('\t').collect();
            let label = f[5];
            *labels.entry(label).or_default() += 1;
            let (tier, ty) = &meta[f[0]];
            *by_type
                .entry(ty.clone())
                .or_default()
                .entry(label)
                .or_default() += 1;
            *difficulty.entry(tier.clone()).or_default() += 1;
        }
        let n = ve.len() as f64;
        assert_eq!(labels.len(), 3, "{split}: {labels:?}");
        for (l, c) in &labels {
            let frac = *c as f64 / n;
            assert!((frac - 1.0 / 3.0).abs() < 0.05, "{split} {l}: {frac}");
        }
        // every difficulty, trivial to hard, inside every split
        for t in ["0", "1", "2", "3"] {
            let frac = *difficulty.get(t).unwrap_or(&0) as f64 / n;
            assert!(frac > 0.03, "{split}: difficulty {t} {difficulty:?}");
        }
        if split == "train" {
            // each question type answers each way (the form does not give the answer)
            assert_eq!(by_type.len(), 7, "{by_type:?}");
            for (ty, m) in &by_type {
                let tot: usize = m.values().sum();
                for l in ["entailment", "neutral", "contradiction"] {
                    let frac = *m.get(l).unwrap_or(&0) as f64 / tot as f64;
                    assert!(frac > 0.15 && frac < 0.55, "{ty} {l}: {frac} {m:?}");
                }
            }
        }
    }
}

#[test]
fn v2_answers_and_captions_agree_with_an_independent_evaluator() {
    let tmp = tempfile::tempdir().unwrap();
    gen(tmp.path(), 3);
    let (mut checked, mut neutral, mut captions) = (0, 0, 0);
    for split in ["train", "test"] {
        let sc = scenes(tmp.path(), split);
        for l in lines(tmp.path(), &format!("snli_ve_{split}.tsv")) {
            let f: Vec<&str> = l.split('\t').collect();
            let s = &sc[f[1]];
            assert_eq!(
                brute_force_label(s, f[3]),
                f[5],
                "image {} {:?}",
                f[1],
                f[3]
            );
            checked += 1;
            neutral += (f[5] == "neutral") as usize;
        }
        for l in lines(tmp.path(), &format!("caption_{split}.tsv")) {
            let f: Vec<&str> = l.split('\t').collect();
            let s = &sc[f[1]];
            for c in f[2].split("&&") {
                check_caption(s, c);
                captions += 1;
            }
            // object_labels lists exactly the visible objects
            assert_eq!(f[3].split("&&").count(), s.objects.len());
        }
    }
    assert!(checked > 500 && neutral > 100 && captions > 1000);
}

#[test]
fn v2_has_ofa_cost_structure() {
    let tmp = tempfile::tempdir().unwrap();
    gen(tmp.path(), 4);
    let f =
        std::io::BufReader::new(std::fs::File::open(tmp.path().join("snli_ve_test.tsv")).unwrap());
    let rows: Vec<_> = mue::data::VeReader::new(f)
        .collect::<Result<_, _>>()
        .unwrap();
    // 128 px: 64 patches of 16 px, so image tokens are most of the encoder
    assert!(rows.iter().all(|r| r.image.dimensions() == (128, 128)));
    let words: usize = rows
        .iter()
        .map(|r| r.hypothesis.split_whitespace().count())
        .sum();
    let mean = words as f64 / rows.len() as f64;
    assert!(mean > 8.0, "mean hypothesis length {mean}");
    // scenes from one object to a dozen
    let counts: Vec<usize> = scenes(tmp.path(), "test")
        .values()
        .map(|s| s.objects.len())
        .collect();
    assert!(counts.iter().any(|&n| n <= 2) && counts.iter().any(|&n| n >= 9));
}

#[test]
fn v2_rejects_bad_options_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let o = GenerateOptions {
        out_dir: tmp.path().to_path_buf(),
        image_size: 64,
        ..GenerateOptions::default()
    };
    let e = generate_version(&o, 2).unwrap_err().to_string();
    assert!(e.contains("at least 128"), "{e}");
    let e = generate_version(&o, 3).unwrap_err().to_string();
    assert!(e.contains("--version must be 1 or 2"), "{e}");
}
