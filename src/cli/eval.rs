//! `mue eval`, `mue sweep`, `mue calibrate`: evaluation of exit policies on TSV splits.

use super::{ExitArgs, Task, TaskThresholds};
use crate::eval::breakdown;
use crate::eval::calibrate::{self, Calibration, Objective};
use crate::eval::eval::{self as ev, Dataset, EvalOptions};
use crate::eval::sweep::{self, PolicySpec, SweepResult};
use crate::exit::spec::{self, Flags};
use crate::exit::ExitPolicy;
use crate::generate::{KvFill, SearchConfig};
use crate::pipeline::Engine;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub use crate::eval::sweep::read_grid;

/// The policies `mue eval` can run: every registered family, and the oracle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyKind {
    /// A family of the policy registry (`crate::exit::spec`), by name.
    Family(&'static str),
    /// Per example, the shallowest uniform depth with the full-depth output.
    Oracle,
}

const ORACLE_HELP: &str = "Per example, the shallowest uniform depth with the full-depth output";

impl PolicyKind {
    pub fn name(&self) -> &'static str {
        match self {
            PolicyKind::Family(name) => name,
            PolicyKind::Oracle => "oracle",
        }
    }
}

impl clap::ValueEnum for PolicyKind {
    fn value_variants<'a>() -> &'a [Self] {
        static KINDS: OnceLock<Vec<PolicyKind>> = OnceLock::new();
        KINDS.get_or_init(|| {
            spec::FAMILIES
                .iter()
                .map(|f| PolicyKind::Family(f.name))
                .chain([PolicyKind::Oracle])
                .collect()
        })
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        let help = match self {
            PolicyKind::Family(name) => spec::family(name).ok()?.help,
            PolicyKind::Oracle => ORACLE_HELP,
        };
        Some(clap::builder::PossibleValue::new(self.name()).help(help))
    }
}

/// Options shared by the three commands.
#[derive(Debug, Clone, clap::Args)]
pub struct DataArgs {
    /// Model directory (config.json, model.safetensors, tokenizer.json) [default:
    /// $MUE_MODEL, ./models/default, or models/default beside the executable].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// OFA TSV split (snli_ve_*.tsv for entail, caption_*.tsv for caption), or with
    /// --images a COCO Karpathy `dataset_coco.json` (caption; its test split).
    #[arg(long)]
    pub data: PathBuf,
    /// Image folder of a COCO Karpathy --data file (`filepath/filename` under it).
    #[arg(long)]
    pub images: Option<PathBuf>,
    #[arg(long, value_enum)]
    pub task: Task,
    /// Use at most this many examples.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Requests per engine call.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Beam size for captioning.
    #[arg(long, default_value_t = 5)]
    pub beam: usize,
    #[arg(long, default_value_t = 16)]
    pub max_len: usize,
    /// Hide progress bars.
    #[arg(long)]
    pub quiet: bool,
    /// Entailment: put the split's premise (a caption) into the prompt, as OFA's
    /// `--add-caption` does. Only for models trained that way; the project's are not.
    #[arg(long)]
    pub premise: bool,
}

impl DataArgs {
    pub fn options(&self, kv_fill: &str) -> Result<EvalOptions> {
        Ok(EvalOptions {
            batch: self.batch,
            search: SearchConfig {
                beam: self.beam,
                max_len: self.max_len,
                kv_fill: kv_fill.parse::<KvFill>()?,
                ..SearchConfig::default()
            },
            progress: !self.quiet,
            premise: self.premise,
        })
    }

    pub fn load(&self) -> Result<Dataset> {
        match &self.images {
            Some(dir) => coco_test_split(&self.data, dir, self.task, self.limit),
            None => Dataset::load(&self.data, self.task, self.limit),
        }
    }
}

/// The test split of a COCO Karpathy file as a caption data set.
fn coco_test_split(
    json: &Path,
    images: &Path,
    task: Task,
    limit: Option<usize>,
) -> Result<Dataset> {
    anyhow::ensure!(
        task == Task::Caption,
        "--images reads a COCO Karpathy caption file: use it with --task caption"
    );
    let coco = crate::data::coco::CocoKarpathy::open(json, images)?;
    Ok(Dataset::Caption(coco.caption_rows("test", limit)?))
}

#[derive(Debug, Clone, clap::Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub data: DataArgs,
    #[arg(long, value_enum, default_value = "mue")]
    pub policy: PolicyKind,
    /// Threshold of joint / entropy / margin.
    #[arg(long, allow_negative_numbers = true)]
    pub threshold: Option<f32>,
    #[arg(long, default_value_t = 2)]
    pub patience: usize,
    /// Depth of the static policy.
    #[arg(long, default_value_t = 4)]
    pub depth: usize,
    #[command(flatten)]
    pub exits: ExitArgs,
    #[command(flatten)]
    pub load: super::load::LoadArgs,
    /// Write the JSON report here (it is always printed).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write each example's prediction, exits and multiply-adds here (JSON lines).
    #[arg(long)]
    pub predictions: Option<PathBuf>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct SweepArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Policy families to sweep, comma separated (mue,joint,entropy,patience,margin,static,full).
    #[arg(long, value_delimiter = ',')]
    pub policies: Vec<String>,
    /// JSON file with the grid: an array of points such as {"policy":"entropy","threshold":0.5}.
    #[arg(long)]
    pub grid: Option<PathBuf>,
    /// Keys/values of skipped decoder layers: propagate or copy.
    #[arg(long, default_value = "propagate")]
    pub kv_fill: String,
    /// Output folder for sweep_<task>.{csv,json,svg,png}.
    #[arg(long, default_value = "results/sweep")]
    pub out_dir: PathBuf,
}

