//! The client side of one HTTP/2 connection to a replica (RFC 9113), driven by
//! one task that owns the socket and every stream's state: callers hand it
//! requests over a channel and get their stream's events back on a channel of
//! their own, so nothing on the path is shared or locked.
//!
//! Only what a gRPC client needs is here. Requests go out as one HEADERS block
//! (HPACK without Huffman coding, with a dynamic table that only grows: see
//! [`Encoder`]) and one buffered body, cut into DATA frames as the peer's
//! flow-control windows allow. Responses are read with a full HPACK decoder (the peer may
//! use its dynamic table and Huffman coding freely). Server push is refused in
//! the first SETTINGS; priorities are ignored.

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use futures_channel::mpsc as events;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use tokio::{io::AsyncWrite as _, net::TcpStream, sync::mpsc};

/// The connection preface every client sends first.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Flow-control windows offered to the replica: a stream's, and the whole connection's.
pub(super) const STREAM_WINDOW: u32 = 1 << 20;
const CONNECTION_WINDOW: u32 = 4 << 20;
/// The largest frame payload we accept (the protocol's default; we never raise it).
const MAX_FRAME: usize = 16_384;
/// The decoder's table limit (the protocol's default `SETTINGS_HEADER_TABLE_SIZE`).
const HEADER_TABLE: usize = 4096;
/// The largest decoded response header list we take (names, values and 32
/// bytes per field, as `SETTINGS_MAX_HEADER_LIST_SIZE` counts), announced to the peer.
const MAX_HEADER_LIST: usize = 64 << 10;
/// The largest response header block we collect (HEADERS plus CONTINUATIONs).
/// An honest block is smaller than the list it decodes to; this also bounds
/// the decoding work a replica can demand with one block.
const MAX_HEADER_BLOCK: usize = MAX_HEADER_LIST;
/// Past this many queued outgoing bytes the driver stops reading until the
/// peer takes some: a peer that sends PINGs or SETTINGS and never reads
/// cannot grow the queue of our answers without bound.
const MAX_QUEUED_WRITE: usize = 4 << 20;
/// DATA payloads up to this size are copied out of the read buffer, so a
/// response held by a slow reader does not keep a whole read buffer alive.
const COPY_BELOW: usize = 4096;
/// Socket reads per wakeup before the driver lets other tasks run.
const READS_PER_POLL: usize = 16;
/// Bytes read at a time.
const READ_CHUNK: usize = 64 << 10;

// Frame types.
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PUSH_PROMISE: u8 = 0x5;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;

// Flags.
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

// Error codes.
const PROTOCOL_ERROR: u32 = 0x1;
const FLOW_CONTROL_ERROR: u32 = 0x3;
const FRAME_SIZE_ERROR: u32 = 0x6;
const REFUSED_STREAM: u32 = 0x7;
const CANCEL: u32 = 0x8;
const COMPRESSION_ERROR: u32 = 0x9;

/// The name of an HTTP/2 error code, for messages.
fn code_name(code: u32) -> &'static str {
    match code {
        0x0 => "NO_ERROR",
        0x1 => "PROTOCOL_ERROR",
        0x2 => "INTERNAL_ERROR",
        0x3 => "FLOW_CONTROL_ERROR",
        0x4 => "SETTINGS_TIMEOUT",
        0x5 => "STREAM_CLOSED",
        0x6 => "FRAME_SIZE_ERROR",
        0x7 => "REFUSED_STREAM",
        0x8 => "CANCEL",
        0x9 => "COMPRESSION_ERROR",
        0xa => "CONNECT_ERROR",
        0xb => "ENHANCE_YOUR_CALM",
        0xc => "INADEQUATE_SECURITY",
        0xd => "HTTP_1_1_REQUIRED",
        _ => "an unknown error code",
    }
}

/// What a caller asks of the connection.
pub(super) enum Command {
    /// Open a stream: send the request, report on `events`.
    Open(Box<Open>),
    /// The caller read `n` more bytes of stream `id`'s response: the replica may send as much again.
    Release { id: u32, n: u32 },
    /// A caller went away: reset the streams nobody listens to any more.
    Sweep,
}

/// One request.
pub(super) struct Open {
    pub method: http::Method,
    pub path: http::uri::PathAndQuery,
    pub authority: HeaderValue,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub events: events::UnboundedSender<Event>,
}

/// What happens on a stream, in order: `Head`, any `Data`, then `Trailers` or
/// the end of the channel; or `Failed` at any point.
#[derive(Debug)]
pub(super) enum Event {
    Head { id: u32, status: StatusCode, headers: HeaderMap, end: bool },
    Data(Bytes),
    Trailers(HeaderMap),
    Failed(Failure),
}

/// Why a stream failed.
#[derive(Debug)]
pub(super) struct Failure {
    /// No byte of the request can have reached the replica.
    pub unsent: bool,
    pub reason: String,
}

/// A connection ended for good, with what to tell its streams.
struct Ended {
    reason: String,
}

/// One open stream.
struct Stream {
    events: events::UnboundedSender<Event>,
    /// The request body still to send, and how much the peer lets us send.
    pending: Bytes,
    send_window: i64,
    /// Whether the request's END_STREAM has been queued.
    sent_end: bool,
    /// Whether the response head has come (later HEADERS are trailers).
    got_head: bool,
    /// Where its HEADERS frame starts in the connection's outgoing bytes: the
    /// request cannot have reached the peer while fewer bytes were written.
    head_at: u64,
    /// How much more the peer may send on it before we give window back.
    recv_window: i64,
}

/// The peer's settings that the client obeys.
struct PeerSettings {
    max_frame: usize,
    initial_window: i64,
    max_streams: usize,
}

/// A header block being collected across CONTINUATION frames.
struct PartialHeaders {
    id: u32,
    end_stream: bool,
    block: BytesMut,
}

