//! How `uffdkit` ends: exit statuses, and an error as one `error:` line and its causes.
//!
//! | status | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | the command failed (a file, a peer, the kernel said no) |
//! | 2 | a usage error: a bad option or combination (nothing was attempted) |
//! | 128 + N | stopped by signal N after cleaning up (`fc-handler`: 130 SIGINT, 143 SIGTERM) |

use std::fmt;
use std::process::ExitCode;

/// The text of `--help`'s closing section: the exit statuses and the output flags.
pub const HELP: &str = "\
Exit status: 0 success; 1 the command failed; 2 usage error (bad option, nothing was \
attempted); 128+N stopped by signal N after cleaning up (fc-handler).

Errors print as `error: …` with their causes, without a backtrace (even with \
RUST_BACKTRACE set) unless -v or UFFDKIT_BACKTRACE=1 asks. -v/-vv log debug/trace, \
-q/-qq only warnings/errors (and no progress); UFFDKIT_LOG=warn,pager=debug picks levels \
per crate.";

/// The environment variable that asks for error backtraces.
pub const BACKTRACE_ENV: &str = "UFFDKIT_BACKTRACE";

/// Exit status of a failed command.
pub const FAILURE: u8 = 1;
/// Exit status of a usage error.
pub const USAGE: u8 = 2;

/// A command line that cannot work, found after parsing (exit status 2).
#[derive(Debug)]
pub struct Usage(pub String);

impl fmt::Display for Usage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// A usage error as an `anyhow::Error`.
pub fn usage(message: impl Into<String>) -> anyhow::Error {
    Usage(message.into()).into()
}

/// Whether errors should carry and print a backtrace: `-v`, or `UFFDKIT_BACKTRACE` set
/// to anything but `0`. Decided once, before any error exists: `anyhow` captures a
/// backtrace per error when `RUST_LIB_BACKTRACE` (else `RUST_BACKTRACE`) says so, so
/// this sets `RUST_LIB_BACKTRACE` to match, overriding a `RUST_BACKTRACE` left in the
/// environment for other programs. Call before any thread is started.
pub fn decide_backtraces(verbose: u8) -> bool {
    let wanted = verbose > 0 || std::env::var(BACKTRACE_ENV).is_ok_and(|v| v != "0");
    std::env::set_var("RUST_LIB_BACKTRACE", if wanted { "1" } else { "0" });
    wanted
}

/// The lines an error prints as: `error: …`, then each cause not already said by the
/// line before it (libraries often repeat their source's text in their own message).
pub fn lines(err: &anyhow::Error) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut previous = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if text.is_empty() || previous.contains(&text) {
            continue;
        }
        out.push(if out.is_empty() {
            format!("error: {text}")
        } else {
            format!("  caused by: {text}")
        });
        previous = text;
    }
    out
}

/// Prints `err` to stderr (with its backtrace if `backtrace`) and returns the exit
/// status for it.
pub fn report(err: &anyhow::Error, backtrace: bool) -> ExitCode {
    crate::progress::suspend(|| {
        for line in lines(err) {
            eprintln!("{line}");
        }
        if backtrace {
            eprintln!("backtrace:\n{}", err.backtrace());
        }
    });
    ExitCode::from(status(err))
}

/// The exit status for `err`.
pub fn status(err: &anyhow::Error) -> u8 {
    if err.chain().any(|cause| cause.is::<Usage>()) {
        USAGE
    } else {
        FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn a_cause_repeating_the_line_before_is_dropped() {
        let io = std::io::Error::from_raw_os_error(libc::ENOENT);
        let text = io.to_string();
        // A library error whose message repeats its #[source].
        #[derive(Debug)]
        struct Repeats(std::io::Error);
        impl fmt::Display for Repeats {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "open image at image offset 0x0: {}", self.0)
            }
        }
        impl std::error::Error for Repeats {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let err = Err::<(), _>(Repeats(io))
            .context("serving guest memory")
            .unwrap_err();
        let lines = lines(&err);
        assert_eq!(
            lines,
            [
                "error: serving guest memory".to_string(),
                format!("  caused by: open image at image offset 0x0: {text}"),
            ]
        );
        assert_eq!(status(&err), FAILURE);
    }

    #[test]
    fn usage_errors_exit_2_even_under_context() {
        let err = Err::<(), _>(usage("--replay needs --mem-file"))
            .context("fc-handler")
            .unwrap_err();
        assert_eq!(status(&err), USAGE);
        assert_eq!(lines(&err)[1], "  caused by: --replay needs --mem-file");
    }
}
