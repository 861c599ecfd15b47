//! Test support shared by Flotilla's crates (a dev-dependency only): start
//! plugin services on loopback, make raw gRPC calls with exact bytes, and wait
//! on conditions with a bound instead of sleeping.

#![warn(missing_docs)]

pub mod dns;
pub mod fake_http;
pub mod fakes;
pub mod jwt;
pub mod process;
pub mod tls;

use std::{future::Future, net::SocketAddr, time::Duration};

use bytes::{BufMut, Bytes, BytesMut};
use flotilla_sdk::{Plugin, ServeOptions};
use flotilla_telemetry::Shutdown;
use http_body_util::BodyExt;
use tokio::{net::TcpListener, task::JoinHandle};
use tower::ServiceExt;

/// Binds 127.0.0.1 on a free port.
pub async fn bind_loopback() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.expect("binding a loopback port")
}

/// A plugin service running on loopback.
pub struct RunningService {
    /// Its gRPC address.
    pub addr: SocketAddr,
    /// Its admin HTTP address.
    pub admin: SocketAddr,
    /// Triggers its shutdown.
    pub shutdown: Shutdown,
    /// Resolves when it has stopped.
    pub task: JoinHandle<Result<(), flotilla_sdk::ServeError>>,
}

/// Serves `plugin` on loopback ports with default options.
pub async fn spawn_plugin<P: Plugin>(plugin: P) -> RunningService {
    spawn_plugin_with(plugin, ServeOptions::default()).await
}

/// Serves `plugin` on loopback ports.
pub async fn spawn_plugin_with<P: Plugin>(plugin: P, options: ServeOptions) -> RunningService {
    spawn_plugin_at(plugin, "127.0.0.1:0".parse().expect("valid"), options).await
}

/// Serves `plugin` with its gRPC listener on `grpc` (any 127.0.0.0/8 address; port 0 picks one).
pub async fn spawn_plugin_at<P: Plugin>(
    plugin: P,
    grpc: SocketAddr,
    options: ServeOptions,
) -> RunningService {
    let grpc = TcpListener::bind(grpc).await.unwrap_or_else(|e| panic!("binding {grpc}: {e}"));
    let admin = bind_loopback().await;
    let addr = grpc.local_addr().expect("bound");
    let admin_addr = admin.local_addr().expect("bound");
    let shutdown = Shutdown::new();
    let task = tokio::spawn(flotilla_sdk::serve(plugin, grpc, admin, options, shutdown.clone()));
    RunningService { addr, admin: admin_addr, shutdown, task }
}

/// A lazily connecting channel to `addr`.
pub fn channel(addr: SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("valid URI")
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy()
}

/// Frames one message the gRPC way (uncompressed).
pub fn frame(message: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + message.len());
    b.put_u8(0);
    b.put_u32(u32::try_from(message.len()).expect("test messages are small"));
    b.put_slice(message);
    b.freeze()
}

/// What a raw call answered.
#[derive(Debug)]
pub struct RawAnswer {
    /// The gRPC status code (from trailers, or headers for trailers-only answers).
    pub code: tonic::Code,
    /// The `grpc-message`, percent-decoded.
    pub message: String,
    /// The response messages' bytes, unframed.
    pub messages: Vec<Bytes>,
}

/// Calls `path` on `addr` with `body` sent as is (already framed), and reads the whole answer.
pub async fn raw_call(addr: SocketAddr, path: &str, body: Bytes) -> RawAnswer {
    raw_call_with(addr, path, &[], body).await
}

/// [`raw_call`] with more request headers (`x-request-id`, say).
pub async fn raw_call_with(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: Bytes) -> RawAnswer {
    let mut builder = http::Request::builder()
        .method("POST")
        .uri(path)
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let req = builder.body(tonic::body::Body::new(http_body_util::Full::new(body))).expect("valid request");
    let resp = channel(addr).oneshot(req).await.expect("the server answers over HTTP/2");
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await.expect("the response body completes");
    let trailers = collected.trailers().cloned();
    RawAnswer::new(&parts.headers, &collected.to_bytes(), trailers.as_ref())
}

