//! Threshold calibration: from a sweep on a calibration split, pick the MuE thresholds of
//! lowest cost keeping at least a target fraction of full-depth quality, or of best quality
//! within a cost budget, and store them in a model directory's `exits.json`.

use super::eval::{Dataset, EvalOptions};
use super::sweep::{self, PolicySpec, SweepPoint, SweepResult};
use crate::exit::MuePolicy;
use crate::pipeline::Engine;
use crate::task::{Task, TaskThresholds};
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
    /// Lowest cost whose 90% paired-bootstrap interval of relative quality lies at or above
    /// the target: the lower end, not the estimate, must reach it, so that a point chosen
    /// at the edge on the calibration split still holds on new data (about 95% one-sided).
    #[serde(rename = "lower_bound")]
    LowerBound(f64),
    /// Learn-then-Test: lowest cost among thresholds for which, with probability at least
    /// `1 - delta` over the calibration split, the rate of harmed outputs
    /// ([`crate::eval::eval::harmed`]) is at most `alpha` (see [`guarantee_alpha`]). For
    /// entailment that bounds the accuracy kept at `target` of full depth.
    Guarantee { target: f64, delta: f64 },
}

impl Objective {
    pub fn validate(&self) -> Result<()> {
        match *self {
            Objective::Target(t) | Objective::LowerBound(t) if !(0.0..=1.0).contains(&t) => {
                bail!("--target must lie in [0, 1], got {t}")
            }
            Objective::Budget(b) if !(0.0..=1.0).contains(&b) => {
                bail!("--budget must lie in [0, 1], got {b}")
            }
            Objective::Guarantee { target, .. } if !(0.0..=1.0).contains(&target) => {
                bail!("--target must lie in [0, 1], got {target}")
            }
            Objective::Guarantee { delta, .. } if !(delta > 0.0 && delta < 1.0) => {
                bail!("--delta must lie in (0, 1), got {delta}")
            }
            _ => Ok(()),
        }
    }
}

/// Whether a point meets the quality target (exact comparison, no tolerance).
pub fn meets_target(p: &SweepPoint, full_quality: f64, target: f64) -> bool {
    p.quality >= target * full_quality
}

/// Largest rate of harmed outputs a `--delta` calibration allows: for entailment
/// `(1 - target) * full-depth accuracy` of answers lost (gains only help); for captioning,
/// whose per-image CIDEr-D has no useful bound at these sample sizes, the stricter
/// `1 - target` of captions differing from the full-depth caption at all.
pub fn guarantee_alpha(task: Task, full_quality: f64, target: f64) -> f64 {
    match task {
        Task::Entail => (1.0 - target) * full_quality,
        Task::Caption => 1.0 - target,
    }
}

/// Exact binomial p-value of the null "the harm rate exceeds `alpha`" after `k` harmed
/// in `n` examples: `P(Binomial(n, alpha) <= k)`, summed in log space.
pub fn binomial_p_value(k: usize, n: usize, alpha: f64) -> f64 {
    // With no change allowed nothing can be certified: the null is never rejected.
    if k >= n || alpha >= 1.0 || alpha <= 0.0 {
        return 1.0;
    }
    let (la, lb) = (alpha.ln(), (1.0 - alpha).ln());
    // log C(n, i) alpha^i (1 - alpha)^(n - i), built up term by term.
    let mut log_term = n as f64 * lb;
    let mut log_sum = log_term;
    for i in 0..k {
        log_term += ((n - i) as f64).ln() - ((i + 1) as f64).ln() + la - lb;
        let (hi, lo) = if log_sum > log_term {
            (log_sum, log_term)
        } else {
            (log_term, log_sum)
        };
        log_sum = hi + (lo - hi).exp().ln_1p();
    }
    log_sum.exp().min(1.0)
}

/// Bonferroni level of a `--delta` calibration: `delta` over the number of MuE-threshold
/// points tested, and that number.
fn bonferroni_level(result: &SweepResult, delta: f64) -> (f64, usize) {
    let m = result
        .points
        .iter()
        .filter(|p| p.spec.as_mue().is_some())
        .count()
        .max(1);
    (delta / m as f64, m)
}

/// Learn-then-Test p-value of a point (None when the sweep did not record harm).
pub fn point_p_value(result: &SweepResult, p: &SweepPoint, target: f64) -> Option<f64> {
    let alpha = guarantee_alpha(result.task, result.full_quality.primary, target);
    p.harmed
        .map(|k| binomial_p_value(k, result.examples, alpha))
}

