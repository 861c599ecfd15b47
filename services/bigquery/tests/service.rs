//! The BigQuery service over real gRPC on 127.0.0.1, against the fake BigQuery API, token
//! endpoint and metadata server in flotilla-testkit.

use std::{collections::HashMap, path::Path, time::Duration};

use flotilla_bigquery::BigQuery;
use flotilla_proto::{
    admin,
    core::{self, task_execution::Phase},
    service::async_agent_service_client::AsyncAgentServiceClient,
};
use flotilla_sdk::{Plugin as _, ServiceConfig};
use flotilla_testkit::{
    channel,
    fake_http::Reply,
    fakes::bigquery::{FakeBigQuery, JobStep, google_error},
    jwt::{TEST_KEY_PKCS8_PEM, TEST_PUBLIC_KEY_DER},
    process::ServiceProcess,
    spawn_plugin,
};
use prost_types::value::Kind;
use serde_json::{Value, json};
use tonic::Code;

const TASK: &str = "bigquery_query_job_task";

fn string(s: &str) -> prost_types::Value {
    prost_types::Value { kind: Some(Kind::StringValue(s.into())) }
}

/// A template shaped like flytekitplugins-bigquery's: `custom` = ProjectID, Location, Domain and
/// QueryJobConfig REST keys; the query in `sql`.
fn template(query: &str) -> core::TaskTemplate {
    let custom = prost_types::Struct {
        fields: [
            ("ProjectID".to_owned(), string("flyte-project")),
            ("Location".to_owned(), string("EU")),
            ("Domain".to_owned(), string("development")),
            ("priority".to_owned(), string("BATCH")),
            ("maximumBytesBilled".to_owned(), string("1000000")),
        ]
        .into_iter()
        .collect(),
    };
    core::TaskTemplate {
        r#type: TASK.into(),
        custom: Some(custom),
        target: Some(core::task_template::Target::Sql(core::Sql { statement: query.into(), dialect: 0 })),
        ..Default::default()
    }
}

fn int(i: i64) -> core::Literal {
    primitive(core::primitive::Value::Integer(i))
}

fn primitive(v: core::primitive::Value) -> core::Literal {
    core::Literal {
        value: Some(core::literal::Value::Scalar(Box::new(core::Scalar {
            value: Some(core::scalar::Value::Primitive(core::Primitive { value: Some(v) })),
        }))),
        ..Default::default()
    }
}

fn key_file(dir: &Path, token_uri: &str) -> String {
    let path = dir.join("sa.json");
    let key = json!({
        "type": "service_account",
        "project_id": "flyte-project",
        "private_key_id": "abc",
        "private_key": TEST_KEY_PKCS8_PEM,
        "client_email": "flyte@flyte-project.iam.gserviceaccount.com",
        "token_uri": token_uri,
    });
    std::fs::write(&path, key.to_string()).unwrap();
    path.display().to_string()
}

/// The plugin with these environment variables and `[plugin]` settings.
fn plugin(env: &[(&str, String)], plugin_toml: &str) -> BigQuery {
    let env: HashMap<String, String> = env.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
    let config = ServiceConfig { plugin: toml::from_str(plugin_toml).unwrap(), ..ServiceConfig::default() };
    BigQuery::from_config_with_env(&config, &move |k| env.get(k).cloned()).unwrap()
}

struct Rig {
    fake: FakeBigQuery,
    client: AsyncAgentServiceClient<tonic::transport::Channel>,
    _dir: tempfile::TempDir,
    _svc: flotilla_testkit::RunningService,
}

async fn rig(plugin_toml: &str) -> Rig {
    let fake = FakeBigQuery::start(TEST_PUBLIC_KEY_DER.to_vec()).await;
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), &fake.token_uri());
    let p = plugin(
        &[("FLOTILLA_BIGQUERY_BASE_URL", fake.url()), ("GOOGLE_APPLICATION_CREDENTIALS", key)],
        plugin_toml,
    );
    let svc = spawn_plugin(p).await;
    let client = AsyncAgentServiceClient::new(channel(svc.addr));
    Rig { fake, client, _dir: dir, _svc: svc }
}

