//! Live progress of long-running commands (`migrate`, `restore`, `serve`).
//!
//! A person at a terminal gets a live bar (`indicatif`) on stderr, redrawn ten times a
//! second; a log file or a CI job gets a plain status line at each phase change and every
//! [`LINES_EVERY_UNWATCHED`] otherwise (every [`LINES_EVERY_WATCHED`] when lines are asked
//! for on a terminal). Progress is diagnostics: it goes to stderr only (stdout stays the
//! command's result, JSON with `--json`), through the logger for plain lines, and `-q`
//! silences it. `--progress` overrides the choice.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How progress is shown (`--progress`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Display {
    /// A live bar when stderr is a terminal, plain lines otherwise.
    Auto,
    /// A live bar (plain lines if stderr is not a terminal: a bar needs one).
    Bar,
    /// Plain status lines.
    Lines,
    /// Nothing.
    None,
}

/// Plain lines when nobody watches (stderr is a file or a pipe): a log needs a heartbeat,
/// not a line every few hundred milliseconds.
pub const LINES_EVERY_UNWATCHED: Duration = Duration::from_secs(5);
/// Plain lines on a terminal (`--progress lines`).
pub const LINES_EVERY_WATCHED: Duration = Duration::from_secs(1);
/// How often the status is sampled: the bar's refresh, and how soon a phase change shows.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// The chosen display, set once by `main`.
static DISPLAY: AtomicU8 = AtomicU8::new(Display::Auto as u8);
/// The bar being drawn, for [`suspend`].
static ACTIVE: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// Sets how progress is shown (from `--progress`).
pub fn set_display(display: Display) {
    DISPLAY.store(display as u8, Ordering::Relaxed);
}

fn display() -> Display {
    match DISPLAY.load(Ordering::Relaxed) {
        x if x == Display::Bar as u8 => Display::Bar,
        x if x == Display::Lines as u8 => Display::Lines,
        x if x == Display::None as u8 => Display::None,
        _ => Display::Auto,
    }
}

/// One sample of a command's status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// The phase (empty for a command of one phase); a plain line is printed whenever it
    /// changes.
    pub phase: String,
    /// Done out of a known total (a bar), or `None` (a spinner).
    pub fraction: Option<(u64, u64)>,
    /// What to say beside it.
    pub text: String,
}

impl Status {
    /// `phase: text`, or the text alone for a command of one phase.
    fn describe(&self) -> String {
        if self.phase.is_empty() {
            self.text.clone()
        } else {
            format!("{}: {}", self.phase, self.text)
        }
    }
}

/// Runs `work` on this thread while a second thread samples `status` and shows it as
/// `label` under the log target `target`; returns what `work` returns.
pub fn track<R>(
    target: &str,
    label: &str,
    status: impl Fn() -> Status + Sync,
    work: impl FnOnce() -> R,
) -> R {
    let Some(mut view) = View::choose(target, label) else {
        return work();
    };
    // The first status is shown before the work starts, however soon it ends.
    view.show(&status());
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            loop {
                std::thread::park_timeout(SAMPLE_EVERY);
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                view.show(&status());
            }
            view.finish();
        });
        // Stops the sampler even if `work` panics (the scope joins it either way).
        struct StopOnDrop<'a>(&'a AtomicBool, &'a std::thread::Thread);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
                self.1.unpark();
            }
        }
        let _stop = StopOnDrop(&stop, sampler.thread());
        work()
    })
}

/// Runs `f` with any live bar hidden, so that what it writes to stderr does not tear the
/// bar; the bar is redrawn after.
pub fn suspend<R>(f: impl FnOnce() -> R) -> R {
    let bar = ACTIVE.lock().unwrap_or_else(|p| p.into_inner()).clone();
    match bar {
        Some(bar) => bar.suspend(f),
        None => f(),
    }
}

/// Where a tracked command's status goes.
enum View {
    Bar {
        bar: ProgressBar,
        counted: bool,
        drawing: bool,
    },
    Lines {
        target: String,
        label: String,
        started: Instant,
        every: Duration,
        last: Option<(Instant, String)>,
    },
}

impl View {
    /// The view for this run, or none (`--progress none`, or info silenced for `target`).
    fn choose(target: &str, label: &str) -> Option<View> {
        let display = display();
        if display == Display::None || !log::log_enabled!(target: target, log::Level::Info) {
            return None;
        }
        let terminal = std::io::stderr().is_terminal();
        if terminal && matches!(display, Display::Auto | Display::Bar) {
            // Hidden until the first status is in: no empty or default-styled frame.
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden())
                .with_style(style(false))
                .with_prefix(label.to_string());
            *ACTIVE.lock().unwrap_or_else(|p| p.into_inner()) = Some(bar.clone());
            return Some(View::Bar {
                bar,
                counted: false,
                drawing: false,
            });
        }
        // The logger names the command already: `serve: …`, not `serve: serve …`.
        let named = target.rsplit("::").next() == Some(label);
        Some(View::Lines {
            target: target.to_string(),
            label: if named {
                String::new()
            } else {
                format!("{label} ")
            },
            started: Instant::now(),
            every: if terminal {
                LINES_EVERY_WATCHED
            } else {
                LINES_EVERY_UNWATCHED
            },
            last: None,
        })
    }

    fn show(&mut self, status: &Status) {
        match self {
            View::Bar {
                bar,
                counted,
                drawing,
            } => {
                if *counted != status.fraction.is_some() {
                    *counted = status.fraction.is_some();
                    bar.set_style(style(*counted));
                }
                // The message first: the position may draw the frame.
                bar.set_message(status.describe());
                match status.fraction {
                    Some((done, total)) => {
                        bar.set_length(total);
                        bar.set_position(done.min(total));
                    }
                    None => bar.tick(),
                }
                if !*drawing {
                    *drawing = true;
                    bar.set_draw_target(ProgressDrawTarget::stderr());
                }
            }
            View::Lines {
                target,
                label,
                started,
                every,
                last,
            } => {
                let due = match last {
                    Some((at, phase)) => *phase != status.phase || at.elapsed() >= *every,
                    None => true,
                };
                if due {
                    log::info!(
                        target: target.as_str(),
                        "{label}{:>6.1}s {}",
                        started.elapsed().as_secs_f64(),
                        status.describe()
                    );
                    *last = Some((Instant::now(), status.phase.clone()));
                }
            }
        }
    }

    fn finish(&mut self) {
        if let View::Bar { bar, .. } = self {
            *ACTIVE.lock().unwrap_or_else(|p| p.into_inner()) = None;
            // The command's result follows: leave no half-line behind.
            bar.finish_and_clear();
        }
    }
}

fn style(counted: bool) -> ProgressStyle {
    let template = if counted {
        "{prefix} [{bar:24}] {percent:>3}% {elapsed} {wide_msg}"
    } else {
        "{prefix} {spinner} {elapsed} {wide_msg}"
    };
    // The templates are constants: a failure is a bug caught by the first run.
    ProgressStyle::with_template(template)
        .expect("valid progress template")
        .progress_chars("=> ")
}
