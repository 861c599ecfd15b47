//! gRPC framing helpers shared by plugin services and the gateway: the
//! per-message size limit (applied while bytes stream in, before anything is
//! buffered) and the `grpc-timeout` header.

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tonic::Status;

/// Caller-supplied text quoted in a status message (a task type, an agent
/// name, a value): as `{:?}` prints it, cut after [`Quoted::MAX_CHARS`]
/// characters with the full length said. A status message travels in a
/// header (`grpc-message`), and clients refuse headers past a few KiB
/// (grpc-c: 8 KiB), which would hide the status behind RESOURCE_EXHAUSTED.
#[derive(Clone, Copy, Debug)]
pub struct Quoted<'a>(pub &'a str);

impl Quoted<'_> {
    /// Characters shown before the cut.
    pub const MAX_CHARS: usize = 100;
}

impl std::fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.char_indices().nth(Self::MAX_CHARS) {
            None => write!(f, "{:?}", self.0),
            Some((cut, _)) => write!(f, "{:?}… ({} bytes in all)", &self.0[..cut], self.0.len()),
        }
    }
}

/// The longest status message a plugin's error is answered with, in bytes.
pub const MAX_STATUS_MESSAGE: usize = 2048;

/// `message` cut to at most [`MAX_STATUS_MESSAGE`] bytes (on a character
/// boundary) with its full length said, for the same reason as [`Quoted`]: the
/// message travels in a header, and percent-encoding can triple it.
pub fn bounded_message(mut message: String) -> String {
    if message.len() <= MAX_STATUS_MESSAGE {
        return message;
    }
    let total = message.len();
    let mut cut = MAX_STATUS_MESSAGE - 40; // room for the note
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    message.truncate(cut);
    message.push_str(&format!("… ({total} bytes in all)"));
    message
}

/// How a request's messages are compressed, from its `grpc-encoding`. Only
/// a message whose compressed flag is set is decompressed (a client may send
/// some messages of a call uncompressed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// No `grpc-encoding`, or `identity`.
    Identity,
    /// `gzip`.
    Gzip,
    /// `deflate` (zlib's format, as gRPC means it).
    Deflate,
    /// Any other: a compressed message in it is refused.
    Unsupported,
}

impl Encoding {
    /// The encoding `headers` name.
    pub fn of(headers: &http::HeaderMap) -> Self {
        match headers.get(&header::GRPC_ENCODING).map(http::HeaderValue::as_bytes) {
            None | Some(b"identity") => Self::Identity,
            Some(b"gzip") => Self::Gzip,
            Some(b"deflate") => Self::Deflate,
            Some(_) => Self::Unsupported,
        }
    }
}

/// What `grpc-accept-encoding` says the servers read.
pub const ACCEPTED_ENCODINGS: &str = "identity,gzip,deflate";

/// The message of a gRPC frame whose compressed flag is `flag` and payload
/// `payload`, decompressed when the flag says so (at most `limit` bytes of it:
/// a small message can inflate to gigabytes). `None` for an uncompressed one:
/// the payload is the message.
///
/// # Errors
/// The flag is set without an encoding to read it by (INTERNAL, as the gRPC
/// protocol has it), the encoding is one these servers do not read
/// (UNIMPLEMENTED), the payload does not decompress (INVALID_ARGUMENT), or
/// the message is larger than `limit` (RESOURCE_EXHAUSTED).
pub fn decompressed(
    flag: u8,
    payload: &[u8],
    encoding: Encoding,
    limit: usize,
) -> Result<Option<Vec<u8>>, Status> {
    use std::io::Read as _;
    match flag {
        0 => return Ok(None),
        1 => {}
        other => {
            return Err(Status::invalid_argument(format!(
                "a gRPC message's compressed flag is {other}; only 0 and 1 exist"
            )));
        }
    }
    let limit_read = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    let mut out = Vec::with_capacity(payload.len().saturating_mul(4).min(limit));
    let read = match encoding {
        // Every member, as gzip readers elsewhere read a stream (Go's, Python's): what the
        // plugin decodes is then what any other reader would.
        Encoding::Gzip => flate2::read::MultiGzDecoder::new(payload).take(limit_read).read_to_end(&mut out),
        Encoding::Deflate => flate2::read::ZlibDecoder::new(payload).take(limit_read).read_to_end(&mut out),
        Encoding::Identity => {
            return Err(Status::internal(
                "a message is flagged compressed, but the request names no grpc-encoding",
            ));
        }
        Encoding::Unsupported => {
            // The answer says what the server reads, in `grpc-accept-encoding` too, as the gRPC
            // compression spec asks.
            let mut metadata = tonic::metadata::MetadataMap::new();
            metadata.insert(
                "grpc-accept-encoding",
                tonic::metadata::MetadataValue::from_static(ACCEPTED_ENCODINGS),
            );
            return Err(Status::with_metadata(
                tonic::Code::Unimplemented,
                format!(
                    "the request's grpc-encoding is not one this server reads; it reads {ACCEPTED_ENCODINGS}"
                ),
                metadata,
            ));
        }
    };
    if let Err(e) = read {
        return Err(Status::invalid_argument(format!(
            "the request's compressed message does not decompress: {e}"
        )));
    }
    if out.len() > limit {
        return Err(Status::resource_exhausted(format!(
            "the request's message decompresses to more than the limit of {limit} bytes"
        )));
    }
    Ok(Some(out))
}

