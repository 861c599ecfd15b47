//! One request id from gateway to service: real `flotilla-gateway` and
//! `flotilla-echo` processes logging JSON at debug; a call through the gateway
//! with a given `x-request-id` must produce a line with that id on both sides.
//! An id the gateway cannot pass on (too long, not visible ASCII) is replaced by
//! one it makes, and the service logs that one.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use flotilla_proto::{admin, service::async_agent_service_client::AsyncAgentServiceClient};
use flotilla_testkit::eventually;
use serde_json::Value;
use tonic::transport::Channel;

use crate::{load::echo_binary, support::*};

/// A server process whose stderr (JSON log lines) is collected; killed on drop.
struct Logged {
    child: Child,
    lines: Arc<Mutex<Vec<Value>>>,
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Logged {
    fn spawn(binary: &Path, envs: &[(&str, String)]) -> Logged {
        let mut command = Command::new(binary);
        command
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(["--log-format", "json", "--log", "debug", "--threads", "1"])
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in envs {
            command.env(k, v);
        }
        let mut child = command.spawn().unwrap_or_else(|e| panic!("{} starts: {e}", binary.display()));
        let stderr = child.stderr.take().expect("piped");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {line}"));
                sink.lock().unwrap().push(value);
            }
        });
        Logged { child, lines }
    }

    /// The first line matching `pred`, if any yet.
    fn find(&self, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        self.lines.lock().unwrap().iter().find(|v| pred(v)).cloned()
    }

    /// The gRPC address from the "listening" line, waited for (bounded).
    async fn grpc_addr(&self) -> SocketAddr {
        eventually("the process logs its gRPC address", Duration::from_secs(10), || async {
            self.find(|v| v["fields"]["grpc"].is_string())
                .and_then(|v| v["fields"]["grpc"].as_str().and_then(|a| a.parse().ok()))
        })
        .await
    }

    /// The admin address from the "listening" line, waited for (bounded).
    async fn admin_addr(&self) -> SocketAddr {
        eventually("the process logs its admin address", Duration::from_secs(10), || async {
            self.find(|v| v["fields"]["admin"].is_string())
                .and_then(|v| v["fields"]["admin"].as_str().and_then(|a| a.parse().ok()))
        })
        .await
    }

    /// The call line carrying `request_id` for `method`, waited for (bounded).
    async fn call_line(&self, who: &str, request_id: &str, method: &str) -> Value {
        let what = format!("{who} logs {method} with request_id {request_id:?}");
        eventually(&what, Duration::from_secs(10), || async {
            self.find(|v| v["fields"]["request_id"] == request_id && v["fields"]["method"] == method)
        })
        .await
    }
}

/// `flotilla-echo` and a `flotilla-gateway` in front of it, both logging JSON at debug.
async fn echo_behind_a_gateway() -> (Logged, Logged) {
    let echo = Logged::spawn(&echo_binary(), &[]);
    let echo_addr = echo.grpc_addr().await;
    let gateway = Logged::spawn(
        Path::new(env!("CARGO_BIN_EXE_flotilla-gateway")),
        &[("FLOTILLA_PLUGINS", format!("echo=static://{echo_addr}"))],
    );
    (echo, gateway)
}

fn with_id<T>(message: T, id: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.metadata_mut().insert("x-request-id", id.parse().expect("an ASCII id"));
    req
}

