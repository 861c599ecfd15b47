//! The Databricks service over real gRPC on 127.0.0.1 against the fake
//! workspace (`flotilla_testkit::fakes::databricks`): what it sends, what it
//! answers, and how it copes with the API's failures.

mod support;

use std::time::{Duration, Instant};

use flotilla_proto::{admin, core::task_execution::Phase};
use flotilla_testkit::{
    fake_http::Reply,
    fakes::databricks::{CANCEL, GET, SUBMIT, Step},
};
use serde_json::{Value, json};
use support::*;
use tonic::Code;

fn meta_json(meta: &[u8]) -> Value {
    serde_json::from_slice(meta).expect("resource_meta is JSON")
}

#[tokio::test]
async fn advertises_both_task_types() {
    let mut rig = Rig::new().await;
    let agents = rig.meta_client.list_agents(admin::ListAgentsRequest {}).await.unwrap().into_inner().agents;
    let mut types: Vec<_> =
        agents.iter().flat_map(|a| a.supported_task_categories.iter().map(|c| c.name.clone())).collect();
    types.sort();
    assert_eq!(types, ["databricks", "spark"]);
    assert!(agents.iter().all(|a| a.name == "Databricks Connector" && !a.is_sync));
}

#[tokio::test]
async fn a_run_is_submitted_as_upstream_builds_it_and_polled_to_success() {
    let mut rig = Rig::new().await;
    rig.model.script(vec![
        Step::life_cycle("PENDING"),
        Step::with_message("RUNNING", "In run"),
        Step::terminated("SUCCESS", ""),
    ]);
    let meta = rig.create("spark", classic_custom()).await.unwrap();
    assert_eq!(meta_json(&meta), json!({ "databricks_instance": INSTANCE, "run_id": "1001" }));

    let submits = rig.fake.requests_to(SUBMIT);
    assert_eq!(submits.len(), 1);
    let submit = &submits[0];
    assert_eq!(submit.method, "POST");
    assert_eq!(submit.bearer(), Some(TOKEN));
    assert_eq!(submit.header("content-type"), Some("application/json"));
    let mut body = submit.json();
    let token = body.as_object_mut().unwrap().remove("idempotency_token").expect("an idempotency token");
    let token = token.as_str().unwrap();
    assert_eq!(token.len(), 64);
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()), "{token}");
    assert_eq!(
        body,
        json!({
            "run_name": "flytekit databricks plugin example",
            "timeout_seconds": 3600,
            "max_retries": 1,
            "new_cluster": {
                "spark_version": "13.3.x-scala2.12",
                "node_type_id": "m6i.large",
                "num_workers": 2,
                "docker_image": { "url": IMAGE },
                "spark_conf": { "spark.driver.memory": "1000M" },
                "spark_env_vars": { "FLYTE_FAIL_ON_ERROR": "true" },
            },
            "spark_python_task": {
                "python_file": "flytekitplugins/databricks/entrypoint.py",
                "source": "GIT",
                "parameters": args(),
            },
            "git_source": {
                "git_url": "https://github.com/flyteorg/flytetools",
                "git_provider": "gitHub",
                "git_commit": "572298df1f971fb58c258398bd70a6372f811c96",
            },
        })
    );

    let first = rig.get(&meta).await.unwrap();
    assert_eq!(phase(&first), Phase::Initializing);
    let second = rig.get(&meta).await.unwrap();
    assert_eq!((phase(&second), second.message.as_str()), (Phase::Running, "In run"));
    let done = rig.get(&meta).await.unwrap();
    assert_eq!(phase(&done), Phase::Succeeded);
    assert_eq!(done.outputs, None, "the job writes outputs.pb itself; propeller reads it");
    assert_eq!(done.log_links.len(), 1);
    assert_eq!(done.log_links[0].name, "Databricks Console");
    assert_eq!(done.log_links[0].uri, format!("https://{INSTANCE}/#job/501001/run/1001"));

    let gets = rig.fake.requests_to(GET);
    assert_eq!(gets.len(), 3);
    assert!(gets.iter().all(|g| g.method == "GET" && g.query_param("run_id") == Some("1001")));
    assert!(gets.iter().all(|g| g.bearer() == Some(TOKEN)));
}

