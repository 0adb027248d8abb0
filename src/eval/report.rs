//! `mue report`: everything behind `docs/results.md`. Per task: MuE thresholds calibrated
//! on the validation split, a sweep of every policy family on the test split (JSON, CSV,
//! plots), the two ablations; then one markdown page laid out like the paper's table.
//! [`run`] does the work and saves it; [`render`] is pure (results in, markdown out), so the
//! page can be tested and regenerated without running a model.

use super::calibrate::{self, Calibration, Objective};
use super::eval::{self, percent as pct, Dataset, EvalOptions, EvalReport, Quality};
use super::sweep::{self, PolicySpec, SweepPoint, SweepResult};
use super::write_json;
use crate::cli::Task;
use crate::exit::{DecoderThreshold, FullDepth, MueSpec, StaticSpec};
use crate::generate::SearchConfig;
use crate::pipeline::Engine;
use crate::train::LossKind;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::{Component, Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// What a report runs on and how; also what the page prints as its command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportConfig {
    pub model: PathBuf,
    /// Benchmark folder with `snli_ve_{valid,test}.tsv` and `caption_{valid,test}.tsv`.
    pub data: PathBuf,
    /// A model trained with `--loss final-only` (the ablation without the layer-wise loss).
    pub ablation_model: Option<PathBuf>,
    /// Folder for the JSON / CSV / plot outputs.
    pub results: PathBuf,
    /// The markdown page.
    pub out: PathBuf,
    pub tasks: Vec<Task>,
    /// Examples per entailment split (and per captioning split unless `caption_limit`).
    pub limit: Option<usize>,
    pub caption_limit: Option<usize>,
    /// Fraction of full-depth quality calibration must keep.
    pub entail_target: f64,
    pub caption_target: f64,
    /// Tasks calibrated to the lower end of each point's bootstrap interval rather than its
    /// estimate ([`Objective::LowerBound`]).
    #[serde(default)]
    pub lower_bound: Vec<Task>,
    /// Calibration grids (MuE points are used); None: the default grid.
    pub entail_grid: Option<PathBuf>,
    pub caption_grid: Option<PathBuf>,
    /// Grid of the test-split sweep; None: the default grid.
    pub sweep_grid: Option<PathBuf>,
    pub batch: usize,
    pub search: SearchConfig,
}

impl ReportConfig {
    pub fn limit(&self, task: Task) -> Option<usize> {
        match task {
            Task::Entail => self.limit,
            Task::Caption => self.caption_limit.or(self.limit),
        }
    }

    pub fn target(&self, task: Task) -> f64 {
        match task {
            Task::Entail => self.entail_target,
            Task::Caption => self.caption_target,
        }
    }

    /// What MuE's calibration on valid optimises for `task`.
    pub fn objective(&self, task: Task) -> Objective {
        if self.lower_bound.contains(&task) {
            Objective::LowerBound(self.target(task))
        } else {
            Objective::Target(self.target(task))
        }
    }

    pub fn calibration_grid(&self, task: Task) -> Option<&Path> {
        match task {
            Task::Entail => self.entail_grid.as_deref(),
            Task::Caption => self.caption_grid.as_deref(),
        }
    }

    /// The TSV file of a task's split (`valid` or `test`).
    pub fn split_file(&self, task: Task, split: &str) -> PathBuf {
        self.data.join(match task {
            Task::Entail => format!("snli_ve_{split}.tsv"),
            Task::Caption => format!("caption_{split}.tsv"),
        })
    }

    /// Check everything that can be checked before hours of work.
    pub fn validate(&self) -> Result<()> {
        if self.tasks.is_empty() {
            bail!("no task to report on");
        }
        for (name, t) in [
            ("--entail-target", self.entail_target),
            ("--caption-target", self.caption_target),
        ] {
            if !(0.0..=1.0).contains(&t) {
                bail!("{name} must lie in [0, 1], got {t}");
            }
        }
        for (name, l) in [
            ("--limit", self.limit),
            ("--caption-limit", self.caption_limit),
        ] {
            if l == Some(0) {
                bail!("{name} must be at least 1");
            }
        }
        if self.batch == 0 {
            bail!("--batch must be at least 1");
        }
        if self.search.beam == 0 || self.search.max_len == 0 {
            bail!("--beam and --max-len must be at least 1");
        }
        for (name, dir) in std::iter::once(("--model", Some(&self.model)))
            .chain([("--ablation-model", self.ablation_model.as_ref())])
        {
            let Some(dir) = dir else { continue };
            if !dir.join("config.json").is_file() {
                bail!(
                    "{name} {}: not a model directory (no config.json there)",
                    dir.display()
                );
            }
        }
        for &task in &self.tasks {
            for split in ["valid", "test"] {
                let f = self.split_file(task, split);
                if !f.is_file() {
                    bail!(
                        "{} is missing: --data must be a benchmark folder \
                         (`mue data generate --out {}`)",
                        f.display(),
                        self.data.display()
                    );
                }
            }
        }
        for g in [&self.entail_grid, &self.caption_grid, &self.sweep_grid]
            .into_iter()
            .flatten()
        {
            sweep::read_grid(g)?;
        }
        Ok(())
    }
}

/// Where [`run`] writes under the results folder.
#[derive(Debug, Clone)]
pub struct Layout {
    pub root: PathBuf,
}

impl Layout {
    pub fn new(results: &Path) -> Self {
        Self {
            root: results.to_path_buf(),
        }
    }
    /// Calibration sweep on the validation split.
    pub fn calibrate_dir(&self, task: Task) -> PathBuf {
        self.root.join(format!("calibrate_{}", task.name()))
    }
    /// Test-split sweep of every family (`sweep_<task>.{csv,json,svg,png}`).
    pub fn sweep_dir(&self) -> PathBuf {
        self.root.join("sweep")
    }
    /// The grids actually run, so that the single commands reproduce them.
    pub fn calibration_grid(&self, task: Task) -> PathBuf {
        self.root
            .join("report")
            .join(format!("grid_{}_calibrate.json", task.name()))
    }
    pub fn test_grid(&self, task: Task) -> PathBuf {
        self.root
            .join("report")
            .join(format!("grid_{}_test.json", task.name()))
    }
    /// Grid of the baselines' sweep on the validation split.
    pub fn valid_grid(&self, task: Task) -> PathBuf {
        self.root
            .join("report")
            .join(format!("grid_{}_valid_baselines.json", task.name()))
    }
    /// The baselines' sweep on the validation split, where their points are picked.
    pub fn valid_sweep_dir(&self) -> PathBuf {
        self.root.join("valid_baselines")
    }
    /// Calibrated thresholds (the model directory's own exits.json is left alone).
    pub fn exits(&self) -> PathBuf {
        self.root.join("report").join("exits.json")
    }
    pub fn ablation_calibrate_dir(&self, task: Task) -> PathBuf {
        self.root
            .join("ablation")
            .join(format!("calibrate_{}", task.name()))
    }
    pub fn ablation_exits(&self) -> PathBuf {
        self.root.join("ablation").join("exits.json")
    }
    pub fn ablation_eval(&self, task: Task) -> PathBuf {
        self.root
            .join("ablation")
            .join(format!("{}_test_mue.json", task.name()))
    }
    /// Everything [`render`] needs (`mue report --render-only` reads it back).
    pub fn data(&self) -> PathBuf {
        self.root.join("report.json")
    }
}

