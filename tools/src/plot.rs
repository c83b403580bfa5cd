//! `--plot FILE.svg`: what people compare by eye, drawn as one SVG of stacked panels —
//! latency CDFs per mode or strategy, pages placed over time by how they came (fault,
//! prefetch, arrival), and size sweeps (time per GiB against size).
//!
//! Drawn by `plotters` with its SVG backend only (no C font libraries: text stays SVG
//! `<text>`), into a string, then written complete-or-absent ([`crate::partial`]).

use std::io::Write;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;

use crate::sweep::Curve;

/// One panel of a plot.
pub enum Panel {
    /// A latency CDF per series (nanosecond samples), log-scale latency axis.
    Cdf {
        /// The panel's title.
        title: String,
        /// Name and latencies (ns) of each series.
        series: Vec<(String, Vec<u32>)>,
    },
    /// Cumulative pages over time per series: `(seconds, pages)` samples.
    Timeline {
        /// The panel's title.
        title: String,
        /// Name and samples of each series.
        series: Vec<(String, Vec<(f64, f64)>)>,
    },
    /// Seconds per GiB against size (GiB) per curve, with its growth exponent.
    Sweep {
        /// The panel's title.
        title: String,
        /// The curves.
        curves: Vec<Curve>,
    },
}

const WIDTH: u32 = 900;
const PANEL_HEIGHT: u32 = 360;
/// Points drawn per CDF: enough for a smooth curve, few enough to keep the file small.
const CDF_POINTS: usize = 200;
/// Points drawn per timeline series.
const TIMELINE_POINTS: usize = 300;

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

fn drawing<E: std::error::Error + Send + Sync>(e: DrawingAreaErrorKind<E>) -> anyhow::Error {
    anyhow!("draw the plot: {e}")
}

/// Draws `panels` stacked and writes them to `path` as SVG.
pub fn write_svg(path: &Path, panels: &[Panel]) -> Result<()> {
    let svg = render(panels)?;
    let (mut file, output) = crate::partial::PartialOutput::create(path)?;
    file.write_all(svg.as_bytes())
        .with_context(|| format!("write {}", output.temp_path().display()))?;
    output.commit()
}

/// The SVG text of `panels`.
pub fn render(panels: &[Panel]) -> Result<String> {
    let mut svg = String::new();
    {
        let height = PANEL_HEIGHT * panels.len().max(1) as u32;
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(drawing)?;
        let areas = root.split_evenly((panels.len().max(1), 1));
        for (panel, area) in panels.iter().zip(&areas) {
            match panel {
                Panel::Cdf { title, series } => cdf(area, title, series)?,
                Panel::Timeline { title, series } => timeline(area, title, series)?,
                Panel::Sweep { title, curves } => sweep(area, title, curves)?,
            }
        }
        root.present().map_err(drawing)?;
    }
    Ok(svg)
}

fn color(i: usize) -> RGBColor {
    const COLORS: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ];
    COLORS[i % COLORS.len()]
}

/// `(latency µs, fraction ≤ it)` at [`CDF_POINTS`] quantiles of `ns`.
pub fn cdf_points(ns: &[u32]) -> Vec<(f64, f64)> {
    let mut sorted = ns.to_vec();
    sorted.sort_unstable();
    let n = sorted.len();
    if n == 0 {
        return Vec::new();
    }
    (1..=CDF_POINTS.min(n))
        .map(|k| {
            let i = (k * n).div_ceil(CDF_POINTS.min(n)) - 1;
            (f64::from(sorted[i].max(1)) / 1e3, (i + 1) as f64 / n as f64)
        })
        .collect()
}

fn cdf(area: &Area, title: &str, series: &[(String, Vec<u32>)]) -> Result<()> {
    let curves: Vec<(&str, Vec<(f64, f64)>)> = series
        .iter()
        .map(|(name, ns)| (name.as_str(), cdf_points(ns)))
        .filter(|(_, pts)| !pts.is_empty())
        .collect();
    let (lo, hi) = curves
        .iter()
        .flat_map(|(_, p)| p.iter().map(|q| q.0))
        .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(x), hi.max(x)));
    let (lo, hi) = if lo < hi {
        (lo * 0.8, hi * 1.25)
    } else {
        (0.1, 10.0)
    };
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((lo..hi).log_scale(), 0f64..1f64)
        .map_err(drawing)?;
    chart
        .configure_mesh()
        // Bold grid lines only: the light ones were most of the file's bytes.
        .max_light_lines(0)
        .x_desc("latency, µs (log scale)")
        .y_desc("fraction ≤ latency")
        .draw()
        .map_err(drawing)?;
    for (i, (name, pts)) in curves.into_iter().enumerate() {
        let c = color(i);
        chart
            .draw_series(LineSeries::new(pts, c.stroke_width(2)))
            .map_err(drawing)?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    legend(&mut chart)
}

