//! What each row of the report's tables shows: the point every compared family's rule picks
//! on valid, MuE's calibrated and frontier points, and which baseline points MuE's points
//! match or beat.

use super::{Ablation, TaskResults};
use crate::eval::calibrate::{self, Objective};
use crate::eval::eval::{self, Quality};
use crate::eval::sweep::{PolicySpec, SweepPoint, SweepResult};
use crate::exit::spec::{self, Entry, Role};
use crate::exit::{FullDepth, StaticSpec};

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
pub(super) fn calibrated_point(sweep: &SweepResult, calibrated: &PolicySpec) -> Option<usize> {
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
            is_mue(&p[i])
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

/// Whether the point is one of MuE's own (the registry's proposed method).
pub(super) fn is_mue(p: &SweepPoint) -> bool {
    spec::family(&p.family).is_ok_and(|f| f.role == Role::Proposed)
}

/// Whether some MuE point has at least the quality and at least the MAC reduction of `p`.
pub fn dominated_by_mue(sweep: &SweepResult, p: &SweepPoint) -> bool {
    sweep
        .points
        .iter()
        .any(|m| is_mue(m) && m.quality >= p.quality && m.mac_reduction >= p.mac_reduction)
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

/// [`Dominance`] of every family compared with MuE ([`spec::compared`]) present in the
/// sweep.
pub fn dominance(sweep: &SweepResult) -> Vec<Dominance> {
    spec::compared()
        .into_iter()
        .filter_map(|fam| {
            let members: Vec<usize> = (0..sweep.points.len())
                .filter(|&i| sweep.points[i].family == fam.name)
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
                family: fam.name.to_string(),
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
    /// The `--variant` model at this index.
    Variant(usize),
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

/// A fraction as a whole percentage when it is one (`99%`), else in full (`99.5%`).
pub(super) fn pct0(x: f64) -> String {
    let v = 100.0 * x;
    if (v - v.round()).abs() < 1e-9 {
        format!("{v:.0}%")
    } else {
        format!("{v}%")
    }
}

pub(super) fn rule_text(rule: PickRule, objective: Objective) -> String {
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
    let picked = |fam: &'static Entry, out: &mut Vec<Row>| match pick(fam.name) {
        Some((spec, params, rule)) => {
            if let PolicySpec::Static(StaticSpec { depth }) = spec {
                if depths.contains(&depth) {
                    return;
                }
            }
            let setting = format!("{params}; {rule}");
            match s.points.iter().position(|p| p.spec == spec) {
                Some(i) => out.push(point_row(
                    RowKey::Picked(fam.name),
                    fam.title.into(),
                    setting,
                    i,
                )),
                None => out.push(Row {
                    key: RowKey::Picked(fam.name),
                    method: fam.title.into(),
                    setting,
                    metrics: Err("picked point not in the test sweep".into()),
                }),
            }
        }
        // The fixed depths above stand for the smaller model.
        None if fam.role == Role::SmallerModel => {}
        None => out.push(missing(
            RowKey::Picked(fam.name),
            fam.title.into(),
            "not in the sweep grid",
        )),
    };
    // The paper's order: baselines before MuE, its ablations after.
    let compared = spec::compared();
    for &fam in compared.iter().filter(|f| f.role < Role::Proposed) {
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
    for &fam in compared.iter().filter(|f| f.role > Role::Proposed) {
        picked(fam, &mut out);
    }
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
            metrics: Ok(other_model(report, s)),
        },
    });
    for (i, v) in t.variants.iter().enumerate() {
        out.push(Row {
            key: RowKey::Variant(i),
            method: v.label.clone(),
            setting: format!("{}; calibrated on valid", v.calibration.point.params),
            metrics: Ok(other_model(&v.report, s)),
        });
    }
    out
}

/// Another model's test evaluation, relative to the main model's full depth.
fn other_model(report: &eval::EvalReport, s: &SweepResult) -> Metrics {
    Metrics {
        quality: report.quality,
        relative: eval::ratio(report.quality.primary, s.full_quality.primary),
        macs: report.reduction.macs,
        wall: report.reduction.wall,
        layers: report.reduction.layers,
    }
}
