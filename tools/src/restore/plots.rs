//! `restore --plot`: the median pager run's pages placed over time (by fault, prefetch,
//! arrival, beside the workload's touches), each strategy's touch-latency CDF, and the
//! size sweep.

use super::compare::Measured;
use crate::plot::Panel;
use crate::sweep::Curve;

/// Draws the largest size's runs (and, for a sweep, its curves) into `path`.
pub(super) fn write(
    path: &std::path::Path,
    largest: &[Measured],
    curves: &[Curve],
    sweep: bool,
) -> anyhow::Result<()> {
    let mut panels = Vec::new();
    for m in largest {
        let samples = &m.median_run().outcome.timeline;
        if samples.is_empty() {
            continue;
        }
        let line = |name: &str, value: fn(&super::timeline::Sample) -> u64| {
            let pts = samples.iter().map(|s| (s.t, value(s) as f64)).collect();
            (name.to_string(), pts)
        };
        let mut series = vec![
            line("touched by the workload", |s| s.touched),
            line("placed on fault", |s| s.fault),
            line("placed by prefetch", |s| s.prefetch),
        ];
        if samples.iter().any(|s| s.arrival > 0) {
            series.push(line("placed on arrival", |s| s.arrival));
        }
        if samples.iter().any(|s| s.zero > 0) {
            series.push(line("zero pages placed", |s| s.zero));
        }
        panels.push(Panel::Timeline {
            title: format!(
                "{}: pages over time (median run of {}, {:.0} ms)",
                m.name,
                m.runs.len(),
                m.median_run().outcome.total.as_secs_f64() * 1e3
            ),
            series,
        });
    }
    panels.push(Panel::Cdf {
        title: "touch latency, median run of each strategy".into(),
        series: largest
            .iter()
            .map(|m| (m.name.clone(), m.median_run().outcome.lat.clone()))
            .collect(),
    });
    if sweep {
        panels.push(Panel::Sweep {
            title: "restore time per GiB against size".into(),
            curves: curves.to_vec(),
        });
    }
    crate::plot::write_svg(path, &panels)
}
