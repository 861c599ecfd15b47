"""Wire-level interop tests: upstream flyteidl 1.16.8 clients against `flotilla up`.

Everything here goes through the published Python stubs and messages (what
propeller-compatible clients and flytekit speak), so a pass means the Rust
fleet is wire-compatible for these paths. Contracts checked are those in
shared/ARCHITECTURE.md: routing, status codes, echo plugin semantics, health
and metrics.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flyteidl.admin import agent_pb2
from flyteidl.core import (
    execution_pb2,
    identifier_pb2,
    interface_pb2,
    literals_pb2,
    tasks_pb2,
    types_pb2,
)
from flyteidl.service import agent_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]

RPC_TIMEOUT = 10.0  # seconds; every RPC carries a deadline so nothing can hang

SUCCEEDED = execution_pb2.TaskExecution.SUCCEEDED
RUNNING = execution_pb2.TaskExecution.RUNNING
FAILED = execution_pb2.TaskExecution.FAILED

ECHO = agent_pb2.TaskCategory(name="echo", version=0)
ECHO_SYNC = agent_pb2.TaskCategory(name="echo_sync", version=0)
OUTPUT_PREFIX = "s3://flotilla-interop/metadata/propeller/f0a1b2c3d4/n0/data/0"

MIB = 1024 * 1024
BIG_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * MIB),
    ("grpc.max_send_message_length", -1),
]


# --------------------------------------------------------------- messages


def phase_name(phase: int) -> str:
    return execution_pb2.TaskExecution.Phase.Name(phase)


def _scalar(**primitive) -> literals_pb2.Literal:
    return literals_pb2.Literal(
        scalar=literals_pb2.Scalar(primitive=literals_pb2.Primitive(**primitive))
    )


_SIMPLE_TYPE_OF = {
    "integer": types_pb2.SimpleType.INTEGER,
    "float_value": types_pb2.SimpleType.FLOAT,
    "string_value": types_pb2.SimpleType.STRING,
    "boolean": types_pb2.SimpleType.BOOLEAN,
}


def make_inputs(**values) -> literals_pb2.LiteralMap:
    """A LiteralMap of primitives; the Python type picks the literal kind."""
    literals = {}
    for name, value in values.items():
        if isinstance(value, bool):
            literals[name] = _scalar(boolean=value)
        elif isinstance(value, int):
            literals[name] = _scalar(integer=value)
        elif isinstance(value, float):
            literals[name] = _scalar(float_value=value)
        elif isinstance(value, str):
            literals[name] = _scalar(string_value=value)
        else:
            raise TypeError(f"unsupported literal value for {name}: {value!r}")
    return literals_pb2.LiteralMap(literals=literals)


def sample_inputs() -> literals_pb2.LiteralMap:
    return make_inputs(
        count=42,
        offset=-7,
        ratio=0.25,
        label="héllo, flotilla ✓",
        enabled=True,
        dry_run=False,
    )


def interface_for(inputs: literals_pb2.LiteralMap) -> interface_pb2.TypedInterface:
    variables = {}
    for name, literal in inputs.literals.items():
        kind = literal.scalar.primitive.WhichOneof("value")
        variables[name] = interface_pb2.Variable(
            type=types_pb2.LiteralType(simple=_SIMPLE_TYPE_OF[kind]),
            description=f"interop input {name}",
        )
    var_map = interface_pb2.VariableMap(variables=variables)
    return interface_pb2.TypedInterface(inputs=var_map, outputs=var_map)


def make_template(
    task_type: str = "echo",
    version: int = 0,
    custom: Optional[dict] = None,
    inputs: Optional[literals_pb2.LiteralMap] = None,
) -> tasks_pb2.TaskTemplate:
    template = tasks_pb2.TaskTemplate(
        id=identifier_pb2.Identifier(
            resource_type=identifier_pb2.TASK,
            project="flotilla",
            domain="interop",
            name=f"interop.tasks.{task_type}",
            version="v1",
        ),
        type=task_type,
        task_type_version=version,
        metadata=tasks_pb2.TaskMetadata(
            runtime=tasks_pb2.RuntimeMetadata(
                type=tasks_pb2.RuntimeMetadata.FLYTE_SDK, version="1.16.8", flavor="python"
            ),
            retries=literals_pb2.RetryStrategy(retries=0),
        ),
        interface=interface_for(inputs if inputs is not None else sample_inputs()),
    )
    if custom is not None:
        template.custom.update(custom)
    return template


def execution_metadata() -> agent_pb2.TaskExecutionMetadata:
    task_id = identifier_pb2.Identifier(
        resource_type=identifier_pb2.TASK,
        project="flotilla",
        domain="interop",
        name="interop.tasks.echo",
        version="v1",
    )
    return agent_pb2.TaskExecutionMetadata(
        task_execution_id=identifier_pb2.TaskExecutionIdentifier(
            task_id=task_id,
            node_execution_id=identifier_pb2.NodeExecutionIdentifier(
                node_id="n0",
                execution_id=identifier_pb2.WorkflowExecutionIdentifier(
                    project="flotilla", domain="interop", name="f0a1b2c3d4"
                ),
            ),
            retry_attempt=0,
        ),
        namespace="flotilla-interop",
        labels={"team": "interop"},
        annotations={"flotilla.dev/suite": "python"},
        k8s_service_account="default",
    )


def create_request(
    template: tasks_pb2.TaskTemplate, inputs: literals_pb2.LiteralMap
) -> agent_pb2.CreateTaskRequest:
    return agent_pb2.CreateTaskRequest(
        inputs=inputs,
        template=template,
        output_prefix=OUTPUT_PREFIX,
        task_execution_metadata=execution_metadata(),
    )


def get_request(resource_meta: bytes, category=ECHO) -> agent_pb2.GetTaskRequest:
    return agent_pb2.GetTaskRequest(
        resource_meta=resource_meta, task_category=category, output_prefix=OUTPUT_PREFIX
    )


# ---------------------------------------------------------------- helpers


def expect_rpc_error(code: grpc.StatusCode, call: Callable[[], object]) -> grpc.RpcError:
    """Run `call`, require it to fail with `code`, return the error."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    assert err.code() == code, (
        f"expected {code.name}, got {err.code().name}: {err.details()!r}"
    )
    return err