/// The machine and the run, as the page states them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    /// Cores available to the process (what `nproc` prints).
    pub nproc: usize,
    pub cpu: Option<String>,
    pub started_utc: String,
    /// `/proc/loadavg` (1, 5, 15 minutes) at the start and the end of the run.
    pub load_start: Option<String>,
    pub load_end: Option<String>,
    pub elapsed_s: f64,
}

/// The ablation without the layer-wise loss for one task.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
#[allow(clippy::large_enum_variant)] // one per task and report: its size does not matter
pub enum Ablation {
    NotRun {
        reason: String,
    },
    /// MuE calibrated on the ablation model's validation split, evaluated on test.
    Run {
        calibration: Calibration,
        report: EvalReport,
    },
}

/// One task of a report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskResults {
    pub task: Task,
    pub encoder_layers: usize,
    pub decoder_layers: usize,
    pub target: f64,
    pub valid_examples: usize,
    pub calibration_points: usize,
    /// MuE calibrated on the validation split.
    pub calibration: Calibration,
    /// What the calibration and every baseline pick optimised on valid (None in reports
    /// written before it was recorded: the plain target).
    #[serde(default)]
    pub objective: Option<Objective>,
    /// MuE calibrated by the same rule among constant decoder thresholds only, and among
    /// scheduled ones only, when the calibration grid has both forms.
    #[serde(default)]
    pub decoder_forms: Vec<DecoderForm>,
    /// The baseline families on the validation split, where each family's point is picked
    /// by MuE's rule. None in reports written before (their points were picked on test).
    #[serde(default)]
    pub valid_sweep: Option<SweepResult>,
    /// Every family on the test split (includes full depth, the static rows and the
    /// calibrated point).
    pub sweep: SweepResult,
    /// The sweep plot (PNG, else SVG) as written, and the link to it from the page.
    pub plot_file: Option<PathBuf>,
    pub plot: Option<String>,
    pub ablation: Ablation,
}

/// Everything a page shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReportData {
    pub config: ReportConfig,
    pub machine: Machine,
    /// Training loss of the models, from their `train_state.json` when present.
    pub model_loss: Option<LossKind>,
    pub ablation_loss: Option<LossKind>,
    pub tasks: Vec<TaskResults>,
}

/// Static depths shown as the "smaller model": about 2/3 (OFA-Tiny's 4 of OFA-Base's 6
/// layers) and 1/3 of the depth, each below full depth.
pub fn static_depths(layers: usize) -> Vec<usize> {
    let mut d: Vec<usize> = [2.0, 1.0]
        .iter()
        .map(|f| (f * layers as f64 / 3.0).round() as usize)
        .filter(|&d| d >= 1 && d < layers)
        .collect();
    d.dedup();
    d
}

fn push_unique(grid: &mut Vec<PolicySpec>, spec: PolicySpec) {
    if !grid.contains(&spec) {
        grid.push(spec);
    }
}

const NEVER_EXIT: PolicySpec = PolicySpec::Mue(MueSpec {
    image: 1.0,
    text: 1.0,
    decoder: DecoderThreshold::Constant { tau: 1.0 },
});

/// The calibration grid: the MuE points of the file (or of the default grid), plus the
/// never-exit point so that any target can be met.
pub fn calibration_grid(file: Option<&Path>, decoder_layers: usize) -> Result<Vec<PolicySpec>> {
    let mut g = sweep::select_grid(file, decoder_layers, &["mue".to_string()]).with_context(
        || match file {
            Some(f) => format!("calibration grid {} (its MuE points)", f.display()),
            None => "the default calibration grid".to_string(),
        },
    )?;
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
    let fams: Vec<String> = BASELINE_FAMILIES.iter().map(|f| f.to_string()).collect();
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
fn restrict(result: &SweepResult, keep: impl Fn(&SweepPoint) -> bool) -> SweepResult {
    let points = result.points.iter().filter(|p| keep(p)).cloned().collect();
    sweep::finish(result.task, result.examples, result.full_quality, points)
}

/// MuE calibrated among the points of one decoder-threshold form.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DecoderForm {
    /// The paper's schedule (true) or a constant threshold (false).
    pub schedule: bool,
    /// None when no point of this form meets the objective on valid.
    pub calibration: Option<Calibration>,
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
    let mut tasks = Vec::new();
    for &task in &config.tasks {
        tasks.push(run_task(
            config,
            task,
            &engine,
            ablation.as_ref(),
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
        model_loss: crate::train::load_state(&config.model).ok().map(|s| s.loss),
        ablation_loss: config
            .ablation_model
            .as_ref()
            .and_then(|d| crate::train::load_state(d).ok())
            .map(|s| s.loss),
        tasks,
    };
    write_json(&layout.data(), &data)?;
    Ok(data)
}

fn run_task(
    config: &ReportConfig,
    task: Task,
    engine: &Engine,
    ablation: Option<&Engine>,
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
    for fam in BASELINE_FAMILIES {
        if let Some((i, _)) = pick_family(&valid_sweep, fam, objective) {
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
    let result = sweep::sweep(engine, &test, &grid, opts)?;
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
            let dir = layout.ablation_calibrate_dir(task);
            let (calibration, _) =
                calibrate::calibrate_on(abl, &valid, &cal_grid, objective, opts, Some(&dir))?;
            calibrate::write_exits(&layout.ablation_exits(), &calibration)?;
            let report = eval::evaluate(abl, &test, &calibration.policy, opts)?;
            write_json(&layout.ablation_eval(task), &report)?;
            Ablation::Run {
                calibration,
                report,
            }
        }
    };
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
    })
}

/// Read back the results of an earlier [`run`].
pub fn load(results: &Path) -> Result<ReportData> {
    let path = Layout::new(results).data();
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read {} (run `mue report` without --render-only first)",
            path.display()
        )
    })?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not a report data file", path.display()))
}

/// Point the page at `out` instead (plot links follow).
pub fn relink(data: &mut ReportData, out: &Path) {
    data.config.out = out.to_path_buf();
    for t in &mut data.tasks {
        t.plot = t.plot_file.as_ref().map(|f| page_link(out, f));
    }
}

/// Write the rendered page to `config.out`.
pub fn write_page(data: &ReportData) -> Result<PathBuf> {
    let out = &data.config.out;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(out, render(data)).with_context(|| format!("writing {}", out.display()))?;
    Ok(out.clone())
}

// ---------------------------------------------------------------- machine

fn load_average() -> Option<String> {
    let s = std::fs::read_to_string("/proc/loadavg").ok()?;
    Some(s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

/// The end-of-run load average that shows other work beside the run, if any: the 5-minute
/// figure, or the 15-minute one for runs long enough to fill it, above the core count plus
/// half a core (the run itself keeps at most one runnable thread per core).
fn overload(m: &Machine) -> Option<f64> {
    let loads: Vec<f64> = m
        .load_end
        .as_deref()?
        .split_whitespace()
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    let mut load = *loads.get(1)?;
    if m.elapsed_s >= 15.0 * 60.0 {
        load = load.max(*loads.get(2)?);
    }
    (load > m.nproc as f64 + 0.5).then_some(load)
}

fn cpu_model() -> Option<String> {
    let s = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    s.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

/// `YYYY-MM-DD HH:MM UTC` of a Unix time (civil-from-days, no time zone database needed).
pub fn utc_date(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

// ---------------------------------------------------------------- paths

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .unwrap_or_else(|_| PathBuf::from("/"))
            .join(p)
    }
}

fn normal_parts(p: &Path) -> Vec<String> {
    let mut parts: Vec<String> = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => parts.push(s.to_string_lossy().into_owned()),
            Component::ParentDir => {
                parts.pop();
            }
            _ => {}
        }
    }
    parts
}

