//! The loopback floor, measured with `flotilla-compare` as the far end.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use flotilla_benches::floor::{ByteRelay, ROLE_ENV, loopback_rtt};

const COMPARE: &str = env!("CARGO_BIN_EXE_flotilla-compare");

#[test]
fn a_ping_pong_direct_and_through_a_relay_measures_ordered_percentiles() {
    for relay in [false, true] {
        let floor = loopback_rtt(Path::new(COMPARE), 200, relay).unwrap();
        assert_eq!(floor.samples, 200);
        assert!(floor.p50 > Duration::ZERO && floor.p50 <= floor.p99, "relay {relay}: {floor:?}");
        assert_eq!(floor.relay_cpu.is_some(), relay, "{floor:?}");
    }
}

#[test]
fn no_round_trips_is_an_error_not_a_panic() {
    let err = loopback_rtt(Path::new(COMPARE), 0, false).unwrap_err();
    assert!(err.to_string().contains("at least one round trip"), "{err}");
}

#[test]
fn an_unknown_role_fails_naming_it() {
    let out = Command::new(COMPARE).env(ROLE_ENV, "sideways").output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("\"sideways\"") && stderr.contains("relay:<port>"), "{stderr}");
}

#[test]
fn a_binary_that_does_not_play_the_roles_is_named_in_the_error() {
    // `true` prints nothing and exits: no port.
    let err = loopback_rtt(Path::new("/bin/true"), 10, false).unwrap_err();
    assert!(err.to_string().contains("serve_role_if_asked"), "{err}");
}

/// Reads exactly `n` bytes, failing after 10 s instead of hanging.
fn read_n(stream: &mut TcpStream, n: usize) -> Vec<u8> {
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = vec![0; n];
    stream.read_exact(&mut buf).unwrap();
    buf
}

#[test]
fn a_byte_relay_passes_bytes_both_ways_and_ends_when_dropped() {
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let relay = ByteRelay::start(Path::new(COMPARE), server.local_addr().unwrap(), None).unwrap();
    let pid = relay.pid();
    let mut client = TcpStream::connect(relay.addr()).unwrap();
    client.write_all(b"request").unwrap();
    let (mut upstream, _) = server.accept().unwrap();
    assert_eq!(read_n(&mut upstream, 7), b"request");
    upstream.write_all(b"its answer").unwrap();
    assert_eq!(read_n(&mut client, 10), b"its answer");
    // A second connection gets an upstream connection of its own.
    let mut second = TcpStream::connect(relay.addr()).unwrap();
    second.write_all(b"two").unwrap();
    let (mut upstream2, _) = server.accept().unwrap();
    assert_eq!(read_n(&mut upstream2, 3), b"two");

    drop(relay);
    let gone = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < gone, "the relay process {pid} outlived its handle");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Its connections went with it.
    assert_eq!(client.read(&mut [0; 1]).unwrap_or(0), 0);
}

#[test]
fn a_byte_relay_closes_a_client_whose_upstream_refuses() {
    // A port that was free a moment ago: nothing listens there.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let relay = ByteRelay::start(Path::new(COMPARE), closed, None).unwrap();
    let mut client = TcpStream::connect(relay.addr()).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(client.read(&mut [0; 1]).unwrap(), 0, "the client was not closed");
}

#[test]
fn a_byte_relay_ends_when_the_process_that_started_it_is_gone() {
    let mut child = Command::new(COMPARE)
        .env(ROLE_ENV, "byte-relay:127.0.0.1:9")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut port = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut port).unwrap();
    assert!(port.trim().parse::<u16>().is_ok(), "{port:?}");
    // What the parent's death does to the pipe.
    drop(child.stdin.take());
    let gone = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        if Instant::now() > gone {
            let _ = child.kill();
            panic!("the relay kept running with its stdin closed");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_pinned_byte_relay_runs_on_the_cpus_given() {
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let relay = ByteRelay::start(Path::new(COMPARE), server.local_addr().unwrap(), Some("0")).unwrap();
    // taskset execs the relay in place: the pid is the relay's, confined to CPU 0.
    let status = std::fs::read_to_string(format!("/proc/{}/status", relay.pid())).unwrap();
    let allowed = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).unwrap().trim();
    assert_eq!(allowed, "0", "{status}");
    // And it relays.
    let mut client = TcpStream::connect(relay.addr()).unwrap();
    client.write_all(b"x").unwrap();
    let (mut upstream, _) = server.accept().unwrap();
    assert_eq!(read_n(&mut upstream, 1), b"x");
}
