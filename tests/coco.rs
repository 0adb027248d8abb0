//! `mue eval` on a COCO Karpathy file (`--data dataset_coco.json --images DIR`): the test
//! split only, each image and its references read as the OFA TSV path reads them.

use mue::data::tsv::{encode_png_base64, write_caption_row};
use std::path::Path;
use std::process::Command;

fn mue(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mue"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A small picture that differs per `seed`.
fn picture(seed: u32) -> image::RgbImage {
    image::RgbImage::from_fn(48, 40, |x, y| {
        image::Rgb([
            (x * 5 + seed * 70) as u8,
            (y * 6 + seed * 30) as u8,
            ((x + y) * 3) as u8,
        ])
    })
}

fn predictions(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn eval_reads_the_test_split_of_a_karpathy_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = d.join("model");
    mue::cli::demo::write_random_model(&model, 3).unwrap();
    let images = d.join("coco");
    std::fs::create_dir_all(images.join("val2014")).unwrap();
    for (i, name) in ["a.png", "b.png", "c.png"].iter().enumerate() {
        picture(i as u32)
            .save(images.join("val2014").join(name))
            .unwrap();
    }
    // Two test images around a train image, which must not be read.
    let json = r#"{"images": [
        {"filepath": "val2014", "filename": "a.png", "split": "test", "cocoid": 11,
         "sentences": [{"raw": "A red square."}, {"raw": "Something red."}]},
        {"filepath": "val2014", "filename": "b.png", "split": "train", "cocoid": 12,
         "sentences": [{"raw": "Not evaluated."}]},
        {"filepath": "val2014", "filename": "c.png", "split": "test", "cocoid": 13,
         "sentences": [{"raw": "A blue circle."}]}
    ]}"#;
    let coco = d.join("dataset_coco.json");
    std::fs::write(&coco, json).unwrap();
    // The same two examples as an OFA caption TSV.
    let mut tsv = Vec::new();
    for (seed, id, caps) in [
        (0, "11", vec!["A red square.", "Something red."]),
        (2, "13", vec!["A blue circle."]),
    ] {
        let caps: Vec<String> = caps.into_iter().map(String::from).collect();
        let b64 = encode_png_base64(&picture(seed)).unwrap();
        write_caption_row(&mut tsv, id, id, &caps, "", &b64).unwrap();
    }
    let tsv_path = d.join("caption_test.tsv");
    std::fs::write(&tsv_path, tsv).unwrap();

    let m = model.to_str().unwrap();
    let run = |data: &Path, extra: &[&str], name: &str| {
        let preds = d.join(format!("{name}.jsonl"));
        let out = d.join(format!("{name}.json"));
        let mut args = vec![
            "eval",
            "--model",
            m,
            "--data",
            data.to_str().unwrap(),
            "--task",
            "caption",
            "--beam",
            "2",
            "--max-len",
            "5",
            "--quiet",
            "--predictions",
            preds.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let (ok, err) = mue(&args);
        assert!(ok, "{args:?}: {err}");
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap();
        (predictions(&preds), report)
    };
    let (from_coco, coco_report) = run(&coco, &["--images", images.to_str().unwrap()], "coco");
    let (from_tsv, tsv_report) = run(&tsv_path, &[], "tsv");
    let ids: Vec<&str> = from_coco
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["11", "13"]);
    // Same images, same references: same captions, exits, cost and score.
    assert_eq!(from_coco, from_tsv);
    assert_eq!(coco_report["quality"], tsv_report["quality"]);
    assert_eq!(coco_report["examples"], 2);

    // --limit bounds the split; the wrong task and a missing image are clear errors.
    let (lim, _) = run(
        &coco,
        &["--images", images.to_str().unwrap(), "--limit", "1"],
        "limit",
    );
    assert_eq!(lim.len(), 1);
    let base = [
        "eval",
        "--model",
        m,
        "--data",
        coco.to_str().unwrap(),
        "--images",
        images.to_str().unwrap(),
        "--quiet",
    ];
    let (ok, err) = mue(&[&base[..], &["--task", "entail"]].concat());
    assert!(!ok && err.contains("use it with --task caption"), "{err}");
    std::fs::remove_file(images.join("val2014/c.png")).unwrap();
    let (ok, err) = mue(&[&base[..], &["--task", "caption"]].concat());
    assert!(
        !ok && err.contains("c.png") && err.contains("cocoid 13"),
        "{err}"
    );
}
