//! Starting the compared servers on loopback and timing their cold start:
//! launch → first successful `ListAgents` that lists the echo task type.
//!
//! - `flotilla-echo` and `flotilla-gateway` (the gateway's plugins given by
//!   `FLOTILLA_PLUGINS=echo=static://...`), from the same target directory as
//!   the running binary;
//! - upstream's `pyflyte serve agent --modules bench_agents`, from the venv;
//! - `flotilla up`, for its cold start only.
//!
//! Ports are picked free just before launch; a server that exits during
//! startup (its port taken meanwhile) is started again, three times at most.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use flotilla_proto::{admin, service::agent_metadata_service_client::AgentMetadataServiceClient};
use tonic::{Request, transport::Endpoint};

use crate::procs::{Spawned, free_loopback};

/// How long a server may take to answer its first ListAgents.
const STARTUP_LIMIT: Duration = Duration::from_secs(60);
/// Pause between readiness probes (connection refused returns at once).
const PROBE_INTERVAL: Duration = Duration::from_millis(1);
/// Starts of one server before giving up.
const ATTEMPTS: usize = 3;
/// The task type every target must list.
pub const ECHO: &str = "echo";

/// The Rust binaries, from one target directory.
#[derive(Clone, Debug)]
pub struct Binaries {
    /// `flotilla-gateway`.
    pub gateway: PathBuf,
    /// `flotilla-echo`.
    pub echo: PathBuf,
    /// `flotilla` (for `flotilla up`).
    pub flotilla: PathBuf,
}

impl Binaries {
    /// The binaries in `dir` (where the running `flotilla-compare` was built).
    ///
    /// # Errors
    /// Naming the missing ones and the command that builds them.
    pub fn in_dir(dir: &Path) -> anyhow::Result<Self> {
        let b = Self {
            gateway: dir.join("flotilla-gateway"),
            echo: dir.join("flotilla-echo"),
            flotilla: dir.join("flotilla"),
        };
        let missing: Vec<String> = [&b.gateway, &b.echo, &b.flotilla]
            .iter()
            .filter(|p| !p.is_file())
            .map(|p| p.display().to_string())
            .collect();
        if !missing.is_empty() {
            let profile = if dir.ends_with("release") { " --release" } else { "" };
            bail!(
                "missing {}: build them first with `cargo build{profile} --workspace --bins`",
                missing.join(", ")
            );
        }
        Ok(b)
    }
}

/// Upstream's agent server, from a venv with flytekit.
#[derive(Clone, Debug)]
pub struct Upstream {
    /// `pyflyte` in the venv.
    pub pyflyte: PathBuf,
    /// The directory holding `bench_agents.py`.
    pub agents_dir: PathBuf,
}

/// A running server.
pub struct Server {
    /// The process (killed when this is dropped).
    pub process: Spawned,
    /// Where it serves gRPC.
    pub addr: SocketAddr,
    /// From launch to its first ListAgents listing `echo`.
    pub cold_start: Duration,
    /// The command line, for the report.
    pub command: String,
}

/// Starts servers, logging each one's output to its own file under `logs`.
pub struct Launcher {
    /// The Rust binaries.
    pub bins: Binaries,
    /// Upstream, when it takes part.
    pub upstream: Option<Upstream>,
    logs: PathBuf,
    started: std::cell::Cell<usize>,
    /// The CPU list every server is confined to (`taskset -c`), when pinned.
    pin: Option<String>,
    /// Runtime threads of each Rust server (`--threads`).
    threads: usize,
}

/// One way to launch a server.
struct Recipe {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    cwd: Option<PathBuf>,
    /// The gRPC address, or None when the server prints it (`flotilla up`).
    addr: Option<SocketAddr>,
}

impl Launcher {
    /// A launcher writing logs under `logs`.
    pub fn new(bins: Binaries, upstream: Option<Upstream>, logs: PathBuf) -> Self {
        Self { bins, upstream, logs, started: std::cell::Cell::new(0), pin: None, threads: 1 }
    }

    /// Runs every Rust server started from now on with `threads` runtime
    /// threads (`--threads`; 0: the server's default, one per CPU). 1 unless
    /// set: every Flotilla server is its own service with about one core's
    /// budget (see RESULTS.md for what the count does).
    #[must_use]
    pub fn threads(mut self, threads: usize) -> Self {
        self.threads = threads;
        self
    }

    /// Confines every server started from now on to `cpus` (a `taskset -c` list,
    /// e.g. `0`): the program runs under `taskset`, which execs it in place, so
    /// the pid (and the CPU and memory read from `/proc`) is the server's own.
    #[must_use]
    pub fn pinned(mut self, cpus: Option<String>) -> Self {
        self.pin = cpus;
        self
    }