def mentions_size(details: Optional[str]) -> bool:
    """True when an error message names a size or limit (a number and a size word)."""
    text = (details or "").lower()
    size_words = ("size", "limit", "large", "max", "byte", "mib", "mb", "exceed")
    return bool(re.search(r"\d", text)) and any(word in text for word in size_words)


def create_echo_task(stub, inputs=None, custom=None) -> bytes:
    inputs = inputs if inputs is not None else sample_inputs()
    resp = stub.CreateTask(
        create_request(make_template(custom=custom, inputs=inputs), inputs), timeout=RPC_TIMEOUT
    )
    assert resp.resource_meta, "CreateTask answered an empty resource_meta"
    return resp.resource_meta


def get_resource(stub, resource_meta: bytes, category=ECHO) -> agent_pb2.Resource:
    resp = stub.GetTask(get_request(resource_meta, category), timeout=RPC_TIMEOUT)
    assert resp.HasField("resource"), "GetTask answered no resource"
    return resp.resource


def assert_succeeded_with(resource: agent_pb2.Resource, inputs: literals_pb2.LiteralMap) -> None:
    assert resource.phase == SUCCEEDED, (
        f"phase {phase_name(resource.phase)}, message {resource.message!r}"
    )
    assert resource.outputs == inputs, "echo outputs differ from the inputs"


def echo_round_trip(create_stub, get_stub=None, inputs=None) -> None:
    """Create, get (SUCCEEDED, outputs == inputs) and delete an echo task."""
    get_stub = get_stub or create_stub
    inputs = inputs if inputs is not None else sample_inputs()
    meta = create_echo_task(create_stub, inputs)
    assert_succeeded_with(get_resource(get_stub, meta), inputs)
    get_stub.DeleteTask(
        agent_pb2.DeleteTaskRequest(resource_meta=meta, task_category=ECHO), timeout=RPC_TIMEOUT
    )


def list_agents(metadata_stub) -> List[agent_pb2.Agent]:
    return list(metadata_stub.ListAgents(agent_pb2.ListAgentsRequest(), timeout=RPC_TIMEOUT).agents)


def categories(agent: agent_pb2.Agent):
    return {(c.name, c.version) for c in agent.supported_task_categories}


