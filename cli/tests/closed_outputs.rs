//! Output that cannot be written (stdout or stderr on a full device, a closed
//! pipe) loses the text, never the process: no panic, and SIGTERM still stops
//! `flotilla up`.

use std::{
    fs::File,
    io::{BufRead, BufReader, Read},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

fn full() -> Stdio {
    Stdio::from(File::options().write(true).open("/dev/full").expect("/dev/full"))
}

/// Waits (bounded) for a line of `from` that contains `text`.
fn wait_for_line(child: &mut Child, from: impl Read + Send + 'static, text: &'static str) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            if line.contains(text) {
                let _ = tx.send(());
            }
        }
    });
    if rx.recv_timeout(Duration::from_secs(30)).is_err() {
        let _ = child.kill();
        panic!("no line with {text:?} within 30 s: {:?}", child.wait());
    }
}

/// SIGTERM, then the exit status (bounded).
fn terminate(child: &mut Child) -> std::process::ExitStatus {
    let sent = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill runs");
    assert!(sent.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().expect("waiting") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("SIGTERM ignored for 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn up() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_flotilla"));
    command.args(["up", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--log", "debug"]);
    command
}

#[test]
fn flotilla_up_logging_into_a_full_stderr_still_stops_on_sigterm() {
    let mut child = up().stdout(Stdio::piped()).stderr(full()).spawn().expect("flotilla up starts");
    let stdout = child.stdout.take().expect("piped");
    wait_for_line(&mut child, stdout, "flotilla is up");
    let status = terminate(&mut child);
    assert!(status.success(), "{status:?}");
}

#[test]
fn flotilla_up_printing_into_a_full_stdout_serves_and_stops() {
    let mut child = up().stdout(full()).stderr(Stdio::piped()).spawn().expect("flotilla up starts");
    let stderr = child.stderr.take().expect("piped");
    wait_for_line(&mut child, stderr, "Gateway serving");
    let status = terminate(&mut child);
    assert!(status.success(), "{status:?}");
}

#[test]
fn flotilla_up_with_an_unusable_certificate_exits_64_naming_it() {
    let out = up()
        .args(["--tls-cert-file", "/nonexistent/tls.crt", "--tls-key-file", "/nonexistent/tls.key"])
        .stdin(Stdio::null())
        .output()
        .expect("flotilla up runs");
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/tls.crt"), "{stderr}");
}
