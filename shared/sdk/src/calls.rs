//! How a plugin service answers its calls on [`crate::h2serve`]: the unary
//! agent methods, ExecuteTaskSync and health checks straight from the HTTP/2
//! stream (read the request, decode it, call the plugin, encode the one
//! answer), everything else (GetTaskLogs, health watches, unknown paths)
//! through tonic's router.

use std::{future::Future, sync::Arc};

use bytes::{BufMut as _, Bytes, BytesMut};
use flotilla_proto::{
    paths,
    service::{
        agent_metadata_service_server::AgentMetadataService, async_agent_service_server::AsyncAgentService,
    },
};
use h2::{RecvStream, server::SendResponse};
use http::{HeaderMap, HeaderValue};
use tonic::{Status, metadata::MetadataMap};
use tonic_health::{pb::health_server::Health as _, server::HealthService};

use crate::{
    Plugin,
    h2serve::{self, CallFuture, Handler, RecvBody},
    service::Services,
    wire::{Encoding, FRAME_HEADER_LEN, decompressed, header, parse_grpc_timeout},
};

/// A plugin service's calls (see the module docs).
pub(crate) struct ServiceCalls<P> {
    pub(crate) services: Services<P>,
    /// tonic's router for the other paths, with the request size limit in front.
    pub(crate) routes: h2serve::Routes,
    /// Largest request message accepted.
    pub(crate) limit: usize,
    /// Answers `grpc.health.v1.Health/Check`.
    pub(crate) health: Arc<HealthService>,
}

impl<P: Plugin> Handler for ServiceCalls<P> {
    fn handle(&self, request: http::Request<RecvStream>, respond: SendResponse<Bytes>) -> CallFuture {
        let s = self.services.clone();
        let limit = self.limit;
        match request.uri().path() {
            paths::CREATE_TASK => {
                Box::pin(unary(request, respond, limit, move |r| async move { s.create_task(r).await }))
            }
            paths::GET_TASK => {
                Box::pin(unary(request, respond, limit, move |r| async move { s.get_task(r).await }))
            }
            paths::DELETE_TASK => {
                Box::pin(unary(request, respond, limit, move |r| async move { s.delete_task(r).await }))
            }
            paths::GET_TASK_METRICS => {
                Box::pin(unary(request, respond, limit, move |r| async move { s.get_task_metrics(r).await }))
            }
            paths::LIST_AGENTS => {
                Box::pin(unary(request, respond, limit, move |r| async move { s.list_agents(r).await }))
            }
            paths::GET_AGENT => {
                Box::pin(unary(request, respond, limit, move |r| async move { s.get_agent(r).await }))
            }
            paths::EXECUTE_TASK_SYNC => Box::pin(execute_sync(request, respond, limit, s)),
            paths::HEALTH_CHECK => {
                let health = self.health.clone();
                Box::pin(unary(request, respond, limit, move |r| async move { health.check(r).await }))
            }
            _ => Box::pin(h2serve::serve_tower(self.routes.clone(), request, respond)),
        }
    }
}

