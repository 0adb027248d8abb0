//! Evaluation, sweeps, calibration and the prediction-based policies on the random engine
//! and a few generated benchmark examples.

use mue::cli::demo::{random_engine, write_random_model};
use mue::cli::eval::{
    calibrate_with, eval_with, sweep_with, CalibrateArgs, DataArgs, EvalArgs, PolicyKind, SweepArgs,
};
use mue::cli::report::{report_with, ReportArgs};
use mue::cli::ExitArgs;
use mue::data::{generate, GenerateOptions};
use mue::eval::eval::{evaluate, oracle, quality, quality_and_scores, run, Dataset, EvalOptions};
use mue::eval::report::Ablation;
use mue::eval::sweep::{sweep, PolicySpec};
use mue::exit::{
    DecoderThreshold, EntropyPolicy, FullDepth, JointSpec, MarginPolicy, MuePolicy, MueSpec,
    PatiencePolicy, StaticDepth, StaticSpec,
};
use mue::generate::SearchConfig;
use mue::pipeline::{Engine, EntailRequest};
use mue::task::{Task, TaskThresholds, VE_ANSWERS};
use std::path::{Path, PathBuf};

fn data_dir(n_val: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    generate(&GenerateOptions {
        out_dir: dir.path().to_path_buf(),
        seed: 7,
        n_train: 0,
        n_val,
        n_test: 0,
        image_size: 64,
    })
    .unwrap();
    dir
}

fn ve_path(dir: &Path) -> PathBuf {
    dir.join("snli_ve_valid.tsv")
}

fn cap_path(dir: &Path) -> PathBuf {
    dir.join("caption_valid.tsv")
}

fn opts() -> EvalOptions {
    EvalOptions {
        batch: 3,
        search: SearchConfig {
            beam: 2,
            max_len: 5,
            ..SearchConfig::default()
        },
        progress: false,
        premise: false,
    }
}

fn engine() -> Engine {
    random_engine(3).unwrap()
}

#[test]
fn scoring_pass_fills_predictions_and_counts_their_macs() {
    let e = engine();
    let dir = data_dir(2);
    let Dataset::Entail(rows) = Dataset::load(&ve_path(dir.path()), Task::Entail, Some(2)).unwrap()
    else {
        panic!()
    };
    let reqs: Vec<EntailRequest> = rows
        .iter()
        .map(|r| EntailRequest {
            image: image::DynamicImage::ImageRgb8(r.image.clone()),
            hypothesis: r.hypothesis.clone(),
            premise: None,
        })
        .collect();
    let cfg = &e.model.cfg;
    let (l, d, v) = (
        cfg.decoder_layers as u64,
        cfg.d_model as u64,
        cfg.vocab_size as u64,
    );
    let answers: Vec<Vec<u32>> = VE_ANSWERS
        .iter()
        .map(|a| e.tokenizer.encode(a).unwrap())
        .collect();
    // The fair form projects onto the answer tokens allowed at each scored position only.
    let outputs: u64 = if answers.iter().all(|a| a.len() == 1) {
        let mut first: Vec<u32> = answers.iter().map(|a| a[0]).collect();
        first.sort_unstable();
        first.dedup();
        first.len() as u64
    } else {
        let mut n = 0u64;
        for a in &answers {
            for j in 0..a.len() {
                let mut allowed: Vec<u32> = answers
                    .iter()
                    .filter(|o| o.len() > j && o[..j] == a[..j])
                    .map(|o| o[j])
                    .collect();
                allowed.sort_unstable();
                allowed.dedup();
                n += allowed.len() as u64;
            }
        }
        n
    };
    assert!(
        outputs < v,
        "the answers are a small part of the vocabulary"
    );
    let full = e.entail(&reqs, &FullDepth).unwrap();
    // Never exits, but pays for a projection onto the answers per scored position and layer.
    let never = e.entail(&reqs, &EntropyPolicy::new(-1.0).unwrap()).unwrap();
    for (f, n) in full.iter().zip(&never) {
        assert_eq!(n.exits, f.exits);
        assert_eq!(n.label, f.label);
        assert_eq!(n.cost.macs_full, f.cost.macs_full);
        assert_eq!(
            n.cost.macs_executed,
            f.cost.macs_executed + (l - 1) * d * outputs
        );
    }
    // The baselines read the three-way distribution over the answers, whose entropy is at
    // most ln 3 (the random model's full-vocabulary entropy is near ln V): a threshold just
    // above ln 3 exits every row after layer 1, one just below it does not for a random model.
    let ln3 = 3f32.ln();
    for o in e
        .entail(&reqs, &EntropyPolicy::new(ln3 + 1e-4).unwrap())
        .unwrap()
    {
        assert_eq!(o.exits.token_layers, vec![1]);
    }
    // A margin over three answers is at most 1 and positive unless two tie.
    for o in e.entail(&reqs, &MarginPolicy::new(1.0).unwrap()).unwrap() {
        assert_eq!(o.exits.token_layers, vec![cfg.decoder_layers]);
    }
    // Predictions are present: every prediction policy can exit after the first layer.
    let first_entropy = EntropyPolicy::new(1e9).unwrap();
    let first_margin = MarginPolicy::new(-1.0).unwrap();
    let first_patience = PatiencePolicy { patience: 0 };
    let policies: [&dyn mue::exit::ExitPolicy; 3] =
        [&first_entropy, &first_margin, &first_patience];
    for p in policies {
        for o in e.entail(&reqs, p).unwrap() {
            assert_eq!(o.exits.token_layers, vec![1], "{}", p.name());
            // Decoder-only policies leave the encoder streams at full depth.
            assert_eq!(o.exits.image_layer, cfg.encoder_layers);
            assert_eq!(o.exits.text_layer, cfg.encoder_layers);
            assert!(o.cost.macs_executed < o.cost.macs_full);
        }
    }
    // Patience 1 needs two agreeing layers: never exits after layer 1.
    for o in e.entail(&reqs, &PatiencePolicy { patience: 1 }).unwrap() {
        assert!(o.exits.token_layers[0] >= 2);
    }
}

