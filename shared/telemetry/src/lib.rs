//! What every Flotilla binary (gateway, plugin services, the `flotilla` CLI)
//! shares around its gRPC listener: command-line flags common to all of them,
//! logging, the admin HTTP listener with `/metrics`, `/livez` and `/readyz`,
//! the shutdown signal, and the TOML + `FLOTILLA_*` configuration loader.

#![warn(missing_docs)]

pub mod admin;
pub mod args;
pub mod config;
pub mod shutdown;

pub use admin::{Admin, AdminServer, Readiness};
pub use args::{CommonArgs, LogFormat};
pub use shutdown::{Shutdown, signal};

/// Keeps the C allocator from handing memory back to the kernel after every
/// large call. glibc's malloc returns the top of its heap once more than its
/// trim threshold (128 KiB at start) is free there, so a call that builds a
/// few 100 KiB of buffers and frees them makes the next call fault the same
/// pages in again (seen as twice the system time with 64 KiB inputs). glibc
/// raises that threshold to twice the size of the largest mmap'd block it has
/// freed; one large zeroed allocation (never touched, so never resident),
/// dropped at start, sets it to 8 MiB. At most that much freed heap is kept.
pub fn settle_allocator() {
    let block: Vec<u8> = vec![0; 4 << 20];
    drop(std::hint::black_box(block));
}

/// Starts logging to stderr. `filter` uses `RUST_LOG` syntax (`info`, `flotilla_gateway=debug`).
///
/// Text logs are coloured only when stderr is a terminal and `NO_COLOR` is
/// unset or empty: a log file, a pipe or a container's log driver gets plain
/// text that tools can search (`admin=127.0.0.1:9090`, not escape codes).
///
/// Calling it twice is harmless: the second call is ignored (tests start several servers).
pub fn init_tracing(format: LogFormat, filter: &str) {
    use std::io::IsTerminal as _;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    // A log line that cannot be written (stderr closed or full) is dropped:
    // the default would report it with eprintln!, which panics on that same
    // stderr, in whatever task logged, shutdown's included.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .log_internal_errors(false);
    let _ = match format {
        LogFormat::Json => builder.json().with_current_span(false).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// A `--log` value checked as [`init_tracing`] will read it (RUST_LOG syntax), for
/// clap's `value_parser`: a bad filter is refused by name instead of logging at
/// another level than asked.
///
/// # Errors
/// What is wrong with the filter.
pub fn parse_log_filter(s: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::try_new(s)
        .map(|_| s.to_owned())
        .map_err(|e| format!("not a log filter ({e}); e.g. `info`, `warn,flotilla_gateway=debug`"))
}

/// An error and its `source()` chain on one line: `outer: middle: root cause`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// `println!` that never panics: when stdout is closed or full (`| head`,
/// `>/dev/full`), the line is lost, not the process.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        let _ = ::std::writeln!(::std::io::stdout(), $($arg)*);
    }};
}

/// `print!` that never panics; see [`outln!`].
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        let _ = ::std::write!(::std::io::stdout(), $($arg)*);
    }};
}

/// `eprintln!` that never panics; see [`outln!`].
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        let _ = ::std::writeln!(::std::io::stderr(), $($arg)*);
    }};
}
