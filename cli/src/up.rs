//! `flotilla up`: the gateway and every built-in plugin service in one
//! process, wired by static discovery over loopback, until Ctrl-C.

use std::{net::SocketAddr, process::ExitCode, time::Instant};

use anyhow::Context as _;
use flotilla_gateway::{
    Config, Gateway,
    config::{GatewayConfig, PluginConfig},
};
use flotilla_sdk::ServeOptions;
use flotilla_telemetry::{LogFormat, Shutdown, config::parse_listen_addr};

#[derive(clap::Args)]
pub(crate) struct UpArgs {
    /// Gateway gRPC address (point propeller here): IP:PORT, :PORT (every
    /// interface) or HOST:PORT.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8000", value_parser = parse_listen_addr)]
    pub(crate) listen: SocketAddr,
    /// Gateway admin HTTP address (/metrics, /livez, /readyz), in the same
    /// forms; port 0 picks a free one.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9090", value_parser = parse_listen_addr)]
    pub(crate) admin_listen: SocketAddr,
    /// Log filter, in RUST_LOG syntax.
    #[arg(long, value_name = "FILTER", default_value = "warn", env = "RUST_LOG", value_parser = flotilla_telemetry::parse_log_filter)]
    log: String,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Serve the gateway over TLS with this certificate chain (PEM), for a
    /// propeller set to `insecure: false`; needs --tls-key-file.
    #[arg(long, value_name = "FILE", env = "FLOTILLA_TLS_CERT_FILE", requires = "tls_key_file")]
    tls_cert_file: Option<std::path::PathBuf>,
    /// The private key (PEM) of --tls-cert-file.
    #[arg(long, value_name = "FILE", env = "FLOTILLA_TLS_KEY_FILE", requires = "tls_cert_file")]
    tls_key_file: Option<std::path::PathBuf>,
}

/// Loopback with a free port, for the plugin services.
const ANY_LOOPBACK: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