#[test]
fn entail_eval_reports_reductions() {
    let e = engine();
    let dir = data_dir(3);
    let data = Dataset::load(&ve_path(dir.path()), Task::Entail, None).unwrap();
    assert!(data.len() >= 6);
    let full = evaluate(&e, &data, &FullDepth, &opts()).unwrap();
    assert_eq!(full.examples, data.len());
    assert_eq!(full.reduction.layers, 0.0);
    assert_eq!(full.reduction.macs, 0.0);
    assert_eq!(full.relative_quality, 1.0);
    assert_eq!(full.exits.mean_image_layer, 6.0);
    assert_eq!(full.exits.mean_token_layer, 6.0);
    assert_eq!(full.exits.mean_tokens, 1.0);
    let acc = full.quality.accuracy.unwrap();
    assert!((0.0..=1.0).contains(&acc));

    let shallow = StaticDepth {
        image: 1,
        text: 2,
        decoder: 3,
    };
    let r = evaluate(&e, &data, &shallow, &opts()).unwrap();
    assert_eq!(r.exits.mean_image_layer, 1.0);
    assert_eq!(r.exits.mean_text_layer, 2.0);
    assert_eq!(r.exits.mean_token_layer, 3.0);
    // (1 + 2 + 3) of 18 layer units.
    assert!((r.reduction.layers - (1.0 - 6.0 / 18.0)).abs() < 1e-12);
    assert!(r.reduction.macs > 0.3 && r.reduction.macs < 1.0);
    assert!(r.reduction.wall < 1.0);
    let [lo, hi] = r.relative_quality_interval.unwrap();
    assert!(
        lo <= r.relative_quality && r.relative_quality <= hi,
        "{lo} {hi}"
    );
    assert_eq!(full.relative_quality_interval, Some([1.0, 1.0]));
    // The JSON is what the CLI writes.
    let json = serde_json::to_value(&r).unwrap();
    assert!(json["reduction"]["macs"].is_number());
    assert_eq!(json["metric"], "accuracy");
}

#[test]
fn premise_enters_the_prompt_only_when_asked() {
    let e = engine();
    let dir = data_dir(1);
    let data = Dataset::load(&ve_path(dir.path()), Task::Entail, None).unwrap();
    let bare = mue::eval::eval::run(&e, &data, &FullDepth, &opts()).unwrap();
    let with = mue::eval::eval::run(
        &e,
        &data,
        &FullDepth,
        &EvalOptions {
            premise: true,
            ..opts()
        },
    )
    .unwrap();
    // The premise lengthens the encoder text, so full-depth work grows on every row.
    for (b, w) in bare.examples.iter().zip(&with.examples) {
        assert!(
            w.macs_full > b.macs_full,
            "{} vs {}",
            w.macs_full,
            b.macs_full
        );
    }
}

#[test]
fn caption_eval_scores_against_references() {
    let e = engine();
    let dir = data_dir(2);
    let data = Dataset::load(&cap_path(dir.path()), Task::Caption, None).unwrap();
    assert_eq!(data.len(), 2);
    let full = run(&e, &data, &FullDepth, &opts()).unwrap();
    let q = quality(&data, &full).unwrap();
    assert_eq!(Some(q.primary), q.cider);
    // The per-image scores the bootstrap resamples average to the corpus CIDEr-D.
    let (q2, per_image) = quality_and_scores(&data, &full).unwrap();
    assert_eq!(q2, q);
    let mean = per_image.iter().sum::<f64>() / per_image.len() as f64;
    assert!((mean - q.primary).abs() < 1e-9, "{mean} vs {}", q.primary);
    assert!(q.bleu4.is_some() && q.rouge_l.is_some());
    let r = evaluate(
        &e,
        &data,
        &MuePolicy::new(-2.0, -2.0, -2.0).unwrap(),
        &opts(),
    )
    .unwrap();
    assert_eq!(r.exits.mean_image_layer, 1.0);
    assert_eq!(r.exits.mean_token_layer, 1.0);
    assert!(r.exits.mean_tokens >= 1.0);
    assert!(r.reduction.macs > 0.5);
    assert_eq!(r.full_quality, q);
}