/// The task that owns one connection.
pub(super) struct Driver {
    io: TcpStream,
    commands: mpsc::UnboundedReceiver<Command>,
    /// No caller holds the connection any more: end when its streams have.
    orphaned: bool,
    rbuf: BytesMut,
    wbuf: BytesMut,
    decoder: loona_hpack::Decoder<'static>,
    streams: HashMap<u32, Stream>,
    /// Requests waiting for the peer's stream limit, with when they give up.
    waiting: VecDeque<(tokio::time::Instant, Box<Open>)>,
    /// How long a request may wait for the peer's stream limit, and the timer for the oldest.
    queue_timeout: Duration,
    queue_timer: Pin<Box<tokio::time::Sleep>>,
    /// Streams with body left to send, in the order they became blocked.
    blocked: VecDeque<u32>,
    next_id: u32,
    /// Bytes the socket has taken so far.
    written: u64,
    conn_send_window: i64,
    /// How much more the peer may send on the connection, and what we have
    /// received but not yet given back.
    conn_recv_window: i64,
    conn_recv_unacked: u32,
    peer: PeerSettings,
    partial: Option<PartialHeaders>,
    /// The last stream the peer said it will process, once it sent GOAWAY.
    going_away: Option<u32>,
    /// Set when no new stream should be opened here (read by the endpoint).
    closed: Arc<AtomicBool>,
    keepalive: Keepalive,
    fields: FieldCache,
    encoder: Encoder,
    /// A caller went away since the last sweep.
    sweep: bool,
}

/// The response header fields seen recently, as `http` types: a replica
/// answers with the same few fields every time (`content-type`,
/// `grpc-status: 0`), and taking them from here saves parsing and copying
/// each name and value into new buffers on every answer.
#[derive(Default)]
struct FieldCache {
    entries: Vec<(HeaderName, HeaderValue)>,
}

impl FieldCache {
    /// Fields cached at most; a value longer than `MAX_VALUE` is never cached.
    const MAX_ENTRIES: usize = 32;
    const MAX_VALUE: usize = 64;

    /// The field as `http` types (`None`: not a valid header field).
    fn get(&mut self, name: &[u8], value: &[u8]) -> Option<(HeaderName, HeaderValue)> {
        if let Some((n, v)) =
            self.entries.iter().find(|(n, v)| n.as_str().as_bytes() == name && v.as_bytes() == value)
        {
            return Some((n.clone(), v.clone()));
        }
        let field = (HeaderName::from_bytes(name).ok()?, HeaderValue::from_bytes(value).ok()?);
        if value.len() <= Self::MAX_VALUE && self.entries.len() < Self::MAX_ENTRIES {
            self.entries.push(field.clone());
        }
        Some(field)
    }
}

/// Pings the peer every `interval`; a ping unanswered for `timeout` ends the connection.
pub(super) struct Keepalive {
    interval: Duration,
    timeout: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    awaiting: bool,
    /// The payload of the last ping sent (a counter, so an old or forged ACK does not count).
    sent: u64,
}

impl Keepalive {
    pub(super) fn new(interval: Duration, timeout: Duration) -> Self {
        Self { interval, timeout, timer: Box::pin(tokio::time::sleep(interval)), awaiting: false, sent: 0 }
    }
}

