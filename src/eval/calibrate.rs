//! Threshold calibration: from a sweep on a calibration split, pick the MuE thresholds of
//! lowest cost keeping at least a target fraction of full-depth quality, or of best quality
//! within a cost budget, and store them in a model directory's `exits.json`.

use super::eval::{Dataset, EvalOptions};
use super::sweep::{self, PolicySpec, SweepPoint, SweepResult};
use crate::cli::{Task, TaskThresholds};
use crate::exit::MuePolicy;
use crate::pipeline::Engine;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// What calibration optimises. Cost is the fraction of full-depth multiply-adds executed
/// (`1 - mac_reduction`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// Lowest cost with quality >= target * full-depth quality.
    Target(f64),
    /// Best quality with cost <= budget.
    Budget(f64),
}

impl Objective {
    pub fn validate(&self) -> Result<()> {
        match *self {
            Objective::Target(t) if !(0.0..=1.0).contains(&t) => {
                bail!("--target must lie in [0, 1], got {t}")
            }
            Objective::Budget(b) if !(0.0..=1.0).contains(&b) => {
                bail!("--budget must lie in [0, 1], got {b}")
            }
            _ => Ok(()),
        }
    }
}

/// Whether a point meets the quality target (exact comparison, no tolerance).
pub fn meets_target(p: &SweepPoint, full_quality: f64, target: f64) -> bool {
    p.quality >= target * full_quality
}

/// Index of the chosen point among those with MuE thresholds (`mue` and `joint` families),
/// or `None` when none satisfies the objective.
pub fn pick(result: &SweepResult, objective: Objective) -> Option<usize> {
    let full = result.full_quality.primary;
    let cand = (0..result.points.len()).filter(|&i| result.points[i].spec.as_mue().is_some());
    let p = |i: usize| &result.points[i];
    match objective {
        Objective::Target(t) => cand
            .filter(|&i| meets_target(p(i), full, t))
            .max_by(|&a, &b| {
                p(a).mac_reduction
                    .total_cmp(&p(b).mac_reduction)
                    .then(p(a).quality.total_cmp(&p(b).quality))
                    // Among equals prefer the earlier grid point.
                    .then(b.cmp(&a))
            }),
        Objective::Budget(budget) => {
            cand.filter(|&i| 1.0 - p(i).mac_reduction <= budget)
                .max_by(|&a, &b| {
                    p(a).quality
                        .total_cmp(&p(b).quality)
                        .then(p(a).mac_reduction.total_cmp(&p(b).mac_reduction))
                        .then(b.cmp(&a))
                })
        }
    }
}

/// Result of a calibration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Calibration {
    pub task: Task,
    pub objective: Objective,
    pub policy: MuePolicy,
    pub point: SweepPoint,
    pub full_quality: f64,
}

pub fn calibrate(result: &SweepResult, objective: Objective) -> Result<Calibration> {
    objective.validate()?;
    let Some(i) = pick(result, objective) else {
        bail!(
            "no MuE grid point satisfies {objective:?} on the calibration split; \
             add thresholds of 1.0 (never exit) to the grid or relax the objective"
        );
    };
    let point = result.points[i].clone();
    Ok(Calibration {
        task: result.task,
        objective,
        policy: point.spec.as_mue().expect("picked among MuE points"),
        point,
        full_quality: result.full_quality.primary,
    })
}

/// Sweep `grid` on `data` (saving the sweep into `sweep_out` when given, even if no point
/// satisfies the objective) and calibrate on it.
pub fn calibrate_on(
    engine: &Engine,
    data: &Dataset,
    grid: &[PolicySpec],
    objective: Objective,
    opts: &EvalOptions,
    sweep_out: Option<&Path>,
) -> Result<(Calibration, SweepResult)> {
    objective.validate()?;
    let result = sweep::sweep(engine, data, grid, opts)?;
    if let Some(dir) = sweep_out {
        sweep::write_outputs(&result, dir)?;
    }
    Ok((calibrate(&result, objective)?, result))
}

