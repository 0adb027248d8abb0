//! The `mue` binary: output on a random model directory, and clear errors on bad input.

use std::path::Path;
use std::process::Command;

fn mue(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mue"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn example() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/example_0.png")
        .display()
        .to_string()
}

#[test]
fn run_prints_prediction_exits_and_savings() {
    let dir = tempfile::tempdir().unwrap();
    mue::cli::demo::write_random_model(dir.path(), 1).unwrap();
    let m = dir.path().to_str().unwrap();
    let img = example();
    let (ok, out, err) = mue(&[
        "run",
        "--model",
        m,
        "--image",
        &img,
        "--task",
        "caption",
        "--json",
        "--beam",
        "2",
        "--max-len",
        "5",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["mue"]["caption"].is_string());
    assert!(v["mue"]["cost"]["saved_fraction"].as_f64().unwrap() >= 0.0);
    assert_eq!(v["full"]["cost"]["saved_fraction"].as_f64().unwrap(), 0.0);
    let tokens = v["mue"]["exits"]["token_layers"].as_array().unwrap();
    assert!(!tokens.is_empty() && tokens.len() <= 6);

    let args = [
        "run",
        "--model",
        m,
        "--image",
        &img,
        "--task",
        "entail",
        "--text",
        "there is a red circle",
    ];
    let (ok, out, err) = mue(&args);
    assert!(ok, "{err}");
    assert!(
        out.contains("answer (MuE)") && out.contains("saved:"),
        "{out}"
    );
    // Same input, same output.
    assert_eq!(mue(&args).1.lines().next(), out.lines().next());
}

#[test]
fn negative_thresholds_parse_as_numbers() {
    // "< -1 exits after layer 1" must be reachable as `--dec-threshold -2`, not only
    // `--dec-threshold=-2`.
    let dir = tempfile::tempdir().unwrap();
    mue::cli::demo::write_random_model(dir.path(), 1).unwrap();
    let mut args = vec![
        "run",
        "--json",
        "--task",
        "entail",
        "--text",
        "a red circle",
    ];
    for flag in ["--img-threshold", "--text-threshold", "--dec-threshold"] {
        args.extend([flag, "-2"]);
    }
    let img = example();
    args.extend(["--model", dir.path().to_str().unwrap(), "--image", &img]);
    let (ok, out, err) = mue(&args);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["mue"]["exits"]["image_layer"].as_u64(), Some(1), "{v}");
    assert_eq!(v["mue"]["exits"]["text_layer"].as_u64(), Some(1), "{v}");
}

#[test]
fn bad_input_gives_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    mue::cli::demo::write_random_model(dir.path(), 1).unwrap();
    let m = dir.path().to_str().unwrap();
    let img = example();
    let check = |args: &[&str], want: &str| {
        let (ok, _, err) = mue(args);
        assert!(!ok, "{args:?} should fail");
        assert!(err.contains(want), "{args:?}: expected '{want}' in: {err}");
        assert!(!err.contains("panicked"), "{err}");
    };
    check(
        &[
            "run",
            "--model",
            m,
            "--image",
            "/nonexistent.png",
            "--task",
            "caption",
        ],
        "/nonexistent.png",
    );
    let bad = dir.path().join("bad.png");
    std::fs::write(&bad, b"not an image at all").unwrap();
    check(
        &[
            "run",
            "--model",
            m,
            "--image",
            bad.to_str().unwrap(),
            "--task",
            "caption",
        ],
        "bad.png",
    );
    check(
        &[
            "run",
            "--model",
            m,
            "--image",
            &img,
            "--task",
            "caption",
            "--img-threshold",
            "NaN",
        ],
        "image threshold must be a finite number",
    );
    check(
        &["run", "--model", m, "--image", &img, "--task", "entail"],
        "--text",
    );
    check(
        &[
            "run", "--model", m, "--image", &img, "--task", "entail", "--text", "   ",
        ],
        "hypothesis is empty",
    );
    let huge = "word ".repeat(3000);
    check(
        &[
            "run", "--model", m, "--image", &img, "--task", "entail", "--text", &huge,
        ],
        "too long",
    );
    let empty = tempfile::tempdir().unwrap();
    check(
        &[
            "run",
            "--model",
            empty.path().to_str().unwrap(),
            "--image",
            &img,
            "--task",
            "caption",
        ],
        "config.json",
    );
    check(
        &[
            "run",
            "--model",
            m,
            "--image",
            &img,
            "--task",
            "caption",
            "--kv-fill",
            "zero",
        ],
        "unknown key/value fill",
    );
}

#[test]
fn bench_prints_one_line_per_workload_and_batch() {
    let dir = tempfile::tempdir().unwrap();
    mue::cli::demo::write_random_model(dir.path(), 1).unwrap();
    let m = dir.path().to_str().unwrap();
    let args = [
        "bench",
        "--model",
        m,
        "--batch",
        "1,2",
        "--steps",
        "3",
        "--iters",
        "2",
        "--threads",
        "1",
    ];
    let (ok, out, err) = mue(&args);
    assert!(ok, "bench failed: {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 6, "{out}");
    let mut seen = Vec::new();
    for line in &lines {
        // Same form as bench_torch.py's lines, plus GFLOP/s and peak RSS.
        let f: std::collections::HashMap<&str, &str> = line
            .split_whitespace()
            .filter_map(|w| w.split_once('='))
            .collect();
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(words[0], "mue", "{line}");
        assert_eq!(f["threads"], "1", "{line}");
        assert_eq!(f["steps"], "3", "{line}");
        assert_eq!(f["side"], "64", "{line}");
        let num = |k: &str| f[k].parse::<f64>().unwrap();
        // (this model's image trunk is a patch reshape: it may round to 0.0 ms)
        assert!(num("min_ms") >= 0.0, "{line}");
        if words[4] != "image" {
            assert!(num("min_ms") > 0.0, "{line}");
        }
        assert!(num("min_ms") <= num("median_ms"), "{line}");
        assert!(num("peak_rss_mib") > 0.0, "{line}");
        assert!(num("gflops") >= 0.0, "{line}");
        seen.push((words[4].to_string(), f["batch"].to_string()));
    }
    let want: Vec<(String, String)> = ["1", "2"]
        .iter()
        .flat_map(|b| ["image", "caption", "entail"].map(|w| (w.to_string(), b.to_string())))
        .collect();
    assert_eq!(seen, want);
    // The decoding workloads do transformer work: a MAC count, so a positive GFLOP/s.
    assert!(
        lines[1].contains("gflops=") && !lines[1].contains("gflops=0.0 "),
        "{}",
        lines[1]
    );

    // The reference kernels (candle's composed ops) are labelled as such.
    let (ok, out, err) = mue(&[
        "bench",
        "--model",
        m,
        "--batch",
        "2",
        "--steps",
        "2",
        "--iters",
        "1",
        "--workloads",
        "caption",
        "--reference-kernels",
    ]);
    assert!(ok, "{err}");
    assert!(
        out.starts_with("mue-reference size=") && out.contains(" caption batch=2 "),
        "{out}"
    );

    let (ok, _, err) = mue(&["bench", "--model", m, "--workloads", "image,bogus"]);
    assert!(!ok && err.contains("unknown workload \"bogus\""), "{err}");
    let (ok, _, err) = mue(&["bench", "--model", m, "--batch", "0"]);
    assert!(!ok && err.contains("at least 1"), "{err}");
    let (ok, _, err) = mue(&["bench", "--model", "/nonexistent/model"]);
    assert!(!ok && err.contains("does not exist"), "{err}");
}