#[test]
fn oracle_depth_reproduces_full_depth_outputs() {
    let e = engine();
    let dir = data_dir(2);
    let data = Dataset::load(&ve_path(dir.path()), Task::Entail, None).unwrap();
    let o = oracle(&e, &data, &opts()).unwrap();
    assert_eq!(o.depths.len(), data.len());
    assert_eq!(o.histogram.iter().sum::<usize>(), data.len());
    assert_eq!(o.quality, o.full_quality);
    let full = run(&e, &data, &FullDepth, &opts()).unwrap();
    for k in 1..=6usize {
        let r = run(
            &e,
            &data,
            &StaticDepth {
                image: k,
                text: k,
                decoder: k,
            },
            &opts(),
        )
        .unwrap();
        for (i, &d) in o.depths.iter().enumerate() {
            if d == k {
                assert!(
                    r.same_output(&full, i),
                    "example {i} at its oracle depth {k}"
                );
            }
            if k < d {
                assert!(
                    !r.same_output(&full, i),
                    "example {i}: depth {k} < oracle {d}"
                );
            }
        }
    }
    assert!(o.reduction.macs >= 0.0);
}

fn data_args(dir: &Path, task: Task) -> DataArgs {
    DataArgs {
        model: Some(PathBuf::from("<random>")),
        data: match task {
            Task::Entail => ve_path(dir),
            Task::Caption => cap_path(dir),
        },
        task,
        limit: None,
        batch: 4,
        beam: 2,
        max_len: 5,
        quiet: true,
        premise: false,
        images: None,
    }
}

/// The registry is the one list: a point of every registered family is swept, written to
/// the CSV and drawn in the family's own colour (an added family cannot go missing).
#[test]
fn every_registered_family_appears_in_sweeps_and_plots() {
    let e = engine();
    let dir = data_dir(1);
    let out = tempfile::tempdir().unwrap();
    let layers = e.model.cfg.decoder_layers;
    let grid: Vec<PolicySpec> = mue::exit::FAMILIES
        .iter()
        .map(|f| (f.grid)(layers)[0])
        .collect();
    let data = Dataset::load(&ve_path(dir.path()), Task::Entail, Some(1)).unwrap();
    let res = sweep(&e, &data, &grid, &opts()).unwrap();
    let files = mue::eval::sweep::write_outputs(&res, out.path()).unwrap();
    let csv = std::fs::read_to_string(out.path().join("sweep_entail.csv")).unwrap();
    let svg = files
        .iter()
        .find(|f| f.extension().unwrap() == "svg")
        .unwrap();
    let svg = std::fs::read_to_string(svg).unwrap().to_lowercase();
    let chart = mue::eval::sweep::chart(&res);
    assert_eq!(chart.series.len(), mue::exit::FAMILIES.len());
    for f in mue::exit::FAMILIES {
        assert!(res.points.iter().any(|p| p.family == f.name), "{}", f.name);
        assert!(
            csv.contains(&format!("entail,{},", f.name)),
            "{}: {csv}",
            f.name
        );
        let (r, g, b) = f.style.color;
        let hex = format!("#{r:02x}{g:02x}{b:02x}");
        assert!(svg.contains(&hex), "{}: colour {hex} not drawn", f.name);
    }
}

#[test]
fn sweep_writes_csv_json_and_plots() {
    let e = engine();
    let dir = data_dir(2);
    let out = tempfile::tempdir().unwrap();
    let grid = out.path().join("grid.json");
    let specs = vec![
        PolicySpec::Full(FullDepth),
        PolicySpec::Mue(MueSpec {
            image: 0.5,
            text: 0.5,
            decoder: DecoderThreshold::Constant { tau: 0.5 },
        }),
        // The paper's decoder schedule: exits never happen in the strict part.
        PolicySpec::Mue(MueSpec {
            image: 1.0,
            text: 1.0,
            decoder: DecoderThreshold::Calm {
                tau: -2.0,
                strict_fraction: 0.5,
                decay: 0.9,
            },
        }),
        PolicySpec::Joint(JointSpec {
            encoder: -2.0,
            decoder: DecoderThreshold::Constant { tau: 1.0 },
        }),
        PolicySpec::Entropy(EntropyPolicy { threshold: 1e9 }),
        PolicySpec::Patience(PatiencePolicy { patience: 1 }),
        PolicySpec::Margin(MarginPolicy { threshold: 0.5 }),
        PolicySpec::Static(StaticSpec { depth: 2 }),
    ];
    std::fs::write(&grid, serde_json::to_string(&specs).unwrap()).unwrap();
    for task in [Task::Entail, Task::Caption] {
        let args = SweepArgs {
            data: data_args(dir.path(), task),
            policies: vec![],
            grid: Some(grid.clone()),
            kv_fill: "propagate".into(),
            out_dir: out.path().join("sweep"),
        };
        let (res, files) = sweep_with(&e, &args).unwrap();
        assert_eq!(res.points.len(), specs.len());
        assert!(!res.frontier.is_empty());
        // Full depth is on the frontier unless another point has its quality for less work.
        let full = &res.points[0];
        assert_eq!(full.mac_reduction, 0.0);
        assert_eq!(full.quality, res.full_quality.primary);
        for &i in &res.frontier {
            assert!(res.points[i].on_frontier);
        }
        let names: Vec<String> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        let stem = match task {
            Task::Entail => "sweep_entail",
            Task::Caption => "sweep_caption",
        };
        for ext in ["csv", "json", "svg"] {
            assert!(names.contains(&format!("{stem}.{ext}")), "{names:?}");
        }
        for f in &files {
            assert!(std::fs::metadata(f).unwrap().len() > 0);
        }
        let csv = std::fs::read_to_string(out.path().join(format!("sweep/{stem}.csv"))).unwrap();
        assert_eq!(csv.lines().count(), specs.len() + 1);
        // The schedule is in the sweep's output and reads back as itself.
        assert!(csv.contains("image=1 text=1 decoder=-2 strict=0.5 decay=0.9"));
        let json = std::fs::read_to_string(out.path().join(format!("sweep/{stem}.json"))).unwrap();
        let back: mue::eval::sweep::SweepResult = serde_json::from_str(&json).unwrap();
        assert_eq!(back.points[2].spec, specs[2]);
        let sched = &res.points[2].report.exits;
        if task == Task::Caption {
            // Tokens in the first half of the maximum length run in full; later ones may
            // leave after layer 1 (tau -2 is below any similarity).
            assert!(sched.mean_token_layer < sched.decoder_layers as f64);
            assert!(sched.mean_token_layer > 1.0);
        } else {
            // Teacher-forced scoring is step 0: the schedule never exits there.
            assert_eq!(sched.mean_token_layer, sched.decoder_layers as f64);
        }
        let svg = std::fs::read_to_string(out.path().join(format!("sweep/{stem}.svg"))).unwrap();
        assert!(svg.contains("<svg"));
    }
    // Restricting families.
    let args = SweepArgs {
        data: data_args(dir.path(), Task::Entail),
        policies: vec!["static".into()],
        grid: None,
        kv_fill: "propagate".into(),
        out_dir: out.path().join("s2"),
    };
    let (res, _) = sweep_with(&e, &args).unwrap();
    assert_eq!(res.points.len(), 5);
    assert!(res.points.iter().all(|p| p.family == "static"));
}