#[tokio::test]
async fn the_databricks_task_type_and_serverless_notebooks_work_too() {
    let mut rig = Rig::new().await;
    let custom = json!({
        "databricksConf": { "environment_key": "nb", "git_source": { "git_url": "https://github.com/acme/nb", "git_provider": "gitHub", "git_branch": "main" } },
        "databricksInstance": INSTANCE,
        "notebookPath": "notebooks/report",
        "notebookBaseParameters": { "day": "2026-11-22" },
    });
    let meta = rig.create("databricks", custom).await.unwrap();
    let mut body = rig.fake.requests_to(SUBMIT)[0].json();
    body.as_object_mut().unwrap().remove("idempotency_token");
    assert_eq!(
        body,
        json!({
            "environments": [{ "environment_key": "nb",
                               "spec": { "client": "1", "environment_vars": { "FLYTE_FAIL_ON_ERROR": "true" } } }],
            "tasks": [{ "task_key": "flyte_notebook_task", "environment_key": "nb",
                        "notebook_task": { "notebook_path": "notebooks/report", "source": "GIT",
                                           "base_parameters": { "day": "2026-11-22" } } }],
            "git_source": { "git_url": "https://github.com/acme/nb", "git_provider": "gitHub", "git_branch": "main" },
        })
    );
    let r =
        rig.client.get_task(get_request("databricks", &meta)).await.unwrap().into_inner().resource.unwrap();
    assert_eq!(phase(&r), Phase::Running);
}

#[tokio::test]
async fn a_failed_job_is_failed_with_databricks_message() {
    let mut rig = Rig::new().await;
    rig.model.script(vec![
        Step::terminated("FAILED", "Task hello_spark failed with message: ZeroDivisionError").termination(
            "RUN_EXECUTION_ERROR",
            "CLIENT_ERROR",
            "Workload failed",
        ),
    ]);
    let meta = rig.create("spark", classic_custom()).await.unwrap();
    let r = rig.get(&meta).await.unwrap();
    assert_eq!(phase(&r), Phase::Failed);
    assert_eq!(r.message, "FAILED: Task hello_spark failed with message: ZeroDivisionError");
    assert_eq!(r.log_links.len(), 1);
}