    /// `flotilla-echo` on a free loopback port.
    ///
    /// # Errors
    /// When it does not come up.
    pub async fn echo(&self, name: &str) -> anyhow::Result<Server> {
        self.launch(|| {
            let addr = free_loopback()?;
            Ok(Recipe {
                name: name.to_owned(),
                program: self.bins.echo.clone(),
                args: rust_args(addr, self.threads),
                env: Vec::new(),
                cwd: None,
                addr: Some(addr),
            })
        })
        .await
    }

    /// `flotilla-gateway` in front of the echo replicas at `plugins`.
    ///
    /// # Errors
    /// When it does not come up.
    pub async fn gateway(&self, name: &str, plugins: &[SocketAddr]) -> anyhow::Result<Server> {
        let list = plugins.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
        self.launch(|| {
            let addr = free_loopback()?;
            Ok(Recipe {
                name: name.to_owned(),
                program: self.bins.gateway.clone(),
                args: rust_args(addr, self.threads),
                env: vec![("FLOTILLA_PLUGINS".to_owned(), format!("echo=static://{list}"))],
                cwd: None,
                addr: Some(addr),
            })
        })
        .await
    }

    /// `pyflyte serve agent --modules bench_agents` on free loopback ports.
    ///
    /// # Errors
    /// When upstream is not configured or does not come up.
    pub async fn upstream(&self, name: &str) -> anyhow::Result<Server> {
        let up = self.upstream.as_ref().context("upstream (pyflyte) is not configured")?;
        self.launch(|| {
            let addr = free_loopback()?;
            let metrics = loop {
                let m = free_loopback()?;
                if m.port() != addr.port() {
                    break m;
                }
            };
            let dir = up.agents_dir.display().to_string();
            Ok(Recipe {
                name: name.to_owned(),
                program: up.pyflyte.clone(),
                args: [
                    "serve",
                    "agent",
                    "--port",
                    &addr.port().to_string(),
                    "--prometheus_port",
                    &metrics.port().to_string(),
                    "--modules",
                    "bench_agents",
                ]
                .map(str::to_owned)
                .to_vec(),
                env: vec![
                    ("PYTHONPATH".to_owned(), dir),
                    ("PYTHONUNBUFFERED".to_owned(), "1".to_owned()),
                    ("PYTHONDONTWRITEBYTECODE".to_owned(), "1".to_owned()),
                    ("NO_COLOR".to_owned(), "1".to_owned()),
                    ("COLUMNS".to_owned(), "160".to_owned()),
                ],
                cwd: Some(up.agents_dir.clone()),
                addr: Some(addr),
            })
        })
        .await
    }

    /// `flotilla up` on port 0, ready when its printed gateway address lists echo.
    ///
    /// # Errors
    /// When it does not come up.
    pub async fn flotilla_up(&self) -> anyhow::Result<Server> {
        self.launch(|| {
            Ok(Recipe {
                name: "flotilla-up".to_owned(),
                program: self.bins.flotilla.clone(),
                args: ["up", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]
                    .map(str::to_owned)
                    .to_vec(),
                env: Vec::new(),
                cwd: None,
                addr: None,
            })
        })
        .await
    }