#[test]
fn calibration_never_picks_a_point_below_target_on_its_split() {
    let e = engine();
    let dir = data_dir(3);
    let out = tempfile::tempdir().unwrap();
    let grid = out.path().join("grid.json");
    let mut specs = Vec::new();
    for t in [-2.0f32, 0.5, 1.0] {
        specs.push(PolicySpec::Mue(MueSpec {
            image: t,
            text: t,
            decoder: DecoderThreshold::Constant { tau: t },
        }));
        specs.push(PolicySpec::Mue(MueSpec {
            image: t,
            text: 1.0,
            decoder: DecoderThreshold::Constant { tau: 1.0 },
        }));
        specs.push(PolicySpec::Joint(JointSpec {
            encoder: t,
            decoder: DecoderThreshold::Constant { tau: 1.0 },
        }));
    }
    std::fs::write(&grid, serde_json::to_string(&specs).unwrap()).unwrap();
    let exits = out.path().join("model/exits.json");
    let data = Dataset::load(&ve_path(dir.path()), Task::Entail, None).unwrap();
    let saved = out.path().join("cal/sweep_entail.json");
    for (k, target) in [1.0, 0.99, 0.8, 0.5].into_iter().enumerate() {
        // The first target runs the sweep and saves it; the others reuse it.
        let args = CalibrateArgs {
            data: data_args(dir.path(), Task::Entail),
            target: Some(target),
            budget: None,
            delta: None,
            lower_bound: false,
            sweep: (k > 0).then(|| saved.clone()),
            grid: Some(grid.clone()),
            kv_fill: "propagate".into(),
            out: Some(exits.clone()),
            sweep_out: Some(out.path().join("cal")),
        };
        let cal = calibrate_with(&e, &args).unwrap();
        // Re-evaluate the chosen thresholds on the calibration split.
        let r = evaluate(&e, &data, &cal.policy, &opts()).unwrap();
        assert!(
            r.quality.primary >= target * r.full_quality.primary,
            "target {target}: {} vs full {}",
            r.quality.primary,
            r.full_quality.primary
        );
        assert_eq!(r.quality.primary, cal.point.quality);
        let stored = TaskThresholds::for_model(&out.path().join("model")).unwrap();
        assert_eq!(stored.entail, cal.policy);
        assert_eq!(stored.caption, TaskThresholds::default().caption);
    }
    // Budget: from the saved sweep, at most half the full-depth multiply-adds.
    let args = CalibrateArgs {
        data: data_args(dir.path(), Task::Entail),
        target: None,
        budget: Some(0.5),
        delta: None,
        lower_bound: false,
        sweep: Some(out.path().join("cal/sweep_entail.json")),
        grid: None,
        kv_fill: "propagate".into(),
        out: Some(exits.clone()),
        sweep_out: None,
    };
    let cal = calibrate_with(&e, &args).unwrap();
    assert!(1.0 - cal.point.mac_reduction <= 0.5);

    // Every point's accuracy loss is covered by the answers it harmed; the never-exit
    // points harm nothing.
    let sweep: mue::eval::sweep::SweepResult =
        serde_json::from_str(&std::fs::read_to_string(&saved).unwrap()).unwrap();
    let n = sweep.examples as f64;
    for p in &sweep.points {
        let h = p.harmed.expect("the sweep records harmed outputs") as f64;
        assert!(h <= n);
        assert!(
            sweep.full_quality.primary - p.quality <= h / n + 1e-9,
            "{}",
            p.params
        );
        if p.params.contains("image=1 text=1 decoder=1") {
            assert_eq!(h, 0.0, "{}", p.params);
        }
    }
    // With --delta the pick is certified at the Bonferroni level, or the command says why not.
    let mut args = args;
    args.budget = None;
    args.target = Some(0.5);
    args.delta = Some(0.5);
    match calibrate_with(&e, &args) {
        Ok(cal) => {
            let m = sweep.points.len() as f64;
            assert!(cal.p_value.unwrap() <= 0.5 / m);
            assert!(cal.point.quality >= 0.5 * cal.full_quality);
        }
        Err(err) => assert!(err.to_string().contains("can be certified"), "{err}"),
    }
    args.budget = Some(0.5);
    let err = calibrate_with(&e, &args).unwrap_err().to_string();
    assert!(
        err.contains("--target or --budget") || err.contains("--delta"),
        "{err}"
    );
    // --lower-bound: the chosen point's whole interval clears the target, and it is never
    // cheaper than the point the estimate alone would pick.
    args.budget = None;
    args.delta = None;
    for target in [0.99, 0.9, 0.7] {
        args.target = Some(target);
        args.lower_bound = false;
        let plain = calibrate_with(&e, &args).unwrap();
        args.lower_bound = true;
        let lb = calibrate_with(&e, &args).unwrap();
        assert_eq!(
            lb.objective,
            mue::eval::calibrate::Objective::LowerBound(target)
        );
        let [lo, _] = lb.point.report.relative_quality_interval.unwrap();
        assert!(lo >= target, "target {target}: lower end {lo}");
        assert!(lb.point.mac_reduction <= plain.point.mac_reduction);
    }
}

