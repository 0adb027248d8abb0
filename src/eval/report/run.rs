//! The work behind a report: per task, MuE calibrated on valid, every baseline family swept
//! and picked on valid, one test sweep of every chosen point, the ablation; saved under the
//! results folder.

use super::machine::{cpu_model, load_average, utc_date, Machine};
use super::select::{pick_family, static_depths};
use super::{
    page_link, Ablation, DecoderForm, Layout, ReportConfig, ReportData, TaskResults, VariantResult,
    VariantSpec,
};
use crate::eval::breakdown;
use crate::eval::calibrate::{self, Calibration, Objective};
use crate::eval::eval::{self, Dataset, EvalOptions, EvalReport};
use crate::eval::sweep::{self, PolicySpec, SweepPoint, SweepResult};
use crate::eval::write_json;
use crate::exit::{spec, DecoderThreshold, FullDepth, MueSpec, StaticSpec};
use crate::pipeline::Engine;
use crate::run_meta;
use crate::task::Task;
use anyhow::{Context, Result};
use std::path::Path;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

fn push_unique(grid: &mut Vec<PolicySpec>, spec: PolicySpec) {
    if !grid.contains(&spec) {
        grid.push(spec);
    }
}

pub(super) const NEVER_EXIT: PolicySpec = PolicySpec::Mue(MueSpec {
    image: 1.0,
    text: 1.0,
    decoder: DecoderThreshold::Constant { tau: 1.0 },
});

/// The calibration grid: the MuE points of the file (or of the default grid), plus the
/// never-exit point so that any target can be met.
pub fn calibration_grid(file: Option<&Path>, decoder_layers: usize) -> Result<Vec<PolicySpec>> {
    let mue = [crate::exit::mue::FAMILY.name.to_string()];
    let mut g = sweep::select_grid(file, decoder_layers, &mue).with_context(|| match file {
        Some(f) => format!("calibration grid {} (its MuE points)", f.display()),
        None => "the default calibration grid".to_string(),
    })?;
    push_unique(&mut g, NEVER_EXIT);
    Ok(g)
}

/// The test grid: full depth first, the file's points (or the default grid), then the
/// static depths the table shows and the points chosen on valid (`chosen`), each once.
pub fn test_grid(
    file: Option<&Path>,
    decoder_layers: usize,
    static_layers: usize,
    chosen: &[PolicySpec],
) -> Result<Vec<PolicySpec>> {
    let mut g = vec![PolicySpec::Full(FullDepth)];
    for s in sweep::select_grid(file, decoder_layers, &[])? {
        push_unique(&mut g, s);
    }
    for depth in static_depths(static_layers) {
        push_unique(&mut g, PolicySpec::Static(StaticSpec { depth }));
    }
    for &c in chosen {
        push_unique(&mut g, c);
    }
    Ok(g)
}

/// The baselines' grid on the validation split: the baseline families' points of the test
/// grid file (or of the default grid) and the static depths the table shows.
pub fn valid_baseline_grid(
    file: Option<&Path>,
    decoder_layers: usize,
    static_layers: usize,
) -> Result<Vec<PolicySpec>> {
    let fams: Vec<String> = spec::compared()
        .iter()
        .map(|f| f.name.to_string())
        .collect();
    let mut g = Vec::new();
    for s in sweep::select_grid(file, decoder_layers, &fams)? {
        push_unique(&mut g, s);
    }
    for depth in static_depths(static_layers) {
        push_unique(&mut g, PolicySpec::Static(StaticSpec { depth }));
    }
    Ok(g)
}

/// The calibration sweep restricted to the points `keep` accepts (frontiers recomputed).
pub(super) fn restrict(result: &SweepResult, keep: impl Fn(&SweepPoint) -> bool) -> SweepResult {
    let points = result.points.iter().filter(|p| keep(p)).cloned().collect();
    sweep::finish(result.task, result.examples, result.full_quality, points)
}

