//! Threshold sweeps: every policy over a grid of its parameters on one split, with the
//! Pareto frontier of quality against multiply-add reduction, written as CSV and JSON.

use super::eval::{
    self, primary_metric, report, run, Dataset, EvalOptions, EvalReport, Quality, RunOutputs,
};
use super::plot::{Chart, Series};
use crate::exit::spec::{self, FAMILIES};
use crate::exit::FullDepth;
use crate::pipeline::Engine;
use crate::task::Task;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

pub use crate::exit::spec::{default_grid, PolicySpec};

/// Read a grid file (a JSON array of policy points).
pub fn read_grid(path: &Path) -> Result<Vec<PolicySpec>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a grid file", path.display()))
}

/// The grid file if given, else the default grid for `decoder_layers`, restricted to
/// `families` (all when empty).
pub fn select_grid(
    grid: Option<&Path>,
    decoder_layers: usize,
    families: &[String],
) -> Result<Vec<PolicySpec>> {
    for f in families {
        spec::family(f)?;
    }
    let g = match grid {
        Some(p) => read_grid(p)?,
        None => default_grid(decoder_layers),
    };
    let g: Vec<PolicySpec> = g
        .into_iter()
        .filter(|s| families.is_empty() || families.iter().any(|f| f == s.family()))
        .collect();
    if g.is_empty() {
        bail!("the sweep grid is empty");
    }
    Ok(g)
}

/// One evaluated grid point.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepPoint {
    pub spec: PolicySpec,
    pub family: String,
    pub params: String,
    /// Primary quality metric (accuracy or CIDEr-D).
    pub quality: f64,
    #[serde(deserialize_with = "super::f64_or_nan")]
    pub relative_quality: f64,
    pub layer_reduction: f64,
    pub mac_reduction: f64,
    pub wall_reduction: f64,
    /// On the Pareto frontier of all points (quality vs MAC reduction).
    pub on_frontier: bool,
    /// On the Pareto frontier of its own family.
    pub on_family_frontier: bool,
    /// Examples this point may have made worse than full depth ([`eval::harmed`]); what a
    /// `--delta` calibration bounds. Absent in sweeps written before it was recorded.
    #[serde(default)]
    pub harmed: Option<usize>,
    pub report: EvalReport,
}

/// A whole sweep on one split.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepResult {
    pub task: Task,
    pub examples: usize,
    pub metric: String,
    pub full_quality: Quality,
    pub points: Vec<SweepPoint>,
    /// Indices of `points` on the global frontier, by increasing MAC reduction.
    pub frontier: Vec<usize>,
}

/// Indices of the Pareto-optimal points of `(quality, reduction)` pairs, both maximised:
/// no other point is at least as good in both and strictly better in one. Exact duplicates
/// are all kept. Sorted by increasing reduction (then decreasing quality).
pub fn pareto_frontier(points: &[(f64, f64)]) -> Vec<usize> {
    let dominated = |i: usize| {
        let (qi, ri) = points[i];
        points
            .iter()
            .any(|&(q, r)| q >= qi && r >= ri && (q > qi || r > ri))
    };
    let mut idx: Vec<usize> = (0..points.len())
        .filter(|&i| !points[i].0.is_nan() && !points[i].1.is_nan() && !dominated(i))
        .collect();
    idx.sort_by(|&a, &b| {
        points[a]
            .1
            .total_cmp(&points[b].1)
            .then(points[b].0.total_cmp(&points[a].0))
    });
    idx
}

/// Evaluate every spec of `grid` on `data` (one full-depth reference run first).
pub fn sweep(
    engine: &Engine,
    data: &Dataset,
    grid: &[PolicySpec],
    opts: &EvalOptions,
) -> Result<SweepResult> {
    Ok(sweep_keeping(engine, data, grid, opts, None)?.0)
}

/// Per-example outputs of one swept point and of the full-depth reference.
pub struct Kept {
    pub run: RunOutputs,
    pub full: RunOutputs,
}