#[tokio::test]
async fn every_state_maps_over_the_wire() {
    let cases = [
        (Step::life_cycle("QUEUED"), Phase::Queued),
        (Step::life_cycle("BLOCKED"), Phase::Queued),
        (Step::life_cycle("PENDING"), Phase::Initializing),
        (Step::life_cycle("RUNNING"), Phase::Running),
        (Step::life_cycle("TERMINATING"), Phase::Running),
        (Step::life_cycle("WAITING_FOR_RETRY"), Phase::Running),
        (Step::life_cycle("SKIPPED"), Phase::Failed),
        (Step::life_cycle("INTERNAL_ERROR"), Phase::RetryableFailed),
        (Step::life_cycle("SOMETHING_NEW"), Phase::Running),
        (Step::terminated("SUCCESS", ""), Phase::Succeeded),
        (Step::terminated("SUCCESS_WITH_FAILURES", ""), Phase::Succeeded),
        (Step::terminated("FAILED", "x"), Phase::Failed),
        (Step::terminated("TIMEDOUT", "x"), Phase::Failed),
        (Step::terminated("CANCELED", "x"), Phase::Failed),
        (Step::terminated("EXCLUDED", "x"), Phase::Failed),
        (Step::terminated("UPSTREAM_FAILED", "x"), Phase::Failed),
        (Step::terminated("UPSTREAM_CANCELED", "x"), Phase::Failed),
        (Step::terminated("DISABLED", "x"), Phase::Failed),
        (Step::terminated("MAXIMUM_CONCURRENT_RUNS_REACHED", "x"), Phase::RetryableFailed),
        (
            Step::terminated("FAILED", "x").termination("CLUSTER_ERROR", "CLOUD_FAILURE", "lost"),
            Phase::RetryableFailed,
        ),
        (
            Step::terminated("FAILED", "x").termination("DRIVER_ERROR", "INTERNAL_ERROR", "oops"),
            Phase::RetryableFailed,
        ),
        (Step::terminated("NEW_RESULT", "x"), Phase::Running),
        (Step::status_only(json!({ "state": "QUEUED" })), Phase::Queued),
        (Step::status_only(json!({ "state": "WAITING" })), Phase::Queued),
        (
            Step::status_only(
                json!({ "state": "TERMINATED", "termination_details": { "code": "SUCCESS", "type": "SUCCESS" } }),
            ),
            Phase::Succeeded,
        ),
    ];
    let mut rig = Rig::new().await;
    for (attempt, (step, want)) in (0..).zip(cases) {
        rig.model.script(vec![step.clone()]);
        // A new attempt each time: the same one would find its earlier run (idempotency).
        let mut request = create_request("spark", classic_custom());
        request.task_execution_metadata = Some(execution_metadata(attempt));
        let meta = rig.client.create_task(request).await.unwrap().into_inner().resource_meta;
        let r = rig.get(&meta).await.unwrap();
        assert_eq!(phase(&r), want, "{step:?}: {}", r.message);
        if want == Phase::Running && step.state.get("life_cycle_state") != Some(&json!("RUNNING")) {
            assert!(!r.message.is_empty(), "{step:?}: the raw state belongs in the message");
        }
    }
}

#[tokio::test]
async fn delete_cancels_the_run_and_is_idempotent() {
    let mut rig = Rig::new().await;
    rig.model.script(vec![Step::life_cycle("RUNNING")]);
    let meta = rig.create("spark", classic_custom()).await.unwrap();
    rig.delete(&meta).await.unwrap();
    let cancels = rig.fake.requests_to(CANCEL);
    assert_eq!(cancels.len(), 1);
    assert_eq!(cancels[0].method, "POST");
    assert_eq!(cancels[0].bearer(), Some(TOKEN));
    assert_eq!(cancels[0].json(), json!({ "run_id": 1001 }));
    assert!(rig.model.run(1001).unwrap().cancelled);

    let r = rig.get(&meta).await.unwrap();
    assert_eq!(phase(&r), Phase::Failed);
    assert!(r.message.starts_with("CANCELED"), "{}", r.message);

    rig.delete(&meta).await.unwrap();
    let gone = json!({ "databricks_instance": INSTANCE, "run_id": "999" }).to_string();
    rig.delete(gone.as_bytes()).await.expect("cancelling a run that no longer exists succeeds");
    // Some workspaces answer an unknown run with 400 INVALID_PARAMETER_VALUE.
    rig.fake.inject(
        CANCEL,
        Reply::json(
            400,
            json!({ "error_code": "INVALID_PARAMETER_VALUE", "message": "Run 999 does not exist." }),
        ),
    );
    rig.delete(gone.as_bytes()).await.expect("a 400 about a run that does not exist is cancelled enough");
    // A 404 that is not about the run (a wrong host or path) cancelled nothing: an error.
    rig.fake.inject(
        CANCEL,
        Reply::json(
            404,
            json!({ "error_code": "ENDPOINT_NOT_FOUND", "message": "No API found for 'POST /jobs/runs/cancel'" }),
        ),
    );
    let e = rig.delete(&meta).await.expect_err("an error");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("ENDPOINT_NOT_FOUND"), "{}", e.message());
}

