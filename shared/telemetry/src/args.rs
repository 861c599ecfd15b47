//! Command-line flags that every server binary takes, so `--help` reads the same everywhere.

use std::{
    ffi::{OsStr, OsString},
    net::SocketAddr,
    path::PathBuf,
};

use clap::error::{ContextKind, ContextValue, ErrorKind};

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Flags shared by `flotilla-gateway` and every `flotilla-<plugin>` binary.
#[derive(Clone, Debug, clap::Args)]
pub struct CommonArgs {
    /// TOML configuration file. `FLOTILLA_*` environment variables override it,
    /// and the flags below override both.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// gRPC listen address: IP:PORT (0.0.0.0:8000), :PORT or HOST:PORT; port 0 picks a free port.
    #[arg(long, value_name = "ADDR", value_parser = crate::config::parse_listen_addr)]
    pub listen: Option<SocketAddr>,

    /// Admin HTTP listen address serving /metrics, /livez and /readyz (same forms as --listen).
    #[arg(long, value_name = "ADDR", value_parser = crate::config::parse_listen_addr)]
    pub admin_listen: Option<SocketAddr>,

    /// Validate the configuration, print it, and exit (0 when valid, 64 when not).
    #[arg(long)]
    pub check_config: bool,

    /// Log filter, in RUST_LOG syntax.
    #[arg(long, value_name = "FILTER", default_value = "info", env = "RUST_LOG", value_parser = crate::parse_log_filter)]
    pub log: String,

    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Worker threads of the async runtime (default: one per CPU). One thread
    /// costs the least CPU per call when the process has about one core to itself.
    #[arg(long, value_name = "N", env = "FLOTILLA_THREADS")]
    pub threads: Option<std::num::NonZeroUsize>,
}

impl CommonArgs {
    /// The async runtime these flags ask for.
    ///
    /// # Errors
    /// When the runtime cannot start (no threads can be spawned).
    pub fn runtime(&self) -> std::io::Result<tokio::runtime::Runtime> {
        crate::settle_allocator();
        // One thread: the current-thread scheduler, which runs tasks and
        // waits for I/O on the thread that calls `block_on`, with no worker
        // to hand work to or wake. (Measured against a one-worker
        // multi-thread runtime: 2-3% less CPU and latency per call at c=1.)
        if self.threads.is_some_and(|n| n.get() == 1) {
            return tokio::runtime::Builder::new_current_thread().enable_all().build();
        }
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if let Some(n) = self.threads {
            builder.worker_threads(n.get());
        }
        builder.enable_all().build()
    }
}

/// Parses this process's command line for `command` and exits on an error, as
/// clap's `get_matches` does; when the rejected value came from an environment
/// variable and not from the command line, the error says which variable, where
/// clap would name only the flag.
#[must_use]
pub fn get_matches(command: clap::Command) -> clap::ArgMatches {
    match try_get_matches_from(command, std::env::args_os()) {
        Ok(matches) => matches,
        Err(e) => e.exit(),
    }
}

/// `C::parse()`, with [`get_matches`]'s tip for a refused value that came
/// from an environment variable.
#[must_use]
pub fn parse<C: clap::Parser>() -> C {
    let matches = get_matches(C::command());
    C::from_arg_matches(&matches).unwrap_or_else(|e| e.format(&mut C::command()).exit())
}

/// [`get_matches`] with the arguments given (the first is the program name) and
/// without exiting.
///
/// # Errors
/// clap's error for these arguments, with a tip naming the environment
/// variable when an invalid value came from one.
pub fn try_get_matches_from(
    mut command: clap::Command,
    args: impl IntoIterator<Item = impl Into<OsString>>,
) -> Result<clap::ArgMatches, clap::Error> {
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    command.build();
    command.clone().try_get_matches_from(&args).map_err(|mut e| {
        if let Some(var) = env_source(&e, &command, &args, &|name| std::env::var_os(name)) {
            let tip = format!("the value came from the environment variable {var}");
            e.insert(ContextKind::Suggested, ContextValue::StyledStrs(vec![tip.into()]));
        }
        e
    })
}

