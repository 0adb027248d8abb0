//! The page from hand-made results: rows, order, numbers, the rule, the commands.

use super::machine::overload;
use super::render::{neg, sh};
use super::run::{restrict, NEVER_EXIT};
use super::select::pct0;
use super::*;
use crate::eval::calibrate;
use crate::eval::eval::{self, percent as pct, ExitStats, Quality, Reduction};
use crate::eval::sweep::{finish, PolicySpec, SweepPoint};
use crate::exit::spec::Role;
use crate::exit::{
    DecoderThreshold, EntropyPolicy, FullDepth, JointSpec, MarginPolicy, MueSpec, PatiencePolicy,
    StaticSpec,
};

fn quality(task: Task, v: f64) -> Quality {
    match task {
        Task::Entail => Quality {
            primary: v,
            accuracy: Some(v),
            bleu4: None,
            cider: None,
            rouge_l: None,
        },
        Task::Caption => Quality {
            primary: v,
            accuracy: None,
            bleu4: Some(v / 2.0),
            cider: Some(v),
            rouge_l: Some(0.4),
        },
    }
}

fn report(task: Task, q: f64, full: f64, red: f64) -> EvalReport {
    EvalReport {
        task,
        policy: "p".into(),
        examples: 10,
        metric: eval::primary_metric(task).into(),
        quality: quality(task, q),
        full_quality: quality(task, full),
        relative_quality: q / full,
        relative_quality_interval: None,
        exits: ExitStats {
            mean_image_layer: 6.0,
            mean_text_layer: 6.0,
            mean_token_layer: 6.0,
            mean_tokens: 1.0,
            encoder_layers: 6,
            decoder_layers: 6,
        },
        // Wall and layer figures differ from MACs so the columns can be told apart.
        reduction: Reduction {
            layers: red / 2.0,
            macs: red,
            wall: red / 4.0,
        },
        wall_ms: 1.0,
        wall_ms_full: 1.0,
        cpu_ms: None,
        cpu_ms_full: None,
    }
}

fn point(task: Task, spec: PolicySpec, q: f64, full: f64, red: f64) -> SweepPoint {
    let r = report(task, q, full, red);
    SweepPoint {
        spec,
        family: spec.family().into(),
        params: spec.params(),
        quality: q,
        relative_quality: q / full,
        layer_reduction: r.reduction.layers,
        mac_reduction: red,
        wall_reduction: r.reduction.wall,
        on_frontier: false,
        on_family_frontier: false,
        harmed: None,
        report: r,
    }
}

fn mue(i: f32, t: f32, d: f32) -> PolicySpec {
    PolicySpec::Mue(MueSpec {
        image: i,
        text: t,
        decoder: DecoderThreshold::Constant { tau: d },
    })
}

fn depth(depth: usize) -> PolicySpec {
    PolicySpec::Static(StaticSpec { depth })
}

fn entropy(threshold: f32) -> PolicySpec {
    PolicySpec::Entropy(EntropyPolicy { threshold })
}

fn patience(patience: usize) -> PolicySpec {
    PolicySpec::Patience(PatiencePolicy { patience })
}

fn margin(threshold: f32) -> PolicySpec {
    PolicySpec::Margin(MarginPolicy { threshold })
}

fn joint(encoder: f32, tau: f32) -> PolicySpec {
    PolicySpec::Joint(JointSpec {
        encoder,
        decoder: DecoderThreshold::Constant { tau },
    })
}