def sync_requests(task_type: str, inputs: literals_pb2.LiteralMap):
    header = agent_pb2.CreateRequestHeader(
        template=make_template(task_type=task_type, inputs=inputs),
        output_prefix=OUTPUT_PREFIX,
        task_execution_metadata=execution_metadata(),
    )
    return [
        agent_pb2.ExecuteTaskSyncRequest(header=header),
        agent_pb2.ExecuteTaskSyncRequest(inputs=inputs),
    ]


# ----------------------------------------------------------- agent metadata


def test_list_agents_has_async_echo_and_sync_echo_without_duplicates(metadata_stub):
    agents = list_agents(metadata_stub)
    names = [a.name for a in agents]
    assert len(names) == len(set(names)), f"duplicate agent names: {names}"

    async_echo = [a for a in agents if not a.is_sync and ("echo", 0) in categories(a)]
    sync_echo = [a for a in agents if a.is_sync and ("echo_sync", 0) in categories(a)]
    assert async_echo, f"no async agent serves echo/0: {agents}"
    assert sync_echo, f"no sync agent (is_sync=True) serves echo_sync/0: {agents}"

    serving = [cat for a in agents for cat in categories(a)]
    assert serving.count(("echo", 0)) == 1, f"echo/0 claimed more than once: {agents}"
    assert serving.count(("echo_sync", 0)) == 1, f"echo_sync/0 claimed more than once: {agents}"


def test_get_agent_answers_every_listed_agent(metadata_stub):
    agents = list_agents(metadata_stub)
    assert agents
    for listed in agents:
        got = metadata_stub.GetAgent(
            agent_pb2.GetAgentRequest(name=listed.name), timeout=RPC_TIMEOUT
        ).agent
        assert got.name == listed.name
        assert got.is_sync == listed.is_sync, listed.name
        assert categories(got) == categories(listed), listed.name


def test_get_agent_unknown_name_is_not_found_and_names_it(metadata_stub):
    err = expect_rpc_error(
        grpc.StatusCode.NOT_FOUND,
        lambda: metadata_stub.GetAgent(
            agent_pb2.GetAgentRequest(name="no-such-agent"), timeout=RPC_TIMEOUT
        ),
    )
    assert "no-such-agent" in (err.details() or "")


# -------------------------------------------------------- async echo tasks


def test_echo_round_trip_create_get_delete(async_stub):
    inputs = sample_inputs()
    template = make_template(
        custom={"greeting": "hi", "nested": {"keys": ["a", "b"], "n": 3}}, inputs=inputs
    )
    created = async_stub.CreateTask(create_request(template, inputs), timeout=RPC_TIMEOUT)
    assert created.resource_meta, "CreateTask answered an empty resource_meta"

    resource = get_resource(async_stub, created.resource_meta)
    assert_succeeded_with(resource, inputs)

    deleted = async_stub.DeleteTask(
        agent_pb2.DeleteTaskRequest(resource_meta=created.resource_meta, task_category=ECHO),
        timeout=RPC_TIMEOUT,
    )
    assert isinstance(deleted, agent_pb2.DeleteTaskResponse)


def test_get_task_routed_by_deprecated_task_type_only(async_stub):
    inputs = sample_inputs()
    meta = create_echo_task(async_stub, inputs)
    req = agent_pb2.GetTaskRequest(task_type="echo", resource_meta=meta)
    assert not req.HasField("task_category")
    resp = async_stub.GetTask(req, timeout=RPC_TIMEOUT)
    assert_succeeded_with(resp.resource, inputs)


def test_delete_task_routed_by_deprecated_task_type_only(async_stub):
    meta = create_echo_task(async_stub)
    req = agent_pb2.DeleteTaskRequest(task_type="echo", resource_meta=meta)
    assert not req.HasField("task_category")
    async_stub.DeleteTask(req, timeout=RPC_TIMEOUT)