/// `target` as a relative link from a page in `from_dir` (lexical; both paths on the same
/// base, e.g. both absolute).
pub fn relative_link(from_dir: &Path, target: &Path) -> String {
    let from = normal_parts(from_dir);
    let to = normal_parts(target);
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut parts: Vec<&str> = vec![".."; from.len() - common];
    parts.extend(to[common..].iter().map(String::as_str));
    parts.join("/")
}

/// Link from the page `out` to `file`, both relative to the working directory or absolute.
fn page_link(out: &Path, file: &Path) -> String {
    let page_dir = absolute(out)
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    relative_link(&page_dir, &absolute(file))
}

// ---------------------------------------------------------------- choosing rows

/// How a baseline family's row was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PickRule {
    /// The cheapest point (largest MAC reduction) meeting the objective MuE is calibrated
    /// by (quality >= target x full depth, or the interval's lower end >= target).
    CheapestAtTarget,
    /// No point of the family reaches the target: its best-quality point.
    BestQuality,
}

/// The point shown for `family`: cheapest at the target, else best quality (ties: the
/// cheaper, then the earlier grid point).
pub fn pick_baseline(sweep: &SweepResult, family: &str, target: f64) -> Option<(usize, PickRule)> {
    pick_family(sweep, family, Objective::Target(target))
}

/// The point of `family` that `objective` picks, by the rule of MuE's calibration
/// ([`calibrate::pick_among`]); when none meets it, the family's best-quality point.
pub fn pick_family(
    sweep: &SweepResult,
    family: &str,
    objective: Objective,
) -> Option<(usize, PickRule)> {
    let p = &sweep.points;
    let members = || (0..p.len()).filter(|&i| p[i].family == family);
    if let Some(i) = calibrate::pick_among(sweep, objective, |q| q.family == family) {
        return Some((i, PickRule::CheapestAtTarget));
    }
    members()
        .max_by(|&a, &b| {
            p[a].quality
                .total_cmp(&p[b].quality)
                .then(p[a].mac_reduction.total_cmp(&p[b].mac_reduction))
                .then(b.cmp(&a))
        })
        .map(|i| (i, PickRule::BestQuality))
}

/// Index of the calibrated point in the test sweep.
fn calibrated_point(sweep: &SweepResult, calibrated: &PolicySpec) -> Option<usize> {
    sweep.points.iter().position(|p| p.spec == *calibrated)
}

/// The calibrated point in the test sweep, and up to `extra` other points of MuE's own
/// frontier that save work, spread evenly over it by MAC reduction.
pub fn mue_points(
    sweep: &SweepResult,
    calibrated: &PolicySpec,
    extra: usize,
) -> (Option<usize>, Vec<usize>) {
    let p = &sweep.points;
    let cal = calibrated_point(sweep, calibrated);
    let mut front: Vec<usize> = (0..p.len())
        .filter(|&i| {
            p[i].family == "mue"
                && p[i].on_family_frontier
                && p[i].spec != *calibrated
                && p[i].mac_reduction > 0.0
        })
        .collect();
    front.sort_by(|&a, &b| p[a].mac_reduction.total_cmp(&p[b].mac_reduction));
    // Equal (quality, cost) duplicates would show the same numbers twice.
    front.dedup_by(|a, b| {
        p[*a].quality == p[*b].quality && p[*a].mac_reduction == p[*b].mac_reduction
    });
    let chosen = if front.len() <= extra {
        front
    } else if extra == 1 {
        vec![front[front.len() / 2]]
    } else {
        let n = front.len() - 1;
        let mut c: Vec<usize> = (0..extra)
            .map(|k| front[(k * n + (extra - 1) / 2) / (extra - 1)])
            .collect();
        c.dedup();
        c
    };
    (cal, chosen)
}

/// Families compared against MuE's points.
pub const BASELINE_FAMILIES: [&str; 5] = ["static", "entropy", "patience", "margin", "joint"];

/// Whether some MuE point has at least the quality and at least the MAC reduction of `p`.
pub fn dominated_by_mue(sweep: &SweepResult, p: &SweepPoint) -> bool {
    sweep
        .points
        .iter()
        .any(|m| m.family == "mue" && m.quality >= p.quality && m.mac_reduction >= p.mac_reduction)
}

/// One family's points against MuE's.
#[derive(Debug, Clone, PartialEq)]
pub struct Dominance {
    pub family: String,
    pub points: usize,
    pub dominated: usize,
    /// Indices of the points no MuE point matches or beats.
    pub open: Vec<usize>,
}

/// [`Dominance`] of every baseline family present in the sweep.
pub fn dominance(sweep: &SweepResult) -> Vec<Dominance> {
    BASELINE_FAMILIES
        .iter()
        .filter_map(|&fam| {
            let members: Vec<usize> = (0..sweep.points.len())
                .filter(|&i| sweep.points[i].family == fam)
                .collect();
            if members.is_empty() {
                return None;
            }
            let open: Vec<usize> = members
                .iter()
                .copied()
                .filter(|&i| !dominated_by_mue(sweep, &sweep.points[i]))
                .collect();
            Some(Dominance {
                family: fam.to_string(),
                points: members.len(),
                dominated: members.len() - open.len(),
                open,
            })
        })
        .collect()
}

/// Which row of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowKey {
    Full,
    /// A fixed static depth (the smaller-model baseline).
    Static(usize),
    /// The point a family's rule picked (`static` only when not a fixed depth already).
    Picked(&'static str),
    Mue,
    /// MuE calibrated among constant (false) or scheduled (true) decoder thresholds only.
    MueDecoder(bool),
    MueFrontier,
    NoLayerWise,
}

/// The numbers of a row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Metrics {
    pub quality: Quality,
    /// Against the full-depth quality of the main model.
    pub relative: f64,
    pub macs: f64,
    pub wall: f64,
    pub layers: f64,
}

impl Metrics {
    fn of(p: &SweepPoint) -> Self {
        Self {
            quality: p.report.quality,
            relative: p.relative_quality,
            macs: p.mac_reduction,
            wall: p.wall_reduction,
            layers: p.layer_reduction,
        }
    }
}

/// A table row: numbers, or a note saying why there are none.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub key: RowKey,
    pub method: String,
    pub setting: String,
    pub metrics: Result<Metrics, String>,
}

fn family_name(fam: &str) -> &'static str {
    match fam {
        "static" => "Smaller model (static depth)",
        "entropy" => "DeeBERT (entropy)",
        "patience" => "PABEE (patience)",
        "margin" => "CALM (softmax margin)",
        "joint" => "MuE w/o modality decomposition (`joint`)",
        _ => "?",
    }
}

fn rule_text(rule: PickRule, objective: Objective) -> String {
    let (what, target) = match objective {
        Objective::LowerBound(t) => ("with interval's lower end ", t),
        Objective::Target(t) | Objective::Guarantee { target: t, .. } => ("", t),
        Objective::Budget(b) => return format!("best quality at <= {} of the MACs", pct0(b)),
    };
    match rule {
        PickRule::CheapestAtTarget => format!("cheapest {what}>= {}", pct0(target)),
        PickRule::BestQuality => format!("none {what}>= {}: best quality", pct0(target)),
    }
}