/// Bytes of a gRPC message header: one compression flag and a big-endian u32 length.
pub const FRAME_HEADER_LEN: usize = 5;

/// The gRPC header names the hot paths look up, made once: looking a header
/// up by `&str` parses and hashes the name on every call.
pub mod header {
    use http::HeaderName;

    /// `grpc-status`.
    pub static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
    /// `grpc-message`.
    pub static GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
    /// `grpc-timeout`.
    pub static GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
    /// `grpc-encoding`.
    pub static GRPC_ENCODING: HeaderName = HeaderName::from_static("grpc-encoding");
    /// `x-request-id`: the call's id, logged by the gateway and the plugin service.
    pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
}

/// A gRPC message larger than the configured limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("request message is {size} bytes, larger than the limit of {limit} bytes")]
pub struct TooLarge {
    /// The message's declared length.
    pub size: u64,
    /// The configured limit.
    pub limit: usize,
}

impl From<TooLarge> for Status {
    fn from(e: TooLarge) -> Self {
        Status::resource_exhausted(e.to_string())
    }
}

/// Follows the gRPC message framing of a byte stream and rejects any message
/// whose declared length exceeds the limit, as soon as its header is seen.
#[derive(Clone, Debug)]
pub struct FrameLimiter {
    limit: usize,
    header: [u8; FRAME_HEADER_LEN],
    have: usize,
    remaining: u64,
}

impl FrameLimiter {
    /// A limiter allowing messages of at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self { limit, header: [0; FRAME_HEADER_LEN], have: 0, remaining: 0 }
    }

    /// Feeds the next chunk of the stream.
    ///
    /// # Errors
    /// [`TooLarge`] when a message header in `data` declares more than the limit.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), TooLarge> {
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = (self.remaining.min(data.len() as u64)) as usize;
                self.remaining -= n as u64;
                data = &data[n..];
                continue;
            }
            let n = (FRAME_HEADER_LEN - self.have).min(data.len());
            self.header[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == FRAME_HEADER_LEN {
                self.have = 0;
                let size = u64::from(u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]));
                if size > self.limit as u64 {
                    return Err(TooLarge { size, limit: self.limit });
                }
                self.remaining = size;
            }
        }
        Ok(())
    }
}

pin_project_lite::pin_project! {
    /// A request body that fails with `RESOURCE_EXHAUSTED` as soon as a message
    /// larger than the limit starts, instead of buffering it first.
    pub struct LimitedBody<B> {
        #[pin]
        inner: B,
        limiter: FrameLimiter,
    }
}

impl<B> LimitedBody<B> {
    /// Wraps `inner`, allowing messages of at most `limit` bytes.
    pub fn new(inner: B, limit: usize) -> Self {
        Self { inner, limiter: FrameLimiter::new(limit) }
    }
}

impl<B> Body for LimitedBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && let Err(e) = this.limiter.feed(data)
                {
                    return Poll::Ready(Some(Err(e.into())));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Status::from_error(e.into())))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A call given up within this much of its deadline was given up because of
/// it: a caller resets the stream when its own deadline passes, at about the
/// moment the server's timer for the same deadline fires.
pub const DEADLINE_MARGIN: Duration = Duration::from_millis(20);