def test_echo_duration_ms_runs_then_succeeds_after_duration(async_stub):
    inputs = sample_inputs()
    started = time.monotonic()
    meta = create_echo_task(async_stub, inputs, custom={"duration_ms": 1500})

    first = get_resource(async_stub, meta)
    assert first.phase == RUNNING, (
        f"first GetTask: phase {phase_name(first.phase)}, message {first.message!r}"
    )

    deadline = started + 10.0
    seen = [first.phase]
    resource = first
    while resource.phase == RUNNING:
        assert time.monotonic() < deadline, "task still RUNNING after 10 s"
        time.sleep(0.1)
        resource = get_resource(async_stub, meta)
        seen.append(resource.phase)
    finished = time.monotonic()

    assert_succeeded_with(resource, inputs)
    assert all(p == RUNNING for p in seen[:-1]), [phase_name(p) for p in seen]
    assert finished - started >= 1.4, (
        f"SUCCEEDED only {finished - started:.3f} s after create; duration_ms was 1500"
    )


def test_echo_fail_with_reports_failed_phase_and_message(async_stub):
    meta = create_echo_task(async_stub, custom={"fail_with": "boom: disk on fire"})
    resource = get_resource(async_stub, meta)  # a failed task is not an RPC error
    assert resource.phase == FAILED, (
        f"phase {phase_name(resource.phase)}, message {resource.message!r}"
    )
    assert "boom: disk on fire" in resource.message


# --------------------------------------------------------------- routing


def test_create_task_unknown_type_is_not_found_and_names_it(async_stub):
    inputs = sample_inputs()
    template = make_template(task_type="no_such_type", inputs=inputs)
    err = expect_rpc_error(
        grpc.StatusCode.NOT_FOUND,
        lambda: async_stub.CreateTask(create_request(template, inputs), timeout=RPC_TIMEOUT),
    )
    assert "no_such_type" in (err.details() or "")


@pytest.mark.parametrize("target", ["gateway", "echo"])
@pytest.mark.parametrize("compression", [grpc.Compression.Gzip, grpc.Compression.Deflate], ids=["gzip", "deflate"])
def test_compressed_requests_are_served(request, target, compression):
    """grpcio compresses requests when asked (per call here; per channel alike): the gateway reads
    the routing key from the decompressed message and forwards it as it came; the services decode it."""
    channel = request.getfixturevalue("channel" if target == "gateway" else "echo_channel")
    async_stub = agent_pb2_grpc.AsyncAgentServiceStub(channel)
    sync_stub = agent_pb2_grpc.SyncAgentServiceStub(channel)
    # Large and repetitive, so the message is compressed for certain and shrinks.
    inputs = make_inputs(count=7, label="compress me " * 2_000)
    created = async_stub.CreateTask(
        create_request(make_template(inputs=inputs), inputs), timeout=RPC_TIMEOUT, compression=compression
    )
    answer = async_stub.GetTask(get_request(created.resource_meta), timeout=RPC_TIMEOUT, compression=compression)
    assert_succeeded_with(answer.resource, inputs)
    answers = list(sync_stub.ExecuteTaskSync(iter(sync_requests("echo_sync", inputs)), timeout=RPC_TIMEOUT, compression=compression))
    assert len(answers) == 1, answers
    assert_succeeded_with(answers[0].header.resource, inputs)


@pytest.mark.parametrize("target", ["gateway", "echo"])
def test_huge_caller_text_in_an_error_is_cut_so_the_status_still_arrives(request, target):
    """A status message travels in a header, which grpc-c refuses past 8 KiB: caller text quoted
    in one (a task type, an agent name, a custom value) is cut, so the caller gets the real code."""
    channel = request.getfixturevalue("channel" if target == "gateway" else "echo_channel")
    async_stub = agent_pb2_grpc.AsyncAgentServiceStub(channel)
    metadata_stub = agent_pb2_grpc.AgentMetadataServiceStub(channel)
    huge = "t" * 20_000
    inputs = sample_inputs()
    for code, call in [
        (
            grpc.StatusCode.NOT_FOUND,
            lambda: async_stub.CreateTask(
                create_request(make_template(task_type=huge, inputs=inputs), inputs), timeout=RPC_TIMEOUT
            ),
        ),
        (
            grpc.StatusCode.NOT_FOUND,
            lambda: metadata_stub.GetAgent(agent_pb2.GetAgentRequest(name=huge), timeout=RPC_TIMEOUT),
        ),
        (
            grpc.StatusCode.INVALID_ARGUMENT,
            lambda: async_stub.CreateTask(
                create_request(make_template(custom={"duration_ms": "9" * 50_000}, inputs=inputs), inputs),
                timeout=RPC_TIMEOUT,
            ),
        ),
    ]:
        err = expect_rpc_error(code, call)
        details = err.details() or ""
        assert "bytes in all" in details and len(details) < 2_000, details[:300]


