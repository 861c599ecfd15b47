//! Command-line flags that every server binary takes, so `--help` reads the same everywhere.

use std::{net::SocketAddr, path::PathBuf};

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
    #[arg(long, value_name = "FILTER", default_value = "info", env = "RUST_LOG")]
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

#[cfg(test)]
mod tests {
    use clap::Parser as _;
    use tokio::runtime::RuntimeFlavor;

    use super::CommonArgs;

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
}