#[tokio::test]
async fn one_request_id_is_logged_by_the_gateway_and_the_service() {
    let (echo, gateway) = echo_behind_a_gateway().await;
    let addr = gateway.grpc_addr().await;
    let mut client = AsyncAgentServiceClient::new(flotilla_testkit::channel(addr));

    // The caller's id is passed on and logged on both sides.
    let created = client
        .create_task(with_id(
            admin::CreateTaskRequest {
                inputs: Some(inputs(3)),
                template: Some(echo_template("echo", &[])),
                ..Default::default()
            },
            "it-create-7f3a",
        ))
        .await
        .expect("create succeeds")
        .into_inner();
    for (who, logs) in [("gateway", &gateway), ("echo", &echo)] {
        let line = logs.call_line(who, "it-create-7f3a", "CreateTask").await;
        let fields = &line["fields"];
        assert_eq!(line["level"], "DEBUG", "{who}: {line}");
        assert_eq!(fields["code"], "OK", "{who}: {line}");
        assert_eq!(fields["task_type"], "echo", "{who}: {line}");
        assert!(fields["duration_us"].is_u64(), "{who}: {line}");
    }
    let line = gateway.call_line("gateway", "it-create-7f3a", "CreateTask").await;
    assert_eq!(line["fields"]["plugin"], "echo", "{line}");

    // A failure is logged at info on both sides, with the code.
    let failed = client
        .get_task(with_id(
            admin::GetTaskRequest {
                resource_meta: b"not echo's resource meta".to_vec(),
                task_category: category("echo"),
                ..Default::default()
            },
            "it-bad-meta-1",
        ))
        .await
        .expect_err("echo refuses resource_meta it did not make");
    for (who, logs) in [("gateway", &gateway), ("echo", &echo)] {
        let line = logs.call_line(who, "it-bad-meta-1", "GetTask").await;
        assert_eq!(line["level"], "INFO", "{who}: {line}");
        assert_eq!(line["fields"]["code"], code_text(failed.code()), "{who}: {line}");
        // The status message, as text (not percent-encoded), beside the event's own message.
        assert_eq!(line["fields"]["error"], failed.message(), "{who}: {line}");
        assert_eq!(line["fields"]["message"], "Call failed", "{who}: {line}");
    }

    // A call refused before any plugin code runs (not protobuf) is logged too.
    let garbage = flotilla_testkit::raw_call_with(
        echo.grpc_addr().await,
        flotilla_proto::paths::CREATE_TASK,
        &[("x-request-id", "it-garbage-1")],
        flotilla_testkit::frame(b"\xff\xff\xff\xff\x0f"),
    )
    .await;
    assert_eq!(garbage.code, tonic::Code::InvalidArgument, "{}", garbage.message);
    let line = echo.call_line("echo", "it-garbage-1", "CreateTask").await;
    assert_eq!(
        (&line["level"], &line["fields"]["code"]),
        (&"INFO".into(), &"INVALID_ARGUMENT".into()),
        "{line}"
    );

    // A call the gateway answers itself (no plugin serves the type): logged by the gateway.
    let missing = get(&mut client, "nope", &created.resource_meta, "it-missing-1").await;
    assert_eq!(missing.expect_err("no plugin serves nope").code(), tonic::Code::NotFound);
    let line = gateway.call_line("gateway", "it-missing-1", "GetTask").await;
    assert_eq!((&line["level"], &line["fields"]["code"]), (&"INFO".into(), &"NOT_FOUND".into()), "{line}");
    assert_eq!(line["fields"]["task_type"], "nope", "{line}");

    // Ids the gateway cannot pass on as they are get replaced by one it makes,
    // and the service logs that one.
    for (n, bad) in ["x".repeat(129), "has space".to_owned(), "tab\there".to_owned()].iter().enumerate() {
        let meta = create_with(&mut client, i64::try_from(n).expect("small")).await;
        get(&mut client, "echo", &meta, bad).await.expect("get succeeds");
        let is_bad = |v: &Value| v["fields"]["request_id"] == bad.as_str();
        assert!(gateway.find(is_bad).is_none() && echo.find(is_bad).is_none(), "{bad:?} was logged");
    }
    // The lines arrive through a pipe: wait (bounded) for the last one to be read.
    let ok_gets = || -> Vec<String> {
        gateway
            .lines
            .lock()
            .unwrap()
            .iter()
            .filter(|v| v["fields"]["method"] == "GetTask" && v["fields"]["code"] == "OK")
            .filter_map(|v| v["fields"]["request_id"].as_str().map(str::to_owned))
            .collect()
    };
    let gets_from_gateway: Vec<String> =
        eventually("the gateway logs three successful GetTask calls", Duration::from_secs(10), || async {
            let ids = ok_gets();
            (ids.len() >= 3).then_some(ids)
        })
        .await;
    assert_eq!(gets_from_gateway.len(), 3, "three successful GetTask calls: {gets_from_gateway:?}");
    for id in &gets_from_gateway {
        assert!(id.starts_with("gw-"), "a generated id: {id}");
        echo.call_line("echo", id, "GetTask").await;
    }
    assert!(
        gets_from_gateway.windows(2).all(|w| w[0] != w[1]),
        "each call gets its own id: {gets_from_gateway:?}"
    );
}

