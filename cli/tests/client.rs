//! The `flotilla` subcommands that talk to a running gateway (agents, create,
//! get, delete), run as the real binary against a gateway and an echo service
//! on loopback; here the gateway requires a bearer token, which the CLI sends
//! from `--token` or `FLOTILLA_TOKEN`.

use std::{net::SocketAddr, process::Output};

use flotilla_gateway::{Config, Gateway, config::GatewayConfig, config::PluginConfig};
use flotilla_telemetry::Shutdown;
use flotilla_testkit::{bind_loopback, spawn_plugin};

const TOKEN: &str = "cli-test-token-0123";

/// A gateway requiring [`TOKEN`], in front of an echo service; `tweak` adds to its configuration.
async fn gateway(
    tweak: impl FnOnce(&mut GatewayConfig),
) -> (SocketAddr, Shutdown, flotilla_testkit::RunningService) {
    let echo = spawn_plugin(flotilla_echo::Echo::default()).await;
    let (grpc, admin) = (bind_loopback().await, bind_loopback().await);
    let raw = GatewayConfig {
        listen: grpc.local_addr().unwrap(),
        admin_listen: admin.local_addr().unwrap(),
        auth_token: Some(flotilla_gateway::auth::Secret(TOKEN.to_owned())),
        plugins: vec![PluginConfig {
            name: "echo".into(),
            discovery: format!("static://{}", echo.addr),
            nameserver: None,
            timeout: None,
            timeouts: Default::default(),
            categories: vec![],
        }],
        ..GatewayConfig::default()
    };
    let mut raw = raw;
    tweak(&mut raw);
    let addr = raw.listen;
    let gateway = Gateway::start(Config::validate(raw, vec![]).unwrap()).await.unwrap();
    let shutdown = Shutdown::new();
    tokio::spawn(gateway.serve(grpc, admin, shutdown.clone()));
    (addr, shutdown, echo)
}

/// The `flotilla` binary, with none of the developer's `FLOTILLA_*` client settings.
fn cli() -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_flotilla"));
    for name in ["FLOTILLA_TOKEN", "FLOTILLA_GATEWAY", "FLOTILLA_TLS", "FLOTILLA_TLS_CA"] {
        cmd.env_remove(name);
    }
    cmd
}

