//! `flotilla-compare`: the whole comparison of issue 4 in one run on one
//! machine, written into `benches/RESULTS.md`; `--smoke` is the few-second
//! version CI runs (Rust targets only) that fails on any error.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::Parser;
use flotilla_benches::{
    fleet::{Binaries, Launcher, Server, Upstream},
    floor::ByteRelay,
    load::{self, LoadConfig, Sampler, Scenario},
    procs,
    results::{self, Cell, Hop, Memory, Results, Target, cold},
    workload::{Workload, WorkloadSpec},
};

/// Runs every scenario at every concurrency against (a) flotilla-gateway in
/// front of flotilla-echo, (b) flotilla-echo directly and (c) upstream's
/// `pyflyte serve agent` with equivalent echo agents, alternating targets, and
/// writes the numbers, the ratios and the bar of issue 4 into RESULTS.md.
#[derive(Parser)]
#[command(
    name = "flotilla-compare",
    version,
    after_help = "The server binaries are taken from the directory this binary is in, so build them first:\n  \
cargo build --release --workspace --bins\n  target/release/flotilla-compare --full\n\n\
--smoke (CI) runs each scenario for about a second against (a) and (b) only, writes nothing, and exits \
non-zero on any error or on zero throughput."
)]
struct Cli {
    /// The full comparison (the default): every target, scenario and concurrency.
    #[arg(long, conflicts_with = "smoke")]
    full: bool,
    /// A few seconds per scenario against the Rust targets; fails on any error.
    #[arg(long)]
    smoke: bool,
    /// Measured window per cell and round [default: 5s; smoke 1s].
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Unrecorded warmup before each window [default: 1s; smoke 200ms].
    #[arg(long, value_parser = humantime::parse_duration)]
    warmup: Option<Duration>,
    /// Rounds of the whole matrix; cells merge over rounds [default: 2; smoke 1].
    #[arg(long)]
    rounds: Option<usize>,
    /// Concurrencies of the main matrix [default: 1,16,64; smoke 4].
    #[arg(long, value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// HTTP/2 connections per load (at most one per worker).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Scenarios to run [default: all].
    #[arg(long, value_enum, value_delimiter = ',')]
    scenarios: Vec<Scenario>,
    /// Leave out upstream (c).
    #[arg(long)]
    no_upstream: bool,
    /// Cold starts per server [default: 5; smoke 1].
    #[arg(long)]
    cold_starts: Option<usize>,
    /// Padding of the large-input variant (0 leaves it out).
    #[arg(long, default_value_t = 65536)]
    payload_bytes: usize,
    /// Largest replica count of the scaling view (0 leaves it out) [default: 3; smoke 2].
    #[arg(long)]
    max_replicas: Option<usize>,
    /// The venv Python with flytekit [default: what scripts/setup-python prints].
    #[arg(long)]
    python: Option<PathBuf>,
    /// Where to write the results [default: benches/RESULTS.md; smoke: nowhere].
    #[arg(long)]
    output: Option<PathBuf>,
    /// Keep the servers' logs (their directory is printed).
    #[arg(long)]
    keep_logs: bool,
    /// Pin the servers to CPU 0 and the load generator to CPU 1 (`taskset`), so
    /// neither waits for the other's core: the servers then have one core between them.
    #[arg(long)]
    pin: bool,
    /// Runtime threads of each Rust server (its `--threads`). 1 gives each server
    /// about one core's budget; 0 is the servers' own default, one per CPU.
    #[arg(long, default_value_t = 1, value_name = "N")]
    server_threads: usize,
    /// Runtime threads of the load generator (this process). One, the
    /// default, costs the least CPU per call, and the servers share the cores with it.
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    client_threads: u16,
}

/// The resolved plan.
struct Plan {
    smoke: bool,
    duration: Duration,
    warmup: Duration,
    rounds: usize,
    concurrencies: Vec<usize>,
    connections: usize,
    scenarios: Vec<Scenario>,
    targets: Vec<Target>,
    cold_starts: usize,
    payload_bytes: usize,
    max_replicas: usize,
    output: Option<PathBuf>,
}

