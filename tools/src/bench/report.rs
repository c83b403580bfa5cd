//! What `uffdkit bench` prints: the table (or JSON) of each size, the sweep, the plot.

use super::*;
use crate::plot::Panel;

fn mode_name(mode: Mode) -> String {
    format!("{mode:?}").to_lowercase()
}

fn placement_name(placement: Placement) -> String {
    format!("{placement:?}").to_lowercase()
}

/// Each row's pager and raw wall times across the sizes: `pager-MODE/PLACEMENT`, `raw-…`.
fn curves(measured: &[Measured], page_size: usize, threads: usize, shared: bool) -> Vec<Curve> {
    let Some(first) = measured.first() else {
        return Vec::new();
    };
    let mut curves = Vec::new();
    for (i, row) in first.rows.iter().enumerate() {
        for who in ["pager", "raw"] {
            let points = measured
                .iter()
                .map(|m| {
                    let r = &m.rows[i];
                    let pages = if shared { m.pages } else { m.pages * threads };
                    let wall = if who == "pager" {
                        r.pager_wall
                    } else {
                        r.raw_wall
                    };
                    Point::new((pages * page_size) as u64, wall)
                })
                .collect();
            let name = format!(
                "{who}-{}/{}",
                mode_name(row.mode),
                placement_name(row.placement)
            );
            curves.push(Curve::new(name, points));
        }
    }
    curves
}

/// Prints (or writes as JSON) the bench's results, and draws the plot if asked.
pub(super) fn report(
    args: &Args,
    page_size: usize,
    cpus: &[usize],
    measured: &[Measured],
) -> Result<()> {
    let shared = args.pattern == Pattern::Shared;
    let curves = curves(measured, page_size, args.threads, shared);
    let sweep = measured.len() > 1;
    if let Some(path) = &args.plot {
        plot(path, measured, &curves, sweep)?;
    }
    let last = measured.last().expect("at least one size");
    if args.json {
        let mut out = size_json(args, page_size, cpus, last);
        if sweep {
            let each: Vec<_> = measured
                .iter()
                .map(|m| size_json(args, page_size, cpus, m))
                .collect();
            if let Some(o) = out.as_object_mut() {
                o.insert("sizes".into(), json!(each));
                o.insert("sweep".into(), json!(curves));
            }
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    for m in measured {
        print_size(args, page_size, cpus, m);
    }
    if sweep {
        crate::sweep::print_table(
            "size sweep (wall time of each side's runs; growth exponent k of time ∝ sizeᵏ):",
            &curves,
        );
    }
    Ok(())
}

fn size_json(args: &Args, page_size: usize, cpus: &[usize], m: &Measured) -> serde_json::Value {
    json!({
        "config": {
            "threads": args.threads, "pages_per_thread": m.pages, "pattern": args.pattern,
            "kind": args.kind, "source": args.source, "page_size": page_size,
            "repeat": args.repeat, "cpus": cpus,
        },
        "first_touch": m.first_touch,
        // What each side's touch is: the floor writes (an allocating fault), the uffd
        // sides read (a missing registered page is allocated and filled for a read too).
        "first_touch_access": case::FLOOR_TOUCH,
        "pager_access": case::UFFD_TOUCH,
        "first_touch_placed": Where {
            faulting: None,
            resolving: Resolving::FaultingThread,
        },
        "results": m.rows,
    })
}

fn print_size(args: &Args, page_size: usize, cpus: &[usize], m: &Measured) {
    let first_touch = &m.first_touch;
    println!(
        "uffdkit bench: {} thread(s) × {} pages of {} KiB, {:?} pattern, {:?} memory, {:?} source, median of {} run(s), {} CPUs",
        args.threads, m.pages, page_size / 1024, args.pattern, args.kind, args.source, args.repeat, cpus.len()
    );
    println!(
        "first-touch writes (allocating faults) on the same memory kind, no uffd, unpinned: p50 {:.2} µs, p99 {:.2} µs, {:.0} pages/s",
        first_touch.p50_us, first_touch.p99_us, first_touch.pages_per_s
    );
    println!(
        "{:<8} {:<9} {:<6} {:>8} {:>8} {:>8} {:>8} {:>9} {:>11} {:>8} {:>9}",
        "mode",
        "placement",
        "who",
        "p50 µs",
        "p90 µs",
        "p99 µs",
        "p99.9 µs",
        "max µs",
        "pages/s",
        "vs raw",
        "vs touch"
    );
    for r in &m.rows {
        for (who, s) in [("raw", &r.raw), ("pager", &r.pager)] {
            let shown = |ratio: Option<f64>, width: usize, digits: usize| match ratio {
                Some(x) => format!("{x:>width$.digits$}x"),
                None => format!("{:>w$}", "n/a", w = width + 1),
            };
            let ratios = if who == "pager" {
                format!(
                    "{} {}",
                    shown(r.pager_vs_raw_p50, 7, 2),
                    shown(r.pager_vs_first_touch_p50, 8, 1)
                )
            } else {
                String::new()
            };
            println!(
                "{:<8} {:<9} {:<6} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>9.1} {:>11.0} {}",
                mode_name(r.mode),
                placement_name(r.placement),
                who,
                s.p50_us,
                s.p90_us,
                s.p99_us,
                s.p999_us,
                s.max_us,
                s.pages_per_s,
                ratios
            );
        }
    }
    println!(
        "placement: unpinned = nothing pinned; same = faulting threads and handler on CPU {}; \
         other = faulting on CPU {}, handler on CPU {} (per-CPU handlers: one on each of {:?}); \
         n/a = no ratio of unlike placements (vs touch: the floor is unpinned, so none for \
         pinned handlers — per-CPU ones are pinned under every placement —, and allocates a \
         page per touch, which --source zero on anon memory does not)",
        cpus[0],
        cpus[0],
        cpus.get(1).map_or("-".to_string(), |c| c.to_string()),
        cpus
    );
}

/// One CDF panel per placement (each mode's pager and raw loop, the largest size), and the
/// sweep.
fn plot(
    path: &std::path::Path,
    measured: &[Measured],
    curves: &[Curve],
    sweep: bool,
) -> Result<()> {
    let last = measured.last().expect("at least one size");
    let mut panels = Vec::new();
    let mut placements: Vec<Placement> = last.rows.iter().map(|r| r.placement).collect();
    placements.dedup();
    for placement in placements {
        let mut series = Vec::new();
        for r in last.rows.iter().filter(|r| r.placement == placement) {
            series.push((format!("pager {}", mode_name(r.mode)), r.pager_lat.clone()));
            series.push((format!("raw {}", mode_name(r.mode)), r.raw_lat.clone()));
        }
        panels.push(Panel::Cdf {
            title: format!(
                "fault latency CDF per mode, placement {} ({} pages, median run)",
                placement_name(placement),
                last.rows.first().map_or(0, |r| r.pager.count)
            ),
            series,
        });
    }
    if sweep {
        panels.push(Panel::Sweep {
            title: "fault time per GiB against size".into(),
            curves: curves.to_vec(),
        });
    }
    crate::plot::write_svg(path, &panels)
}