    async fn launch(&self, recipe: impl Fn() -> anyhow::Result<Recipe>) -> anyhow::Result<Server> {
        let mut last = None;
        for _ in 0..ATTEMPTS {
            let r = recipe()?;
            let n = self.started.get() + 1;
            self.started.set(n);
            let log = self.logs.join(format!("{n:03}-{}.log", r.name));
            let (program, args) = pinned_command(self.pin.as_deref(), &r.program, &r.args);
            let launched = Instant::now();
            let mut process =
                Spawned::start(&r.name, &program, &args, &r.env, r.cwd.as_deref(), log, r.addr.is_none())?;
            let command = describe(&r);
            let addr = match r.addr {
                Some(a) => a,
                None => printed_gateway(&mut process, launched)?,
            };
            match wait_listing(&mut process, addr, launched).await {
                Ok(cold_start) => return Ok(Server { process, addr, cold_start, command }),
                Err(e) if !process.alive() => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.expect("at least one attempt ran"))
    }
}

/// A Rust server's flags; `threads` 0 leaves `--threads` out (the server's default: one per CPU).
fn rust_args(addr: SocketAddr, threads: usize) -> Vec<String> {
    let mut args: Vec<String> =
        ["--listen", &addr.to_string(), "--admin-listen", "127.0.0.1:0", "--log", "warn"]
            .map(str::to_owned)
            .to_vec();
    if threads > 0 {
        args.extend(["--threads".to_owned(), threads.to_string()]);
    }
    args
}

fn describe(r: &Recipe) -> String {
    let env: String = r.env.iter().map(|(k, v)| format!("{k}={v} ")).collect();
    let program =
        r.program.file_name().map_or_else(|| r.program.display().to_string(), |f| f.to_string_lossy().into());
    format!("{env}{program} {}", r.args.join(" "))
}

/// The command line that runs `program` with `args`, confined to `cpus` when
/// given: `taskset -c CPUS PROGRAM ARGS...` (taskset execs the program in its
/// own place, so the pid started is the program's).
pub fn pinned_command(cpus: Option<&str>, program: &Path, args: &[String]) -> (PathBuf, Vec<String>) {
    match cpus {
        Some(cpus) => {
            let mut all = vec!["-c".to_owned(), cpus.to_owned(), program.display().to_string()];
            all.extend(args.iter().cloned());
            (PathBuf::from("taskset"), all)
        }
        None => (program.to_path_buf(), args.to_vec()),
    }
}

/// Confines this process and every thread it has to `cpus` (a `taskset -c` list).
///
/// # Errors
/// When `taskset` is missing or refuses.
pub fn pin_self(cpus: &str) -> anyhow::Result<()> {
    let pid = std::process::id().to_string();
    let out = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &pid])
        .output()
        .map_err(|e| anyhow::anyhow!("running taskset to pin the load generator: {e}"))?;
    anyhow::ensure!(
        out.status.success(),
        "taskset -a -p -c {cpus} {pid} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Reads `flotilla up`'s stdout until its `gateway  grpc=ADDR  admin=ADDR` line.
fn printed_gateway(process: &mut Spawned, launched: Instant) -> anyhow::Result<SocketAddr> {
    while launched.elapsed() < STARTUP_LIMIT {
        if let Some(line) = process.next_line(Duration::from_millis(50)) {
            if let Some(rest) = line.strip_prefix("gateway")
                && let Some(addr) = rest.split_whitespace().find_map(|w| w.strip_prefix("grpc="))
            {
                return addr.parse().with_context(|| format!("flotilla up printed {line:?}"));
            }
        } else if !process.alive() {
            bail!("{} exited during startup:\n{}", process.name, process.log_tail());
        }
    }
    bail!("{} printed no gateway address within {STARTUP_LIMIT:?}", process.name)
}

/// Polls ListAgents on `addr` until it lists `echo`; the time since `launched`.
async fn wait_listing(
    process: &mut Spawned,
    addr: SocketAddr,
    launched: Instant,
) -> anyhow::Result<Duration> {
    loop {
        let last = match lists_echo(addr).await {
            Ok(true) => return Ok(launched.elapsed()),
            Ok(false) => format!("ListAgents does not list {ECHO} yet"),
            Err(e) => format!("{e:#}"),
        };
        if !process.alive() {
            bail!("{} exited during startup ({last}):\n{}", process.name, process.log_tail());
        }
        if launched.elapsed() > STARTUP_LIMIT {
            bail!(
                "{} did not list {ECHO} within {STARTUP_LIMIT:?} ({last}):\n{}",
                process.name,
                process.log_tail()
            );
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}

/// One ListAgents on a new connection: does any agent list `echo`?
///
/// # Errors
/// When the connection or the call fails.
pub async fn lists_echo(addr: SocketAddr) -> anyhow::Result<bool> {
    let timeout = Duration::from_secs(1);
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect()
        .await?;
    let mut req = Request::new(admin::ListAgentsRequest {});
    req.set_timeout(timeout);
    let agents = AgentMetadataServiceClient::new(channel).list_agents(req).await?.into_inner().agents;
    Ok(agents.iter().any(|a| a.supported_task_categories.iter().any(|c| c.name == ECHO && c.version == 0)))
}

#[cfg(test)]
mod pin_tests {
    use std::time::{Duration, Instant};

    use super::*;

    fn status_field(pid: u32, field: &str) -> Option<String> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status.lines().find_map(|l| l.strip_prefix(field)).map(|v| v.trim().to_owned())
    }

    #[test]
    fn a_pinned_server_is_its_own_pid_confined_to_the_cpus() {
        let (program, args) = pinned_command(Some("0"), Path::new("sleep"), &["30".to_owned()]);
        assert_eq!(program, Path::new("taskset"));
        assert_eq!(args, ["-c", "0", "sleep", "30"]);
        let dir = tempfile::tempdir().expect("temp dir");
        let sleeper = Spawned::start("sleep", &program, &args, &[], None, dir.path().join("s.log"), false)
            .expect("taskset starts");
        let pid = sleeper.pid();
        // taskset sets the mask, then execs sleep in place: wait (bounded) for the exec.
        let started = Instant::now();
        while status_field(pid, "Name:").as_deref() != Some("sleep") {
            assert!(started.elapsed() < Duration::from_secs(10), "pid {pid} never became sleep");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(status_field(pid, "Cpus_allowed_list:").as_deref(), Some("0"));
    }

    #[test]
    fn unpinned_commands_are_unchanged() {
        let (program, args) = pinned_command(None, Path::new("/bin/x"), &["a".to_owned()]);
        assert_eq!((program, args), (PathBuf::from("/bin/x"), vec!["a".to_owned()]));
    }
}