#[derive(Debug, Clone, clap::Args)]
pub struct CalibrateArgs {
    /// The calibration split and model.
    #[command(flatten)]
    pub data: DataArgs,
    /// Keep at least this fraction of full-depth quality at the lowest cost (default 0.99).
    #[arg(long, conflicts_with = "budget")]
    pub target: Option<f64>,
    /// Best quality executing at most this fraction of full-depth multiply-adds.
    #[arg(long)]
    pub budget: Option<f64>,
    /// With --target: a Learn-then-Test guarantee. Only thresholds whose rate of harmed
    /// outputs (entailment: correct at full depth, wrong with exits; captioning: caption
    /// changed) is, with probability >= 1 - DELTA, within what the target allows (exact
    /// binomial test, Bonferroni over the grid) are eligible.
    #[arg(long)]
    pub delta: Option<f64>,
    /// With --target: the lower end of each point's 90% paired-bootstrap interval of
    /// relative quality, not its estimate, must reach the target, so a point chosen at the
    /// edge of this split still holds on new data (about 95% one-sided).
    #[arg(long, conflicts_with_all = ["budget", "delta"])]
    pub lower_bound: bool,
    /// Calibrate from this sweep JSON (of the same split) instead of running a sweep.
    #[arg(long)]
    pub sweep: Option<PathBuf>,
    /// JSON grid file (default: the MuE and joint points of the default grid).
    #[arg(long)]
    pub grid: Option<PathBuf>,
    #[arg(long, default_value = "propagate")]
    pub kv_fill: String,
    /// exits.json to update (default: the model directory's).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also save the sweep run for calibration here (a folder).
    #[arg(long)]
    pub sweep_out: Option<PathBuf>,
}

/// The policy `mue eval` runs (None for the oracle): the family's point from the flags,
/// validated where every point is.
pub fn build_policy(args: &EvalArgs, base: TaskThresholds) -> Result<Option<Box<dyn ExitPolicy>>> {
    let PolicyKind::Family(name) = args.policy else {
        return Ok(None);
    };
    let mue = args.exits.policy(base.get(args.data.task))?;
    let flags = Flags {
        threshold: args.threshold,
        patience: args.patience,
        depth: args.depth,
        image: mue.image,
        text: mue.text,
        decoder: mue.decoder,
    };
    let point = (spec::family(name)?.from_flags)(&flags)?;
    Ok(Some(point.build()?))
}