impl Driver {
    /// Writes the preface and settings; the driver then runs as a future of its own.
    pub(super) fn new(
        io: TcpStream,
        commands: mpsc::UnboundedReceiver<Command>,
        closed: Arc<AtomicBool>,
        keepalive: Keepalive,
        queue_timeout: Duration,
    ) -> Self {
        let mut wbuf = BytesMut::with_capacity(16 << 10);
        wbuf.put_slice(PREFACE);
        // ENABLE_PUSH = 0, INITIAL_WINDOW_SIZE = STREAM_WINDOW, MAX_HEADER_LIST_SIZE.
        frame_head(&mut wbuf, 18, SETTINGS, 0, 0);
        wbuf.put_u16(0x2);
        wbuf.put_u32(0);
        wbuf.put_u16(0x4);
        wbuf.put_u32(STREAM_WINDOW);
        wbuf.put_u16(0x6);
        wbuf.put_u32(MAX_HEADER_LIST as u32);
        window_update(&mut wbuf, 0, CONNECTION_WINDOW - 65_535);
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE);
        Self {
            io,
            commands,
            orphaned: false,
            rbuf: BytesMut::new(),
            wbuf,
            decoder,
            streams: HashMap::new(),
            waiting: VecDeque::new(),
            queue_timeout,
            queue_timer: Box::pin(tokio::time::sleep(queue_timeout)),
            blocked: VecDeque::new(),
            next_id: 1,
            written: 0,
            conn_send_window: 65_535,
            conn_recv_window: i64::from(CONNECTION_WINDOW),
            conn_recv_unacked: 0,
            peer: PeerSettings { max_frame: MAX_FRAME, initial_window: 65_535, max_streams: usize::MAX },
            partial: None,
            going_away: None,
            closed,
            keepalive,
            fields: FieldCache::default(),
            encoder: Encoder::new(),
            sweep: false,
        }
    }

    fn poll_drive(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Ended>> {
        if !self.orphaned {
            loop {
                match self.commands.poll_recv(cx) {
                    Poll::Ready(Some(c)) => self.command(c),
                    Poll::Ready(None) => {
                        self.orphaned = true;
                        break;
                    }
                    Poll::Pending => break,
                }
            }
        }
        if self.sweep {
            self.sweep();
        }
        self.open_waiting();
        self.send_blocked();
        // While the peer is not taking our bytes, its frames wait in the socket.
        let again = if self.wbuf.len() < MAX_QUEUED_WRITE {
            match self.read(cx) {
                Ok(more) => more,
                Err(e) => return Poll::Ready(Err(e)),
            }
        } else {
            false
        };
        self.open_waiting();
        self.send_blocked();
        if let Err(e) = self.write(cx) {
            return Poll::Ready(Err(e));
        }
        if let Poll::Ready(r) = self.poll_keepalive(cx) {
            return Poll::Ready(r);
        }
        self.poll_queue_timeout(cx);
        let idle = self.streams.is_empty() && self.waiting.is_empty() && self.wbuf.is_empty();
        if idle && (self.orphaned || self.going_away.is_some()) {
            return Poll::Ready(Ok(()));
        }
        if again {
            // A full budget was read: let other tasks run before reading more.
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Open(open) => {
                if self.closed.load(Ordering::Acquire) || self.going_away.is_some() {
                    fail(&open.events, true, "the connection was closing".to_owned());
                } else {
                    let give_up = tokio::time::Instant::now() + self.queue_timeout;
                    self.waiting.push_back((give_up, open));
                }
            }
            Command::Release { id, n } => {
                if let Some(stream) = self.streams.get_mut(&id) {
                    stream.recv_window += i64::from(n);
                    window_update(&mut self.wbuf, id, n);
                }
            }
            // One pass after the commands at hand, however many callers left.
            Command::Sweep => self.sweep = true,
        }
    }

    /// Resets the streams whose callers went away, and forgets their waiting requests.
    fn sweep(&mut self) {
        self.sweep = false;
        let gone: Vec<u32> =
            self.streams.iter().filter(|(_, s)| s.events.is_closed()).map(|(id, _)| *id).collect();
        for id in gone {
            self.reset(id, CANCEL, "the caller went away".into());
        }
        self.waiting.retain(|(_, o)| !o.events.is_closed());
    }

    /// Opens the waiting requests the peer's stream limit allows.
    fn open_waiting(&mut self) {
        while self.streams.len() < self.peer.max_streams
            && let Some((_, open)) = self.waiting.pop_front()
        {
            if open.events.is_closed() {
                continue;
            }
            if self.next_id > i32::MAX as u32 {
                // Stream ids ran out: this connection takes no more.
                self.closed.store(true, Ordering::Release);
                fail(&open.events, true, "the connection ran out of stream ids".to_owned());
                continue;
            }
            let id = self.next_id;
            self.next_id += 2;
            let end = open.body.is_empty();
            // The block is encoded in place, after room for its frame's head.
            let start = self.wbuf.len();
            let head_at = self.written + start as u64;
            self.wbuf.put_bytes(0, 9);
            self.encoder.request(&open, &mut self.wbuf);
            let len = self.wbuf.len() - start - 9;
            if len <= self.peer.max_frame {
                let flags = END_HEADERS | if end { END_STREAM } else { 0 };
                let mut head = [0u8; 9];
                frame_head(&mut &mut head[..], len, HEADERS, flags, id);
                self.wbuf[start..start + 9].copy_from_slice(&head);
            } else {
                let block = self.wbuf.split_off(start + 9);
                self.wbuf.truncate(start);
                self.headers(id, &block, end);
            }
            self.streams.insert(
                id,
                Stream {
                    events: open.events,
                    pending: open.body,
                    send_window: self.peer.initial_window,
                    sent_end: end,
                    got_head: false,
                    head_at,
                    recv_window: i64::from(STREAM_WINDOW),
                },
            );
            if !end {
                self.blocked.push_back(id);
            }
        }
    }

    /// Queues a HEADERS frame (and CONTINUATIONs, for a block above the peer's frame size).
    fn headers(&mut self, id: u32, block: &[u8], end_stream: bool) {
        let max = self.peer.max_frame;
        let (first, mut rest) = block.split_at(block.len().min(max));
        let flags = if end_stream { END_STREAM } else { 0 } | if rest.is_empty() { END_HEADERS } else { 0 };
        frame_head(&mut self.wbuf, first.len(), HEADERS, flags, id);
        self.wbuf.put_slice(first);
        while !rest.is_empty() {
            let (chunk, after) = rest.split_at(rest.len().min(max));
            let flags = if after.is_empty() { END_HEADERS } else { 0 };
            frame_head(&mut self.wbuf, chunk.len(), CONTINUATION, flags, id);
            self.wbuf.put_slice(chunk);
            rest = after;
        }
    }

    /// Sends what the windows allow of each blocked stream's body.
    fn send_blocked(&mut self) {
        let mut still = VecDeque::new();
        while let Some(id) = self.blocked.pop_front() {
            let Some(stream) = self.streams.get_mut(&id) else { continue };
            while !stream.pending.is_empty() && self.conn_send_window > 0 && stream.send_window > 0 {
                let n = (stream.pending.len() as i64)
                    .min(self.conn_send_window)
                    .min(stream.send_window)
                    .min(self.peer.max_frame as i64) as usize;
                let chunk = stream.pending.split_to(n);
                let end = stream.pending.is_empty();
                frame_head(&mut self.wbuf, n, DATA, if end { END_STREAM } else { 0 }, id);
                self.wbuf.put_slice(&chunk);
                self.conn_send_window -= n as i64;
                stream.send_window -= n as i64;
                stream.sent_end = end;
            }
            if !stream.pending.is_empty() {
                still.push_back(id);
            }
        }
        self.blocked = still;
    }

    /// Reads and handles what the socket has (the waker is registered for
    /// more). `Ok(true)`: the read budget ran out with more to read.
    fn read(&mut self, cx: &mut Context<'_>) -> Result<bool, Ended> {
        for _ in 0..READS_PER_POLL {
            self.rbuf.reserve(READ_CHUNK);
            // tokio's own read: a read shorter than the room given marks the
            // socket drained, so no second read is spent to learn it.
            match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.rbuf) {
                Poll::Ready(Ok(0)) => {
                    return Err(Ended { reason: "the replica closed the connection".into() });
                }
                Poll::Ready(Ok(_)) => self.frames()?,
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Poll::Ready(Err(e)) => return Err(io_ended(&e)),
                Poll::Pending => return Ok(false),
            }
        }
        Ok(true)
    }

    /// Writes what is queued until the socket takes no more.
    fn write(&mut self, cx: &mut Context<'_>) -> Result<(), Ended> {
        while !self.wbuf.is_empty() {
            match Pin::new(&mut self.io).poll_write(cx, &self.wbuf) {
                Poll::Ready(Ok(0)) => {
                    return Err(Ended { reason: "the connection took no more bytes".into() });
                }
                Poll::Ready(Ok(n)) => {
                    self.written += n as u64;
                    self.wbuf.advance(n);
                }
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Poll::Ready(Err(e)) => return Err(io_ended(&e)),
                Poll::Pending => return Ok(()),
            }
        }
        Ok(())
    }

    fn poll_keepalive(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Ended>> {
        while self.keepalive.timer.as_mut().poll(cx).is_ready() {
            if self.keepalive.awaiting {
                return Poll::Ready(Err(Ended {
                    reason: format!("the replica did not answer a ping within {:?}", self.keepalive.timeout),
                }));
            }
            self.keepalive.sent = self.keepalive.sent.wrapping_add(1);
            frame_head(&mut self.wbuf, 8, PING, 0, 0);
            self.wbuf.put_u64(self.keepalive.sent);
            self.keepalive.awaiting = true;
            let next = tokio::time::Instant::now() + self.keepalive.timeout;
            self.keepalive.timer.as_mut().reset(next);
            // The ping is queued after this poll's write: write again.
            if let Err(e) = self.write(cx) {
                return Poll::Ready(Err(e));
            }
        }
        Poll::Pending
    }

    /// Fails the requests that waited longer than `queue_timeout` for the
    /// peer's stream limit (never encoded: safe to send elsewhere), and sets the
    /// timer for the oldest one left.
    fn poll_queue_timeout(&mut self, cx: &mut Context<'_>) {
        loop {
            let Some((give_up, _)) = self.waiting.front() else { return };
            if *give_up > tokio::time::Instant::now() {
                let give_up = *give_up;
                if self.queue_timer.deadline() != give_up {
                    self.queue_timer.as_mut().reset(give_up);
                }
                if self.queue_timer.as_mut().poll(cx).is_pending() {
                    return;
                }
                continue;
            }
            let (_, open) = self.waiting.pop_front().expect("front exists");
            let limit = self.peer.max_streams;
            fail(
                &open.events,
                true,
                format!(
                    "the replica allowed no new stream within {:?} (its limit: {limit})",
                    self.queue_timeout
                ),
            );
        }
    }

    /// Handles every whole frame in the read buffer.
    fn frames(&mut self) -> Result<(), Ended> {
        while self.rbuf.len() >= 9 {
            let len = (usize::from(self.rbuf[0]) << 16)
                | (usize::from(self.rbuf[1]) << 8)
                | usize::from(self.rbuf[2]);
            if len > MAX_FRAME {
                return Err(self
                    .protocol(FRAME_SIZE_ERROR, format!("a {len}-byte frame exceeds the 16384-byte limit")));
            }
            if self.rbuf.len() < 9 + len {
                break;
            }
            let kind = self.rbuf[3];
            let flags = self.rbuf[4];
            let id =
                u32::from_be_bytes([self.rbuf[5], self.rbuf[6], self.rbuf[7], self.rbuf[8]]) & 0x7fff_ffff;
            let mut frame = self.rbuf.split_to(9 + len);
            frame.advance(9);
            self.frame(kind, flags, id, frame)?;
        }
        Ok(())
    }

    fn frame(&mut self, kind: u8, flags: u8, id: u32, mut payload: BytesMut) -> Result<(), Ended> {
        if let Some(partial) = &self.partial
            && (kind != CONTINUATION || id != partial.id)
        {
            return Err(
                self.protocol(PROTOCOL_ERROR, "a header block was interrupted by another frame".into())
            );
        }
        match kind {
            DATA => {
                if id == 0 {
                    return Err(self.protocol(PROTOCOL_ERROR, "DATA on stream 0".into()));
                }
                // The whole payload, padding included, counts against both windows.
                let size = payload.len() as u32;
                self.conn_recv_window -= i64::from(size);
                if self.conn_recv_window < 0 {
                    return Err(
                        self.protocol(FLOW_CONTROL_ERROR, "the replica overran the connection window".into())
                    );
                }
                // The connection's window is given back as data arrives (each
                // stream's own window bounds what waits for a slow reader).
                self.conn_recv_unacked += size;
                if self.conn_recv_unacked >= CONNECTION_WINDOW / 2 {
                    window_update(&mut self.wbuf, 0, self.conn_recv_unacked);
                    self.conn_recv_window += i64::from(self.conn_recv_unacked);
                    self.conn_recv_unacked = 0;
                }
                let data = self.unpad(flags, &mut payload)?;
                let padding = size - data.len() as u32;
                let Some(stream) = self.streams.get_mut(&id) else { return Ok(()) };
                if !stream.got_head {
                    self.reset(
                        id,
                        PROTOCOL_ERROR,
                        "the replica sent DATA before the response headers".into(),
                    );
                    return Ok(());
                }
                stream.recv_window -= i64::from(size);
                if stream.recv_window < 0 {
                    self.reset(id, FLOW_CONTROL_ERROR, "the replica overran the stream window".into());
                    return Ok(());
                }
                if padding > 0 && flags & END_STREAM == 0 {
                    // Nobody reads padding: it is given back at once.
                    stream.recv_window += i64::from(padding);
                    window_update(&mut self.wbuf, id, padding);
                }
                if !data.is_empty() {
                    let data =
                        if data.len() <= COPY_BELOW { Bytes::copy_from_slice(&data) } else { data.freeze() };
                    if stream.events.unbounded_send(Event::Data(data)).is_err() {
                        self.reset(id, CANCEL, "the caller went away".into());
                        return Ok(());
                    }
                }
                if flags & END_STREAM != 0 {
                    self.received_end(id);
                }
            }
            HEADERS => {
                if id == 0 {
                    return Err(self.protocol(PROTOCOL_ERROR, "HEADERS on stream 0".into()));
                }
                let mut block = self.unpad(flags, &mut payload)?;
                if flags & PRIORITY != 0 {
                    if block.len() < 5 {
                        return Err(
                            self.protocol(FRAME_SIZE_ERROR, "a HEADERS priority field is cut short".into())
                        );
                    }
                    block.advance(5);
                }
                let end_stream = flags & END_STREAM != 0;
                if flags & END_HEADERS != 0 {
                    self.header_block(id, &block, end_stream)?;
                } else {
                    self.partial = Some(PartialHeaders { id, end_stream, block });
                }
            }
            CONTINUATION => {
                let Some(mut partial) = self.partial.take() else {
                    return Err(self.protocol(PROTOCOL_ERROR, "CONTINUATION without HEADERS".into()));
                };
                if partial.block.len() + payload.len() > MAX_HEADER_BLOCK {
                    return Err(self.protocol(PROTOCOL_ERROR, "a response header block is too large".into()));
                }
                partial.block.extend_from_slice(&payload);
                if flags & END_HEADERS != 0 {
                    self.header_block(partial.id, &partial.block, partial.end_stream)?;
                } else {
                    self.partial = Some(partial);
                }
            }
            RST_STREAM => {
                if payload.len() != 4 || id == 0 {
                    return Err(self.protocol(FRAME_SIZE_ERROR, "a malformed RST_STREAM".into()));
                }
                let code = payload.get_u32();
                if let Some(stream) = self.streams.remove(&id) {
                    let unsent = code == REFUSED_STREAM;
                    fail(
                        &stream.events,
                        unsent,
                        format!("the replica reset the stream ({})", code_name(code)),
                    );
                }
            }
            SETTINGS => {
                if id != 0 || !payload.len().is_multiple_of(6) {
                    return Err(self.protocol(FRAME_SIZE_ERROR, "a malformed SETTINGS frame".into()));
                }
                if flags & ACK == 0 {
                    self.settings(&payload)?;
                    frame_head(&mut self.wbuf, 0, SETTINGS, ACK, 0);
                }
            }
            PUSH_PROMISE => {
                return Err(self.protocol(PROTOCOL_ERROR, "PUSH_PROMISE although push is disabled".into()));
            }
            PING => {
                if payload.len() != 8 || id != 0 {
                    return Err(self.protocol(FRAME_SIZE_ERROR, "a malformed PING".into()));
                }
                if flags & ACK == 0 {
                    frame_head(&mut self.wbuf, 8, PING, ACK, 0);
                    self.wbuf.put_slice(&payload);
                } else if self.keepalive.awaiting && payload[..] == self.keepalive.sent.to_be_bytes() {
                    self.keepalive.awaiting = false;
                    let next = tokio::time::Instant::now() + self.keepalive.interval;
                    self.keepalive.timer.as_mut().reset(next);
                }
            }
            GOAWAY => {
                if payload.len() < 8 || id != 0 {
                    return Err(self.protocol(FRAME_SIZE_ERROR, "a malformed GOAWAY".into()));
                }
                let last = payload.get_u32() & 0x7fff_ffff;
                let code = payload.get_u32();
                self.go_away(last, code);
            }
            WINDOW_UPDATE => {
                if payload.len() != 4 {
                    return Err(self.protocol(FRAME_SIZE_ERROR, "a malformed WINDOW_UPDATE".into()));
                }
                let increment = i64::from(payload.get_u32() & 0x7fff_ffff);
                if increment == 0 {
                    if id == 0 {
                        return Err(self.protocol(PROTOCOL_ERROR, "a connection WINDOW_UPDATE of 0".into()));
                    }
                    self.reset(id, PROTOCOL_ERROR, "the replica sent a WINDOW_UPDATE of 0".into());
                } else if id == 0 {
                    self.conn_send_window += increment;
                    if self.conn_send_window > i64::from(i32::MAX) {
                        return Err(
                            self.protocol(FLOW_CONTROL_ERROR, "the connection window overflowed".into())
                        );
                    }
                } else if let Some(stream) = self.streams.get_mut(&id) {
                    stream.send_window += increment;
                    if stream.send_window > i64::from(i32::MAX) {
                        self.reset(
                            id,
                            FLOW_CONTROL_ERROR,
                            "the replica overflowed the stream's send window".into(),
                        );
                    }
                }
            }
            _ => {} // PRIORITY and unknown frame types are ignored, as the protocol asks.
        }
        Ok(())
    }

    /// Strips a frame's padding.
    fn unpad(&mut self, flags: u8, payload: &mut BytesMut) -> Result<BytesMut, Ended> {
        if flags & PADDED == 0 {
            return Ok(std::mem::take(payload));
        }
        let Some(&pad) = payload.first() else {
            return Err(self.protocol(PROTOCOL_ERROR, "a padded frame without its pad length".into()));
        };
        let pad = usize::from(pad);
        if pad + 1 > payload.len() {
            return Err(self.protocol(PROTOCOL_ERROR, "padding longer than the frame".into()));
        }
        payload.advance(1);
        payload.truncate(payload.len() - pad);
        Ok(std::mem::take(payload))
    }

    /// Decodes a response header block (always: the decoder's table must stay in step) and delivers it.
    fn header_block(&mut self, id: u32, block: &[u8], end_stream: bool) -> Result<(), Ended> {
        let mut status = None;
        let mut headers = HeaderMap::new();
        let mut malformed = None;
        // Past the list limit the block is still decoded to its end (the
        // table must stay in step), but nothing more is kept.
        let mut list_size = 0usize;
        let fields = &mut self.fields;
        let decoded = self.decoder.decode_with_cb(block, |name, value| {
            list_size += name.len() + value.len() + 32;
            if malformed.is_some() {
                return;
            }
            if list_size > MAX_HEADER_LIST {
                malformed = Some(format!("the response's header list exceeds {MAX_HEADER_LIST} bytes"));
                return;
            }
            if name.first() == Some(&b':') {
                if &name[..] == b":status" {
                    status = StatusCode::from_bytes(&value).ok();
                } else {
                    malformed = Some(format!("a response carries {:?}", String::from_utf8_lossy(&name)));
                }
                return;
            }
            match fields.get(&name, &value) {
                Some((n, v)) if is_connection_specific(&n, &v) => {
                    malformed = Some(format!("the response carries the connection-specific header {n:?}"));
                }
                Some((n, v)) => {
                    if headers.try_append(n, v).is_err() {
                        malformed = Some("the response has too many header fields".to_owned());
                    }
                }
                None => {
                    malformed =
                        Some(format!("an invalid response header {:?}", String::from_utf8_lossy(&name)))
                }
            }
        });
        if let Err(e) = decoded {
            return Err(
                self.protocol(COMPRESSION_ERROR, format!("a response header block did not decode: {e:?}"))
            );
        }
        let Some(stream) = self.streams.get_mut(&id) else { return Ok(()) };
        if let Some(why) = malformed {
            self.reset(id, PROTOCOL_ERROR, why);
            return Ok(());
        }
        let event = if stream.got_head {
            if !end_stream {
                self.reset(id, PROTOCOL_ERROR, "the replica sent trailers that do not end the stream".into());
                return Ok(());
            }
            Event::Trailers(headers)
        } else {
            match status {
                Some(s) if s.is_informational() && !end_stream => return Ok(()),
                Some(s) if s.is_informational() => {
                    self.reset(id, PROTOCOL_ERROR, "an informational response ended the stream".into());
                    return Ok(());
                }
                Some(status) => {
                    stream.got_head = true;
                    Event::Head { id, status, headers, end: end_stream }
                }
                None => {
                    self.reset(id, PROTOCOL_ERROR, "the response has no :status".into());
                    return Ok(());
                }
            }
        };
        if stream.events.unbounded_send(event).is_err() {
            self.reset(id, CANCEL, "the caller went away".into());
            return Ok(());
        }
        if end_stream {
            self.received_end(id);
        }
        Ok(())
    }

    /// The response is complete: the stream ends (the caller's channel closes).
    /// A request body still unsent is abandoned, and the stream reset so the
    /// replica forgets it too.
    fn received_end(&mut self, id: u32) {
        if let Some(stream) = self.streams.remove(&id)
            && !stream.sent_end
        {
            rst_stream(&mut self.wbuf, id, CANCEL);
        }
    }

    fn settings(&mut self, payload: &[u8]) -> Result<(), Ended> {
        for entry in payload.chunks_exact(6) {
            let key = u16::from_be_bytes([entry[0], entry[1]]);
            let value = u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]);
            match key {
                0x3 => self.peer.max_streams = value as usize,
                0x4 => {
                    if value > i32::MAX as u32 {
                        return Err(self
                            .protocol(FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE too large".into()));
                    }
                    let delta = i64::from(value) - self.peer.initial_window;
                    let mut overflow = false;
                    for stream in self.streams.values_mut() {
                        stream.send_window += delta;
                        overflow |= stream.send_window > i64::from(i32::MAX);
                    }
                    if overflow {
                        return Err(
                            self.protocol(FLOW_CONTROL_ERROR, "a stream's send window overflowed".into())
                        );
                    }
                    self.peer.initial_window = i64::from(value);
                }
                0x5 => {
                    if !(16_384..=16_777_215).contains(&value) {
                        return Err(
                            self.protocol(PROTOCOL_ERROR, "SETTINGS_MAX_FRAME_SIZE out of range".into())
                        );
                    }
                    self.peer.max_frame = value as usize;
                }
                0x1 => self.encoder.peer_table_size(value as usize),
                // ENABLE_PUSH and MAX_HEADER_LIST_SIZE concern what the peer sends
                // or receives, not what this client must do.
                _ => {}
            }
        }
        Ok(())
    }

    /// The peer will process no stream above `last`: those fail as never sent,
    /// the rest finish, and no new stream opens here.
    fn go_away(&mut self, last: u32, code: u32) {
        self.going_away = Some(last);
        self.closed.store(true, Ordering::Release);
        let refused: Vec<u32> = self.streams.keys().copied().filter(|id| *id > last).collect();
        let reason = format!("the replica is going away ({})", code_name(code));
        for id in refused {
            if let Some(s) = self.streams.remove(&id) {
                fail(&s.events, true, reason.clone());
            }
        }
        for (_, open) in self.waiting.drain(..) {
            fail(&open.events, true, reason.clone());
        }
    }

    /// Resets stream `id` with `code`; its caller, if still there, learns `reason`.
    fn reset(&mut self, id: u32, code: u32, reason: String) {
        if let Some(stream) = self.streams.remove(&id) {
            fail(&stream.events, false, reason);
        }
        rst_stream(&mut self.wbuf, id, code);
    }

    /// A connection error: GOAWAY with `code` is queued, and the connection ends.
    fn protocol(&mut self, code: u32, reason: String) -> Ended {
        // Requests not yet on the wire stay off it (they fail as never sent,
        // free to go elsewhere): the queue is cut where the first of them starts.
        let written = self.written;
        if let Some(first_unsent) = self.streams.values().map(|s| s.head_at).filter(|at| *at >= written).min()
        {
            self.wbuf.truncate((first_unsent - written) as usize);
        }
        frame_head(&mut self.wbuf, 8, GOAWAY, 0, 0);
        self.wbuf.put_u32(0);
        self.wbuf.put_u32(code);
        if let Ok(n) = self.io.try_write(&self.wbuf) {
            self.written += n as u64;
            self.wbuf.advance(n);
        }
        Ended { reason: format!("the replica broke the HTTP/2 protocol ({}): {reason}", code_name(code)) }
    }

    /// Tells every stream and waiting request that the connection ended. A
    /// stream counts as never sent only if the socket never took the first
    /// byte of its HEADERS (streams the peer's GOAWAY refused were told so
    /// already).
    pub(super) fn fail_all(&mut self, reason: &str) {
        self.closed.store(true, Ordering::Release);
        let written = self.written;
        for (_, stream) in self.streams.drain() {
            fail(&stream.events, stream.head_at >= written, reason.to_owned());
        }
        for (_, open) in self.waiting.drain(..) {
            fail(&open.events, true, reason.to_owned());
        }
        self.commands.close();
        while let Ok(command) = self.commands.try_recv() {
            if let Command::Open(open) = command {
                fail(&open.events, true, reason.to_owned());
            }
        }
    }

    /// After the end: answers every request a caller was still putting in the
    /// closed queue (a send can be half done when the queue closes; `try_recv`
    /// in [`Driver::fail_all`] does not wait for it, this does).
    pub(super) async fn turn_away_late_requests(&mut self) {
        self.commands.close();
        while let Some(command) = self.commands.recv().await {
            if let Command::Open(open) = command {
                fail(&open.events, true, "the connection closed".to_owned());
            }
        }
    }
}

