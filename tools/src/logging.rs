//! The CLI's logger: the libraries log through the `log` facade, and this decides what of
//! it reaches stderr, and how it looks.
//!
//! Levels come from `-v`/`-q` (info by default; `-v` debug, `-vv` trace; `-q` warnings
//! and errors, `-qq` errors), or from `UFFDKIT_LOG`, a `RUST_LOG`-style list of `LEVEL`
//! and `TARGET=LEVEL` directives (`UFFDKIT_LOG=warn,postcopy=debug`), which wins where it
//! speaks. Our own logger rather than `env_logger`: a log line must hide a live progress
//! bar, print, and redraw it ([`crate::progress::suspend`]), which `env_logger` cannot do
//! without yet another bridge crate; and the filter this needs is a few dozen lines.

use std::borrow::Cow;
use std::io::Write;
use std::time::Instant;

use log::{Level, LevelFilter, Log, Metadata, Record};

/// The environment variable with `RUST_LOG`-style directives.
pub const LOG_ENV: &str = "UFFDKIT_LOG";

/// Which records pass: a default level and per-target levels (a target matches itself
/// and its `::` children; the longest match wins).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    default: LevelFilter,
    targets: Vec<(String, LevelFilter)>,
}

impl Filter {
    /// The filter `-v` (`verbose` times) or `-q` (`quiet` times) asks for.
    pub fn from_flags(verbose: u8, quiet: u8) -> Filter {
        let default = match (verbose, quiet) {
            (0, 0) => LevelFilter::Info,
            (0, 1) => LevelFilter::Warn,
            (0, _) => LevelFilter::Error,
            (1, _) => LevelFilter::Debug,
            (_, _) => LevelFilter::Trace,
        };
        Filter {
            default,
            targets: Vec::new(),
        }
    }

    /// Applies comma-separated `LEVEL` / `TARGET=LEVEL` directives; returns those it could
    /// not read (they are ignored).
    pub fn apply(&mut self, spec: &str) -> Vec<String> {
        let mut bad = Vec::new();
        for directive in spec.split(',').map(str::trim).filter(|d| !d.is_empty()) {
            let (target, level) = match directive.split_once('=') {
                Some((t, l)) => (Some(t.trim()), l.trim()),
                None => (None, directive),
            };
            match (target, level.parse::<LevelFilter>()) {
                (None, Ok(level)) => self.default = level,
                (Some(t), Ok(level)) if !t.is_empty() => {
                    self.targets.retain(|(have, _)| have != t);
                    self.targets.push((t.to_string(), level));
                }
                _ => bad.push(directive.to_string()),
            }
        }
        bad
    }

    /// The level that passes for `target`.
    pub fn level_for(&self, target: &str) -> LevelFilter {
        self.targets
            .iter()
            .filter(|(t, _)| {
                target == t
                    || target
                        .strip_prefix(t.as_str())
                        .is_some_and(|rest| rest.starts_with("::"))
            })
            .max_by_key(|(t, _)| t.len())
            .map_or(self.default, |(_, level)| *level)
    }

    /// The most verbose level any target gets.
    pub fn max(&self) -> LevelFilter {
        self.targets
            .iter()
            .map(|(_, level)| *level)
            .fold(self.default, Ord::max)
    }
}

struct Logger {
    filter: Filter,
    started: Instant,
    timestamps: bool,
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= self.filter.level_for(metadata.target())
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut line = String::new();
        if self.timestamps {
            line += &format!("[{:>9.3}] ", self.started.elapsed().as_secs_f64());
        }
        line += match record.level() {
            Level::Error => "error: ",
            Level::Warn => "warning: ",
            Level::Info => "",
            Level::Debug => "debug: ",
            Level::Trace => "trace: ",
        };
        line += &format!(
            "{}: {}",
            source_name(record.target(), record.level()),
            record.args()
        );
        crate::progress::suspend(|| {
            // Nowhere to report a failing stderr.
            let _ = writeln!(std::io::stderr().lock(), "{line}");
        });
    }

    fn flush(&self) {}
}

/// How a record's origin is shown: our own modules by command name (`fc-handler`), a
/// library by its crate at info and above, by its full module path when debugging.
fn source_name(target: &str, level: Level) -> Cow<'_, str> {
    if let Some(module) = target.strip_prefix("uffdkit::") {
        let command = module.split("::").next().unwrap_or(module);
        return Cow::Owned(command.replace('_', "-"));
    }
    if level <= Level::Info {
        Cow::Borrowed(target.split("::").next().unwrap_or(target))
    } else {
        Cow::Borrowed(target)
    }
}

/// Installs the logger for `-v`/`-q` and `UFFDKIT_LOG`. Call once, first thing.
pub fn init(verbose: u8, quiet: u8) {
    let mut filter = Filter::from_flags(verbose, quiet);
    let bad = std::env::var(LOG_ENV)
        .map(|spec| filter.apply(&spec))
        .unwrap_or_default();
    log::set_max_level(filter.max());
    let logger = Logger {
        filter,
        started: Instant::now(),
        timestamps: verbose > 0,
    };
    // Only fails if a logger is already installed: then that one logs.
    let _ = log::set_boxed_logger(Box::new(logger));
    for directive in bad {
        log::warn!("{LOG_ENV}: ignoring `{directive}` (expected LEVEL or TARGET=LEVEL, LEVEL one of off, error, warn, info, debug, trace)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_set_the_default_level() {
        assert_eq!(Filter::from_flags(0, 0).max(), LevelFilter::Info);
        assert_eq!(Filter::from_flags(1, 0).max(), LevelFilter::Debug);
        assert_eq!(Filter::from_flags(3, 0).max(), LevelFilter::Trace);
        assert_eq!(Filter::from_flags(0, 1).max(), LevelFilter::Warn);
        assert_eq!(Filter::from_flags(0, 2).max(), LevelFilter::Error);
    }

    #[test]
    fn directives_override_per_target_with_the_longest_match() {
        let mut f = Filter::from_flags(0, 0);
        let bad = f.apply("warn, pager=debug,pager::engine=trace,postcopy=off,=info,pager=loud");
        assert_eq!(bad, ["=info", "pager=loud"]);
        assert_eq!(f.level_for("uffdkit::migrate"), LevelFilter::Warn);
        assert_eq!(f.level_for("pager"), LevelFilter::Debug);
        assert_eq!(f.level_for("pager::worker"), LevelFilter::Debug);
        assert_eq!(f.level_for("pager::engine"), LevelFilter::Trace);
        assert_eq!(f.level_for("pagerx"), LevelFilter::Warn, "not a child");
        assert_eq!(f.level_for("postcopy::net"), LevelFilter::Off);
        assert_eq!(f.max(), LevelFilter::Trace);
    }

    #[test]
    fn records_are_named_by_command_or_crate() {
        assert_eq!(
            source_name("uffdkit::fc_handler", Level::Info),
            "fc-handler"
        );
        assert_eq!(source_name("postcopy::net", Level::Warn), "postcopy");
        assert_eq!(source_name("postcopy::net", Level::Debug), "postcopy::net");
    }
}
