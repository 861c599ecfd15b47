//! `flotilla-bench`: one closed-loop load against one agent endpoint, printed
//! as a JSON line (ops/s, latency percentiles in µs, errors).

use std::{net::SocketAddr, process::ExitCode, sync::Arc, time::Duration};

use anyhow::bail;
use clap::Parser;
use flotilla_benches::{
    load::{self, LoadConfig, Scenario},
    workload::{Workload, WorkloadSpec},
};

/// mimalloc, as in the gateway: the load generator shares the cores with the
/// servers it measures, and glibc's malloc and free were a fifth of its
/// instructions per call (14% fewer in all with mimalloc, RESULTS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Drives one agent endpoint (the gateway, a plugin service or `pyflyte serve
/// agent`) with realistic requests from N concurrent workers over M HTTP/2
/// connections, and prints one JSON line.
#[derive(Parser)]
#[command(
    name = "flotilla-bench",
    version,
    after_help = "Example:\n  flotilla-bench --target 127.0.0.1:8000 --scenario get --concurrency 64 --connections 4 \
--duration 10s"
)]
struct Cli {
    /// The agent endpoint (a 127.0.0.0/8 address).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8000")]
    target: SocketAddr,
    /// The operation.
    #[arg(long, value_enum, default_value_t = Scenario::Get)]
    scenario: Scenario,
    /// Concurrent workers, each with one call in flight.
    #[arg(long, short = 'c', default_value_t = 16)]
    concurrency: usize,
    /// HTTP/2 connections shared by the workers.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Length of the measured window.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    duration: Duration,
    /// Record this many operations instead of running for --duration (capped at 10× --duration).
    #[arg(long)]
    count: Option<u64>,
    /// Unrecorded time before the window.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    warmup: Duration,
    /// Deadline of each call.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    call_timeout: Duration,
    /// Task type of the async agent.
    #[arg(long, default_value = "echo")]
    task_type: String,
    /// Task type of the sync agent.
    #[arg(long, default_value = "echo_sync")]
    sync_task_type: String,
    /// Adds a string input of this many bytes (e.g. 65536).
    #[arg(long, default_value_t = 0)]
    payload_bytes: usize,
    /// Runtime threads of the load generator itself. One (the default) keeps
    /// its CPU per call lowest, leaving the most to the servers it measures.
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    client_threads: u16,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(clean) if clean => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("flotilla-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<bool> {
    if !cli.target.ip().is_loopback() {
        bail!(
            "--target {} is not a loopback address: the bench only sends traffic to 127.0.0.0/8",
            cli.target
        );
    }
    let workload = Arc::new(Workload::new(WorkloadSpec {
        task_type: cli.task_type,
        sync_task_type: cli.sync_task_type,
        payload_bytes: cli.payload_bytes,
    }));
    let config = LoadConfig {
        scenario: cli.scenario,
        concurrency: cli.concurrency,
        connections: cli.connections,
        warmup: cli.warmup,
        duration: cli.duration,
        count: cli.count,
        call_timeout: cli.call_timeout,
    };
    let runtime = load::runtime(cli.client_threads.into())?;
    let report = runtime.block_on(load::run(cli.target, workload, &config, &mut ()))?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(report.errors == 0 && report.warmup_errors == 0 && report.ops > 0)
}