impl Future for Driver {
    type Output = Result<(), String>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        match this.poll_drive(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => {
                this.fail_all("the connection closed");
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(ended)) => {
                this.fail_all(&ended.reason);
                Poll::Ready(Err(ended.reason))
            }
        }
    }
}

fn io_ended(e: &io::Error) -> Ended {
    Ended { reason: format!("the connection failed: {e}") }
}

fn fail(events: &events::UnboundedSender<Event>, unsent: bool, reason: String) {
    let _ = events.unbounded_send(Event::Failed(Failure { unsent, reason }));
}

fn frame_head(buf: &mut impl bytes::BufMut, len: usize, kind: u8, flags: u8, id: u32) {
    buf.put_u8((len >> 16) as u8);
    buf.put_u8((len >> 8) as u8);
    buf.put_u8(len as u8);
    buf.put_u8(kind);
    buf.put_u8(flags);
    buf.put_u32(id);
}

fn window_update(buf: &mut BytesMut, id: u32, increment: u32) {
    frame_head(buf, 4, WINDOW_UPDATE, 0, id);
    buf.put_u32(increment);
}

fn rst_stream(buf: &mut BytesMut, id: u32, code: u32) {
    frame_head(buf, 4, RST_STREAM, 0, id);
    buf.put_u32(code);
}