/// Entailment at full accuracy 0.8: every baseline point below MuE's frontier unless
/// `open_static` adds a cheap, accurate static depth 1.
fn task_results(task: Task, open_static: bool) -> TaskResults {
    let full = match task {
        Task::Entail => 0.8,
        Task::Caption => 0.5,
    };
    let f = |x: f64| x * full / 0.8;
    let cal = mue(0.9, 0.99, 0.99);
    let mut pts = vec![
        (PolicySpec::Full(FullDepth), f(0.8), 0.0),
        (depth(4), f(0.76), 0.3),
        (depth(2), f(0.6), 0.6),
        (entropy(0.5), f(0.8), 0.05),
        (entropy(1.0), f(0.795), 0.2),
        (entropy(2.0), f(0.7), 0.5),
        (patience(1), f(0.7), 0.3),
        (patience(2), f(0.75), 0.1),
        (margin(0.9), f(0.793), 0.25),
        (mue(1.0, 1.0, 1.0), f(0.8), 0.0),
        (cal, f(0.795), 0.4),
        (mue(0.95, 1.0, 1.0), f(0.8), 0.2),
        (mue(0.8, 0.95, 0.95), f(0.78), 0.55),
        (mue(0.7, 0.9, 0.9), f(0.76), 0.65),
        (mue(0.5, 0.5, 0.5), f(0.7), 0.8),
        (joint(0.95, 0.99), f(0.795), 0.15),
    ];
    if open_static {
        pts.push((depth(1), f(0.8), 0.9));
    }
    let points = pts
        .into_iter()
        .map(|(s, q, r)| point(task, s, q, full, r))
        .collect();
    let sweep = finish(task, 10, quality(task, full), points);
    let cal_point = point(task, cal, f(0.8), full, 0.45);
    TaskResults {
        task,
        encoder_layers: 6,
        decoder_layers: 6,
        target: 0.99,
        valid_examples: 12,
        calibration_points: 7,
        calibration: Calibration {
            task,
            objective: Objective::Target(0.99),
            policy: cal.as_mue().unwrap(),
            point: cal_point,
            full_quality: full,
            examples: 10,
            p_value: None,
        },
        objective: None,
        decoder_forms: Vec::new(),
        valid_sweep: None,
        sweep,
        plot_file: Some(format!("results/sweep/sweep_{}.png", task.name()).into()),
        plot: Some(format!("../results/sweep/sweep_{}.png", task.name())),
        ablation: Ablation::NotRun {
            reason: "no `--ablation-model` given".into(),
        },
        variants: Vec::new(),
        breakdown: None,
    }
}

fn data(tasks: Vec<TaskResults>, ablation: bool) -> ReportData {
    ReportData {
        config: ReportConfig {
            model: "models/default".into(),
            data: "data/bench".into(),
            ablation_model: ablation.then(|| "models/final-only".into()),
            variants: Vec::new(),
            results: "results".into(),
            out: "docs/results.md".into(),
            tasks: tasks.iter().map(|t| t.task).collect(),
            limit: Some(50),
            caption_limit: None,
            entail_target: 0.99,
            caption_target: 0.96,
            lower_bound: Vec::new(),
            entail_grid: Some("scripts/grid_entail_mue.json".into()),
            caption_grid: None,
            sweep_grid: Some("scripts/grid_baselines.json".into()),
            batch: 8,
            search: SearchConfig::default(),
        },
        machine: Machine {
            nproc: 2,
            cpu: Some("Test CPU".into()),
            started_utc: "2025-01-02 03:04 UTC".into(),
            load_start: Some("1.00 2.00 3.00".into()),
            load_end: Some("1.50 2.00 3.00".into()),
            elapsed_s: 90.0,
        },
        model_loss: Some(LossKind::LayerWise),
        ablation_loss: ablation.then_some(LossKind::FinalOnly),
        tasks,
    }
}

/// The table lines of the section that starts with `title`.
fn section_rows<'a>(page: &'a str, title: &str) -> Vec<&'a str> {
    let start = page.find(title).unwrap();
    let rest = &page[start + title.len()..];
    let end = rest.find("\n## ").unwrap_or(rest.len());
    rest[..end]
        .lines()
        .skip_while(|l| !l.starts_with("| method"))
        .take_while(|l| l.starts_with('|'))
        .skip(2)
        .collect()
}

