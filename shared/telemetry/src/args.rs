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

    /// gRPC listen address (for example 0.0.0.0:8000; port 0 picks a free port).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// Admin HTTP listen address serving /metrics, /livez and /readyz (port 0 picks a free port).
    #[arg(long, value_name = "ADDR")]
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
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if let Some(n) = self.threads {
            builder.worker_threads(n.get());
        }
        builder.enable_all().build()
    }
}