impl TaskResults {
    /// The objective of MuE's calibration and of every baseline pick.
    pub fn objective(&self) -> Objective {
        self.objective.unwrap_or(Objective::Target(self.target))
    }
}

/// The rows of a task's table, in the order of the page.
pub fn rows(t: &TaskResults) -> Vec<Row> {
    let s = &t.sweep;
    let point_row = |key, method: String, setting: String, i: usize| Row {
        key,
        method,
        setting,
        metrics: Ok(Metrics::of(&s.points[i])),
    };
    let missing = |key, method: String, note: &str| Row {
        key,
        method,
        setting: String::new(),
        metrics: Err(note.to_string()),
    };
    let mut out = Vec::new();
    let full_name = format!(
        "Full model ({}+{} layers)",
        t.encoder_layers, t.decoder_layers
    );
    match s
        .points
        .iter()
        .position(|p| p.spec == PolicySpec::Full(FullDepth))
    {
        Some(i) => out.push(point_row(RowKey::Full, full_name, String::new(), i)),
        None => out.push(missing(RowKey::Full, full_name, "not in the sweep grid")),
    }
    let depths = static_depths(t.encoder_layers.min(t.decoder_layers));
    for &d in &depths {
        let name = format!("Smaller model (static depth {d})");
        match s
            .points
            .iter()
            .position(|p| p.spec == PolicySpec::Static(StaticSpec { depth: d }))
        {
            Some(i) => out.push(point_row(RowKey::Static(d), name, format!("depth={d}"), i)),
            None => out.push(missing(RowKey::Static(d), name, "not in the sweep grid")),
        }
    }
    let objective = t.objective();
    // Picked on valid by MuE's rule, shown on test; reports from before the valid sweep
    // picked on test (said so on the page).
    let pick = |fam: &str| -> Option<(PolicySpec, String, String)> {
        match &t.valid_sweep {
            Some(v) => pick_family(v, fam, objective).map(|(i, rule)| {
                (
                    v.points[i].spec,
                    v.points[i].params.clone(),
                    format!("{} on valid", rule_text(rule, objective)),
                )
            }),
            None => pick_baseline(s, fam, t.target).map(|(i, rule)| {
                (
                    s.points[i].spec,
                    s.points[i].params.clone(),
                    rule_text(rule, Objective::Target(t.target)),
                )
            }),
        }
    };
    let picked = |fam: &'static str, out: &mut Vec<Row>| match pick(fam) {
        Some((spec, params, rule)) => {
            if let PolicySpec::Static(StaticSpec { depth }) = spec {
                if depths.contains(&depth) {
                    return;
                }
            }
            let setting = format!("{params}; {rule}");
            match s.points.iter().position(|p| p.spec == spec) {
                Some(i) => out.push(point_row(
                    RowKey::Picked(fam),
                    family_name(fam).into(),
                    setting,
                    i,
                )),
                None => out.push(Row {
                    key: RowKey::Picked(fam),
                    method: family_name(fam).into(),
                    setting,
                    metrics: Err("picked point not in the test sweep".into()),
                }),
            }
        }
        None if fam == "static" => {}
        None => out.push(missing(
            RowKey::Picked(fam),
            family_name(fam).into(),
            "not in the sweep grid",
        )),
    };
    for fam in ["static", "entropy", "patience", "margin"] {
        picked(fam, &mut out);
    }
    let (cal, others) = mue_points(s, &t.calibration.point.spec, 3);
    let cal_setting = format!("{}; calibrated on valid", t.calibration.point.params);
    match cal {
        Some(i) => out.push(point_row(RowKey::Mue, "**MuE**".into(), cal_setting, i)),
        None => out.push(Row {
            key: RowKey::Mue,
            method: "**MuE**".into(),
            setting: cal_setting,
            metrics: Err("calibrated point not in the test sweep".into()),
        }),
    }
    for f in &t.decoder_forms {
        let sched = f.schedule;
        let (method, among) = if sched {
            ("MuE, decoder schedule", "scheduled")
        } else {
            ("MuE, constant decoder threshold", "constant")
        };
        let Some(c) = &f.calibration else {
            out.push(Row {
                key: RowKey::MueDecoder(sched),
                method: method.into(),
                setting: String::new(),
                metrics: Err(format!(
                    "no {among} point meets the objective on valid ({})",
                    rule_text(PickRule::CheapestAtTarget, objective)
                )),
            });
            continue;
        };
        let setting = format!(
            "{}; calibrated on valid among {among} decoder thresholds",
            c.point.params
        );
        out.push(match calibrated_point(s, &c.point.spec) {
            Some(i) => point_row(RowKey::MueDecoder(sched), method.into(), setting, i),
            None => Row {
                key: RowKey::MueDecoder(sched),
                method: method.into(),
                setting,
                metrics: Err("calibrated point not in the test sweep".into()),
            },
        });
    }
    for i in others {
        out.push(point_row(
            RowKey::MueFrontier,
            "MuE (test frontier; illustration, chosen on test)".into(),
            s.points[i].params.clone(),
            i,
        ));
    }
    picked("joint", &mut out);
    let name = "MuE w/o layer-wise loss".to_string();
    out.push(match &t.ablation {
        Ablation::NotRun { reason } => Row {
            key: RowKey::NoLayerWise,
            method: name,
            setting: String::new(),
            metrics: Err(format!("not run: {reason}")),
        },
        Ablation::Run {
            calibration,
            report,
        } => Row {
            key: RowKey::NoLayerWise,
            method: name,
            setting: format!("{}; calibrated on valid", calibration.point.params),
            metrics: Ok(Metrics {
                quality: report.quality,
                relative: eval::ratio(report.quality.primary, s.full_quality.primary),
                macs: report.reduction.macs,
                wall: report.reduction.wall,
                layers: report.reduction.layers,
            }),
        },
    });
    out
}

// ---------------------------------------------------------------- formatting

/// " (90% bootstrap interval a to b)", or nothing for a report without one.
fn interval_text(iv: Option<[f64; 2]>) -> String {
    iv.map(|iv| format!(" ({})", eval::interval_phrase(iv)))
        .unwrap_or_default()
}

fn pct0(x: f64) -> String {
    let v = 100.0 * x;
    if (v - v.round()).abs() < 1e-9 {
        format!("{v:.0}%")
    } else {
        format!("{v}%")
    }
}

fn num(x: Option<f64>) -> String {
    match x {
        Some(v) if v.is_finite() => format!("{v:.3}"),
        _ => "n/a".into(),
    }
}

/// The primary quality as the tables print it.
fn quality_text(task: Task, q: f64) -> String {
    match task {
        Task::Entail => pct(q),
        Task::Caption => num(Some(q)),
    }
}

fn task_title(task: Task) -> &'static str {
    match task {
        Task::Entail => "Visual entailment",
        Task::Caption => "Captioning",
    }
}

fn metric_name(task: Task) -> &'static str {
    match task {
        Task::Entail => "accuracy",
        Task::Caption => "CIDEr-D",
    }
}

fn loss_text(l: Option<LossKind>) -> &'static str {
    match l {
        Some(LossKind::LayerWise) => "trained with the layer-wise loss",
        Some(LossKind::FinalOnly) => "trained with the final-layer loss only",
        None => "training loss unknown: no train_state.json",
    }
}