#[test]
fn small_helpers() {
    assert_eq!(static_depths(6), vec![4, 2]);
    assert_eq!(static_depths(4), vec![3, 1]);
    assert_eq!(static_depths(2), vec![1]);
    assert!(static_depths(1).is_empty());
    assert_eq!(utc_date(0), "1970-01-01 00:00 UTC");
    assert_eq!(utc_date(951_782_400), "2000-02-29 00:00 UTC");
    assert_eq!(utc_date(1_700_000_000), "2023-11-14 22:13 UTC");
    let link = |a: &str, b: &str| relative_link(Path::new(a), Path::new(b));
    assert_eq!(
        link("/w/docs", "/w/results/sweep/x.png"),
        "../results/sweep/x.png"
    );
    assert_eq!(link("/w", "/w/results/x.png"), "results/x.png");
    assert_eq!(link("/w/a/b", "/w/x.png"), "../../x.png");
    assert_eq!(link("/w/./docs/../docs", "/w/r.png"), "../r.png");
    assert_eq!(pct(-0.0001), "0.0%");
    assert_eq!(neg(0.0), "0.0%");
    assert_eq!(neg(1.0 / 3.0), "-33.3%");
    assert_eq!(pct(f64::NAN), "n/a");
    assert_eq!(pct0(0.99), "99%");
    assert_eq!(pct0(0.995), "99.5%");
    assert_eq!(sh(Path::new("a b")), "'a b'");
    assert_eq!(sh(Path::new("data/bench")), "data/bench");
}

#[test]
fn a_loaded_machine_is_flagged_on_the_page() {
    let mut data = data(vec![task_results(Task::Entail, false)], false);
    let flag = "Other work shared the machine";
    assert!(
        !render(&data).contains(flag),
        "load 2.0 on 2 cores is the run alone"
    );
    data.machine.load_end = Some("1.0 3.9 1.0".into());
    assert_eq!(overload(&data.machine), Some(3.9));
    assert!(render(&data).contains(flag));
    // A 15-minute figure counts only once the run has lasted 15 minutes.
    data.machine.load_end = Some("1.0 2.0 3.0".into());
    assert_eq!(overload(&data.machine), None);
    data.machine.elapsed_s = 20.0 * 60.0;
    assert_eq!(overload(&data.machine), Some(3.0));
    data.machine.load_end = Some("garbage".into());
    assert_eq!(overload(&data.machine), None);
}

#[test]
fn grids_get_the_points_the_table_needs() {
    let g = calibration_grid(None, 6).unwrap();
    assert!(g.iter().all(|s| s.family() == "mue"));
    assert!(g.contains(&NEVER_EXIT));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("g.json");
    let only = vec![entropy(0.5), mue(0.9, 0.9, 0.9)];
    std::fs::write(&file, serde_json::to_string(&only).unwrap()).unwrap();
    // MuE points of the file, plus never-exit.
    assert_eq!(
        calibration_grid(Some(&file), 6).unwrap(),
        vec![mue(0.9, 0.9, 0.9), NEVER_EXIT]
    );
    let cal = mue(0.7, 0.8, 0.9);
    let t = test_grid(Some(&file), 6, 6, &[cal]).unwrap();
    assert_eq!(
        t,
        vec![
            PolicySpec::Full(FullDepth),
            entropy(0.5),
            mue(0.9, 0.9, 0.9),
            depth(4),
            depth(2),
            cal
        ]
    );
    // Already present: not added twice.
    assert_eq!(
        test_grid(Some(&file), 6, 6, &[mue(0.9, 0.9, 0.9)])
            .unwrap()
            .len(),
        5
    );
    std::fs::write(&file, "[{\"policy\": \"entropy\", \"threshold\": 1}]").unwrap();
    let err = format!("{:#}", calibration_grid(Some(&file), 6).unwrap_err());
    assert!(err.contains("g.json") && err.contains("empty"), "{err}");
    std::fs::write(&file, "not json").unwrap();
    assert!(test_grid(Some(&file), 6, 6, &[cal]).is_err());
}

