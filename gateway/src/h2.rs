//! One replica's HTTP/2 client: a single multiplexed connection, made on
//! first use (or by the warm-up), remade when it closes. Calls go straight to
//! the `h2` crate's `SendRequest`: the request's headers and its one buffered
//! body chunk are queued on the connection from the caller's own task, and the
//! response is read from there too. There is no queue or task per call
//! between the balancer and the connection (hyper's client adds a dispatch
//! channel and spawns two tasks per request: one to pipe the body, one to
//! deliver the response).

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use ::h2::client::{self, SendRequest};
use arc_swap::ArcSwapOption;
use bytes::Bytes;
use flotilla_sdk::h2serve::{RecvBody, YieldOnWake};
use http_body_util::BodyExt;
use tonic::body::Body;
use tower::Service;

/// How often an idle-or-not connection is pinged, and how long the answer may take.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a call to a replica failed.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// No connection could be made: the request was never sent.
    #[error("connecting to {addr} failed: {reason}")]
    Connect {
        /// The replica.
        addr: SocketAddr,
        /// What went wrong.
        reason: String,
    },
    /// The connection turned the request away before any of it was sent (it
    /// was closing): safe to send again, but not a refused connection.
    #[error("the connection to {addr} closed before the call was sent")]
    Unsent {
        /// The replica.
        addr: SocketAddr,
        /// h2's error.
        #[source]
        source: ::h2::Error,
    },
    /// The request body could not be read (the caller's side failed).
    #[error("reading the request for {addr} failed: {reason}")]
    Request {
        /// The replica.
        addr: SocketAddr,
        /// What went wrong.
        reason: String,
    },
    /// The call failed after it was handed to the connection.
    #[error("the call to {addr} failed")]
    Call {
        /// The replica.
        addr: SocketAddr,
        /// h2's error.
        #[source]
        source: ::h2::Error,
    },
}

impl EndpointError {
    /// Whether the request provably never reached the replica.
    pub fn never_sent(&self) -> bool {
        matches!(self, Self::Connect { .. } | Self::Unsent { .. })
    }

    /// Whether no connection could be made at all (the replica is down or refusing).
    pub fn refused(&self) -> bool {
        matches!(self, Self::Connect { .. })
    }
}

/// A live connection: its request handle, and whether its driver has ended.
struct Conn {
    sender: SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
}

/// A lazily connected HTTP/2 client to one replica. Clones share the connection.
#[derive(Clone)]
pub struct H2Endpoint {
    addr: SocketAddr,
    /// `addr` as the `:authority` every request carries.
    authority: http::uri::Authority,
    connect_timeout: Duration,
    conn: Arc<ArcSwapOption<Conn>>,
    connecting: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for H2Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Endpoint").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl H2Endpoint {
    /// A client for `addr`; nothing is connected until the first call.
    pub fn new(addr: SocketAddr, connect_timeout: Duration) -> Self {
        Self {
            addr,
            authority: addr.to_string().parse().expect("a socket address is a valid authority"),
            connect_timeout,
            conn: Arc::default(),
            connecting: Arc::default(),
        }
    }

    /// A request handle of its own (h2 allows one pending request per handle).
    fn live_sender(&self) -> Option<SendRequest<Bytes>> {
        self.conn.load().as_deref().filter(|c| !c.closed.load(Ordering::Acquire)).map(|c| c.sender.clone())
    }