def test_create_task_known_type_unknown_version_is_not_found(async_stub):
    inputs = sample_inputs()
    template = make_template(task_type="echo", version=97, inputs=inputs)
    expect_rpc_error(
        grpc.StatusCode.NOT_FOUND,
        lambda: async_stub.CreateTask(create_request(template, inputs), timeout=RPC_TIMEOUT),
    )


def test_get_task_unknown_category_is_not_found(async_stub):
    meta = create_echo_task(async_stub)
    err = expect_rpc_error(
        grpc.StatusCode.NOT_FOUND,
        lambda: async_stub.GetTask(
            get_request(meta, agent_pb2.TaskCategory(name="no_such_type", version=0)),
            timeout=RPC_TIMEOUT,
        ),
    )
    assert "no_such_type" in (err.details() or "")


# ---------------------------------------------------------------- sync echo


def test_execute_task_sync_echo_answers_one_succeeded_header(sync_stub):
    inputs = sample_inputs()
    responses = list(
        sync_stub.ExecuteTaskSync(iter(sync_requests("echo_sync", inputs)), timeout=RPC_TIMEOUT)
    )
    assert len(responses) == 1, f"expected exactly one response, got {len(responses)}"
    (only,) = responses
    assert only.WhichOneof("res") == "header", f"response carries {only.WhichOneof('res')!r}"
    assert_succeeded_with(only.header.resource, inputs)


@pytest.mark.parametrize("type_name", ["echo_sync", "no_such_type"])
@pytest.mark.parametrize("target", ["gateway", "echo"])
def test_execute_task_sync_answers_before_the_client_closes_its_side(request, target, type_name):
    """Upstream's server answers once it has the header and the inputs, so a
    client may wait for that answer before it closes its side of the stream:
    the answer (or the error) must come while the stream is still open."""
    stub = request.getfixturevalue("sync_stub" if target == "gateway" else "echo_sync_stub")
    inputs = sample_inputs()
    answered = threading.Event()

    def requests():
        yield from sync_requests(type_name, inputs)
        # The stream stays open until the answer is in (bounded: the call's deadline fails the test).
        answered.wait(RPC_TIMEOUT)

    call = stub.ExecuteTaskSync(requests(), timeout=RPC_TIMEOUT)
    try:
        first = next(call)
    except grpc.RpcError as err:
        answered.set()
        assert type_name == "no_such_type", f"{err.code()}: {err.details()}"
        assert err.code() == grpc.StatusCode.NOT_FOUND, f"{err.code()}: {err.details()}"
        assert "no_such_type" in (err.details() or "")
        return
    finally:
        was_open = not answered.is_set()
        answered.set()
    assert was_open, "the answer came only after the client closed its side"
    assert type_name == "echo_sync", f"an answer for {type_name}: {first}"
    assert first.WhichOneof("res") == "header"
    assert_succeeded_with(first.header.resource, inputs)
    assert list(call) == [], "more than one answer"
    assert call.code() == grpc.StatusCode.OK, (call.code(), call.details())


def test_execute_task_sync_unknown_type_is_not_found(sync_stub):
    inputs = sample_inputs()
    err = expect_rpc_error(
        grpc.StatusCode.NOT_FOUND,
        lambda: list(
            sync_stub.ExecuteTaskSync(
                iter(sync_requests("no_such_type", inputs)), timeout=RPC_TIMEOUT
            )
        ),
    )
    assert "no_such_type" in (err.details() or "")


# ------------------------------------------------------------ bad requests

INVALID_BODIES = {
    # tag varint 0xFFFFFFFF: field 536870911 with wire type 7, which does not exist
    "invalid_wire_type": b"\xff\xff\xff\xff\x0f",
    # field 2, length-delimited, claims 5 bytes but only 2 follow
    "truncated_field": b"\x12\x05ab",
}


