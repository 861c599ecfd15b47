//! [`main`]: the whole `main()` of a `flotilla-<plugin>` binary.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{Args, FromArgMatches};
use flotilla_telemetry::{
    CommonArgs, Shutdown,
    config::{self, ConfigError, Env, HumanDuration, Listeners},
};
use serde::Deserialize;
use tokio::net::TcpListener;

use crate::{Plugin, ServeOptions, serve, tls, tls::ServerTls};

/// Environment variable overriding `max_request_bytes`.
pub const ENV_MAX_REQUEST_BYTES: &str = "FLOTILLA_MAX_REQUEST_BYTES";
/// Environment variable overriding `shutdown_grace`.
pub const ENV_SHUTDOWN_GRACE: &str = "FLOTILLA_SHUTDOWN_GRACE";

/// A plugin service's configuration file (TOML). Every key is optional.
///
/// ```toml
/// listen = "0.0.0.0:8000"
/// admin_listen = "0.0.0.0:9090"
/// max_request_bytes = 16777216
/// shutdown_grace = "30s"
/// tls_cert_file = "/etc/tls/tls.crt"   # optional, with tls_key_file: TLS instead of plaintext h2c
/// tls_key_file = "/etc/tls/tls.key"
///
/// [plugin]      # read by the plugin itself
/// base_url = "https://bigquery.googleapis.com"
/// ```
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceConfig {
    /// gRPC listen address.
    #[serde(deserialize_with = "flotilla_telemetry::config::deserialize_listen_addr")]
    pub listen: SocketAddr,
    /// Admin HTTP listen address.
    #[serde(deserialize_with = "flotilla_telemetry::config::deserialize_listen_addr")]
    pub admin_listen: SocketAddr,
    /// Largest request message accepted.
    pub max_request_bytes: usize,
    /// How long in-flight calls may take to finish after shutdown starts.
    pub shutdown_grace: HumanDuration,
    /// TLS on the gRPC listener: the certificate chain (PEM); needs `tls_key_file`.
    pub tls_cert_file: Option<PathBuf>,
    /// TLS on the gRPC listener: the certificate's private key (PEM).
    pub tls_key_file: Option<PathBuf>,
    /// The loaded certificate, when the two files are set.
    #[serde(skip)]
    pub tls: Option<ServerTls>,
    /// The plugin's own settings, from the `[plugin]` table.
    pub plugin: toml::Table,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        let serve = ServeOptions::default();
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8000)),
            admin_listen: SocketAddr::from(([0, 0, 0, 0], 9090)),
            max_request_bytes: serve.max_request_bytes,
            shutdown_grace: HumanDuration(serve.shutdown_grace),
            tls_cert_file: None,
            tls_key_file: None,
            tls: None,
            plugin: toml::Table::new(),
        }
    }
}

impl ServiceConfig {
    /// Loads defaults → `--config` file → `FLOTILLA_*` variables → flags, and validates.
    ///
    /// # Errors
    /// Every problem found, each naming its key or variable.
    pub fn load(flags: &CommonArgs, env: Env<'_>) -> Result<Self, ConfigError> {
        let mut c: Self = config::read_file(flags.config.as_deref())?;
        let mut problems = Vec::new();
        let mut listeners = Listeners { listen: c.listen, admin_listen: c.admin_listen };
        listeners.resolve(env, flags, &mut problems);
        (c.listen, c.admin_listen) = (listeners.listen, listeners.admin_listen);
        c.settings_from_env(env, &mut problems);
        tls::override_from_env(env, &mut c.tls_cert_file, &mut c.tls_key_file);
        match tls::from_config(c.tls_cert_file.as_deref(), c.tls_key_file.as_deref()) {
            Ok(loaded) => c.tls = loaded,
            Err(e) => problems.push(e),
        }
        if problems.is_empty() {
            Ok(c)
        } else {
            let source_name = flags
                .config
                .as_ref()
                .map_or_else(|| "defaults and environment".to_owned(), |p| p.display().to_string());
            Err(ConfigError { source_name, problems })
        }
    }

    /// Applies `FLOTILLA_MAX_REQUEST_BYTES` and `FLOTILLA_SHUTDOWN_GRACE` and
    /// checks the request limit; a bad value becomes a problem naming the
    /// variable.
    fn settings_from_env(&mut self, env: Env<'_>, problems: &mut Vec<String>) {
        config::override_from_env(env, ENV_MAX_REQUEST_BYTES, &mut self.max_request_bytes, problems);
        config::override_from_env(env, ENV_SHUTDOWN_GRACE, &mut self.shutdown_grace, problems);
        if self.max_request_bytes < 1024 {
            problems.push(format!(
                "max_request_bytes ({ENV_MAX_REQUEST_BYTES}): {} is below the minimum of 1024",
                self.max_request_bytes
            ));
        }
    }

    /// The serving options this configuration asks for.
    pub fn serve_options(&self) -> ServeOptions {
        ServeOptions {
            max_request_bytes: self.max_request_bytes,
            shutdown_grace: self.shutdown_grace.0,
            tls: self.tls.clone(),
        }
    }
}

/// Exit code for an invalid configuration (EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;