/// MuE calibrated among constant decoder thresholds, then among scheduled ones, by the
/// same objective; empty unless the sweep has both forms.
pub fn decoder_forms(result: &SweepResult, objective: Objective) -> Vec<DecoderForm> {
    let has = |sched: bool| {
        result
            .points
            .iter()
            .any(|p| p.spec.decoder_schedule() == Some(sched))
    };
    if !(has(false) && has(true)) {
        return Vec::new();
    }
    [false, true]
        .iter()
        .map(|&schedule| {
            let sub = restrict(result, |p| p.spec.decoder_schedule() == Some(schedule));
            DecoderForm {
                schedule,
                calibration: calibrate::calibrate(&sub, objective).ok(),
            }
        })
        .collect()
}

/// Run the whole report and save its files under `config.results` (not the page).
pub fn run(config: &ReportConfig, progress: bool) -> Result<ReportData> {
    let started = SystemTime::now();
    let clock = Instant::now();
    let load_start = load_average();
    config.validate()?;
    let layout = Layout::new(&config.results);
    let opts = EvalOptions {
        batch: config.batch,
        search: config.search,
        progress,
        premise: false,
    };
    let engine = Engine::load(&config.model)
        .with_context(|| format!("loading the model {}", config.model.display()))?;
    let ablation = match &config.ablation_model {
        Some(dir) => Some(
            Engine::load(dir)
                .with_context(|| format!("loading the ablation model {}", dir.display()))?,
        ),
        None => None,
    };
    let mut variants = Vec::new();
    for v in &config.variants {
        let e = Engine::load(&v.model).with_context(|| {
            format!("loading the variant {:?} ({})", v.label, v.model.display())
        })?;
        variants.push((v, e));
    }
    let mut tasks = Vec::new();
    for &task in &config.tasks {
        tasks.push(run_task(
            config,
            task,
            &engine,
            ablation.as_ref(),
            &variants,
            &layout,
            &opts,
        )?);
    }
    let data = ReportData {
        config: config.clone(),
        machine: Machine {
            nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu: cpu_model(),
            started_utc: utc_date(
                started
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            ),
            load_start,
            load_end: load_average(),
            elapsed_s: clock.elapsed().as_secs_f64(),
        },
        model_loss: run_meta::trained_loss(&config.model).ok(),
        ablation_loss: config
            .ablation_model
            .as_ref()
            .and_then(|d| run_meta::trained_loss(d).ok()),
        tasks,
    };
    write_json(&layout.data(), &data)?;
    Ok(data)
}

/// Another model (the ablation, a variant): MuE calibrated on valid by the main model's
/// grid and objective, then that point evaluated once on test; saved under `out`
/// (calibration sweep folder, exits.json, test evaluation).
fn other_model(
    engine: &Engine,
    (valid, test): (&Dataset, &Dataset),
    grid: &[PolicySpec],
    objective: Objective,
    opts: &EvalOptions,
    out: (&Path, &Path, &Path),
) -> Result<(Calibration, EvalReport)> {
    let (calibration, _) =
        calibrate::calibrate_on(engine, valid, grid, objective, opts, Some(out.0))?;
    calibrate::write_exits(out.1, &calibration)?;
    let report = eval::evaluate(engine, test, &calibration.policy, opts)?;
    write_json(out.2, &report)?;
    Ok((calibration, report))
}