/// The request side of HPACK: a dynamic table that only grows. The fields a
/// connection's requests repeat (`:path` per method, `:authority`,
/// `content-type`, `te`, `user-agent`...) are entered once and sent as a
/// one-byte index after that; once the table is full, other fields go as
/// literals the peer does not index. Nothing is ever evicted, so the peer's
/// copy of the table cannot drift from this one. Values marked sensitive
/// (the request id and the remaining deadline, different on every call) are
/// never entered.
struct Encoder {
    /// (name, value) in the order entered: entry `k` has index `62 + len - 1 - k`.
    entries: Vec<(Bytes, Bytes)>,
    size: usize,
    /// How large the table may grow: the protocol's default, or 0 once the
    /// peer asked for less (nothing is indexed on this connection then).
    max: usize,
    /// A table size update to 0 is owed at the start of the next block.
    announce_zero: bool,
}

impl Encoder {
    /// The longest value worth an entry.
    const MAX_INDEXED_VALUE: usize = 128;

    fn new() -> Self {
        Self { entries: Vec::new(), size: 0, max: HEADER_TABLE, announce_zero: false }
    }

    /// The peer's `SETTINGS_HEADER_TABLE_SIZE`. Below the default, the table
    /// is emptied (a size update to 0 opens the next block) and stays unused.
    fn peer_table_size(&mut self, size: usize) {
        if size < HEADER_TABLE && self.max != 0 {
            self.max = 0;
            self.entries.clear();
            self.size = 0;
            self.announce_zero = true;
        }
    }

