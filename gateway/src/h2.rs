//! One replica's HTTP/2 client: a single multiplexed connection, made on
//! first use (or by the warm-up), remade when it closes. Calls go straight to
//! hyper's `SendRequest`; there is no queue or task of our own between the
//! balancer and the connection.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use arc_swap::ArcSwapOption;
use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tonic::body::Body;
use tower::Service;

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
    /// The call failed after it was handed to the connection.
    #[error("the call to {addr} failed")]
    Call {
        /// The replica.
        addr: SocketAddr,
        /// hyper's error.
        #[source]
        source: hyper::Error,
    },
}

impl EndpointError {
    /// Whether the request provably never reached the replica.
    pub fn never_sent(&self) -> bool {
        matches!(self, Self::Connect { .. })
    }
}

/// A lazily connected HTTP/2 client to one replica. Clones share the connection.
#[derive(Clone)]
pub struct H2Endpoint {
    addr: SocketAddr,
    /// `addr` as the `:authority` every request carries.
    authority: http::uri::Authority,
    connect_timeout: Duration,
    sender: Arc<ArcSwapOption<SendRequest<Body>>>,
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
            sender: Arc::default(),
            connecting: Arc::default(),
        }
    }

    fn live_sender(&self) -> Option<SendRequest<Body>> {
        self.sender.load().as_deref().filter(|s| !s.is_closed()).cloned()
    }

    /// The current connection, or a new one (one connect at a time; others wait for it).
    async fn connection(&self) -> Result<SendRequest<Body>, EndpointError> {
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
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(4 << 20)
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        let (sender, conn) =
            tokio::time::timeout(self.connect_timeout, builder.handshake(TokioIo::new(stream)))
                .await
                .map_err(|_| connect("no HTTP/2 handshake in time".to_owned()))?
                .map_err(|e| connect(format!("HTTP/2 handshake: {e}")))?;
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(%addr, %error, "Replica connection ended");
            }
        });
        self.sender.store(Some(Arc::new(sender.clone())));
        Ok(sender)
    }

    /// Sends one call. A request the connection turns away unsent (it was
    /// closing) is sent once more on a new connection.
    ///
    /// # Errors
    /// [`EndpointError`].
    pub async fn send(&self, req: http::Request<Body>) -> Result<http::Response<Body>, EndpointError> {
        let mut sender = self.connection().await?;
        let mut req = req;
        // HTTP/2 requests carry :scheme and :authority; callers give only the path.
        let mut uri = std::mem::take(req.uri_mut()).into_parts();
        uri.scheme = Some(http::uri::Scheme::HTTP);
        uri.authority = Some(self.authority.clone());
        if uri.path_and_query.is_none() {
            uri.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        *req.uri_mut() = http::Uri::from_parts(uri).expect("scheme, authority and path make a valid URI");
        for attempt in 0..2 {
            if sender.ready().await.is_err() {
                self.sender.store(None);
                sender = self.connection().await?;
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(resp.map(Body::new)),
                Err(mut e) => match e.take_message() {
                    Some(unsent) if attempt == 0 => {
                        req = unsent;
                        self.sender.store(None);
                        sender = self.connection().await?;
                    }
                    _ => return Err(EndpointError::Call { addr: self.addr, source: e.into_error() }),
                },
            }
        }
        Err(EndpointError::Connect { addr: self.addr, reason: "the connection kept closing".to_owned() })
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