/// Quote a shell word when it needs it.
fn sh(p: &Path) -> String {
    let s = p.display().to_string();
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./=:,+@".contains(c))
    {
        s
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

fn cells(task: Task, m: &Result<Metrics, String>) -> Vec<String> {
    let n = match task {
        Task::Entail => 5,
        Task::Caption => 6,
    };
    match m {
        Err(note) => {
            let mut v = vec![String::new(); n];
            v[0] = note.clone();
            v
        }
        Ok(m) => {
            let tail = [pct(m.macs), pct(m.wall), pct(m.layers)];
            let mut v = match task {
                Task::Entail => vec![
                    pct(m.quality.accuracy.unwrap_or(m.quality.primary)),
                    pct(m.relative),
                ],
                Task::Caption => vec![
                    num(m.quality.cider.or(Some(m.quality.primary))),
                    num(m.quality.bleu4),
                    pct(m.relative),
                ],
            };
            v.extend(tail);
            v
        }
    }
}

fn point_text(task: Task, p: &SweepPoint) -> String {
    let params = if p.params.is_empty() {
        String::new()
    } else {
        format!(" {}", p.params)
    };
    format!(
        "{}{params} ({} {}, MACs {})",
        p.family,
        metric_name(task),
        quality_text(task, p.quality),
        pct(p.mac_reduction)
    )
}

/// The sentence on where MuE's points are not ahead, from [`dominance`].
pub fn frontier_statement(t: &TaskResults) -> String {
    let s = &t.sweep;
    let dom = dominance(s);
    let total: usize = dom.iter().map(|d| d.points).sum();
    let beaten: usize = dom.iter().map(|d| d.dominated).sum();
    let metric = metric_name(t.task);
    if !s.points.iter().any(|p| p.family == "mue") {
        return "The test sweep has no MuE point to compare with.".into();
    }
    if total == 0 {
        return "The test sweep has no baseline point to compare with.".into();
    }
    let open: Vec<String> = dom
        .iter()
        .flat_map(|d| d.open.iter().map(|&i| point_text(t.task, &s.points[i])))
        .collect();
    if open.is_empty() {
        format!(
            "Every one of the {total} baseline points of the test sweep is matched or beaten \
             by a MuE point (at least its {metric} and at least its MAC reduction)."
        )
    } else {
        format!(
            "**The MuE frontier is not above every baseline:** {} of the {total} baseline \
             points of the test sweep have no MuE point with at least their {metric} and at \
             least their MAC reduction: {}. The other {beaten} are matched or beaten by a \
             MuE point.",
            open.len(),
            open.join("; ")
        )
    }
}

fn table(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let _ = writeln!(out, "| {} |", header.join(" | "));
    let _ = writeln!(out, "|{}", "---|".repeat(header.len()));
    for r in rows {
        let _ = writeln!(out, "| {} |", r.join(" | "));
    }
}

/// The markdown page.
pub fn render(data: &ReportData) -> String {
    let c = &data.config;
    let m = &data.machine;
    let mut s = String::new();
    let _ = writeln!(s, "# Results: MuE against early-exit baselines\n");
    let _ = writeln!(
        s,
        "<!-- Generated by `mue report` (src/eval/report.rs); do not edit by hand. -->\n"
    );
    let _ = writeln!(
        s,
        "Generated by `mue report`, started {}, on a machine with {} cores (`nproc`){}; \
         load average {} at the start and {} at the end; the run took {:.1} min. \
         Model `{}` ({}), benchmark `{}`. The commands that regenerate this page are at \
         the end.\n",
        m.started_utc,
        m.nproc,
        m.cpu.as_ref().map(|c| format!(", {c}")).unwrap_or_default(),
        m.load_start.as_deref().unwrap_or("unknown"),
        m.load_end.as_deref().unwrap_or("unknown"),
        m.elapsed_s / 60.0,
        c.model.display(),
        loss_text(data.model_loss),
        c.data.display(),
    );
    if let Some(load) = overload(m) {
        let _ = writeln!(
            s,
            "**Other work shared the machine during this run** (load average {load:.2} on \
             {} cores, where this run alone keeps it at about the core count): the \
             wall-clock figures on this page are unreliable; rerun on an idle machine. \
             Quality, MAC and layer figures do not depend on load.\n",
            m.nproc
        );
    }
    let tables: Vec<(Task, Vec<Row>)> = data.tasks.iter().map(|t| (t.task, rows(t))).collect();
    summary(&mut s, &tables);
    reading(&mut s, data);
    for (t, (_, rows)) in data.tasks.iter().zip(&tables) {
        task_section(&mut s, data, t, rows);
    }
    commands(&mut s, data);
    s
}

fn summary(s: &mut String, tables: &[(Task, Vec<Row>)]) {
    let _ = writeln!(s, "## Summary, laid out as the paper's table\n");
    let _ = writeln!(
        s,
        "Test split. \"layers\" is the change in layers run, the paper's time (counted per \
         stream and token); \"MACs\" the change in multiply-adds executed; both against full \
         depth, written as the paper does: -33% is a third less, a positive figure is more \
         work. Every method shows one point, chosen on the validation split by the same rule as \
         MuE's thresholds (below) and evaluated once on test; the detailed tables follow.\n"
    );
    let first_static = tables
        .iter()
        .flat_map(|(_, r)| r.iter())
        .find_map(|r| match r.key {
            RowKey::Static(d) => Some(d),
            _ => None,
        });
    let mut keys: Vec<(RowKey, String)> = vec![(RowKey::Full, "Full model".into())];
    if let Some(d) = first_static {
        keys.push((
            RowKey::Static(d),
            format!("Smaller model (static depth {d})"),
        ));
    }
    for fam in ["entropy", "patience", "margin"] {
        keys.push((
            RowKey::Picked(fam),
            format!("{} (picked on valid)", family_name(fam)),
        ));
    }
    keys.push((RowKey::Mue, "**MuE** (calibrated on valid)".into()));
    // Side by side only where some task calibrated both forms (captions).
    for (sched, name) in [
        (false, "MuE, constant decoder threshold"),
        (true, "MuE, decoder schedule"),
    ] {
        let key = RowKey::MueDecoder(sched);
        if tables
            .iter()
            .any(|(_, r)| r.iter().any(|row| row.key == key))
        {
            keys.push((key, name.into()));
        }
    }
    keys.push((RowKey::Picked("joint"), family_name("joint").into()));
    keys.push((RowKey::NoLayerWise, "MuE w/o layer-wise loss".into()));
    let mut header = vec!["method".to_string()];
    for (task, _) in tables {
        let q = match task {
            Task::Entail => "VE accuracy",
            Task::Caption => "CIDEr-D",
        };
        header.extend([q.to_string(), "layers".into(), "MACs".into()]);
    }
    let body: Vec<Vec<String>> = keys
        .iter()
        .map(|(key, name)| {
            let mut r = vec![name.clone()];
            for (task, rows) in tables {
                match rows
                    .iter()
                    .find(|row| row.key == *key)
                    .map(|row| &row.metrics)
                {
                    Some(Ok(m)) => r.extend([
                        quality_text(*task, m.quality.primary),
                        neg(m.layers),
                        neg(m.macs),
                    ]),
                    Some(Err(note)) => r.extend([note.clone(), String::new(), String::new()]),
                    None => r.extend([String::new(), String::new(), String::new()]),
                }
            }
            r
        })
        .collect();
    let h: Vec<&str> = header.iter().map(String::as_str).collect();
    table(s, &h, &body);
    let _ = writeln!(
        s,
        "\nThe paper (OFA-Base 6+6 layers on real SNLI-VE and COCO; time counted in layers), \
         for the layout only: the benchmark and the model here are different and much smaller.\n"
    );
    table(
        s,
        &["model", "SNLI-VE acc.", "time", "COCO CIDEr", "time"],
        &[
            ["OFA-Base (full)", "89.2", "0%", "146.7", "0%"],
            ["OFA-Tiny (static, 4+4)", "85.2", "-33%", "128.7", "-33%"],
            ["DeeBERT (entropy)", "78.8", "-15%", "102.1", "-15.5%"],
            ["PABEE (patience)", "85.2", "-15.3%", "105.8", "-16.3%"],
            ["MuE", "88.5", "-50%", "137.0", "-40.2%"],
            [
                "MuE w/o modality decomposition",
                "75.0",
                "-35%",
                "117.5",
                "-21%",
            ],
            ["MuE w/o layer-wise loss", "87.0", "-47%", "117.9", "-25%"],
        ]
        .map(|r| r.map(String::from).to_vec()),
    );
    let _ = writeln!(s);
}

/// A reduction as the paper writes time: `-33.3%` for a third less.
fn neg(x: f64) -> String {
    pct(-x)
}

fn reading(s: &mut String, data: &ReportData) {
    let c = &data.config;
    let targets: Vec<String> = data
        .tasks
        .iter()
        .map(|t| {
            let bound = if matches!(c.objective(t.task), Objective::LowerBound(_)) {
                " (the lower end of the point's 90% paired-bootstrap interval there, not its \
                 estimate)"
            } else {
                ""
            };
            format!("{} for {}{bound}", pct0(t.target), metric_name(t.task))
        })
        .collect();
    let _ = writeln!(s, "## How to read the tables\n");
    let _ = writeln!(
        s,
        "- **Quality** on the test split: entailment accuracy; captioning CIDEr-D and BLEU-4 \
         (as pycocoevalcap computes them; beam {}, at most {} tokens). **Relative**: quality \
         over the full-depth quality of the main model on the same examples.",
        c.search.beam, c.search.max_len
    );
    let _ = writeln!(
        s,
        "- **MAC red.**: 1 - executed multiply-adds / full-depth multiply-adds, counted from \
         the shapes actually run (prediction-based policies pay for their vocabulary \
         projections, so theirs can be negative). **Wall red.**: 1 - wall time / wall time of \
         a full-depth run of the same examples in the same process (batch {}; noisy on a \
         loaded machine: the full-depth row is a second full-depth run and shows the noise). \
         **Layer red.**: the paper's \"time\", the mean fraction of layers skipped (image \
         stream, text stream and every decoder token each count their layers).",
        c.batch
    );
    let _ = writeln!(
        s,
        "- **MuE**: thresholds chosen by `mue calibrate` on the validation split: the MuE grid \
         point of lowest MAC cost keeping at least {} of full-depth quality there (the \
         never-exit point is always in the grid, so a point exists). Then evaluated once on \
         the test split. When the grid has both decoder forms (a constant threshold, and the \
         paper's schedule: no exit in the first third of the maximum length, then \
         `decay * tau + (1 - decay) * exp(-(t + 1) / (T + 1))`), the rows \"MuE, constant \
         decoder threshold\" and \"MuE, decoder schedule\" are the same rule applied to each \
         form's points alone, side by side; **MuE** is the better of the two on valid. \
         Teacher-forced entailment scoring is decoding step 0, where the schedule never \
         exits. The \"test frontier\" rows are other MuE points of the test sweep on MuE's \
         own Pareto frontier (spread over it by MAC reduction): chosen on test, for \
         illustration only.",
        targets.join(", ")
    );
    let picked_on_valid = data.tasks.iter().all(|t| t.valid_sweep.is_some());
    if picked_on_valid {
        let _ = writeln!(
            s,
            "- **Baselines** (DeeBERT, PABEE, CALM, the static depth the rule picks, and the \
             `joint` ablation): each family is swept on the validation split \
             (`{}`), and its point is picked there by MuE's rule, with MuE's target: the \
             cheapest point (largest MAC reduction) meeting it; if no point of the family \
             does, its best-quality point on valid. That point is then evaluated once on \
             test, like MuE's. Neither MuE nor any baseline is chosen on test.",
            Layout::new(&data.config.results)
                .valid_sweep_dir()
                .display()
        );
    } else {
        let _ = writeln!(
            s,
            "- **Baselines** (DeeBERT, PABEE, CALM, the static depth the rule picks, and the \
             `joint` ablation): one point per family from the same test sweep, by one rule: \
             the cheapest point (largest MAC reduction) whose quality is at least the target \
             fraction of full depth that MuE was calibrated to; if no point of the family \
             reaches it, its best-quality point. The rule sees the test split, MuE's \
             calibration does not: this favours the baselines (this report predates the \
             validation-split pick)."
        );
    }
    let _ = writeln!(
        s,
        "- **Which distribution the prediction baselines read**: in captioning, the softmax \
         over the whole vocabulary at each generated token (what generation samples from). \
         In entailment, the fair form: the three-way softmax over the answer tokens \
         (\" yes\" / \" no\" / \" maybe\", as the engine scores them), the same \
         distribution the answer is chosen from; only those rows of the output projection \
         are computed and counted. Entropy over three answers is at most ln 3 = 1.10 nats."
    );
    let _ = writeln!(
        s,
        "- **Smaller model**: static depths of about 2/3 and 1/3 of the layers (every stream \
         and every token stops after that many layers), as OFA-Tiny's 4+4 against OFA-Base's \
         6+6, without retraining."
    );
    let _ = writeln!(
        s,
        "- **MuE w/o modality decomposition** is the engine's `joint` policy: one similarity \
         threshold shared by the image and text streams. The streams still run and exit \
         separately (the paper's ablation runs one joint encoder and exits it as a whole), so \
         this is a weaker ablation: it is exactly MuE restricted to equal image and text \
         thresholds."
    );
    let abl = match &c.ablation_model {
        Some(d) => format!(
            "the model `{}` ({}), with MuE thresholds calibrated on its own validation split \
             by the same procedure; relative quality is against the main model's full depth",
            d.display(),
            loss_text(data.ablation_loss)
        ),
        None => "not run: no `--ablation-model` was given. Train a model with `mue train \
                 ... --loss final-only` (same data, steps and seed as the main model) and \
                 pass its folder to `mue report --ablation-model DIR`"
            .into(),
    };
    let _ = writeln!(s, "- **MuE w/o layer-wise loss**: {abl}.");
    if data.ablation_loss == Some(LossKind::LayerWise) {
        let _ = writeln!(
            s,
            "\n**Warning:** the ablation model was trained with the layer-wise loss, so its \
             row is not the ablation."
        );
    }
    let _ = writeln!(s);
}

fn task_section(s: &mut String, data: &ReportData, t: &TaskResults, rows: &[Row]) {
    let sw = &t.sweep;
    let _ = writeln!(s, "## {}\n", task_title(t.task));
    let test = data.config.split_file(t.task, "test");
    let valid = data.config.split_file(t.task, "valid");
    let _ = writeln!(
        s,
        "{} test examples (`{}`), full-depth {} {}; MuE calibrated on {} validation \
         examples (`{}`, {} grid points): {} there at {} of full depth{}, MACs {}.\n",
        sw.examples,
        test.display(),
        metric_name(t.task),
        quality_text(t.task, sw.full_quality.primary),
        t.valid_examples,
        valid.display(),
        t.calibration_points,
        t.calibration.point.params,
        pct(t.calibration.point.relative_quality),
        interval_text(t.calibration.point.report.relative_quality_interval),
        neg(t.calibration.point.mac_reduction),
    );
    if let Some(v) = &t.valid_sweep {
        let _ = writeln!(
            s,
            "The baselines: {} points of their families swept on the same {} validation \
             examples; each family's point is picked there by the same rule and shown below \
             on test.\n",
            v.points.len(),
            v.examples
        );
    }
    let forms: Vec<String> = t
        .decoder_forms
        .iter()
        .map(|f| {
            let name = if f.schedule {
                "decoder schedule"
            } else {
                "constant decoder threshold"
            };
            match &f.calibration {
                Some(c) => format!(
                    "{name}: {} at {} of full depth{}, MACs {}",
                    c.point.params,
                    pct(c.point.relative_quality),
                    interval_text(c.point.report.relative_quality_interval),
                    neg(c.point.mac_reduction)
                ),
                None => format!("{name}: no point meets the objective"),
            }
        })
        .collect();
    if !forms.is_empty() {
        let _ = writeln!(
            s,
            "Each decoder form calibrated alone on valid: {}.\n",
            forms.join("; ")
        );
    }
    let header: &[&str] = match t.task {
        Task::Entail => &[
            "method",
            "setting",
            "accuracy",
            "rel. accuracy",
            "MAC red.",
            "wall red.",
            "layer red.",
        ],
        Task::Caption => &[
            "method",
            "setting",
            "CIDEr-D",
            "BLEU-4",
            "rel. CIDEr-D",
            "MAC red.",
            "wall red.",
            "layer red.",
        ],
    };
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut v = vec![r.method.clone(), r.setting.clone()];
            v.extend(cells(t.task, &r.metrics));
            v
        })
        .collect();
    table(s, header, &body);
    if let Some(p) = calibrated_point(sw, &t.calibration.point.spec).map(|i| &sw.points[i]) {
        if p.report.relative_quality_interval.is_some() {
            let _ = writeln!(
                s,
                "\nOn test the calibrated point keeps {} of full depth{}; on validation it \
                 kept {}{}. The intervals are how far such a figure moves between splits of \
                 these sizes.",
                pct(p.relative_quality),
                interval_text(p.report.relative_quality_interval),
                pct(t.calibration.point.relative_quality),
                interval_text(t.calibration.point.report.relative_quality_interval),
            );
        }
    }
    if let Ablation::Run { report, .. } = &t.ablation {
        let _ = writeln!(
            s,
            "\nThe ablation model's own full-depth {} is {} (its row keeps {} of it).",
            metric_name(t.task),
            quality_text(t.task, report.full_quality.primary),
            pct(report.relative_quality)
        );
    }
    let _ = writeln!(s);
    match &t.plot {
        Some(link) => {
            let _ = writeln!(
                s,
                "![{}: {} against MAC reduction, every point of the test sweep; lines join \
                 each family's own frontier]({link})\n",
                task_title(t.task),
                metric_name(t.task)
            );
        }
        None => {
            let _ = writeln!(s, "(No plot was written.)\n");
        }
    }
    let _ = writeln!(
        s,
        "*Illustration, on test:* the plot and the statement below compare every point of \
         the test sweep, whichever split would choose it.\n"
    );
    let _ = writeln!(s, "{}\n", frontier_statement(t));
    let dom = dominance(sw);
    if !dom.is_empty() {
        let body: Vec<Vec<String>> = dom
            .iter()
            .map(|d| {
                let open: Vec<String> = d
                    .open
                    .iter()
                    .map(|&i| point_text(t.task, &sw.points[i]))
                    .collect();
                vec![
                    d.family.clone(),
                    d.points.to_string(),
                    d.dominated.to_string(),
                    if open.is_empty() {
                        "none".into()
                    } else {
                        open.join("; ")
                    },
                ]
            })
            .collect();
        table(
            s,
            &[
                "family",
                "points",
                "matched or beaten by a MuE point",
                "not matched (MuE is not above these)",
            ],
            &body,
        );
        let _ = writeln!(s);
    }
}

