//! `flotilla`: the operator's CLI. `flotilla up` runs a whole local fleet in
//! one process; the other subcommands talk to a running gateway.

mod literals;
mod task;
mod up;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

/// Flotilla: Flyte's agent (connector) services as a fleet of plugin services
/// behind one routing gateway.
#[derive(Parser)]
#[command(
    name = "flotilla",
    version,
    propagate_version = true,
    after_help = "Exit status: 0 done; 1 an error (gateway unreachable, call refused, bad task file); \
2 a bad command line; 3 the task ended FAILED, ABORTED or RETRYABLE_FAILED; 64 (up) an invalid \
configuration; 130 or 143 (up) stopped by a second Ctrl-C or SIGTERM before in-flight calls finished."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a whole local fleet in one process until Ctrl-C: the gateway and
    /// every built-in plugin service, each on its own loopback port.
    #[command(
        after_help = "Examples:\n  flotilla up\n  flotilla up --listen 127.0.0.1:8080 --admin-listen 127.0.0.1:0"
    )]
    Up(up::UpArgs),

    /// List the agents (and task types) the gateway routes.
    #[command(after_help = "Example:\n  flotilla agents --gateway 127.0.0.1:8000")]
    Agents {
        #[command(flatten)]
        target: Target,
    },

    /// Start a task described in a JSON or YAML file and print its handle
    /// (sync task types run at once and print their outputs).
    #[command(after_help = "The file names the task type, its inputs and template options:\n\n  \
type: echo            # task type (TaskTemplate.type)\n  version: 0            # task type version\n  \
custom:               # TaskTemplate.custom\n    duration_ms: 2000\n  inputs:               # name: value (numbers, strings, booleans, lists, maps; null for None)\n    \
x: 42\n    greeting: hello\n\nAlso: `config` (TaskTemplate.config, string to string: Snowflake's connection), `sql` \
(TaskTemplate.sql.statement, for query task types) and `output_prefix` (default file:///tmp/flotilla/outputs).\n\nExamples:\n  flotilla create examples/echo-task.yaml\n  flotilla create examples/echo-task.yaml --wait")]
    Create {
        /// Task file (.json, .yaml or .yml; - for standard input, read as YAML).
        file: PathBuf,
        /// Poll until the task ends and print its outputs.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        target: Target,
    },

    /// Print a task's phase, message, log links and outputs.
    #[command(after_help = "Examples:\n  flotilla get echo:0:eyJ2IjoxLC4uLn0=\n  \
flotilla create big-task.yaml > handle.txt && flotilla get - < handle.txt")]
    Get {
        /// The handle `flotilla create` printed (TYPE:VERSION:BASE64_RESOURCE_META), or - to
        /// read it (or create's whole output, from its `created ...` line) from standard input.
        handle: String,
        #[command(flatten)]
        target: Target,
    },

    /// Cancel a task.
    #[command(
        after_help = "Examples:\n  flotilla delete echo:0:eyJ2IjoxLC4uLn0=\n  flotilla delete - < handle.txt"
    )]
    Delete {
        /// The handle `flotilla create` printed, or - to read it from standard input.
        handle: String,
        #[command(flatten)]
        target: Target,
    },
}

/// Which gateway to talk to.
#[derive(clap::Args, Clone)]
struct Target {
    /// Gateway gRPC address: HOST:PORT, the host a name (a Kubernetes
    /// Service's, say) or an IP address ([::1]:8000 for IPv6).
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:8000", env = "FLOTILLA_GATEWAY", value_parser = parse_gateway)]
    gateway: String,
    /// Give up on each call after this many seconds (2.5 and 2.5s alike); sent
    /// as the call's deadline, so the gateway and the plugin stop too.
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = parse_seconds, allow_negative_numbers = true)]
    timeout: f64,
    /// Bearer token for a gateway that requires one (its `auth_token_file`);
    /// sent as `authorization: Bearer <token>`.
    #[arg(long, value_name = "TOKEN", env = "FLOTILLA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Talk to a gateway that serves TLS (its `tls_cert_file`), verifying its
    /// certificate against the system's trusted roots.
    #[arg(long, env = "FLOTILLA_TLS", value_parser = clap::builder::BoolishValueParser::new())]
    tls: bool,
    /// Trust this CA certificate (PEM) for the gateway's TLS certificate,
    /// instead of the system's roots; implies --tls.
    #[arg(long, value_name = "FILE", env = "FLOTILLA_TLS_CA")]
    tls_ca: Option<std::path::PathBuf>,
    /// The name the gateway's certificate must carry (default: the --gateway
    /// host); implies --tls.
    #[arg(long, value_name = "NAME", value_parser = clap::builder::NonEmptyStringValueParser::new())]
    tls_server_name: Option<String>,
    /// What to print: text for people, or json for scripts (one JSON document
    /// on standard output; errors stay text on standard error).
    #[arg(long, short = 'o', value_enum, value_name = "FORMAT", default_value_t = task::Output::Text)]
    output: task::Output,
}

