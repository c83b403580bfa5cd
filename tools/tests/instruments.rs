//! `restore` and `bench` as instruments: every strategy starts from the same stated cache
//! state, the order rotates across `--repeat`, spreads are reported, `--sizes` sweeps state
//! time per GiB and the growth exponent, and `--plot` writes an SVG that parses. Small sizes
//! only: these check the instruments, not the machine's figures.

use crate::common;

use std::collections::BTreeSet;
use std::path::Path;

use common::{run, temp, uffdkit};
use quick_xml::events::Event;

/// A directory removed when the test ends, however it ends.
struct Dir(std::path::PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let dir = Dir(temp(name));
        std::fs::create_dir_all(&dir.0).expect("dir");
        dir
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn json_of(cmd: std::process::Command) -> serde_json::Value {
    let out = run(cmd);
    assert!(out.status.success(), "{}", out.text());
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.text()))
}

/// What an SVG holds: its root element's name, the text of every `<text>`, and how many
/// line elements (`polyline`, `path`, `line`) it draws. Panics if it is not well-formed XML.
struct Svg {
    root: String,
    texts: Vec<String>,
    lines: usize,
}

fn parse_svg(path: &Path) -> Svg {
    let text = std::fs::read_to_string(path).expect("read the SVG");
    let mut reader = quick_xml::Reader::from_str(&text);
    let (mut root, mut texts, mut lines, mut depth) = (None, Vec::new(), 0, 0usize);
    let mut in_text = false;
    loop {
        match reader.read_event().expect("well-formed SVG") {
            Event::Start(e) | Event::Empty(e) if root.is_none() => {
                root = Some(String::from_utf8_lossy(e.name().as_ref()).into_owned());
                depth += 1;
            }
            Event::Start(e) => {
                depth += 1;
                in_text = e.name().as_ref() == b"text";
            }
            Event::Empty(e) => {
                if matches!(e.name().as_ref(), b"polyline" | b"path" | b"line") {
                    lines += 1;
                }
            }
            Event::Text(t) if in_text => {
                texts.push(t.decode().map(|c| c.into_owned()).unwrap_or_default())
            }
            Event::End(_) => {
                depth -= 1;
                in_text = false;
            }
            Event::Eof => break,
            _ => {}
        }
    }
    assert_eq!(depth, 0, "every element closed");
    Svg {
        root: root.expect("a root element"),
        texts,
        lines,
    }
}

impl Svg {
    fn has_text(&self, needle: &str) -> bool {
        self.texts.iter().any(|t| t.contains(needle))
    }
}

#[test]
fn restore_all_starts_every_run_warm_rotates_the_order_and_reports_the_spread() {
    let dir = Dir::new("fair");
    let image = dir.0.join("mem.raw");
    common::image(&image, 4 << 20);
    let mut cmd = uffdkit(["restore", "--strategy", "all", "--repeat", "3", "--json"]);
    cmd.arg("--image").arg(&image);
    let v = json_of(cmd);
    assert_eq!(v["cache"], "warm", "{v}");
    assert_eq!(v["verified"], true);
    let results = v["results"].as_array().expect("results");
    let names: Vec<&str> = results.iter().filter_map(|r| r["name"].as_str()).collect();
    assert_eq!(names, ["pager", "eager", "mmap"]);
    for r in results {
        let runs = r["runs"].as_array().expect("runs");
        assert_eq!(runs.len(), 3, "{r}");
        // Rotated: over three rounds each strategy ran first, second and third once.
        let positions: BTreeSet<u64> = runs.iter().filter_map(|x| x["position"].as_u64()).collect();
        assert_eq!(positions, BTreeSet::from([0, 1, 2]), "{r}");
        let (min, median, max) = (
            r["min_s"].as_f64().expect("min"),
            r["median_s"].as_f64().expect("median"),
            r["max_s"].as_f64().expect("max"),
        );
        assert!(min <= median && median <= max, "{r}");
        assert_eq!(r["total_s"], r["median_s"]);
        for run in runs {
            assert!(
                run["memory_before"]["available_kib"]
                    .as_u64()
                    .expect("memory")
                    > 0
            );
        }
    }
    // The pager's runs carry their timeline: the workload's touches reach every page.
    let pager_run = &results[0]["runs"][0];
    let last = pager_run["timeline"]
        .as_array()
        .expect("timeline")
        .last()
        .cloned();
    assert_eq!(last.expect("a sample")["touched"], 1024, "{pager_run}");
}

#[test]
fn restore_of_several_modes_runs_the_pager_once_in_each() {
    let dir = Dir::new("modes");
    let image = dir.0.join("mem.raw");
    common::image(&image, 2 << 20);
    let mut cmd = uffdkit(["restore", "--mode", "thread,sigbus", "--json"]);
    cmd.arg("--image").arg(&image);
    let v = json_of(cmd);
    let names: Vec<&str> = v["results"]
        .as_array()
        .expect("results")
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert_eq!(names, ["pager-thread", "pager-sigbus"]);
    assert_eq!(v["results"][1]["detail"]["mode"], "sigbus");
}