fn category() -> Option<admin::TaskCategory> {
    Some(admin::TaskCategory { name: TASK.into(), version: 0 })
}

async fn create(rig: &mut Rig, inputs: Option<core::LiteralMap>) -> Vec<u8> {
    let request = admin::CreateTaskRequest {
        inputs,
        template: Some(template("SELECT * FROM t WHERE n > @n AND s = @s")),
        output_prefix: "s3://bucket/out".into(),
        task_execution_metadata: None,
    };
    rig.client.create_task(request).await.unwrap().into_inner().resource_meta
}

async fn get(rig: &mut Rig, meta: &[u8]) -> Result<admin::Resource, tonic::Status> {
    let request = admin::GetTaskRequest {
        task_category: category(),
        resource_meta: meta.to_vec(),
        ..Default::default()
    };
    rig.client.get_task(request).await.map(|r| r.into_inner().resource.expect("resource is set"))
}

#[tokio::test]
async fn a_query_job_runs_from_insert_to_results() {
    let mut rig = rig("").await;
    let inputs = core::LiteralMap {
        literals: [
            ("n".to_owned(), int(42)),
            ("s".to_owned(), primitive(core::primitive::Value::StringValue("x".into()))),
        ]
        .into_iter()
        .collect(),
    };
    let meta = create(&mut rig, Some(inputs)).await;

    // resource_meta is upstream's job reference and nothing else.
    let meta_json: Value = serde_json::from_slice(&meta).unwrap();
    let job_id = meta_json["job_id"].as_str().unwrap().to_owned();
    assert_eq!(meta_json, json!({"job_id": job_id, "project": "flyte-project", "location": "EU"}));

    let insert = &rig.fake.http.requests_to("/bigquery/v2/projects/flyte-project/jobs")[0];
    assert_eq!(insert.method, "POST");
    assert!(insert.bearer().is_some_and(|t| t.starts_with("ya29.fake-")));
    // The key file names no quota project: none is sent.
    assert_eq!(insert.header("x-goog-user-project"), None);
    let body = insert.json();
    assert_eq!(
        body["jobReference"],
        json!({"projectId": "flyte-project", "jobId": job_id, "location": "EU"})
    );
    let query = &body["configuration"]["query"];
    assert_eq!(query["query"], "SELECT * FROM t WHERE n > @n AND s = @s");
    assert_eq!(query["useLegacySql"], false);
    assert_eq!(query["parameterMode"], "NAMED");
    assert_eq!(
        query["queryParameters"],
        json!([
            {"name": "n", "parameterType": {"type": "INT64"}, "parameterValue": {"value": "42"}},
            {"name": "s", "parameterType": {"type": "STRING"}, "parameterValue": {"value": "x"}},
        ])
    );
    // The template's job-config keys go to BigQuery; the task's own keys do not.
    assert_eq!(
        (query["priority"].as_str(), query["maximumBytesBilled"].as_str()),
        (Some("BATCH"), Some("1000000"))
    );
    assert!(query.get("ProjectID").is_none() && query.get("Domain").is_none());

    let first = get(&mut rig, &meta).await.unwrap();
    assert_eq!(first.phase, Phase::Initializing as i32);
    let link = &first.log_links[0];
    assert_eq!(link.name, "BigQuery Console");
    assert_eq!(
        link.uri,
        format!(
            "https://console.cloud.google.com/bigquery?project=flyte-project&j=bq:EU:{job_id}&page=queryresults"
        )
    );
    assert_eq!(get(&mut rig, &meta).await.unwrap().phase, Phase::Running as i32);
    let done = get(&mut rig, &meta).await.unwrap();
    assert_eq!(done.phase, Phase::Succeeded as i32);
    let results = &done.outputs.unwrap().literals["results"];
    let Some(core::literal::Value::Scalar(s)) = &results.value else { panic!("{results:?}") };
    let Some(core::scalar::Value::StructuredDataset(d)) = &s.value else { panic!("{s:?}") };
    assert_eq!(d.uri, format!("bq://flyte-project:_anon_fake.anon_{job_id}"));
    let gets = rig.fake.http.requests().into_iter().filter(|r| r.method == "GET").collect::<Vec<_>>();
    assert_eq!(gets[0].path, format!("/bigquery/v2/projects/flyte-project/jobs/{job_id}"));
    assert_eq!(gets[0].query_param("location"), Some("EU"));
    // One token for the whole conversation: it is cached.
    assert_eq!(rig.fake.issued_tokens().len(), 1);
}