impl RawAnswer {
    /// An answer from its headers, body and trailers: the status from the
    /// headers (trailers-only) or else the trailers, and the body's messages.
    ///
    /// # Panics
    /// When neither carries a `grpc-status`.
    fn new(headers: &http::HeaderMap, data: &[u8], trailers: Option<&http::HeaderMap>) -> Self {
        let status = tonic::Status::from_header_map(headers)
            .or_else(|| trailers.and_then(tonic::Status::from_header_map))
            .expect("a grpc-status in headers or trailers");
        let mut messages = Vec::new();
        let mut rest = data;
        while rest.len() >= 5 {
            let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
            messages.push(Bytes::copy_from_slice(&rest[5..5 + len]));
            rest = &rest[5 + len..];
        }
        RawAnswer { code: status.code(), message: status.message().to_owned(), messages }
    }
}

/// What [`call_before_closing`] saw.
#[derive(Debug)]
pub struct OpenStreamAnswer {
    /// The answer, read to its end while the request stream was still open.
    pub answer: RawAnswer,
    /// The reset the server sent on the request stream, if any (checked after
    /// a PING round trip, so that one sent before the answer ended has arrived).
    pub reset: Option<h2::Reason>,
    /// Whether `after` and the end of the request stream could still be sent.
    pub sent_after: bool,
}

/// Calls `path` on `addr` over HTTP/2 with `first` (framed messages) sent
/// without ending the request stream, and reads the whole answer (bounded:
/// 10 s) while the stream stays open, as a client may that waits for the
/// answer before it closes its side. Then reports whether the server reset the
/// stream, and sends `after` with the end of the stream.
///
/// # Panics
/// When there is no answer within 10 s, or the connection fails.
pub async fn call_before_closing(
    addr: SocketAddr,
    path: &str,
    first: Bytes,
    after: Bytes,
) -> OpenStreamAnswer {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("the server is reachable");
    let (client, mut connection) = h2::client::handshake(tcp).await.expect("an HTTP/2 handshake");
    let mut ping = connection.ping_pong().expect("the connection's ping handle");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut client = client.ready().await.expect("the connection takes a stream");
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("a valid request");
    let (response, mut send) = client.send_request(request, false).expect("the request goes out");
    send.send_data(first, false).expect("the messages go out");
    let read = async {
        let (parts, mut body) = response.await.expect("response headers").into_parts();
        let mut data = BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.expect("response data");
            let _ = body.flow_control().release_capacity(chunk.len());
            data.extend_from_slice(&chunk);
        }
        let trailers = body.trailers().await.expect("response trailers");
        (parts.headers, data.freeze(), trailers)
    };
    let (headers, data, trailers) = tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("the whole answer within 10 s, the request stream still open");
    let answer = RawAnswer::new(&headers, &data, trailers.as_ref());
    ping.ping(h2::Ping::opaque()).await.expect("a PING answered");
    let reset = match std::future::poll_fn(|cx| std::task::Poll::Ready(send.poll_reset(cx))).await {
        std::task::Poll::Ready(Ok(reason)) => Some(reason),
        _ => None,
    };
    let sent_after = send.send_data(after, true).is_ok();
    OpenStreamAnswer { answer, reset, sent_after }
}

/// Waits until `check` returns `Some`, polling every 20 ms, for at most `bound`.
///
/// # Panics
/// When the bound passes, naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, bound: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out after {bound:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of the sample `series` (name and labels exactly as exposed) on the
/// admin listener at `admin`, or 0 when the series is absent.
pub async fn metric(admin: SocketAddr, series: &str) -> f64 {
    let (_, text) = http_get(admin, "/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Fetches `http://{addr}{path}` and returns (status, body text).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("admin listener reachable");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("request written");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("response read");
    let status = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// Encodes a prost message.
pub fn encode<M: prost::Message>(m: &M) -> Vec<u8> {
    m.encode_to_vec()
}