#[test]
fn baseline_rule_and_mue_points() {
    let t = task_results(Task::Entail, false);
    let s = &t.sweep;
    let name = |i: usize| s.points[i].params.clone();
    // 0.99 * 0.8 = 0.792: entropy 1.0 (0.795, -20%) is the cheapest that keeps it.
    let (i, rule) = pick_baseline(s, "entropy", 0.99).unwrap();
    assert_eq!(
        (name(i).as_str(), rule),
        ("threshold=1", PickRule::CheapestAtTarget)
    );
    // No patience point reaches it: the best quality one.
    let (i, rule) = pick_baseline(s, "patience", 0.99).unwrap();
    assert_eq!(
        (name(i).as_str(), rule),
        ("patience=2", PickRule::BestQuality)
    );
    // A lower target lets a cheaper point in.
    let (i, _) = pick_baseline(s, "entropy", 0.85).unwrap();
    assert_eq!(name(i), "threshold=2");
    assert!(pick_baseline(s, "nothing", 0.99).is_none());

    let (cal, others) = mue_points(s, &t.calibration.point.spec, 3);
    assert_eq!(s.points[cal.unwrap()].spec, t.calibration.point.spec);
    let got: Vec<f64> = others.iter().map(|&i| s.points[i].mac_reduction).collect();
    // Frontier without the calibrated point and without the no-saving point:
    // 0.2, 0.55, 0.65, 0.8 -> first, middle, last.
    assert_eq!(got, vec![0.2, 0.65, 0.8]);
    let (_, two) = mue_points(s, &t.calibration.point.spec, 10);
    assert_eq!(two.len(), 4);

    let dom = dominance(s);
    let fams: Vec<&str> = dom.iter().map(|d| d.family.as_str()).collect();
    assert_eq!(fams, ["static", "entropy", "patience", "margin", "joint"]);
    assert!(dom.iter().all(|d| d.open.is_empty()));
    // Entropy 0.5 (0.8 at -5%) is matched by MuE 0.95/1/1 (0.8 at -20%).
    assert_eq!(dom[1].dominated, 3);
    let open = dominance(&task_results(Task::Entail, true).sweep);
    assert_eq!(open[0].points, 3);
    assert_eq!(open[0].open.len(), 1);
}

#[test]
fn page_has_rows_in_order_with_numbers() {
    let page = render(&data(
        vec![
            task_results(Task::Entail, false),
            task_results(Task::Caption, false),
        ],
        false,
    ));
    let rows = section_rows(&page, "## Visual entailment");
    let starts = [
        "| Full model (6+6 layers) |  | 80.0% | 100.0% | 0.0% | 0.0% | 0.0% |",
        "| Smaller model (static depth 4) | depth=4 | 76.0% | 95.0% | 30.0% | 7.5% | 15.0% |",
        "| Smaller model (static depth 2) | depth=2 | 60.0% | 75.0% | 60.0% |",
        "| DeeBERT (entropy) | threshold=1; cheapest >= 99% | 79.5% |",
        "| PABEE (patience) | patience=2; none >= 99%: best quality | 75.0% |",
        "| CALM (softmax margin) | threshold=0.9; cheapest >= 99% | 79.3% |",
        "| **MuE** | image=0.9 text=0.99 decoder=0.99; calibrated on valid | 79.5% | 99.4% | 40.0% | 10.0% | 20.0% |",
        "| MuE (test frontier; illustration, chosen on test) | image=0.95 text=1 decoder=1 | 80.0% |",
        "| MuE (test frontier; illustration, chosen on test) | image=0.7 text=0.9 decoder=0.9 | 76.0% |",
        "| MuE (test frontier; illustration, chosen on test) | image=0.5 text=0.5 decoder=0.5 | 70.0% |",
        "| MuE w/o modality decomposition (`joint`) | encoder=0.95 decoder=0.99; cheapest >= 99% | 79.5% |",
        "| MuE w/o layer-wise loss |  | not run: no `--ablation-model` given |",
    ];
    assert_eq!(rows.len(), starts.len(), "{rows:#?}");
    for (r, s) in rows.iter().zip(starts) {
        assert!(r.starts_with(s), "{r}\n  should start with\n{s}");
    }
    // Captioning: CIDEr-D, BLEU-4, relative CIDEr-D.
    let cap = section_rows(&page, "## Captioning");
    assert!(cap[0].starts_with("| Full model (6+6 layers) |  | 0.500 | 0.250 | 100.0% | 0.0% |"));
    assert!(cap[6].starts_with("| **MuE** | image=0.9 text=0.99 decoder=0.99; calibrated on valid | 0.497 | 0.248 | 99.4% | 40.0% |"), "{}", cap[6]);
    // The summary: both tasks side by side, reductions written as the paper does.
    assert!(page.contains(
        "| **MuE** (calibrated on valid) | 79.5% | -20.0% | -40.0% | 0.497 | -20.0% | -40.0% |"
    ));
    assert!(page.contains("| Smaller model (static depth 4) | 76.0% | -15.0% | -30.0% |"));
    assert!(page.contains("| Full model | 80.0% | 0.0% | 0.0% | 0.500 | 0.0% | 0.0% |"));
    assert!(page.contains("| MuE w/o layer-wise loss | not run: no `--ablation-model` given |"));
    // Plot, machine, commands, the rule.
    assert!(page.contains("](../results/sweep/sweep_entail.png)"));
    assert!(page.contains("](../results/sweep/sweep_caption.png)"));
    assert!(page.contains("2 cores (`nproc`), Test CPU"));
    assert!(page.contains("started 2025-01-02 03:04 UTC"));
    assert!(page.contains(
        "mue report --model models/default --data data/bench --results results \
         --out docs/results.md --limit 50 --entail-target 0.99 --caption-target 0.96 \
         --entail-grid scripts/grid_entail_mue.json --caption-grid default \
         --sweep-grid scripts/grid_baselines.json --batch 8 --beam 5 --max-len 16 \
         --kv-fill propagate"
    ));
    assert!(page.contains(
        "mue calibrate --model models/default --data data/bench/snli_ve_valid.tsv \
         --task entail --limit 50"
    ));
    assert!(page.contains("--grid results/report/grid_caption_test.json"));
    assert!(page.contains("cheapest point (largest MAC reduction)"));
    // Every baseline point is dominated here.
    assert!(
        page.contains("Every one of the 9 baseline points of the test sweep is matched or beaten")
    );
    assert!(!page.contains("not above every baseline"));
}

