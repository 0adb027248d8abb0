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

/// `mue` run in `cwd` with `MUE_MODEL` and `MUE_EXAMPLES` cleared, then `env` set; a
/// command still running after `limit` is killed and reported as not having exited.
fn mue_in(
    cwd: &Path,
    env: &[(&str, &Path)],
    args: &[&str],
    limit: std::time::Duration,
) -> (Option<bool>, String, String) {
    use std::io::Read;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mue"));
    cmd.args(args)
        .current_dir(cwd)
        .env_remove("MUE_MODEL")
        .env_remove("MUE_EXAMPLES")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s.success());
        }
        if start.elapsed() > limit {
            child.kill().unwrap();
            child.wait().unwrap();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let (mut out, mut err) = (String::new(), String::new());
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status, out, err)
}

/// The folder `rel` (holding `marker`) beside the test binary's `mue` or up to four
/// folders above it, as the binary searches for its defaults; None when there is none
/// (e.g. a CARGO_TARGET_DIR outside the repository).
fn beside_exe(rel: &str, marker: &str) -> Option<std::path::PathBuf> {
    let exe = Path::new(env!("CARGO_BIN_EXE_mue")).canonicalize().unwrap();
    exe.parent()
        .unwrap()
        .ancestors()
        .take(5)
        .map(|d| d.join(rel))
        .find(|p| p.join(marker).is_file())
}

#[test]
fn missing_or_broken_model_is_an_error_everywhere() {
    let tmp = tempfile::tempdir().unwrap();
    let img = example();
    let tsv = tmp.path().join("split.tsv");
    std::fs::write(&tsv, "").unwrap();
    let tsv = tsv.to_str().unwrap();
    // A directory that does not exist (a typo), one without config.json, and one whose
    // config.json is not a model config.
    let missing = tmp.path().join("no-such-model");
    let empty = tmp.path().join("empty-model");
    std::fs::create_dir(&empty).unwrap();
    let broken = tmp.path().join("broken-model");
    std::fs::create_dir(&broken).unwrap();
    std::fs::write(broken.join("config.json"), "{\"d_model\": \"big\"}").unwrap();
    let limit = std::time::Duration::from_secs(120);
    for dir in [&missing, &empty, &broken] {
        let m = dir.to_str().unwrap();
        let commands: Vec<Vec<&str>> = vec![
            vec!["serve", "--model", m, "--addr", "127.0.0.1:0"],
            vec!["serve-bench", "--model", m, "--seconds", "1"],
            vec!["demo", "--model", m, "--examples", "1"],
            vec!["run", "--model", m, "--image", &img, "--task", "caption"],
            vec!["eval", "--model", m, "--data", tsv, "--task", "entail"],
            vec!["sweep", "--model", m, "--data", tsv, "--task", "entail"],
            vec!["calibrate", "--model", m, "--data", tsv, "--task", "entail"],
        ];
        for args in commands {
            let (status, out, err) = mue_in(tmp.path(), &[], &args, limit);
            // Still running means it went on (e.g. served a random model).
            assert_eq!(status, Some(false), "{args:?} did not fail: {out}{err}");
            assert!(err.contains(m), "{args:?}: the error must name {m}: {err}");
            assert!(!err.contains("RANDOM"), "{args:?}: {err}");
        }
    }
    // MUE_MODEL pointing nowhere is an error too, not a fall back to another model.
    let (status, _, err) = mue_in(
        tmp.path(),
        &[("MUE_MODEL", &missing)],
        &["run", "--image", &img, "--task", "caption"],
        limit,
    );
    assert_eq!(status, Some(false), "{err}");
    assert!(err.contains(missing.to_str().unwrap()), "{err}");
    assert!(err.contains("MUE_MODEL"), "{err}");
}

#[test]
fn random_weights_only_on_request() {
    let tmp = tempfile::tempdir().unwrap();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let limit = std::time::Duration::from_secs(300);
    let (status, out, err) = mue_in(
        tmp.path(),
        &[("MUE_EXAMPLES", &examples)],
        &["demo", "--random-weights", "--examples", "1", "--json"],
        limit,
    );
    assert_eq!(status, Some(true), "{err}");
    assert!(err.contains("RANDOM"), "{err}");
    assert!(err.contains("$MUE_EXAMPLES"), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2, "{v}");
    // A model and --random-weights together are refused.
    let m = tmp.path().to_str().unwrap();
    for cmd in ["demo", "serve", "serve-bench"] {
        let (status, _, err) = mue_in(
            tmp.path(),
            &[],
            &[cmd, "--random-weights", "--model", m],
            limit,
        );
        assert_eq!(status, Some(false), "{cmd}: {err}");
        assert!(err.contains("--random-weights"), "{cmd}: {err}");
    }
}

