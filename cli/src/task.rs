//! The subcommands that talk to a running gateway: agents, create, get, delete.

use std::{fmt::Write as _, path::Path, process::ExitCode, time::Duration};

use anyhow::{Context as _, bail};
use base64::{
    Engine as _,
    alphabet::STANDARD as ALPHABET,
    engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig},
};
use flotilla_proto::{
    admin::{self, execute_task_sync_request::Part, execute_task_sync_response::Res},
    core::{self, task_execution::Phase},
    service::{
        agent_metadata_service_client::AgentMetadataServiceClient,
        async_agent_service_client::AsyncAgentServiceClient,
        sync_agent_service_client::SyncAgentServiceClient,
    },
};
use serde::Deserialize;
use tonic::{
    Request,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig},
};

use crate::{Target, literals};

/// Base64 for handles: written padded, read with or without the padding.
const B64: GeneralPurpose = GeneralPurpose::new(
    &ALPHABET,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A task file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskFile {
    /// `TaskTemplate.type`.
    #[serde(rename = "type")]
    task_type: String,
    /// `TaskTemplate.task_type_version`.
    #[serde(default)]
    version: i32,
    /// `TaskTemplate.custom`.
    #[serde(default)]
    custom: serde_json::Map<String, serde_json::Value>,
    /// `TaskTemplate.config`.
    #[serde(default)]
    config: std::collections::HashMap<String, String>,
    /// SQL statement (`TaskTemplate.sql`), for query task types.
    #[serde(default)]
    sql: Option<String>,
    /// The inputs (a YAML mapping, which a JSON object reads into too: YAML
    /// keeps `.nan`/`.inf` apart from null, which JSON values cannot).
    #[serde(default)]
    inputs: serde_yaml::Mapping,
    /// Where outputs would go (`CreateTaskRequest.output_prefix`).
    #[serde(default = "default_output_prefix")]
    output_prefix: String,
}

fn default_output_prefix() -> String {
    "file:///tmp/flotilla/outputs".to_owned()
}

/// What the task subcommands print.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Output {
    /// Lines for people.
    Text,
    /// One JSON document.
    Json,
}

/// Writes a command's result to standard output. A write that fails (a full
/// disk, a closed pipe) is an error, never a silent success: whoever reads the
/// output would otherwise miss the result (a created task's handle, say).
fn emit(text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| anyhow::anyhow!("writing the result to standard output failed: {e}"))
}

/// Prints one JSON document on standard output.
fn print_json(value: &serde_json::Value) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
    emit(&format!("{text}\n"))
}

/// A connection to the gateway whose calls carry the `--token`, when one is
/// given, and `--timeout` as their deadline.
type Conn = InterceptedService<Channel, CallMetadata>;

async fn channel(target: &Target) -> anyhow::Result<Conn> {
    let timeout = call_timeout(target)?;
    // Set but empty counts as unset, as the gateway reads FLOTILLA_AUTH_TOKEN.
    let bearer = match target.token.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
        Some(token) => {
            let usable = token.bytes().all(|b| b.is_ascii_graphic());
            let value =
                usable.then(|| format!("Bearer {token}").parse::<MetadataValue<Ascii>>().ok()).flatten();
            // Never added to HPACK's table.
            let value = value.map(|mut v| {
                v.set_sensitive(true);
                v
            });
            Some(value.context(
                "--token (or FLOTILLA_TOKEN) must be a token of visible ASCII characters, without spaces",
            )?)
        }
        None => None,
    };
    let tls = target.tls || target.tls_ca.is_some() || target.tls_server_name.is_some();
    let scheme = if tls { "https" } else { "http" };
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{}", target.gateway))?
        .connect_timeout(timeout)
        .timeout(timeout);
    if tls {
        endpoint = endpoint.tls_config(tls_config(target)?)?;
    }
    let channel = endpoint.connect().await.with_context(|| {
        let hint = if tls {
            "is it serving TLS, and does its certificate name --tls-server-name, or the address?"
        } else {
            "is `flotilla up` running? if the gateway serves TLS, add --tls or --tls-ca"
        };
        format!("cannot reach the gateway at {} ({hint})", target.gateway)
    })?;
    Ok(InterceptedService::new(channel, CallMetadata { bearer, timeout }))
}