#[test]
fn eval_command_runs_each_policy_kind() {
    let e = engine();
    let dir = data_dir(1);
    let out = tempfile::tempdir().unwrap();
    // Every registered family, and the oracle.
    let kinds = <PolicyKind as clap::ValueEnum>::value_variants();
    assert_eq!(kinds.len(), mue::exit::FAMILIES.len() + 1);
    for &kind in kinds {
        let path = out.path().join(format!("{}.json", kind.name()));
        let preds = out.path().join(format!("{}.jsonl", kind.name()));
        let args = EvalArgs {
            data: data_args(dir.path(), Task::Entail),
            policy: kind,
            threshold: Some(0.5),
            patience: 2,
            depth: 3,
            exits: ExitArgs::default(),
            load: Default::default(),
            out: Some(path.clone()),
            predictions: (kind != PolicyKind::Oracle).then(|| preds.clone()),
        };
        let v = eval_with(&e, &args, TaskThresholds::default()).unwrap();
        if kind != PolicyKind::Oracle {
            // One JSON line per example, in split order.
            let text = std::fs::read_to_string(&preds).unwrap();
            let rows: Vec<serde_json::Value> = text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            assert_eq!(rows.len() as u64, v["examples"].as_u64().unwrap());
            assert!(rows.iter().all(|r| r["prediction"].is_string()));
            // The generator's metadata is beside the split: tiers partition the examples and
            // their accuracies average to the overall one.
            let groups = v["breakdown"].as_array().expect("breakdown");
            let tiers: Vec<&serde_json::Value> = groups
                .iter()
                .filter(|g| g["group"].as_str().unwrap().starts_with("tier="))
                .collect();
            let n: u64 = tiers.iter().map(|g| g["examples"].as_u64().unwrap()).sum();
            assert_eq!(n, v["examples"].as_u64().unwrap());
            let hits: f64 = tiers
                .iter()
                .map(|g| g["accuracy"].as_f64().unwrap() * g["examples"].as_f64().unwrap())
                .sum();
            let acc = v["quality"]["accuracy"].as_f64().unwrap();
            assert!(
                (hits / n as f64 - acc).abs() < 1e-9,
                "{hits} / {n} vs {acc}"
            );
        }
        let back: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        // serde_json may differ in the last digit of a float: compare the report's fields.
        assert_eq!(v["policy"], back["policy"]);
        assert_eq!(v["examples"], back["examples"]);
        assert_eq!(v["quality"]["primary"], back["quality"]["primary"]);
        // Prediction policies pay for vocabulary projections: MACs may go up, never past 1.
        assert!(v["reduction"]["macs"].as_f64().unwrap() < 1.0, "{kind:?}");
    }
    let mut args = EvalArgs {
        data: data_args(dir.path(), Task::Entail),
        policy: PolicyKind::Family("entropy"),
        threshold: None,
        patience: 2,
        depth: 3,
        exits: ExitArgs::default(),
        load: Default::default(),
        out: None,
        predictions: None,
    };
    assert!(eval_with(&e, &args, TaskThresholds::default()).is_err());
    args.policy = PolicyKind::Family("static");
    args.depth = 0;
    assert!(eval_with(&e, &args, TaskThresholds::default()).is_err());
}

