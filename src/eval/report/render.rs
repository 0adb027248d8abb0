//! The results page: markdown from [`ReportData`], pure. The prose is in `template.md`; the
//! tables, lists and commands are built here.

use super::machine::overload;
use super::select::{calibrated_point, is_mue, pct0};
use super::{
    dominance, rows, Ablation, Layout, Metrics, ReportConfig, ReportData, Row, RowKey, TaskResults,
};
use crate::eval::breakdown::GroupReport;
use crate::eval::calibrate::Objective;
use crate::eval::eval::{self, percent as pct};
use crate::eval::sweep::SweepPoint;
use crate::exit::spec::{self, Role};
use crate::exit::{DecoderThreshold, MuePolicy};
use crate::run_meta::LossKind;
use crate::task::Task;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The page's prose, in sections (`@@ name`) with `{key}` placeholders.
const TEMPLATE: &str = include_str!("template.md");

/// " (90% bootstrap interval a to b)", or nothing for a report without one.
fn interval_text(iv: Option<[f64; 2]>) -> String {
    iv.map(|iv| format!(" ({})", eval::interval_phrase(iv)))
        .unwrap_or_default()
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
pub(super) fn sh(p: &Path) -> String {
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
    if !s.points.iter().any(is_mue) {
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

/// The template's section `name` with its `{key}` placeholders filled from `vars`, in
/// one pass (a value is never scanned again); an unknown key stays as written.
fn section(name: &str, vars: &[(&str, &str)]) -> String {
    let start = format!("@@ {name}\n");
    let text = TEMPLATE
        .split_once(start.as_str())
        .map_or("", |(_, rest)| rest);
    let text = match text.find("\n@@ ") {
        Some(end) => &text[..end + 1],
        None => text,
    };
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let value = after
            .find('}')
            .and_then(|close| vars.iter().find(|(k, _)| *k == &after[..close]));
        match value {
            Some((key, value)) => {
                out.push_str(value);
                rest = &after[key.len() + 1..];
            }
            None => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// A section used inside a sentence: without its last newline.
fn fragment(name: &str, vars: &[(&str, &str)]) -> String {
    let mut s = section(name, vars);
    if s.ends_with('\n') {
        s.pop();
    }
    s
}

/// The markdown page.
pub fn render(data: &ReportData) -> String {
    let c = &data.config;
    let m = &data.machine;
    let mut s = section(
        "page_header",
        &[
            ("started", &m.started_utc),
            ("nproc", &m.nproc.to_string()),
            (
                "cpu",
                &m.cpu.as_ref().map(|c| format!(", {c}")).unwrap_or_default(),
            ),
            ("load_start", m.load_start.as_deref().unwrap_or("unknown")),
            ("load_end", m.load_end.as_deref().unwrap_or("unknown")),
            ("minutes", &format!("{:.1}", m.elapsed_s / 60.0)),
            ("model", &c.model.display().to_string()),
            ("loss", loss_text(data.model_loss)),
            ("data", &c.data.display().to_string()),
        ],
    );
    if let Some(load) = overload(m) {
        s += &section(
            "overload",
            &[
                ("load", &format!("{load:.2}")),
                ("nproc", &m.nproc.to_string()),
            ],
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
    *s += &section("summary_intro", &[]);
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
    for fam in spec::with_role(Role::Baseline) {
        keys.push((
            RowKey::Picked(fam.name),
            format!("{} (picked on valid)", fam.title),
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
    for fam in spec::with_role(Role::Ablation) {
        keys.push((RowKey::Picked(fam.name), fam.title.into()));
    }
    keys.push((RowKey::NoLayerWise, "MuE w/o layer-wise loss".into()));
    for row in tables.iter().flat_map(|(_, r)| r.iter()) {
        if matches!(row.key, RowKey::Variant(_)) && !keys.iter().any(|(k, _)| *k == row.key) {
            keys.push((row.key, row.method.clone()));
        }
    }
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
    *s += &section("summary_paper", &[]);
}

/// A reduction as the paper writes time: `-33.3%` for a third less.
pub(super) fn neg(x: f64) -> String {
    pct(-x)
}

fn reading(s: &mut String, data: &ReportData) {
    let c = &data.config;
    let targets: Vec<String> = data
        .tasks
        .iter()
        .map(|t| {
            let bound = if matches!(c.objective(t.task), Objective::LowerBound(_)) {
                fragment("target_lower_bound", &[])
            } else {
                String::new()
            };
            format!("{} for {}{bound}", pct0(t.target), metric_name(t.task))
        })
        .collect();
    *s += &section(
        "reading",
        &[
            ("beam", &c.search.beam.to_string()),
            ("max_len", &c.search.max_len.to_string()),
            ("batch", &c.batch.to_string()),
            ("targets", &targets.join(", ")),
        ],
    );
    if data.tasks.iter().all(|t| t.valid_sweep.is_some()) {
        let dir = Layout::new(&c.results).valid_sweep_dir();
        *s += &section(
            "reading_baselines_valid",
            &[("valid_dir", &dir.display().to_string())],
        );
    } else {
        *s += &section("reading_baselines_test", &[]);
    }
    let ablation = match &c.ablation_model {
        Some(d) => fragment(
            "ablation_run",
            &[
                ("model", &d.display().to_string()),
                ("loss", loss_text(data.ablation_loss)),
            ],
        ),
        None => fragment("ablation_not_run", &[]),
    };
    *s += &section("reading_rest", &[("ablation", &ablation)]);
    if !c.variants.is_empty() {
        let list: Vec<String> = c
            .variants
            .iter()
            .map(|v| {
                let loss = data
                    .tasks
                    .iter()
                    .flat_map(|t| &t.variants)
                    .find(|r| r.label == v.label)
                    .and_then(|r| r.loss);
                format!("{} (`{}`, {})", v.label, v.model.display(), loss_text(loss))
            })
            .collect();
        *s += &section("reading_variants", &[("variants", &list.join("; "))]);
    }
    if data.ablation_loss == Some(LossKind::LayerWise) {
        *s += &section("ablation_warning", &[]);
    }
    s.push('\n');
}

fn task_section(s: &mut String, data: &ReportData, t: &TaskResults, rows: &[Row]) {
    let sw = &t.sweep;
    let cal = &t.calibration.point;
    *s += &section(
        "task_intro",
        &[
            ("title", task_title(t.task)),
            ("examples", &sw.examples.to_string()),
            (
                "test",
                &data.config.split_file(t.task, "test").display().to_string(),
            ),
            ("metric", metric_name(t.task)),
            ("full", &quality_text(t.task, sw.full_quality.primary)),
            ("valid_examples", &t.valid_examples.to_string()),
            (
                "valid",
                &data
                    .config
                    .split_file(t.task, "valid")
                    .display()
                    .to_string(),
            ),
            ("points", &t.calibration_points.to_string()),
            ("params", &cal.params),
            ("relative", &pct(cal.relative_quality)),
            (
                "interval",
                &interval_text(cal.report.relative_quality_interval),
            ),
            ("macs", &neg(cal.mac_reduction)),
        ],
    );
    if let Some(v) = &t.valid_sweep {
        *s += &section(
            "task_baselines",
            &[
                ("points", &v.points.len().to_string()),
                ("examples", &v.examples.to_string()),
            ],
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
        *s += &section("task_forms", &[("forms", &forms.join("; "))]);
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
    if let Some(p) = calibrated_point(sw, &cal.spec).map(|i| &sw.points[i]) {
        if p.report.relative_quality_interval.is_some() {
            *s += &section(
                "task_on_test",
                &[
                    ("test_relative", &pct(p.relative_quality)),
                    (
                        "test_interval",
                        &interval_text(p.report.relative_quality_interval),
                    ),
                    ("valid_relative", &pct(cal.relative_quality)),
                    (
                        "valid_interval",
                        &interval_text(cal.report.relative_quality_interval),
                    ),
                ],
            );
        }
    }
    if let Ablation::Run { report, .. } = &t.ablation {
        *s += &section(
            "task_ablation",
            &[
                ("metric", metric_name(t.task)),
                ("full", &quality_text(t.task, report.full_quality.primary)),
                ("relative", &pct(report.relative_quality)),
            ],
        );
    }
    if !t.variants.is_empty() {
        let own: Vec<String> = t
            .variants
            .iter()
            .map(|v| {
                format!(
                    "- {}: {}; its row keeps {} of it{}.",
                    v.label,
                    quality_text(t.task, v.report.full_quality.primary),
                    pct(v.report.relative_quality),
                    interval_text(v.report.relative_quality_interval)
                )
            })
            .collect();
        *s += &section(
            "task_variants",
            &[("metric", metric_name(t.task)), ("own", &own.join("\n"))],
        );
    }
    s.push('\n');
    if let Some(groups) = &t.breakdown {
        breakdown_table(s, t, groups);
    }
    match &t.plot {
        Some(link) => {
            *s += &section(
                "task_plot",
                &[
                    ("title", task_title(t.task)),
                    ("metric", metric_name(t.task)),
                    ("link", link),
                ],
            )
        }
        None => *s += &section("task_no_plot", &[]),
    }
    *s += &section("task_illustration", &[]);
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

/// The calibrated point on test per difficulty tier and question type.
fn breakdown_table(s: &mut String, t: &TaskResults, groups: &[GroupReport]) {
    *s += &section("task_breakdown", &[("params", &t.calibration.point.params)]);
    let mut header = vec!["group", "examples"];
    if t.task == Task::Entail {
        header.extend(["full-depth accuracy", "MuE accuracy"]);
    }
    header.extend([
        "MAC red.",
        "image layer",
        "text layer",
        "decoder layer per token",
    ]);
    let body: Vec<Vec<String>> = groups
        .iter()
        .map(|g| {
            let mut r = vec![g.group.clone(), g.examples.to_string()];
            if t.task == Task::Entail {
                r.extend([num_pct(g.full_accuracy), num_pct(g.accuracy)]);
            }
            r.extend([
                pct(g.macs_reduction),
                format!("{:.2}", g.exits.mean_image_layer),
                format!("{:.2}", g.exits.mean_text_layer),
                format!("{:.2}", g.exits.mean_token_layer),
            ]);
            r
        })
        .collect();
    table(s, &header, &body);
    s.push('\n');
}

fn num_pct(x: Option<f64>) -> String {
    x.map(pct).unwrap_or_default()
}

fn commands(s: &mut String, data: &ReportData) {
    let c = &data.config;
    let layout = Layout::new(&c.results);
    *s += &section(
        "reproduce_intro",
        &[
            ("results", &c.results.display().to_string()),
            ("out", &c.out.display().to_string()),
            ("command", &report_command(c)),
            ("results_sh", &sh(&c.results)),
            ("out_sh", &sh(&c.out)),
            ("data", &layout.data().display().to_string()),
            ("grids", &layout.root.join("report").display().to_string()),
        ],
    );
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
        // Another model: its calibration on valid, then the chosen point once on test.
        let other = |s: &mut String,
                     model: &Path,
                     cal_out: (PathBuf, PathBuf),
                     p: MuePolicy,
                     out: PathBuf| {
            let _ = writeln!(s, "{}", cal(model, cal_out.0, cal_out.1));
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
                common(model, "test"),
                p.image,
                p.text,
                sh(&out)
            );
        };
        if let (Some(abl), Ablation::Run { calibration, .. }) = (&c.ablation_model, &t.ablation) {
            let dirs = (layout.ablation_exits(), layout.ablation_calibrate_dir(task));
            other(s, abl, dirs, calibration.policy, layout.ablation_eval(task));
        }
        for (v, r) in c.variants.iter().zip(&t.variants) {
            let dirs = (
                layout.variant_exits(v),
                layout.variant_calibrate_dir(v, task),
            );
            let out = layout.variant_eval(v, task);
            other(s, &v.model, dirs, r.calibration.policy, out);
        }
    }
    *s += &section("reproduce_end", &[]);
}

/// The `mue report` command line that reproduces `c`.
pub fn report_command(c: &ReportConfig) -> String {
    let mut v = format!("mue report --model {} --data {}", sh(&c.model), sh(&c.data));
    if let Some(a) = &c.ablation_model {
        let _ = write!(v, " --ablation-model {}", sh(a));
    }
    for var in &c.variants {
        let arg = format!("{}={}", var.label, var.model.display());
        let _ = write!(v, " --variant {}", sh(Path::new(&arg)));
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