    /// Appends the request's header block to `block`.
    fn request(&mut self, open: &Open, block: &mut BytesMut) {
        if std::mem::take(&mut self.announce_zero) {
            block.put_u8(0x20); // dynamic table size update: 0
        }
        if open.method == http::Method::POST {
            block.put_u8(0x80 | 3); // :method POST, in the static table
        } else {
            self.field(block, Some(2), b":method", open.method.as_str().as_bytes(), false);
        }
        block.put_u8(0x80 | 6); // :scheme http
        self.field(block, Some(4), b":path", open.path.as_str().as_bytes(), false);
        self.field(block, Some(1), b":authority", open.authority.as_bytes(), false);
        for (name, value) in &open.headers {
            if is_connection_specific(name, value) {
                continue;
            }
            let index = static_name(name.as_str());
            self.field(block, index, name.as_str().as_bytes(), value.as_bytes(), value.is_sensitive());
        }
    }

    fn field(
        &mut self,
        block: &mut BytesMut,
        name_index: Option<usize>,
        name: &[u8],
        value: &[u8],
        sensitive: bool,
    ) {
        if !sensitive {
            if let Some(k) = self.entries.iter().rposition(|(n, v)| n[..] == *name && v[..] == *value) {
                integer(block, 0x80, 7, 62 + self.entries.len() - 1 - k);
                return;
            }
            let size = name.len() + value.len() + 32;
            if value.len() <= Self::MAX_INDEXED_VALUE && self.size + size <= self.max {
                // A literal with incremental indexing: the peer enters it too.
                match name_index {
                    Some(i) => integer(block, 0x40, 6, i),
                    None => {
                        block.put_u8(0x40);
                        string(block, name);
                    }
                }
                string(block, value);
                self.entries.push((Bytes::copy_from_slice(name), Bytes::copy_from_slice(value)));
                self.size += size;
                return;
            }
        }
        literal(block, name_index, name, value, sensitive);
    }
}