@pytest.mark.parametrize("method", ["CreateTask", "GetTask"])
@pytest.mark.parametrize("body", list(INVALID_BODIES.values()), ids=list(INVALID_BODIES))
@pytest.mark.parametrize("target", ["gateway", "echo"])
def test_undecodable_body_is_invalid_argument_and_fleet_keeps_serving(
    request, target, method, body
):
    # "gateway and services alike": the gateway and the echo service directly
    chan = request.getfixturevalue("channel" if target == "gateway" else "echo_channel")
    metadata_stub = agent_pb2_grpc.AgentMetadataServiceStub(chan)
    raw_call = chan.unary_unary(
        f"/flyteidl.service.AsyncAgentService/{method}",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    expect_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, lambda: raw_call(body, timeout=RPC_TIMEOUT))

    assert list_agents(metadata_stub), "ListAgents answered no agents after a bad request"


def test_two_mib_inputs_round_trip_or_clear_size_error(gateway_addr, open_channel):
    chan = open_channel(gateway_addr, BIG_CHANNEL_OPTIONS)
    stub = agent_pb2_grpc.AsyncAgentServiceStub(chan)
    inputs = make_inputs(blob="x" * (2 * MIB))
    try:
        meta = create_echo_task(stub, inputs)
    except grpc.RpcError as err:
        assert err.code() in (
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ), f"unexpected {err.code().name}: {err.details()!r}"
        assert mentions_size(err.details()), f"error does not name a size: {err.details()!r}"
    else:
        assert_succeeded_with(get_resource(stub, meta), inputs)

    echo_round_trip(stub)


def test_forty_mib_inputs_resource_exhausted_then_fleet_keeps_serving(gateway_addr, open_channel):
    chan = open_channel(gateway_addr, BIG_CHANNEL_OPTIONS)
    stub = agent_pb2_grpc.AsyncAgentServiceStub(chan)
    inputs = make_inputs(blob="x" * (40 * MIB))
    err = expect_rpc_error(
        grpc.StatusCode.RESOURCE_EXHAUSTED, lambda: create_echo_task(stub, inputs)
    )
    assert mentions_size(err.details()), f"error does not name the size/limit: {err.details()!r}"

    echo_round_trip(stub)


# ------------------------------------------------------ health, direct, admin


@pytest.mark.parametrize("target", ["gateway", "echo"])
def test_health_check_serving(request, target):
    chan = request.getfixturevalue("channel" if target == "gateway" else "echo_channel")
    resp = health_pb2_grpc.HealthStub(chan).Check(
        health_pb2.HealthCheckRequest(service=""), timeout=RPC_TIMEOUT
    )
    assert resp.status == health_pb2.HealthCheckResponse.SERVING, (
        health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    )


@pytest.mark.parametrize("target", ["gateway", "echo"])
def test_health_names_and_watch_follow_upstream_and_the_health_protocol(request, target):
    """Every name upstream's agent server reports is SERVING (the agent services and the
    health service itself); Check of any other name is NOT_FOUND, and Watch of one answers
    SERVICE_UNKNOWN and keeps the stream open, as the gRPC health-checking protocol says."""
    stub = health_pb2_grpc.HealthStub(request.getfixturevalue("channel" if target == "gateway" else "echo_channel"))
    serving = health_pb2.HealthCheckResponse.SERVING
    for name in [
        "flyteidl.service.AsyncAgentService",
        "flyteidl.service.SyncAgentService",
        "flyteidl.service.AgentMetadataService",
        "grpc.health.v1.Health",
    ]:
        assert stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=RPC_TIMEOUT).status == serving, name
    expect_rpc_error(
        grpc.StatusCode.NOT_FOUND,
        lambda: stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=RPC_TIMEOUT),
    )
    known = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=RPC_TIMEOUT)
    assert next(known).status == serving
    known.cancel()
    unknown = stub.Watch(health_pb2.HealthCheckRequest(service="nope"), timeout=1.0)
    assert next(unknown).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
    # The stream stays open: what ends it is the caller's deadline, not the server.
    with pytest.raises(grpc.RpcError) as ended:
        next(unknown)
    assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, ended.value


def test_echo_service_direct_round_trip(echo_async_stub):
    echo_round_trip(echo_async_stub)


def test_echo_is_stateless_across_gateway_and_direct(async_stub, echo_async_stub):
    # created through the gateway, read straight from the echo service ...
    echo_round_trip(async_stub, get_stub=echo_async_stub)
    # ... and the other way around
    echo_round_trip(echo_async_stub, get_stub=async_stub)