async fn get(
    client: &mut AsyncAgentServiceClient<Channel>,
    task_type: &str,
    meta: &[u8],
    id: &str,
) -> Result<admin::GetTaskResponse, tonic::Status> {
    let mut req = tonic::Request::new(admin::GetTaskRequest {
        resource_meta: meta.to_vec(),
        task_category: category(task_type),
        ..Default::default()
    });
    // Sent as raw bytes: tonic's metadata parser accepts any valid header value.
    req.metadata_mut().insert(
        "x-request-id",
        tonic::metadata::MetadataValue::try_from(id.as_bytes()).expect("a valid header value"),
    );
    client.get_task(req).await.map(tonic::Response::into_inner)
}

fn code_text(code: tonic::Code) -> &'static str {
    flotilla_gateway::proxy::code_name(code)
}

/// `--threads 1` runs tokio's current-thread scheduler: signals, the listener,
/// the call and its forwarding all share one thread. SIGTERM must still let the
/// call in flight finish, and the process then exit 0.
#[tokio::test]
async fn a_one_thread_gateway_finishes_the_call_in_flight_on_sigterm() {
    use flotilla_proto::service::sync_agent_service_client::SyncAgentServiceClient;
    use prost_types::value::Kind;

    let (_echo, mut gateway) = echo_behind_a_gateway().await;
    let (addr, admin) = (gateway.grpc_addr().await, gateway.admin_addr().await);
    let messages =
        sync_messages(echo_template("echo_sync", &[("duration_ms", Kind::NumberValue(2500.0))]), inputs(4));
    let mut client = SyncAgentServiceClient::new(flotilla_testkit::channel(addr));
    let call = tokio::spawn(async move {
        let mut stream = client.execute_task_sync(tokio_stream::iter(messages)).await?.into_inner();
        stream.message().await
    });
    eventually("the call to be in flight", Duration::from_secs(10), || async {
        let (_, metrics) = flotilla_testkit::http_get(admin, "/metrics").await;
        metrics.contains("flotilla_gateway_in_flight_requests 1").then_some(())
    })
    .await;
    let pid = gateway.child.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().expect("kill runs");
    assert!(killed.success(), "kill -TERM {pid}");
    // The gateway took the signal while the call still runs: it drains, it does not just exit.
    eventually("the gateway to log that it is shutting down", Duration::from_secs(10), || async {
        gateway
            .find(|v| v["fields"]["message"].as_str().is_some_and(|m| m.starts_with("Shutting down")))
            .map(|_| ())
    })
    .await;
    assert!(!call.is_finished(), "the call ended before the gateway began to drain: nothing was shown");
    assert!(
        gateway.child.try_wait().expect("wait on the gateway").is_none(),
        "the gateway exited with a call in flight"
    );
    let answer =
        call.await.expect("the call task").expect("the call in flight succeeds").expect("one answer");
    let Some(admin::execute_task_sync_response::Res::Header(h)) = answer.res else {
        panic!("no header: {answer:?}")
    };
    assert_eq!(h.resource.expect("a resource").outputs, Some(inputs(4)));
    let status = eventually("the gateway to exit", Duration::from_secs(10), || {
        let exited = gateway.child.try_wait().expect("wait on the gateway");
        async move { exited }
    })
    .await;
    assert!(status.success(), "the gateway exits 0 after SIGTERM: {status}");
}

