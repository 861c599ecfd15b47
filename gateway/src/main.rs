//! `flotilla-gateway`: flags, configuration, logging and signals around [`flotilla_gateway::run`].

use std::process::ExitCode;

use clap::Parser;
use flotilla_gateway::Config;
use flotilla_telemetry::{CommonArgs, config::process_env};

/// mimalloc rather than glibc's malloc: the gateway allocates and frees a
/// couple of dozen blocks per forwarded call, in batches of as many calls as
/// are in flight, which overflow glibc's small per-thread caches (its malloc
/// and free were 14% of the gateway's instructions per call). Measured: 6%
/// less gateway CPU per GetTask at c=64, the same peak RSS under that load
/// (with `no_thp`, see the workspace Cargo.toml), a higher one with 64 KiB
/// requests (benches/RESULTS.md). The plugin services keep glibc's: they wait
/// on external APIs, and there memory per service counts more than CPU per call.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The Flotilla routing gateway: one gRPC endpoint serving Flyte's agent
/// services, routing each task type to the plugin service that runs it.
#[derive(Parser)]
#[command(
    name = "flotilla-gateway",
    version,
    after_help = format!(
        "Point propeller's agent-service (or connector-service) defaultAgent.endpoint at this \
gateway's --listen address.\n\n{}\n\nExamples:\n  flotilla-gateway --config gateway.toml\n  \
FLOTILLA_PLUGINS='echo=static://127.0.0.1:8001' flotilla-gateway --listen 127.0.0.1:8000\n  \
flotilla-gateway --config gateway.toml --check-config",
        flotilla_gateway::config::ENV_HELP
    )
)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> ExitCode {
    let cli: Cli = flotilla_telemetry::args::parse();
    flotilla_telemetry::init_tracing(cli.common.log_format, &cli.common.log);
    let config = match Config::load(&cli.common, &process_env) {
        Ok(c) => c,
        Err(e) => {
            flotilla_telemetry::errln!("flotilla-gateway: {e}");
            return ExitCode::from(flotilla_sdk::EXIT_CONFIG);
        }
    };
    if cli.common.check_config {
        flotilla_telemetry::out!("flotilla-gateway: configuration is valid\n{config}");
        if config.plugins.is_empty() {
            flotilla_telemetry::errln!(
                "flotilla-gateway: note: no plugin services are configured ([[plugins]] or FLOTILLA_PLUGINS): \
                 every task type would answer NOT_FOUND"
            );
        }
        return ExitCode::SUCCESS;
    }
    if config.plugins.is_empty() {
        tracing::warn!("No plugin services are configured: every task type will answer NOT_FOUND");
    }
    let (listen, admin_listen) = (config.listen, config.admin_listen);
    flotilla_sdk::run_process(
        "flotilla-gateway",
        &cli.common,
        listen,
        admin_listen,
        |grpc, admin, shutdown| flotilla_gateway::run(config, grpc, admin, shutdown),
    )
}