#[test]
fn frontier_statement_names_the_points_mue_does_not_beat() {
    let t = task_results(Task::Entail, true);
    let s = frontier_statement(&t);
    assert!(
        s.starts_with("**The MuE frontier is not above every baseline:** 1 of the 10"),
        "{s}"
    );
    assert!(
        s.contains("static depth=1 (accuracy 80.0%, MACs 90.0%)"),
        "{s}"
    );
    assert!(s.contains("The other 9 are matched or beaten"), "{s}");
    let page = render(&data(vec![t], false));
    assert!(page.contains("| static | 3 | 2 | static depth=1 (accuracy 80.0%, MACs 90.0%) |"));
    // The rule picks static depth 1 as the cheapest at target: a row of its own.
    let rows = section_rows(&page, "## Visual entailment");
    assert!(
        rows[3].starts_with("| Smaller model (static depth) | depth=1; cheapest >= 99% | 80.0%")
    );
    // Without MuE points there is nothing to compare.
    let mut none = task_results(Task::Entail, false);
    none.sweep.points.retain(|p| p.family != "mue");
    assert!(frontier_statement(&none).contains("no MuE point"));
}

#[test]
fn saved_data_renders_the_same_page() {
    let mut t = task_results(Task::Caption, true);
    // A ratio against a zero quality is written as null and read back.
    t.sweep.points[1].relative_quality = f64::INFINITY;
    t.sweep.points[1].report.relative_quality = f64::INFINITY;
    let d = data(vec![t], false);
    let json = serde_json::to_string(&d).unwrap();
    let back: ReportData = serde_json::from_str(&json).unwrap();
    assert!(back.tasks[0].sweep.points[1].relative_quality.is_nan());
    assert_eq!(render(&back), render(&d));
    assert!(render(&d).contains("| depth=4 | 0.475 | 0.237 | n/a |"));
}

#[test]
fn ablation_row_against_the_main_full_depth() {
    let mut t = task_results(Task::Entail, false);
    let cal = t.calibration.clone();
    // Ablation full depth 0.7, its MuE 0.64: relative to the main model's 0.8.
    t.ablation = Ablation::Run {
        calibration: cal,
        report: report(Task::Entail, 0.64, 0.7, 0.3),
    };
    let page = render(&data(vec![t], true));
    let rows = section_rows(&page, "## Visual entailment");
    let last = rows.last().unwrap();
    assert!(last.starts_with("| MuE w/o layer-wise loss | image=0.9 text=0.99 decoder=0.99; calibrated on valid | 64.0% | 80.0% | 30.0% | 7.5% | 15.0% |"), "{last}");
    assert!(page.contains("own full-depth accuracy is 70.0%"));
    assert!(page.contains("`models/final-only` (trained with the final-layer loss only)"));
    assert!(page.contains("mue eval --model models/final-only --data data/bench/snli_ve_test.tsv"));
    assert!(page.contains("--img-threshold 0.9 --text-threshold 0.99 --dec-threshold 0.99"));
}