/// TLS for the gateway: its certificate verified against `--tls-ca`, else the
/// system's roots, for `--tls-server-name`, else the address.
fn tls_config(target: &Target) -> anyhow::Result<ClientTlsConfig> {
    let mut config = ClientTlsConfig::new();
    config = match &target.tls_ca {
        Some(path) => {
            let pem = std::fs::read(path).with_context(|| format!("--tls-ca {}", path.display()))?;
            if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
                bail!("--tls-ca {}: no PEM certificate in it (-----BEGIN CERTIFICATE-----)", path.display());
            }
            config.ca_certificate(Certificate::from_pem(pem))
        }
        None => config.with_native_roots(),
    };
    let host = target.gateway.rsplit_once(':').map_or(target.gateway.as_str(), |(host, _)| host);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name = target.tls_server_name.clone().unwrap_or_else(|| host.to_owned());
    Ok(config.domain_name(name))
}

/// Adds `authorization: Bearer <token>` to every call, when there is a token,
/// and `grpc-timeout` (the channel's own timeout is the client's alone): the
/// gateway and the plugin then know the deadline, stop work the CLI no longer
/// waits for, and count it as DEADLINE_EXCEEDED, not as a cancelled call.
#[derive(Clone)]
struct CallMetadata {
    bearer: Option<MetadataValue<Ascii>>,
    timeout: Duration,
}

impl Interceptor for CallMetadata {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, tonic::Status> {
        if let Some(value) = &self.bearer {
            request.metadata_mut().insert("authorization", value.clone());
        }
        request.set_timeout(self.timeout);
        Ok(request)
    }
}

fn call_timeout(target: &Target) -> anyhow::Result<Duration> {
    // The parser allows only positive seconds up to a day.
    Duration::try_from_secs_f64(target.timeout)
        .ok()
        .filter(|d| !d.is_zero())
        .with_context(|| format!("--timeout {} is not a positive number of seconds", target.timeout))
}

/// The exit status of a command whose task ended without success.
pub(crate) const EXIT_TASK_FAILED: u8 = 3;

/// The largest answer the CLI reads: a sync task's outputs come back inline, and
/// tonic's own 4 MiB would refuse an answer the gateway sent whole.
const MAX_ANSWER_BYTES: usize = 256 * 1024 * 1024;

/// A call that failed, said so that the user knows what to change: `timeout`
/// is --timeout in seconds, `sync` whether the call waits for a sync task.
fn call_error(what: &str, s: &tonic::Status, timeout: f64, sync: bool) -> anyhow::Error {
    // The connection itself failed (no gRPC answer): a plaintext call to a TLS
    // gateway ends this way, as does the reverse.
    // A status the gateway sent has no source; one the client made from a
    // failure does, but for the connection dropped mid-call (hyper's canceled
    // request, CANCELLED with hyper's words).
    let dropped = s.code() == tonic::Code::Cancelled && s.message() == "operation was canceled";
    // The client's own timer, or the gateway's (or plugin's) for the deadline the call carried.
    let timed_out = (s.code() == tonic::Code::Cancelled
        && s.message() == tonic::TimeoutExpired(()).to_string())
        || (s.code() == tonic::Code::DeadlineExceeded && s.message().starts_with("the caller's deadline"));
    let transport = dropped || std::error::Error::source(s).is_some();
    let hint = if timed_out && sync {
        format!(
            " (no answer within --timeout {timeout} s: a sync task answers only once it has run; raise --timeout)"
        )
    } else if timed_out {
        format!(" (no answer within --timeout {timeout} s)")
    } else if dropped {
        // What a plaintext call to a TLS gateway meets too, and the reverse.
        " (the gateway closed the connection mid-call: was it stopped? if it serves TLS, pass --tls or \
         --tls-ca; if it does not, leave them out)"
            .to_owned()
    } else if transport {
        // What failed, from the client's own error chain, less what the message says already
        // (for a refused connection, tonic's message and its sources repeat one another).
        let mut parts: Vec<String> = Vec::new();
        let mut source = std::error::Error::source(s);
        while let Some(e) = source {
            let text = e.to_string();
            if !s.message().contains(&text) && !parts.iter().any(|p| p.contains(&text)) {
                parts.push(text);
            }
            source = e.source();
        }
        let cause = parts.iter().map(|p| format!(": {p}")).collect::<String>();
        format!(
            "{cause} (the connection to the gateway failed: was it stopped? is --gateway its gRPC port, not its \
             admin port? if the gateway serves TLS, pass --tls or --tls-ca; if it does not, leave them out)"
        )
    } else if s.code() == tonic::Code::Unauthenticated {
        " (pass one of the gateway's tokens with --token or FLOTILLA_TOKEN)".to_owned()
    } else if s.code() == tonic::Code::OutOfRange && s.message().contains("message length too large") {
        format!(" (the CLI reads answers of at most {} MiB)", MAX_ANSWER_BYTES >> 20)
    } else {
        String::new()
    };
    let code = if timed_out { tonic::Code::DeadlineExceeded } else { s.code() };
    anyhow::anyhow!("{what} failed: {code:?}: {}{hint}", s.message())
}