#[tokio::test]
async fn failed_jobs_are_failed_and_backend_errors_retryable() {
    let mut rig = rig("").await;
    rig.fake.script_next_job(vec![JobStep::Failed {
        reason: "invalidQuery".into(),
        message: "Syntax error: Unexpected keyword WHERE at [1:10]".into(),
    }]);
    let meta = create(&mut rig, None).await;
    let r = get(&mut rig, &meta).await.unwrap();
    assert_eq!(r.phase, Phase::Failed as i32);
    assert_eq!(r.message, "invalidQuery: Syntax error: Unexpected keyword WHERE at [1:10]");

    rig.fake.script_next_job(vec![JobStep::Failed {
        reason: "backendError".into(),
        message: "try again".into(),
    }]);
    let meta = create(&mut rig, None).await;
    assert_eq!(get(&mut rig, &meta).await.unwrap().phase, Phase::RetryableFailed as i32);

    rig.fake.script_next_job(vec![JobStep::Raw("SUSPENDED".into())]);
    let meta = create(&mut rig, None).await;
    let r = get(&mut rig, &meta).await.unwrap();
    assert_eq!((r.phase, r.message.as_str()), (Phase::Running as i32, "BigQuery job state SUSPENDED"));
}

#[tokio::test]
async fn delete_cancels_the_job_and_is_idempotent() {
    let mut rig = rig("").await;
    rig.fake.script_next_job(vec![JobStep::Running]);
    let meta = create(&mut rig, None).await;
    let job_id = rig.fake.job_ids().pop().unwrap();
    let delete = admin::DeleteTaskRequest {
        task_category: category(),
        resource_meta: meta.clone(),
        ..Default::default()
    };
    rig.client.delete_task(delete.clone()).await.unwrap();
    assert!(rig.fake.cancelled(&job_id));
    let cancel =
        rig.fake.http.requests_to(&format!("/bigquery/v2/projects/flyte-project/jobs/{job_id}/cancel"));
    assert_eq!((cancel.len(), cancel[0].query_param("location")), (1, Some("EU")));
    assert_eq!(get(&mut rig, &meta).await.unwrap().phase, Phase::Failed as i32);
    // A job BigQuery no longer knows: deleting again still succeeds.
    let gone =
        serde_json::to_vec(&json!({"job_id": "nope", "project": "flyte-project", "location": "EU"})).unwrap();
    rig.client
        .delete_task(admin::DeleteTaskRequest { resource_meta: gone.clone(), ..delete.clone() })
        .await
        .unwrap();
    // Polling it: BigQuery's "Not found: Job" fails the task, with its words.
    let r = get(&mut rig, &gone).await.expect("a FAILED task, not an error");
    assert_eq!(r.phase, Phase::Failed as i32);
    assert!(r.message.contains("no longer exists") && r.message.contains("Not found: Job"), "{}", r.message);
    // A 404 that is not about the job (a wrong base URL, a proxy's page) is an error, not a verdict.
    for reply in [
        google_error(404, "NOT_FOUND", "notFound", "Not found: URL /wrong/bigquery/v2/projects"),
        Reply::json(404, json!({"error": {"code": 404, "message": "Requested entity was not found."}})),
    ] {
        rig.fake.http.inject("/bigquery/v2/projects/flyte-project/jobs/", reply.clone());
        let e = get(&mut rig, &meta).await.expect_err("an error");
        assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
        // Nor does such a 404 cancel anything: delete says so, for propeller to retry the abort.
        rig.fake.http.inject("/bigquery/v2/projects/flyte-project/jobs/", reply);
        let e = rig.client.delete_task(delete.clone()).await.expect_err("an error");
        assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
        assert!(e.message().contains("jobs.cancel"), "{}", e.message());
    }
}