#[tokio::test]
async fn a_call_the_caller_gives_up_on_is_logged_cancelled_on_both_sides_and_counted() {
    use flotilla_proto::service::sync_agent_service_client::SyncAgentServiceClient;
    use prost_types::value::Kind;

    let (echo, gateway) = echo_behind_a_gateway().await;
    let (addr, admin) = (gateway.grpc_addr().await, gateway.admin_addr().await);
    let messages =
        sync_messages(echo_template("echo_sync", &[("duration_ms", Kind::NumberValue(60_000.0))]), inputs(5));
    let mut client = SyncAgentServiceClient::new(flotilla_testkit::channel(addr));
    // No grpc-timeout (that would be the gateway's DEADLINE_EXCEEDED): the caller just drops the call.
    let mut request = tonic::Request::new(tokio_stream::iter(messages));
    request.metadata_mut().insert("x-request-id", "it-cancelled-1".parse().expect("ASCII"));
    let call = tokio::spawn(async move { client.execute_task_sync(request).await });
    // Echo has the call once it counts it in flight: the plugin runs from the same poll on.
    let echo_admin = echo.admin_addr().await;
    eventually("echo to have the call", Duration::from_secs(10), || async {
        let (_, metrics) = flotilla_testkit::http_get(echo_admin, "/metrics").await;
        metrics.lines().any(|l| l == "flotilla_service_in_flight_requests 1").then_some(())
    })
    .await;
    call.abort(); // the stream is reset
    for (who, logs) in [("gateway", &gateway), ("echo", &echo)] {
        let line = logs.call_line(who, "it-cancelled-1", "ExecuteTaskSync").await;
        assert_eq!(
            (&line["level"], &line["fields"]["code"]),
            (&"INFO".into(), &"CANCELLED".into()),
            "{who}: {line}"
        );
        assert!(
            line["fields"]["error"].as_str().is_some_and(|e| e.contains("caller reset the stream")),
            "{who}: {line}"
        );
    }
    for (who, logs) in [("gateway", &gateway), ("echo", &echo)] {
        let line = logs.call_line(who, "it-cancelled-1", "ExecuteTaskSync").await;
        assert_eq!(line["fields"]["task_type"], "echo_sync", "{who}: {line}");
    }
    let line = gateway.call_line("gateway", "it-cancelled-1", "ExecuteTaskSync").await;
    assert_eq!(line["fields"]["plugin"], "echo", "{line}");
    let (_, metrics) = flotilla_testkit::http_get(admin, "/metrics").await;
    assert!(
        metrics.lines().any(|l| l.starts_with("flotilla_gateway_requests_total{")
            && l.contains("method=\"ExecuteTaskSync\"")
            && l.contains("code=\"CANCELLED\"")
            && l.contains("plugin=\"echo\"")
            && l.ends_with(" 1")),
        "{metrics}"
    );

    // A call whose deadline passes is ended by both, and both log it so.
    let messages =
        sync_messages(echo_template("echo_sync", &[("duration_ms", Kind::NumberValue(60_000.0))]), inputs(6));
    let mut request = tonic::Request::new(tokio_stream::iter(messages));
    request.metadata_mut().insert("x-request-id", "it-deadline-1".parse().expect("ASCII"));
    request.set_timeout(Duration::from_millis(300));
    let mut client = SyncAgentServiceClient::new(flotilla_testkit::channel(addr));
    let late = client.execute_task_sync(request).await.expect_err("the deadline passes first");
    assert!(matches!(late.code(), tonic::Code::DeadlineExceeded | tonic::Code::Cancelled), "{late:?}");
    for (who, logs) in [("gateway", &gateway), ("echo", &echo)] {
        let line = logs.call_line(who, "it-deadline-1", "ExecuteTaskSync").await;
        assert_eq!(line["fields"]["code"], "DEADLINE_EXCEEDED", "{who}: {line}");
    }
}
