//! The Snowflake plugin served for real over gRPC on 127.0.0.1, against the fake SQL API
//! (`flotilla_testkit::fakes::snowflake`), which verifies every JWT with the test key's public
//! key: what the service sends, field by field, and what each answer becomes.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use flotilla_cloud::secret::SecretStore;
use flotilla_proto::{
    admin,
    core::{self, literal, primitive, scalar, task_execution::Phase},
    service::{
        agent_metadata_service_client::AgentMetadataServiceClient,
        async_agent_service_client::AsyncAgentServiceClient,
    },
};
use flotilla_snowflake::Snowflake;
use flotilla_testkit::{
    RunningService, channel,
    fake_http::Reply,
    fakes::snowflake::{IN_PROGRESS_MESSAGE, Identity, SnowflakeFake, Step},
    spawn_plugin,
};
use serde_json::{Value, json};
use tonic::{Code, transport::Channel};

use flotilla_testkit::jwt::TEST_KEY_PKCS8_PEM as KEY_PEM;
const ACCOUNT: &str = "myorg-my_account";
const USER: &str = "flyte_user";

struct Harness {
    fake: SnowflakeFake,
    _svc: RunningService,
    client: AsyncAgentServiceClient<Channel>,
}

/// The fake accepting the test key for ACCOUNT/USER, and the service pointed at it.
async fn harness_with(settings: &str) -> Harness {
    let fake = SnowflakeFake::start(Identity::test_key(ACCOUNT, USER)).await;
    let table: toml::Table = toml::from_str(&format!(
        "base_url = \"{}\"\nbackoff_initial = \"10ms\"\nbackoff_max = \"50ms\"\n{settings}",
        fake.url()
    ))
    .unwrap();
    let secrets = SecretStore::new("/nonexistent-flotilla-secrets", |name| {
        (name == "_FSEC_SNOWFLAKE_PRIVATE_KEY").then(|| KEY_PEM.to_owned())
    });
    let plugin = Snowflake::from_parts(&table, &|_| None, secrets).unwrap();
    let svc = spawn_plugin(plugin).await;
    let client = AsyncAgentServiceClient::new(channel(svc.addr));
    Harness { fake, _svc: svc, client }
}

async fn harness() -> Harness {
    harness_with("").await
}

fn config(user: &str) -> HashMap<String, String> {
    [
        ("user", user),
        ("account", ACCOUNT),
        ("database", "ANALYTICS"),
        ("schema", "PUBLIC"),
        ("warehouse", "COMPUTE_WH"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

fn template_for(statement: &str, user: &str, with_output: bool) -> core::TaskTemplate {
    let outputs = with_output.then(|| core::VariableMap {
        variables: [(
            "results".to_owned(),
            core::Variable {
                r#type: Some(core::LiteralType {
                    r#type: Some(core::literal_type::Type::StructuredDatasetType(
                        core::StructuredDatasetType::default(),
                    )),
                    ..Default::default()
                }),
                description: "results".into(),
                ..Default::default()
            },
        )]
        .into_iter()
        .collect(),
    });
    core::TaskTemplate {
        r#type: "snowflake".into(),
        config: config(user),
        interface: Some(core::TypedInterface { inputs: None, outputs }),
        target: Some(core::task_template::Target::Sql(core::Sql { statement: statement.into(), dialect: 0 })),
        ..Default::default()
    }
}

fn primitive(value: primitive::Value) -> core::Literal {
    core::Literal {
        value: Some(literal::Value::Scalar(Box::new(core::Scalar {
            value: Some(scalar::Value::Primitive(core::Primitive { value: Some(value) })),
        }))),
        ..Default::default()
    }
}

fn inputs(pairs: Vec<(&str, core::Literal)>) -> core::LiteralMap {
    core::LiteralMap { literals: pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect() }
}

fn category() -> admin::TaskCategory {
    admin::TaskCategory { name: "snowflake".into(), version: 0 }
}

impl Harness {
    async fn create(
        &mut self,
        template: core::TaskTemplate,
        inputs: Option<core::LiteralMap>,
    ) -> Result<Vec<u8>, tonic::Status> {
        self.create_with(admin::CreateTaskRequest {
            template: Some(template),
            inputs,
            output_prefix: "s3://bucket/outputs".into(),
            ..Default::default()
        })
        .await
    }

