//! The machine's floor for one request and answer: a bare TCP ping-pong on
//! 127.0.0.1 (blocking sockets, no HTTP/2, no protobuf), from this process
//! to a separate one that answers, and again through a third process that
//! only relays, as the gateway does. Separate processes, not threads: the
//! servers measured are processes, and on the VM measured a relay thread
//! added 10-30% to the round trip where a relay process added 10-60%,
//! varying from run to run (switching between address spaces, and where the
//! kernel puts each task it wakes).
//!
//! [`ByteRelay`] is the same hop with the gateway's I/O model and none of its
//! work: one tokio runtime thread that copies bytes between a client and a
//! server, parsing nothing. Put in front of a real server, it measures what
//! the hop costs a real call on this machine.
//!
//! The other processes are an executable that calls [`serve_role_if_asked`]
//! first thing in `main` (`flotilla-compare` does), started again with
//! [`ROLE_ENV`] naming what to be.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

/// Names the role of a floor process: `echo`, `relay:<port>` or
/// `byte-relay:<address>`.
pub const ROLE_ENV: &str = "FLOTILLA_FLOOR_ROLE";

/// Round-trip latencies of a bare loopback ping-pong.
#[derive(Clone, Copy, Debug)]
pub struct Floor {
    /// Median round trip.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Round trips measured.
    pub samples: usize,
    /// CPU time (user + system, from `/proc`) of the answering process per
    /// round trip, warmup included.
    pub echo_cpu: Duration,
    /// The same for the relay, when there is one.
    pub relay_cpu: Option<Duration>,
}

/// Bytes each way per round trip (about a GetTask request's size).
const MESSAGE: usize = 200;

/// In a process started by [`loopback_rtt`]: plays its role (printing the
/// port it listens on, then serving one connection until it closes) and
/// returns the exit code; in any other process, `None`.
pub fn serve_role_if_asked() -> Option<ExitCode> {
    let role = std::env::var(ROLE_ENV).ok()?;
    let outcome = if role == "echo" {
        serve(None)
    } else if let Some(Ok(port)) = role.strip_prefix("relay:").map(str::parse::<u16>) {
        serve(Some(SocketAddr::from(([127, 0, 0, 1], port))))
    } else if let Some(Ok(upstream)) = role.strip_prefix("byte-relay:").map(str::parse::<SocketAddr>) {
        byte_relay(upstream)
    } else {
        Err(std::io::Error::other(format!(
            "{ROLE_ENV}={role:?}: expected `echo`, `relay:<port>` or `byte-relay:<address>`"
        )))
    };
    Some(match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("floor {role}: {e}");
            ExitCode::FAILURE
        }
    })
}

/// Answers each message with itself, or (with `upstream`) passes it on and
/// returns the answer, until the one client hangs up.
fn serve(upstream: Option<SocketAddr>) -> std::io::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    println!("{}", listener.local_addr()?.port());
    std::io::stdout().flush()?;
    let (mut client, _) = listener.accept()?;
    client.set_nodelay(true)?;
    let mut upstream = upstream.map(TcpStream::connect).transpose()?;
    if let Some(u) = &upstream {
        u.set_nodelay(true)?;
    }
    let mut buf = [0u8; MESSAGE];
    loop {
        match client.read_exact(&mut buf) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        if let Some(u) = &mut upstream {
            u.write_all(&buf)?;
            u.read_exact(&mut buf)?;
        }
        client.write_all(&buf)?;
    }
}

/// A floor process, killed if dropped before it ends on its own. Its stdin
/// is a pipe from this process, so that a role that runs until told (the
/// byte relay) also ends when this process is gone.
struct Role(Child);

impl Role {
    /// Starts `exe` as `role` and reads the port it listens on.
    fn start(exe: &Path, role: &str) -> std::io::Result<(Self, u16)> {
        Self::start_on(exe, role, None)
    }

    /// As [`Role::start`], confined to `cpus` (a `taskset -c` list) when given.
    fn start_on(exe: &Path, role: &str, cpus: Option<&str>) -> std::io::Result<(Self, u16)> {
        // taskset execs the program in place: the child's pid is the role's.
        let (program, args) = crate::fleet::pinned_command(cpus, exe, &[]);
        let child = Command::new(program)
            .args(args)
            .env(ROLE_ENV, role)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut this = Self(child);
        let mut line = String::new();
        let stdout = this.0.stdout.take().ok_or_else(|| std::io::Error::other("no stdout"))?;
        BufReader::new(stdout).read_line(&mut line)?;
        let port = line.trim().parse().map_err(|_| {
            std::io::Error::other(format!(
                "the floor's {role} process printed {line:?}, not its port (does main call \
                 floor::serve_role_if_asked?)"
            ))
        })?;
        Ok((this, port))
    }