pub(crate) async fn agents(target: &Target) -> anyhow::Result<ExitCode> {
    let mut client = AgentMetadataServiceClient::new(channel(target).await?);
    let agents = client
        .list_agents(admin::ListAgentsRequest {})
        .await
        .map_err(|s| call_error("ListAgents", &s, target.timeout, false))?
        .into_inner()
        .agents;
    if target.output == Output::Json {
        let list: Vec<serde_json::Value> = agents
            .iter()
            .map(|a| {
                let types: Vec<serde_json::Value> = a
                    .supported_task_categories
                    .iter()
                    .map(|c| serde_json::json!({"name": c.name, "version": c.version}))
                    .collect();
                serde_json::json!({"name": a.name, "kind": if a.is_sync { "sync" } else { "async" }, "task_types": types})
            })
            .collect();
        print_json(&serde_json::Value::Array(list))?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut text = String::new();
    if agents.is_empty() {
        text.push_str("The gateway routes no task types yet.\n");
    }
    let _ = writeln!(text, "{:<28} {:<6} TASK TYPES", "AGENT", "KIND");
    for a in agents {
        let kinds: Vec<String> =
            a.supported_task_categories.iter().map(|c| format!("{} (v{})", c.name, c.version)).collect();
        let kind = if a.is_sync { "sync" } else { "async" };
        let _ = writeln!(text, "{:<28} {:<6} {}", a.name, kind, kinds.join(", "));
    }
    emit(&text)?;
    Ok(ExitCode::SUCCESS)
}

fn read_task(file: &Path) -> anyhow::Result<TaskFile> {
    let text = if file == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("reading the task from standard input")?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?
    };
    // A byte-order mark (some Windows editors write one) is not part of the document.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let is_json = file.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"));
    let task: TaskFile = if is_json {
        serde_json::from_str(text).with_context(|| {
            format!("{} is not a valid task file (read as JSON, for its .json name)", file.display())
        })?
    } else {
        serde_yaml::from_str(text).with_context(|| format!("{} is not a valid task file", file.display()))?
    };
    if task.task_type.is_empty() {
        bail!("{}: `type` must name a task type", file.display());
    }
    Ok(task)
}

fn template(task: &TaskFile) -> anyhow::Result<core::TaskTemplate> {
    let custom: prost_types::Struct = json_struct(&task.custom);
    Ok(core::TaskTemplate {
        id: Some(core::Identifier {
            resource_type: core::ResourceType::Task as i32,
            project: "flotilla".into(),
            domain: "development".into(),
            name: format!("flotilla-cli.{}", task.task_type),
            version: "cli".into(),
            org: String::new(),
        }),
        r#type: task.task_type.clone(),
        task_type_version: task.version,
        custom: Some(custom),
        config: task.config.clone(),
        target: task.sql.as_ref().map(|s| {
            core::task_template::Target::Sql(core::Sql {
                statement: s.clone(),
                dialect: core::sql::Dialect::Ansi as i32,
            })
        }),
        ..Default::default()
    })
}

