//! `flotilla up` stops gracefully on Ctrl-C, waiting for in-flight calls, and
//! at once on a second Ctrl-C; it takes the gateway's settings (accepted
//! tokens, shutdown grace) from the same variables as `flotilla-gateway`.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

/// Lines of a child's stream, as they come.
fn lines(stream: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// The first line containing `needle`, within `bound`.
fn wait_for_line(rx: &mpsc::Receiver<String>, needle: &str, bound: Duration) -> String {
    let deadline = Instant::now() + bound;
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return line,
            Ok(line) => seen.push(line),
            Err(_) => break,
        }
    }
    panic!("no line with {needle:?} within {bound:?}; saw {seen:?}");
}

/// The gateway's `flotilla_gateway_in_flight_requests`, from its admin port.
fn in_flight(admin: SocketAddr) -> f64 {
    let Ok(mut s) = TcpStream::connect(admin) else { return 0.0 };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.lines()
        .find_map(|l| l.strip_prefix("flotilla_gateway_in_flight_requests "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

fn interrupt(child: &Child) {
    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
}

/// Kills what is left, whatever the test's outcome.
struct Reaper(Vec<Child>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `flotilla up` on free loopback ports with `envs` set, and its stdout and stderr lines.
fn start_up(envs: &[(&str, &str)]) -> (Reaper, mpsc::Receiver<String>, mpsc::Receiver<String>) {
    let up = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(["up", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .env_remove("RUST_LOG")
        .envs(envs.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut reaper = Reaper(vec![up]);
    let out = lines(reaper.0[0].stdout.take().unwrap());
    let err = lines(reaper.0[0].stderr.take().unwrap());
    (reaper, out, err)
}

/// How `child` exited, waited for within `bound`; `what` names the failure.
fn exit_status(child: &mut Child, bound: Duration, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + bound;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_second_ctrl_c_stops_up_at_once_while_a_call_is_in_flight() {
    let (mut reaper, out, err) = start_up(&[]);
    let banner = wait_for_line(&out, "gateway", Duration::from_secs(30));
    let addr = |key: &str| -> SocketAddr {
        let field = banner.split_whitespace().find_map(|w| w.strip_prefix(key)).unwrap();
        field.parse().unwrap_or_else(|e| panic!("{field:?} in {banner:?}: {e}"))
    };
    let (grpc, admin) = (addr("grpc="), addr("admin="));
    wait_for_line(&out, "flotilla is up", Duration::from_secs(30));

    // A sync call that lasts 20 s.
    let dir = tempfile::tempdir().unwrap();
    let task = dir.path().join("slow.yaml");
    std::fs::write(&task, "type: echo_sync\ncustom:\n  duration_ms: 20000\ninputs:\n  x: 1\n").unwrap();
    let client = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(["create", &task.display().to_string(), "--gateway", &grpc.to_string(), "--timeout", "60"])
        .env_remove("FLOTILLA_TOKEN")
        .env_remove("FLOTILLA_TLS")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    reaper.0.push(client);
    let deadline = Instant::now() + Duration::from_secs(30);
    while in_flight(admin) < 1.0 {
        assert!(Instant::now() < deadline, "the sync call never reached the gateway");
        std::thread::sleep(Duration::from_millis(20));
    }

    interrupt(&reaper.0[0]);
    let said = wait_for_line(&err, "stopping", Duration::from_secs(10));
    assert!(said.contains("up to 30s") && said.contains("a second Ctrl-C or SIGTERM stops now"), "{said}");
    // The call holds the fleet up...
    assert!(reaper.0[0].try_wait().unwrap().is_none(), "up exited before its in-flight call ended");
    // ...until a second Ctrl-C.
    interrupt(&reaper.0[0]);
    let status =
        exit_status(&mut reaper.0[0], Duration::from_secs(10), "up kept running after a second Ctrl-C");
    assert_eq!(status.code(), Some(130), "{status}");
    wait_for_line(&err, "second stop signal", Duration::from_secs(5));
}

#[test]
fn up_takes_the_gateways_token_and_grace_from_the_environment() {
    let (mut reaper, out, err) =
        start_up(&[("FLOTILLA_AUTH_TOKEN", "up-test-token-42"), ("FLOTILLA_SHUTDOWN_GRACE", "7s")]);
    let banner = wait_for_line(&out, "gateway", Duration::from_secs(30));
    let grpc = banner.split_whitespace().find_map(|w| w.strip_prefix("grpc=")).unwrap().to_owned();
    let ready = wait_for_line(&out, "flotilla is up", Duration::from_secs(30));
    assert!(ready.contains("with bearer-token auth"), "{ready}");

    let agents = |token: Option<&str>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_flotilla"));
        command.args(["agents", "--gateway", &grpc, "--timeout", "10"]).env_remove("FLOTILLA_TLS");
        match token {
            Some(t) => command.env("FLOTILLA_TOKEN", t),
            None => command.env_remove("FLOTILLA_TOKEN"),
        };
        command.output().unwrap()
    };
    let refused = agents(None);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{said}");
    assert!(said.contains("Unauthenticated"), "{said}");
    let listed = agents(Some("up-test-token-42"));
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    assert!(String::from_utf8_lossy(&listed.stdout).contains("echo"));

    interrupt(&reaper.0[0]);
    let said = wait_for_line(&err, "stopping", Duration::from_secs(10));
    assert!(said.contains("up to 7s"), "{said}");
    let status = exit_status(
        &mut reaper.0[0],
        Duration::from_secs(20),
        "up kept running after Ctrl-C with nothing in flight",
    );
    assert_eq!(status.code(), Some(0), "{status}");
}
