//! The admin HTTP listener: `/metrics` (Prometheus text format), `/livez`
//! (the process runs) and `/readyz` (it can serve: 200 or 503).
//! Plain HTTP/1.1, separate from the gRPC port so probes and scrapes never
//! compete with agent traffic.

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;

use crate::Shutdown;

/// Whether the process is ready for traffic; shared between the server and `/readyz`.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Marks the process ready (`true`) or not.
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }

    /// Whether the process is ready.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// What the admin listener serves.
#[derive(Clone, Debug)]
pub struct Admin {
    /// Metrics exposed on `/metrics`.
    pub registry: Registry,
    /// Answer of `/readyz`.
    pub readiness: Readiness,
}

/// An admin listener serving in the background until [`AdminServer::stop`].
#[derive(Debug)]
pub struct AdminServer {
    stop: Shutdown,
    task: tokio::task::JoinHandle<()>,
}

impl AdminServer {
    /// Stops the listener (open scrapes and probes finish) and waits for it.
    pub async fn stop(mut self) {
        self.stop.trigger();
        let _ = (&mut self.task).await;
    }
}

impl Drop for AdminServer {
    /// A server dropped before it stopped (aborted, or its future dropped)
    /// takes its admin listener with it.
    fn drop(&mut self) {
        self.stop.trigger();
    }
}

impl Admin {
    /// Serves admin HTTP on `listener` in the background until
    /// [`AdminServer::stop`]: a server stops it after its drain, so that while
    /// in-flight calls finish `/readyz` answers 503 and `/metrics` still scrapes.
    pub fn spawn(self, listener: TcpListener) -> AdminServer {
        let stop = Shutdown::new();
        let task = tokio::spawn(self.serve(listener, stop.clone()));
        AdminServer { stop, task }
    }

    /// Serves admin HTTP on `listener` until `shutdown` fires.
    pub async fn serve(self, listener: TcpListener, shutdown: Shutdown) {
        let admin = Arc::new(self);
        loop {
            let (stream, _) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(error) => {
                        tracing::warn!(%error, "Admin accept failed");
                        continue;
                    }
                },
                _ = shutdown.wait() => return,
            };
            let admin = admin.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let admin = admin.clone();
                    async move { Ok::<_, Infallible>(admin.handle(&req)) }
                });
                let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                tokio::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => {}
                    _ = shutdown.wait() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.await;
                    }
                }
            });
        }
    }

    fn handle(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        }
        match req.uri().path() {
            "/metrics" => {
                let mut buf = Vec::with_capacity(8 * 1024);
                let encoder = TextEncoder::new();
                if let Err(error) = encoder.encode(&self.registry.gather(), &mut buf) {
                    tracing::warn!(%error, "Encoding metrics failed");
                    return text(StatusCode::INTERNAL_SERVER_ERROR, "metrics encoding failed\n");
                }
                Response::builder()
                    .header(header::CONTENT_TYPE, encoder.format_type())
                    .body(Full::new(Bytes::from(buf)))
                    .expect("static response parts are valid")
            }
            "/livez" | "/live" => text(StatusCode::OK, "ok\n"),
            "/readyz" | "/ready" => {
                if self.readiness.get() {
                    text(StatusCode::OK, "ready\n")
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                }
            }
            _ => text(StatusCode::NOT_FOUND, "not found: try /metrics, /livez or /readyz\n"),
        }
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("static response parts are valid")
}