#[test]
fn default_model_is_found_and_named() {
    let img = example();
    let args = [
        "run",
        "--image",
        &img,
        "--task",
        "entail",
        "--text",
        "there is a red circle",
        "--json",
    ];
    let limit = std::time::Duration::from_secs(300);
    // In a folder with models/default: that one.
    let cwd = tempfile::tempdir().unwrap();
    let here = cwd.path().join("models/default");
    mue::cli::demo::write_random_model(&here, 1).unwrap();
    let (status, out, err) = mue_in(cwd.path(), &[], &args, limit);
    assert_eq!(status, Some(true), "{err}");
    assert!(err.contains("models/default (working directory)"), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["mue"]["answer"].is_string(), "{v}");

    // $MUE_MODEL comes first.
    let other = tempfile::tempdir().unwrap();
    mue::cli::demo::write_random_model(other.path(), 2).unwrap();
    let (status, _, err) = mue_in(cwd.path(), &[("MUE_MODEL", other.path())], &args, limit);
    assert_eq!(status, Some(true), "{err}");
    assert!(err.contains("($MUE_MODEL)"), "{err}");
    assert!(err.contains(other.path().to_str().unwrap()), "{err}");

    // Elsewhere: models/default beside the executable, or an error listing the places
    // tried (a build folder outside the repository has none beside it).
    let bare = tempfile::tempdir().unwrap();
    let (status, _, err) = mue_in(bare.path(), &[], &args, limit);
    match beside_exe("models/default", "config.json") {
        Some(dir) => {
            assert_eq!(status, Some(true), "{err}");
            assert!(err.contains("(beside the executable)"), "{err}");
            assert!(err.contains(dir.to_str().unwrap()), "{err}");
        }
        None => {
            assert_eq!(status, Some(false), "{err}");
            assert!(
                err.contains("$MUE_MODEL") && err.contains("./models/default"),
                "{err}"
            );
        }
    }
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
    let (ok, _, err) = mue(&[
        "bench",
        "--model",
        m,
        "--steps",
        "1",
        "--workloads",
        "caption",
    ]);
    assert!(!ok && err.contains("--steps must be at least 2"), "{err}");
    let (ok, _, err) = mue(&["bench", "--model", "/nonexistent/model"]);
    assert!(!ok && err.contains("does not exist"), "{err}");
}

/// `--precision int8` against f32 on the shipped model's test examples (the generated
/// benchmark's test split, seed 0, as in the model card), full depth and with its exits:
/// the same entailment label on at least 97% of 120 questions and the same caption on at
/// least 90% of 40 images (measured on the whole split: 589 of 590 labels and 197 of 200
/// captions at full depth; README).
#[test]
fn int8_agrees_with_f32_on_the_shipped_model() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("models/default");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let gen = [
        "data", "generate", "--out", d, "--seed", "0", "--train", "1", "--valid", "1", "--test",
        "200",
    ];
    let (ok, _, err) = mue(&gen);
    assert!(ok, "{err}");
    let predictions = |task: &str, policy: &str, limit: &str, precision: &str| {
        let file = if task == "entail" {
            "snli_ve_test.tsv"
        } else {
            "caption_test.tsv"
        };
        let out = dir
            .path()
            .join(format!("{task}-{policy}-{precision}.jsonl"));
        let data = dir.path().join(file);
        let (ok, _, err) = mue(&[
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--task",
            task,
            "--policy",
            policy,
            "--limit",
            limit,
            "--quiet",
            "--precision",
            precision,
            "--predictions",
            out.to_str().unwrap(),
        ]);
        assert!(ok, "{err}");
        std::fs::read_to_string(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["prediction"].clone())
            .collect::<Vec<_>>()
    };
    for (task, limit, min_share) in [("entail", "120", 0.97), ("caption", "40", 0.9)] {
        for policy in ["full", "mue"] {
            let f32s = predictions(task, policy, limit, "f32");
            let int8 = predictions(task, policy, limit, "int8");
            assert_eq!(f32s.len(), int8.len());
            let same = f32s.iter().zip(&int8).filter(|(a, b)| a == b).count();
            println!("{task} {policy}: int8 = f32 on {same} of {}", f32s.len());
            assert!(
                same as f64 >= min_share * f32s.len() as f64,
                "{task} {policy}: {same} of {}",
                f32s.len()
            );
        }
    }
    // An unknown precision is a clear error.
    let (ok, _, err) = mue(&[
        "bench",
        "--precision",
        "int4",
        "--model",
        model.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("unknown precision"), "{err}");
}

/// `mue train` names a wrong path flag before it reads any data or creates --out.
#[test]
fn train_names_a_bad_path_flag_before_reading_data() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |name: &str| tmp.path().join(name).to_str().unwrap().to_string();
    let (no_data, out, no_init) = (p("no-such-data"), p("out"), p("no-such-init"));
    let empty = p("empty");
    std::fs::create_dir(&empty).unwrap();
    let file = p("a-file");
    std::fs::write(&file, "").unwrap();
    let base = ["train", "--steps", "1", "--quiet"];
    let check = |flags: &[&str], want: &[&str]| {
        let args: Vec<&str> = base.iter().chain(flags).copied().collect();
        let (ok, _, err) = mue(&args);
        assert!(!ok, "{args:?} should fail");
        for w in want {
            assert!(err.contains(w), "{args:?}: expected '{w}' in: {err}");
        }
        assert!(
            !err.contains("cannot open"),
            "{args:?}: data read first: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    };
    // The case: a missing --init, with a --data that does not exist either.
    let init = ["--data", &no_data, "--out", &out, "--init", &no_init];
    check(&init, &["--init", &no_init]);
    // An init directory without a model in it.
    check(
        &["--data", &no_data, "--out", &out, "--init", &empty],
        &[&empty, "config.json"],
    );
    check(
        &["--data", &no_data, "--out", &out, "--resume"],
        &["--resume", "train_state.json"],
    );
    check(&["--data", &no_data, "--out", &file], &["--out", &file]);
    check(&["--data", &no_data, "--out", &out], &["--data", &no_data]);
    assert!(
        !Path::new(&out).exists(),
        "--out was created by a failed run"
    );
}