/// `mue eval` on a loaded engine; returns the JSON report.
pub fn eval_with(
    engine: &Engine,
    args: &EvalArgs,
    base: TaskThresholds,
) -> Result<serde_json::Value> {
    let data = args.data.load()?;
    let opts = args.data.options(&args.exits.kv_fill)?;
    let value = match build_policy(args, base)? {
        Some(p) => {
            let (report, outputs, full) =
                ev::evaluate_with_outputs(engine, &data, p.as_ref(), &opts)?;
            if let Some(path) = &args.predictions {
                let mut lines = String::new();
                for e in &outputs.examples {
                    lines.push_str(&serde_json::to_string(e)?);
                    lines.push('\n');
                }
                std::fs::write(path, lines)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            let mut value = serde_json::to_value(report)?;
            // The benchmark's tiers and hypothesis types, when its metadata is beside the split.
            if let Some(meta) = breakdown::meta_path(&args.data.data) {
                let meta = breakdown::load_meta(&meta)?;
                value["breakdown"] =
                    serde_json::to_value(breakdown::breakdown(&data, &outputs, &full, &meta))?;
            }
            value
        }
        None => {
            if args.predictions.is_some() {
                bail!("--predictions is not available for the oracle (it reports depths)");
            }
            serde_json::to_value(ev::oracle(engine, &data, &opts)?)?
        }
    };
    if let Some(out) = &args.out {
        crate::eval::write_json(out, &value)?;
    }
    Ok(value)
}

pub fn eval_main(args: EvalArgs) -> Result<()> {
    let model = super::model_dir(args.data.model.as_deref())?;
    let engine = Engine::load_with(&model, &args.load.options())?;
    let base = TaskThresholds::for_model(&model)?;
    let v = eval_with(&engine, &args, base)?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

/// The grid of a sweep: the file if given, else the default grid, restricted to `families`.
pub fn sweep_grid(
    engine: &Engine,
    grid: Option<&Path>,
    families: &[String],
) -> Result<Vec<PolicySpec>> {
    sweep::select_grid(grid, engine.model.cfg.decoder_layers, families)
}

/// `mue sweep` on a loaded engine; returns the result and the files written.
pub fn sweep_with(engine: &Engine, args: &SweepArgs) -> Result<(SweepResult, Vec<PathBuf>)> {
    let data = args.data.load()?;
    let opts = args.data.options(&args.kv_fill)?;
    let grid = sweep_grid(engine, args.grid.as_deref(), &args.policies)?;
    let result = sweep::sweep(engine, &data, &grid, &opts)?;
    let files = sweep::write_outputs(&result, &args.out_dir)?;
    Ok((result, files))
}

pub fn sweep_main(args: SweepArgs) -> Result<()> {
    let engine = Engine::load(&super::model_dir(args.data.model.as_deref())?)?;
    let (result, files) = sweep_with(&engine, &args)?;
    println!(
        "{} points on {} examples; full-depth {} = {:.4}",
        result.points.len(),
        result.examples,
        result.metric,
        result.full_quality.primary
    );
    println!("Pareto frontier (quality vs MAC reduction):");
    for &i in &result.frontier {
        let p = &result.points[i];
        println!(
            "  {:<9} {:<36} {} {:.4}  MACs -{:.1}%  layers -{:.1}%  wall -{:.1}%",
            p.family,
            p.params,
            result.metric,
            p.quality,
            100.0 * p.mac_reduction,
            100.0 * p.layer_reduction,
            100.0 * p.wall_reduction
        );
    }
    for f in files {
        println!("wrote {}", f.display());
    }
    Ok(())
}

/// The objective of `mue calibrate` (default: target 0.99).
pub fn objective(args: &CalibrateArgs) -> Result<Objective> {
    let o = match (args.target, args.budget, args.delta) {
        (Some(_), Some(_), _) => bail!("give either --target or --budget"),
        (_, Some(_), Some(_)) => bail!("--delta goes with --target, not --budget"),
        (_, Some(b), None) => Objective::Budget(b),
        (t, None, Some(delta)) => Objective::Guarantee {
            target: t.unwrap_or(0.99),
            delta,
        },
        (t, None, None) if args.lower_bound => Objective::LowerBound(t.unwrap_or(0.99)),
        (t, None, None) => Objective::Target(t.unwrap_or(0.99)),
    };
    o.validate()?;
    Ok(o)
}

/// `mue calibrate` on a loaded engine: writes the exits file, returns the calibration.
pub fn calibrate_with(engine: &Engine, args: &CalibrateArgs) -> Result<Calibration> {
    let objective = objective(args)?;
    let cal = match &args.sweep {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {}", p.display()))?;
            let r: SweepResult = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a sweep result", p.display()))?;
            if r.task != args.data.task {
                bail!("{} is a sweep of the other task", p.display());
            }
            calibrate::calibrate(&r, objective)?
        }
        None => {
            let data = args.data.load()?;
            let opts = args.data.options(&args.kv_fill)?;
            let fams: Vec<String> = spec::FAMILIES
                .iter()
                .filter(|f| f.calibrated)
                .map(|f| f.name.to_string())
                .collect();
            let grid = sweep_grid(engine, args.grid.as_deref(), &fams)?;
            let sweep_out = args.sweep_out.as_deref();
            calibrate::calibrate_on(engine, &data, &grid, objective, &opts, sweep_out)?.0
        }
    };
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| engine.dir.join("exits.json"));
    calibrate::write_exits(&out, &cal)?;
    Ok(cal)
}

pub fn calibrate_main(args: CalibrateArgs) -> Result<()> {
    let engine = Engine::load(&super::model_dir(args.data.model.as_deref())?)?;
    let cal = calibrate_with(&engine, &args)?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| engine.dir.join("exits.json"));
    println!(
        "{:?}: {} {} = {:.4} (full depth {:.4}), MACs -{:.1}%, layers -{:.1}%",
        cal.objective,
        cal.point.family,
        cal.point.params,
        cal.point.quality,
        cal.full_quality,
        100.0 * cal.point.mac_reduction,
        100.0 * cal.point.layer_reduction
    );
    // A point that just clears the target on this split may miss it on another: say by
    // how much such a figure moves.
    if let Some(iv) = cal.point.report.relative_quality_interval {
        println!(
            "  keeps {:.1}% of full depth here; {} over {} examples",
            100.0 * cal.point.relative_quality,
            ev::interval_phrase(iv),
            cal.examples
        );
    }
    if let (Objective::Guarantee { target, delta }, Some(harmed)) =
        (cal.objective, cal.point.harmed)
    {
        println!(
            "  {harmed} of {} outputs harmed ({}); allowed rate {:.4} holds with \
             probability >= {:.2} (p-value {:.3e})",
            cal.examples,
            match cal.task {
                Task::Entail => "correct at full depth, wrong here",
                Task::Caption => "caption differs from full depth",
            },
            calibrate::guarantee_alpha(cal.task, cal.full_quality, target),
            1.0 - delta,
            cal.p_value.unwrap_or(f64::NAN)
        );
    }
    println!("wrote {}", out.display());
    Ok(())
}