#[tokio::test]
async fn rate_limits_and_server_errors_are_retried_inside_the_call() {
    let mut rig = rig("").await;
    rig.fake.http.inject(
        "/bigquery/v2/projects/flyte-project/jobs",
        google_error(429, "RESOURCE_EXHAUSTED", "rateLimitExceeded", "Exceeded rate limits"),
    );
    rig.fake.http.inject("/bigquery/v2/projects/flyte-project/jobs", Reply::text(503, "Service Unavailable"));
    // BigQuery's documented answer to too many API requests: 403, reason rateLimitExceeded.
    rig.fake.http.inject(
        "/bigquery/v2/projects/flyte-project/jobs",
        google_error(
            403,
            "PERMISSION_DENIED",
            "rateLimitExceeded",
            "Exceeded rate limits: too many api requests",
        ),
    );
    let meta = create(&mut rig, None).await;
    rig.fake.http.inject(
        "/bigquery/v2/projects/flyte-project/jobs/",
        google_error(500, "INTERNAL", "backendError", "Backend error"),
    );
    rig.fake.http.inject("/bigquery/v2/projects/flyte-project/jobs/", Reply::text(502, "Bad Gateway"));
    assert_eq!(get(&mut rig, &meta).await.unwrap().phase, Phase::Initializing as i32);
    // The retried inserts carried the same job id, and one job exists.
    let inserts = rig.fake.http.requests_to("/bigquery/v2/projects/flyte-project/jobs");
    let ids: Vec<_> = inserts
        .iter()
        .filter(|r| r.method == "POST")
        .map(|r| r.json()["jobReference"]["jobId"].clone())
        .collect();
    assert_eq!(ids.len(), 4);
    assert!(ids.windows(2).all(|w| w[0] == w[1]), "{ids:?}");
    assert_eq!(rig.fake.job_ids().len(), 1);
}

#[tokio::test]
async fn a_refused_token_is_replaced_once_and_a_refused_key_is_a_clear_error() {
    let mut rig = rig("").await;
    let meta = create(&mut rig, None).await;
    rig.fake.revoke_tokens();
    assert_eq!(get(&mut rig, &meta).await.unwrap().phase, Phase::Initializing as i32);
    assert_eq!(rig.fake.issued_tokens().len(), 2, "revoked, then one new token");

    // A key the token endpoint does not accept (the fake expects another public key).
    let other = FakeBigQuery::start(b"not this key".to_vec()).await;
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), &other.token_uri());
    let svc = spawn_plugin(plugin(
        &[("FLOTILLA_BIGQUERY_BASE_URL", other.url()), ("GOOGLE_APPLICATION_CREDENTIALS", key)],
        "",
    ))
    .await;
    let e = AsyncAgentServiceClient::new(channel(svc.addr))
        .create_task(admin::CreateTaskRequest { template: Some(template("SELECT 1")), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("service-account key in the credentials file")
            && e.message().contains("was refused")
            && e.message().contains("invalid_grant"),
        "{}",
        e.message()
    );
}

#[tokio::test]
async fn malformed_and_slow_answers_are_bounded_errors() {
    let mut rig = rig("[http]\nget_timeout = \"1s\"\n").await;
    let meta = create(&mut rig, None).await;
    rig.fake.http.inject(
        "/bigquery/v2/projects/flyte-project/jobs/",
        Reply::json(200, json!({"kind": "bigquery#job"})),
    );
    let e = get(&mut rig, &meta).await.unwrap_err();
    assert_eq!(e.code(), Code::Internal);
    assert!(
        e.message().contains("BigQuery jobs.get answered with an unexpected body: no `status`"),
        "{}",
        e.message()
    );

    rig.fake.http.inject(
        "/bigquery/v2/projects/flyte-project/jobs/",
        Reply::json(200, json!({})).delay(Duration::from_secs(30)),
    );
    let started = std::time::Instant::now();
    let e = get(&mut rig, &meta).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_millis(2500), "GetTask took {:?}", started.elapsed());
    assert_eq!(e.code(), Code::DeadlineExceeded);
    assert!(e.message().contains("BigQuery jobs.get did not answer within"), "{}", e.message());
}