    /// The current connection, or a new one (one connect at a time; others wait for it).
    async fn connection(&self) -> Result<SendRequest<Bytes>, EndpointError> {
        if let Some(s) = self.live_sender() {
            return Ok(s);
        }
        let _one_at_a_time = self.connecting.lock().await;
        if let Some(s) = self.live_sender() {
            return Ok(s);
        }
        let connect = |reason: String| EndpointError::Connect { addr: self.addr, reason };
        let stream = tokio::time::timeout(self.connect_timeout, tokio::net::TcpStream::connect(self.addr))
            .await
            .map_err(|_| connect(format!("no connection within {:?}", self.connect_timeout)))?
            .map_err(|e| connect(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let mut builder = client::Builder::new();
        builder.enable_push(false).initial_window_size(1 << 20).initial_connection_window_size(4 << 20);
        let (sender, mut conn) =
            tokio::time::timeout(self.connect_timeout, builder.handshake::<_, Bytes>(stream))
                .await
                .map_err(|_| connect("no HTTP/2 handshake in time".to_owned()))?
                .map_err(|e| connect(format!("HTTP/2 handshake: {e}")))?;
        let closed = Arc::new(AtomicBool::new(false));
        let (addr, driver_closed) = (self.addr, closed.clone());
        let pings = conn.ping_pong();
        // Woken by a call with a request to send, the driver first lets the
        // other ready calls queue theirs: one write for them all. (On one
        // runtime thread the calls run in their connections' tasks, which
        // finish a batch before the driver runs: measured, stepping back there
        // changes nothing.)
        let spread = flotilla_sdk::h2serve::many_threads();
        tokio::spawn(async move {
            let driven = YieldOnWake::new(&mut conn, move || spread);
            tokio::select! {
                result = driven => {
                    if let Err(error) = result {
                        tracing::debug!(%addr, %error, "Replica connection ended");
                    }
                }
                () = keepalive(pings) => {
                    tracing::debug!(%addr, "Replica did not answer a keepalive ping; closing its connection");
                }
            }
            driver_closed.store(true, Ordering::Release);
        });
        self.conn.store(Some(Arc::new(Conn { sender: sender.clone(), closed })));
        Ok(sender)
    }

    /// Forgets the current connection (it is closing), so the next call makes a new one.
    fn forget(&self) {
        self.conn.store(None);
    }

    /// Sends one call. A connection found closed before the request is handed
    /// to it is replaced once; a request it turns away unsent fails with
    /// [`EndpointError::Unsent`], which callers may retry.
    ///
    /// # Errors
    /// [`EndpointError`].
    pub async fn send(&self, req: http::Request<Body>) -> Result<http::Response<Body>, EndpointError> {
        let (mut head, body) = req.into_parts();
        // Requests are whole messages already (the gateway buffers them to
        // route): one chunk, sent in the same step as the headers.
        let body =
            whole_body(body).await.map_err(|reason| EndpointError::Request { addr: self.addr, reason })?;
        // HTTP/2 requests carry :scheme and :authority; callers give only the path.
        let mut uri = std::mem::take(&mut head.uri).into_parts();
        uri.scheme = Some(http::uri::Scheme::HTTP);
        uri.authority = Some(self.authority.clone());
        if uri.path_and_query.is_none() {
            uri.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        head.uri = http::Uri::from_parts(uri).expect("scheme, authority and path make a valid URI");

        let mut sender = self.connection().await?;
        let mut ready = None;
        for _ in 0..2 {
            match sender.ready().await {
                Ok(s) => {
                    ready = Some(s);
                    break;
                }
                Err(_) => {
                    self.forget();
                    sender = self.connection().await?;
                }
            }
        }
        let Some(mut sender) = ready else {
            return Err(EndpointError::Connect {
                addr: self.addr,
                reason: "the connection kept closing".to_owned(),
            });
        };
        let end_stream = body.is_empty();
        let (response, mut send) =
            sender.send_request(http::Request::from_parts(head, ()), end_stream).map_err(|source| {
                self.forget();
                EndpointError::Unsent { addr: self.addr, source }
            })?;
        if !end_stream {
            // Queued whole; the connection sends it as flow control allows.
            send.send_data(body, true).map_err(|source| EndpointError::Call { addr: self.addr, source })?;
        }
        let response = response.await.map_err(|source| EndpointError::Call { addr: self.addr, source })?;
        Ok(response.map(|recv| Body::new(RecvBody::new(recv))))
    }
}

/// The request body as one buffer. The proxy's bodies are one chunk already
/// (taken as it is, no copy and no list of chunks); others are collected.
async fn whole_body(mut body: Body) -> Result<Bytes, String> {
    let first = match body.frame().await {
        None => return Ok(Bytes::new()),
        Some(Err(e)) => return Err(e.to_string()),
        Some(Ok(frame)) => frame.into_data().unwrap_or_default(),
    };
    if http_body::Body::is_end_stream(&body) {
        return Ok(first);
    }
    let rest = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    if first.is_empty() {
        return Ok(rest);
    }
    let mut all = bytes::BytesMut::with_capacity(first.len() + rest.len());
    all.extend_from_slice(&first);
    all.extend_from_slice(&rest);
    Ok(all.freeze())
}

/// Pings the replica every [`KEEPALIVE_INTERVAL`]; returns when an answer is
/// late (the connection is then closed) or pings cannot be sent.
async fn keepalive(pings: Option<::h2::PingPong>) {
    let Some(mut pings) = pings else { return std::future::pending().await };
    loop {
        tokio::time::sleep(KEEPALIVE_INTERVAL).await;
        match tokio::time::timeout(KEEPALIVE_TIMEOUT, pings.ping(::h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return std::future::pending().await, // the connection is ending by itself
            Err(_) => return,
        }
    }
}

impl Service<http::Request<Body>> for H2Endpoint {
    type Response = http::Response<Body>;
    type Error = EndpointError;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<Body>, EndpointError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), EndpointError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.send(req).await })
    }
}
