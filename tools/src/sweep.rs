//! Size sweeps and run-to-run spread: what `--sizes` and `--repeat` report.
//!
//! A cost is only understood with how it grows: a sweep measures the same work at several
//! sizes and states the time per GiB at each and the growth exponent `k` of `time ∝ sizeᵏ`
//! (a least-squares fit of log time on log size: 1.0 is linear, above it the cost per GiB
//! grows with the size). Each point is the median of its runs, shown with its min and max,
//! so a figure is never one lucky or unlucky run.

use anyhow::{bail, Context, Result};
use serde::Serialize;

const GIB: f64 = (1u64 << 30) as f64;

/// Parses a size as people write it: `512M`, `1G`, `1.5G`, `4096K`, or bytes.
pub fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim();
    let (number, scale) = match t.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let unit = t[i..].to_ascii_lowercase();
            let scale: u64 = match unit.trim_end_matches("ib").trim_end_matches('b') {
                "k" => 1 << 10,
                "m" => 1 << 20,
                "g" => 1 << 30,
                "t" => 1 << 40,
                "" => 1,
                _ => bail!("{text}: unknown unit (K, M, G or T)"),
            };
            (&t[..i], scale)
        }
        None => (t, 1),
    };
    let value: f64 = number
        .trim()
        .parse()
        .with_context(|| format!("{text}: not a size"))?;
    if !(value.is_finite() && value > 0.0) {
        bail!("{text}: a size must be positive");
    }
    Ok((value * scale as f64).round() as u64)
}

/// The clap value parser of one `--sizes` entry.
pub fn size_arg(text: &str) -> std::result::Result<u64, String> {
    parse_size(text).map_err(|e| format!("{e:#}"))
}

/// Min, median and max of repeated runs, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spread {
    /// The fastest run.
    pub min_s: f64,
    /// The median run (of an even count, the upper middle one: a run that happened).
    pub median_s: f64,
    /// The slowest run.
    pub max_s: f64,
    /// Runs measured.
    pub runs: usize,
}

impl Spread {
    /// The spread of `runs` (seconds); `None` for no runs.
    pub fn of(runs: &[f64]) -> Option<Spread> {
        let mut sorted = runs.to_vec();
        sorted.sort_by(f64::total_cmp);
        Some(Spread {
            min_s: *sorted.first()?,
            median_s: sorted[sorted.len() / 2],
            max_s: *sorted.last()?,
            runs: sorted.len(),
        })
    }

    /// The slowest run over the median: 1.0 is no spread.
    pub fn max_over_median(&self) -> f64 {
        self.max_s / self.median_s.max(1e-12)
    }

    /// `median ms (min–max)`.
    pub fn text_ms(&self) -> String {
        if self.runs == 1 {
            return format!("{:.1} ms", self.median_s * 1e3);
        }
        format!(
            "{:.1} ms ({:.1}–{:.1}, max/median {:.2})",
            self.median_s * 1e3,
            self.min_s * 1e3,
            self.max_s * 1e3,
            self.max_over_median()
        )
    }
}

/// One size of a sweep: its spread and the median's time per GiB.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Point {
    /// The size measured.
    pub bytes: u64,
    /// Its runs.
    pub spread: Spread,
    /// The median run's seconds per GiB.
    pub s_per_gib: f64,
}

impl Point {
    /// A point of `bytes` from its runs' spread.
    pub fn new(bytes: u64, spread: Spread) -> Point {
        Point {
            bytes,
            spread,
            s_per_gib: spread.median_s / (bytes as f64 / GIB),
        }
    }
}

/// The growth exponent `k` of `time ∝ sizeᵏ` over the points' medians (least squares in
/// log–log); `None` with fewer than two distinct sizes.
pub fn growth_exponent(points: &[Point]) -> Option<f64> {
    let xy: Vec<(f64, f64)> = points
        .iter()
        .filter(|p| p.spread.median_s > 0.0)
        .map(|p| ((p.bytes as f64).ln(), p.spread.median_s.ln()))
        .collect();
    let n = xy.len() as f64;
    let mx = xy.iter().map(|p| p.0).sum::<f64>() / n;
    let my = xy.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = xy.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = xy.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (xy.len() >= 2 && sxx > 1e-12).then(|| sxy / sxx)
}

/// One contender's sweep (a strategy, a delivery mode).
#[derive(Debug, Clone, Serialize)]
pub struct Curve {
    /// What was measured.
    pub name: String,
    /// Its points, by size.
    pub points: Vec<Point>,
    /// [`growth_exponent`] of the points.
    pub exponent: Option<f64>,
}

impl Curve {
    /// A curve of `points` (sorted by size here).
    pub fn new(name: String, mut points: Vec<Point>) -> Curve {
        points.sort_by_key(|p| p.bytes);
        let exponent = growth_exponent(&points);
        Curve {
            name,
            points,
            exponent,
        }
    }
}

/// Prints a sweep table: per contender and size, median (min–max) and time per GiB, then
/// the growth exponent.
pub fn print_table(title: &str, curves: &[Curve]) {
    println!("{title}");
    println!(
        "  {:<16} {:>8} {:>12} {:>21} {:>10}",
        "", "size", "median", "min–max", "s per GiB"
    );
    for c in curves {
        for p in &c.points {
            println!(
                "  {:<16} {:>8} {:>9.1} ms {:>9.1}–{:<8.1}ms {:>10.3}",
                c.name,
                crate::units::bytes(p.bytes),
                p.spread.median_s * 1e3,
                p.spread.min_s * 1e3,
                p.spread.max_s * 1e3,
                p.s_per_gib
            );
        }
        match c.exponent {
            Some(k) => println!("  {:<16} growth exponent {k:.2} (1.00 = linear)", c.name),
            None => println!("  {:<16} growth exponent n/a (one size)", c.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("8k").unwrap(), 8192);
        assert!(parse_size("0G").is_err());
        assert!(parse_size("3X").is_err());
        assert!(parse_size("G").is_err());
    }

    #[test]
    fn spread_reports_min_median_and_max() {
        let s = Spread::of(&[3.0, 1.0, 2.0, 10.0, 2.5]).unwrap();
        assert_eq!((s.min_s, s.median_s, s.max_s, s.runs), (1.0, 2.5, 10.0, 5));
        assert_eq!(s.max_over_median(), 4.0);
        assert!(Spread::of(&[]).is_none());
    }

    fn point(gib: u64, seconds: f64) -> Point {
        Point::new(gib << 30, Spread::of(&[seconds]).unwrap())
    }

    #[test]
    fn linear_growth_has_exponent_one_and_quadratic_two() {
        let linear = [point(1, 0.5), point(2, 1.0), point(4, 2.0), point(8, 4.0)];
        assert!((growth_exponent(&linear).unwrap() - 1.0).abs() < 1e-9);
        assert!((linear[3].s_per_gib - 0.5).abs() < 1e-9);
        let quadratic = [point(1, 1.0), point(2, 4.0), point(4, 16.0)];
        assert!((growth_exponent(&quadratic).unwrap() - 2.0).abs() < 1e-9);
        assert!(growth_exponent(&[point(1, 1.0)]).is_none());
    }
}
