//! `Api::send` against a real HTTP server on loopback: what is retried, what is not, and that the
//! budget bounds the whole call.

use std::time::{Duration, Instant};

use flotilla_cloud::{
    api::{Api, ApiError, ApiSettings, Request},
    secret::Secret,
};
use flotilla_sdk::{PluginError, telemetry::config::HumanDuration};
use flotilla_testkit::fake_http::{FakeHttp, Reply};
use serde_json::json;

fn api() -> Api {
    let settings = ApiSettings {
        backoff_initial: HumanDuration(Duration::from_millis(10)),
        backoff_max: HumanDuration(Duration::from_millis(50)),
        ..ApiSettings::default()
    };
    Api::new("Example", &settings).unwrap()
}

fn url(fake: &FakeHttp, path: &str) -> reqwest::Url {
    format!("{}{path}", fake.url()).parse().unwrap()
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(5)
}

#[tokio::test]
async fn rate_limits_and_server_errors_are_retried_until_an_answer() {
    let fake = FakeHttp::start(|_| Reply::json(200, json!({"ok": true}))).await;
    fake.inject("/x", Reply::json(429, json!({"error": {"code": 429, "message": "slow down"}})));
    fake.inject("/x", Reply::text(503, "unavailable"));
    fake.inject("/x", Reply::json(500, json!({"error_code": "INTERNAL", "message": "oops"})));
    let token = Secret::new("tok-123");
    let answer =
        api().send(Request::get("things.get", url(&fake, "/x")).bearer(&token), soon()).await.unwrap();
    assert_eq!(answer.body, json!({"ok": true}));
    let seen = fake.requests();
    assert_eq!(seen.len(), 4, "three failures, then the answer");
    assert!(seen.iter().all(|r| r.bearer() == Some("tok-123")));
}