def test_echo_service_direct_lists_its_agents(echo_metadata_stub):
    cats = {cat for a in list_agents(echo_metadata_stub) for cat in categories(a)}
    assert {("echo", 0), ("echo_sync", 0)} <= cats, cats


def test_gateway_metrics_count_requests(async_stub, gateway_admin_addr, http_get):
    echo_round_trip(async_stub)
    status, content_type, body = http_get(f"http://{gateway_admin_addr}/metrics")
    assert status == 200, body[:500]
    assert content_type.startswith(("text/plain", "application/openmetrics-text")), content_type
    assert "flotilla_gateway_requests_total" in body


def _counter(body: str, name: str, **labels) -> float:
    """The value of the sample of `name` whose labels include `labels` (0 when absent)."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    for line in body.splitlines():
        if line.startswith(name + "{") and all(w in line for w in want):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_gateway_metrics_count_its_own_metadata_calls(metadata_stub, gateway_admin_addr, http_get):
    def counts():
        _, _, body = http_get(f"http://{gateway_admin_addr}/metrics")
        name = "flotilla_gateway_requests_total"
        return (
            _counter(body, name, method="ListAgents", code="OK"),
            _counter(body, name, method="GetAgent", code="OK"),
            _counter(body, name, method="GetAgent", code="NOT_FOUND"),
        )

    before = counts()
    list_agents(metadata_stub)
    metadata_stub.GetAgent(agent_pb2.GetAgentRequest(name=list_agents(metadata_stub)[0].name))
    expect_rpc_error(grpc.StatusCode.NOT_FOUND, lambda: metadata_stub.GetAgent(agent_pb2.GetAgentRequest(name="nope")))
    after = counts()
    assert (after[0] - before[0], after[1] - before[1], after[2] - before[2]) == (2, 1, 1), (before, after)


def test_echo_metrics_use_flytekit_names(async_stub, echo_admin_addr, http_get):
    echo_round_trip(async_stub)
    status, content_type, body = http_get(f"http://{echo_admin_addr}/metrics")
    assert status == 200, body[:500]
    assert content_type.startswith(("text/plain", "application/openmetrics-text")), content_type
    assert "flyte_agent_requests_success_total" in body


@pytest.mark.parametrize("path", ["/livez", "/readyz"])
@pytest.mark.parametrize("target", ["gateway", "echo"])
def test_admin_probes_answer_200(fleet, http_get, target, path):
    admin = fleet.services[target].admin
    status, _, body = http_get(f"http://{admin}{path}")
    assert status == 200, f"{target} {path}: HTTP {status} {body[:200]!r}"


# --------------------------------------------------------- promtool lint


def _promtool() -> str:
    configured = os.environ.get("FLOTILLA_PROMTOOL")
    unpacked = REPO_ROOT / "target" / "images" / "prometheus" / "usr" / "bin" / "promtool"
    found = configured or shutil.which("promtool") or (str(unpacked) if unpacked.is_file() else None)
    if not found or not os.access(found, os.X_OK):
        pytest.fail(
            f"promtool not found ({'FLOTILLA_PROMTOOL=' + configured if configured else 'not on PATH'}): "
            "scripts/prometheus-deb extracts it from Debian's prometheus package and prints where",
            pytrace=False,
        )
    return found


@pytest.mark.parametrize("target", ["gateway", "echo"])
def test_metrics_pass_promtool_check_metrics(fleet, async_stub, sync_stub, http_get, target):
    # Traffic first, so the labelled series (successes, failures, latencies, sizes) exist.
    echo_round_trip(async_stub)
    list(sync_stub.ExecuteTaskSync(iter(sync_requests("echo_sync", sample_inputs())), timeout=RPC_TIMEOUT))
    with pytest.raises(grpc.RpcError):
        async_stub.CreateTask(create_request(make_template(task_type="no_such_type"), sample_inputs()), timeout=RPC_TIMEOUT)
    status, _, body = http_get(f"http://{fleet.services[target].admin}/metrics")
    assert status == 200, body[:500]
    samples = [line for line in body.splitlines() if line and not line.startswith("#")]
    assert len(samples) > 10, f"{target} /metrics has only {len(samples)} samples"
    done = subprocess.run([_promtool(), "check", "metrics"], input=body, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, (
        f"promtool check metrics on {target}'s /metrics exited {done.returncode}:\n{done.stdout}{done.stderr}"
    )
