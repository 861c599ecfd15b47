//! Routing: calls reach the plugin that serves their task type, with their bytes untouched.

use flotilla_echo::Echo;
use flotilla_proto::admin;
use flotilla_testkit::{frame, raw_call, spawn_plugin};
use prost::Message;
use tonic::Code;

use crate::support::*;

#[tokio::test]
async fn echo_round_trip_through_the_gateway() {
    let echo = spawn_plugin(Echo::default()).await;
    let gw = spawn_gateway(vec![plugin("echo", format!("static://{}", echo.addr))], |_| {}).await;
    echo_round_trip(&mut gw.async_client(), 5).await;
}

#[tokio::test]
async fn unknown_task_type_is_not_found_naming_it_and_the_known_ones() {
    let echo = spawn_plugin(Echo::default()).await;
    let gw = spawn_gateway(vec![plugin("echo", format!("static://{}", echo.addr))], |_| {}).await;
    let err = gw
        .async_client()
        .create_task(admin::CreateTaskRequest {
            template: Some(echo_template("teleport", &[])),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("\"teleport\""), "{}", err.message());
    assert!(err.message().contains("echo v0"), "{}", err.message());
}

#[tokio::test]
async fn unknown_fields_reach_the_plugin_untouched() {
    let (addr, recorder) = spawn_recorder().await;
    let gw = spawn_gateway(vec![plugin("recorder", format!("static://{addr}"))], |_| {}).await;

    // A template carrying field 4242 (unknown to flyteidl 1.16.8), inside a request carrying field 99.
    let mut template = flotilla_testkit::encode(&echo_template("recorder", &[]));
    template.extend_from_slice(&[0x92, 0x89, 0x02, 5, b'f', b'u', b't', b'u', b'r']);
    let mut request = Vec::new();
    request.push(0x12); // field 2 (template), length-delimited
    request.push(u8::try_from(template.len()).unwrap());
    request.extend_from_slice(&template);
    request.extend_from_slice(&[0x9a, 0x06, 3, b'n', b'e', b'w']);
    let sent = frame(&request);

    let answer = raw_call(gw.addr, flotilla_proto::paths::CREATE_TASK, sent.clone()).await;
    assert_eq!(answer.code, Code::Ok, "{}", answer.message);
    assert_eq!(
        admin::CreateTaskResponse::decode(answer.messages[0].clone()).unwrap().resource_meta,
        b"recorded"
    );
    let seen = recorder.seen.lock().unwrap().clone();
    assert_eq!(seen, vec![sent], "the plugin must receive the exact bytes the client sent");
}

#[tokio::test]
async fn list_and_get_agent_answer_for_the_whole_fleet() {
    let echo = spawn_plugin(Echo::default()).await;
    let (addr, _recorder) = spawn_recorder().await;
    let gw = spawn_gateway(
        vec![
            plugin("echo", format!("static://{}", echo.addr)),
            plugin("recorder", format!("static://{addr}")),
        ],
        |_| {},
    )
    .await;
    let mut client = gw.metadata_client();
    let agents = client.list_agents(admin::ListAgentsRequest {}).await.unwrap().into_inner().agents;
    let mut names: Vec<&str> = agents.iter().map(|a| a.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["Echo Agent", "Echo Sync Agent", "Recorder"]);
    let got =
        client.get_agent(admin::GetAgentRequest { name: "Recorder".into() }).await.unwrap().into_inner();
    assert_eq!(got.agent.unwrap().supported_task_categories[0].name, "recorder");
    let err = client.get_agent(admin::GetAgentRequest { name: "Nobody".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("Nobody"));
}

#[tokio::test]
async fn a_category_claimed_twice_routes_to_the_first_and_is_reported() {
    let first = spawn_plugin(Echo::default()).await;
    let second = spawn_plugin(Echo::default()).await;
    let gw = spawn_gateway(
        vec![
            plugin("first", format!("static://{}", first.addr)),
            plugin("second", format!("static://{}", second.addr)),
        ],
        |_| {},
    )
    .await;
    let (status, metrics) = flotilla_testkit::http_get(gw.admin, "/metrics").await;
    assert_eq!(status, 200);
    assert!(metrics.contains("flotilla_gateway_route_conflicts 2"), "{metrics}");
    // Calls still route (to the first), and ListAgents shows each agent once.
    let agents =
        gw.metadata_client().list_agents(admin::ListAgentsRequest {}).await.unwrap().into_inner().agents;
    assert_eq!(agents.len(), 2);
    gw.async_client()
        .create_task(admin::CreateTaskRequest {
            template: Some(echo_template("echo", &[])),
            ..Default::default()
        })
        .await
        .unwrap();
    let (_, first_metrics) = flotilla_testkit::http_get(first.admin, "/metrics").await;
    assert!(
        first_metrics
            .contains("flyte_agent_requests_success_total{operation=\"create\",task_type=\"echo\"} 1"),
        "{first_metrics}"
    );
}

/// A plugin with one async agent of a given name serving one task type; its
/// creates answer with the task type, so a test can see which service answered.
struct Named {
    agent: &'static str,
    task_type: &'static str,
}

impl flotilla_sdk::Plugin for Named {
    fn agents(&self) -> Vec<flotilla_sdk::AgentSpec> {
        vec![flotilla_sdk::AgentSpec::asynchronous(self.agent, self.task_type)]
    }

    async fn create(
        &self,
        _: &flotilla_sdk::Call,
        _: admin::CreateTaskRequest,
    ) -> Result<admin::CreateTaskResponse, flotilla_sdk::PluginError> {
        Ok(admin::CreateTaskResponse { resource_meta: self.task_type.as_bytes().to_vec() })
    }
}

#[tokio::test]
async fn services_sharing_an_agent_name_list_one_agent_with_every_task_type() {
    // As flytekit's registry does for one name: one agent, the union of the task types.
    let a = spawn_plugin(Named { agent: "Warehouse Agent", task_type: "load" }).await;
    let b = spawn_plugin(Named { agent: "Warehouse Agent", task_type: "unload" }).await;
    let gw = spawn_gateway(
        vec![plugin("a", format!("static://{}", a.addr)), plugin("b", format!("static://{}", b.addr))],
        |_| {},
    )
    .await;
    let mut metadata = gw.metadata_client();
    let agents = metadata.list_agents(admin::ListAgentsRequest {}).await.unwrap().into_inner().agents;
    assert_eq!(agents.len(), 1, "{agents:?}");
    let mut types: Vec<&str> = agents[0].supported_task_categories.iter().map(|c| c.name.as_str()).collect();
    types.sort_unstable();
    assert_eq!(types, ["load", "unload"]);
    #[allow(deprecated)]
    let mut deprecated = agents[0].supported_task_types.clone();
    deprecated.sort_unstable();
    assert_eq!(deprecated, ["load", "unload"]);
    let got = metadata.get_agent(admin::GetAgentRequest { name: "Warehouse Agent".into() }).await.unwrap();
    assert_eq!(got.into_inner().agent.unwrap().supported_task_categories.len(), 2);
    // Each task type still goes to its own service.
    for task_type in ["load", "unload"] {
        let created = gw
            .async_client()
            .create_task(admin::CreateTaskRequest {
                template: Some(echo_template(task_type, &[])),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(created.resource_meta, task_type.as_bytes());
    }
}

#[tokio::test]
async fn execute_task_sync_through_the_gateway_answers_an_open_stream_without_a_reset() {
    use admin::execute_task_sync_request::Part;
    let echo = spawn_plugin(Echo::default()).await;
    let gw = spawn_gateway(vec![plugin("echo", format!("static://{}", echo.addr))], |_| {}).await;
    for (task_type, code) in [("echo_sync", Code::Ok), ("nope", Code::NotFound)] {
        let [header, first_inputs] = sync_messages(echo_template(task_type, &[]), inputs(3));
        let start: bytes::Bytes =
            [frame(&header.encode_to_vec()), frame(&first_inputs.encode_to_vec())].concat().into();
        // More after the inputs: ignored (as upstream), read to its end, never reset.
        let extra =
            frame(&admin::ExecuteTaskSyncRequest { part: Some(Part::Inputs(inputs(4))) }.encode_to_vec());
        let seen = flotilla_testkit::call_before_closing(
            gw.addr,
            "/flyteidl.service.SyncAgentService/ExecuteTaskSync",
            start,
            extra,
        )
        .await;
        assert_eq!(seen.answer.code, code, "{task_type}: {}", seen.answer.message);
        assert_eq!(
            seen.reset, None,
            "{task_type}: the gateway reset a stream the client was still sending on"
        );
        assert!(seen.sent_after, "{task_type}");
        if code == Code::Ok {
            let answer = admin::ExecuteTaskSyncResponse::decode(seen.answer.messages[0].clone()).unwrap();
            let Some(admin::execute_task_sync_response::Res::Header(h)) = answer.res else {
                panic!("{answer:?}")
            };
            assert_eq!(h.resource.unwrap().outputs, Some(inputs(3)), "the inputs message, not the extra one");
        }
    }
}

#[tokio::test]
async fn a_content_length_from_the_caller_does_not_reach_the_plugin() {
    use admin::execute_task_sync_request::Part;
    let echo = spawn_plugin(Echo::default()).await;
    let gw = spawn_gateway(vec![plugin("echo", format!("static://{}", echo.addr))], |_| {}).await;
    let [header, first_inputs] = sync_messages(echo_template("echo_sync", &[]), inputs(3));
    let extra = admin::ExecuteTaskSyncRequest { part: Some(Part::Inputs(inputs(4))) };
    // The gateway forwards the header and the inputs, not the extra message:
    // the caller's content-length would no longer be true of what it sends.
    let body: bytes::Bytes =
        [&header, &first_inputs, &extra].map(|m| frame(&m.encode_to_vec())).concat().into();
    let length = body.len().to_string();
    let answer = flotilla_testkit::raw_call_with(
        gw.addr,
        "/flyteidl.service.SyncAgentService/ExecuteTaskSync",
        &[("content-length", &length)],
        body,
    )
    .await;
    assert_eq!(answer.code, Code::Ok, "{}", answer.message);
    let answer = admin::ExecuteTaskSyncResponse::decode(answer.messages[0].clone()).unwrap();
    let Some(admin::execute_task_sync_response::Res::Header(h)) = answer.res else { panic!("{answer:?}") };
    assert_eq!(h.resource.unwrap().outputs, Some(inputs(3)));
}

#[tokio::test]
async fn a_pinned_category_is_listed_even_when_the_plugin_shares_its_agents_name() {
    // The plugin is named after its own agent; the pin joins that agent in ListAgents.
    let svc = spawn_plugin(Named { agent: "Warehouse", task_type: "load" }).await;
    let mut p = plugin("Warehouse", format!("static://{}", svc.addr));
    p.categories = vec!["legacy_load:2".into()];
    let gw = spawn_gateway(vec![p], |_| {}).await;
    let agents =
        gw.metadata_client().list_agents(admin::ListAgentsRequest {}).await.unwrap().into_inner().agents;
    assert_eq!(agents.len(), 1, "{agents:?}");
    let mut listed: Vec<(&str, i32)> =
        agents[0].supported_task_categories.iter().map(|c| (c.name.as_str(), c.version)).collect();
    listed.sort_unstable();
    assert_eq!(listed, [("legacy_load", 2), ("load", 0)]);
    #[allow(deprecated)]
    let mut deprecated = agents[0].supported_task_types.clone();
    deprecated.sort_unstable();
    assert_eq!(deprecated, ["legacy_load", "load"]);
}

#[tokio::test]
async fn an_agent_listing_only_deprecated_task_types_is_routed_at_version_0() {
    let recorder = Recorder::default();
    recorder.deprecated_list.store(true, std::sync::atomic::Ordering::SeqCst);
    let (addr, recorder) = spawn_recorder_with(recorder).await;
    let gw = spawn_gateway(vec![plugin("old", format!("static://{addr}"))], |_| {}).await;
    gw.async_client()
        .create_task(admin::CreateTaskRequest {
            template: Some(echo_template("recorder", &[])),
            ..Default::default()
        })
        .await
        .expect("routed by the deprecated task type, as propeller reads it");
    assert_eq!(recorder.seen.lock().unwrap().len(), 1);
    let listed = gw.metadata_client().list_agents(admin::ListAgentsRequest {}).await.unwrap().into_inner();
    let categories: Vec<_> = listed.agents.iter().flat_map(|a| &a.supported_task_categories).collect();
    assert_eq!(categories, [&admin::TaskCategory { name: "recorder".into(), version: 0 }]);
}
