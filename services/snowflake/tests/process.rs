//! The real `flotilla-snowflake` binary, logging at debug level, driven through create, get,
//! delete and a rejected key against the fake SQL API: no secret (the private key or any JWT
//! signed with it) appears in its logs, its metrics, its errors or any `resource_meta`.

use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use flotilla_proto::{
    admin,
    core::{self, task_execution::Phase},
    service::async_agent_service_client::AsyncAgentServiceClient,
};
use flotilla_testkit::{
    channel,
    fakes::snowflake::{Identity, SnowflakeFake, Step},
    http_get,
};

const KEY_PEM: &str = include_str!("../../../shared/testkit/keys/test_rsa_pkcs8.pem");
const ACCOUNT: &str = "myorg-my_account";
const USER: &str = "flyte_user";

struct Service {
    child: Child,
    log: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
    grpc: SocketAddr,
    admin: SocketAddr,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Service {
    /// Stops the process and returns everything it logged.
    fn stop(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            r.join().expect("log reader ends at EOF");
        }
        self.log.lock().unwrap().clone()
    }
}

fn spawn(base_url: &str) -> Service {
    let mut child = Command::new(env!("CARGO_BIN_EXE_flotilla-snowflake"))
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--log", "debug"])
        .env("NO_COLOR", "1")
        .env("_FSEC_SNOWFLAKE_PRIVATE_KEY", KEY_PEM)
        .env("FLOTILLA_SNOWFLAKE_BASE_URL", base_url)
        .env("FLOTILLA_SECRETS_DIR", "/nonexistent-flotilla-secrets")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("flotilla-snowflake starts");
    let stderr = child.stderr.take().expect("piped");
    let log = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let sink = Arc::clone(&log);
    let reader = std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !sent && let (Some(g), Some(a)) = (line.split("grpc=").nth(1), line.split("admin=").nth(1)) {
                let first = |s: &str| s.split_whitespace().next().unwrap_or_default().to_owned();
                sent = tx.send((first(g), first(a))).is_ok();
            }
            let mut log = sink.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
    let (grpc, admin) =
        rx.recv_timeout(Duration::from_secs(10)).expect("flotilla-snowflake logs its addresses within 10 s");
    Service {
        child,
        log,
        reader: Some(reader),
        grpc: grpc.parse().expect("gRPC address in the log"),
        admin: admin.parse().expect("admin address in the log"),
    }
}

fn template(user: &str) -> core::TaskTemplate {
    core::TaskTemplate {
        r#type: "snowflake".into(),
        config: [
            ("user", user),
            ("account", ACCOUNT),
            ("database", "D"),
            ("schema", "S"),
            ("warehouse", "W"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect(),
        target: Some(core::task_template::Target::Sql(core::Sql {
            statement: "SELECT 1".into(),
            dialect: 0,
        })),
        ..Default::default()
    }
}

#[tokio::test]
async fn no_secret_reaches_logs_metrics_errors_or_resource_meta() {
    let fake = SnowflakeFake::start(Identity::from_private_pem(KEY_PEM, ACCOUNT, USER)).await;
    fake.script_next(vec![Step::InProgress(None)]);
    let svc = spawn(&fake.url());
    let mut client = AsyncAgentServiceClient::new(channel(svc.grpc));
    let category = admin::TaskCategory { name: "snowflake".into(), version: 0 };

    let mut seen = Vec::new();
    let meta = client
        .create_task(admin::CreateTaskRequest { template: Some(template(USER)), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .resource_meta;
    seen.push(String::from_utf8(meta.clone()).unwrap());
    let r = client
        .get_task(admin::GetTaskRequest {
            task_category: Some(category.clone()),
            resource_meta: meta.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .resource
        .unwrap();
    assert_eq!(r.phase, Phase::Running as i32);
    seen.push(format!("{r:?}"));
    client
        .delete_task(admin::DeleteTaskRequest {
            task_category: Some(category),
            resource_meta: meta,
            ..Default::default()
        })
        .await
        .unwrap();
    let rejected = client
        .create_task(admin::CreateTaskRequest { template: Some(template("intruder")), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(rejected.code(), tonic::Code::Unauthenticated);
    seen.push(rejected.message().to_owned());
    let (status, metrics) = http_get(svc.admin, "/metrics").await;
    assert_eq!(status, 200);
    assert!(metrics.contains("flyte_agent_requests_success_total"), "{metrics}");
    seen.push(metrics);

    let log = svc.stop();
    assert!(log.contains("Submitted statement"), "the debug log has the service's own lines:\n{log}");
    let tokens: Vec<String> =
        fake.http.requests().iter().filter_map(|r| r.bearer().map(str::to_owned)).collect();
    assert_eq!(tokens.len(), 4, "create, get, cancel and the rejected create each sent a JWT");
    let key_lines: Vec<&str> = KEY_PEM.lines().filter(|l| !l.starts_with("-----") && l.len() > 16).collect();
    assert!(!key_lines.is_empty());
    for secret in tokens
        .iter()
        .map(String::as_str)
        .chain(tokens.iter().filter_map(|t| t.rsplit('.').next()))
        .chain(key_lines)
    {
        assert!(!log.contains(secret), "the log holds a secret ({}…):\n{log}", &secret[..12]);
        for s in &seen {
            assert!(!s.contains(secret), "an answer holds a secret ({}…): {s}", &secret[..12]);
        }
    }
}

#[test]
fn a_bad_setting_is_named_and_exits_64() {
    let out = Command::new(env!("CARGO_BIN_EXE_flotilla-snowflake"))
        .args(["--check-config"])
        .env("FLOTILLA_SNOWFLAKE_GET_TIMEOUT", "soon")
        .env("FLOTILLA_SNOWFLAKE_BASE_URL", "ftp://nowhere")
        .output()
        .expect("flotilla-snowflake runs");
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("FLOTILLA_SNOWFLAKE_GET_TIMEOUT"), "{stderr}");
    let ok = Command::new(env!("CARGO_BIN_EXE_flotilla-snowflake"))
        .args(["--check-config"])
        .env_remove("_FSEC_SNOWFLAKE_PRIVATE_KEY")
        .env("FLOTILLA_SECRETS_DIR", "/nonexistent-flotilla-secrets")
        .output()
        .expect("flotilla-snowflake runs");
    assert!(
        ok.status.success(),
        "no credentials is not a configuration error: {}",
        String::from_utf8_lossy(&ok.stderr)
    );
}
