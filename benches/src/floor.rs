//! The machine's floor for one request and answer: a bare TCP ping-pong on
//! 127.0.0.1 (blocking sockets, no HTTP/2, no protobuf), from this process
//! to a separate one that answers, and again through a third process that
//! only relays, as the gateway does. Separate processes, not threads: the
//! servers measured are processes, and on the VM measured a relay thread
//! added 10-30% to the round trip where a relay process added 10-60%,
//! varying from run to run (switching between address spaces, and where the
//! kernel puts each task it wakes).
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

/// Names the role of a floor process: `echo`, or `relay:<port>`.
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
    let outcome = match role.strip_prefix("relay:").map(str::parse::<u16>) {
        None if role == "echo" => serve(None),
        Some(Ok(port)) => serve(Some(SocketAddr::from(([127, 0, 0, 1], port)))),
        _ => Err(std::io::Error::other(format!("{ROLE_ENV}={role:?}: expected `echo` or `relay:<port>`"))),
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

/// A floor process, killed if dropped before it ends on its own.
struct Role(Child);

impl Role {
    /// Starts `exe` as `role` and reads the port it listens on.
    fn start(exe: &Path, role: &str) -> std::io::Result<(Self, u16)> {
        let child =
            Command::new(exe).env(ROLE_ENV, role).stdin(Stdio::null()).stdout(Stdio::piped()).spawn()?;
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