/// The rule picks each baseline's point on valid only: hand-made valid and test sweeps
/// that disagree, and the row shows the test figures of the point valid chose.
#[test]
fn baselines_are_picked_on_valid_and_shown_on_test() {
    let task = Task::Entail;
    let mut t = task_results(task, false);
    let full = t.sweep.full_quality.primary;
    let f = |x: f64| x * full / 0.8;
    // On valid: entropy 0.5 keeps 99% cheapest (1.0 and 2.0 miss); patience none
    // reaches 99% (best quality: patience 2); margin 0.9 is cheapest at 99%.
    let valid_pts = [
        (PolicySpec::Full(FullDepth), f(0.8), 0.0),
        (depth(4), f(0.7), 0.3),
        (depth(2), f(0.6), 0.6),
        (entropy(0.5), f(0.8), 0.1),
        (entropy(1.0), f(0.78), 0.2),
        (entropy(2.0), f(0.7), 0.5),
        (patience(1), f(0.6), 0.3),
        (patience(2), f(0.75), 0.1),
        (margin(0.9), f(0.793), 0.25),
        (joint(0.9, 0.99), f(0.7), 0.15),
    ];
    let points = valid_pts
        .into_iter()
        .map(|(s, q, r)| point(task, s, q, full, r))
        .collect();
    t.valid_sweep = Some(finish(task, 12, quality(task, full), points));
    // On test (task_results) entropy 1.0 would be the cheapest at 99%: the row must
    // still show entropy 0.5, the valid pick, with its test figures.
    assert_eq!(
        pick_baseline(&t.sweep, "entropy", 0.99).map(|(i, _)| t.sweep.points[i].spec),
        Some(entropy(1.0))
    );
    let rows = rows(&t);
    let row = |fam| {
        rows.iter()
            .find(|r| r.key == RowKey::Picked(fam))
            .unwrap_or_else(|| panic!("no {fam} row"))
    };
    let e = row("entropy");
    assert!(e.setting.starts_with("threshold=0.5;"), "{}", e.setting);
    assert!(e.setting.ends_with("on valid"), "{}", e.setting);
    let test_e = t
        .sweep
        .points
        .iter()
        .find(|p| p.spec == entropy(0.5))
        .unwrap();
    assert_eq!(e.metrics.as_ref().unwrap().macs, test_e.mac_reduction);
    let pa = row("patience");
    assert!(pa.setting.starts_with("patience=2;"), "{}", pa.setting);
    assert!(
        pa.setting.contains("best quality on valid"),
        "{}",
        pa.setting
    );
    assert!(row("margin").setting.starts_with("threshold=0.9;"));
    // The joint point valid picks is not in this test sweep: said, not guessed.
    assert!(row("joint").metrics.is_err());
    let page = render(&data(vec![t], false));
    assert!(page.contains("Neither MuE nor any baseline is chosen on test"));
    assert!(page.contains("three-way softmax over the answer tokens"));
}

