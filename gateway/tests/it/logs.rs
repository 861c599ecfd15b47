//! Text logs written to something that is not a terminal carry no colour
//! codes, so that the "listening" line can be searched for its addresses.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

/// Runs `binary` with stderr on a pipe and `NO_COLOR` unset, and returns its
/// first log line that names the admin address (waited for, bounded).
fn listening_line(binary: &std::path::Path, envs: &[(&str, &str)]) -> String {
    let mut command = Command::new(binary);
    command
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--log", "info"])
        .env_remove("NO_COLOR")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        command.env(k, v);
    }
    let mut child = command.spawn().unwrap_or_else(|e| panic!("{} starts: {e}", binary.display()));
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("admin") {
                let _ = tx.send(line);
                return;
            }
        }
    });
    let line = rx.recv_timeout(Duration::from_secs(20));
    let _ = child.kill();
    let _ = child.wait();
    line.unwrap_or_else(|_| panic!("{} logged no line naming its admin address in 20 s", binary.display()))
}

#[test]
fn logs_to_a_pipe_are_plain_text() {
    let echo = crate::load::echo_binary();
    let gateway = std::path::Path::new(env!("CARGO_BIN_EXE_flotilla-gateway"));
    for (binary, envs) in
        [(echo.as_path(), vec![]), (gateway, vec![("FLOTILLA_PLUGINS", "echo=static://127.0.0.1:9")])]
    {
        let line = listening_line(binary, &envs);
        assert!(!line.contains('\x1b'), "{}: escape codes in {line:?}", binary.display());
        assert!(line.contains("admin=127.0.0.1:"), "{}: no plain admin=ADDR in {line:?}", binary.display());
    }
}
