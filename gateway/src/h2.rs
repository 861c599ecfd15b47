//! One replica's HTTP/2 client: a single multiplexed connection, made on
//! first use (or by the warm-up), remade when it closes. The connection is the
//! project's own (`conn`): one task owns the socket and every stream, and a
//! call hands it the request's headers and its one buffered body over a
//! channel, then reads its stream's answer from a channel of its own. No lock
//! is taken and no `http` request is rebuilt per call.
//!
//! Why not the `h2` crate's client, which the gateway used before: per
//! forwarded GetTask it cost about 30,000 of the gateway's 84,000 instructions
//! (stream slab and queues behind a mutex, an HPACK encoder that searches its
//! table and Huffman-codes every value, a response future and body per call).
//! This one does the same job in about 13,000 (`benches/RESULTS.md`). The
//! server side, which faces propeller and every other client, stays on `h2`.

mod conn;

use std::{
    future::Future,
    net::SocketAddr,
    panic::AssertUnwindSafe,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use conn::{Command, Driver, Event, Failure, Keepalive, Open};
use flotilla_sdk::h2serve::YieldOnWake;
use futures_util::{FutureExt as _, StreamExt as _};
use http::HeaderValue;
use http_body::Frame;
use http_body_util::BodyExt;
use tokio::sync::mpsc;
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
    /// was closing, or the replica refused the stream): safe to send again,
    /// but not a refused connection.
    #[error("the call to {addr} was not sent: {reason}")]
    Unsent {
        /// The replica.
        addr: SocketAddr,
        /// What happened.
        reason: String,
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
    #[error("the call to {addr} failed: {reason}")]
    Call {
        /// The replica.
        addr: SocketAddr,
        /// What happened.
        reason: String,
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

/// A live connection: the way to its driver, and whether it takes new streams.
struct Conn {
    commands: mpsc::UnboundedSender<Command>,
    closed: Arc<AtomicBool>,
}

impl Conn {
    fn live(&self) -> bool {
        !self.closed.load(Ordering::Acquire) && !self.commands.is_closed()
    }
}

/// A lazily connected HTTP/2 client to one replica. Clones share the connection.
#[derive(Clone)]
pub struct H2Endpoint {
    addr: SocketAddr,
    /// `addr` as the `:authority` every request carries.
    authority: HeaderValue,
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
            authority: HeaderValue::from_str(&addr.to_string())
                .expect("a socket address is a valid header value"),
            connect_timeout,
            conn: Arc::default(),
            connecting: Arc::default(),
        }
    }

    /// Connects now instead of on the first call (a connection that closes
    /// later is still remade by the next call).
    ///
    /// # Errors
    /// [`EndpointError::Connect`] when no connection can be made.
    pub async fn connect(&self) -> Result<(), EndpointError> {
        self.connection().await.map(drop)
    }

    fn live_conn(&self) -> Option<Arc<Conn>> {
        self.conn.load_full().filter(|c| c.live())
    }

    /// The current connection, or a new one (one connect at a time; others wait for it).
    async fn connection(&self) -> Result<Arc<Conn>, EndpointError> {
        if let Some(c) = self.live_conn() {
            return Ok(c);
        }
        let _one_at_a_time = self.connecting.lock().await;
        if let Some(c) = self.live_conn() {
            return Ok(c);
        }
        let connect = |reason: String| EndpointError::Connect { addr: self.addr, reason };
        let stream = tokio::time::timeout(self.connect_timeout, tokio::net::TcpStream::connect(self.addr))
            .await
            .map_err(|_| connect(format!("no connection within {:?}", self.connect_timeout)))?
            .map_err(|e| connect(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let closed = Arc::new(AtomicBool::new(false));
        let (commands, receiver) = mpsc::unbounded_channel();
        let keepalive = Keepalive::new(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT);
        // A request waits for the replica's stream limit as long as for a connection.
        let driver = Driver::new(stream, receiver, closed.clone(), keepalive, self.connect_timeout);
        let addr = self.addr;
        // Woken by a call with a request to send, the driver first lets the
        // other ready calls queue theirs: one write for them all. (On one
        // runtime thread the calls run in their connections' tasks, which
        // finish a batch before the driver runs: measured, stepping back there
        // changes nothing.)
        let spread = flotilla_sdk::h2serve::many_threads();
        tokio::spawn(async move {
            let mut driver = driver;
            let driven = AssertUnwindSafe(YieldOnWake::new(&mut driver, move || spread)).catch_unwind().await;
            match driven {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::debug!(%addr, %error, "Replica connection ended"),
                Err(_) => {
                    // A bug, not the replica's doing: its calls still get an answer.
                    tracing::error!(%addr, "The connection's driver panicked; its calls fail");
                    driver.fail_all("the gateway's connection driver failed");
                }
            }
            driver.turn_away_late_requests().await;
        });
        let conn = Arc::new(Conn { commands, closed });
        self.conn.store(Some(conn.clone()));
        Ok(conn)
    }

    /// Forgets `conn` (it is closing), so the next call makes a new one.
    fn forget(&self, conn: &Arc<Conn>) {
        conn.closed.store(true, Ordering::Release);
        self.conn.compare_and_swap(conn, None::<Arc<Conn>>);
    }

    /// Sends one call. A connection found closed before the request is handed
    /// to it is replaced once; a request it turns away unsent fails with
    /// [`EndpointError::Unsent`], which callers may retry.
    ///
    /// # Errors
    /// [`EndpointError`].
    pub async fn send(&self, req: http::Request<Body>) -> Result<http::Response<Body>, EndpointError> {
        let (head, body) = req.into_parts();
        // Requests are whole messages already (the gateway buffers them to
        // route): one chunk, sent in the same write as the headers.
        let body =
            whole_body(body).await.map_err(|reason| EndpointError::Request { addr: self.addr, reason })?;
        let path =
            head.uri.path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        let (events, answers) = futures_channel::mpsc::unbounded();
        let mut open = Box::new(Open {
            method: head.method,
            path,
            authority: self.authority.clone(),
            headers: head.headers,
            body,
            events,
        });
        let mut conn = self.connection().await?;
        // A driver that ended between the check and the send is replaced once.
        for tries_left in (0..2).rev() {
            match conn.commands.send(Command::Open(open)) {
                Ok(()) => break,
                Err(mpsc::error::SendError(Command::Open(back))) if tries_left > 0 => {
                    open = back;
                    self.forget(&conn);
                    conn = self.connection().await?;
                }
                Err(_) => {
                    return Err(EndpointError::Unsent {
                        addr: self.addr,
                        reason: "the connection kept closing".to_owned(),
                    });
                }
            }
        }
        // Dropped before the answer's head (a deadline, a client that went
        // away): the stream is reset, so the replica stops working on it.
        let mut waiting = Waiting { answers: Some(answers), commands: conn.commands.clone() };
        let first = waiting.answers.as_mut().expect("set above").next().await;
        match first {
            Some(Event::Head { id, status, headers, end }) => {
                let answers = waiting.answers.take().expect("set above");
                let mut response = http::Response::new(Body::new(ReplicaBody {
                    answers,
                    id,
                    commands: conn.commands.clone(),
                    unreleased: 0,
                    done: end,
                    addr: self.addr,
                }));
                *response.status_mut() = status;
                *response.headers_mut() = headers;
                Ok(response)
            }
            Some(Event::Failed(Failure { unsent: true, reason })) => {
                self.forget_if_closed(&conn);
                Err(EndpointError::Unsent { addr: self.addr, reason })
            }
            Some(Event::Failed(Failure { unsent: false, reason })) => {
                self.forget_if_closed(&conn);
                Err(EndpointError::Call { addr: self.addr, reason })
            }
            Some(_) => Err(EndpointError::Call {
                addr: self.addr,
                reason: "the replica answered without a response head".to_owned(),
            }),
            // The driver tells every request it took how it ended, and every
            // one still queued that it was never sent; going quiet means it
            // failed, maybe after sending this one.
            None => {
                self.forget(&conn);
                Err(EndpointError::Call {
                    addr: self.addr,
                    reason: "the connection ended without a word on this call".to_owned(),
                })
            }
        }
    }

    fn forget_if_closed(&self, conn: &Arc<Conn>) {
        if !conn.live() {
            self.forget(conn);
        }
    }
}

/// A call waiting for its answer's head. Dropped while it still waits, it
/// closes its channel and then asks the driver to reset the streams nobody
/// listens to (in that order: the driver must find this one closed).
struct Waiting {
    answers: Option<futures_channel::mpsc::UnboundedReceiver<Event>>,
    commands: mpsc::UnboundedSender<Command>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(mut answers) = self.answers.take() {
            answers.close();
            let _ = self.commands.send(Command::Sweep);
        }
    }
}

/// A response body as the driver delivers it. Dropped before its end, it has
/// the stream reset; read, it gives the replica more window when a stream's
/// worth of half a window has been consumed.
struct ReplicaBody {
    answers: futures_channel::mpsc::UnboundedReceiver<Event>,
    id: u32,
    commands: mpsc::UnboundedSender<Command>,
    unreleased: u32,
    done: bool,
    addr: SocketAddr,
}

/// Why a response body broke off.
#[derive(Debug, thiserror::Error)]
#[error("the answer from {addr} broke off: {reason}")]
pub struct BodyError {
    addr: SocketAddr,
    reason: String,
}

impl http_body::Body for ReplicaBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        loop {
            return Poll::Ready(match std::task::ready!(this.answers.poll_next_unpin(cx)) {
                Some(Event::Data(data)) => {
                    this.unreleased += data.len() as u32;
                    if this.unreleased >= conn::STREAM_WINDOW / 2 {
                        let _ = this.commands.send(Command::Release { id: this.id, n: this.unreleased });
                        this.unreleased = 0;
                    }
                    Some(Ok(Frame::data(data)))
                }
                Some(Event::Trailers(trailers)) => {
                    this.done = true;
                    Some(Ok(Frame::trailers(trailers)))
                }
                Some(Event::Failed(f)) => {
                    this.done = true;
                    Some(Err(BodyError { addr: this.addr, reason: f.reason }))
                }
                Some(Event::Head { .. }) => continue,
                None => {
                    this.done = true;
                    None
                }
            });
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

impl Drop for ReplicaBody {
    fn drop(&mut self) {
        if !self.done {
            // Closed first, so that the sweep finds this stream abandoned.
            self.answers.close();
            let _ = self.commands.send(Command::Sweep);
        }
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use flotilla_sdk::h2serve::{self, CallFuture, Handler};
    use h2::{RecvStream, server::SendResponse};
    use http_body_util::BodyExt as _;

    use super::*;

    /// Answers with the request body, in 1000-byte chunks, then trailers
    /// naming its length; a request to `/hang` gets no answer until the
    /// client resets it, which is counted.
    struct Mirror {
        resets: Arc<AtomicUsize>,
    }

    impl Handler for Mirror {
        fn handle(&self, request: http::Request<RecvStream>, mut respond: SendResponse<Bytes>) -> CallFuture {
            let resets = self.resets.clone();
            Box::pin(async move {
                if request.uri().path() == "/hang" {
                    let reset = std::future::poll_fn(|cx| respond.poll_reset(cx)).await;
                    if reset.is_ok() {
                        resets.fetch_add(1, Ordering::SeqCst);
                    }
                    return;
                }
                let mut body = request.into_body();
                let mut all = Vec::new();
                while let Some(chunk) = body.data().await {
                    let chunk = chunk.unwrap();
                    let _ = body.flow_control().release_capacity(chunk.len());
                    all.extend_from_slice(&chunk);
                }
                let response =
                    http::Response::builder().header("content-type", "application/grpc").body(()).unwrap();
                let mut send = respond.send_response(response, false).unwrap();
                for chunk in all.chunks(1000) {
                    send.reserve_capacity(chunk.len());
                    while send.capacity() < chunk.len() {
                        std::future::poll_fn(|cx| send.poll_capacity(cx)).await.unwrap().unwrap();
                    }
                    send.send_data(Bytes::copy_from_slice(chunk), false).unwrap();
                }
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", HeaderValue::from_static("0"));
                trailers.insert("x-length", HeaderValue::from_str(&all.len().to_string()).unwrap());
                send.send_trailers(trailers).unwrap();
            })
        }
    }

    async fn mirror() -> (SocketAddr, Arc<AtomicUsize>, tokio::sync::oneshot::Sender<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let resets = Arc::new(AtomicUsize::new(0));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let handler = Arc::new(Mirror { resets: resets.clone() });
        tokio::spawn(h2serve::serve(listener, None, handler, async move {
            let _ = stopped.await;
        }));
        (addr, resets, stop)
    }

    fn request(path: &str, body: Bytes) -> http::Request<Body> {
        let mut request = http::Request::new(Body::new(http_body_util::Full::new(body)));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = http::Uri::try_from(path).unwrap();
        request.headers_mut().insert("content-type", HeaderValue::from_static("application/grpc"));
        request
    }

    #[tokio::test]
    async fn bodies_larger_than_every_window_cross_both_ways_with_trailers() {
        let (addr, _, _stop) = mirror().await;
        let endpoint = H2Endpoint::new(addr, Duration::from_secs(5));
        // 3 MiB: beyond the replica's stream window (1 MiB) and a frame (16 KiB).
        let body: Bytes = (0..3 << 20).map(|i: u32| (i % 251) as u8).collect::<Vec<u8>>().into();
        for _ in 0..3 {
            let response = endpoint.send(request("/mirror", body.clone())).await.unwrap();
            assert_eq!(response.status(), http::StatusCode::OK);
            assert_eq!(response.headers()["content-type"], "application/grpc");
            let collected = response.into_body().collect().await.unwrap();
            let trailers = collected.trailers().cloned().expect("trailers");
            assert_eq!(trailers["grpc-status"], "0");
            assert_eq!(trailers["x-length"], (3 << 20).to_string().as_str());
            assert!(collected.to_bytes() == body, "the answer is the request, byte for byte");
        }
    }

    #[tokio::test]
    async fn a_call_dropped_before_its_answer_resets_its_stream() {
        let (addr, resets, _stop) = mirror().await;
        let endpoint = H2Endpoint::new(addr, Duration::from_secs(5));
        let call = endpoint.send(request("/hang", Bytes::from_static(b"x")));
        assert!(tokio::time::timeout(Duration::from_millis(200), call).await.is_err(), "no answer comes");
        // The connection goes on serving, and the replica saw the reset.
        let response = endpoint.send(request("/mirror", Bytes::from_static(b"again"))).await.unwrap();
        let answer = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&answer[..], b"again");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while resets.load(Ordering::SeqCst) == 0 {
            assert!(tokio::time::Instant::now() < deadline, "the replica never saw the stream reset");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A replica that reads until the client's first request (stream 1) is
    /// in, answers with `frames` (after an empty SETTINGS), then reads until
    /// the client closes. What it read after the request comes back.
    async fn scripted(frames: Vec<u8>) -> (SocketAddr, tokio::task::JoinHandle<Vec<u8>>) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let replica = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            let mut buf = vec![0u8; 64 << 10];
            // The preface, then frames until stream 1's HEADERS.
            let at = loop {
                let n = socket.read(&mut buf).await.unwrap();
                assert!(n > 0, "the client closed before its request");
                seen.extend_from_slice(&buf[..n]);
                let frames = frames_in(&seen[24.min(seen.len())..]);
                if let Some(k) = frames.iter().position(|(kind, _, id, _)| *kind == 0x1 && *id == 1) {
                    break 24 + frames[..=k].iter().map(|f| 9 + f.3.len()).sum::<usize>();
                }
            };
            socket.write_all(&frame(0x4, 0, 0, &[])).await.unwrap();
            socket.write_all(&frames).await.unwrap();
            let mut after = seen.split_off(at);
            while let Ok(n) = socket.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                after.extend_from_slice(&buf[..n]);
            }
            after
        });
        (addr, replica)
    }

    fn frame(kind: u8, flags: u8, id: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut v = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        v.extend_from_slice(&id.to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    /// The frames in `bytes` as (type, flags, stream id, payload).
    fn frames_in(bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut at = 0;
        while bytes.len() >= at + 9 {
            let len =
                usize::from(bytes[at]) << 16 | usize::from(bytes[at + 1]) << 8 | usize::from(bytes[at + 2]);
            let id = u32::from_be_bytes([bytes[at + 5], bytes[at + 6], bytes[at + 7], bytes[at + 8]]);
            let Some(payload) = bytes.get(at + 9..at + 9 + len) else { break };
            out.push((bytes[at + 3], bytes[at + 4], id, payload.to_vec()));
            at += 9 + len;
        }
        out
    }

    #[tokio::test]
    async fn header_floods_fail_the_call_without_a_panic_and_not_as_unsent() {
        // A small block that decodes to a long list: one 4000-byte field
        // entered in the table, then twenty one-byte references to it.
        let mut block = vec![0x88, 0x40, 5];
        block.extend_from_slice(b"x-big");
        // 4000 as a 7-bit-prefix integer: 127, then 3873 = 33 + 30 × 128.
        block.extend_from_slice(&[0x7f, 0x80 | 33, 30]);
        block.extend(std::iter::repeat_n(b'v', 4000));
        block.extend([0xbe; 20]);
        let (addr, _replica) = scripted(frame(0x1, 0x5, 1, &block)).await;
        let endpoint = H2Endpoint::new(addr, Duration::from_secs(5));
        let error = endpoint.send(request("/create", Bytes::from_static(b"x"))).await.unwrap_err();
        assert!(!error.never_sent() && error.to_string().contains("header list exceeds"), "{error}");

        // 25,000 distinct names (a HeaderMap panics past 24,576 on a plain
        // append), in a block over the size limit: the connection ends.
        let mut block = vec![0x88]; // :status 200
        for i in 0..25_000u32 {
            block.extend_from_slice(&[0x00, 5, b'x']);
            block.extend_from_slice(format!("{i:04x}").as_bytes());
            block.push(0);
        }
        let mut frames = Vec::new();
        let mut chunks = block.chunks(16_384).peekable();
        frames.extend(frame(0x1, 0, 1, chunks.next().unwrap()));
        while let Some(chunk) = chunks.next() {
            frames.extend(frame(0x9, if chunks.peek().is_none() { 0x4 } else { 0 }, 1, chunk));
        }
        let (addr, _replica) = scripted(frames).await;
        let endpoint = H2Endpoint::new(addr, Duration::from_secs(5));
        let error = endpoint.send(request("/create", Bytes::from_static(b"x"))).await.unwrap_err();
        assert!(!error.never_sent() && error.to_string().contains("too large"), "{error}");
    }

    #[tokio::test]
    async fn stream_errors_from_the_replica_fail_the_call_as_sent() {
        // A WINDOW_UPDATE that overflows the stream's window.
        let (addr, _replica) = scripted(frame(0x8, 0, 1, &0x7fff_ffffu32.to_be_bytes())).await;
        let endpoint = H2Endpoint::new(addr, Duration::from_secs(5));
        let error = endpoint.send(request("/create", Bytes::from_static(b"x"))).await.unwrap_err();
        assert!(!error.never_sent() && error.to_string().contains("window"), "{error}");

        // DATA before the response's headers.
        let (addr, _replica) = scripted(frame(0x0, 0x1, 1, b"early")).await;
        let endpoint = H2Endpoint::new(addr, Duration::from_secs(5));
        let error = endpoint.send(request("/create", Bytes::from_static(b"x"))).await.unwrap_err();
        assert!(!error.never_sent() && error.to_string().contains("before the response headers"), "{error}");

        // Trailers that do not end the stream: the body fails.
        let mut frames = frame(0x1, 0x4, 1, &[0x88]);
        frames.extend(frame(
            0x1,
            0x4,
            1,
            &[0x00, 11, b'g', b'r', b'p', b'c', b'-', b's', b't', b'a', b't', b'u', b's', 1, b'0'],
        ));
        let (addr, _replica) = scripted(frames).await;
        let endpoint = H2Endpoint::new(addr, Duration::from_secs(5));
        let response = endpoint.send(request("/create", Bytes::from_static(b"x"))).await.unwrap();
        let error = response.into_body().collect().await.unwrap_err();
        assert!(error.to_string().contains("do not end the stream"), "{error}");
    }

    #[tokio::test]
    async fn padding_is_given_back_to_the_stream_window_at_once() {
        let mut frames = frame(0x1, 0x4, 1, &[0x88]);
        // 8 bytes of data in 1-byte frames, each with 255 bytes of padding.
        let mut padded = vec![255, b'd'];
        padded.extend([0u8; 255]);
        for _ in 0..8 {
            frames.extend(frame(0x0, 0x8, 1, &padded));
        }
        frames.extend(frame(0x0, 0x1, 1, b""));
        let (addr, replica) = scripted(frames).await;
        let endpoint = H2Endpoint::new(addr, Duration::from_secs(5));
        let response = endpoint.send(request("/stream", Bytes::new())).await.unwrap();
        let data = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&data[..], b"dddddddd");
        drop(endpoint); // the connection closes, and the replica returns what it read
        let after = tokio::time::timeout(Duration::from_secs(5), replica).await.unwrap().unwrap();
        let given_back: u32 = frames_in(&after)
            .iter()
            .filter(|(kind, _, id, _)| *kind == 0x8 && *id == 1)
            .map(|(_, _, _, p)| u32::from_be_bytes([p[0], p[1], p[2], p[3]]))
            .sum();
        assert_eq!(given_back, 8 * 256, "each frame's padding (and its length byte) comes back");
    }

    #[tokio::test]
    async fn a_call_waiting_for_a_stream_the_replica_never_allows_fails_as_unsent() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (limited, limit_known) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            let mut buf = vec![0u8; 64 << 10];
            let mut limited = Some(limited);
            let mut sent_limit = false;
            loop {
                let n = socket.read(&mut buf).await.unwrap();
                if n == 0 {
                    return;
                }
                seen.extend_from_slice(&buf[..n]);
                let frames = frames_in(&seen[24.min(seen.len())..]);
                if !sent_limit && frames.iter().any(|(kind, _, id, _)| *kind == 0x1 && *id == 1) {
                    // Stream 1 is open (and never answered); from now on, no stream at all.
                    socket.write_all(&frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 0])).await.unwrap();
                    sent_limit = true;
                }
                if sent_limit && frames.iter().any(|(kind, flags, _, _)| *kind == 0x4 && *flags == 0x1) {
                    // The client acknowledged the limit.
                    if let Some(tell) = limited.take() {
                        let _ = tell.send(());
                    }
                }
            }
        });
        let endpoint = H2Endpoint::new(addr, Duration::from_millis(300));
        let first = endpoint.clone();
        let _hanging = tokio::spawn(async move { first.send(request("/hang", Bytes::new())).await });
        tokio::time::timeout(Duration::from_secs(5), limit_known).await.unwrap().unwrap();
        let error =
            tokio::time::timeout(Duration::from_secs(5), endpoint.send(request("/create", Bytes::new())))
                .await
                .expect("the waiting call gives up")
                .unwrap_err();
        assert!(error.never_sent() && error.to_string().contains("allowed no new stream"), "{error}");
    }

    #[tokio::test]
    async fn a_connection_specific_response_header_fails_the_call() {
        // :status 200, then "connection: close" as a literal.
        let mut block = vec![0x88, 0x00, 10];
        block.extend_from_slice(b"connection");
        block.push(5);
        block.extend_from_slice(b"close");
        let (addr, _replica) = scripted(frame(0x1, 0x5, 1, &block)).await;
        let endpoint = H2Endpoint::new(addr, Duration::from_secs(5));
        let error = endpoint.send(request("/create", Bytes::from_static(b"x"))).await.unwrap_err();
        assert!(!error.never_sent() && error.to_string().contains("connection-specific"), "{error}");
    }

    #[tokio::test]
    async fn a_call_the_replica_read_is_not_unsent_when_the_connection_breaks() {
        use tokio::io::AsyncReadExt as _;
        // B, then A (the one that matters), then C, on one connection. B and C
        // carry 16 MiB of headers, so the socket is still taking C's bytes when
        // the replica, having read all of A, closes the connection.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let replica = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut seen: Vec<u8> = Vec::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = socket.read(&mut buf).await.unwrap();
                assert!(n > 0, "the client closed first");
                seen.extend_from_slice(&buf[..n]);
                // A's path, then its header block's end and its 10-byte DATA frame.
                if let Some(at) = seen.windows(7).position(|w| w == b"/create")
                    && seen.len() > at + 64
                {
                    return; // dropped with bytes unread: the client's writes fail
                }
                let keep = seen.len().saturating_sub(8);
                seen.drain(..keep);
            }
        });
        let endpoint = H2Endpoint::new(addr, Duration::from_secs(5));
        let big = "v".repeat(16 << 20);
        let with_big = |path: &str| {
            let mut r = request(path, Bytes::new());
            r.headers_mut().insert("x-big", HeaderValue::from_str(&big).unwrap());
            r
        };
        // Polled in this order, the three queue in this order (the first
        // connects; the others wait for it in line).
        let (b, a, c) = tokio::join!(
            endpoint.send(with_big("/bigB")),
            endpoint.send(request("/create", Bytes::from_static(b"x"))),
            endpoint.send(with_big("/bigC")),
        );
        replica.await.unwrap();
        let a = a.unwrap_err();
        assert!(!a.never_sent(), "the replica read all of A: {a}");
        assert!(b.is_err() && c.is_err());
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error_that_never_sent() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let endpoint = H2Endpoint::new(addr, Duration::from_secs(5));
        let error = endpoint.send(request("/mirror", Bytes::new())).await.unwrap_err();
        assert!(error.refused() && error.never_sent(), "{error}");
    }
}
