//! TLS on the gateway's listener (`tls_cert_file`, `tls_key_file`), for a
//! propeller set to `insecure: false`: gRPC over TLS with ALPN h2, no
//! plaintext on the same port, and a replaced certificate served to new
//! connections without a restart.

use std::time::Duration;

use flotilla_proto::{admin, service::async_agent_service_client::AsyncAgentServiceClient};
use flotilla_testkit::{eventually, spawn_plugin, tls::TestCa};

use crate::support::{category, echo_round_trip, echo_template, inputs, plugin, spawn_gateway};

#[tokio::test]
async fn a_tls_gateway_serves_the_agent_services_over_tls_only() {
    let ca = TestCa::new();
    let files = ca.issue("gateway");
    let echo = spawn_plugin(flotilla_echo::Echo::default()).await;
    let gw = spawn_gateway(vec![plugin("echo", format!("static://{}", echo.addr))], |c| {
        c.tls_cert_file = Some(files.cert.clone());
        c.tls_key_file = Some(files.key.clone());
    })
    .await;

    let (presented, alpn) = ca.handshake(gw.addr).await.expect("TLS handshake");
    assert_eq!(presented, files.der, "the configured certificate");
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]), "gRPC clients need h2 agreed by ALPN");

    // A task created, read and deleted through the gateway over TLS.
    echo_round_trip(&mut AsyncAgentServiceClient::new(ca.channel(gw.addr)), 7).await;

    // A plaintext client gets no gRPC answer from a TLS port.
    let refused = tokio::time::timeout(
        Duration::from_secs(10),
        gw.async_client()
            .get_task(admin::GetTaskRequest { task_category: category("echo"), ..Default::default() }),
    )
    .await
    .expect("a plaintext call ends, it does not hang");
    let status = refused.expect_err("plaintext on the TLS port must fail");
    // tonic reports the closed connection as a transport error (UNKNOWN or UNAVAILABLE).
    assert!(matches!(status.code(), tonic::Code::Unknown | tonic::Code::Unavailable), "{status:?}");

    gw.shutdown.trigger();
    gw.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_replaced_certificate_reaches_new_connections_and_open_ones_keep_working() {
    let ca = TestCa::new();
    let first = ca.issue("first");
    let echo = spawn_plugin(flotilla_echo::Echo::default()).await;
    let gw = spawn_gateway(vec![plugin("echo", format!("static://{}", echo.addr))], |c| {
        c.tls_cert_file = Some(first.cert.clone());
        c.tls_key_file = Some(first.key.clone());
    })
    .await;
    let mut open = AsyncAgentServiceClient::new(ca.channel(gw.addr));
    let create = || admin::CreateTaskRequest {
        inputs: Some(inputs(1)),
        template: Some(echo_template("echo", &[])),
        output_prefix: "s3://bucket/out".into(),
        ..Default::default()
    };
    open.create_task(create()).await.expect("CreateTask before the rotation");
    assert_eq!(ca.handshake(gw.addr).await.unwrap().0, first.der);

    // A renewal: new files at the same paths, one after the other (the watch
    // takes the pair once both are there).
    let second = ca.issue("second");
    std::fs::copy(&second.key, &first.key).unwrap();
    std::fs::copy(&second.cert, &first.cert).unwrap();
    eventually("new connections to get the replaced certificate", Duration::from_secs(10), || async {
        ca.handshake(gw.addr).await.ok().filter(|(presented, _)| *presented == second.der)
    })
    .await;

    // The connection made before the rotation still carries calls.
    open.create_task(create()).await.expect("CreateTask on the connection opened before the rotation");

    gw.shutdown.trigger();
    gw.task.await.unwrap().unwrap();
}
