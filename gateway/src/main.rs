//! `flotilla-gateway`: flags, configuration, logging and signals around [`flotilla_gateway::run`].

use std::process::ExitCode;

use clap::Parser;
use flotilla_gateway::Config;
use flotilla_telemetry::{CommonArgs, Shutdown, config::process_env};

/// The Flotilla routing gateway: one gRPC endpoint serving Flyte's agent
/// services, routing each task type to the plugin service that runs it.
#[derive(Parser)]
#[command(
    name = "flotilla-gateway",
    version,
    after_help = "Point propeller's agent-service (or connector-service) defaultAgent.endpoint at this \
gateway's --listen address.\n\nExamples:\n  flotilla-gateway --config gateway.toml\n  \
FLOTILLA_PLUGINS='echo=static://127.0.0.1:8001' flotilla-gateway --listen 127.0.0.1:8000\n  \
flotilla-gateway --config gateway.toml --check-config"
)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    flotilla_telemetry::init_tracing(cli.common.log_format, &cli.common.log);
    let config = match Config::load(&cli.common, &process_env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("flotilla-gateway: {e}");
            return ExitCode::from(64);
        }
    };
    if cli.common.check_config {
        print!("flotilla-gateway: configuration is valid\n{config}");
        return ExitCode::SUCCESS;
    }
    if config.plugins.is_empty() {
        tracing::warn!("No plugin services are configured: every task type will answer NOT_FOUND");
    }
    let runtime = match cli.common.runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("flotilla-gateway: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let (grpc, admin) = match flotilla_sdk::bind_pair(config.listen, config.admin_listen).await {
            Ok(pair) => pair,
            Err(e) => {
                eprintln!("flotilla-gateway: {e}");
                return ExitCode::FAILURE;
            }
        };
        let shutdown = Shutdown::new();
        let trigger = shutdown.clone();
        tokio::spawn(async move {
            flotilla_telemetry::signal().await;
            trigger.trigger();
        });
        tracing::info!(grpc = ?grpc.local_addr().ok(), admin = ?admin.local_addr().ok(), "flotilla-gateway listening");
        match flotilla_gateway::run(config, grpc, admin, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("flotilla-gateway: {}", flotilla_telemetry::error_chain(&e));
                ExitCode::FAILURE
            }
        }
    })
}
