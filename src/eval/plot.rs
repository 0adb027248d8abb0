//! Plots of a sweep: quality against MAC reduction, one line per policy family (its Pareto
//! frontier) over all its points, one chart per task. SVG always; PNG when a font for the
//! bitmap text is found at run time (DejaVu Sans), otherwise SVG only without text and a
//! warning.

use super::sweep::{SweepResult, FAMILIES};
use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Font files tried, in order.
pub const FONT_PATHS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

const FONT: &str = "sans-serif";

/// Register a font with plotters once; false when none could be read.
pub fn ensure_font() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        for p in FONT_PATHS {
            if let Ok(bytes) = std::fs::read(p) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font(FONT, FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

const COLORS: [RGBColor; 7] = [
    RGBColor(214, 39, 40),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(127, 127, 127),
    RGBColor(0, 0, 0),
];

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    result: &SweepResult,
    text: bool,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("plot: {e:?}");
    root.fill(&WHITE).map_err(err)?;
    let q_max = result
        .points
        .iter()
        .map(|p| p.quality)
        .filter(|q| q.is_finite())
        .fold(0.0f64, f64::max);
    let y_max = if q_max > 0.0 { q_max * 1.05 } else { 1.0 };
    let x_min = result
        .points
        .iter()
        .map(|p| p.mac_reduction * 100.0)
        .filter(|x| x.is_finite())
        .fold(0.0f64, f64::min);
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if text {
        let task = match result.task {
            crate::task::Task::Caption => "captioning",
            crate::task::Task::Entail => "visual entailment",
        };
        builder
            .caption(
                format!(
                    "{task}: {} vs MAC reduction ({} examples)",
                    result.metric, result.examples
                ),
                (FONT, 20),
            )
            .x_label_area_size(40)
            .y_label_area_size(60);
    }
    let mut chart = builder
        .build_cartesian_2d(x_min.min(0.0)..100.0, 0.0..y_max)
        .map_err(err)?;
    if text {
        chart
            .configure_mesh()
            .x_desc("MAC reduction (%)")
            .y_desc(result.metric.as_str())
            .label_style((FONT, 14))
            .draw()
            .map_err(err)?;
    } else {
        chart
            .configure_mesh()
            .disable_x_mesh()
            .disable_y_mesh()
            .x_labels(0)
            .y_labels(0)
            .draw()
            .map_err(err)?;
    }
    for (fam, color) in FAMILIES.iter().zip(COLORS) {
        let pts: Vec<&super::sweep::SweepPoint> =
            result.points.iter().filter(|p| p.family == *fam).collect();
        if pts.is_empty() {
            continue;
        }
        let mut line: Vec<(f64, f64)> = pts
            .iter()
            .filter(|p| p.on_family_frontier)
            .map(|p| (p.mac_reduction * 100.0, p.quality))
            .collect();
        line.sort_by(|a, b| a.0.total_cmp(&b.0));
        let series = chart
            .draw_series(LineSeries::new(line, color.stroke_width(2)))
            .map_err(err)?;
        if text {
            series
                .label(*fam)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart
            .draw_series(
                pts.iter()
                    .map(|p| Circle::new((p.mac_reduction * 100.0, p.quality), 3, color.filled())),
            )
            .map_err(err)?;
    }
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font((FONT, 14))
            .position(SeriesLabelPosition::LowerLeft)
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

/// Write `<base>.svg` (and `<base>.png` when a font is available); returns the files.
pub fn plot_sweep(result: &SweepResult, base: &Path) -> Result<Vec<PathBuf>> {
    let size = (800, 560);
    let text = ensure_font();
    let svg = base.with_extension("svg");
    draw(
        SVGBackend::new(&svg, size).into_drawing_area(),
        result,
        text,
    )?;
    let mut files = vec![svg];
    if text {
        let png = base.with_extension("png");
        draw(
            BitMapBackend::new(&png, size).into_drawing_area(),
            result,
            true,
        )?;
        files.push(png);
    } else {
        eprintln!(
            "warning: no font found (tried {}); wrote the SVG plot without text and no PNG",
            FONT_PATHS.join(", ")
        );
    }
    Ok(files)
}