#[test]
fn sweep_module_runs_directly() {
    let e = engine();
    let dir = data_dir(1);
    let data = Dataset::load(&ve_path(dir.path()), Task::Entail, Some(2)).unwrap();
    assert_eq!(data.len(), 2);
    let res = sweep(
        &e,
        &data,
        &[PolicySpec::Static(StaticSpec { depth: 1 })],
        &opts(),
    )
    .unwrap();
    assert_eq!(res.points[0].report.exits.mean_image_layer, 1.0);
    assert!(sweep(&e, &data, &[], &opts()).is_err());
}

fn report_args(root: &Path, data: &Path) -> ReportArgs {
    ReportArgs {
        model: Some(root.join("model")),
        data: Some(data.to_path_buf()),
        ablation_model: Some(root.join("ablation")),
        variants: vec![format!(
            "Same weights again={}",
            root.join("ablation").display()
        )],
        results: root.join("results"),
        out: root.join("docs/results.md"),
        tasks: vec![Task::Entail, Task::Caption],
        limit: Some(3),
        caption_limit: Some(2),
        entail_target: 0.99,
        caption_target: 0.96,
        lower_bound: vec![Task::Caption],
        entail_grid: Some(root.join("cal.json")),
        caption_grid: Some(root.join("cal.json")),
        sweep_grid: Some(root.join("sweep.json")),
        batch: 4,
        beam: 2,
        max_len: 5,
        kv_fill: "propagate".into(),
        render_only: false,
        quiet: true,
    }
}