/// Store the calibrated thresholds for the task in `path` (an `exits.json`), keeping the
/// other task's thresholds from the existing file (or the defaults when there is none).
pub fn write_exits(path: &Path, cal: &Calibration) -> Result<TaskThresholds> {
    let mut t = if path.is_file() {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid thresholds file", path.display()))?
    } else {
        TaskThresholds::default()
    };
    match cal.task {
        Task::Caption => t.caption = cal.policy,
        Task::Entail => t.entail = cal.policy,
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_string_pretty(&t)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::eval::{EvalReport, ExitStats, Quality, Reduction};
    use crate::eval::sweep::{finish, PolicySpec};

    fn q(v: f64) -> Quality {
        Quality {
            primary: v,
            accuracy: Some(v),
            bleu4: None,
            cider: None,
            rouge_l: None,
        }
    }

    fn point(spec: PolicySpec, quality: f64, red: f64) -> SweepPoint {
        let exits = ExitStats {
            mean_image_layer: 6.0,
            mean_text_layer: 6.0,
            mean_token_layer: 6.0,
            mean_tokens: 1.0,
            encoder_layers: 6,
            decoder_layers: 6,
        };
        let reduction = Reduction {
            layers: red,
            macs: red,
            wall: red,
        };
        SweepPoint {
            spec,
            family: spec.family().into(),
            params: spec.params(),
            quality,
            relative_quality: quality / 0.8,
            layer_reduction: red,
            mac_reduction: red,
            wall_reduction: red,
            on_frontier: false,
            on_family_frontier: false,
            report: EvalReport {
                task: Task::Entail,
                policy: spec.family().into(),
                examples: 10,
                metric: "accuracy".into(),
                quality: q(quality),
                full_quality: q(0.8),
                relative_quality: quality / 0.8,
                exits,
                reduction,
                wall_ms: 1.0,
                wall_ms_full: 1.0,
            },
        }
    }

    fn mue(i: f32) -> PolicySpec {
        PolicySpec::Mue {
            image: i,
            text: i,
            decoder: i,
        }
    }

    fn sweep() -> SweepResult {
        finish(
            Task::Entail,
            10,
            q(0.8),
            vec![
                point(PolicySpec::Full, 0.8, 0.0),
                point(mue(1.0), 0.8, 0.0),
                point(mue(0.99), 0.795, 0.2),
                point(mue(0.95), 0.79, 0.4),
                point(mue(0.9), 0.6, 0.7),
                // Not MuE: never picked even though it is cheaper and as good.
                point(PolicySpec::Static { depth: 2 }, 0.8, 0.9),
                point(
                    PolicySpec::Joint {
                        encoder: 0.97,
                        decoder: 0.97,
                    },
                    0.7,
                    0.5,
                ),
            ],
        )
    }

    #[test]
    fn target_picks_cheapest_point_above_target() {
        let s = sweep();
        assert_eq!(pick(&s, Objective::Target(0.99)), Some(2));
        assert_eq!(pick(&s, Objective::Target(0.98)), Some(3));
        assert_eq!(pick(&s, Objective::Target(1.0)), Some(1));
        assert_eq!(pick(&s, Objective::Target(0.85)), Some(6));
        assert_eq!(pick(&s, Objective::Target(0.0)), Some(4));
        for t in [0.0, 0.5, 0.75, 0.87, 0.9, 0.95, 0.99, 0.995, 1.0] {
            let i = pick(&s, Objective::Target(t)).unwrap();
            assert!(s.points[i].quality >= t * 0.8);
            // Nothing cheaper among MuE points meets the target.
            for p in &s.points {
                if p.spec.as_mue().is_some() && p.quality >= t * 0.8 {
                    assert!(p.mac_reduction <= s.points[i].mac_reduction);
                }
            }
        }
        let mut none = sweep();
        none.points.retain(|p| p.quality < 0.8);
        assert_eq!(pick(&none, Objective::Target(1.0)), None);
        assert!(calibrate(&none, Objective::Target(1.0)).is_err());
        assert!(calibrate(&s, Objective::Target(1.5)).is_err());
    }

    #[test]
    fn budget_picks_best_quality_within_budget() {
        let s = sweep();
        assert_eq!(pick(&s, Objective::Budget(1.0)), Some(1));
        assert_eq!(pick(&s, Objective::Budget(0.8)), Some(2));
        assert_eq!(pick(&s, Objective::Budget(0.6)), Some(3));
        assert_eq!(pick(&s, Objective::Budget(0.5)), Some(6));
        assert_eq!(pick(&s, Objective::Budget(0.35)), Some(4));
        assert_eq!(pick(&s, Objective::Budget(0.1)), None);
    }

    #[test]
    fn exits_file_keeps_the_other_task() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exits.json");
        let cal = calibrate(&sweep(), Objective::Target(0.99)).unwrap();
        assert_eq!(cal.policy, MuePolicy::new(0.99, 0.99, 0.99).unwrap());
        let t = write_exits(&path, &cal).unwrap();
        assert_eq!(t.entail, cal.policy);
        assert_eq!(t.caption, TaskThresholds::default().caption);
        let mut other = cal.clone();
        other.task = Task::Caption;
        other.policy = MuePolicy::new(0.5, 0.6, 0.7).unwrap();
        write_exits(&path, &other).unwrap();
        let back = TaskThresholds::for_model(dir.path()).unwrap();
        assert_eq!(back.entail, cal.policy);
        assert_eq!(back.caption, other.policy);
    }
}