fn commands(s: &mut String, data: &ReportData) {
    let c = &data.config;
    let layout = Layout::new(&c.results);
    let _ = writeln!(s, "## Reproduce\n");
    let _ = writeln!(
        s,
        "Everything on this page (results in `{}`, this page in `{}`):\n",
        c.results.display(),
        c.out.display()
    );
    let _ = writeln!(s, "```sh\n{}\n```\n", report_command(c));
    let _ = writeln!(
        s,
        "`mue report --render-only --results {} --out {}` re-renders this page from `{}` \
         without running anything. The same steps one by one (the grids actually run are \
         saved under `{}`):\n",
        sh(&c.results),
        sh(&c.out),
        layout.data().display(),
        layout.root.join("report").display(),
    );
    let _ = writeln!(s, "```sh");
    for t in &data.tasks {
        let task = t.task;
        let common = |model: &Path, split: &str| {
            let mut v = format!(
                "--model {} --data {} --task {}",
                sh(model),
                sh(&c.split_file(task, split)),
                task.name()
            );
            if let Some(l) = c.limit(task) {
                let _ = write!(v, " --limit {l}");
            }
            let _ = write!(
                v,
                " --batch {} --beam {} --max-len {}",
                c.batch, c.search.beam, c.search.max_len
            );
            v
        };
        let kv = c.search.kv_fill.as_str();
        let bound = if matches!(c.objective(task), Objective::LowerBound(_)) {
            " --lower-bound"
        } else {
            ""
        };
        let cal = |model: &Path, exits: PathBuf, dir: PathBuf| {
            format!(
                "mue calibrate {} --target {}{bound} --grid {} --kv-fill {kv} --out {} \
                 --sweep-out {} --quiet",
                common(model, "valid"),
                t.target,
                sh(&layout.calibration_grid(task)),
                sh(&exits),
                sh(&dir)
            )
        };
        let _ = writeln!(s, "# {}", task_title(task).to_lowercase());
        let _ = writeln!(
            s,
            "{}",
            cal(&c.model, layout.exits(), layout.calibrate_dir(task))
        );
        if t.valid_sweep.is_some() {
            let _ = writeln!(
                s,
                "mue sweep {} --grid {} --kv-fill {kv} --out-dir {} --quiet",
                common(&c.model, "valid"),
                sh(&layout.valid_grid(task)),
                sh(&layout.valid_sweep_dir())
            );
        }
        let _ = writeln!(
            s,
            "mue sweep {} --grid {} --kv-fill {kv} --out-dir {} --quiet",
            common(&c.model, "test"),
            sh(&layout.test_grid(task)),
            sh(&layout.sweep_dir())
        );
        if let (Some(abl), Ablation::Run { calibration, .. }) = (&c.ablation_model, &t.ablation) {
            let _ = writeln!(
                s,
                "{}",
                cal(
                    abl,
                    layout.ablation_exits(),
                    layout.ablation_calibrate_dir(task)
                )
            );
            let p = calibration.policy;
            let dec = match p.decoder {
                DecoderThreshold::Constant { tau } => format!("{tau}"),
                DecoderThreshold::Calm {
                    tau,
                    strict_fraction,
                    decay,
                } => format!("{tau} --dec-strict-fraction {strict_fraction} --dec-decay {decay}"),
            };
            let _ = writeln!(
                s,
                "mue eval {} --policy mue --img-threshold {} --text-threshold {} \
                 --dec-threshold {dec} --kv-fill {kv} --out {} --quiet",
                common(abl, "test"),
                p.image,
                p.text,
                sh(&layout.ablation_eval(task))
            );
        }
    }
    let _ = writeln!(s, "```\n");
    let _ = writeln!(
        s,
        "Wall-clock figures depend on the machine and its load; every other number is \
         deterministic for the same model, data and options."
    );
}