#[test]
fn restore_sweep_reports_time_per_gib_and_the_growth_exponent_and_plots_it() {
    let dir = Dir::new("sweep");
    let image = dir.0.join("mem.raw");
    common::image(&image, 8 << 20);
    let plot = dir.0.join("restore.svg");
    let mut cmd = uffdkit([
        "restore",
        "--strategy",
        "all",
        "--sizes",
        "2M,8M,4M",
        "--pattern",
        "seq",
        "--json",
    ]);
    cmd.arg("--image").arg(&image).arg("--plot").arg(&plot);
    let v = json_of(cmd);
    let sizes: Vec<u64> = v["sizes"]
        .as_array()
        .expect("sizes")
        .iter()
        .filter_map(|s| s["image_bytes"].as_u64())
        .collect();
    assert_eq!(sizes, [2 << 20, 4 << 20, 8 << 20], "ascending, each once");
    let sweep = v["sweep"].as_array().expect("sweep");
    assert_eq!(sweep.len(), 3, "pager, eager, mmap");
    for curve in sweep {
        let points = curve["points"].as_array().expect("points");
        assert_eq!(points.len(), 3, "{curve}");
        for p in points {
            let per_gib = p["s_per_gib"].as_f64().expect("s per GiB");
            let median = p["spread"]["median_s"].as_f64().expect("median");
            let gib = p["bytes"].as_f64().expect("bytes") / f64::from(1u32 << 30);
            assert!(
                (per_gib - median / gib).abs() <= 1e-9 * per_gib.max(1.0),
                "{p}"
            );
        }
        assert!(curve["exponent"].as_f64().is_some(), "{curve}");
    }
    let svg = parse_svg(&plot);
    assert_eq!(svg.root, "svg");
    assert!(svg.has_text("pages over time"), "{:?}", svg.texts);
    assert!(svg.has_text("placed on fault"), "{:?}", svg.texts);
    assert!(svg.has_text("touch latency"), "{:?}", svg.texts);
    assert!(svg.has_text("restore time per GiB"), "{:?}", svg.texts);
    assert!(svg.has_text("exponent"), "{:?}", svg.texts);
    // Three timeline series, three CDFs, three sweep curves at least, beside the axes.
    assert!(svg.lines >= 9, "{} line elements", svg.lines);
}

#[test]
fn restore_sweep_refuses_a_size_beyond_the_image() {
    let dir = Dir::new("beyond");
    let image = dir.0.join("mem.raw");
    common::image(&image, 1 << 20);
    let mut cmd = uffdkit(["restore", "--sizes", "512K,2M"]);
    cmd.arg("--image").arg(&image);
    let out = run(cmd);
    assert!(!out.status.success(), "{}", out.text());
    assert!(out.stderr.contains("the image is only"), "{}", out.text());
}

#[test]
fn bench_sweep_reports_each_mode_per_size_and_plots_the_cdfs() {
    let dir = Dir::new("bench");
    let plot = dir.0.join("bench.svg");
    let mut cmd = uffdkit([
        "bench",
        "--sizes",
        "1M,2M",
        "--modes",
        "thread,sigbus",
        "--placement",
        "unpinned",
        "--repeat",
        "1",
        "--json",
    ]);
    cmd.arg("--plot").arg(&plot);
    let v = json_of(cmd);
    let pages: Vec<u64> = v["sizes"]
        .as_array()
        .expect("sizes")
        .iter()
        .filter_map(|s| s["config"]["pages_per_thread"].as_u64())
        .collect();
    assert_eq!(pages, [256, 512]);
    let names: Vec<&str> = v["sweep"]
        .as_array()
        .expect("sweep")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(
        names,
        [
            "pager-thread/unpinned",
            "raw-thread/unpinned",
            "pager-sigbus/unpinned",
            "raw-sigbus/unpinned"
        ]
    );
    for r in v["results"].as_array().expect("results") {
        assert_eq!(r["pager"]["count"], 512, "{r}");
        assert!(r["pager_wall"]["median_s"].as_f64().expect("wall") > 0.0);
    }
    let svg = parse_svg(&plot);
    assert_eq!(svg.root, "svg");
    assert!(svg.has_text("fault latency CDF"), "{:?}", svg.texts);
    assert!(svg.has_text("pager sigbus"), "{:?}", svg.texts);
    assert!(svg.has_text("raw thread"), "{:?}", svg.texts);
    assert!(svg.has_text("fault time per GiB"), "{:?}", svg.texts);
}