/// One unary call: the request's one message (held to `limit`), decoded as
/// `M`, handed to `call` with the request's metadata, under the caller's
/// deadline; see [`answer`]. A request that is not one valid message of its
/// type is INVALID_ARGUMENT naming the decode error (tonic's codec would
/// answer INTERNAL), one over `limit` RESOURCE_EXHAUSTED.
pub async fn unary<M, R, F, Fut>(
    request: http::Request<RecvStream>,
    respond: SendResponse<Bytes>,
    limit: usize,
    call: F,
) where
    M: prost::Message + Default,
    R: prost::Message,
    F: FnOnce(tonic::Request<M>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<R>, Status>>,
{
    let (parts, recv) = request.into_parts();
    let deadline = deadline(&parts.headers);
    let work = async move {
        let started = std::time::Instant::now();
        let metadata = MetadataMap::from_headers(parts.headers);
        let read = h2serve::read_request(RecvBody::new(recv), limit).await;
        let decoded = read
            .and_then(|body| decode_next::<M>(&body, metadata.as_ref(), limit).map(|(message, _)| message));
        let message = match decoded {
            Ok(message) => message,
            // Refused before the plugin sees it: logged here, as the plugin's calls are.
            Err(status) => {
                let method = parts.uri.path().rsplit('/').next().unwrap_or("");
                crate::service::log_call(
                    crate::service::request_id(&metadata),
                    method,
                    None,
                    Some(&status),
                    started,
                );
                return Err(status);
            }
        };
        call(tonic::Request::from_parts(metadata, parts.extensions, message)).await
    };
    answer(respond, deadline, work).await;
}

/// ExecuteTaskSync: the header and inputs messages (each held to `limit`),
/// decoded, then the plugin; the one answer goes back like a unary one (see
/// [`answer`]) as soon as it is ready, as upstream's server answers, even if
/// the client has not closed its side yet. Whatever the client sends after the
/// inputs is read to its end behind the call ([`h2serve::read_sync_request`]): a
/// server that stops reading makes HTTP/2 reset the stream, and loaded
/// clients see errors.
async fn execute_sync<P: Plugin>(
    request: http::Request<RecvStream>,
    respond: SendResponse<Bytes>,
    limit: usize,
    services: Services<P>,
) {
    let (parts, recv) = request.into_parts();
    let deadline = deadline(&parts.headers);
    // Boxed: the plugin's future is inside it, and the layers below would
    // otherwise copy all of it (kilobytes) each time they move it.
    let work = Box::pin(async move {
        let messages = h2serve::read_sync_request(RecvBody::new(recv), limit)
            .await
            .and_then(|b| decode_all(&b, &parts.headers, limit));
        let metadata = MetadataMap::from_headers(parts.headers);
        services.execute_sync(&metadata, messages).await.map(tonic::Response::new)
    });
    answer(respond, deadline, work).await;
}

/// The caller's deadline, from `grpc-timeout`.
fn deadline(headers: &http::HeaderMap) -> Option<std::time::Duration> {
    headers.get(&header::GRPC_TIMEOUT).and_then(|v| parse_grpc_timeout(v.as_bytes()))
}

/// Runs `work` under `deadline` (DEADLINE_EXCEEDED when it passes) and writes
/// its outcome: the answer as one message and `grpc-status: 0`, an error as a
/// trailers-only response. A client reset drops the work.
async fn answer<R, W>(mut respond: SendResponse<Bytes>, deadline: Option<std::time::Duration>, work: W)
where
    R: prost::Message,
    W: Future<Output = Result<tonic::Response<R>, Status>>,
{
    let work = async move {
        match deadline {
            Some(d) => tokio::time::timeout(d, work).await.unwrap_or_else(|_| {
                Err(Status::deadline_exceeded(format!(
                    "the caller's deadline of {} passed",
                    flotilla_telemetry::config::HumanDuration(d)
                )))
            }),
            None => work.await,
        }
    };
    match h2serve::until_reset(&mut respond, work).await {
        None => {} // the client went away
        Some(Ok(response)) => send_message(respond, response),
        Some(Err(status)) => h2serve::respond_status(respond, &status),
    }
}

/// Decodes the gRPC message at the start of `body` as `M` (decompressed first
/// when it is flagged compressed, by the encoding `headers` name: at most
/// `limit` bytes of it); returns it and the bytes after it.
fn decode_next<'a, M: prost::Message + Default>(
    body: &'a [u8],
    headers: &HeaderMap,
    limit: usize,
) -> Result<(M, &'a [u8]), Status> {
    if body.len() < FRAME_HEADER_LEN {
        return Err(Status::invalid_argument("the request body ends inside a message header"));
    }
    let end = h2serve::message_end(body);
    if body.len() < end {
        return Err(Status::invalid_argument(format!(
            "the request body ends after {} of the {end} bytes its message declares",
            body.len()
        )));
    }
    let payload = &body[FRAME_HEADER_LEN..end];
    let inflated = match body[0] {
        0 => None,
        flag => decompressed(flag, payload, Encoding::of(headers), limit)?,
    };
    let message = M::decode(inflated.as_deref().unwrap_or(payload)).map_err(|e| {
        Status::invalid_argument(format!("the request is not a valid {}: {e}", short_type_name::<M>()))
    })?;
    Ok((message, &body[end..]))
}

/// Every message of a client stream's body, in order.
fn decode_all<M: prost::Message + Default>(
    mut body: &[u8],
    headers: &HeaderMap,
    limit: usize,
) -> Result<Vec<M>, Status> {
    let mut messages = Vec::with_capacity(2);
    while !body.is_empty() {
        let (message, rest) = decode_next(body, headers, limit)?;
        messages.push(message);
        body = rest;
    }
    Ok(messages)
}

/// `flotilla_proto::admin::GetTaskRequest` → `GetTaskRequest`.
fn short_type_name<M>() -> &'static str {
    let name = std::any::type_name::<M>();
    name.rsplit("::").next().unwrap_or(name)
}

/// Sends a unary answer: headers (the response's metadata and the gRPC content
/// type), the message in one DATA frame, and `grpc-status: 0`.
fn send_message<R: prost::Message>(mut respond: SendResponse<Bytes>, response: tonic::Response<R>) {
    let (metadata, message, _) = response.into_parts();
    let len = message.encoded_len();
    let Ok(prefix) = u32::try_from(len) else {
        let status =
            Status::internal(format!("the answer is {len} bytes, more than a gRPC message can carry"));
        return h2serve::respond_status(respond, &status);
    };
    let mut buf = BytesMut::with_capacity(FRAME_HEADER_LEN + len);
    buf.put_u8(0);
    buf.put_u32(prefix);
    message.encode_raw(&mut buf);
    let mut head = http::Response::new(());
    *head.headers_mut() = metadata.into_headers();
    head.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    let Ok(mut stream) = respond.send_response(head, false) else { return };
    if stream.send_data(buf.freeze(), false).is_err() {
        return;
    }
    let mut trailers = HeaderMap::with_capacity(1);
    trailers.insert(header::GRPC_STATUS.clone(), HeaderValue::from_static("0"));
    let _ = stream.send_trailers(trailers);
}