/// Index of the chosen point among those with MuE thresholds (`mue` and `joint` families),
/// or `None` when none satisfies the objective.
pub fn pick(result: &SweepResult, objective: Objective) -> Option<usize> {
    pick_among(result, objective, |p| p.spec.as_mue().is_some())
}

/// [`pick`] among the points `keep` accepts: the rule every method's point is chosen by
/// (a baseline family's points on the validation split, as MuE's thresholds).
pub fn pick_among(
    result: &SweepResult,
    objective: Objective,
    keep: impl Fn(&SweepPoint) -> bool,
) -> Option<usize> {
    let full = result.full_quality.primary;
    let cand = (0..result.points.len()).filter(|&i| keep(&result.points[i]));
    let p = |i: usize| &result.points[i];
    let cheapest = |eligible: &dyn Fn(usize) -> bool| {
        cand.clone().filter(|&i| eligible(i)).max_by(|&a, &b| {
            p(a).mac_reduction
                .total_cmp(&p(b).mac_reduction)
                .then(p(a).quality.total_cmp(&p(b).quality))
                // Among equals prefer the earlier grid point.
                .then(b.cmp(&a))
        })
    };
    match objective {
        Objective::Target(t) => cheapest(&|i| meets_target(p(i), full, t)),
        Objective::LowerBound(t) => cheapest(&|i| {
            p(i).report
                .relative_quality_interval
                .is_some_and(|[lo, _]| lo >= t)
        }),
        Objective::Guarantee { target, delta } => {
            // Bonferroni over every candidate: valid whatever the order of testing.
            let (level, _) = bonferroni_level(result, delta);
            cheapest(&|i| point_p_value(result, p(i), target).is_some_and(|pv| pv <= level))
        }
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
    /// Examples of the calibration split.
    #[serde(default)]
    pub examples: usize,
    /// Learn-then-Test p-value of the chosen point (with `--delta`).
    #[serde(default)]
    pub p_value: Option<f64>,
}

pub fn calibrate(result: &SweepResult, objective: Objective) -> Result<Calibration> {
    objective.validate()?;
    if matches!(objective, Objective::Guarantee { .. })
        && result
            .points
            .iter()
            .any(|p| p.spec.as_mue().is_some() && p.harmed.is_none())
    {
        bail!(
            "this sweep does not record how many outputs each point harmed (an older mue \
             wrote it); rerun the sweep to calibrate with --delta"
        );
    }
    let Some(i) = pick(result, objective) else {
        if let Objective::Guarantee { target, delta } = objective {
            let alpha = guarantee_alpha(result.task, result.full_quality.primary, target);
            let (level, m) = bonferroni_level(result, delta);
            let best = binomial_p_value(0, result.examples, alpha);
            bail!(
                "no MuE grid point can be certified at target {target} with delta {delta}: \
                 {} examples allow a harmed-output rate of {alpha:.4}, and even a point that \
                 harms nothing has p-value {best:.3e} against the Bonferroni level \
                 {level:.3e} ({m} points); use a larger calibration split, a lower target, \
                 a larger --delta or a smaller grid",
                result.examples,
            );
        }
        bail!(
            "no MuE grid point satisfies {objective:?} on the calibration split; \
             add thresholds of 1.0 (never exit) to the grid or relax the objective"
        );
    };
    let point = result.points[i].clone();
    let p_value = match objective {
        Objective::Guarantee { target, .. } => point_p_value(result, &point, target),
        _ => None,
    };
    Ok(Calibration {
        task: result.task,
        objective,
        policy: point.spec.as_mue().expect("picked among MuE points"),
        point,
        full_quality: result.full_quality.primary,
        examples: result.examples,
        p_value,
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
    // Written to a temporary name and renamed: a crash never leaves half a thresholds file.
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&t)? + "\n")
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::eval::{EvalReport, ExitStats, Quality, Reduction};
    use crate::eval::sweep::{finish, PolicySpec};
    use crate::exit::{DecoderThreshold, FullDepth, JointSpec, MueSpec, StaticSpec};

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
            harmed: None,
            report: EvalReport {
                task: Task::Entail,
                policy: spec.family().into(),
                examples: 10,
                metric: "accuracy".into(),
                quality: q(quality),
                full_quality: q(0.8),
                relative_quality: quality / 0.8,
                relative_quality_interval: None,
                exits,
                reduction,
                wall_ms: 1.0,
                wall_ms_full: 1.0,
                cpu_ms: None,
                cpu_ms_full: None,
            },
        }
    }

    fn mue(i: f32) -> PolicySpec {
        PolicySpec::Mue(MueSpec {
            image: i,
            text: i,
            decoder: crate::exit::DecoderThreshold::Constant { tau: i },
        })
    }

    fn sweep() -> SweepResult {
        finish(
            Task::Entail,
            10,
            q(0.8),
            vec![
                point(PolicySpec::Full(FullDepth), 0.8, 0.0),
                point(mue(1.0), 0.8, 0.0),
                point(mue(0.99), 0.795, 0.2),
                point(mue(0.95), 0.79, 0.4),
                point(mue(0.9), 0.6, 0.7),
                // Not MuE: never picked even though it is cheaper and as good.
                point(PolicySpec::Static(StaticSpec { depth: 2 }), 0.8, 0.9),
                point(
                    PolicySpec::Joint(JointSpec {
                        encoder: 0.97,
                        decoder: DecoderThreshold::Constant { tau: 0.97 },
                    }),
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
    fn binomial_p_values_match_closed_forms() {
        // P(Bin(10, 0.1) <= 0) = 0.9^10; P(Bin(4, 0.5) <= 1) = 5/16.
        assert!((binomial_p_value(0, 10, 0.1) - 0.9f64.powi(10)).abs() < 1e-12);
        assert!((binomial_p_value(1, 4, 0.5) - 5.0 / 16.0).abs() < 1e-12);
        assert!((binomial_p_value(2, 5, 0.3) - 0.83692).abs() < 1e-5);
        assert_eq!(binomial_p_value(5, 5, 0.3), 1.0);
        assert_eq!(binomial_p_value(0, 5, 0.0), 1.0);
        assert_eq!(binomial_p_value(1, 5, 0.0), 1.0);
        // Large n does not underflow to a wrong answer: 0 changes in 100k at 1%.
        assert_eq!(binomial_p_value(0, 100_000, 0.01), 0.0);
        let mid = binomial_p_value(1000, 100_000, 0.01);
        assert!(mid > 0.4 && mid < 0.6, "{mid}");
        // Monotone in k.
        let ps: Vec<f64> = (0..20).map(|k| binomial_p_value(k, 200, 0.05)).collect();
        assert!(ps.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn guarantee_is_never_less_conservative_than_the_plain_target() {
        // 1000 questions, full depth 0.8 correct; harmed never fewer than lost answers.
        let mut s = sweep();
        s.examples = 1000;
        // Points 2 and 3 lose 5 and 10 correct answers net, so harm at least that many.
        let changes = [0, 0, 5, 12, 250, 0, 120];
        for (p, c) in s.points.iter_mut().zip(changes) {
            p.harmed = Some(c);
        }
        let g = |t, d| {
            pick(
                &s,
                Objective::Guarantee {
                    target: t,
                    delta: d,
                },
            )
        };
        // Bonferroni level 0.1 / 5 candidates = 0.02.
        // target 0.99: alpha = 8 per 1000; P(Bin <= 5) = 0.19, so only the unchanged point.
        assert_eq!(g(0.99, 0.1), Some(1));
        assert_eq!(pick(&s, Objective::Target(0.99)), Some(2));
        // target 0.98: alpha = 16; 5 changes pass (p 0.0013), 12 do not (p 0.19).
        assert_eq!(g(0.98, 0.1), Some(2));
        // target 0.97: alpha = 24; 12 changes pass (p 0.005).
        assert_eq!(g(0.97, 0.1), Some(3));
        // A tiny delta leaves only the never-changing point.
        assert_eq!(g(0.97, 1e-9), Some(1));
        for t in [0.9, 0.95, 0.97, 0.98, 0.99, 1.0] {
            for d in [0.01, 0.05, 0.2] {
                if let Some(i) = g(t, d) {
                    let plain = pick(&s, Objective::Target(t)).unwrap();
                    assert!(
                        s.points[i].mac_reduction <= s.points[plain].mac_reduction,
                        "target {t} delta {d}: {i} vs {plain}"
                    );
                    let pv = point_p_value(&s, &s.points[i], t).unwrap();
                    assert!(pv <= d / 5.0, "p {pv} above delta / m");
                }
            }
        }
        // Sweeps without recorded harm are refused, not silently treated as harmless.
        let old = sweep();
        let err = calibrate(
            &old,
            Objective::Guarantee {
                target: 0.99,
                delta: 0.1,
            },
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("rerun the sweep"), "{err}");
        assert!(calibrate(
            &s,
            Objective::Guarantee {
                target: 0.99,
                delta: 0.0
            }
        )
        .is_err());
        assert!(calibrate(
            &s,
            Objective::Guarantee {
                target: 0.99,
                delta: 1.0
            }
        )
        .is_err());
        let cal = calibrate(
            &s,
            Objective::Guarantee {
                target: 0.99,
                delta: 0.1,
            },
        )
        .unwrap();
        assert!(cal.p_value.unwrap() <= 0.02);
        assert_eq!(cal.examples, 1000);
    }

    #[test]
    fn lower_bound_needs_the_whole_interval_above_target() {
        let mut s = sweep();
        // Relative quality 1.0, 0.994, 0.988, 0.75 with intervals of +-0.01 around them; the
        // never-exit point's interval is a single point; the joint point has none.
        let ivs = [
            None,
            Some([1.0, 1.0]),
            Some([0.984, 1.004]),
            Some([0.978, 0.998]),
            Some([0.74, 0.76]),
            None,
            None,
        ];
        for (p, iv) in s.points.iter_mut().zip(ivs) {
            p.report.relative_quality_interval = iv;
        }
        let lb = |t| pick(&s, Objective::LowerBound(t));
        // Point 2 keeps 99.4% but its interval reaches down to 98.4%.
        assert_eq!(pick(&s, Objective::Target(0.99)), Some(2));
        assert_eq!(lb(0.99), Some(1));
        assert_eq!(lb(0.98), Some(2));
        assert_eq!(lb(0.97), Some(3));
        // The joint point has no interval: never eligible, however good its estimate.
        assert_eq!(pick(&s, Objective::Target(0.85)), Some(6));
        assert_eq!(lb(0.85), Some(3));
        assert_eq!(lb(0.7), Some(4));
        for t in [0.5, 0.9, 0.95, 0.97, 0.98, 0.99, 1.0] {
            let i = lb(t).unwrap();
            let [lo, _] = s.points[i].report.relative_quality_interval.unwrap();
            assert!(lo >= t, "target {t}: lower end {lo}");
            // Never cheaper than the plain target: the interval holds the estimate.
            let plain = pick(&s, Objective::Target(t)).unwrap();
            assert!(s.points[i].mac_reduction <= s.points[plain].mac_reduction);
        }
        let mut none = s.clone();
        none.points
            .iter_mut()
            .for_each(|p| p.report.relative_quality_interval = None);
        assert!(calibrate(&none, Objective::LowerBound(0.9)).is_err());
        assert!(calibrate(&s, Objective::LowerBound(1.2)).is_err());
        let back: Objective =
            serde_json::from_str(&serde_json::to_string(&Objective::LowerBound(0.96)).unwrap())
                .unwrap();
        assert_eq!(back, Objective::LowerBound(0.96));
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

    #[test]
    fn a_scheduled_point_is_calibrated_and_stored() {
        use crate::exit::DecoderThreshold;
        let calm = DecoderThreshold::paper(0.7);
        let sched = PolicySpec::Mue(MueSpec {
            image: 0.99,
            text: 0.9,
            decoder: calm,
        });
        let mut s = sweep();
        s.task = Task::Caption;
        s.points.push(point(sched, 0.799, 0.3));
        let s = finish(s.task, s.examples, s.full_quality, s.points);
        let cal = calibrate(&s, Objective::Target(0.99)).unwrap();
        assert_eq!(cal.point.spec, sched);
        assert_eq!(cal.policy.decoder, calm);
        assert!(cal.point.params.contains("strict=0.333 decay=0.9"));
        // Restricted to constant decoder thresholds, the rule picks the best constant.
        let c = pick_among(&s, Objective::Target(0.99), |p| {
            p.spec.decoder_schedule() == Some(false)
        });
        assert_eq!(c, Some(2));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exits.json");
        write_exits(&path, &cal).unwrap();
        let back = TaskThresholds::for_model(dir.path()).unwrap();
        assert_eq!(back.caption.decoder, calm);
        assert!(!dir.path().join("exits.json.tmp").exists());
    }
}
