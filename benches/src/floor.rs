//! The machine's floor for one request and answer: a bare TCP ping-pong on
//! 127.0.0.1 between two threads (blocking sockets, no HTTP/2, no protobuf).
//! Through the gateway a call makes two such round trips, to echo directly
//! one; this is what the latency ratios cannot go below.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    time::{Duration, Instant},
};

/// Round-trip latencies of a bare loopback ping-pong.
#[derive(Clone, Copy, Debug)]
pub struct Floor {
    /// Median round trip.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Round trips measured.
    pub samples: usize,
}

/// Bytes each way per round trip (about a GetTask request's size).
const MESSAGE: usize = 200;

/// Measures `n` round trips (after a short warmup).
///
/// # Errors
/// When loopback sockets cannot be made.
pub fn loopback_rtt(n: usize) -> std::io::Result<Floor> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut conn, _) = listener.accept()?;
        conn.set_nodelay(true)?;
        let mut buf = [0u8; MESSAGE];
        loop {
            match conn.read_exact(&mut buf) {
                Ok(()) => conn.write_all(&buf)?,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    });
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
    drop(client);
    server.join().map_err(|_| std::io::Error::other("the ping-pong server thread panicked"))??;
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    Ok(Floor { p50: at(0.5), p99: at(0.99), samples: samples.len() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ping_pong_measures_ordered_percentiles() {
        let floor = loopback_rtt(200).unwrap();
        assert_eq!(floor.samples, 200);
        assert!(floor.p50 > Duration::ZERO && floor.p50 <= floor.p99, "{floor:?}");
    }
}