/// Headers HTTP/2 forbids (RFC 9113 §8.2.2); `te` only as `trailers`.
fn is_connection_specific(name: &HeaderName, value: &HeaderValue) -> bool {
    use http::header::{CONNECTION, TE, TRANSFER_ENCODING, UPGRADE};
    if name == TE {
        return value != "trailers";
    }
    name == CONNECTION
        || name == TRANSFER_ENCODING
        || name == UPGRADE
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// The static-table index of a request header name gRPC calls carry (RFC 7541 Appendix A).
fn static_name(name: &str) -> Option<usize> {
    Some(match name {
        "accept-encoding" => 16,
        "accept" => 19,
        "authorization" => 23,
        "content-length" => 28,
        "content-type" => 31,
        "cookie" => 32,
        "user-agent" => 58,
        _ => return None,
    })
}

/// A literal header field, not added to the peer's table (never indexed if `sensitive`).
fn literal(block: &mut BytesMut, name_index: Option<usize>, name: &[u8], value: &[u8], sensitive: bool) {
    let kind = if sensitive { 0x10 } else { 0x00 };
    match name_index {
        Some(i) => integer(block, kind, 4, i),
        None => {
            block.put_u8(kind);
            string(block, name);
        }
    }
    string(block, value);
}

/// A string literal, not Huffman coded.
fn string(block: &mut BytesMut, s: &[u8]) {
    integer(block, 0, 7, s.len());
    block.put_slice(s);
}

/// An HPACK integer with an `n`-bit prefix, the first byte's other bits being `first`.
fn integer(block: &mut BytesMut, first: u8, n: u32, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        block.put_u8(first | value as u8);
        return;
    }
    block.put_u8(first | max as u8);
    value -= max;
    while value >= 128 {
        block.put_u8((value % 128) as u8 | 0x80);
        value /= 128;
    }
    block.put_u8(value as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(headers: HeaderMap) -> Open {
        let (events, _) = events::unbounded();
        Open {
            method: http::Method::POST,
            path: http::uri::PathAndQuery::from_static("/flyteidl.service.AsyncAgentService/GetTask"),
            authority: HeaderValue::from_static("127.0.0.1:8000"),
            headers,
            body: Bytes::new(),
            events,
        }
    }

    #[test]
    fn request_blocks_decode_to_the_same_fields_and_repeats_become_indexes() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/grpc"));
        headers.insert("te", HeaderValue::from_static("trailers"));
        headers.insert("connection", HeaderValue::from_static("close"));
        let mut id = HeaderValue::from_static("gw-1");
        id.set_sensitive(true);
        headers.insert("x-request-id", id);
        // A value longer than a 7-bit prefix holds, to cover multi-byte integers.
        let long = "x".repeat(300);
        headers.insert("x-long", HeaderValue::from_str(&long).unwrap());
        let request = open(headers);
        let mut encoder = Encoder::new();
        let mut block = BytesMut::new();
        encoder.request(&request, &mut block);
        let mut decoder = loona_hpack::Decoder::new();
        let fields = decoder.decode(&block).unwrap();
        let text: Vec<(String, String)> = fields
            .into_iter()
            .map(|(n, v)| (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap()))
            .collect();
        let expected = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/flyteidl.service.AsyncAgentService/GetTask"),
            (":authority", "127.0.0.1:8000"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("x-request-id", "gw-1"),
            ("x-long", long.as_str()),
        ];
        let expected: Vec<(String, String)> =
            expected.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())).collect();
        assert_eq!(text, expected, "connection-specific headers are dropped, the rest kept in order");
        // The sensitive value goes as a never-indexed literal (0001xxxx), with a new name.
        let at = block.windows(4).position(|w| w == b"gw-1").unwrap();
        assert_eq!(block[at - 1 - 1 - "x-request-id".len() - 1], 0x10);

        // The same request again: every field but the sensitive one and the one
        // too long to index is now one byte, and the peer's table agrees.
        let mut again = BytesMut::new();
        encoder.request(&request, &mut again);
        let fields = decoder.decode(&again).unwrap();
        let again_text: Vec<(String, String)> = fields
            .into_iter()
            .map(|(n, v)| (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap()))
            .collect();
        assert_eq!(again_text, text);
        // Each literal: a type byte, the name's length and bytes, the value's
        // length (three bytes for 300) and bytes.
        let literals =
            (1 + 1 + "x-request-id".len() + 1 + "gw-1".len()) + (1 + 1 + "x-long".len() + 3 + long.len());
        assert_eq!(again.len(), 6 + literals, "six one-byte indexes and two literals: {again:?}");
    }

    #[test]
    fn a_peer_that_shrinks_the_table_gets_no_more_entries() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/grpc"));
        let request = open(headers);
        let mut encoder = Encoder::new();
        let mut decoder = loona_hpack::Decoder::new();
        let mut first = BytesMut::new();
        encoder.request(&request, &mut first);
        decoder.decode(&first).unwrap();
        encoder.peer_table_size(0);
        let mut block = BytesMut::new();
        encoder.request(&request, &mut block);
        assert_eq!(block[0], 0x20, "the block opens with a table size update to 0");
        decoder.set_max_allowed_table_size(0);
        let fields = decoder.decode(&block).unwrap();
        assert_eq!(fields.len(), 5);
        assert_eq!(fields[4], (b"content-type".to_vec(), b"application/grpc".to_vec()));
        let mut block = BytesMut::new();
        encoder.request(&request, &mut block);
        assert_ne!(block[0], 0x20, "announced once");
        assert_eq!(decoder.decode(&block).unwrap().len(), 5);
    }

    #[test]
    fn integers_use_their_prefix_then_seven_bit_groups() {
        let mut b = BytesMut::new();
        integer(&mut b, 0, 5, 10);
        integer(&mut b, 0, 5, 1337);
        integer(&mut b, 0x80, 7, 126);
        integer(&mut b, 0x80, 7, 127);
        // RFC 7541 C.1.1 and C.1.2; then a value just below and at a 7-bit prefix's limit.
        assert_eq!(&b[..], &[10, 31, 154, 10, 0x80 | 126, 0xff, 0][..]);
    }
}