#[test]
fn report_runs_end_to_end_and_writes_page_and_results() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let bench = r.join("bench");
    generate(&GenerateOptions {
        out_dir: bench.clone(),
        seed: 7,
        n_train: 0,
        n_val: 2,
        n_test: 2,
        image_size: 64,
    })
    .unwrap();
    // The same tiny model twice: the ablation row must then equal the MuE row.
    write_random_model(&r.join("model"), 3).unwrap();
    write_random_model(&r.join("ablation"), 3).unwrap();
    let m = |i: f32, t: f32, d: f32| {
        PolicySpec::Mue(MueSpec {
            image: i,
            text: t,
            decoder: DecoderThreshold::Constant { tau: d },
        })
    };
    let cal = vec![m(0.5, 0.5, 0.5), m(-2.0, 1.0, 1.0)];
    std::fs::write(r.join("cal.json"), serde_json::to_string(&cal).unwrap()).unwrap();
    let sweep_grid = vec![
        PolicySpec::Entropy(EntropyPolicy { threshold: 1e9 }),
        PolicySpec::Patience(PatiencePolicy { patience: 1 }),
        PolicySpec::Margin(MarginPolicy { threshold: 0.5 }),
        PolicySpec::Joint(JointSpec {
            encoder: -2.0,
            decoder: DecoderThreshold::Constant { tau: 1.0 },
        }),
        m(-2.0, -2.0, -2.0),
        PolicySpec::Static(StaticSpec { depth: 1 }),
    ];
    std::fs::write(
        r.join("sweep.json"),
        serde_json::to_string(&sweep_grid).unwrap(),
    )
    .unwrap();
    let args = report_args(r, &bench);
    let (data, page) = report_with(&args).unwrap();
    assert_eq!(page, r.join("docs/results.md"));
    let text = std::fs::read_to_string(&page).unwrap();
    for s in [
        "## Summary, laid out as the paper's table",
        "## Visual entailment",
        "## Captioning",
        "| Full model (6+6 layers) |",
        "| Smaller model (static depth 4) | depth=4 |",
        "| Smaller model (static depth 2) | depth=2 |",
        "| DeeBERT (entropy) | threshold=1000000000;",
        "| PABEE (patience) | patience=1;",
        "| CALM (softmax margin) | threshold=0.5;",
        "| **MuE** |",
        "| MuE w/o modality decomposition (`joint`) | encoder=-2 decoder=1;",
        "| MuE w/o layer-wise loss |",
        "](../results/sweep/sweep_entail.",
        "](../results/sweep/sweep_caption.",
        "(`nproc`)",
        "mue report --model ",
        " --lower-bound caption ",
        "--task caption --limit 2 --batch 4 --beam 2 --max-len 5 --target 0.96 --lower-bound --grid",
        "for CIDEr-D (the lower end of the point's 90% paired-bootstrap interval there",
        "baseline points of the test sweep",
        // Every baseline's point is picked on valid, and the page gives the command.
        "on valid |",
        "Neither MuE nor any baseline is chosen on test",
        "grid_entail_valid_baselines.json --kv-fill propagate --out-dir ",
        // The variant: a row in both tables, its own full depth, its commands.
        "| Same weights again | ",
        "Full-depth accuracy of the other models:\n\n- Same weights again: ",
        " --variant 'Same weights again=",
        "variants/same-weights-again/entail_test_mue.json",
        // Per difficulty tier, from the benchmark's meta_test.tsv.
        "**Per difficulty tier and question type**",
        "| tier=",
    ] {
        assert!(text.contains(s), "page lacks {s:?}:\n{text}");
    }
    assert!(!text.contains("not run"));
    let res = r.join("results");
    for f in [
        "report.json",
        "report/exits.json",
        "report/grid_entail_calibrate.json",
        "report/grid_entail_test.json",
        "report/grid_caption_test.json",
        "calibrate_entail/sweep_entail.json",
        "calibrate_caption/sweep_caption.csv",
        "sweep/sweep_entail.csv",
        "sweep/sweep_entail.json",
        "sweep/sweep_entail.svg",
        "sweep/sweep_caption.json",
        "ablation/exits.json",
        "ablation/calibrate_entail/sweep_entail.json",
        "ablation/entail_test_mue.json",
        "ablation/caption_test_mue.json",
        "variants/same-weights-again/exits.json",
        "variants/same-weights-again/calibrate_caption/sweep_caption.json",
        "variants/same-weights-again/entail_test_mue.json",
        "variants/same-weights-again/caption_test_mue.json",
        "report/grid_entail_valid_baselines.json",
        "valid_baselines/sweep_entail.json",
        "valid_baselines/sweep_caption.json",
    ] {
        let p = res.join(f);
        assert!(
            std::fs::metadata(&p).map(|m| m.len() > 0).unwrap_or(false),
            "{f}"
        );
    }
    assert_eq!(data.tasks.len(), 2);
    for t in &data.tasks {
        let limit = if t.task == Task::Entail { 3 } else { 2 };
        assert_eq!(t.sweep.examples, limit);
        assert_eq!(t.valid_examples, limit);
        // Calibration keeps the target on valid, and its point is in the test sweep.
        let c = &t.calibration;
        assert!(c.point.quality >= t.target * c.full_quality);
        let on_test = t
            .sweep
            .points
            .iter()
            .find(|p| p.spec == c.point.spec)
            .expect("calibrated point in the test sweep");
        assert!(t
            .sweep
            .points
            .iter()
            .any(|p| p.spec == PolicySpec::Full(FullDepth)));
        // The baselines were swept on valid, and each family's pick there is on test.
        let v = t.valid_sweep.as_ref().expect("baselines swept on valid");
        assert_eq!(v.examples, limit);
        assert!(v.points.iter().all(|p| p.family != "mue"));
        for fam in ["entropy", "patience", "margin", "joint"] {
            let (i, _) = mue::eval::report::pick_family(v, fam, t.objective()).unwrap();
            assert!(t.sweep.points.iter().any(|p| p.spec == v.points[i].spec));
        }
        // Same weights: the ablation calibrates to the same point and scores the same.
        match &t.ablation {
            Ablation::Run {
                calibration,
                report,
            } => {
                assert_eq!(calibration.point.spec, c.point.spec);
                assert_eq!(report.quality.primary, on_test.quality);
                assert_eq!(report.reduction.macs, on_test.mac_reduction);
                assert_eq!(report.full_quality.primary, t.sweep.full_quality.primary);
            }
            Ablation::NotRun { reason } => panic!("ablation not run: {reason}"),
        }
        // The variant too, and the breakdown covers every test example once per tier.
        assert_eq!(t.variants.len(), 1);
        let v = &t.variants[0];
        assert_eq!(v.calibration.point.spec, c.point.spec);
        assert_eq!(v.report.quality.primary, on_test.quality);
        assert_eq!(v.report.reduction.macs, on_test.mac_reduction);
        let groups = t.breakdown.as_ref().expect("breakdown from meta_test.tsv");
        let tiers: usize = groups
            .iter()
            .filter(|g| g.group.starts_with("tier="))
            .map(|g| g.examples)
            .sum();
        assert_eq!(tiers, limit);
        // ... from the calibrated point's own outputs: the tiers add up to its test figures.
        let tier_groups = groups.iter().filter(|g| g.group.starts_with("tier="));
        if t.task == Task::Entail {
            let hits: f64 = tier_groups
                .clone()
                .map(|g| g.accuracy.unwrap() * g.examples as f64)
                .sum();
            assert!((hits / limit as f64 - on_test.quality).abs() < 1e-9);
            let full_hits: f64 = tier_groups
                .map(|g| g.full_accuracy.unwrap() * g.examples as f64)
                .sum();
            let full = t.sweep.full_quality.primary;
            assert!((full_hits / limit as f64 - full).abs() < 1e-9);
        } else {
            assert!(tier_groups.clone().all(|g| g.accuracy.is_none()));
        }
    }
    // The written exits are the calibrated thresholds; the model's own folder is untouched.
    let exits = TaskThresholds::for_model(&res.join("report")).unwrap();
    assert_eq!(exits.entail, data.tasks[0].calibration.policy);
    assert!(!r.join("model/exits.json").exists());

    // Re-rendering from report.json gives the same page, without the models.
    std::fs::remove_file(&page).unwrap();
    let mut again = args.clone();
    again.render_only = true;
    again.model = Some(r.join("gone"));
    again.data = None;
    report_with(&again).unwrap();
    assert_eq!(std::fs::read_to_string(&page).unwrap(), text);
    // Elsewhere, the plot links follow the page.
    again.out = r.join("page.md");
    report_with(&again).unwrap();
    let moved = std::fs::read_to_string(r.join("page.md")).unwrap();
    assert!(moved.contains("](results/sweep/sweep_entail."));
}