#[test]
fn constant_and_scheduled_decoder_rows_side_by_side() {
    let task = Task::Caption;
    let mut t = task_results(task, false);
    let full = t.sweep.full_quality.primary;
    let calm = DecoderThreshold::paper(0.7);
    let sched = PolicySpec::Mue(MueSpec {
        image: 0.9,
        text: 0.99,
        decoder: calm,
    });
    let cal_sweep = finish(
        task,
        12,
        quality(task, full),
        vec![
            point(task, mue(1.0, 1.0, 1.0), full, full, 0.0),
            point(task, mue(0.9, 0.99, 0.99), full * 0.995, full, 0.4),
            point(task, mue(0.9, 0.99, 0.7), full * 0.9, full, 0.6),
            point(task, sched, full * 0.993, full, 0.5),
        ],
    );
    let forms = decoder_forms(&cal_sweep, Objective::Target(0.99));
    assert_eq!(forms.len(), 2);
    let spec = |i: usize| forms[i].calibration.as_ref().unwrap().point.spec;
    assert_eq!(spec(0), mue(0.9, 0.99, 0.99));
    assert_eq!(spec(1), sched);
    assert!(!forms[0].schedule && forms[1].schedule);
    // A form with no point at the target says so instead of disappearing.
    let strict = decoder_forms(&cal_sweep, Objective::Target(0.999));
    assert!(strict[1].calibration.is_none());
    // The overall pick is the scheduled one (cheaper at the target).
    assert_eq!(
        calibrate::calibrate(&cal_sweep, Objective::Target(0.99))
            .unwrap()
            .point
            .spec,
        sched
    );
    // One form only: no side-by-side rows.
    let consts = restrict(&cal_sweep, |p| p.spec.decoder_schedule() == Some(false));
    assert!(decoder_forms(&consts, Objective::Target(0.99)).is_empty());
    let mut pts = t.sweep.points.clone();
    pts.push(point(task, sched, full * 0.98, full, 0.5));
    t.sweep = finish(task, 10, quality(task, full), pts);
    t.decoder_forms = forms;
    let rows = rows(&t);
    let c = rows
        .iter()
        .find(|r| r.key == RowKey::MueDecoder(false))
        .unwrap();
    let d = rows
        .iter()
        .find(|r| r.key == RowKey::MueDecoder(true))
        .unwrap();
    assert!(c.setting.contains("decoder=0.99;"), "{}", c.setting);
    assert!(
        d.setting.contains("strict=0.333 decay=0.9"),
        "{}",
        d.setting
    );
    assert_eq!(d.metrics.as_ref().unwrap().macs, 0.5);
    let page = render(&data(vec![t.clone()], false));
    assert!(page.contains("| MuE, decoder schedule |"));
    assert!(page.contains("| MuE, constant decoder threshold |"));
    t.decoder_forms = strict;
    let rows = super::rows(&t);
    let d = rows
        .iter()
        .find(|r| r.key == RowKey::MueDecoder(true))
        .unwrap();
    assert!(d
        .metrics
        .as_ref()
        .unwrap_err()
        .contains("no scheduled point"));
}

/// Every registered family shows on the page: full depth and MuE in their rows, the
/// smaller model in its fixed depths, every other compared family picked on valid in a row
/// of its own and counted against MuE.
#[test]
fn every_registered_family_appears_in_the_report() {
    let task = Task::Entail;
    let mut t = task_results(task, false);
    let full = t.sweep.full_quality.primary;
    // A point of every family's default grid beside the hand-made ones.
    let mut pts = t.sweep.points.clone();
    for f in crate::exit::FAMILIES {
        pts.push(point(task, (f.grid)(6)[0], full * 0.5, full, 0.1));
    }
    t.sweep = finish(task, 10, quality(task, full), pts.clone());
    t.valid_sweep = Some(finish(task, 12, quality(task, full), pts));
    let rows = rows(&t);
    let shown = |key: &dyn Fn(RowKey) -> bool| rows.iter().any(|r| key(r.key) && r.metrics.is_ok());
    let page = render(&data(vec![t.clone()], false));
    for f in crate::exit::FAMILIES {
        let row = match f.role {
            Role::Reference => shown(&|k| k == RowKey::Full),
            Role::Proposed => shown(&|k| k == RowKey::Mue),
            Role::SmallerModel => shown(&|k| matches!(k, RowKey::Static(_))),
            Role::Baseline | Role::Ablation => shown(&|k| k == RowKey::Picked(f.name)),
        };
        assert!(row, "{}: no row with numbers", f.name);
        if f.role.compared() {
            assert!(
                page.contains(&format!("\n| {} | ", f.name)),
                "{}: not compared",
                f.name
            );
        }
        if matches!(f.role, Role::Baseline | Role::Ablation) {
            assert!(page.contains(&format!("\n| {} | ", f.title)), "{}", f.title);
        }
    }
}

/// Every placeholder of the template is filled on every kind of page.
/// The first `{key}` of the template left in a page.
fn unfilled(page: &str) -> Option<&str> {
    page.match_indices('{')
        .map(|(i, _)| &page[i..(i + 24).min(page.len())])
        .find(|rest| {
            let key: String = rest[1..].chars().take_while(|c| *c != '}').collect();
            !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        })
}