/// At most [`TIMELINE_POINTS`] of `pts`, evenly picked, the last one kept.
fn thin(pts: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let step = pts.len().div_ceil(TIMELINE_POINTS).max(1);
    let mut out: Vec<_> = pts.iter().copied().step_by(step).collect();
    if let (Some(&last), Some(&kept)) = (pts.last(), out.last()) {
        if last != kept {
            out.push(last);
        }
    }
    out
}

fn timeline(area: &Area, title: &str, series: &[(String, Vec<(f64, f64)>)]) -> Result<()> {
    let t_max = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|q| q.0))
        .fold(0f64, f64::max)
        .max(1e-3);
    let y_max = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|q| q.1))
        .fold(0f64, f64::max)
        .max(1.0);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..t_max * 1e3 * 1.02, 0f64..y_max * 1.05)
        .map_err(drawing)?;
    chart
        .configure_mesh()
        // Bold grid lines only: the light ones were most of the file's bytes.
        .max_light_lines(0)
        .x_desc("time since the restore started, ms")
        .y_desc("pages placed")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(drawing)?;
    // The first series (the workload's touches) is drawn last and dashed: it often lies
    // on another (a workload right behind the prefetcher), and must stay visible.
    for (i, (name, pts)) in series
        .iter()
        .enumerate()
        .skip(1)
        .chain(series.iter().enumerate().take(1))
    {
        let c = color(i);
        let pts: Vec<_> = thin(pts).into_iter().map(|(t, y)| (t * 1e3, y)).collect();
        let drawn = if i == 0 {
            chart.draw_series(DashedLineSeries::new(pts, 8, 6, c.stroke_width(2)))
        } else {
            chart.draw_series(LineSeries::new(pts, c.stroke_width(2)))
        };
        drawn
            .map_err(drawing)?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    legend(&mut chart)
}

fn sweep(area: &Area, title: &str, curves: &[Curve]) -> Result<()> {
    const GIB: f64 = (1u64 << 30) as f64;
    let pts = || curves.iter().flat_map(|c| c.points.iter());
    let x_max = pts().map(|p| p.bytes as f64 / GIB).fold(0f64, f64::max);
    let y_max = pts()
        .map(|p| p.spread.max_s / (p.bytes as f64 / GIB))
        .fold(0f64, f64::max)
        .max(1e-3);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..x_max * 1.08, 0f64..y_max * 1.1)
        .map_err(drawing)?;
    chart
        .configure_mesh()
        // Bold grid lines only: the light ones were most of the file's bytes.
        .max_light_lines(0)
        .x_desc("size, GiB")
        .y_desc("seconds per GiB (median; bars: min–max)")
        .draw()
        .map_err(drawing)?;
    for (i, curve) in curves.iter().enumerate() {
        let c = color(i);
        let gib = |p: &crate::sweep::Point| p.bytes as f64 / GIB;
        let medians: Vec<(f64, f64)> = curve.points.iter().map(|p| (gib(p), p.s_per_gib)).collect();
        let label = match curve.exponent {
            Some(k) => format!("{} (exponent {k:.2})", curve.name),
            None => curve.name.clone(),
        };
        chart
            .draw_series(LineSeries::new(medians.clone(), c.stroke_width(2)))
            .map_err(drawing)?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        chart
            .draw_series(medians.iter().map(|&p| Circle::new(p, 4, c.filled())))
            .map_err(drawing)?;
        // The spread of each point: a vertical bar from the fastest run to the slowest.
        chart
            .draw_series(curve.points.iter().map(|p| {
                let x = gib(p);
                let per = |s: f64| s / (p.bytes as f64 / GIB);
                PathElement::new(
                    vec![(x, per(p.spread.min_s)), (x, per(p.spread.max_s))],
                    c.stroke_width(1),
                )
            }))
            .map_err(drawing)?;
    }
    legend(&mut chart)
}

fn legend<'a, 'b: 'a, X, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'b>, Cartesian2d<X, Y>>,
) -> Result<()>
where
    X: Ranged,
    Y: Ranged,
{
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(drawing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cdf_points_rise_to_one_at_the_largest_latency() {
        let ns: Vec<u32> = (1..=1000).map(|i| i * 1000).collect();
        let pts = cdf_points(&ns);
        assert_eq!(pts.len(), CDF_POINTS);
        assert_eq!(*pts.last().unwrap(), (1000.0, 1.0));
        assert!(pts.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 < w[1].1));
        assert_eq!(cdf_points(&[5000]), vec![(5.0, 1.0)]);
    }

    #[test]
    fn thinning_keeps_the_last_sample() {
        let pts: Vec<(f64, f64)> = (0..1001).map(|i| (i as f64, i as f64)).collect();
        let thinned = thin(&pts);
        assert!(thinned.len() <= TIMELINE_POINTS + 1);
        assert_eq!(thinned.last(), Some(&(1000.0, 1000.0)));
    }
}