    fn finish(mut self) -> std::io::Result<()> {
        let status = self.0.wait()?;
        if status.success() {
            Ok(())
        } else {
            Err(std::io::Error::other(format!("a floor process {status}")))
        }
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A process that relays every connection made to [`ByteRelay::addr`] to an
/// upstream server, byte for byte: the hop of a proxy that does nothing else.
/// One tokio runtime thread, as the servers measured run with `--threads 1`.
/// Ends when dropped (or when the process that started it ends).
pub struct ByteRelay {
    role: Role,
    addr: SocketAddr,
}

impl ByteRelay {
    /// Starts `exe` (which must call [`serve_role_if_asked`]) as a byte relay
    /// in front of `upstream`, confined to `cpus` (a `taskset -c` list, as the
    /// servers are pinned) when given.
    ///
    /// # Errors
    /// When the process cannot be started or does not say its port.
    pub fn start(exe: &Path, upstream: SocketAddr, cpus: Option<&str>) -> std::io::Result<Self> {
        let (role, port) = Role::start_on(exe, &format!("byte-relay:{upstream}"), cpus)?;
        Ok(Self { role, addr: SocketAddr::from(([127, 0, 0, 1], port)) })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The relay's process id, for its CPU time.
    pub fn pid(&self) -> u32 {
        self.role.0.id()
    }
}

/// The byte relay's process: accepts connections until its stdin closes,
/// and copies each one's bytes to and from a connection of its own to
/// `upstream`. A client whose upstream connection fails is closed.
fn byte_relay(upstream: SocketAddr) -> std::io::Result<()> {
    // The parent holds the other end of stdin; it closes when the parent
    // drops the relay, or dies.
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
    let runtime = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("{}", listener.local_addr()?.port());
        std::io::stdout().flush()?;
        loop {
            let (mut client, _) = listener.accept().await?;
            tokio::spawn(async move {
                let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                if client.set_nodelay(true).is_ok() && server.set_nodelay(true).is_ok() {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    })
}

/// Measures `n` round trips (after a short warmup) from this process to an
/// answering process: with `relay`, through a process in the middle that
/// passes each message on and the answer back. Both are `exe`, which must
/// call [`serve_role_if_asked`].
///
/// # Errors
/// When the processes or loopback sockets cannot be made.
pub fn loopback_rtt(exe: &Path, n: usize, relay: bool) -> std::io::Result<Floor> {
    if n == 0 {
        return Err(std::io::Error::other("the floor needs at least one round trip"));
    }
    let (echo, echo_port) = Role::start(exe, "echo")?;
    let (relay, port) = if relay {
        let (r, port) = Role::start(exe, &format!("relay:{echo_port}"))?;
        (Some(r), port)
    } else {
        (None, echo_port)
    };
    let (samples, client) = ping_pong(SocketAddr::from(([127, 0, 0, 1], port)), n)?;
    // Read while the processes still run: they exit when the client hangs up.
    let round_trips = n + n / 10;
    let cpu = |role: &Role| {
        crate::procs::cpu_seconds(role.0.id()).map(|s| Duration::from_secs_f64(s / round_trips as f64))
    };
    let echo_cpu = cpu(&echo)?;
    let relay_cpu = relay.as_ref().map(cpu).transpose()?;
    drop(client);
    if let Some(r) = relay {
        r.finish()?;
    }
    echo.finish()?;
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    Ok(Floor { p50: at(0.5), p99: at(0.99), samples: samples.len(), echo_cpu, relay_cpu })
}

/// `n` timed round trips to `addr` after a warmup of a tenth as many, sorted;
/// and the connection, whose closing ends the processes behind it.
fn ping_pong(addr: SocketAddr, n: usize) -> std::io::Result<(Vec<Duration>, TcpStream)> {
    let mut client = TcpStream::connect(addr)?;
    client.set_nodelay(true)?;
    let mut buf = [7u8; MESSAGE];
    let warmup = n / 10;
    let mut samples = Vec::with_capacity(n);
    for i in 0..n + warmup {
        let started = Instant::now();
        client.write_all(&buf)?;
        client.read_exact(&mut buf)?;
        if i >= warmup {
            samples.push(started.elapsed());
        }
    }
    samples.sort_unstable();
    Ok((samples, client))
}