fn json_struct(map: &serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct { fields: map.iter().map(|(k, v)| (k.clone(), json_value(v))).collect() }
}

fn json_value(v: &serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(a) => {
            Kind::ListValue(prost_types::ListValue { values: a.iter().map(json_value).collect() })
        }
        serde_json::Value::Object(o) => Kind::StructValue(json_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// `TYPE:VERSION:BASE64` ↔ (category, resource_meta).
fn handle(category: &admin::TaskCategory, meta: &[u8]) -> String {
    format!("{}:{}:{}", category.name, category.version, B64.encode(meta))
}

/// The handle argument, or (for `-`) the one on standard input: a task with
/// large inputs has a handle too long for a command line.
fn handle_arg(arg: &str) -> anyhow::Result<String> {
    let stdin;
    let text = if arg == "-" {
        stdin =
            std::io::read_to_string(std::io::stdin()).context("reading the handle from standard input")?;
        let text = stdin.trim();
        // What `flotilla create -o json` prints: {"handle": ...}.
        if text.starts_with('{') {
            let doc: serde_json::Value = serde_json::from_str(text)
                .context("standard input starts with `{` but is not a JSON document")?;
            return doc["handle"]
                .as_str()
                .map(str::to_owned)
                .context("the JSON document on standard input has no \"handle\" string");
        }
        text
    } else {
        arg.trim()
    };
    // `flotilla create` prints `created <handle>` (with --wait, the task's state after it);
    // that line is taken too, on standard input or as the argument
    // (`flotilla get "$(flotilla create task.yaml)"`).
    let line = text.lines().find(|l| l.starts_with("created ")).unwrap_or(text);
    Ok(line.strip_prefix("created ").unwrap_or(line).trim().to_owned())
}

fn parse_handle(h: &str) -> anyhow::Result<(admin::TaskCategory, Vec<u8>)> {
    let mut parts = h.rsplitn(3, ':');
    let (Some(meta), Some(version), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
        // A handle can be hundreds of kilobytes: quote only its start.
        let shown: String = h.chars().take(60).collect();
        let more = if shown.len() < h.len() { "..." } else { "" };
        bail!(
            "{shown:?}{more} is not a task handle: expected TYPE:VERSION:BASE64 as `flotilla create` prints"
        );
    };
    let version = version.parse().with_context(|| format!("handle version {version:?} is not an integer"))?;
    // With its padding or without: a copied handle may have lost its trailing `=`.
    let meta = B64.decode(meta.trim_end_matches('=')).context("the handle's resource_meta is not base64")?;
    Ok((admin::TaskCategory { name: name.to_owned(), version }, meta))
}

pub(crate) async fn create(target: &Target, file: &Path, wait: bool) -> anyhow::Result<ExitCode> {
    let task = read_task(file)?;
    let template = template(&task)?;
    let inputs = literals::to_literal_map(&task.inputs)?;
    let channel = channel(target).await?;
    let category = admin::TaskCategory { name: task.task_type.clone(), version: task.version };

    let agents = AgentMetadataServiceClient::new(channel.clone())
        .list_agents(admin::ListAgentsRequest {})
        .await
        .map_err(|s| call_error("Looking up the task type (ListAgents)", &s, target.timeout, false))?
        .into_inner()
        .agents;
    let is_sync = agents.iter().any(|a| a.is_sync && a.supported_task_categories.contains(&category));
    if is_sync {
        let header = admin::ExecuteTaskSyncRequest {
            part: Some(Part::Header(admin::CreateRequestHeader {
                template: Some(template),
                output_prefix: task.output_prefix.clone(),
                ..Default::default()
            })),
        };
        let body = admin::ExecuteTaskSyncRequest { part: Some(Part::Inputs(inputs)) };
        let failed = |s: tonic::Status| call_error("ExecuteTaskSync", &s, target.timeout, true);
        let mut stream = SyncAgentServiceClient::new(channel)
            .max_decoding_message_size(MAX_ANSWER_BYTES)
            .execute_task_sync(Request::new(tokio_stream::iter([header, body])))
            .await
            .map_err(failed)?
            .into_inner();
        let first = stream.message().await.map_err(failed)?;
        let Some(admin::ExecuteTaskSyncResponse { res: Some(Res::Header(h)) }) = first else {
            bail!("ExecuteTaskSync answered without a header message");
        };
        let resource = h.resource.unwrap_or_default();
        return print_resource(&resource, target.output, None);
    }

    let mut client = async_client(channel);
    let created = client
        .create_task(admin::CreateTaskRequest {
            inputs: Some(inputs),
            template: Some(template),
            output_prefix: task.output_prefix.clone(),
            task_execution_metadata: None,
        })
        .await
        .map_err(|s| call_error("CreateTask", &s, target.timeout, false))?
        .into_inner();
    let h = handle(&category, &created.resource_meta);
    let printed = match target.output {
        Output::Text => emit(&format!("created {h}\n")),
        Output::Json if !wait => print_json(&serde_json::json!({ "handle": h })),
        // With --wait, the handle is in the one document printed at the end, and said
        // on stderr now, for whoever stops waiting.
        Output::Json => {
            flotilla_telemetry::errln!("created {h}");
            Ok(())
        }
    };
    if let Err(e) = printed {
        // The task exists: its handle must reach someone.
        bail!("the task was created, but {e:#}; its handle: created {h}");
    }
    if !wait {
        return Ok(ExitCode::SUCCESS);
    }
    let mut said = String::new();
    loop {
        // The task exists whatever polling meets: say so, with its handle, for `flotilla get` later.
        let resource =
            get_resource(&mut client, &category, &created.resource_meta, target.timeout).await.with_context(
                || format!("the task was created and may still be running (created {h}); waiting for it"),
            )?;
        let phase = Phase::try_from(resource.phase).unwrap_or(Phase::Undefined);
        if matches!(phase, Phase::Succeeded | Phase::Failed | Phase::Aborted | Phase::RetryableFailed) {
            return print_resource(&resource, target.output, Some(&h));
        }
        // Progress when it changes, not at every poll.
        let now = format!("{}: {}", phase.as_str_name(), resource.message);
        if now != said {
            flotilla_telemetry::errln!("{now}");
            said = now;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The async agent service's client, reading answers as large as [`MAX_ANSWER_BYTES`].
fn async_client(channel: Conn) -> AsyncAgentServiceClient<Conn> {
    AsyncAgentServiceClient::new(channel).max_decoding_message_size(MAX_ANSWER_BYTES)
}

async fn get_resource(
    client: &mut AsyncAgentServiceClient<Conn>,
    category: &admin::TaskCategory,
    meta: &[u8],
    timeout: f64,
) -> anyhow::Result<admin::Resource> {
    #[allow(deprecated)]
    let req = admin::GetTaskRequest {
        task_type: category.name.clone(),
        resource_meta: meta.to_vec(),
        task_category: Some(category.clone()),
        output_prefix: String::new(),
    };
    Ok(client
        .get_task(req)
        .await
        .map_err(|s| call_error("GetTask", &s, timeout, false))?
        .into_inner()
        .resource
        .unwrap_or_default())
}

/// Prints a task's state; `handle`, when known, goes into the JSON document.
fn print_resource(r: &admin::Resource, output: Output, handle: Option<&str>) -> anyhow::Result<ExitCode> {
    let phase = Phase::try_from(r.phase).unwrap_or(Phase::Undefined);
    let code = if matches!(phase, Phase::Failed | Phase::Aborted | Phase::RetryableFailed) {
        // Not 2: that is clap's, for a bad command line.
        ExitCode::from(EXIT_TASK_FAILED)
    } else {
        ExitCode::SUCCESS
    };
    if output == Output::Json {
        let links: Vec<serde_json::Value> =
            r.log_links.iter().map(|l| serde_json::json!({"name": l.name, "uri": l.uri})).collect();
        let mut doc = serde_json::json!({
            "phase": phase.as_str_name(),
            "message": r.message,
            "log_links": links,
            "outputs": r.outputs.as_ref().map(literals::map_to_json),
        });
        if let Some(h) = handle {
            doc["handle"] = serde_json::Value::String(h.to_owned());
        }
        print_json(&doc)?;
        return Ok(code);
    }
    let mut text = String::new();
    let _ = writeln!(text, "phase: {}", phase.as_str_name());
    if !r.message.is_empty() {
        let _ = writeln!(text, "message: {}", r.message);
    }
    for link in &r.log_links {
        let _ = writeln!(text, "log: {} {}", link.name, link.uri);
    }
    if let Some(outputs) = &r.outputs {
        if outputs.literals.is_empty() {
            text.push_str("outputs: (none)\n");
        } else {
            text.push_str("outputs:\n");
            text.push_str(&literals::render(outputs));
        }
    }
    emit(&text)?;
    Ok(code)
}

pub(crate) async fn get(target: &Target, h: &str) -> anyhow::Result<ExitCode> {
    let (category, meta) = parse_handle(&handle_arg(h)?)?;
    let mut client = async_client(channel(target).await?);
    let resource = get_resource(&mut client, &category, &meta, target.timeout).await?;
    print_resource(&resource, target.output, None)
}

pub(crate) async fn delete(target: &Target, h: &str) -> anyhow::Result<ExitCode> {
    let (category, meta) = parse_handle(&handle_arg(h)?)?;
    let mut client = async_client(channel(target).await?);
    #[allow(deprecated)]
    client
        .delete_task(admin::DeleteTaskRequest {
            task_type: category.name.clone(),
            resource_meta: meta,
            task_category: Some(category),
        })
        .await
        .map_err(|s| call_error("DeleteTask", &s, target.timeout, false))?;
    match target.output {
        Output::Text => emit("deleted\n")?,
        Output::Json => print_json(&serde_json::json!({ "deleted": true }))?,
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_json_task_file_reads_its_inputs_as_a_yaml_one_does() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t.json");
        std::fs::write(&file, r#"{"type": "snowflake", "inputs": {"opt": null, "n": 1, "l": [1.5, "a"]}}"#)
            .unwrap();
        let task = read_task(&file).unwrap();
        let map = literals::to_literal_map(&task.inputs).unwrap();
        assert_eq!(literals::map_to_json(&map), serde_json::json!({"opt": null, "n": 1, "l": [1.5, "a"]}));
    }

    #[test]
    fn a_byte_order_mark_before_the_document_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in [("t.json", "\u{feff}{\"type\": \"echo\"}"), ("t.yaml", "\u{feff}type: echo\n")] {
            let file = dir.path().join(name);
            std::fs::write(&file, text).unwrap();
            assert_eq!(read_task(&file).unwrap().task_type, "echo", "{name}");
        }
    }

    #[test]
    fn handles_round_trip() {
        let c = admin::TaskCategory { name: "a:b".into(), version: 3 };
        let (c2, meta) = parse_handle(&handle(&c, b"{\"x\":1}")).unwrap();
        assert_eq!((c2, meta), (c.clone(), b"{\"x\":1}".to_vec()));
        assert!(parse_handle("nonsense").is_err());
        // A handle whose trailing `=` was lost in a copy still reads.
        let h = handle(&c, b"{\"x\":12}");
        assert!(h.ends_with('='), "{h}");
        assert_eq!(parse_handle(h.trim_end_matches('=')).unwrap().1, b"{\"x\":12}".to_vec());
    }

    #[test]
    fn every_call_carries_the_timeout_as_its_deadline_and_the_token() {
        let mut metadata = CallMetadata {
            bearer: Some("Bearer t0ken".parse().unwrap()),
            timeout: std::time::Duration::from_millis(2500),
        };
        let request = tonic::service::Interceptor::call(&mut metadata, tonic::Request::new(())).unwrap();
        let timeout = request.metadata().get("grpc-timeout").expect("a grpc-timeout");
        let micros =
            flotilla_sdk::wire::parse_grpc_timeout(timeout.as_bytes()).expect("a valid grpc-timeout");
        assert_eq!(micros, std::time::Duration::from_millis(2500));
        assert_eq!(request.metadata().get("authorization").unwrap(), "Bearer t0ken");
    }
}
