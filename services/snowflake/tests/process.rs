//! The real `flotilla-snowflake` binary, logging at debug level, driven through create, get,
//! delete and a rejected key against the fake SQL API: no secret (the private key or any JWT
//! signed with it) appears in its logs, its metrics, its errors or any `resource_meta`.

use std::{process::Command, time::Duration};

use flotilla_proto::{
    admin,
    core::{self, task_execution::Phase},
    service::async_agent_service_client::AsyncAgentServiceClient,
};
use flotilla_testkit::{
    channel, eventually,
    fakes::snowflake::{Identity, SnowflakeFake, Step},
    http_get,
    process::ServiceProcess,
};

use flotilla_testkit::jwt::TEST_KEY_PKCS8_PEM as KEY_PEM;
const ACCOUNT: &str = "myorg-my_account";
const USER: &str = "flyte_user";

async fn spawn(base_url: &str) -> ServiceProcess {
    ServiceProcess::start(
        env!("CARGO_BIN_EXE_flotilla-snowflake"),
        &["--log", "debug"],
        &[
            ("NO_COLOR", "1"),
            ("_FSEC_SNOWFLAKE_PRIVATE_KEY", KEY_PEM),
            ("FLOTILLA_SNOWFLAKE_BASE_URL", base_url),
            ("FLOTILLA_SECRETS_DIR", "/nonexistent-flotilla-secrets"),
        ],
    )
    .await
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
    let fake = SnowflakeFake::start(Identity::test_key(ACCOUNT, USER)).await;
    fake.script_next(vec![Step::InProgress(None)]);
    let svc = spawn(&fake.url()).await;
    let mut client = AsyncAgentServiceClient::new(channel(svc.addr));
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

    // Each step is logged before it answers; wait until the reader has the last one (the
    // rejected create's).
    let log = eventually("the rejected create's log line", Duration::from_secs(5), || {
        let log = svc.stderr();
        std::future::ready(log.contains("code=\"UNAUTHENTICATED\"").then_some(log))
    })
    .await;
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
        .env_remove("FLYTE_SECRETS_ENV_PREFIX")
        .env_remove("FLYTE_SECRETS_FILE_PREFIX")
        .env("FLOTILLA_SECRETS_DIR", "/nonexistent-flotilla-secrets")
        .output()
        .expect("flotilla-snowflake runs");
    assert!(
        ok.status.success(),
        "no credentials is not a configuration error: {}",
        String::from_utf8_lossy(&ok.stderr)
    );
}