pub(crate) async fn run(args: UpArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    // Before anything starts, as for every other invalid configuration.
    if let Some(why) = flotilla_sdk::one_address_for_both(args.listen, args.admin_listen) {
        flotilla_telemetry::errln!("flotilla: invalid configuration: {why}");
        return Ok(ExitCode::from(flotilla_sdk::EXIT_CONFIG));
    }
    flotilla_telemetry::init_tracing(args.log_format, &args.log);
    // The gateway's and the services' settings from the same FLOTILLA_* variables that
    // flotilla-gateway and flotilla-<plugin> read (limits, timeouts, grace, accepted tokens); the
    // listeners and the plugin list are up's own. An invalid configuration exits 64 (EX_USAGE), as
    // flotilla-gateway's does, before anything starts.
    let invalid = |what: &str, e: &dyn std::fmt::Display| {
        flotilla_telemetry::errln!("flotilla: {what}: invalid configuration: {e}");
        Ok(ExitCode::from(flotilla_sdk::EXIT_CONFIG))
    };
    let mut problems = Vec::new();
    let mut gateway_settings = GatewayConfig::default();
    gateway_settings.settings_from_env(&flotilla_telemetry::config::process_env, &mut problems);
    if !problems.is_empty() {
        return invalid("environment", &problems.join("; "));
    }
    // The services read the same two variables as the gateway: read once, used alike (the
    // gateway's validation below holds the request limit to its minimum for both).
    let config = flotilla_sdk::ServiceConfig {
        max_request_bytes: gateway_settings.max_request_bytes,
        shutdown_grace: gateway_settings.shutdown_grace,
        ..flotilla_sdk::ServiceConfig::default()
    };
    let shutdown = Shutdown::new();
    // Ctrl-C and SIGTERM stop the fleet from here on, during start-up too.
    let signalled = flotilla_telemetry::signal();
    let trigger = shutdown.clone();
    // The fleet's grace: FLOTILLA_SHUTDOWN_GRACE sets the gateway's and each service's alike.
    let grace = flotilla_telemetry::config::HumanDuration(gateway_settings.shutdown_grace.0);
    tokio::spawn(async move {
        signalled.await;
        flotilla_telemetry::errln!(
            "flotilla: stopping: finishing in-flight calls for up to {grace} (a second Ctrl-C or SIGTERM stops now)"
        );
        trigger.trigger();
    });

    // The cloud services read their settings and credentials from the environment (FLOTILLA_<PLUGIN>_*,
    // GOOGLE_APPLICATION_CREDENTIALS, ...); without credentials they still serve and say so at create.
    let tls =
        match flotilla_sdk::tls::from_config(args.tls_cert_file.as_deref(), args.tls_key_file.as_deref()) {
            Ok(tls) => tls,
            Err(e) => return invalid("gateway", &e),
        };
    let bigquery = match flotilla_bigquery::BigQuery::from_config(&config) {
        Ok(p) => p,
        Err(e) => return invalid("bigquery", &e),
    };
    let databricks = match flotilla_databricks::Databricks::from_config(&config) {
        Ok(p) => p,
        Err(e) => return invalid("databricks", &e),
    };
    let snowflake = match flotilla_snowflake::Snowflake::from_config(&config) {
        Ok(p) => p,
        Err(e) => return invalid("snowflake", &e),
    };
    let options = config.serve_options();
    // Every listener is bound before the gateway's configuration is checked, and nothing is served
    // before it passes.
    let (echo, bigquery_at, databricks_at, snowflake_at) =
        (bind("echo").await?, bind("bigquery").await?, bind("databricks").await?, bind("snowflake").await?);
    let (grpc, admin) =
        flotilla_sdk::bind_pair(args.listen, args.admin_listen).await.map_err(anyhow::Error::msg)?;
    let gateway_addr = grpc.local_addr()?;
    let gateway_admin_addr = admin.local_addr()?;
    let raw = GatewayConfig {
        listen: gateway_addr,
        admin_listen: gateway_admin_addr,
        plugins: [&echo, &bigquery_at, &databricks_at, &snowflake_at]
            .iter()
            .map(|s| PluginConfig {
                name: s.name.to_owned(),
                discovery: format!("static://{}", s.grpc_addr),
                nameserver: None,
                timeout: None,
                timeouts: Default::default(),
                categories: Vec::new(),
            })
            .collect(),
        ..gateway_settings
    };
    let mut config = match Config::validate(raw, Vec::new()) {
        Ok(config) => config,
        // An unreadable FLOTILLA_AUTH_TOKEN_FILE, say.
        Err(problems) => return invalid("gateway", &problems.join("; ")),
    };
    // The plugin services first, so the gateway learns their routes on its first poll.
    let services = vec![
        echo.serve(flotilla_echo::Echo::default(), &options, &shutdown),
        bigquery_at.serve(bigquery, &options, &shutdown),
        databricks_at.serve(databricks, &options, &shutdown),
        snowflake_at.serve(snowflake, &options, &shutdown),
    ];
    // Loaded above, before anything started.
    config.tls = tls;
    let over = match (config.tls.is_some(), config.auth.is_some()) {
        (true, true) => " over TLS (insecure: false), with bearer-token auth",
        (true, false) => " over TLS (insecure: false)",
        (false, true) => " with bearer-token auth",
        (false, false) => "",
    };
    let gateway = Gateway::start(config).await.context("starting the gateway")?;

    flotilla_telemetry::outln!("{:<10} grpc={gateway_addr}  admin={gateway_admin_addr}", "gateway");
    for s in &services {
        flotilla_telemetry::outln!("{:<10} grpc={}  admin={}", s.name, s.grpc, s.admin);
    }
    let ms = started.elapsed().as_millis();
    let at = format!("{gateway_addr}{over}");
    flotilla_telemetry::outln!(
        "flotilla is up: point propeller's agent-service at {at} (Ctrl-C to stop; started in {ms} ms)"
    );

    let served = gateway.serve(grpc, admin, shutdown.clone()).await;
    shutdown.trigger();
    let mut results = Vec::new();
    for s in services {
        let result = s.task.await.with_context(|| format!("the {} service task failed", s.name))?;
        results.push((s.name, result));
    }
    served.context("the gateway failed")?;
    for (name, result) in results {
        result.with_context(|| format!("the {name} service failed"))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// A built-in plugin service running in this process.
struct Service {
    name: &'static str,
    grpc: SocketAddr,
    admin: SocketAddr,
    task: tokio::task::JoinHandle<Result<(), flotilla_sdk::ServeError>>,
}

/// A built-in plugin service's listeners, bound on loopback (free ports) but not served yet.
struct Bound {
    name: &'static str,
    grpc: tokio::net::TcpListener,
    admin: tokio::net::TcpListener,
    grpc_addr: SocketAddr,
    admin_addr: SocketAddr,
}

async fn bind(name: &'static str) -> anyhow::Result<Bound> {
    let (grpc, admin) =
        flotilla_sdk::bind_pair(ANY_LOOPBACK, ANY_LOOPBACK).await.map_err(anyhow::Error::msg)?;
    let (grpc_addr, admin_addr) = (grpc.local_addr()?, admin.local_addr()?);
    Ok(Bound { name, grpc, admin, grpc_addr, admin_addr })
}

impl Bound {
    /// Serves `plugin` on these listeners until `shutdown`.
    fn serve<P: flotilla_sdk::Plugin>(
        self,
        plugin: P,
        options: &ServeOptions,
        shutdown: &Shutdown,
    ) -> Service {
        let Bound { name, grpc, admin, grpc_addr, admin_addr } = self;
        let task = tokio::spawn(flotilla_sdk::serve(plugin, grpc, admin, options.clone(), shutdown.clone()));
        Service { name, grpc: grpc_addr, admin: admin_addr, task }
    }
}