/// The longest --timeout: a day.
const MAX_TIMEOUT_SECONDS: f64 = 86_400.0;

/// Seconds, as a number (`2.5`) or with the unit (`2.5s`), positive and at most a day.
fn parse_seconds(text: &str) -> Result<f64, String> {
    let number = text.trim().strip_suffix('s').unwrap_or(text.trim());
    match number.parse::<f64>() {
        Ok(s) if s > 0.0 && s <= MAX_TIMEOUT_SECONDS => Ok(s),
        Ok(s) if s > MAX_TIMEOUT_SECONDS => Err(format!("at most {MAX_TIMEOUT_SECONDS} seconds (a day)")),
        _ => Err("expected a positive number of seconds, e.g. 10 or 2.5".to_owned()),
    }
}

/// `HOST:PORT`, checked here so that a typo is named before any connection is tried.
fn parse_gateway(text: &str) -> Result<String, String> {
    let (host, port) = text.rsplit_once(':').ok_or("expected HOST:PORT, as in 127.0.0.1:8000")?;
    port.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{port:?} is not a port (1-65535)"))?;
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
    let valid = match bare {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => host.parse::<std::net::Ipv4Addr>().is_ok() || flotilla_gateway::config::dns_name(host),
    };
    if !valid {
        return Err(format!("{host:?} is not a host name or IP address (IPv6 goes in brackets: [::1]:8000)"));
    }
    Ok(text.to_owned())
}

fn main() -> ExitCode {
    let cli: Cli = flotilla_telemetry::args::parse();
    flotilla_telemetry::settle_allocator();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            flotilla_telemetry::errln!("flotilla: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Up(args) => up::run(args).await,
            Command::Agents { target } => task::agents(&target).await,
            Command::Create { file, wait, target } => task::create(&target, &file, wait).await,
            Command::Get { handle, target } => task::get(&target, &handle).await,
            Command::Delete { handle, target } => task::delete(&target, &handle).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            flotilla_telemetry::errln!("flotilla: {}", chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each said once: transport errors
/// repeat their cause's words ("tcp connect error: tcp connect error: ...").
fn chain(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::{Cli, Command, chain, parse_gateway};

    #[test]
    fn timeouts_are_positive_seconds_with_or_without_the_unit() {
        let timeout = |t: &str| {
            Cli::try_parse_from(["flotilla", "agents", "--timeout", t]).map(|c| match c.command {
                Command::Agents { target } => target.timeout,
                _ => unreachable!(),
            })
        };
        assert_eq!(timeout("2.5").unwrap(), 2.5);
        assert_eq!(timeout("5s").unwrap(), 5.0);
        for (bad, says) in [("-1", "positive"), ("0", "positive"), ("abc", "e.g. 10"), ("1e30", "at most")] {
            let e = timeout(bad).unwrap_err().to_string();
            assert!(e.contains("--timeout") && e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn an_error_chain_says_each_cause_once() {
        let e = anyhow::anyhow!("root")
            .context("tcp connect error")
            .context("tcp connect error")
            .context("cannot reach");
        assert_eq!(chain(&e), "cannot reach: tcp connect error: root");
    }

    #[test]
    fn up_takes_the_listen_forms_the_servers_take() {
        let cli =
            Cli::try_parse_from(["flotilla", "up", "--listen", ":18000", "--admin-listen", "localhost:0"])
                .expect("valid forms");
        let Command::Up(up) = cli.command else { panic!("not up") };
        assert_eq!(up.listen.to_string(), "0.0.0.0:18000");
        assert!(up.admin_listen.ip().is_loopback(), "{}", up.admin_listen);
        let e = Cli::try_parse_from(["flotilla", "up", "--listen", "nowhere"]).err().expect("refused");
        assert!(e.to_string().contains("--listen"), "{e}");
    }

    #[test]
    fn gateway_addresses_are_host_and_port() {
        for ok in ["127.0.0.1:8000", "flotilla-gateway.flyte:8000", "localhost:1", "[::1]:8000"] {
            assert_eq!(parse_gateway(ok).as_deref(), Ok(ok));
        }
        for (bad, says) in [
            ("127.0.0.1", "HOST:PORT"),
            ("gateway:http", "not a port"),
            ("gateway:0", "not a port"),
            (":8000", "not a host name"),
            ("bad name:8000", "not a host name"),
            ("::1:8000", "not a host name"),
        ] {
            let e = parse_gateway(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
