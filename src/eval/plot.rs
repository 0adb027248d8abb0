//! Plots of a sweep: quality against MAC reduction, one line per policy family (its Pareto
//! frontier) over all its points, one chart per task. SVG always; PNG when a font for the
//! bitmap text is found at run time (DejaVu Sans), otherwise SVG only without text and a
//! warning.

use crate::exit::family::{Family, Marker};
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

/// What a chart shows: one series per policy family.
#[derive(Debug, Clone)]
pub struct Chart {
    pub title: String,
    /// The quality axis.
    pub metric: String,
    pub series: Vec<Series>,
}

/// One family's points as (MAC reduction in %, quality), drawn in its registered style.
#[derive(Debug, Clone)]
pub struct Series {
    pub family: &'static Family,
    pub points: Vec<(f64, f64)>,
    /// The family's own Pareto frontier, joined by a line.
    pub frontier: Vec<(f64, f64)>,
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    chart_data: &Chart,
    text: bool,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("plot: {e:?}");
    root.fill(&WHITE).map_err(err)?;
    let all = || chart_data.series.iter().flat_map(|s| s.points.iter());
    let q_max = all()
        .map(|p| p.1)
        .filter(|q| q.is_finite())
        .fold(0.0f64, f64::max);
    let y_max = if q_max > 0.0 { q_max * 1.05 } else { 1.0 };
    let x_min = all()
        .map(|p| p.0)
        .filter(|x| x.is_finite())
        .fold(0.0f64, f64::min);
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if text {
        builder
            .caption(chart_data.title.as_str(), (FONT, 20))
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
            .y_desc(chart_data.metric.as_str())
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
    for series in &chart_data.series {
        let style = series.family.style;
        let (r, g, b) = style.color;
        let color = RGBColor(r, g, b);
        let mut line = series.frontier.clone();
        line.sort_by(|a, b| a.0.total_cmp(&b.0));
        let drawn = chart
            .draw_series(LineSeries::new(line, color.stroke_width(2)))
            .map_err(err)?;
        if text {
            drawn
                .label(series.family.name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        let pts = series.points.iter().copied();
        match style.marker {
            Marker::Circle => chart
                .draw_series(pts.map(|p| Circle::new(p, 3, color.filled())))
                .map(|_| ()),
            Marker::Square => chart
                .draw_series(pts.map(|p| {
                    EmptyElement::at(p) + Rectangle::new([(-3, -3), (3, 3)], color.filled())
                }))
                .map(|_| ()),
            Marker::Triangle => chart
                .draw_series(pts.map(|p| TriangleMarker::new(p, 4, color.filled())))
                .map(|_| ()),
        }
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
pub fn plot_sweep(chart: &Chart, base: &Path) -> Result<Vec<PathBuf>> {
    let size = (800, 560);
    let text = ensure_font();
    let svg = base.with_extension("svg");
    draw(SVGBackend::new(&svg, size).into_drawing_area(), chart, text)?;
    let mut files = vec![svg];
    if text {
        let png = base.with_extension("png");
        draw(
            BitMapBackend::new(&png, size).into_drawing_area(),
            chart,
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
