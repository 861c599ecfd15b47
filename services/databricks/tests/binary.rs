//! The real `flotilla-databricks` binary, configured as an operator would (the
//! token in the mounted secrets directory, the workspace and base URL from the
//! environment), logging at debug level: no secret value may appear in its
//! logs, its errors or the `resource_meta` it hands out.

mod support;

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use flotilla_proto::service::async_agent_service_client::AsyncAgentServiceClient;
use flotilla_testkit::{
    channel,
    fake_http::Reply,
    fakes::databricks::{FakeDatabricks, GET, SUBMIT, Step},
};
use serde_json::json;
use support::*;

const CLIENT_SECRET: &str = "client-secret-for-the-leak-test";

/// The child process; killed on drop.
struct Service {
    child: Child,
    addr: SocketAddr,
    lines: Arc<Mutex<Vec<String>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Service {
    /// Stops the process and returns everything it printed.
    fn stop(mut self) -> Vec<String> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for reader in self.readers.drain(..) {
            reader.join().expect("reader thread");
        }
        self.lines.lock().expect("not poisoned").clone()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(envs: &[(&str, String)]) -> Service {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flotilla-databricks"));
    cmd.args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--log", "debug"])
        .env_remove("RUST_LOG")
        .env_remove("FLYTE_DATABRICKS_ACCESS_TOKEN")
        .env_remove("_FSEC_FLYTE_DATABRICKS_ACCESS_TOKEN")
        .env_remove("FLYTE_SECRETS_DEFAULT_DIR")
        .env_remove("FLYTE_SECRETS_ENV_PREFIX")
        .env_remove("FLYTE_SECRETS_FILE_PREFIX")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("flotilla-databricks starts");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let mut readers = Vec::new();
    for stream in [
        Box::new(child.stderr.take().expect("piped")) as Box<dyn std::io::Read + Send>,
        Box::new(child.stdout.take().expect("piped")),
    ] {
        let (lines, tx) = (lines.clone(), tx.clone());
        readers.push(std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("grpc=").nth(1) {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or_default().to_owned());
                }
                lines.lock().expect("not poisoned").push(line);
            }
        }));
    }
    let addr = rx.recv_timeout(Duration::from_secs(20)).expect("the service logs its address within 20 s");
    Service { child, addr: addr.parse().expect("a socket address in the log"), lines, readers }
}

#[tokio::test]
async fn no_secret_reaches_logs_errors_or_resource_meta() {
    let model = FakeDatabricks::new(TOKEN);
    model.script(vec![Step::life_cycle("RUNNING"), Step::terminated("FAILED", "boom")]);
    let fake = model.start().await;
    let secrets = tempfile::tempdir().unwrap();
    std::fs::write(secrets.path().join("flyte_databricks_access_token"), format!("{TOKEN}\n")).unwrap();
    std::fs::write(secrets.path().join("databricks_client_secret"), CLIENT_SECRET).unwrap();
    model.oauth_client("sp-1", CLIENT_SECRET);
    let svc = spawn(&[
        ("FLOTILLA_SECRETS_DIR", secrets.path().display().to_string()),
        ("FLOTILLA_DATABRICKS_BASE_URL", fake.url()),
        ("FLYTE_DATABRICKS_INSTANCE", INSTANCE.to_owned()),
    ]);
    let mut client = AsyncAgentServiceClient::new(channel(svc.addr));
    let mut seen = Vec::new();

    // Create (after a retried 503), poll, fail, cancel.
    fake.inject(
        SUBMIT,
        Reply::json(503, json!({ "error_code": "TEMPORARILY_UNAVAILABLE", "message": "busy" })),
    );
    let mut custom = classic_custom();
    custom.as_object_mut().unwrap().remove("databricksInstance");
    let meta = client.create_task(create_request("spark", custom)).await.unwrap().into_inner().resource_meta;
    seen.push(String::from_utf8_lossy(&meta).into_owned());
    for _ in 0..2 {
        let r = client.get_task(get_request("spark", &meta)).await.unwrap().into_inner().resource.unwrap();
        seen.push(format!("{r:?}"));
    }
    client.delete_task(delete_request("spark", &meta)).await.unwrap();

    // Errors: a refused token, a malformed answer, a meta from upstream that carries its token.
    fake.inject(
        GET,
        Reply::json(401, json!({ "error_code": "UNAUTHENTICATED", "message": "Invalid access token." })),
    );
    let e = client.get_task(get_request("spark", &meta)).await.unwrap_err();
    seen.push(e.message().to_owned());
    fake.inject(GET, Reply::text(200, "not json"));
    let e = client.get_task(get_request("spark", &meta)).await.unwrap_err();
    seen.push(e.message().to_owned());
    let upstream =
        json!({ "databricks_instance": INSTANCE, "run_id": TOKEN, "auth_token": TOKEN }).to_string();
    let e = client.get_task(get_request("spark", upstream.as_bytes())).await.unwrap_err();
    seen.push(e.message().to_owned());

    // Every API request carried the token from the file, so the service really had it.
    let requests = fake.requests();
    assert!(requests.len() >= 7, "{}", requests.len());
    assert!(requests.iter().all(|r| r.bearer() == Some(TOKEN)));

    // OAuth: the client secret and the access token it buys are secrets too.
    let mut oauth = classic_custom();
    oauth["databricksAuthType"] = json!("oauth_m2m");
    oauth["databricksClientId"] = json!("sp-1");
    let mut request = create_request("spark", oauth);
    request.task_execution_metadata = Some(execution_metadata(7));
    let meta = client.create_task(request).await.unwrap().into_inner().resource_meta;
    seen.push(String::from_utf8_lossy(&meta).into_owned());
    let r = client.get_task(get_request("spark", &meta)).await.unwrap().into_inner().resource.unwrap();
    seen.push(format!("{r:?}"));
    assert_eq!(model.issued_tokens(), ["oauth-access-1"]);

    let lines = svc.stop();
    assert!(lines.iter().any(|l| l.contains("DEBUG")), "debug logging was on: {lines:#?}");
    assert!(lines.iter().any(|l| l.contains("Submitted a Databricks run")), "{lines:#?}");
    for text in lines.iter().chain(&seen) {
        assert!(!text.contains(TOKEN), "the token leaked: {text}");
        assert!(!text.contains("0123456789abcdef"), "part of the token leaked: {text}");
        assert!(
            !text.contains(CLIENT_SECRET) && !text.contains("oauth-access-"),
            "an OAuth secret leaked: {text}"
        );
    }
}