    async fn create_with(&mut self, request: admin::CreateTaskRequest) -> Result<Vec<u8>, tonic::Status> {
        self.client.create_task(request).await.map(|r| r.into_inner().resource_meta)
    }

    async fn get(&mut self, meta: &[u8]) -> Result<admin::Resource, tonic::Status> {
        let mut request = tonic::Request::new(admin::GetTaskRequest {
            task_category: Some(category()),
            resource_meta: meta.to_vec(),
            ..Default::default()
        });
        // Propeller's default GetTask deadline.
        request.set_timeout(Duration::from_secs(3));
        self.client.get_task(request).await.map(|r| r.into_inner().resource.unwrap_or_default())
    }

    async fn delete(&mut self, meta: &[u8]) -> Result<(), tonic::Status> {
        self.client
            .delete_task(admin::DeleteTaskRequest {
                task_category: Some(category()),
                resource_meta: meta.to_vec(),
                ..Default::default()
            })
            .await
            .map(|_| ())
    }

    async fn started(&mut self, script: Vec<Step>) -> Vec<u8> {
        self.fake.script_next(script);
        self.create(template_for("SELECT 1", USER, true), None).await.unwrap()
    }
}

fn phase(r: &admin::Resource) -> Phase {
    Phase::try_from(r.phase).unwrap()
}

fn meta_json(meta: &[u8]) -> Value {
    serde_json::from_slice(meta).unwrap()
}

#[tokio::test]
async fn a_statement_runs_to_success_and_answers_upstreams_outputs_and_link() {
    let mut h = harness().await;
    let meta = h.create(template_for("SELECT 1", USER, true), None).await.unwrap();
    let statements = h.fake.statements();
    assert_eq!(statements.len(), 1);
    let handle = statements[0].handle.clone();
    assert_eq!(
        meta_json(&meta),
        json!({"user": USER, "account": ACCOUNT, "database": "ANALYTICS", "schema": "PUBLIC",
               "warehouse": "COMPUTE_WH", "query_id": handle, "has_output": true})
    );

    let running = h.get(&meta).await.unwrap();
    assert_eq!(phase(&running), Phase::Running);
    assert!(running.message.contains(IN_PROGRESS_MESSAGE), "{}", running.message);
    assert!(running.outputs.is_none());

    let done = h.get(&meta).await.unwrap();
    assert_eq!(phase(&done), Phase::Succeeded, "{}", done.message);
    let outputs = done.outputs.clone().expect("results on success");
    let results = &outputs.literals["results"];
    let Some(literal::Value::Scalar(s)) = &results.value else { panic!("{results:?}") };
    let Some(scalar::Value::StructuredDataset(ds)) = &s.value else { panic!("{s:?}") };
    assert_eq!(ds.uri, format!("snowflake://{USER}:{ACCOUNT}/COMPUTE_WH/ANALYTICS/PUBLIC/{handle}"));
    assert_eq!(ds.metadata.as_ref().unwrap().structured_dataset_type.as_ref().unwrap().format, "");
    for r in [&running, &done] {
        assert_eq!(r.log_links.len(), 1);
        assert_eq!(r.log_links[0].name, "Snowflake Query Details");
        assert_eq!(
            r.log_links[0].uri,
            format!("https://app.snowflake.com/my_account/myorg/#/compute/history/queries/{handle}/detail")
        );
    }
    assert!(h.fake.auth_failures().is_empty(), "{:?}", h.fake.auth_failures());
}

