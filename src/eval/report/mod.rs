//! `mue report`: everything behind `docs/results.md`. Per task: MuE thresholds calibrated
//! on the validation split, a sweep of every policy family on the test split (JSON, CSV,
//! plots), the two ablations; then one markdown page laid out like the paper's table.
//! [`run`] does the work and saves it (`run.rs`; the machine it ran on, `machine.rs`);
//! [`rows`] chooses what each table row shows (`select.rs`); [`render`] is pure (results
//! in, markdown out; `render.rs`, its prose in `template.md`), so the page can be tested
//! and regenerated without running a model.

mod machine;
mod render;
mod run;
mod select;
#[cfg(test)]
mod tests;

pub use machine::{utc_date, Machine};
pub use render::{frontier_statement, render, report_command};
pub use run::{calibration_grid, decoder_forms, run, test_grid, valid_baseline_grid};
pub use select::{
    dominance, dominated_by_mue, mue_points, pick_baseline, pick_family, rows, static_depths,
    Dominance, Metrics, PickRule, Row, RowKey,
};

use super::breakdown::GroupReport;
use super::calibrate::{Calibration, Objective};
use super::eval::EvalReport;
use super::sweep::{self, SweepResult};
use crate::generate::SearchConfig;
use crate::run_meta::LossKind;
use crate::task::Task;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Component, Path, PathBuf};

/// What a report runs on and how; also what the page prints as its command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportConfig {
    pub model: PathBuf,
    /// Benchmark folder with `snli_ve_{valid,test}.tsv` and `caption_{valid,test}.tsv`.
    pub data: PathBuf,
    /// A model trained with `--loss final-only` (the ablation without the layer-wise loss).
    pub ablation_model: Option<PathBuf>,
    /// Other trained models shown as rows of their own (`--variant LABEL=DIR`): another
    /// training recipe, its final-only twin, a joint-encoder run, a smaller model.
    #[serde(default)]
    pub variants: Vec<VariantSpec>,
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
        let mut slugs = Vec::new();
        for v in &self.variants {
            let slug = v.slug();
            if v.label.trim().is_empty() || slug.is_empty() {
                bail!("--variant {:?}: the label needs a letter or digit", v.label);
            }
            if slugs.contains(&slug) {
                bail!("--variant {:?}: two variants share this label", v.label);
            }
            slugs.push(slug);
        }
        let variant_dirs = self.variants.iter().map(|v| ("--variant", Some(&v.model)));
        for (name, dir) in std::iter::once(("--model", Some(&self.model)))
            .chain([("--ablation-model", self.ablation_model.as_ref())])
            .chain(variant_dirs)
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

/// Another trained model, shown as a row labelled `label`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VariantSpec {
    pub label: String,
    pub model: PathBuf,
}

impl VariantSpec {
    /// `LABEL=DIR`, as `--variant` takes it (split at the first `=`).
    pub fn parse(s: &str) -> Result<Self> {
        match s.split_once('=') {
            Some((label, dir)) if !label.trim().is_empty() && !dir.is_empty() => Ok(Self {
                label: label.trim().to_string(),
                model: PathBuf::from(dir),
            }),
            _ => bail!(
                "--variant {s:?}: expected LABEL=DIR, e.g. \"MuE + sampling=runs/v2/sampling\""
            ),
        }
    }

    /// The label as a folder name: lower-case letters and digits, `-` between words.
    pub fn slug(&self) -> String {
        let mut out = String::new();
        for c in self.label.chars() {
            if c.is_ascii_alphanumeric() {
                out.push(c.to_ascii_lowercase());
            } else if !out.is_empty() && !out.ends_with('-') {
                out.push('-');
            }
        }
        out.trim_end_matches('-').to_string()
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
    /// A variant's calibration, thresholds and test evaluation.
    pub fn variant_dir(&self, v: &VariantSpec) -> PathBuf {
        self.root.join("variants").join(v.slug())
    }
    pub fn variant_calibrate_dir(&self, v: &VariantSpec, task: Task) -> PathBuf {
        self.variant_dir(v)
            .join(format!("calibrate_{}", task.name()))
    }
    pub fn variant_exits(&self, v: &VariantSpec) -> PathBuf {
        self.variant_dir(v).join("exits.json")
    }
    pub fn variant_eval(&self, v: &VariantSpec, task: Task) -> PathBuf {
        self.variant_dir(v)
            .join(format!("{}_test_mue.json", task.name()))
    }
    /// Everything [`render`] needs (`mue report --render-only` reads it back).
    pub fn data(&self) -> PathBuf {
        self.root.join("report.json")
    }
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

/// A variant model on one task: MuE calibrated on its own validation run by the main
/// model's rule and grid, evaluated once on test.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VariantResult {
    pub label: String,
    pub model: PathBuf,
    /// Its training loss, from its `train_state.json` when present.
    pub loss: Option<LossKind>,
    pub calibration: Calibration,
    pub report: EvalReport,
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
    /// The `--variant` models, in the order given.
    #[serde(default)]
    pub variants: Vec<VariantResult>,
    /// The calibrated MuE point on test per difficulty tier and question type, when the
    /// benchmark has its `meta_test.tsv`.
    #[serde(default)]
    pub breakdown: Option<Vec<GroupReport>>,
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

impl TaskResults {
    /// The objective of MuE's calibration and of every baseline pick.
    pub fn objective(&self) -> Objective {
        self.objective.unwrap_or(Objective::Target(self.target))
    }
}

/// MuE calibrated among the points of one decoder-threshold form.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DecoderForm {
    /// The paper's schedule (true) or a constant threshold (false).
    pub schedule: bool,
    /// None when no point of this form meets the objective on valid.
    pub calibration: Option<Calibration>,
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
pub(crate) fn page_link(out: &Path, file: &Path) -> String {
    let page_dir = absolute(out)
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    relative_link(&page_dir, &absolute(file))
}