#[test]
fn template_placeholders_are_all_filled() {
    let mut t = task_results(Task::Entail, true);
    let cal = t.calibration.clone();
    t.ablation = Ablation::Run {
        calibration: cal,
        report: report(Task::Entail, 0.64, 0.7, 0.3),
    };
    let mut d = data(vec![t, task_results(Task::Caption, false)], true);
    d.machine.load_end = Some("1.0 3.9 1.0".into());
    d.config.lower_bound = vec![Task::Caption];
    d.ablation_loss = Some(LossKind::LayerWise);
    let page = render(&d);
    assert_eq!(unfilled(&page), None, "{page}");
    assert!(page.contains("**Other work shared the machine"));
    assert!(page.contains("**Warning:** the ablation model"));
    assert!(page.ends_with("deterministic for the same model, data and options.\n"));
}

/// `--variant` models get a row in both tables (relative to the main model's full depth),
/// their own full depth under the task's table, and their commands; the breakdown is a
/// table per group.
#[test]
fn variant_rows_and_breakdown_on_the_page() {
    let mut t = task_results(Task::Entail, false);
    let cal = t.calibration.clone();
    t.variants = vec![VariantResult {
        label: "MuE + image-exit sampling".into(),
        model: "runs/v2/sampling".into(),
        loss: Some(LossKind::LayerWise),
        calibration: cal,
        report: report(Task::Entail, 0.72, 0.76, 0.5),
    }];
    let exits = ExitStats {
        mean_image_layer: 2.5,
        mean_text_layer: 1.0,
        mean_token_layer: 6.0,
        mean_tokens: 1.0,
        encoder_layers: 6,
        decoder_layers: 6,
    };
    t.breakdown = Some(vec![crate::eval::breakdown::GroupReport {
        group: "tier=0".into(),
        examples: 7,
        accuracy: Some(0.75),
        full_accuracy: Some(0.5),
        exits,
        macs_reduction: 0.6,
    }]);
    let mut d = data(vec![t], false);
    d.config.variants = vec![VariantSpec {
        label: "MuE + image-exit sampling".into(),
        model: "runs/v2/sampling".into(),
    }];
    let page = render(&d);
    let rows = section_rows(&page, "## Visual entailment");
    let last = rows.last().unwrap();
    assert!(
        last.starts_with("| MuE + image-exit sampling | image=0.9 text=0.99 decoder=0.99; calibrated on valid | 72.0% | 90.0% | 50.0% |"),
        "{last}"
    );
    assert!(
        page.contains("| MuE + image-exit sampling | 72.0% | -"),
        "{page}"
    );
    assert!(page.contains(
        "MuE + image-exit sampling (`runs/v2/sampling`, trained with the layer-wise loss)"
    ));
    assert_eq!(unfilled(&page), None, "{page}");
    assert!(
        page.contains("Full-depth accuracy of the other models:\n\n- MuE + image-exit sampling: 76.0%; its row keeps")
    );
    assert!(
        page.contains("| tier=0 | 7 | 50.0% | 75.0% | 60.0% | 2.50 | 1.00 | 6.00 |"),
        "{page}"
    );
    assert!(page.contains(" --variant 'MuE + image-exit sampling=runs/v2/sampling'"));
    assert!(page.contains("--out results/variants/mue-image-exit-sampling/entail_test_mue.json"));
    // Labels become folder names; LABEL=DIR splits at the first `=`.
    let v = VariantSpec::parse(" w/o layer-wise loss =runs/a=b").unwrap();
    assert_eq!(v.label, "w/o layer-wise loss");
    assert_eq!(v.model, PathBuf::from("runs/a=b"));
    assert_eq!(v.slug(), "w-o-layer-wise-loss");
    assert!(VariantSpec::parse("=runs/a").is_err());
    assert!(VariantSpec::parse("label=").is_err());
    // Saved and read back: the same page.
    let back: ReportData = serde_json::from_str(&serde_json::to_string(&d).unwrap()).unwrap();
    assert_eq!(render(&back), page);
}