/// What a call that ended without an answer ended with, as its caller sees
/// it, for its log line (and the gateway's count): DEADLINE_EXCEEDED when its
/// `deadline`, counted from `started`, had (all but) passed; else CANCELLED,
/// the caller having reset the stream or closed the connection (or the server
/// having stopped when its grace ran out).
pub fn unanswered(deadline: Option<Duration>, started: std::time::Instant) -> Status {
    match deadline {
        Some(d) if started.elapsed() + DEADLINE_MARGIN >= d => Status::deadline_exceeded(format!(
            "the deadline of {} passed before the answer",
            flotilla_telemetry::config::HumanDuration(d)
        )),
        _ => Status::cancelled(
            "no answer: the caller reset the stream or closed the connection first (or the server stopped before \
             the plugin answered)",
        ),
    }
}

/// Parses a `grpc-timeout` header value (`"3S"`, `"250m"`, `"100000u"`).
/// Returns `None` for a malformed value; callers then treat the call as having no deadline.
pub fn parse_grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b"H" => Duration::from_secs(n.checked_mul(3600)?),
        b"M" => Duration::from_secs(n.checked_mul(60)?),
        b"S" => Duration::from_secs(n),
        b"m" => Duration::from_millis(n),
        b"u" => Duration::from_micros(n),
        b"n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Formats a duration as a `grpc-timeout` header value (at most 8 digits, as the spec wants).
pub fn format_grpc_timeout(d: Duration) -> String {
    let candidates: [(u128, u8); 4] =
        [(d.as_nanos(), b'n'), (d.as_micros(), b'u'), (d.as_millis(), b'm'), (u128::from(d.as_secs()), b'S')];
    let (n, unit) = candidates
        .into_iter()
        .find(|(n, _)| *n < 100_000_000)
        .unwrap_or((u128::from((d.as_secs() / 60).min(99_999_999)), b'M'));
    // Digits by hand: this runs on every forwarded call, and `format!` costs ten times more.
    let mut n = n as u64; // < 10^8
    let mut digits = [0u8; 8];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let mut out = String::with_capacity(digits.len() - at + 1);
    out.extend(digits[at..].iter().map(|d| char::from(*d)));
    out.push(char::from(unit));
    out
}