#[tokio::test]
async fn a_run_the_workspace_does_not_know_is_a_failed_task_not_an_error() {
    let mut rig = Rig::new().await;
    let gone = json!({ "databricks_instance": INSTANCE, "run_id": "999" }).to_string();
    let r = rig.get(gone.as_bytes()).await.expect("an answer, not an RPC error");
    assert_eq!(phase(&r), Phase::Failed, "{}", r.message);
    assert!(
        r.message.contains("Databricks does not know run 999") && r.message.contains("does not exist"),
        "{}",
        r.message
    );

    rig.fake.inject(
        GET,
        Reply::json(
            400,
            json!({ "error_code": "INVALID_PARAMETER_VALUE", "message": "Run 999 does not exist." }),
        ),
    );
    assert_eq!(phase(&rig.get(gone.as_bytes()).await.unwrap()), Phase::Failed);

    // A 404 that is not about the run (a wrong path or host) is no verdict on the task.
    rig.fake.inject(
        GET,
        Reply::json(
            404,
            json!({ "error_code": "ENDPOINT_NOT_FOUND", "message": "No API found for 'GET /jobs'" }),
        ),
    );
    let e = rig.get(gone.as_bytes()).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("ENDPOINT_NOT_FOUND"), "{}", e.message());

    // Any other refusal stays an error naming Databricks' words.
    rig.fake.inject(
        GET,
        Reply::json(
            400,
            json!({ "error_code": "INVALID_PARAMETER_VALUE", "message": "run_id must be positive" }),
        ),
    );
    let e = rig.get(gone.as_bytes()).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("run_id must be positive") && e.message().contains("runs/get"),
        "{}",
        e.message()
    );
}

#[tokio::test]
async fn retried_creates_start_one_run() {
    let mut rig = Rig::new().await;
    rig.fake.inject(
        SUBMIT,
        Reply::json(429, json!({ "error_code": "REQUEST_LIMIT_EXCEEDED", "message": "slow down" }))
            .header("retry-after", "0"),
    );
    rig.fake.inject(
        SUBMIT,
        Reply::json(503, json!({ "error_code": "TEMPORARILY_UNAVAILABLE", "message": "try later" })),
    );
    let meta = rig.create("spark", classic_custom()).await.unwrap();
    let submits = rig.fake.requests_to(SUBMIT);
    assert_eq!(submits.len(), 3, "429, 503, then the answer");
    let tokens: Vec<_> = submits.iter().map(|s| s.json()["idempotency_token"].clone()).collect();
    assert!(tokens.iter().all(|t| t == &tokens[0]), "{tokens:?}");
    assert_eq!(meta_json(&meta)["run_id"], json!("1001"));

    // The same task attempt created again (say, after propeller lost the answer) finds its run.
    let again = rig.create("spark", classic_custom()).await.unwrap();
    assert_eq!(again, meta);
    assert_eq!(rig.model.runs().len(), 1);
    // The next attempt is a new run, and so is the same attempt asking for something else.
    let mut next = create_request("spark", classic_custom());
    next.task_execution_metadata = Some(execution_metadata(1));
    let next = rig.client.create_task(next).await.unwrap().into_inner().resource_meta;
    assert_eq!(meta_json(&next)["run_id"], json!("1002"));
    let mut other = classic_custom();
    other["databricksConf"]["run_name"] = json!("another run");
    let other = rig.create("spark", other).await.unwrap();
    assert_eq!(meta_json(&other)["run_id"], json!("1003"));
}

#[tokio::test]
async fn server_errors_on_get_are_retried_within_the_call() {
    let mut rig = Rig::new().await;
    let meta = rig.create("spark", classic_custom()).await.unwrap();
    rig.fake.inject(GET, Reply::json(500, json!({ "error_code": "INTERNAL_ERROR", "message": "boom" })));
    rig.fake.inject(GET, Reply::text(502, "bad gateway"));
    let r = rig.get(&meta).await.unwrap();
    assert_eq!(phase(&r), Phase::Running);
    assert_eq!(rig.fake.requests_to(GET).len(), 3);
}