#[tokio::test]
async fn bad_templates_name_what_is_missing() {
    let mut rig = rig("").await;
    let mut t = template("SELECT 1");
    t.custom.as_mut().unwrap().fields.remove("ProjectID");
    let e = rig
        .client
        .create_task(admin::CreateTaskRequest { template: Some(t), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("custom.ProjectID"), "{}", e.message());
    let e = rig
        .client
        .create_task(admin::CreateTaskRequest { template: Some(template("  ")), ..Default::default() })
        .await
        .unwrap_err();
    assert!(e.message().contains("sql.statement"), "{}", e.message());
    let e = get(&mut rig, b"not json").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(rig.fake.http.requests().is_empty(), "nothing reached BigQuery");
}

#[tokio::test]
async fn without_credentials_it_serves_and_create_names_the_missing_credential() {
    // No key file, no gcloud file under $HOME, and a metadata server that is not there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let home = tempfile::tempdir().unwrap();
    let p = plugin(
        &[
            ("FLOTILLA_BIGQUERY_METADATA_URL", format!("http://{closed}")),
            ("HOME", home.path().display().to_string()),
        ],
        "",
    );
    let svc = spawn_plugin(p).await;
    let agents = flotilla_proto::service::agent_metadata_service_client::AgentMetadataServiceClient::new(
        channel(svc.addr),
    )
    .list_agents(admin::ListAgentsRequest {})
    .await
    .unwrap()
    .into_inner();
    assert_eq!(agents.agents[0].supported_task_categories[0].name, TASK);
    let e = AsyncAgentServiceClient::new(channel(svc.addr))
        .create_task(admin::CreateTaskRequest { template: Some(template("SELECT 1")), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("GOOGLE_APPLICATION_CREDENTIALS"), "{}", e.message());
    assert!(e.message().contains(&format!("metadata server at http://{closed}/")), "{}", e.message());
    let looked = home.path().join(".config/gcloud/application_default_credentials.json");
    assert!(e.message().contains(&format!("no gcloud's at {}", looked.display())), "{}", e.message());
}

#[tokio::test]
async fn the_metadata_server_supplies_tokens_when_there_is_no_key_file() {
    let fake = FakeBigQuery::start(TEST_PUBLIC_KEY_DER.to_vec()).await;
    let p = plugin(
        &[("FLOTILLA_BIGQUERY_BASE_URL", fake.url()), ("FLOTILLA_BIGQUERY_METADATA_URL", fake.url())],
        "",
    );
    let svc = spawn_plugin(p).await;
    AsyncAgentServiceClient::new(channel(svc.addr))
        .create_task(admin::CreateTaskRequest { template: Some(template("SELECT 1")), ..Default::default() })
        .await
        .unwrap();
    let md = fake.http.requests_to("/computeMetadata/");
    assert_eq!((md.len(), md[0].header("metadata-flavor")), (1, Some("Google")));
    assert_eq!(fake.job_ids().len(), 1);
}

#[tokio::test]
async fn gclouds_user_credentials_are_found_and_exchanged_for_tokens() {
    let fake = FakeBigQuery::start(TEST_PUBLIC_KEY_DER.to_vec()).await;
    let home = tempfile::tempdir().unwrap();
    let gcloud = home.path().join(".config/gcloud");
    std::fs::create_dir_all(&gcloud).unwrap();
    let file = gcloud.join("application_default_credentials.json");
    std::fs::write(&file, fake.user_credentials().to_string()).unwrap();
    let base = ("FLOTILLA_BIGQUERY_BASE_URL", fake.url());
    let home_var = ("HOME", home.path().display().to_string());
    let credentials = |p: &BigQuery| p.settings().into_iter().find(|(k, _)| *k == "credentials").unwrap().1;

    // Found under $HOME, as gcloud writes it.
    let p = plugin(&[base.clone(), home_var.clone()], "");
    let said = credentials(&p);
    assert!(said.contains(&file.display().to_string()) && said.contains("gcloud"), "{said}");
    // $CLOUDSDK_CONFIG moves gcloud's directory; there is no file there.
    let elsewhere = tempfile::tempdir().unwrap();
    let p = plugin(
        &[base.clone(), home_var.clone(), ("CLOUDSDK_CONFIG", elsewhere.path().display().to_string())],
        "",
    );
    assert!(credentials(&p).contains("metadata server"), "{}", credentials(&p));
    // GOOGLE_APPLICATION_CREDENTIALS comes first.
    let key = key_file(elsewhere.path(), &fake.token_uri());
    let p = plugin(&[base.clone(), home_var.clone(), ("GOOGLE_APPLICATION_CREDENTIALS", key.clone())], "");
    assert!(credentials(&p).contains(&key) && credentials(&p).contains("GOOGLE_APPLICATION_CREDENTIALS"));

    // The refresh token buys the access token that BigQuery then sees.
    let svc = spawn_plugin(plugin(&[base, home_var], "")).await;
    AsyncAgentServiceClient::new(channel(svc.addr))
        .create_task(admin::CreateTaskRequest { template: Some(template("SELECT 1")), ..Default::default() })
        .await
        .unwrap();
    let grants = fake.http.requests_to("/token");
    assert_eq!(grants.len(), 1);
    let form = grants[0].form();
    let field = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    assert_eq!(field("grant_type").as_deref(), Some("refresh_token"));
    assert_eq!(field("refresh_token"), fake.user_credentials()["refresh_token"].as_str().map(str::to_owned));
    let inserts = fake.http.requests_to("/bigquery/v2/projects/flyte-project/jobs");
    assert_eq!(inserts.len(), 1);
    assert_eq!(inserts[0].bearer(), fake.issued_tokens().first().map(String::as_str));
    // The file's quota project is billed, as Google's client libraries have it, unless
    // GOOGLE_CLOUD_QUOTA_PROJECT names another.
    assert_eq!(inserts[0].header("x-goog-user-project"), Some("fake-project"));
    let svc = spawn_plugin(plugin(
        &[
            ("FLOTILLA_BIGQUERY_BASE_URL", fake.url()),
            ("HOME", home.path().display().to_string()),
            ("GOOGLE_CLOUD_QUOTA_PROJECT", "billing-project".to_owned()),
        ],
        "",
    ))
    .await;
    AsyncAgentServiceClient::new(channel(svc.addr))
        .create_task(admin::CreateTaskRequest { template: Some(template("SELECT 1")), ..Default::default() })
        .await
        .unwrap();
    let inserts = fake.http.requests_to("/bigquery/v2/projects/flyte-project/jobs");
    assert_eq!(inserts[1].header("x-goog-user-project"), Some("billing-project"));
    // A value no header can carry is a configuration error, not a header dropped in silence.
    let config = ServiceConfig::default();
    let bad = HashMap::from([("GOOGLE_CLOUD_QUOTA_PROJECT".to_owned(), "a\nb".to_owned())]);
    let e = BigQuery::from_config_with_env(&config, &move |k| bad.get(k).cloned()).unwrap_err();
    assert!(e.contains("GOOGLE_CLOUD_QUOTA_PROJECT: not a project id"), "{e}");
}

#[tokio::test]
async fn a_users_refresh_token_and_client_secret_reach_no_log_or_error() {
    let fake = FakeBigQuery::start(TEST_PUBLIC_KEY_DER.to_vec()).await;
    let dir = tempfile::tempdir().unwrap();
    let user = fake.user_credentials();
    let path = dir.path().join("adc.json");
    std::fs::write(&path, user.to_string()).unwrap();
    let svc = ServiceProcess::start(
        env!("CARGO_BIN_EXE_flotilla-bigquery"),
        &["--log", "trace"],
        &[
            ("FLOTILLA_BIGQUERY_BASE_URL", &fake.url()),
            ("GOOGLE_APPLICATION_CREDENTIALS", &path.display().to_string()),
        ],
    )
    .await;
    let mut client = AsyncAgentServiceClient::new(channel(svc.addr));
    let request = admin::CreateTaskRequest { template: Some(template("SELECT 1")), ..Default::default() };
    client.create_task(request.clone()).await.unwrap();
    // Then the endpoint refuses the client: the error path logs too.
    fake.revoke_tokens();
    fake.http.inject("/token", Reply::json(401, json!({"error": "invalid_client"})));
    let error = client.create_task(request).await.unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition, "{error:?}");
    let logs = svc.stderr();
    assert!(logs.contains("BigQuery"), "the service logged its calls at trace level:\n{logs}");
    let secrets = [&user["refresh_token"], &user["client_secret"]].map(|v| v.as_str().unwrap().to_owned());
    for secret in secrets.iter().chain(&fake.issued_tokens()) {
        for (what, text) in [("logs", &logs), ("error", &error.message().to_owned())] {
            assert!(!text.contains(secret.as_str()), "a secret appears in the {what}");
        }
    }
}

#[tokio::test]
async fn no_secret_reaches_logs_errors_or_resource_meta() {
    let fake = FakeBigQuery::start(TEST_PUBLIC_KEY_DER.to_vec()).await;
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), &fake.token_uri());
    let svc = ServiceProcess::start(
        env!("CARGO_BIN_EXE_flotilla-bigquery"),
        &["--log", "trace"],
        &[("FLOTILLA_BIGQUERY_BASE_URL", &fake.url()), ("GOOGLE_APPLICATION_CREDENTIALS", &key)],
    )
    .await;
    let mut client = AsyncAgentServiceClient::new(channel(svc.addr));
    let meta = client
        .create_task(admin::CreateTaskRequest { template: Some(template("SELECT 1")), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .resource_meta;
    // A refused token and server errors, so error paths log too.
    fake.revoke_tokens();
    fake.http.inject("/bigquery/v2/projects/flyte-project/jobs/", Reply::text(500, "boom"));
    let get = admin::GetTaskRequest {
        task_category: category(),
        resource_meta: meta.clone(),
        ..Default::default()
    };
    client.get_task(get.clone()).await.unwrap();
    fake.http.inject("/token", Reply::json(401, json!({"error": "invalid_client"})));
    fake.revoke_tokens();
    let error = client.get_task(get).await.unwrap_err();

    let tokens = fake.issued_tokens();
    assert!(!tokens.is_empty());
    let key_body: String = TEST_KEY_PKCS8_PEM.lines().nth(1).unwrap().to_owned();
    let assertions: Vec<String> = fake
        .http
        .requests_to("/token")
        .iter()
        .filter_map(|r| r.form().into_iter().find(|(k, _)| k == "assertion").map(|(_, v)| v))
        .collect();
    let logs = svc.stderr();
    assert!(logs.contains("BigQuery"), "the service logged its calls at trace level:\n{logs}");
    let meta_text = String::from_utf8_lossy(&meta).into_owned();
    for secret in tokens.iter().chain(&assertions).chain(std::iter::once(&key_body)) {
        for (what, text) in
            [("logs", &logs), ("error", &error.message().to_owned()), ("resource_meta", &meta_text)]
        {
            assert!(!text.contains(secret.as_str()), "a secret appears in the {what}");
        }
    }
}

#[test]
fn help_describes_the_service_and_its_credentials() {
    let out =
        std::process::Command::new(env!("CARGO_BIN_EXE_flotilla-bigquery")).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("The BigQuery plugin service"), "{text}");
    for needle in ["GOOGLE_APPLICATION_CREDENTIALS", "--listen", "--admin-listen", "--check-config"] {
        assert!(text.contains(needle), "--help lacks {needle}:\n{text}");
    }
}