/// [`sweep`], also returning the outputs of `keep` when it is one of the grid's points, so a
/// caller that needs them (the per-group breakdown) does not run that point twice.
pub fn sweep_keeping(
    engine: &Engine,
    data: &Dataset,
    grid: &[PolicySpec],
    opts: &EvalOptions,
    keep: Option<PolicySpec>,
) -> Result<(SweepResult, Option<Kept>)> {
    if grid.is_empty() {
        bail!("empty sweep grid");
    }
    let policies = grid
        .iter()
        .map(|s| s.build().with_context(|| format!("bad grid point {s:?}")))
        .collect::<Result<Vec<_>>>()?;
    let full = run(engine, data, &FullDepth, opts)?;
    let (full_quality, full_scores) = eval::quality_and_scores(data, &full)?;
    let pb = eval::progress_bar(grid.len(), opts.progress, "sweep");
    let inner = EvalOptions {
        progress: false,
        ..opts.clone()
    };
    let mut points = Vec::with_capacity(grid.len());
    let mut kept = None;
    for (spec, policy) in grid.iter().zip(&policies) {
        pb.set_message(format!("{} {}", spec.family(), spec.params()));
        let r = run(engine, data, policy.as_ref(), &inner)?;
        let rep = report(data, &r, &full, full_quality, &full_scores)?;
        let harmed = eval::harmed(data, &r, &full)?;
        points.push(SweepPoint {
            spec: *spec,
            family: spec.family().into(),
            params: spec.params(),
            quality: rep.quality.primary,
            relative_quality: rep.relative_quality,
            layer_reduction: rep.reduction.layers,
            mac_reduction: rep.reduction.macs,
            wall_reduction: rep.reduction.wall,
            on_frontier: false,
            on_family_frontier: false,
            harmed: Some(harmed),
            report: rep,
        });
        pb.inc(1);
        if keep == Some(*spec) {
            kept = Some(r);
        }
    }
    pb.finish_and_clear();
    let kept = kept.map(|run| Kept { run, full });
    Ok((finish(data.task(), data.len(), full_quality, points), kept))
}

/// Mark the frontiers of evaluated points.
pub fn finish(
    task: Task,
    examples: usize,
    full_quality: Quality,
    mut points: Vec<SweepPoint>,
) -> SweepResult {
    let pairs: Vec<(f64, f64)> = points
        .iter()
        .map(|p| (p.quality, p.mac_reduction))
        .collect();
    let frontier = pareto_frontier(&pairs);
    for &i in &frontier {
        points[i].on_frontier = true;
    }
    for fam in FAMILIES {
        let members: Vec<usize> = (0..points.len())
            .filter(|&i| points[i].family == fam.name)
            .collect();
        let sub: Vec<(f64, f64)> = members.iter().map(|&i| pairs[i]).collect();
        for j in pareto_frontier(&sub) {
            points[members[j]].on_family_frontier = true;
        }
    }
    SweepResult {
        task,
        examples,
        metric: primary_metric(task).into(),
        full_quality,
        points,
        frontier,
    }
}

/// CSV of the sweep, one row per point.
pub fn to_csv(result: &SweepResult) -> String {
    let mut s = String::from(
        "task,family,params,quality,relative_quality,layer_reduction,mac_reduction,\
         wall_reduction,mean_image_layer,mean_text_layer,mean_token_layer,on_frontier,\
         on_family_frontier\n",
    );
    let task = result.task.name();
    for p in &result.points {
        let e = &p.report.exits;
        let _ = writeln!(
            s,
            "{task},{},\"{}\",{},{},{},{},{},{},{},{},{},{}",
            p.family,
            p.params,
            p.quality,
            p.relative_quality,
            p.layer_reduction,
            p.mac_reduction,
            p.wall_reduction,
            e.mean_image_layer,
            e.mean_text_layer,
            e.mean_token_layer,
            p.on_frontier,
            p.on_family_frontier
        );
    }
    s
}

/// File stem of a task's outputs: `sweep_caption` / `sweep_entail`.
pub fn stem(task: Task) -> &'static str {
    match task {
        Task::Caption => "sweep_caption",
        Task::Entail => "sweep_entail",
    }
}

/// Write `<stem>.csv`, `<stem>.json` and the plots into `dir`; returns the files written.
pub fn write_outputs(result: &SweepResult, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let base = dir.join(stem(result.task));
    let csv = base.with_extension("csv");
    std::fs::write(&csv, to_csv(result)).with_context(|| format!("writing {}", csv.display()))?;
    let json = base.with_extension("json");
    std::fs::write(&json, serde_json::to_string_pretty(result)? + "\n")
        .with_context(|| format!("writing {}", json.display()))?;
    let mut files = vec![csv, json];
    files.extend(super::plot::plot_sweep(&chart(result), &base)?);
    Ok(files)
}