#[tokio::test]
async fn a_refused_token_is_unauthenticated() {
    let mut rig = Rig::with(Some("dapi-wrong-token-value"), |_| {}).await;
    let e = rig.create("spark", classic_custom()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{}", e.message());
    assert!(e.message().contains("Databricks runs/submit") && e.message().contains("401"), "{}", e.message());
    assert!(!e.message().contains("dapi-wrong"), "{}", e.message());
    assert_eq!(rig.fake.requests_to(SUBMIT).len(), 1, "a 401 is not retried");
}

#[tokio::test]
async fn malformed_answers_are_internal_errors_naming_the_call() {
    let mut rig = Rig::new().await;
    rig.fake.inject(SUBMIT, Reply::json(200, json!({ "no_run_id": true })));
    let e = rig.create("spark", classic_custom()).await.unwrap_err();
    assert_eq!(e.code(), Code::Internal);
    assert!(e.message().contains("runs/submit") && e.message().contains("run_id"), "{}", e.message());

    let meta = rig.create("spark", classic_custom()).await.unwrap();
    rig.fake.inject(GET, Reply::text(200, "<html>maintenance</html>"));
    let e = rig.get(&meta).await.unwrap_err();
    assert_eq!(e.code(), Code::Internal);
    assert!(e.message().contains("runs/get") && e.message().contains("not JSON"), "{}", e.message());
    rig.fake.inject(GET, Reply::json(200, json!({ "run_id": 1002 })));
    let e = rig.get(&meta).await.unwrap_err();
    assert!(e.message().contains("no state"), "{}", e.message());
}

#[tokio::test]
async fn a_slow_api_does_not_hold_get_past_its_budget() {
    let mut rig = Rig::new().await;
    let meta = rig.create("spark", classic_custom()).await.unwrap();
    rig.fake.inject(GET, Reply::json(200, json!({})).delay(Duration::from_secs(10)));
    let started = Instant::now();
    let e = rig.get(&meta).await.unwrap_err();
    let took = started.elapsed();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{}", e.message());
    assert!(took >= Duration::from_millis(2000) && took < Duration::from_millis(2900), "{took:?}");

    // A caller's shorter deadline wins over the budget.
    rig.fake.inject(GET, Reply::json(200, json!({})).delay(Duration::from_secs(10)));
    let mut request = tonic::Request::new(get_request("spark", &meta));
    request.set_timeout(Duration::from_millis(800));
    let started = Instant::now();
    let e = rig.client.get_task(request).await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{}", e.message());
    assert!(started.elapsed() < Duration::from_millis(1500), "{:?}", started.elapsed());
    // The next poll is answered normally.
    assert_eq!(phase(&rig.get(&meta).await.unwrap()), Phase::Running);
}

#[tokio::test]
async fn without_a_token_it_serves_and_create_names_the_secret() {
    let mut rig = Rig::with(None, |_| {}).await;
    let agents = rig.meta_client.list_agents(admin::ListAgentsRequest {}).await.unwrap().into_inner().agents;
    assert_eq!(agents.len(), 1);
    let e = rig.create("spark", classic_custom()).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    for part in [
        "FLYTE_DATABRICKS_ACCESS_TOKEN",
        "_FSEC_FLYTE_DATABRICKS_ACCESS_TOKEN",
        "flyte_databricks_access_token",
    ] {
        assert!(e.message().contains(part), "{part} not in {}", e.message());
    }
    assert!(rig.fake.requests().is_empty());
}

#[tokio::test]
async fn the_instance_comes_from_the_task_or_the_service() {
    let mut rig = Rig::new().await;
    let mut custom = classic_custom();
    custom.as_object_mut().unwrap().remove("databricksInstance");
    let e = rig.create("spark", custom.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("FLYTE_DATABRICKS_INSTANCE"), "{}", e.message());

    let mut rig = Rig::with(Some(TOKEN), |s| s.instance = Some("svc.cloud.databricks.com".into())).await;
    let meta = rig.create("spark", custom).await.unwrap();
    assert_eq!(meta_json(&meta)["databricks_instance"], json!("svc.cloud.databricks.com"));

    let mut rig =
        Rig::with(Some(TOKEN), |s| s.allowed_instances = vec!["only.cloud.databricks.com".into()]).await;
    let e = rig.create("spark", classic_custom()).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains(INSTANCE), "{}", e.message());
    assert!(rig.fake.requests().is_empty(), "the token never goes to an instance not allowed");
}

