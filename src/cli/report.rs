//! `mue report`: regenerate the results page (calibration on valid, sweep of every policy
//! family on test, ablations, markdown).

use super::Task;
use crate::eval::report::{self, ReportConfig, ReportData, VariantSpec};
use crate::generate::{KvFill, SearchConfig};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, clap::Args)]
pub struct ReportArgs {
    /// Model directory [default: $MUE_MODEL, ./models/default, or models/default beside
    /// the executable].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Benchmark folder: snli_ve_{valid,test}.tsv and caption_{valid,test}.tsv.
    #[arg(long, required_unless_present = "render_only")]
    pub data: Option<PathBuf>,
    /// A model trained with `--loss final-only`, for the row "MuE w/o layer-wise loss".
    #[arg(long)]
    pub ablation_model: Option<PathBuf>,
    /// Another trained model shown as a row of its own, `LABEL=DIR` (repeatable): MuE
    /// calibrated on it by the same rule and grid, evaluated on test.
    #[arg(long = "variant", value_name = "LABEL=DIR")]
    pub variants: Vec<String>,
    /// Folder for the JSON, CSV and plots.
    #[arg(long, default_value = "results")]
    pub results: PathBuf,
    /// The markdown page.
    #[arg(long, default_value = "docs/results.md")]
    pub out: PathBuf,
    /// Tasks, comma separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values = ["entail", "caption"])]
    pub tasks: Vec<Task>,
    /// Use at most this many examples of each entailment split (and captioning split
    /// unless --caption-limit).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Use at most this many examples of each captioning split.
    #[arg(long)]
    pub caption_limit: Option<usize>,
    /// Fraction of full-depth accuracy the calibrated MuE thresholds keep on valid.
    #[arg(long, default_value_t = 0.99)]
    pub entail_target: f64,
    /// Fraction of full-depth CIDEr-D the calibrated MuE thresholds keep on valid.
    #[arg(long, default_value_t = 0.96)]
    pub caption_target: f64,
    /// Tasks (comma separated) calibrated so that the lower end of the 90% bootstrap
    /// interval of relative quality on valid, not its estimate, reaches the target (as
    /// `mue calibrate --lower-bound`).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub lower_bound: Vec<Task>,
    /// Entailment calibration grid (its MuE points), or `default` for the built-in grid
    /// [default: scripts/grid_entail_mue.json if present, else the built-in grid].
    #[arg(long)]
    pub entail_grid: Option<PathBuf>,
    /// Captioning calibration grid, or `default`
    /// [default: scripts/grid_caption_mue.json if present, else the built-in grid].
    #[arg(long)]
    pub caption_grid: Option<PathBuf>,
    /// Grid of the test-split sweep, or `default`
    /// [default: scripts/grid_baselines.json if present, else the built-in grid].
    #[arg(long)]
    pub sweep_grid: Option<PathBuf>,
    /// Requests per engine call.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Beam size for captioning.
    #[arg(long, default_value_t = 5)]
    pub beam: usize,
    #[arg(long, default_value_t = 16)]
    pub max_len: usize,
    /// Keys/values of skipped decoder layers: propagate or copy.
    #[arg(long, default_value = "propagate")]
    pub kv_fill: String,
    /// Only re-render the page from <results>/report.json (no model is run).
    #[arg(long)]
    pub render_only: bool,
    /// Hide progress.
    #[arg(long)]
    pub quiet: bool,
}

/// A grid flag: `default` means the built-in grid; absent, the repository's script grid
/// when it exists (so `mue report` matches scripts/results.sh), else the built-in grid.
fn resolve_grid(flag: Option<&Path>, script: &str) -> Option<PathBuf> {
    match flag {
        Some(p) if p == Path::new("default") => None,
        Some(p) => Some(p.to_path_buf()),
        None => Some(Path::new("scripts").join(script)).filter(|p| p.is_file()),
    }
}

impl ReportArgs {
    pub fn config(&self) -> Result<ReportConfig> {
        let data = self
            .data
            .clone()
            .context("--data is required: a benchmark folder (`mue data generate --out DIR`)")?;
        Ok(ReportConfig {
            model: super::model_dir(self.model.as_deref())?,
            data,
            ablation_model: self.ablation_model.clone(),
            variants: self
                .variants
                .iter()
                .map(|v| VariantSpec::parse(v))
                .collect::<Result<_>>()?,
            results: self.results.clone(),
            out: self.out.clone(),
            tasks: self.tasks.clone(),
            limit: self.limit,
            caption_limit: self.caption_limit,
            entail_target: self.entail_target,
            caption_target: self.caption_target,
            lower_bound: self.lower_bound.clone(),
            entail_grid: resolve_grid(self.entail_grid.as_deref(), "grid_entail_mue.json"),
            caption_grid: resolve_grid(self.caption_grid.as_deref(), "grid_caption_mue.json"),
            sweep_grid: resolve_grid(self.sweep_grid.as_deref(), "grid_baselines.json"),
            batch: self.batch,
            search: SearchConfig {
                beam: self.beam,
                max_len: self.max_len,
                kv_fill: self.kv_fill.parse::<KvFill>()?,
                ..SearchConfig::default()
            },
        })
    }
}

/// Run (or with --render-only reload) the report and write the page; returns the data
/// and the page's path.
pub fn report_with(args: &ReportArgs) -> Result<(ReportData, PathBuf)> {
    let data = if args.render_only {
        let mut d = report::load(&args.results)?;
        report::relink(&mut d, &args.out);
        d
    } else {
        report::run(&args.config()?, !args.quiet)?
    };
    let page = report::write_page(&data)?;
    Ok((data, page))
}

pub fn main(args: ReportArgs) -> Result<()> {
    let (data, page) = report_with(&args)?;
    for t in &data.tasks {
        let dom = report::dominance(&t.sweep);
        let total: usize = dom.iter().map(|d| d.points).sum();
        let beaten: usize = dom.iter().map(|d| d.dominated).sum();
        let p = &t.calibration.point;
        println!(
            "{}: MuE {} (calibrated on valid: {:.1}% of full depth, MACs {:+.1}%); \
             {beaten} of {total} baseline points matched or beaten by a MuE point on test",
            t.task.name(),
            p.params,
            100.0 * p.relative_quality,
            -100.0 * p.mac_reduction
        );
    }
    println!("wrote {}", page.display());
    Ok(())
}