/// The plot of a sweep: every registered family present, its points and its own frontier.
pub fn chart(result: &SweepResult) -> Chart {
    let task = match result.task {
        Task::Caption => "captioning",
        Task::Entail => "visual entailment",
    };
    let xy = |p: &SweepPoint| (p.mac_reduction * 100.0, p.quality);
    let series = FAMILIES
        .iter()
        .filter_map(|family| {
            let pts: Vec<&SweepPoint> = result
                .points
                .iter()
                .filter(|p| p.family == family.name)
                .collect();
            (!pts.is_empty()).then(|| Series {
                family: family.family,
                points: pts.iter().map(|p| xy(p)).collect(),
                frontier: pts
                    .iter()
                    .filter(|p| p.on_family_frontier)
                    .map(|p| xy(p))
                    .collect(),
            })
        })
        .collect();
    Chart {
        title: format!(
            "{task}: {} vs MAC reduction ({} examples)",
            result.metric, result.examples
        ),
        metric: result.metric.clone(),
        series,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::{DecoderThreshold, JointSpec, MuePolicy, StaticSpec};

    #[test]
    fn frontier_keeps_exactly_the_undominated_points() {
        let pts = [
            (0.90, 0.00), // 0: full depth, best quality
            (0.85, 0.30), // 1
            (0.80, 0.30), // 2: dominated by 1
            (0.70, 0.60), // 3
            (0.60, 0.50), // 4: dominated by 3
            (0.90, 0.00), // 5: duplicate of 0, kept
            (0.20, 0.90), // 6
            (f64::NAN, 0.95),
        ];
        assert_eq!(pareto_frontier(&pts), vec![0, 5, 1, 3, 6]);
        assert!(pareto_frontier(&[]).is_empty());
        assert_eq!(pareto_frontier(&[(0.5, 0.5)]), vec![0]);
        // Same reduction, lower quality: dominated.
        assert_eq!(pareto_frontier(&[(0.5, 0.5), (0.4, 0.5)]), vec![0]);
    }

    #[test]
    fn frontier_brute_force_agrees() {
        // Pseudo-random points on a coarse grid (many ties).
        let mut x = 12345u64;
        let mut next = || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) % 7) as f64 / 6.0
        };
        for _ in 0..50 {
            let pts: Vec<(f64, f64)> = (0..12).map(|_| (next(), next())).collect();
            let f = pareto_frontier(&pts);
            for i in 0..pts.len() {
                let dominated = pts.iter().any(|&(q, r)| {
                    q >= pts[i].0 && r >= pts[i].1 && (q > pts[i].0 || r > pts[i].1)
                });
                assert_eq!(f.contains(&i), !dominated, "point {i} of {pts:?}");
            }
            for w in f.windows(2) {
                assert!(pts[w[0]].1 <= pts[w[1]].1);
                assert!(pts[w[0]].0 >= pts[w[1]].0);
            }
        }
    }

    #[test]
    fn specs_build_and_round_trip() {
        for s in default_grid(6) {
            let p = s.build().unwrap();
            let json = serde_json::to_string(&s).unwrap();
            let back: PolicySpec = serde_json::from_str(&json).unwrap();
            assert_eq!(back, s);
            if s.family() != "full" {
                assert!(
                    p.name().starts_with(s.family()),
                    "{} vs {}",
                    p.name(),
                    s.family()
                );
            }
        }
        assert!(default_grid(6)
            .iter()
            .any(|s| s.decoder_schedule() == Some(true)));
        // Grid files: a number is a constant decoder threshold, an object the schedule.
        let g: Vec<PolicySpec> = serde_json::from_str(
            r#"[{"policy": "mue", "image": 0.99, "text": 0.9, "decoder": 0.7},
                {"policy": "mue", "image": 0.99, "text": 0.9, "decoder":
                 {"kind": "calm", "tau": 0.7, "strict_fraction": 0.3333, "decay": 0.9}}]"#,
        )
        .unwrap();
        assert_eq!(g[0].decoder_schedule(), Some(false));
        assert_eq!(g[1].decoder_schedule(), Some(true));
        assert_eq!(g[0].params(), "image=0.99 text=0.9 decoder=0.7");
        assert_eq!(
            g[1].params(),
            "image=0.99 text=0.9 decoder=0.7 strict=0.333 decay=0.9"
        );
        // A constant is written back as a number, as before.
        assert!(serde_json::to_string(&g[0])
            .unwrap()
            .contains(r#""decoder":0.7"#));
        assert!(g[1].build().unwrap().name() == "mue");
        let bad = r#"{"policy": "mue", "image": 0.99, "text": 0.9, "decoder":
                     {"kind": "calm", "tau": 0.7, "strict_fraction": -1, "decay": 0.9}}"#;
        let bad: PolicySpec = serde_json::from_str(bad).unwrap();
        assert!(bad.build().is_err());
        assert!(PolicySpec::Static(StaticSpec { depth: 0 }).build().is_err());
        assert_eq!(
            PolicySpec::Joint(JointSpec {
                encoder: 0.9,
                decoder: DecoderThreshold::Constant { tau: 0.95 }
            })
            .as_mue(),
            Some(MuePolicy::new(0.9, 0.9, 0.95).unwrap())
        );
    }
}