/// The environment variable that supplied the value `e` rejects, if one did.
fn env_source(
    e: &clap::Error,
    command: &clap::Command,
    args: &[OsString],
    env: &dyn Fn(&OsStr) -> Option<OsString>,
) -> Option<String> {
    if !matches!(e.kind(), ErrorKind::InvalidValue | ErrorKind::ValueValidation) {
        return None;
    }
    let (Some(ContextValue::String(flag)), Some(ContextValue::String(value))) =
        (e.get(ContextKind::InvalidArg), e.get(ContextKind::InvalidValue))
    else {
        return None;
    };
    let arg = all_args(command).find(|a| a.to_string() == *flag)?;
    let var = arg.get_env()?;
    let long = format!("--{}", arg.get_long()?);
    let on_command_line = args.iter().skip(1).any(|a| {
        a.to_str()
            .is_some_and(|a| a == long || a.strip_prefix(long.as_str()).is_some_and(|r| r.starts_with('=')))
    });
    (!on_command_line && env(var).is_some_and(|v| v.to_str() == Some(value.as_str())))
        .then(|| var.to_string_lossy().into_owned())
}

/// Every argument of `command` and of its subcommands, depth first.
fn all_args(command: &clap::Command) -> Box<dyn Iterator<Item = &clap::Arg> + '_> {
    Box::new(command.get_arguments().chain(command.get_subcommands().flat_map(all_args)))
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;
    use tokio::runtime::RuntimeFlavor;

    use std::ffi::{OsStr, OsString};

    use super::{CommonArgs, env_source};

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        common: CommonArgs,
    }

    fn flavor(args: &[&str]) -> (RuntimeFlavor, usize) {
        let cli =
            Cli::try_parse_from(std::iter::once("server").chain(args.iter().copied())).expect("valid flags");
        let runtime = cli.common.runtime().expect("a runtime");
        let handle = runtime.handle();
        (handle.runtime_flavor(), handle.metrics().num_workers())
    }

    #[test]
    fn one_thread_is_the_current_thread_scheduler_and_more_are_workers() {
        assert_eq!(flavor(&["--threads", "1"]), (RuntimeFlavor::CurrentThread, 1));
        assert_eq!(flavor(&["--threads", "3"]), (RuntimeFlavor::MultiThread, 3));
        assert!(Cli::try_parse_from(["server", "--threads", "0"]).is_err(), "zero threads is refused");
    }

    /// What `env_source` says about the error clap gives for `parsed` when the
    /// user typed `typed` with `env` set (clap reads the process's own
    /// environment, so the error is made from arguments that carry the value).
    fn source(typed: &[&str], parsed: &[&str], env: &[(&str, &str)]) -> Option<String> {
        use clap::Args as _;
        let mut command =
            CommonArgs::augment_args(clap::Command::new("server")).subcommand(clap::Command::new("sub").arg(
                clap::arg!(--count <N> "a number").env("SUB_COUNT").value_parser(clap::value_parser!(u32)),
            ));
        command.build();
        let args = |a: &[&str]| -> Vec<OsString> {
            std::iter::once("server").chain(a.iter().copied()).map(Into::into).collect()
        };
        let e = command.clone().try_get_matches_from(args(parsed)).expect_err("invalid");
        let lookup = |name: &OsStr| env.iter().find(|(k, _)| name == *k).map(|(_, v)| OsString::from(v));
        env_source(&e, &command, &args(typed), &lookup)
    }

    #[test]
    fn an_invalid_value_from_the_environment_names_the_variable() {
        let env = [("FLOTILLA_THREADS", "abc")];
        assert_eq!(source(&[], &["--threads=abc"], &env).as_deref(), Some("FLOTILLA_THREADS"));
        let env = [("SUB_COUNT", "-1")];
        assert_eq!(source(&["sub"], &["sub", "--count=-1"], &env).as_deref(), Some("SUB_COUNT"));
    }

    #[test]
    fn an_invalid_value_on_the_command_line_does_not_blame_the_environment() {
        let env = [("FLOTILLA_THREADS", "abc")];
        for typed in [&["--threads", "abc"][..], &["--threads=abc"]] {
            assert_eq!(source(typed, typed, &env), None, "{typed:?}");
        }
        // The variable holds another value than the one refused.
        assert_eq!(source(&[], &["--threads=abc"], &[("FLOTILLA_THREADS", "2")]), None);
        // Another kind of error.
        assert_eq!(source(&["--no-such-flag"], &["--no-such-flag"], &env), None);
    }
}