impl Plan {
    fn new(cli: &Cli, root: &Path) -> Self {
        let smoke = cli.smoke;
        let concurrencies = if cli.concurrency.is_empty() {
            pick(smoke, vec![1, 16, 64], vec![4])
        } else {
            cli.concurrency.clone()
        };
        let mut targets = vec![Target::Gateway, Target::Direct];
        if !smoke && !cli.no_upstream {
            targets.push(Target::Upstream);
        }
        Self {
            smoke,
            duration: cli.duration.unwrap_or(pick(smoke, Duration::from_secs(5), Duration::from_secs(1))),
            warmup: cli.warmup.unwrap_or(pick(smoke, Duration::from_secs(1), Duration::from_millis(200))),
            rounds: cli.rounds.unwrap_or(pick(smoke, 2, 1)).max(1),
            concurrencies,
            connections: cli.connections.max(1),
            scenarios: if cli.scenarios.is_empty() { Scenario::ALL.to_vec() } else { cli.scenarios.clone() },
            targets,
            cold_starts: cli.cold_starts.unwrap_or(pick(smoke, 5, 1)),
            payload_bytes: cli.payload_bytes,
            max_replicas: cli.max_replicas.unwrap_or(pick(smoke, 3, 2)),
            output: cli.output.clone().or_else(|| (!smoke).then(|| root.join("benches/RESULTS.md"))),
        }
    }

    fn load(&self, scenario: Scenario, concurrency: usize) -> LoadConfig {
        LoadConfig {
            scenario,
            concurrency,
            connections: self.connections.min(concurrency),
            warmup: self.warmup,
            duration: self.duration,
            count: None,
            call_timeout: Duration::from_secs(10),
        }
    }
}

/// `full` for the full run, `small` for the smoke run.
fn pick<T>(smoke: bool, full: T, small: T) -> T {
    if smoke { small } else { full }
}

/// The load generator runs in this process: mimalloc for the reason `flotilla-bench` gives.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// With `--pin`: where the servers run, and where the load generator does.
const SERVER_CPU: &str = "0";
const LOAD_CPU: &str = "1";