/// CreateTask on a service whose key file holds `contents`; the refusal.
async fn create_with_key_file(contents: &str, base: &str) -> tonic::Status {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sa.json");
    std::fs::write(&path, contents).unwrap();
    let svc = spawn_plugin(plugin(
        &[
            ("FLOTILLA_BIGQUERY_BASE_URL", base.to_owned()),
            ("GOOGLE_APPLICATION_CREDENTIALS", path.display().to_string()),
        ],
        "",
    ))
    .await;
    AsyncAgentServiceClient::new(channel(svc.addr))
        .create_task(admin::CreateTaskRequest { template: Some(template("SELECT 1")), ..Default::default() })
        .await
        .unwrap_err()
}

#[tokio::test]
async fn a_wrong_key_file_or_token_answer_is_described_never_quoted() {
    let fake = FakeBigQuery::start(TEST_PUBLIC_KEY_DER.to_vec()).await;
    let key = json!({
        "type": "service_account", "private_key": TEST_KEY_PKCS8_PEM,
        "client_email": "flyte@flyte-project.iam.gserviceaccount.com", "token_uri": fake.token_uri(),
    });
    let secret_part = &TEST_KEY_PKCS8_PEM[40..80];
    // The key encoded twice (a JSON string holding the JSON), as a mistaken Secret would hold it.
    let twice = serde_json::to_string(&key.to_string()).unwrap();
    let e = create_with_key_file(&twice, &fake.url()).await;
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("encoded twice"), "{}", e.message());
    assert!(!e.message().contains(secret_part), "the private key is quoted: {}", e.message());
    // A value of the wrong type.
    let mut wrong = key.clone();
    wrong["client_email"] = json!(["flyte@flyte-project.iam.gserviceaccount.com"]);
    let e = create_with_key_file(&wrong.to_string(), &fake.url()).await;
    assert!(e.message().contains("wrong type") && !e.message().contains(secret_part), "{}", e.message());
    let mut ftp = key.clone();
    ftp["token_uri"] = json!("ftp://oauth2.example/token");
    let e = create_with_key_file(&ftp.to_string(), &fake.url()).await;
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("is not an http(s) URL"), "{}", e.message());
    let mut other = key.clone();
    other["type"] = json!("external_account");
    let e = create_with_key_file(&other.to_string(), &fake.url()).await;
    assert!(e.message().contains("has type `external_account`"), "{}", e.message());
    // A user's credentials without their refresh token.
    let mut user = fake.user_credentials();
    let refresh_token = user["refresh_token"].as_str().unwrap().to_owned();
    user.as_object_mut().unwrap().remove("refresh_token");
    let e = create_with_key_file(&user.to_string(), &fake.url()).await;
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("not a user's credentials: missing field `refresh_token`"),
        "{}",
        e.message()
    );
    // A refresh token the endpoint does not know: refused, named, not quoted.
    let mut user = fake.user_credentials();
    user["refresh_token"] = json!("1//0revoked-refresh-token");
    let e = create_with_key_file(&user.to_string(), &fake.url()).await;
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("user's credentials") && e.message().contains("invalid_grant"),
        "{}",
        e.message()
    );
    assert!(e.message().contains("gcloud auth application-default login"), "{}", e.message());
    for secret in
        ["1//0revoked-refresh-token", refresh_token.as_str(), user["client_secret"].as_str().unwrap()]
    {
        assert!(!e.message().contains(secret), "a secret is quoted: {}", e.message());
    }

    // A token endpoint answering 200 with something that is not JSON: not quoted.
    fake.http.inject("/token", Reply::text(200, "access_token=ya29.secret-token-value&expires_in=3600"));
    let e = create_with_key_file(&key.to_string(), &fake.url()).await;
    assert!(e.message().contains("not JSON"), "{}", e.message());
    assert!(!e.message().contains("ya29.secret-token-value"), "the token is quoted: {}", e.message());
}