fn run_task(
    config: &ReportConfig,
    task: Task,
    engine: &Engine,
    ablation: Option<&Engine>,
    variants: &[(&VariantSpec, Engine)],
    layout: &Layout,
    opts: &EvalOptions,
) -> Result<TaskResults> {
    let say = |msg: String| {
        if opts.progress {
            eprintln!("{}: {msg}", task.name());
        }
    };
    let cfg = &engine.model.cfg;
    let target = config.target(task);
    let cal_grid = calibration_grid(config.calibration_grid(task), cfg.decoder_layers)?;
    write_json(&layout.calibration_grid(task), &cal_grid)?;
    let valid_file = config.split_file(task, "valid");
    let valid = Dataset::load(&valid_file, task, config.limit(task))?;
    say(format!(
        "calibrating on {} ({} examples, {} points)",
        valid_file.display(),
        valid.len(),
        cal_grid.len()
    ));
    let objective = config.objective(task);
    let cal_dir = layout.calibrate_dir(task);
    let (calibration, cal_sweep) =
        calibrate::calibrate_on(engine, &valid, &cal_grid, objective, opts, Some(&cal_dir))?;
    calibrate::write_exits(&layout.exits(), &calibration)?;
    let forms = decoder_forms(&cal_sweep, objective);

    // Every baseline family's point is picked on valid by the same rule, then run once on
    // test.
    let static_layers = cfg.encoder_layers.min(cfg.decoder_layers);
    let valid_grid = valid_baseline_grid(
        config.sweep_grid.as_deref(),
        cfg.decoder_layers,
        static_layers,
    )?;
    write_json(&layout.valid_grid(task), &valid_grid)?;
    say(format!(
        "baselines on {} ({} points)",
        valid_file.display(),
        valid_grid.len()
    ));
    let valid_sweep = sweep::sweep(engine, &valid, &valid_grid, opts)?;
    sweep::write_outputs(&valid_sweep, &layout.valid_sweep_dir())?;
    let mut chosen = vec![calibration.point.spec];
    chosen.extend(
        forms
            .iter()
            .filter_map(|f| f.calibration.as_ref().map(|c| c.point.spec)),
    );
    for fam in spec::compared() {
        if let Some((i, _)) = pick_family(&valid_sweep, fam.name, objective) {
            chosen.push(valid_sweep.points[i].spec);
        }
    }

    let grid = test_grid(
        config.sweep_grid.as_deref(),
        cfg.decoder_layers,
        static_layers,
        &chosen,
    )?;
    write_json(&layout.test_grid(task), &grid)?;
    let test_file = config.split_file(task, "test");
    let test = Dataset::load(&test_file, task, config.limit(task))?;
    say(format!(
        "sweeping {} ({} examples, {} points)",
        test_file.display(),
        test.len(),
        grid.len()
    ));
    let meta_file = breakdown::meta_path(&test_file);
    let keep = meta_file.as_ref().map(|_| calibration.point.spec);
    let (result, kept) = sweep::sweep_keeping(engine, &test, &grid, opts, keep)?;
    let files = sweep::write_outputs(&result, &layout.sweep_dir())?;
    let plot_file = ["png", "svg"]
        .iter()
        .find_map(|ext| {
            files
                .iter()
                .find(|f| f.extension().is_some_and(|e| e == *ext))
        })
        .cloned();
    let plot = plot_file.as_ref().map(|f| page_link(&config.out, f));

    let ablation = match ablation {
        None => Ablation::NotRun {
            reason: "no `--ablation-model` given".into(),
        },
        Some(abl) => {
            say("ablation model: calibrating and evaluating".into());
            let (calibration, report) = other_model(
                abl,
                (&valid, &test),
                &cal_grid,
                objective,
                opts,
                (
                    &layout.ablation_calibrate_dir(task),
                    &layout.ablation_exits(),
                    &layout.ablation_eval(task),
                ),
            )?;
            Ablation::Run {
                calibration,
                report,
            }
        }
    };
    // Per difficulty tier and question type, where the benchmark says which is which.
    // The test sweep ran the calibrated point (`chosen`); its outputs give the breakdown.
    let breakdown = match (meta_file, kept) {
        (Some(meta), Some(kept)) => {
            let meta = breakdown::load_meta(&meta)?;
            Some(breakdown::breakdown(&test, &kept.run, &kept.full, &meta))
        }
        _ => None,
    };
    let mut variant_results = Vec::new();
    for (v, e) in variants {
        say(format!("variant {:?}: calibrating and evaluating", v.label));
        let (calibration, report) = other_model(
            e,
            (&valid, &test),
            &cal_grid,
            objective,
            opts,
            (
                &layout.variant_calibrate_dir(v, task),
                &layout.variant_exits(v),
                &layout.variant_eval(v, task),
            ),
        )?;
        variant_results.push(VariantResult {
            label: v.label.clone(),
            model: v.model.clone(),
            loss: run_meta::trained_loss(&v.model).ok(),
            calibration,
            report,
        });
    }
    Ok(TaskResults {
        task,
        encoder_layers: cfg.encoder_layers,
        decoder_layers: cfg.decoder_layers,
        target,
        valid_examples: valid.len(),
        calibration_points: cal_grid.len(),
        calibration,
        objective: Some(objective),
        decoder_forms: forms,
        valid_sweep: Some(valid_sweep),
        sweep: result,
        plot_file,
        plot,
        ablation,
        variants: variant_results,
        breakdown,
    })
}
