//! Graceful shutdown: a call in flight finishes; then the gateway stops.

use std::time::Duration;

use flotilla_echo::Echo;
use flotilla_proto::admin;
use flotilla_testkit::{eventually, http_get, spawn_plugin};
use prost_types::value::Kind;

use crate::support::*;

#[tokio::test]
async fn shutdown_lets_the_call_in_flight_finish() {
    let echo = spawn_plugin(Echo::default()).await;
    let gw = spawn_gateway(vec![plugin("echo", format!("static://{}", echo.addr))], |_| {}).await;
    let messages =
        sync_messages(echo_template("echo_sync", &[("duration_ms", Kind::NumberValue(700.0))]), inputs(9));
    let mut client = gw.sync_client();
    let call = tokio::spawn(async move {
        let mut stream = client.execute_task_sync(tokio_stream::iter(messages)).await?.into_inner();
        stream.message().await
    });
    eventually("the call to be in flight", Duration::from_secs(5), || async {
        let (_, metrics) = http_get(gw.admin, "/metrics").await;
        metrics.contains("flotilla_gateway_in_flight_requests 1").then_some(())
    })
    .await;
    gw.shutdown.trigger();
    let answer = call.await.unwrap().expect("the in-flight call succeeds").expect("one answer");
    let Some(admin::execute_task_sync_response::Res::Header(h)) = answer.res else { panic!("no header") };
    assert_eq!(h.resource.unwrap().outputs, Some(inputs(9)));
    tokio::time::timeout(Duration::from_secs(5), gw.task).await.expect("the gateway stops").unwrap().unwrap();
    // New calls are refused once it has stopped.
    let refused = gw_connect_fails(gw.addr).await;
    assert!(refused, "the gateway still accepts connections after shutdown");
}

async fn gw_connect_fails(addr: std::net::SocketAddr) -> bool {
    tokio::net::TcpStream::connect(addr).await.is_err()
}