#[test]
fn report_rejects_bad_input_before_running() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let bench = data_dir(1);
    write_random_model(&r.join("model"), 3).unwrap();
    std::fs::write(r.join("cal.json"), "[]").unwrap();
    std::fs::write(r.join("sweep.json"), "[]").unwrap();
    let err = |a: &ReportArgs| format!("{:#}", report_with(a).unwrap_err());
    // No ablation model there.
    let args = report_args(r, bench.path());
    let e = err(&args);
    assert!(
        e.contains("--ablation-model") && e.contains("not a model directory"),
        "{e}"
    );
    // Variants: LABEL=DIR, a model directory, labels distinct.
    let mut a = args.clone();
    a.ablation_model = None;
    a.variants = vec!["no-equals-sign".into()];
    assert!(err(&a).contains("expected LABEL=DIR"), "{}", err(&a));
    a.variants = vec![format!("x={}", r.join("missing").display())];
    let e = err(&a);
    assert!(
        e.contains("--variant") && e.contains("not a model directory"),
        "{e}"
    );
    let m = r.join("model").display().to_string();
    a.variants = vec![format!("Final only={m}"), format!("final-only={m}")];
    assert!(
        err(&a).contains("two variants share this label"),
        "{}",
        err(&a)
    );
    a.variants = vec![format!("--={m}")];
    assert!(err(&a).contains("needs a letter or digit"), "{}", err(&a));
    // No test split in the benchmark folder.
    std::fs::remove_file(bench.path().join("snli_ve_test.tsv")).unwrap();
    let mut a = args.clone();
    a.ablation_model = None;
    a.variants.clear();
    let e = err(&a);
    assert!(e.contains("snli_ve_test.tsv is missing"), "{e}");
    a.limit = Some(0);
    assert!(err(&a).contains("--limit must be at least 1"));
    a.limit = None;
    a.entail_target = 1.5;
    assert!(err(&a).contains("--entail-target"));
    a.entail_target = 0.99;
    a.kv_fill = "nope".into();
    assert!(err(&a).contains("nope"));
    // Render-only without an earlier run.
    a.render_only = true;
    assert!(err(&a).contains("report.json"));
    // Grid flags: `default` is the built-in grid; absent, the repository's script grid.
    let mut a = report_args(r, bench.path());
    a.entail_grid = Some("default".into());
    a.sweep_grid = None;
    let c = a.config().unwrap();
    assert_eq!(c.entail_grid, None);
    assert_eq!(
        c.sweep_grid,
        Some(PathBuf::from("scripts/grid_baselines.json"))
    );
    // The binary: a clear message, no panic.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mue"))
        .args(["report", "--model"])
        .arg(r.join("model"))
        .arg("--data")
        .arg(bench.path())
        .arg("--ablation-model")
        .arg(r.join("missing"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not a model directory") && !stderr.contains("panicked"),
        "{stderr}"
    );
}

#[test]
fn decoder_schedule_from_the_command_line() {
    use mue::cli::decoder_threshold;
    let c = DecoderThreshold::Constant { tau: 0.7 };
    // --dec-threshold alone: a constant, as before.
    assert_eq!(
        decoder_threshold(c, Some(0.9), None, None),
        DecoderThreshold::Constant { tau: 0.9 }
    );
    assert_eq!(decoder_threshold(c, None, None, None), c);
    // A schedule flag: the paper's schedule around the given or stored tau.
    let s = decoder_threshold(c, None, Some(0.25), None);
    assert_eq!(
        s,
        DecoderThreshold::Calm {
            tau: 0.7,
            strict_fraction: 0.25,
            decay: mue::exit::mue::PAPER_DECAY,
        }
    );
    // Over a stored schedule, one flag changes only its own parameter.
    assert_eq!(
        decoder_threshold(s, Some(0.8), None, Some(0.5)),
        DecoderThreshold::Calm {
            tau: 0.8,
            strict_fraction: 0.25,
            decay: 0.5,
        }
    );
    let args = ExitArgs {
        dec_strict_fraction: Some(2.0),
        ..ExitArgs::default()
    };
    let e = args.policy(MuePolicy::never()).unwrap_err().to_string();
    assert!(e.contains("strict_fraction"), "{e}");
}

/// The warm-up pass leaves nothing behind: a warmed engine answers exactly as a fresh one.
#[test]
fn warm_up_changes_no_output() {
    let (fresh, warmed) = (engine(), engine());
    warmed.warm_up().unwrap();
    let s = fresh.model.cfg.image_size as u32;
    let image = image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(s, s, |x, y| {
        image::Rgb([(x * 7 % 256) as u8, (y * 5 % 256) as u8, 90])
    }));
    let policy = MuePolicy::never();
    let search = SearchConfig::default();
    let a = fresh
        .caption(std::slice::from_ref(&image), &policy, &search)
        .unwrap();
    let b = warmed
        .caption(std::slice::from_ref(&image), &policy, &search)
        .unwrap();
    assert_eq!(a[0].tokens, b[0].tokens);
    let req = |i: &image::DynamicImage| EntailRequest {
        image: i.clone(),
        hypothesis: "two red squares".into(),
        premise: None,
    };
    let a = fresh.entail(&[req(&image)], &policy).unwrap();
    let b = warmed.entail(&[req(&image)], &policy).unwrap();
    assert_eq!(a[0].probabilities, b[0].probabilities);
}