#[tokio::test]
async fn bad_templates_and_metas_are_invalid_arguments() {
    let mut rig = Rig::new().await;
    let e = rig.create("spark", json!({ "databricksInstance": INSTANCE })).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("databricksConf"), "{}", e.message());
    let e = rig
        .create("spark", json!({ "databricksInstance": INSTANCE, "databricksConf": {} }))
        .await
        .unwrap_err();
    assert!(e.message().contains("no compute"), "{}", e.message());
    let e = rig.get(b"not json").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(rig.fake.requests().is_empty());
}

#[tokio::test]
async fn runs_created_by_upstream_are_polled_without_their_stored_token() {
    let mut rig = Rig::new().await;
    let meta = rig.create("spark", classic_custom()).await.unwrap();
    let upstream =
        json!({ "databricks_instance": INSTANCE, "run_id": "1001", "auth_token": "dapi-upstream-kept-this" });
    let r = rig.get(upstream.to_string().as_bytes()).await.unwrap();
    assert_eq!(phase(&r), Phase::Running);
    let last = rig.fake.requests_to(GET).pop().unwrap();
    assert_eq!(last.bearer(), Some(TOKEN));
    assert!(!String::from_utf8_lossy(&meta).contains("token"));
}

#[tokio::test]
async fn api_refusals_keep_databricks_message_and_code() {
    let mut rig = Rig::new().await;
    rig.fake.inject(
        SUBMIT,
        Reply::json(
            400,
            json!({ "error_code": "INVALID_PARAMETER_VALUE", "message": "Cluster spark version 1.0 is not supported" }),
        ),
    );
    let e = rig.create("spark", classic_custom()).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("INVALID_PARAMETER_VALUE: Cluster spark version 1.0"), "{}", e.message());
    assert_eq!(rig.fake.requests_to(SUBMIT).len(), 1, "a 400 is not retried");

    let meta = rig.create("spark", classic_custom()).await.unwrap();
    rig.fake.inject(
        GET,
        Reply::json(
            403,
            json!({ "error_code": "PERMISSION_DENIED", "message": "User cannot view run 1001" }),
        ),
    );
    let e = rig.get(&meta).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("User cannot view run 1001"), "{}", e.message());
}

#[tokio::test]
async fn a_run_without_a_job_id_links_to_its_own_page() {
    let mut rig = Rig::new().await;
    let meta = json!({ "databricks_instance": INSTANCE, "run_id": "77" }).to_string();
    let run = |page: &str| {
        Reply::json(
            200,
            json!({
                "run_id": 77,
                "state": { "life_cycle_state": "RUNNING", "state_message": "" },
                "run_page_url": page,
            }),
        )
    };
    rig.fake.inject("/api/2.1/jobs/runs/get", run("https://adb-1.azuredatabricks.net/?o=1#job/runs/77"));
    let r = rig.get(meta.as_bytes()).await.unwrap();
    assert_eq!(phase(&r), Phase::Running);
    assert_eq!(r.log_links.len(), 1, "{:?}", r.log_links);
    assert_eq!(r.log_links[0].uri, "https://adb-1.azuredatabricks.net/?o=1#job/runs/77");
    // A page that is not an https URL is no link for the Flyte console.
    rig.fake.inject("/api/2.1/jobs/runs/get", run("javascript:alert(1)"));
    assert!(rig.get(meta.as_bytes()).await.unwrap().log_links.is_empty());
}