/// Runs `flotilla ARGS` (bounded: the CLI's own `--timeout` is 5 s) with `env` set.
async fn flotilla(args: Vec<String>, env: Vec<(&'static str, String)>) -> Output {
    tokio::task::spawn_blocking(move || {
        cli().args(&args).args(["--timeout", "5"]).envs(env).output().expect("flotilla runs")
    })
    .await
    .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn the_cli_sends_its_token_and_a_refusal_is_explained() {
    let (addr, shutdown, _echo) = gateway(|_| {}).await;
    let gw = || vec!["--gateway".to_owned(), addr.to_string()];

    let refused = flotilla([vec!["agents".to_owned()], gw()].concat(), vec![]).await;
    assert!(!refused.status.success());
    let stderr = text(&refused.stderr);
    assert!(stderr.contains("Unauthenticated") && stderr.contains("authorization: Bearer"), "{stderr}");
    assert!(stderr.contains("--token or FLOTILLA_TOKEN"), "{stderr}");

    let listed =
        flotilla([vec!["agents".to_owned()], gw(), vec!["--token".into(), TOKEN.into()]].concat(), vec![])
            .await;
    assert!(listed.status.success(), "{}", text(&listed.stderr));
    // A host name works as well as an address.
    let by_name = format!("localhost:{}", addr.port());
    let named =
        flotilla(vec!["agents".into(), "--gateway".into(), by_name, "--token".into(), TOKEN.into()], vec![])
            .await;
    assert!(named.status.success(), "{}", text(&named.stderr));
    assert!(listed.status.success(), "{}", text(&listed.stderr));
    assert!(text(&listed.stdout).contains("echo"), "{}", text(&listed.stdout));

    // The token from the environment; a task created, read, deleted.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("task.yaml");
    std::fs::write(&file, "type: echo\ninputs:\n  x: 42\n").unwrap();
    let env = || vec![("FLOTILLA_TOKEN", TOKEN.to_owned())];
    let created = flotilla([vec!["create".into(), file.display().to_string()], gw()].concat(), env()).await;
    assert!(created.status.success(), "{}", text(&created.stderr));
    let handle =
        text(&created.stdout).split_whitespace().find(|w| w.starts_with("echo:0:")).map(str::to_owned);
    let handle = handle.unwrap_or_else(|| panic!("no handle in {:?}", text(&created.stdout)));
    let got = flotilla([vec!["get".into(), handle.clone()], gw()].concat(), env()).await;
    assert!(got.status.success(), "{}", text(&got.stderr));
    assert!(text(&got.stdout).contains("42"), "{}", text(&got.stdout));
    // create's whole line, as `flotilla get "$(flotilla create ...)"` passes it, works too.
    let line = text(&created.stdout).trim().to_owned();
    assert!(line.starts_with("created "), "{line}");
    let got = flotilla([vec!["get".into(), line], gw()].concat(), env()).await;
    assert!(got.status.success(), "{}", text(&got.stderr));
    let deleted = flotilla([vec!["delete".into(), handle], gw()].concat(), env()).await;
    assert!(deleted.status.success(), "{}", text(&deleted.stderr));

    // A token that cannot travel in a header is named as the problem, not sent.
    let bad = flotilla(
        [vec!["agents".to_owned()], gw(), vec!["--token".into(), "two words".into()]].concat(),
        vec![],
    )
    .await;
    assert!(!bad.status.success());
    assert!(text(&bad.stderr).contains("--token"), "{}", text(&bad.stderr));
    shutdown.trigger();
}

#[tokio::test]
async fn the_cli_talks_tls_to_a_tls_gateway_and_says_so_when_it_was_not_asked_to() {
    let ca = flotilla_testkit::tls::TestCa::new();
    let files = ca.issue("gateway");
    let (addr, shutdown, _echo) = gateway(|c| {
        c.tls_cert_file = Some(files.cert.clone());
        c.tls_key_file = Some(files.key.clone());
    })
    .await;
    let args = |extra: &[&str]| {
        let mut a = vec!["agents".to_owned(), "--gateway".into(), addr.to_string()];
        a.extend(extra.iter().map(|s| (*s).to_owned()));
        a
    };
    let token = || vec![("FLOTILLA_TOKEN", TOKEN.to_owned())];

    let ca_pem = ca.ca_pem().display().to_string();
    let listed = flotilla(args(&["--tls-ca", &ca_pem]), token()).await;
    assert!(listed.status.success(), "{}", text(&listed.stderr));
    assert!(text(&listed.stdout).contains("echo"), "{}", text(&listed.stdout));
    // The CA from the environment, and the certificate's other name.
    let named = flotilla(
        args(&["--tls-server-name", "localhost"]),
        [token(), vec![("FLOTILLA_TLS_CA", ca_pem.clone())]].concat(),
    )
    .await;
    assert!(named.status.success(), "{}", text(&named.stderr));

    // Plaintext to a TLS gateway: the error suggests --tls.
    let plain = flotilla(args(&[]), token()).await;
    assert!(!plain.status.success());
    assert!(text(&plain.stderr).contains("--tls"), "{}", text(&plain.stderr));
    // TLS with the system's roots only: this CA is not among them.
    let untrusted = flotilla(args(&["--tls"]), token()).await;
    assert!(!untrusted.status.success());
    assert!(text(&untrusted.stderr).contains("certificate"), "{}", text(&untrusted.stderr));
    shutdown.trigger();
}

#[tokio::test]
async fn a_call_that_outlasts_timeout_says_so_not_that_the_connection_failed() {
    let (addr, shutdown, _echo) = gateway(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("slow.yaml");
    std::fs::write(&file, "type: echo_sync\ncustom:\n  duration_ms: 3000\ninputs:\n  x: 1\n").unwrap();
    let out = tokio::task::spawn_blocking(move || {
        cli()
            .args(["create", &file.display().to_string(), "--gateway", &addr.to_string(), "--timeout", "0.3"])
            .env("FLOTILLA_TOKEN", TOKEN)
            .output()
            .expect("flotilla runs")
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("no answer within --timeout"), "{stderr}");
    assert!(!stderr.contains("TLS"), "{stderr}");
    shutdown.trigger();
}

/// `flotilla ARGS` with `input` on standard input (bounded by its `--timeout 5`).
async fn flotilla_with_stdin(args: Vec<String>, input: Vec<u8>) -> Output {
    tokio::task::spawn_blocking(move || {
        use std::io::Write as _;
        let mut child = cli()
            .args(&args)
            .args(["--timeout", "5"])
            .env("FLOTILLA_TOKEN", TOKEN)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("flotilla runs");
        child.stdin.take().unwrap().write_all(&input).unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn a_handle_too_long_for_a_command_line_is_read_from_stdin_and_a_failed_task_exits_3() {
    let (addr, shutdown, _echo) = gateway(|_| {}).await;
    let gw = || vec!["--gateway".to_owned(), addr.to_string()];
    let env = || vec![("FLOTILLA_TOKEN", TOKEN.to_owned())];
    let dir = tempfile::tempdir().unwrap();
    // 300 KB of input: its handle is longer than Linux lets one argument be (128 KiB).
    let big = "x".repeat(300_000);
    let file = dir.path().join("big.yaml");
    std::fs::write(&file, format!("type: echo\ninputs:\n  big: {big}\n")).unwrap();
    let created = flotilla([vec!["create".into(), file.display().to_string()], gw()].concat(), env()).await;
    assert!(created.status.success(), "{}", text(&created.stderr));
    assert!(created.stdout.len() > 128 * 1024, "the handle is {} bytes", created.stdout.len());
    // create's whole output goes in, `created ` and all.
    let got =
        flotilla_with_stdin([vec!["get".into(), "-".into()], gw()].concat(), created.stdout.clone()).await;
    assert!(got.status.success(), "{}", text(&got.stderr));
    assert!(text(&got.stdout).contains("phase: SUCCEEDED") && text(&got.stdout).contains(&big));
    let deleted =
        flotilla_with_stdin([vec!["delete".into(), "-".into()], gw()].concat(), created.stdout).await;
    assert!(deleted.status.success(), "{}", text(&deleted.stderr));
    let nothing = flotilla_with_stdin([vec!["get".into(), "-".into()], gw()].concat(), Vec::new()).await;
    assert!(text(&nothing.stderr).contains("is not a task handle"), "{}", text(&nothing.stderr));

    // A task that ends FAILED exits 3, not clap's 2 for a bad command line.
    let failing = dir.path().join("fail.yaml");
    std::fs::write(&failing, "type: echo\ncustom:\n  fail_with: no luck\ninputs:\n  x: 1\n").unwrap();
    let out = flotilla(
        [vec!["create".into(), failing.display().to_string(), "--wait".into()], gw()].concat(),
        env(),
    )
    .await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("phase: FAILED") && text(&out.stdout).contains("no luck"));
    // create --wait's whole output on standard input: its `created` line is the handle.
    let got = flotilla_with_stdin([vec!["get".into(), "-".into()], gw()].concat(), out.stdout).await;
    assert_eq!(got.status.code(), Some(3), "{}", text(&got.stderr));
    assert!(text(&got.stdout).contains("no luck"), "{}", text(&got.stdout));
    shutdown.trigger();
}

#[tokio::test]
async fn json_output_is_one_document_a_script_can_read() {
    let (addr, shutdown, _echo) = gateway(|_| {}).await;
    let gw = || vec!["--gateway".to_owned(), addr.to_string(), "-o".into(), "json".into()];
    let env = || vec![("FLOTILLA_TOKEN", TOKEN.to_owned())];
    let json = |out: &Output| -> serde_json::Value {
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", text(&out.stdout), text(&out.stderr)))
    };

    let agents = flotilla([vec!["agents".into()], gw()].concat(), env()).await;
    assert!(agents.status.success(), "{}", text(&agents.stderr));
    let agents = json(&agents);
    let echo = agents.as_array().unwrap().iter().find(|a| a["kind"] == "async").unwrap();
    assert_eq!(echo["task_types"][0], serde_json::json!({"name": "echo", "version": 0}));

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("task.yaml");
    std::fs::write(&file, "type: echo\ninputs:\n  x: 42\n  tags: [a, b]\n").unwrap();
    let created = flotilla([vec!["create".into(), file.display().to_string()], gw()].concat(), env()).await;
    assert!(created.status.success(), "{}", text(&created.stderr));
    let handle = json(&created)["handle"].as_str().unwrap().to_owned();
    let got = flotilla([vec!["get".into(), handle.clone()], gw()].concat(), env()).await;
    let got = json(&got);
    assert_eq!(got["phase"], "SUCCEEDED");
    assert_eq!(got["outputs"], serde_json::json!({"x": 42, "tags": ["a", "b"]}));
    let deleted = flotilla([vec!["delete".into(), handle], gw()].concat(), env()).await;
    assert_eq!(json(&deleted), serde_json::json!({"deleted": true}));

    // --wait: still one document, the handle going to standard error.
    std::fs::write(&file, "type: echo\ncustom:\n  fail_with: no luck\ninputs:\n  x: 1\n").unwrap();
    let failed =
        flotilla([vec!["create".into(), file.display().to_string(), "--wait".into()], gw()].concat(), env())
            .await;
    assert_eq!(failed.status.code(), Some(3), "{}", text(&failed.stderr));
    let doc = json(&failed);
    assert_eq!((doc["phase"].as_str(), doc["message"].as_str()), (Some("FAILED"), Some("no luck")));
    let handle = doc["handle"].as_str().unwrap();
    assert!(text(&failed.stderr).contains(&format!("created {handle}")), "{}", text(&failed.stderr));
    // create -o json's document is a handle `get -` reads.
    let again =
        flotilla_with_stdin([vec!["get".into(), "-".into()], gw()].concat(), failed.stdout.clone()).await;
    assert_eq!(json(&again)["message"], "no luck");
    shutdown.trigger();
}

#[tokio::test]
async fn a_connection_reset_mid_call_is_named_with_its_cause() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    // A "gateway" that takes the connection (an empty SETTINGS frame), reads the whole call (to
    // the frame that ends its stream), then resets the connection instead of answering.
    let listener = bind_loopback().await;
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let _ = socket.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await;
            let mut preface = [0; 24];
            if socket.read_exact(&mut preface).await.is_err() {
                continue;
            }
            loop {
                let mut head = [0; 9];
                if socket.read_exact(&mut head).await.is_err() {
                    break;
                }
                let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
                let mut payload = vec![0; len];
                if socket.read_exact(&mut payload).await.is_err() {
                    break;
                }
                // HEADERS or DATA with END_STREAM: the call is all in.
                if head[3] <= 1 && head[4] & 1 == 1 {
                    break;
                }
            }
            let _ = socket.set_zero_linger();
            drop(socket);
        }
    });
    let out = flotilla(vec!["agents".into(), "--gateway".into(), addr.to_string()], vec![]).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    // The cause (a reset, or a broken pipe if the reset came while the call was still being
    // written), once, then the hint.
    let cause = stderr
        .split_once("transport error: connection error: ")
        .and_then(|(_, rest)| rest.split_once(" (the connection to the gateway failed: was it stopped?"))
        .map(|(cause, _)| cause.to_owned());
    let cause = cause.unwrap_or_else(|| panic!("no cause and hint in {stderr}"));
    assert!(!cause.is_empty() && stderr.matches(cause.as_str()).count() == 1, "{stderr}");
}

/// A result that cannot be written (stdout on a full device) is an error, not
/// a silent success; a created task's handle then goes to stderr, so the task
/// is never left running with no way to reach it.
#[tokio::test]
async fn a_result_that_cannot_be_written_fails_and_a_created_tasks_handle_still_reaches_stderr() {
    let (addr, shutdown, _echo) = gateway(|_| {}).await;
    let gw = || vec!["--gateway".to_owned(), addr.to_string()];
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("task.yaml");
    std::fs::write(&file, "type: echo\ninputs:\n  x: 41\n").unwrap();
    let into_full = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            cli()
                .args(&args)
                .args(["--timeout", "5"])
                .env("FLOTILLA_TOKEN", TOKEN)
                .stdout(std::fs::File::options().write(true).open("/dev/full").expect("/dev/full"))
                .output()
                .expect("flotilla runs")
        })
    };
    for output in [vec![], vec!["-o".to_owned(), "json".to_owned()]] {
        let created =
            into_full([vec!["create".into(), file.display().to_string()], output.clone(), gw()].concat())
                .await
                .unwrap();
        assert_eq!(created.status.code(), Some(1), "{output:?}: {}", text(&created.stderr));
        let stderr = text(&created.stderr);
        assert!(stderr.contains("the task was created") && stderr.contains("standard output"), "{stderr}");
        // The handle on stderr reaches the task.
        let handle = stderr.split("its handle: ").nth(1).expect("the handle is said").trim().to_owned();
        let got =
            flotilla([vec!["get".into(), handle], gw()].concat(), vec![("FLOTILLA_TOKEN", TOKEN.to_owned())])
                .await;
        assert!(text(&got.stdout).contains("phase: SUCCEEDED"), "{}", text(&got.stderr));
        // And a get or a listing that cannot be written fails too.
        let listed = into_full([vec!["agents".into()], output, gw()].concat()).await.unwrap();
        assert_eq!(listed.status.code(), Some(1), "{}", text(&listed.stderr));
    }
    shutdown.trigger();
}

#[tokio::test]
async fn create_wait_that_loses_the_gateway_names_the_task_it_created() {
    use std::io::BufRead as _;
    let (addr, shutdown, _echo) = gateway(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("slow.yaml");
    // Running for a minute: the wait outlives the gateway.
    std::fs::write(&file, "type: echo\ncustom:\n  duration_ms: 60000\ninputs:\n  x: 1\n").unwrap();
    let mut child = cli()
        .args(["create", &file.display().to_string(), "--wait", "--timeout", "5"])
        .args(["--gateway", &addr.to_string(), "--token", TOKEN])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("flotilla runs");
    let stdout = child.stdout.take().unwrap();
    let first = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line).map(|_| line)
    });
    let first = tokio::time::timeout(std::time::Duration::from_secs(10), first)
        .await
        .expect("create prints its handle within 10 s")
        .unwrap()
        .unwrap();
    let handle = first.trim().strip_prefix("created ").unwrap_or_else(|| panic!("{first:?}")).to_owned();

    shutdown.trigger();
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await
    .expect("the CLI gives up within 20 s of losing the gateway")
    .unwrap()
    .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("may still be running") && stderr.contains(&format!("created {handle}")),
        "{stderr}"
    );
}