fn main() -> ExitCode {
    // This binary is also the far end of the loopback floor it measures.
    if let Some(code) = flotilla_benches::floor::serve_role_if_asked() {
        return code;
    }
    let cli = Cli::parse();
    // Before the runtime's threads exist, so all of them inherit the mask.
    if cli.pin
        && let Err(e) = flotilla_benches::fleet::pin_self(LOAD_CPU)
    {
        eprintln!("flotilla-compare: {e:#}");
        return ExitCode::FAILURE;
    }
    let runtime = match flotilla_benches::load::runtime(cli.client_threads.into()) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("flotilla-compare: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // On a signal the run is dropped, and with it every server guard: nothing is left running.
    let outcome = runtime.block_on(async {
        tokio::select! {
            r = run(cli) => r,
            s = signal() => Err(anyhow::anyhow!("interrupted by {s}")),
        }
    });
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("flotilla-compare: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn signal() -> &'static str {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

/// A target kept running through the matrix.
struct Live {
    target: Target,
    addr: SocketAddr,
    /// (name, pid) of each server process whose costs count.
    processes: Vec<(String, u32)>,
    _servers: Vec<Server>,
}

impl Live {
    fn memory(&self) -> Vec<Memory> {
        self.processes
            .iter()
            .map(|(name, pid)| Memory {
                process: name.clone(),
                peak_kib: procs::peak_rss_kib(*pid),
                now_kib: procs::rss_kib(*pid),
            })
            .collect()
    }
}

/// Server CPU at the window's two ends, and the machine's, to tell foreign load.
struct CpuSampler<'a> {
    processes: &'a [(String, u32)],
    before: Vec<f64>,
    /// (machine busy, this process) at the window's start.
    machine_before: (f64, f64),
    cpu: BTreeMap<String, f64>,
    other_cpu: f64,
}

impl<'a> CpuSampler<'a> {
    fn new(processes: &'a [(String, u32)]) -> Self {
        Self {
            processes,
            before: Vec::new(),
            machine_before: (0.0, 0.0),
            cpu: BTreeMap::new(),
            other_cpu: 0.0,
        }
    }
}

impl Sampler for CpuSampler<'_> {
    fn window_start(&mut self) {
        self.before =
            self.processes.iter().map(|(_, pid)| procs::tree_cpu_seconds(*pid).unwrap_or(0.0)).collect();
        self.machine_before = (procs::machine_busy_seconds(), procs::self_cpu_seconds());
    }

    fn window_end(&mut self) {
        let machine = procs::machine_busy_seconds() - self.machine_before.0;
        let client = procs::self_cpu_seconds() - self.machine_before.1;
        let mut servers = 0.0;
        for ((name, pid), before) in self.processes.iter().zip(&self.before) {
            let after = procs::tree_cpu_seconds(*pid).unwrap_or(*before);
            *self.cpu.entry(name.clone()).or_default() += after - before;
            servers += after - before;
        }
        // Tick rounding can make this slightly negative on an idle machine.
        self.other_cpu = (machine - servers - client).max(0.0);
    }
}

async fn measure(
    addr: SocketAddr,
    processes: &[(String, u32)],
    workload: &Arc<Workload>,
    config: &LoadConfig,
) -> anyhow::Result<Cell> {
    let mut sampler = CpuSampler::new(processes);
    let report = load::run(addr, workload.clone(), config, &mut sampler).await?;
    Ok(Cell { report, cpu: sampler.cpu, other_cpu: sampler.other_cpu })
}

fn progress(label: &str, cell: &Cell) {
    let r = &cell.report;
    eprintln!(
        "  {label:<34} {:>9.0} ops/s  p50 {:>7.0} µs  p99 {:>7.0} µs  server {:.3} CPU-s/1k  other load {:.2}  errors {}{}",
        r.ops_per_sec,
        r.latency_us.p50,
        r.latency_us.p99,
        cell.cpu_per_1000(),
        cell.other_load(),
        r.errors,
        if r.warmup_errors > 0 { format!(" (+{} in warmup)", r.warmup_errors) } else { String::new() }
    );
}

fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn environment(root: &Path, exe_dir: &Path, python: Option<&Path>) -> Vec<(String, String)> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':').map(|(_, v)| v.trim().to_owned()))
        .unwrap_or_else(|| "unknown".to_owned());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:")?.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or(0);
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let root_s = root.display().to_string();
    let commit = command_output("git", &["-C", &root_s, "rev-parse", "--short", "HEAD"]).unwrap_or_default();
    let dirty = command_output("git", &["-C", &root_s, "status", "--porcelain", "--untracked-files=no"])
        .is_some_and(|s| !s.is_empty());
    let mut env = vec![
        ("date".to_owned(), command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default()),
        (
            "machine".to_owned(),
            format!("{nproc} CPUs (nproc), {model}, {:.1} GiB RAM", mem_kib as f64 / 1048576.0),
        ),
        ("kernel".to_owned(), command_output("uname", &["-sr"]).unwrap_or_default()),
        ("rustc".to_owned(), command_output("rustc", &["--version"]).unwrap_or_else(|| "unknown".to_owned())),
        (
            "flotilla".to_owned(),
            format!(
                "commit {commit}{} when this ran; binaries from {}, flotilla-gateway built {}",
                if dirty { " with uncommitted changes" } else { "" },
                exe_dir.display(),
                command_output(
                    "date",
                    &[
                        "-u",
                        "-r",
                        &exe_dir.join("flotilla-gateway").display().to_string(),
                        "+%Y-%m-%d %H:%M UTC"
                    ]
                )
                .unwrap_or_else(|| "at an unknown time".to_owned())
            ),
        ),
    ];
    if let Some(py) = python {
        let probe = "import sys, flytekit, grpc; print(sys.version.split()[0], flytekit.__version__, grpc.__version__)";
        let v = command_output(&py.display().to_string(), &["-c", probe]).unwrap_or_default();
        let mut parts = v.split_whitespace();
        let (pyv, fk, grpcv) = (parts.next(), parts.next(), parts.next());
        env.push(("python".to_owned(), pyv.unwrap_or("unknown").to_owned()));
        env.push(("flytekit".to_owned(), fk.unwrap_or("unknown").to_owned()));
        env.push(("grpcio".to_owned(), grpcv.unwrap_or("unknown").to_owned()));
    }
    env
}

/// The venv Python: `--python`, else what `scripts/setup-python` prints (it creates `.venv` when needed).
fn setup_python(root: &Path, given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.to_path_buf());
    }
    let script = root.join("scripts/setup-python");
    eprintln!("==> {}", script.display());
    let out = Command::new(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!("{} failed ({})", script.display(), out.status);
    }
    let python = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().trim().to_owned();
    if python.is_empty() {
        bail!("{} printed no Python path", script.display());
    }
    Ok(PathBuf::from(python))
}