/// The gRPC code's canonical name, for metric labels and logs (`OK`, `NOT_FOUND`, ...).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gzip(data: &[u8]) -> Vec<u8> {
        use std::io::Write as _;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn zlib(data: &[u8]) -> Vec<u8> {
        use std::io::Write as _;
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn compressed_messages_are_read_by_their_encoding_within_the_limit() {
        let message = b"a message that compresses: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".to_vec();
        assert_eq!(decompressed(0, &message, Encoding::Gzip, 1024).unwrap(), None);
        assert_eq!(decompressed(1, &gzip(&message), Encoding::Gzip, 1024).unwrap(), Some(message.clone()));
        assert_eq!(decompressed(1, &zlib(&message), Encoding::Deflate, 1024).unwrap(), Some(message.clone()));
        // Exactly the limit is allowed; a byte more is not, however small it was on the wire.
        let limit = message.len();
        assert!(decompressed(1, &gzip(&message), Encoding::Gzip, limit).is_ok());
        let bomb = gzip(&vec![0u8; 10 << 20]);
        assert!(bomb.len() < 20 << 10, "{}", bomb.len());
        let refused = decompressed(1, &bomb, Encoding::Gzip, 1 << 20).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{}", refused.message());
        assert!(refused.message().contains("1048576"), "{}", refused.message());
        // A stream of several gzip members is read whole; junk after one is not a member.
        let two = [gzip(b"first "), gzip(b"second")].concat();
        assert_eq!(decompressed(1, &two, Encoding::Gzip, 1024).unwrap(), Some(b"first second".to_vec()));
        let junk = [gzip(&message), b"junk".to_vec()].concat();
        let refused = decompressed(1, &junk, Encoding::Gzip, 1024).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{}", refused.message());
        // An encoding the server does not read is answered with the ones it does, in the header too.
        let refused = decompressed(1, &message, Encoding::Unsupported, 1024).unwrap_err();
        assert_eq!(refused.metadata().get("grpc-accept-encoding").unwrap(), ACCEPTED_ENCODINGS);
        // Wrong or missing encodings, corrupt data and flags that do not exist are refused by name.
        for (flag, payload, encoding, code) in [
            (1, gzip(&message), Encoding::Identity, tonic::Code::Internal),
            (1, gzip(&message), Encoding::Unsupported, tonic::Code::Unimplemented),
            (1, gzip(&message), Encoding::Deflate, tonic::Code::InvalidArgument),
            (1, b"not gzip".to_vec(), Encoding::Gzip, tonic::Code::InvalidArgument),
            (2, message.clone(), Encoding::Gzip, tonic::Code::InvalidArgument),
        ] {
            let status = decompressed(flag, &payload, encoding, 1024).unwrap_err();
            assert_eq!(status.code(), code, "{encoding:?}: {}", status.message());
        }
    }

    #[test]
    fn the_encoding_is_read_from_grpc_encoding() {
        let of = |v: Option<&'static str>| {
            let mut h = http::HeaderMap::new();
            if let Some(v) = v {
                h.insert(&header::GRPC_ENCODING, http::HeaderValue::from_static(v));
            }
            Encoding::of(&h)
        };
        assert_eq!(of(None), Encoding::Identity);
        assert_eq!(of(Some("identity")), Encoding::Identity);
        assert_eq!(of(Some("gzip")), Encoding::Gzip);
        assert_eq!(of(Some("deflate")), Encoding::Deflate);
        assert_eq!(of(Some("snappy")), Encoding::Unsupported);
    }

    #[test]
    fn long_status_messages_are_cut_on_a_character_boundary() {
        assert_eq!(bounded_message("short".into()), "short");
        let exact = "x".repeat(MAX_STATUS_MESSAGE);
        assert_eq!(bounded_message(exact.clone()), exact);
        let long = "é".repeat(MAX_STATUS_MESSAGE);
        let cut = bounded_message(long.clone());
        assert!(cut.len() <= MAX_STATUS_MESSAGE, "{}", cut.len());
        assert!(cut.ends_with(&format!("… ({} bytes in all)", long.len())), "{cut}");
        assert!(long.starts_with(cut.split('…').next().unwrap()));
    }

    #[test]
    fn quoted_text_is_cut_after_its_limit_with_the_length_said() {
        assert_eq!(Quoted("echo").to_string(), "\"echo\"");
        let exact = "é".repeat(Quoted::MAX_CHARS);
        assert_eq!(Quoted(&exact).to_string(), format!("{exact:?}"));
        let long = format!("{exact}xyz");
        assert_eq!(Quoted(&long).to_string(), format!("{exact:?}… ({} bytes in all)", long.len()));
    }

    fn frame(len: u32) -> Vec<u8> {
        let mut v = vec![0];
        v.extend_from_slice(&len.to_be_bytes());
        v.extend(std::iter::repeat_n(7u8, len as usize));
        v
    }

    #[test]
    fn small_messages_pass_even_split_byte_by_byte() {
        let mut bytes = frame(10);
        bytes.extend(frame(3));
        let mut limiter = FrameLimiter::new(10);
        for b in &bytes {
            limiter.feed(std::slice::from_ref(b)).unwrap();
        }
    }

    #[test]
    fn oversized_message_is_refused_at_its_header() {
        let mut limiter = FrameLimiter::new(10);
        limiter.feed(&frame(4)).unwrap();
        let header = &frame(11)[..FRAME_HEADER_LEN];
        assert_eq!(limiter.feed(header), Err(TooLarge { size: 11, limit: 10 }));
    }

    #[test]
    fn grpc_timeouts_round_trip() {
        assert_eq!(parse_grpc_timeout(b"3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout(b"250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout(b"S"), None);
        assert_eq!(parse_grpc_timeout(b"123456789S"), None);
        assert_eq!(parse_grpc_timeout(b"5x"), None);
        for d in [Duration::from_millis(1500), Duration::from_secs(10), Duration::from_nanos(7)] {
            assert_eq!(parse_grpc_timeout(format_grpc_timeout(d).as_bytes()), Some(d));
        }
        assert_eq!(format_grpc_timeout(Duration::ZERO), "0n");
        assert_eq!(format_grpc_timeout(Duration::from_nanos(99_999_999)), "99999999n");
        assert_eq!(format_grpc_timeout(Duration::from_nanos(100_000_000)), "100000u");
        assert_eq!(format_grpc_timeout(Duration::from_secs(100_000_000)), "1666666M");
        assert_eq!(format_grpc_timeout(Duration::MAX), "99999999M");
    }
}
