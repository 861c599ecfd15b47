//! A real HTTP/1.1 server on loopback that plays an external REST API in tests: it records
//! every request, answers through a handler (the API's model), and can be told to answer the
//! next matching requests with scripted replies first (rate limits, server errors, slow or
//! malformed answers). `GET /_fake/requests` lists what it received, as JSON, for tests
//! written in other languages.

use std::{
    collections::VecDeque,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::{Value, json};
use tokio::{sync::Notify, task::JoinHandle};

/// One request the fake received.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// The method.
    pub method: Method,
    /// The path, as sent (not decoded).
    pub path: String,
    /// The query parameters, decoded, in order.
    pub query: Vec<(String, String)>,
    /// The headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
}

impl Recorded {
    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// The body as a decoded form.
    pub fn form(&self) -> Vec<(String, String)> {
        url::form_urlencoded::parse(&self.body).into_owned().collect()
    }

    /// A header's value, if present and text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The first query parameter of this name.
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The bearer token of the `Authorization` header, if any.
    pub fn bearer(&self) -> Option<&str> {
        self.header("authorization").and_then(|v| v.strip_prefix("Bearer "))
    }

    fn to_json(&self) -> Value {
        json!({
            "method": self.method.as_str(),
            "path": self.path,
            "query": self.query.iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>(),
            "headers": self.headers.iter().map(|(k, v)| json!([k.as_str(), String::from_utf8_lossy(v.as_bytes())])).collect::<Vec<_>>(),
            "body": String::from_utf8_lossy(&self.body),
        })
    }
}

/// An answer the fake gives.
#[derive(Clone, Debug)]
pub struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Bytes,
    delay: Duration,
}

impl Reply {
    /// A JSON body with this status.
    pub fn json(status: u16, body: Value) -> Self {
        Self::raw(status, body.to_string()).header("content-type", "application/json")
    }

    /// A plain-text body with this status.
    pub fn text(status: u16, body: &str) -> Self {
        Self::raw(status, body.to_owned()).header("content-type", "text/plain")
    }

    /// An empty body with this status.
    pub fn empty(status: u16) -> Self {
        Self::raw(status, String::new())
    }

    fn raw(status: u16, body: String) -> Self {
        Self { status, headers: Vec::new(), body: Bytes::from(body), delay: Duration::ZERO }
    }

    /// Adds a header.
    #[must_use]
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Answers only after `delay`.
    #[must_use]
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

type Handler = Arc<dyn Fn(&Recorded) -> Reply + Send + Sync>;

struct Inner {
    requests: Mutex<Vec<Recorded>>,
    injected: Mutex<VecDeque<(String, Reply)>>,
    handler: Handler,
    arrived: Notify,
}

/// A fake HTTP API on 127.0.0.1. Stops when dropped.
pub struct FakeHttp {
    addr: SocketAddr,
    inner: Arc<Inner>,
    task: JoinHandle<()>,
}

impl Drop for FakeHttp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeHttp {
    /// Starts a fake answering through `handler` on a free loopback port.
    pub async fn start(handler: impl Fn(&Recorded) -> Reply + Send + Sync + 'static) -> Self {
        Self::start_at("127.0.0.1:0".parse().expect("valid"), handler).await
    }

    /// Starts a fake on `addr`.
    pub async fn start_at(
        addr: SocketAddr,
        handler: impl Fn(&Recorded) -> Reply + Send + Sync + 'static,
    ) -> Self {
        let listener =
            tokio::net::TcpListener::bind(addr).await.unwrap_or_else(|e| panic!("binding {addr}: {e}"));
        let addr = listener.local_addr().expect("bound");
        let inner = Arc::new(Inner {
            requests: Mutex::new(Vec::new()),
            injected: Mutex::new(VecDeque::new()),
            handler: Arc::new(handler),
            arrived: Notify::new(),
        });
        let served = inner.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let inner = served.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| answer(inner.clone(), req));
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                });
            }
        });
        Self { addr, inner, task }
    }

    /// `http://127.0.0.1:<port>`, the base URL to point a service at.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.inner.requests.lock().expect("not poisoned").clone()
    }

    /// The requests whose path starts with `prefix`.
    pub fn requests_to(&self, prefix: &str) -> Vec<Recorded> {
        self.requests().into_iter().filter(|r| r.path.starts_with(prefix)).collect()
    }

    /// Answers the next request whose path starts with `path_prefix` with `reply`, before the
    /// handler sees it. Several injections for a path are used in order, once each.
    pub fn inject(&self, path_prefix: &str, reply: Reply) {
        self.inner.injected.lock().expect("not poisoned").push_back((path_prefix.to_owned(), reply));
    }

    /// Waits (at most `bound`) until `n` requests have arrived, and returns them all.
    ///
    /// # Panics
    /// When fewer arrived in time, with what did arrive.
    pub async fn wait_for_requests(&self, n: usize, bound: Duration) -> Vec<Recorded> {
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            let notified = self.inner.arrived.notified();
            let seen = self.requests();
            if seen.len() >= n {
                return seen;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let paths: Vec<_> = seen.iter().map(|r| format!("{} {}", r.method, r.path)).collect();
                panic!("expected {n} requests within {bound:?}, got {}: {paths:?}", seen.len());
            }
        }
    }
}

async fn answer(inner: Arc<Inner>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let query = parts
        .uri
        .query()
        .map(|q| url::form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let recorded = Recorded {
        method: parts.method,
        path: parts.uri.path().to_owned(),
        query,
        headers: parts.headers,
        body,
    };
    if recorded.method == Method::GET && recorded.path == "/_fake/requests" {
        let list: Vec<Value> =
            inner.requests.lock().expect("not poisoned").iter().map(Recorded::to_json).collect();
        return Ok(build(Reply::json(200, Value::Array(list))));
    }
    let injected = {
        let mut queue = inner.injected.lock().expect("not poisoned");
        let at = queue.iter().position(|(prefix, _)| recorded.path.starts_with(prefix.as_str()));
        at.and_then(|i| queue.remove(i)).map(|(_, r)| r)
    };
    inner.requests.lock().expect("not poisoned").push(recorded.clone());
    inner.arrived.notify_waiters();
    let reply = injected.unwrap_or_else(|| (inner.handler)(&recorded));
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    Ok(build(reply))
}

fn build(reply: Reply) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(reply.body));
    *response.status_mut() = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    for (k, v) in reply.headers {
        if let (Ok(k), Ok(v)) = (http::HeaderName::from_bytes(k.as_bytes()), http::HeaderValue::from_str(&v))
        {
            response.headers_mut().append(k, v);
        }
    }
    response
}