async fn start_target(launcher: &Launcher, target: Target) -> anyhow::Result<Live> {
    Ok(match target {
        Target::Gateway => {
            let echo = launcher.echo("a-echo").await?;
            let gateway = launcher.gateway("a-gateway", &[echo.addr]).await?;
            Live {
                target,
                addr: gateway.addr,
                processes: vec![
                    ("gateway".to_owned(), gateway.process.pid()),
                    ("echo".to_owned(), echo.process.pid()),
                ],
                _servers: vec![gateway, echo],
            }
        }
        Target::Direct => {
            let echo = launcher.echo("b-echo").await?;
            Live {
                target,
                addr: echo.addr,
                processes: vec![("echo".to_owned(), echo.process.pid())],
                _servers: vec![echo],
            }
        }
        Target::Upstream => {
            let py = launcher.upstream("c-pyflyte").await?;
            Live {
                target,
                addr: py.addr,
                processes: vec![("pyflyte".to_owned(), py.process.pid())],
                _servers: vec![py],
            }
        }
    })
}

async fn cold_starts(plan: &Plan, launcher: &Launcher, results: &mut Results) -> anyhow::Result<()> {
    eprintln!("==> cold starts ({} each)", plan.cold_starts);
    for i in 0..plan.cold_starts {
        // Alternate which server goes first, as for the loads.
        let mut order: Vec<&str> = vec![cold::ECHO, cold::GATEWAY, cold::UP];
        if plan.targets.contains(&Target::Upstream) {
            order.push(cold::UPSTREAM);
        }
        let n = order.len();
        order.rotate_left(i % n);
        for key in order {
            let took = match key {
                cold::ECHO => launcher.echo("cold-echo").await?.cold_start,
                cold::GATEWAY => {
                    let echo = launcher.echo("cold-gw-echo").await?;
                    launcher.gateway("cold-gateway", &[echo.addr]).await?.cold_start
                }
                cold::UP => launcher.flotilla_up().await?.cold_start,
                _ => launcher.upstream("cold-pyflyte").await?.cold_start,
            };
            eprintln!("  {key:<45} {:>8.1} ms", took.as_secs_f64() * 1000.0);
            results.cold_starts.entry(key.to_owned()).or_default().push(took);
        }
    }
    Ok(())
}