/// Runs a plugin service binary: parses the common flags (`--config`,
/// `--listen`, `--admin-listen`, `--check-config`, `--log`, `--log-format`),
/// loads the configuration, builds the plugin with `build`, and serves it
/// until SIGTERM or Ctrl-C. Exits 64 on an invalid configuration, 1 when the
/// listeners cannot be bound or the server fails.
pub fn main<P, F>(name: &'static str, about: &'static str, build: F) -> ExitCode
where
    P: Plugin,
    F: FnOnce(&ServiceConfig) -> Result<P, String>,
{
    let command =
        clap::Command::new(name).version(env!("CARGO_PKG_VERSION")).about(about).after_help(format!(
            "Serves flyteidl.service.AsyncAgentService, SyncAgentService and AgentMetadataService plus \
             grpc.health.v1 on --listen, and /metrics, /livez, /readyz on --admin-listen.\n\n\
             Environment (each over its configuration file key; flags win over both):\n  \
             FLOTILLA_LISTEN, FLOTILLA_ADMIN_LISTEN, {ENV_MAX_REQUEST_BYTES}, {ENV_SHUTDOWN_GRACE},\n  \
             {} and {} (TLS on the gRPC listener: certificate chain and key, PEM)\n\n\
             Example:\n  {name} --listen 127.0.0.1:8001 --admin-listen 127.0.0.1:9091",
            tls::ENV_TLS_CERT_FILE,
            tls::ENV_TLS_KEY_FILE,
        ));
    // The flags struct's own doc comment would otherwise replace the binary's description.
    let matches = flotilla_telemetry::args::get_matches(CommonArgs::augment_args(command).about(about));
    let flags = match CommonArgs::from_arg_matches(&matches) {
        Ok(f) => f,
        Err(e) => e.exit(),
    };
    flotilla_telemetry::init_tracing(flags.log_format, &flags.log);

    let config = match ServiceConfig::load(&flags, &config::process_env) {
        Ok(c) => c,
        Err(e) => {
            flotilla_telemetry::errln!("{name}: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let plugin = match build(&config) {
        Ok(p) => p,
        Err(e) => {
            flotilla_telemetry::errln!("{name}: invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if flags.check_config {
        flotilla_telemetry::outln!("{name}: configuration is valid");
        flotilla_telemetry::outln!("  listen = {}\n  admin_listen = {}", config.listen, config.admin_listen);
        flotilla_telemetry::outln!(
            "  max_request_bytes = {}\n  shutdown_grace = {}",
            config.max_request_bytes,
            config.shutdown_grace
        );
        match &config.tls {
            Some(tls) => flotilla_telemetry::outln!("  tls = on, {tls}"),
            None => flotilla_telemetry::outln!("  tls = off (plaintext HTTP/2)"),
        }
        for (key, value) in plugin.settings() {
            flotilla_telemetry::outln!("  {key} = {value}");
        }
        for agent in plugin.agents() {
            let kinds = agent.categories.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
            flotilla_telemetry::outln!(
                "  agent {:?} ({}): {kinds}",
                agent.name,
                if agent.is_sync { "sync" } else { "async" }
            );
        }
        return ExitCode::SUCCESS;
    }

    run_process(name, &flags, config.listen, config.admin_listen, |grpc, admin, shutdown| {
        serve(plugin, grpc, admin, config.serve_options(), shutdown)
    })
}

/// The life of a server process around `serve`: the async runtime the flags
/// ask for, both listeners bound (naming the one that cannot be), shutdown on
/// SIGTERM or Ctrl-C. Exits 0 when `serve` returns cleanly, 1 on any failure.
pub fn run_process<F, Fut, E>(
    name: &str,
    flags: &CommonArgs,
    listen: SocketAddr,
    admin_listen: SocketAddr,
    serve: F,
) -> ExitCode
where
    F: FnOnce(TcpListener, TcpListener, Shutdown) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: std::error::Error,
{
    let runtime = match flags.runtime() {
        Ok(rt) => rt,
        Err(e) => {
            flotilla_telemetry::errln!("{name}: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let (grpc, admin) = match bind_pair(listen, admin_listen).await {
            Ok(pair) => pair,
            Err(e) => {
                flotilla_telemetry::errln!("{name}: {e}");
                return ExitCode::FAILURE;
            }
        };
        // Before anything says the process is up.
        let signalled = flotilla_telemetry::signal();
        let shown = |l: &TcpListener, fallback: SocketAddr| l.local_addr().unwrap_or(fallback);
        tracing::info!(grpc = %shown(&grpc, listen), admin = %shown(&admin, admin_listen), "{name} listening");
        let shutdown = Shutdown::new();
        let trigger = shutdown.clone();
        tokio::spawn(async move {
            signalled.await;
            trigger.trigger();
        });
        match serve(grpc, admin, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                flotilla_telemetry::errln!("{name}: {}", flotilla_telemetry::error_chain(&e));
                ExitCode::FAILURE
            }
        }
    })
}

/// Why `grpc` and `admin` cannot both be listened on, when one address is
/// given for both (a fixed port: port 0 picks two).
pub fn one_address_for_both(grpc: SocketAddr, admin: SocketAddr) -> Option<String> {
    (grpc == admin && grpc.port() != 0).then(|| {
        format!(
            "the gRPC and admin HTTP listeners are both set to {grpc} (--listen and --admin-listen): give \
             each its own port"
        )
    })
}

/// Binds the gRPC and admin listeners, naming the address that failed.
///
/// # Errors
/// A message naming the listener, its address and the OS error.
pub async fn bind_pair(grpc: SocketAddr, admin: SocketAddr) -> Result<(TcpListener, TcpListener), String> {
    if let Some(why) = one_address_for_both(grpc, admin) {
        return Err(why);
    }
    let g = TcpListener::bind(grpc).await.map_err(|e| format!("cannot listen for gRPC on {grpc}: {e}"))?;
    let a = TcpListener::bind(admin)
        .await
        .map_err(|e| format!("cannot listen for admin HTTP on {admin}: {e}"))?;
    Ok((g, a))
}