#[tokio::test]
async fn the_submission_is_what_the_sql_api_documents_field_by_field() {
    let mut h = harness().await;
    let mut template = template_for(
        "SELECT * FROM t WHERE id = %(id)s AND day = '{{ .inputs.day }}' AND ok = %(ok)s AND x > %(x)s AND n IN (%(names)s)",
        USER,
        false,
    );
    template.config.insert("role".into(), "ANALYST".into());
    template.metadata = Some(core::TaskMetadata {
        timeout: Some(prost_types::Duration { seconds: 600, nanos: 0 }),
        ..Default::default()
    });
    let names = core::Literal {
        value: Some(literal::Value::Collection(core::LiteralCollection {
            literals: vec![
                primitive(primitive::Value::StringValue("a".into())),
                primitive(primitive::Value::StringValue("b'; DROP TABLE t; --".into())),
            ],
        })),
        ..Default::default()
    };
    let values = inputs(vec![
        ("id", primitive(primitive::Value::Integer(42))),
        (
            "day",
            primitive(primitive::Value::Datetime(prost_types::Timestamp {
                seconds: 1_704_153_600,
                nanos: 0,
            })),
        ),
        ("ok", primitive(primitive::Value::Boolean(false))),
        ("x", primitive(primitive::Value::FloatValue(2.5))),
        ("names", names),
    ]);
    let meta = h.create(template, Some(values)).await.unwrap();
    assert_eq!(meta_json(&meta)["role"], "ANALYST");
    assert_eq!(meta_json(&meta)["has_output"], false);

    let sent = h.fake.http.requests_to("/api/v2/statements");
    assert_eq!(sent.len(), 1);
    let r = &sent[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/api/v2/statements");
    let request_id = r.query_param("requestId").unwrap();
    assert_eq!(request_id.len(), 36, "{request_id}");
    assert_eq!(r.query_param("async"), Some("true"));
    assert_eq!(r.query_param("retry"), Some("true"));
    assert_eq!(r.header("x-snowflake-authorization-token-type"), Some("KEYPAIR_JWT"));
    assert!(r.header("user-agent").unwrap().starts_with("flotilla-snowflake/"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("accept"), Some("application/json"));
    assert!(r.bearer().is_some_and(|t| t.split('.').count() == 3));
    assert_eq!(
        r.json(),
        json!({
            "statement": "SELECT * FROM t WHERE id = ? AND day = ? AND ok = ? AND x > ? AND n IN (?, ?)",
            "database": "ANALYTICS",
            "schema": "PUBLIC",
            "warehouse": "COMPUTE_WH",
            "role": "ANALYST",
            "timeout": 600,
            "bindings": {
                "1": {"type": "FIXED", "value": "42"},
                "2": {"type": "TEXT", "value": "2024-01-02 00:00:00+00:00"},
                "3": {"type": "BOOLEAN", "value": "false"},
                "4": {"type": "REAL", "value": "2.5"},
                "5": {"type": "TEXT", "value": "a"},
                "6": {"type": "TEXT", "value": "b'; DROP TABLE t; --"},
            },
        })
    );
    assert!(h.fake.auth_failures().is_empty(), "{:?}", h.fake.auth_failures());
}

#[tokio::test]
async fn the_same_attempt_submitted_twice_runs_one_statement() {
    let mut h = harness().await;
    let request = admin::CreateTaskRequest {
        template: Some(template_for("SELECT 1", USER, false)),
        output_prefix: "s3://bucket/run-1".into(),
        task_execution_metadata: Some(admin::TaskExecutionMetadata {
            task_execution_id: Some(core::TaskExecutionIdentifier { retry_attempt: 2, ..Default::default() }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let first = h.create_with(request.clone()).await.unwrap();
    let again = h.create_with(request.clone()).await.unwrap();
    assert_eq!(first, again);
    assert_eq!(h.fake.statements().len(), 1);
    let mut next_attempt = request;
    next_attempt
        .task_execution_metadata
        .as_mut()
        .unwrap()
        .task_execution_id
        .as_mut()
        .unwrap()
        .retry_attempt = 3;
    let other = h.create_with(next_attempt).await.unwrap();
    assert_ne!(meta_json(&first)["query_id"], meta_json(&other)["query_id"]);
    assert_eq!(h.fake.statements().len(), 2);
}

#[tokio::test]
async fn a_failed_statement_is_failed_with_snowflakes_message() {
    let mut h = harness().await;
    let meta = h
        .started(vec![
            Step::InProgress(None),
            Step::failed("100038", "22018", "Numeric value 'abc' is not recognized"),
        ])
        .await;
    assert_eq!(phase(&h.get(&meta).await.unwrap()), Phase::Running);
    let failed = h.get(&meta).await.unwrap();
    assert_eq!(phase(&failed), Phase::Failed);
    assert_eq!(failed.message, "Numeric value 'abc' is not recognized (code 100038, SQL state 22018)");
    assert!(failed.outputs.is_none());
    assert_eq!(failed.log_links.len(), 1);
}

#[tokio::test]
async fn a_compilation_error_at_submission_fails_the_task_not_the_call() {
    let mut h = harness().await;
    let meta = h
        .started(vec![Step::failed(
            "001003",
            "42000",
            "SQL compilation error: syntax error line 1 at position 0 unexpected 'SELEC'.",
        )])
        .await;
    let failed = h.get(&meta).await.unwrap();
    assert_eq!(phase(&failed), Phase::Failed);
    assert!(failed.message.starts_with("SQL compilation error"), "{}", failed.message);
}

#[tokio::test]
async fn every_state_maps_to_its_phase_over_the_wire() {
    let mut h = harness().await;
    let steps = [
        (Step::InProgress(None), Phase::Running),
        (Step::state("QUEUED"), Phase::WaitingForResources),
        (Step::state("RESUMING_WAREHOUSE"), Phase::Initializing),
        (Step::state("QUEUED_REPAIRING_WAREHOUSE"), Phase::WaitingForResources),
        (Step::state("BLOCKED"), Phase::WaitingForResources),
        (Step::state("NO_DATA"), Phase::Queued),
        (Step::state("RESTARTED"), Phase::Running),
        (Step::state("RUNNING"), Phase::Running),
        (Step::state("HYPERSPACE"), Phase::Running),
        (Step::Succeeded, Phase::Succeeded),
    ];
    let meta = h.started(steps.iter().map(|(s, _)| s.clone()).collect()).await;
    for (step, expected) in steps {
        let r = h.get(&meta).await.unwrap();
        assert_eq!(phase(&r), expected, "{step:?}: {}", r.message);
        if let Step::InProgress(Some(name)) = step {
            assert!(
                r.message.contains(&name)
                    || r.message.to_lowercase().contains(&name.to_lowercase().replace('_', " "))
                    || expected == Phase::Running,
                "{name}: {}",
                r.message
            );
        }
    }
    for (script, expected) in [
        (vec![Step::TimedOut], Phase::Failed),
        (
            vec![
                Step::InProgress(None),
                Step::failed(
                    "000603",
                    "XX000",
                    "SQL execution internal error: Processing aborted due to error 300002:2523161652; incident 4457542.",
                ),
            ],
            Phase::RetryableFailed,
        ),
        (
            vec![Step::InProgress(None), Step::failed("000604", "57014", "SQL execution canceled")],
            Phase::Failed,
        ),
    ] {
        let meta = h.started(script.clone()).await;
        let mut r = h.get(&meta).await.unwrap();
        if phase(&r) == Phase::Running {
            r = h.get(&meta).await.unwrap();
        }
        assert_eq!(phase(&r), expected, "{script:?}: {}", r.message);
    }
}

#[tokio::test]
async fn delete_cancels_the_statement_and_is_idempotent() {
    let mut h = harness().await;
    let meta = h.started(vec![Step::InProgress(None)]).await;
    assert_eq!(phase(&h.get(&meta).await.unwrap()), Phase::Running);
    h.delete(&meta).await.unwrap();
    let statement = &h.fake.statements()[0];
    assert!(statement.canceled);
    let cancels = h.fake.http.requests_to(&format!("/api/v2/statements/{}/cancel", statement.handle));
    assert_eq!(cancels.len(), 1);
    assert_eq!(cancels[0].method, "POST");
    assert_eq!(cancels[0].header("x-snowflake-authorization-token-type"), Some("KEYPAIR_JWT"));
    let aborted = h.get(&meta).await.unwrap();
    assert_eq!(phase(&aborted), Phase::Failed, "{}", aborted.message);
    assert!(aborted.message.starts_with("the statement was canceled: "), "{}", aborted.message);
    // Again (422: not executing), and for a statement Snowflake does not know (404).
    h.delete(&meta).await.unwrap();
    let mut unknown = meta_json(&meta);
    unknown["query_id"] = json!("01ffffff-0000-4000-8000-000000000000");
    h.delete(&serde_json::to_vec(&unknown).unwrap()).await.unwrap();
    assert!(h.fake.auth_failures().is_empty(), "{:?}", h.fake.auth_failures());
}

#[tokio::test]
async fn an_upstream_created_resource_meta_is_polled() {
    let mut h = harness().await;
    let meta = h.started(vec![Step::Succeeded]).await;
    let handle = h.fake.statements()[0].handle.clone();
    // Byte for byte what flytekit's connector writes (dataclass order, Python's json.dumps).
    let upstream = format!(
        r#"{{"user": "{USER}", "account": "{ACCOUNT}", "database": "ANALYTICS", "schema": "PUBLIC", "warehouse": "COMPUTE_WH", "query_id": "{handle}", "has_output": true}}"#
    );
    let r = h.get(upstream.as_bytes()).await.unwrap();
    assert_eq!(phase(&r), Phase::Succeeded);
    assert!(r.outputs.is_some());
    drop(meta);
}

#[tokio::test]
async fn a_rejected_key_is_unauthenticated_and_says_so_without_the_token() {
    let mut h = harness().await;
    let e = h.create(template_for("SELECT 1", "someone_else", false), None).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(
        e.message().contains("Snowflake") && e.message().contains("JWT token is invalid"),
        "{}",
        e.message()
    );
    let failures = h.fake.auth_failures();
    assert!(failures.iter().any(|f| f.contains("sub is \"MYORG-MY_ACCOUNT.SOMEONE_ELSE\"")), "{failures:?}");
    let token = h.fake.http.requests()[0].bearer().unwrap().to_owned();
    assert!(!e.message().contains(&token));
    assert_eq!(h.fake.statements().len(), 0);
}

#[tokio::test]
async fn rate_limits_and_server_errors_are_retried_inside_the_deadline() {
    let mut h = harness().await;
    h.fake.http.inject(
        "/api/v2/statements",
        Reply::json(429, json!({"code": "390400", "message": "Too many requests"}))
            .header("retry-after", "0"),
    );
    let meta = h.create(template_for("SELECT 1", USER, false), None).await.unwrap();
    let submits = h.fake.http.requests_to("/api/v2/statements");
    assert_eq!(submits.len(), 2);
    assert_eq!(submits[0].query_param("requestId"), submits[1].query_param("requestId"));
    assert_eq!(h.fake.statements().len(), 1);

    // A server error on submission may hide a statement that started: the retry carries the
    // same requestId with retry=true, so Snowflake answers the statement instead of a second one.
    h.fake.http.inject(
        "/api/v2/statements",
        Reply::json(500, json!({"code": "390500", "message": "Internal error"})),
    );
    let second = h.create(template_for("SELECT 2", USER, false), None).await.unwrap();
    let submits = h.fake.http.requests_to("/api/v2/statements");
    assert_eq!(submits.len(), 4);
    assert_eq!(submits[2].query_param("requestId"), submits[3].query_param("requestId"));
    assert_eq!(h.fake.statements().len(), 2);
    assert_ne!(second, meta);

    let handle = h.fake.statements()[0].handle.clone();
    let path = format!("/api/v2/statements/{handle}");
    h.fake.http.inject(&path, Reply::json(503, json!({"code": "390503", "message": "Service unavailable"})));
    h.fake.http.inject(&path, Reply::text(502, "bad gateway"));
    let r = h.get(&meta).await.unwrap();
    assert_eq!(phase(&r), Phase::Running);
    assert_eq!(h.fake.http.requests_to(&path).len(), 3);
    assert_eq!(h.fake.statements()[0].polls, 1);
}

#[tokio::test]
async fn a_malformed_answer_is_an_internal_error_naming_the_operation() {
    let mut h = harness().await;
    let meta = h.started(vec![Step::InProgress(None)]).await;
    let handle = h.fake.statements()[0].handle.clone();
    h.fake.http.inject(&format!("/api/v2/statements/{handle}"), Reply::text(200, "<html>maintenance</html>"));
    let e = h.get(&meta).await.unwrap_err();
    assert_eq!(e.code(), Code::Internal, "{e:?}");
    assert!(
        e.message().contains("Snowflake") && e.message().contains("get statement status"),
        "{}",
        e.message()
    );

    h.fake.http.inject(
        "/api/v2/statements",
        Reply::json(202, json!({"code": "333334", "message": "no handle here"})),
    );
    let e = h.create(template_for("SELECT 1", USER, false), None).await.unwrap_err();
    assert_eq!(e.code(), Code::Internal, "{e:?}");
    assert!(e.message().contains("statementHandle"), "{}", e.message());

    h.fake.http.inject("/api/v2/statements", Reply::json(202, json!({"statementHandle": "../../admin"})));
    let e = h.create(template_for("SELECT 1", USER, false), None).await.unwrap_err();
    assert_eq!(e.code(), Code::Internal, "{e:?}");

    // A refusal without a statement handle has nothing to poll: the call fails with Snowflake's words.
    h.fake.http.inject(
        "/api/v2/statements",
        Reply::json(422, json!({"code": "002043", "sqlState": "02000", "message": "SQL compilation error: Object does not exist"})),
    );
    let e = h.create(template_for("SELECT 1", USER, false), None).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("Object does not exist (code 002043"), "{}", e.message());
}

#[tokio::test]
async fn a_slow_api_still_gets_an_answer_within_the_get_budget() {
    let mut h = harness_with("get_timeout = \"1s\"").await;
    let meta = h.started(vec![Step::InProgress(None)]).await;
    let handle = h.fake.statements()[0].handle.clone();
    h.fake.http.inject(
        &format!("/api/v2/statements/{handle}"),
        Reply::json(202, json!({})).delay(Duration::from_secs(10)),
    );
    let started = Instant::now();
    let e = h.get(&meta).await.unwrap_err();
    let took = started.elapsed();
    assert!(took < Duration::from_millis(1800), "GetTask took {took:?}");
    assert!(matches!(e.code(), Code::DeadlineExceeded | Code::Unavailable), "{e:?}");
    assert!(e.message().contains("Snowflake"), "{}", e.message());
}

#[tokio::test]
async fn bad_templates_are_invalid_arguments_and_reach_no_api() {
    let mut h = harness().await;
    let mut t = template_for("SELECT 1", USER, false);
    t.config.remove("warehouse");
    t.config.remove("user");
    let e = h.create(t, None).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("user, warehouse"), "{}", e.message());
    let e = h.create(template_for("SELECT %(missing)s", USER, false), None).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("\"missing\""), "{}", e.message());
    let e = h.get(b"not json").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(h.fake.http.requests().is_empty());
}

#[tokio::test]
async fn without_the_key_the_service_advertises_and_names_the_missing_secret() {
    let dir = tempfile::tempdir().unwrap();
    let plugin =
        Snowflake::from_parts(&toml::Table::new(), &|_| None, SecretStore::new(dir.path(), |_| None))
            .unwrap();
    let svc = spawn_plugin(plugin).await;
    let agents = AgentMetadataServiceClient::new(channel(svc.addr))
        .list_agents(admin::ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0].name, "Snowflake Connector");
    assert_eq!(agents[0].supported_task_categories, vec![category()]);
    assert!(!agents[0].is_sync);

    let mut client = AsyncAgentServiceClient::new(channel(svc.addr));
    let e = client
        .create_task(admin::CreateTaskRequest {
            template: Some(template_for("SELECT 1", USER, false)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let file = dir.path().join("snowflake_private_key");
    for needle in ["snowflake_private_key", "_FSEC_SNOWFLAKE_PRIVATE_KEY", &file.display().to_string()] {
        assert!(e.message().contains(needle), "{needle} not in {}", e.message());
    }

    // A mounted file that is not a key: named, never quoted.
    std::fs::write(&file, "not-a-key-but-secret-text").unwrap();
    let e = client
        .create_task(admin::CreateTaskRequest {
            template: Some(template_for("SELECT 1", USER, false)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("snowflake_private_key") && !e.message().contains("not-a-key-but-secret-text"),
        "{}",
        e.message()
    );
}

fn openssl(args: &[&str], input: Option<&[u8]>) -> Vec<u8> {
    use std::io::Write as _;
    let mut child = std::process::Command::new("openssl")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("openssl runs (Debian package openssl)");
    if let Some(bytes) = input {
        child.stdin.take().unwrap().write_all(bytes).unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "openssl {args:?} failed");
    out.stdout
}

#[tokio::test]
async fn the_fake_checks_the_signature_and_fingerprint_as_snowflake_would() {
    // The fingerprint Snowflake shows as RSA_PUBLIC_KEY_FP, computed by openssl.
    let der = openssl(&["pkey", "-pubout", "-outform", "DER"], Some(KEY_PEM.as_bytes()));
    let digest = openssl(&["dgst", "-sha256", "-binary"], Some(&der));
    let b64 = String::from_utf8(openssl(&["base64", "-A"], Some(&digest))).unwrap();
    assert_eq!(der, flotilla_testkit::jwt::TEST_PUBLIC_KEY_DER, "the committed public key is the test key's");
    let identity = Identity::test_key(ACCOUNT, USER);
    assert_eq!(identity.fingerprint(), format!("SHA256:{}", b64.trim()));

    // A fake that holds another user's key refuses our signature.
    let other_key = String::from_utf8(openssl(
        &["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
        None,
    ))
    .unwrap();
    let other_public = openssl(&["pkey", "-pubout", "-outform", "DER"], Some(other_key.as_bytes()));
    let fake = SnowflakeFake::start(Identity::new(ACCOUNT, USER, other_public)).await;
    let table: toml::Table = toml::from_str(&format!("base_url = \"{}\"", fake.url())).unwrap();
    let secrets = SecretStore::new("/nonexistent-flotilla-secrets", |name| {
        (name == "_FSEC_SNOWFLAKE_PRIVATE_KEY").then(|| KEY_PEM.to_owned())
    });
    let svc = spawn_plugin(Snowflake::from_parts(&table, &|_| None, secrets).unwrap()).await;
    let e = AsyncAgentServiceClient::new(channel(svc.addr))
        .create_task(admin::CreateTaskRequest {
            template: Some(template_for("SELECT 1", USER, false)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(fake.auth_failures().iter().any(|f| f.contains("does not verify")), "{:?}", fake.auth_failures());
}

#[tokio::test]
async fn the_fakes_binarys_identity_takes_any_user_of_the_test_key() {
    let fake = SnowflakeFake::start(Identity::any_user_of_test_key()).await;
    let table: toml::Table = toml::from_str(&format!("base_url = \"{}\"", fake.url())).unwrap();
    let secrets = SecretStore::new("/nonexistent-flotilla-secrets", |name| {
        (name == "_FSEC_SNOWFLAKE_PRIVATE_KEY").then(|| KEY_PEM.to_owned())
    });
    let svc = spawn_plugin(Snowflake::from_parts(&table, &|_| None, secrets).unwrap()).await;
    let mut client = AsyncAgentServiceClient::new(channel(svc.addr));
    for user in ["someone", "else"] {
        client
            .create_task(admin::CreateTaskRequest {
                template: Some(template_for("SELECT 1", user, false)),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    assert!(fake.auth_failures().is_empty(), "{:?}", fake.auth_failures());
    assert_eq!(fake.statements().len(), 2);
}

#[tokio::test]
async fn a_404_on_a_statement_is_an_error_not_a_verdict_on_the_task() {
    // The SQL API answers 404 both for a statement it does not know and for a
    // wrong endpoint (a base URL or proxy mistake): no task is failed for it.
    let mut h = harness().await;
    let meta = h.started(vec![Step::InProgress(None)]).await;
    let handle = h.fake.statements()[0].handle.clone();
    h.fake.http.inject(
        &format!("/api/v2/statements/{handle}"),
        Reply::json(404, json!({"code": "390404", "message": "Not Found"})),
    );
    let e = h.get(&meta).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(
        e.message().contains("Not Found") && e.message().contains("get statement status"),
        "{}",
        e.message()
    );
}