#[tokio::test]
async fn client_errors_are_not_retried_and_carry_the_apis_message() {
    let fake = FakeHttp::start(|_| {
        Reply::json(
            400,
            json!({"error_code": "INVALID_PARAMETER_VALUE", "message": "num_workers must be positive"}),
        )
    })
    .await;
    let e =
        api().send(Request::post_json("runs/submit", url(&fake, "/s"), json!({})), soon()).await.unwrap_err();
    assert_eq!(fake.requests().len(), 1);
    assert_eq!(
        e.to_string(),
        "Example runs/submit failed: HTTP 400: INVALID_PARAMETER_VALUE: num_workers must be positive"
    );
    assert_eq!(PluginError::from(e).code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn a_non_idempotent_request_is_not_repeated_after_a_server_error() {
    let fake = FakeHttp::start(|_| Reply::json(200, json!({}))).await;
    fake.inject("/s", Reply::text(502, "bad gateway"));
    let request = Request::post_json("jobs.insert", url(&fake, "/s"), json!({})).non_idempotent();
    let e = api().send(request.clone(), soon()).await.unwrap_err();
    assert_eq!(e.status(), Some(502));
    assert_eq!(fake.requests().len(), 1);
    // A 429 says the request was not processed, so even a non-idempotent one is sent again.
    fake.inject("/s", Reply::text(429, "later"));
    api().send(request, soon()).await.unwrap();
    assert_eq!(fake.requests().len(), 3);
}

#[tokio::test]
async fn a_slow_api_is_bounded_by_the_deadline() {
    let fake = FakeHttp::start(|_| Reply::json(200, json!({})).delay(Duration::from_secs(10))).await;
    let started = Instant::now();
    let e =
        api().send(Request::get("jobs.get", url(&fake, "/slow")), started + Duration::from_millis(300)).await;
    let took = started.elapsed();
    assert!(matches!(e, Err(ApiError::Timeout { .. })), "{e:?}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert_eq!(PluginError::from(e.unwrap_err()).code(), tonic::Code::DeadlineExceeded);
}

#[tokio::test]
async fn retry_after_beyond_the_deadline_gives_up_at_once_with_the_429() {
    let fake = FakeHttp::start(|_| Reply::text(429, "quota").header("retry-after", "30")).await;
    let started = Instant::now();
    let e = api()
        .send(Request::get("jobs.get", url(&fake, "/q")), started + Duration::from_secs(2))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(429));
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(fake.requests().len(), 1);
}

#[tokio::test]
async fn a_success_that_is_not_json_is_malformed_and_accepted_statuses_are_answers() {
    let fake = FakeHttp::start(|r| match r.path.as_str() {
        "/html" => Reply::text(200, "<html>proxy login</html>"),
        _ => Reply::json(
            404,
            json!({"error": {"code": 404, "message": "Not found: Job p:US.x", "status": "NOT_FOUND"}}),
        ),
    })
    .await;
    let e = api().send(Request::get("jobs.get", url(&fake, "/html")), soon()).await.unwrap_err();
    assert!(matches!(e, ApiError::Malformed { .. }), "{e:?}");
    assert!(e.to_string().contains("<html>proxy login</html>"), "{e}");
    let r = api()
        .send(Request::post_empty("jobs.cancel", url(&fake, "/gone")).accept_status(404), soon())
        .await
        .unwrap();
    assert_eq!((r.status, r.body["error"]["status"].as_str()), (404, Some("NOT_FOUND")));
    let e = api().send(Request::get("jobs.get", url(&fake, "/gone")), soon()).await.unwrap_err();
    assert_eq!(e.to_string(), "Example jobs.get failed: HTTP 404: NOT_FOUND: Not found: Job p:US.x");
}

#[tokio::test]
async fn an_unreachable_api_is_unavailable_and_names_the_host() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url: reqwest::Url = format!("http://127.0.0.1:{port}/x").parse().unwrap();
    let started = Instant::now();
    let e =
        api().send(Request::get("jobs.get", url), started + Duration::from_millis(500)).await.unwrap_err();
    assert!(matches!(e, ApiError::Unreachable { .. }), "{e:?}");
    assert!(e.to_string().contains("could not reach 127.0.0.1"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(PluginError::from(e).code(), tonic::Code::Unavailable);
}

#[test]
fn a_printed_request_shows_no_credential() {
    let url: reqwest::Url = "https://example.invalid/oidc/v1/token".parse().unwrap();
    let form = vec![
        ("grant_type".to_owned(), "client_credentials".to_owned()),
        ("client_secret".to_owned(), "s3cr3t-value".to_owned()),
    ];
    let token = Secret::new("bearer-value");
    let printed = format!("{:?}", Request::post_form("token", url, form).bearer(&token));
    assert!(printed.contains("client_secret"), "{printed}");
    assert!(!printed.contains("s3cr3t-value") && !printed.contains("bearer-value"), "{printed}");
}

#[tokio::test]
async fn a_credential_no_header_can_carry_fails_unsent_naming_the_header() {
    let fake = FakeHttp::start(|_| Reply::json(200, json!({"ok": true}))).await;
    let token = Secret::new("dapi-test-token\n# rotated");
    let e = api()
        .send(
            Request::get("runs/get", url(&fake, "/x")).bearer(&token),
            Instant::now() + Duration::from_secs(2),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, ApiError::Unsendable { .. }), "{e:?}");
    let status = tonic::Status::from(PluginError::from(e));
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(status.message().contains("authorization header"), "{}", status.message());
    assert!(!status.message().contains("dapi-test-token"), "{}", status.message());
    assert!(fake.requests().is_empty(), "nothing was sent");
}

#[test]
fn settings_longer_than_a_day_are_refused_before_any_call_overflows() {
    let settings = ApiSettings {
        create_timeout: HumanDuration(Duration::from_secs(500_000_000_000 * 365 * 86_400 / 1_000_000)),
        backoff_max: HumanDuration(Duration::from_secs(7 * 86_400)),
        ..ApiSettings::default()
    };
    let problems = settings.problems();
    assert!(problems.iter().any(|p| p.starts_with("create_timeout:") && p.contains("1 day")), "{problems:?}");
    assert!(problems.iter().any(|p| p.starts_with("backoff_max:")), "{problems:?}");
    assert!(ApiSettings::default().problems().is_empty());
}

#[tokio::test]
async fn a_deadline_already_spent_says_the_api_was_not_called() {
    let fake = FakeHttp::start(|_| Reply::json(200, json!({"ok": true}))).await;
    let e = api().send(Request::get("runs/get", url(&fake, "/x")), Instant::now()).await.unwrap_err();
    assert!(e.to_string().contains("was not called: the caller's deadline left no time"), "{e}");
    assert!(fake.requests().is_empty());
}