/// The `mue report` command line that reproduces `c`.
pub fn report_command(c: &ReportConfig) -> String {
    let mut v = format!("mue report --model {} --data {}", sh(&c.model), sh(&c.data));
    if let Some(a) = &c.ablation_model {
        let _ = write!(v, " --ablation-model {}", sh(a));
    }
    let _ = write!(v, " --results {} --out {}", sh(&c.results), sh(&c.out));
    if c.tasks != [Task::Entail, Task::Caption] {
        let t: Vec<&str> = c.tasks.iter().map(|t| t.name()).collect();
        let _ = write!(v, " --tasks {}", t.join(","));
    }
    if let Some(l) = c.limit {
        let _ = write!(v, " --limit {l}");
    }
    if let Some(l) = c.caption_limit {
        let _ = write!(v, " --caption-limit {l}");
    }
    let _ = write!(
        v,
        " --entail-target {} --caption-target {}",
        c.entail_target, c.caption_target
    );
    if !c.lower_bound.is_empty() {
        let t: Vec<&str> = c.lower_bound.iter().map(|t| t.name()).collect();
        let _ = write!(v, " --lower-bound {}", t.join(","));
    }
    for (flag, g) in [
        ("--entail-grid", &c.entail_grid),
        ("--caption-grid", &c.caption_grid),
        ("--sweep-grid", &c.sweep_grid),
    ] {
        match g {
            Some(p) => {
                let _ = write!(v, " {flag} {}", sh(p));
            }
            None => {
                let _ = write!(v, " {flag} default");
            }
        }
    }
    let _ = write!(
        v,
        " --batch {} --beam {} --max-len {} --kv-fill {}",
        c.batch,
        c.search.beam,
        c.search.max_len,
        c.search.kv_fill.as_str()
    );
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::eval::{ExitStats, Reduction};
    use crate::eval::sweep::finish;
    use crate::exit::{EntropyPolicy, JointSpec, MarginPolicy, PatiencePolicy};

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
            (PolicySpec::Static(StaticSpec { depth: 4 }), f(0.76), 0.3),
            (PolicySpec::Static(StaticSpec { depth: 2 }), f(0.6), 0.6),
            (
                PolicySpec::Entropy(EntropyPolicy { threshold: 0.5 }),
                f(0.8),
                0.05,
            ),
            (
                PolicySpec::Entropy(EntropyPolicy { threshold: 1.0 }),
                f(0.795),
                0.2,
            ),
            (
                PolicySpec::Entropy(EntropyPolicy { threshold: 2.0 }),
                f(0.7),
                0.5,
            ),
            (
                PolicySpec::Patience(PatiencePolicy { patience: 1 }),
                f(0.7),
                0.3,
            ),
            (
                PolicySpec::Patience(PatiencePolicy { patience: 2 }),
                f(0.75),
                0.1,
            ),
            (
                PolicySpec::Margin(MarginPolicy { threshold: 0.9 }),
                f(0.793),
                0.25,
            ),
            (mue(1.0, 1.0, 1.0), f(0.8), 0.0),
            (cal, f(0.795), 0.4),
            (mue(0.95, 1.0, 1.0), f(0.8), 0.2),
            (mue(0.8, 0.95, 0.95), f(0.78), 0.55),
            (mue(0.7, 0.9, 0.9), f(0.76), 0.65),
            (mue(0.5, 0.5, 0.5), f(0.7), 0.8),
            (
                PolicySpec::Joint(JointSpec {
                    encoder: 0.95,
                    decoder: DecoderThreshold::Constant { tau: 0.99 },
                }),
                f(0.795),
                0.15,
            ),
        ];
        if open_static {
            pts.push((PolicySpec::Static(StaticSpec { depth: 1 }), f(0.8), 0.9));
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
        }
    }

    fn data(tasks: Vec<TaskResults>, ablation: bool) -> ReportData {
        ReportData {
            config: ReportConfig {
                model: "models/default".into(),
                data: "data/bench".into(),
                ablation_model: ablation.then(|| "models/final-only".into()),
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
        let only = vec![
            PolicySpec::Entropy(EntropyPolicy { threshold: 0.5 }),
            mue(0.9, 0.9, 0.9),
        ];
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
                PolicySpec::Entropy(EntropyPolicy { threshold: 0.5 }),
                mue(0.9, 0.9, 0.9),
                PolicySpec::Static(StaticSpec { depth: 4 }),
                PolicySpec::Static(StaticSpec { depth: 2 }),
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
        assert!(
            cap[0].starts_with("| Full model (6+6 layers) |  | 0.500 | 0.250 | 100.0% | 0.0% |")
        );
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
        assert!(page
            .contains("Every one of the 9 baseline points of the test sweep is matched or beaten"));
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
        assert!(rows[3]
            .starts_with("| Smaller model (static depth) | depth=1; cheapest >= 99% | 80.0%"));
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
        assert!(
            page.contains("mue eval --model models/final-only --data data/bench/snli_ve_test.tsv")
        );
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
            (PolicySpec::Static(StaticSpec { depth: 4 }), f(0.7), 0.3),
            (PolicySpec::Static(StaticSpec { depth: 2 }), f(0.6), 0.6),
            (
                PolicySpec::Entropy(EntropyPolicy { threshold: 0.5 }),
                f(0.8),
                0.1,
            ),
            (
                PolicySpec::Entropy(EntropyPolicy { threshold: 1.0 }),
                f(0.78),
                0.2,
            ),
            (
                PolicySpec::Entropy(EntropyPolicy { threshold: 2.0 }),
                f(0.7),
                0.5,
            ),
            (
                PolicySpec::Patience(PatiencePolicy { patience: 1 }),
                f(0.6),
                0.3,
            ),
            (
                PolicySpec::Patience(PatiencePolicy { patience: 2 }),
                f(0.75),
                0.1,
            ),
            (
                PolicySpec::Margin(MarginPolicy { threshold: 0.9 }),
                f(0.793),
                0.25,
            ),
            (
                PolicySpec::Joint(JointSpec {
                    encoder: 0.9,
                    decoder: DecoderThreshold::Constant { tau: 0.99 },
                }),
                f(0.7),
                0.15,
            ),
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
            Some(PolicySpec::Entropy(EntropyPolicy { threshold: 1.0 }))
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
            .find(|p| p.spec == PolicySpec::Entropy(EntropyPolicy { threshold: 0.5 }))
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
}