#[tokio::test]
async fn without_credentials_the_binary_starts_and_names_what_is_missing() {
    let empty = tempfile::tempdir().unwrap();
    let svc = spawn(&[("FLOTILLA_SECRETS_DIR", empty.path().display().to_string())]);
    let mut meta_client =
        flotilla_proto::service::agent_metadata_service_client::AgentMetadataServiceClient::new(channel(
            svc.addr,
        ));
    let agents = meta_client
        .list_agents(flotilla_proto::admin::ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert_eq!(agents.len(), 1);
    let mut client = AsyncAgentServiceClient::new(channel(svc.addr));
    let e = client.create_task(create_request("spark", classic_custom())).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    let file = empty.path().join("flyte_databricks_access_token");
    assert!(e.message().contains(&file.display().to_string()), "{}", e.message());
    assert!(e.message().contains("FLYTE_DATABRICKS_ACCESS_TOKEN"), "{}", e.message());
}

#[test]
fn check_config_accepts_the_documented_file_and_names_bad_keys() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "[plugin]\ninstance = \"dbc-1.cloud.databricks.com\"\nbase_url = \"https://proxy.internal/{instance}\"\n\
         allowed_instances = [\"dbc-1.cloud.databricks.com\"]\nauth_type = \"pat\"\n\
         [plugin.http]\nget_timeout = \"2s\"\ncreate_timeout = \"5s\"\n",
    )
    .unwrap();
    let run = |path: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_flotilla-databricks"))
            .args(["--check-config", "--config"])
            .arg(path)
            .env_remove("FLYTE_DATABRICKS_AUTH_TYPE")
            .env_remove("FLOTILLA_DATABRICKS_BASE_URL")
            .output()
            .expect("runs")
    };
    let out = run(&good);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("spark") && stdout.contains("databricks"), "{stdout}");
    // The plugin's own settings, as read from the file.
    for line in [
        "  base_url = https://proxy.internal/{instance}",
        "  instance = dbc-1.cloud.databricks.com",
        "  allowed_instances = dbc-1.cloud.databricks.com",
        "  auth_type = pat",
        "  get_timeout = 2s",
        "  create_timeout = 5s",
    ] {
        assert!(stdout.lines().any(|l| l == line), "no line {line:?} in:\n{stdout}");
    }

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[plugin]\nauth_type = \"kerberos\"\n[plugin.http]\nget_timout = \"2s\"\n").unwrap();
    let out = run(&bad);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("get_timout"), "{stderr}");
}