/// Runs `scenarios` × `concurrencies` on every live target, `rounds` times,
/// rotating the targets' order per cell and per round; merges into `results`.
async fn matrix(
    plan: &Plan,
    live: &[Live],
    workload: &Arc<Workload>,
    scenarios: &[Scenario],
    concurrencies: &[usize],
    results: &mut Results,
) -> anyhow::Result<()> {
    let payload = workload.spec.payload_bytes;
    let mut k = 0;
    for round in 0..plan.rounds {
        for &s in scenarios {
            for &c in concurrencies {
                let mut order: Vec<&Live> = live.iter().collect();
                let n = order.len();
                order.rotate_left((k + round) % n);
                k += 1;
                for l in order {
                    let cell = measure(l.addr, &l.processes, workload, &plan.load(s, c)).await?;
                    let label = format!(
                        "r{} {} c={c}{} {}",
                        round + 1,
                        s.name(),
                        if payload > 0 { format!(" {}KiB", payload / 1024) } else { String::new() },
                        l.target.title()
                    );
                    progress(&label, &cell);
                    match results.cells.entry((s, c, payload, l.target)) {
                        std::collections::btree_map::Entry::Occupied(mut e) => e.get_mut().merge(&cell),
                        std::collections::btree_map::Entry::Vacant(e) => {
                            e.insert(cell);
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

async fn scaling(plan: &Plan, launcher: &Launcher, results: &mut Results) -> anyhow::Result<()> {
    if plan.max_replicas == 0 || !plan.scenarios.contains(&Scenario::Get) {
        return Ok(());
    }
    let c = *plan.concurrencies.iter().max().expect("at least one concurrency");
    eprintln!("==> scaling: gateway in front of 1..={} echo replicas, GetTask c={c}", plan.max_replicas);
    let workload = Arc::new(Workload::new(WorkloadSpec::default()));
    let mut cells: BTreeMap<usize, Cell> = BTreeMap::new();
    for round in 0..plan.rounds {
        for n in 1..=plan.max_replicas {
            let mut echoes = Vec::new();
            for i in 0..n {
                echoes.push(launcher.echo(&format!("scale{n}-echo{}", i + 1)).await?);
            }
            let addrs: Vec<SocketAddr> = echoes.iter().map(|e| e.addr).collect();
            let gateway = launcher.gateway(&format!("scale{n}-gateway"), &addrs).await?;
            let mut processes = vec![("gateway".to_owned(), gateway.process.pid())];
            processes
                .extend(echoes.iter().enumerate().map(|(i, e)| (format!("echo-{}", i + 1), e.process.pid())));
            let cell = measure(gateway.addr, &processes, &workload, &plan.load(Scenario::Get, c)).await?;
            progress(&format!("r{} {n} replica(s) get c={c}", round + 1), &cell);
            match cells.entry(n) {
                std::collections::btree_map::Entry::Occupied(mut e) => e.get_mut().merge(&cell),
                std::collections::btree_map::Entry::Vacant(e) => {
                    e.insert(cell);
                }
            }
        }
    }
    results.scaling = cells.into_iter().collect();
    Ok(())
}

/// The hop on its own: echo direct against echo behind a [`ByteRelay`] (a
/// process that copies bytes and parses nothing), GetTask at c=1, alternating
/// for `rounds`. What the gateway-vs-echo line of the bar would measure for a
/// proxy that did no work at all on this machine. With `pin` (`--pin`) the
/// relay runs on the servers' CPUs, as the gateway does.
async fn hop(
    plan: &Plan,
    launcher: &Launcher,
    exe: &Path,
    pin: Option<&str>,
    results: &mut Results,
) -> anyhow::Result<()> {
    if !plan.scenarios.contains(&Scenario::Get) {
        return Ok(());
    }
    eprintln!("==> the hop alone: echo behind a byte relay, GetTask c=1");
    let echo = launcher.echo("h-echo").await?;
    let relay = ByteRelay::start(exe, echo.addr, pin).context("starting the byte relay")?;
    let echo_only = [("echo".to_owned(), echo.process.pid())];
    let both = [("relay".to_owned(), relay.pid()), ("echo".to_owned(), echo.process.pid())];
    let workload = Arc::new(Workload::new(WorkloadSpec::default()));
    let load = plan.load(Scenario::Get, 1);
    let mut cells: [Option<Cell>; 2] = [None, None];
    for round in 0..plan.rounds {
        for k in 0..2 {
            // Alternate which goes first, as in the matrix.
            let i = (k + round) % 2;
            let (addr, processes, title) = if i == 0 {
                (echo.addr, &echo_only[..], "echo direct")
            } else {
                (relay.addr(), &both[..], "byte relay → echo")
            };
            let cell = measure(addr, processes, &workload, &load).await?;
            progress(&format!("r{} get c=1 {title}", round + 1), &cell);
            match &mut cells[i] {
                Some(c) => c.merge(&cell),
                none => *none = Some(cell),
            }
        }
    }
    if let [Some(direct), Some(relayed)] = cells {
        results.hop = Some(Hop { direct, relayed });
    }
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<bool> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("benches/ has a parent")?.to_path_buf();
    let exe = std::env::current_exe().context("locating this binary")?;
    let exe_dir = exe.parent().context("this binary has a directory")?.to_path_buf();
    let bins = Binaries::in_dir(&exe_dir)?;
    let plan = Plan::new(&cli, &root);

    let python = if plan.targets.contains(&Target::Upstream) {
        Some(setup_python(&root, cli.python.as_deref())?)
    } else {
        None
    };
    let upstream = python.as_ref().map(|py| Upstream {
        pyflyte: py.parent().map_or_else(|| PathBuf::from("pyflyte"), |d| d.join("pyflyte")),
        agents_dir: root.join("benches/upstream"),
    });
    let logs =
        tempfile::Builder::new().prefix("flotilla-compare-").tempdir().context("creating a log directory")?;
    let launcher = Launcher::new(bins, upstream, logs.path().to_path_buf())
        .pinned(cli.pin.then(|| SERVER_CPU.to_owned()))
        .threads(cli.server_threads);

    let mut results = Results {
        environment: environment(&root, &exe_dir, python.as_deref()),
        concurrencies: plan.concurrencies.clone(),
        payload_bytes: plan.payload_bytes,
        ..Results::default()
    };
    let invoked: Vec<String> = std::env::args().skip(1).collect();
    let shown_exe =
        exe.strip_prefix(&root).map_or_else(|_| exe.display().to_string(), |p| p.display().to_string());
    let profile = if exe_dir.ends_with("release") { " --release" } else { "" };
    results.commands = vec![
        format!("cargo build{profile} --workspace --bins"),
        format!("{shown_exe} {}", invoked.join(" ")).trim_end().to_owned(),
    ];
    results.method = vec![
        format!(
            "closed loop: each worker sends its next request when the last one answers; {} warmup (not \
             recorded), then a {} window; {} round(s), cells merged over rounds",
            humantime::format_duration(plan.warmup),
            humantime::format_duration(plan.duration),
            plan.rounds
        ),
        "targets alternate: within each scenario × concurrency every target runs back to back, in an order \
         that rotates from cell to cell and round to round, so drift hits them alike"
            .to_owned(),
        format!(
            "HTTP/2 connections per load: min(concurrency, {}); the load generator (tonic's generated clients \
             over the gateway's own HTTP/2 client connection) runs on {}",
            plan.connections,
            match cli.client_threads {
                1 => "one runtime thread (`--client-threads 1`)".to_owned(),
                n => format!("{n} runtime threads (`--client-threads {n}`)"),
            }
        ),
        if cli.pin {
            format!(
                "pinned (`--pin`): every server process runs under `taskset -c {SERVER_CPU}` (all servers of a \
                 target share that one core) and the load generator is confined to CPU {LOAD_CPU}, so neither \
                 waits for a core the other holds; cold starts include taskset's exec; server CPU per op \
                 (utime+stime from /proc/<pid>/stat across the window) is measured the same way as unpinned"
            )
        } else {
            "servers and the load generator share this machine's cores: throughput and latency include that \
             contention (the load generator's own CPU per op is shown); server CPU per op (utime+stime from \
             /proc/<pid>/stat across the window) does not depend on it"
                .to_owned()
        },
        "requests: a full TaskTemplate (id, interface, custom Struct, container with resources/env/args, \
         metadata with runtime, timeout, retries), TaskExecutionMetadata, and a LiteralMap of an int, a float, \
         a string and a bool; every answer is checked (SUCCEEDED, one output per input)"
            .to_owned(),
        format!(
            "Rust servers run with `--log warn` and {}; pyflyte with its defaults (10 workers, WARNING logging)",
            match cli.server_threads {
                0 => "their default runtime threads, one per CPU (no `--threads`)".to_owned(),
                1 => "one runtime thread each (`--threads 1`)".to_owned(),
                n => format!("{n} runtime threads each (`--threads {n}`)"),
            }
        ),
    ];
    let floor = |relay| {
        let exe = std::env::current_exe()?;
        flotilla_benches::floor::loopback_rtt(&exe, 20_000, relay)
    };
    match (floor(false), floor(true)) {
        (Ok(direct), Ok(relay)) => {
            let us = |d: Duration| d.as_secs_f64() * 1e6;
            let relay_cpu = relay.relay_cpu.unwrap_or_default();
            results.method.push(format!(
                "machine floor: a bare TCP ping-pong on 127.0.0.1 from this process to another (blocking \
                 sockets, 200 bytes each way, {} round trips) takes p50 {:.0} µs, p99 {:.0} µs per round trip; \
                 through a third process that only relays each message and its answer, as the gateway does, \
                 p50 {:.0} µs, p99 {:.0} µs ({:.2}× at p50). Per round trip the answering process spends {:.0} µs \
                 of CPU and the relay {:.0} µs, in the kernel's socket calls and wakeups alone: what a hop costs \
                 here before any HTTP/2, protobuf or routing",
                direct.samples,
                us(direct.p50),
                us(direct.p99),
                us(relay.p50),
                us(relay.p99),
                relay.p50.as_secs_f64() / direct.p50.as_secs_f64(),
                us(direct.echo_cpu),
                us(relay_cpu),
            ));
        }
        (Err(e), _) | (_, Err(e)) => eprintln!("warning: the loopback floor could not be measured: {e}"),
    }
    eprintln!("==> logs under {}", logs.path().display());

    cold_starts(&plan, &launcher, &mut results).await?;

    eprintln!("==> starting the targets");
    let mut live = Vec::new();
    for &t in &plan.targets {
        let l = start_target(&launcher, t).await?;
        eprintln!("  {} {} at {}", t.letter(), t.title(), l.addr);
        live.push(l);
    }
    for l in &live {
        for s in &l._servers {
            results.servers.push((format!("{} {}", l.target.letter(), s.process.name), s.command.clone()));
        }
    }

    eprintln!("==> main matrix");
    let workload = Arc::new(Workload::new(WorkloadSpec::default()));
    matrix(&plan, &live, &workload, &plan.scenarios, &plan.concurrencies, &mut results).await?;
    for l in &live {
        results.memory.insert(l.target, l.memory());
    }

    if plan.payload_bytes > 0 {
        let scenarios: Vec<Scenario> = [Scenario::Create, Scenario::RoundTrip]
            .into_iter()
            .filter(|s| plan.scenarios.contains(s))
            .collect();
        let concurrencies: Vec<usize> = if plan.smoke { vec![2] } else { vec![1, 16] };
        eprintln!("==> {} byte input variant", plan.payload_bytes);
        let big = Arc::new(Workload::new(WorkloadSpec {
            payload_bytes: plan.payload_bytes,
            ..WorkloadSpec::default()
        }));
        matrix(&plan, &live, &big, &scenarios, &concurrencies, &mut results).await?;
        for l in &live {
            results.memory_after_payload.insert(l.target, l.memory());
        }
    }
    drop(live);

    scaling(&plan, &launcher, &mut results).await?;
    hop(&plan, &launcher, &exe, cli.pin.then_some(SERVER_CPU), &mut results).await?;

    let markdown = results.markdown();
    let mut clean = true;
    // Every load of the run, labelled; one check for all of them.
    let mut loads: Vec<(String, &load::Report)> = results
        .cells
        .iter()
        .map(|((s, c, p, t), cell)| (format!("{} c={c} payload={p} {}", s.name(), t.title()), &cell.report))
        .chain(results.scaling.iter().map(|(n, cell)| {
            (format!("{} c={n} payload=0 {}", Scenario::Get.name(), Target::Gateway.title()), &cell.report)
        }))
        .collect();
    if let Some(h) = &results.hop {
        loads.push(("the hop alone, get c=1 echo direct".to_owned(), &h.direct.report));
        loads.push(("the hop alone, get c=1 byte relay → echo".to_owned(), &h.relayed.report));
    }
    let bad: Vec<String> = loads
        .into_iter()
        .filter(|(_, r)| r.errors > 0 || r.warmup_errors > 0 || r.ops == 0)
        .map(|(label, r)| {
            format!(
                "{label}: {} ops, {} errors (+{} in warmup) {:?}",
                r.ops, r.errors, r.warmup_errors, r.error_samples
            )
        })
        .collect();
    if !bad.is_empty() {
        eprintln!("==> loads with errors or no throughput:");
        for b in &bad {
            eprintln!("  {b}");
        }
        // In smoke mode any error fails; the full run reports them in RESULTS.md.
        clean = !plan.smoke;
    }

    // Smoke numbers (debug builds, one-second windows) say nothing about the bar.
    let bar = if plan.smoke { Vec::new() } else { results.bar() };
    if !bar.is_empty() {
        eprintln!("\n==> the bar (issue 4)");
    }
    for l in bar {
        let v = match l.pass {
            Some(true) => "pass",
            Some(false) => "FAIL",
            None => "n/a",
        };
        eprintln!("  [{v}] {}: {}", l.goal, l.measured);
    }
    match &plan.output {
        Some(path) => {
            let existing = std::fs::read_to_string(path).unwrap_or_else(|_| "# Benchmarks\n".to_owned());
            std::fs::write(path, results::splice(&existing, &markdown))
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!("==> wrote {}", path.display());
        }
        None if plan.smoke => eprintln!("==> smoke run {}", if clean { "passed" } else { "FAILED" }),
        None => println!("{markdown}"),
    }
    if cli.keep_logs {
        let kept = logs.keep();
        eprintln!("==> logs kept in {}", kept.display());
    }
    Ok(clean)
}
