"""Any-language backends: the unmodified upstream Python agent server behind flotilla-gateway.

One gateway routes to two backends at once: `flotilla-echo` (Rust; echo,
echo_sync) and flytekit's own `pyflyte serve agent` loading the agents in
upstream_agents/fleet_agents.py (py_echo, py_sync). Everything goes through the
gateway with the upstream flyteidl 1.16.8 stubs, so a pass means a Python agent
joins a Flotilla fleet with no change on either side. The fleet is built by the
`mixed_fleet` fixture in mixed_conftest.py.
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterator, List

import grpc
import pytest

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

from mixed_conftest import GRPC_OPTIONS, MixedFleet, http_get, mixed_fleet  # noqa: F401  (fixture)

RPC_TIMEOUT = 10.0  # seconds; every RPC carries a deadline so nothing can hang
SUCCEEDED = execution_pb2.TaskExecution.SUCCEEDED
OUTPUT_PREFIX = "s3://flotilla-interop/metadata/propeller/m1x3d/n0/data/0"

ECHO = agent_pb2.TaskCategory(name="echo", version=0)
PY_ECHO = agent_pb2.TaskCategory(name="py_echo", version=0)

# What each backend serves (pyflyte always adds its built-in `sensor` and
# `webhook` agents as well).
RUST_CATEGORIES = {("echo", 0), ("echo_sync", 0)}
PYTHON_CATEGORIES = {("py_echo", 0), ("py_sync", 0)}


# --------------------------------------------------------------- messages


def phase_name(phase: int) -> str:
    return execution_pb2.TaskExecution.Phase.Name(phase)


def make_inputs(count: int, label: str) -> literals_pb2.LiteralMap:
    """An upstream LiteralMap with one int and one string."""

    def scalar(**primitive) -> literals_pb2.Literal:
        return literals_pb2.Literal(scalar=literals_pb2.Scalar(primitive=literals_pb2.Primitive(**primitive)))

    return literals_pb2.LiteralMap(literals={"count": scalar(integer=count), "label": scalar(string_value=label)})


def make_template(task_type: str) -> tasks_pb2.TaskTemplate:
    variables = interface_pb2.VariableMap(
        variables={
            "count": interface_pb2.Variable(type=types_pb2.LiteralType(simple=types_pb2.SimpleType.INTEGER)),
            "label": interface_pb2.Variable(type=types_pb2.LiteralType(simple=types_pb2.SimpleType.STRING)),
        }
    )
    return tasks_pb2.TaskTemplate(
        id=identifier_pb2.Identifier(
            resource_type=identifier_pb2.TASK,
            project="flotilla",
            domain="interop",
            name=f"interop.mixed.{task_type}",
            version="v1",
        ),
        type=task_type,
        task_type_version=0,
        metadata=tasks_pb2.TaskMetadata(
            runtime=tasks_pb2.RuntimeMetadata(
                type=tasks_pb2.RuntimeMetadata.FLYTE_SDK, version="1.16.8", flavor="python"
            ),
        ),
        interface=interface_pb2.TypedInterface(inputs=variables, outputs=variables),
    )


def execution_metadata(task_type: str) -> agent_pb2.TaskExecutionMetadata:
    return agent_pb2.TaskExecutionMetadata(
        task_execution_id=identifier_pb2.TaskExecutionIdentifier(
            task_id=identifier_pb2.Identifier(
                resource_type=identifier_pb2.TASK,
                project="flotilla",
                domain="interop",
                name=f"interop.mixed.{task_type}",
                version="v1",
            ),
            node_execution_id=identifier_pb2.NodeExecutionIdentifier(
                node_id="n0",
                execution_id=identifier_pb2.WorkflowExecutionIdentifier(
                    project="flotilla", domain="interop", name="m1x3d"
                ),
            ),
            retry_attempt=0,
        ),
        namespace="flotilla-interop",
        labels={"team": "interop"},
        k8s_service_account="default",
    )


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def gateway(mixed_fleet: MixedFleet) -> Iterator[grpc.Channel]:
    chan = grpc.insecure_channel(mixed_fleet.gateway_grpc, options=GRPC_OPTIONS)
    try:
        grpc.channel_ready_future(chan).result(timeout=RPC_TIMEOUT)
    except grpc.FutureTimeoutError:
        chan.close()
        mixed_fleet.fail(f"gRPC channel to the gateway at {mixed_fleet.gateway_grpc} not ready")
    yield chan
    chan.close()


@pytest.fixture
def fleet_output(mixed_fleet: MixedFleet):
    """Every child's output tail, for assertion messages."""
    return mixed_fleet.describe


# ------------------------------------------------------------------ helpers


@contextlib.contextmanager
def fleet_on_rpc_error(fleet: MixedFleet, step: str) -> Iterator[None]:
    """Turns an RPC error into a failure that names the step and shows every backend's output."""
    try:
        yield
    except grpc.RpcError as err:
        fleet.fail(f"{step}: RPC failed with {err.code().name}: {err.details()!r}")


def async_round_trip(stub, task_type: str, category: agent_pb2.TaskCategory, inputs, describe) -> None:
    """Create, get (SUCCEEDED, outputs == inputs) and delete one task through `stub`."""
    created = stub.CreateTask(
        agent_pb2.CreateTaskRequest(
            inputs=inputs,
            template=make_template(task_type),
            output_prefix=OUTPUT_PREFIX,
            task_execution_metadata=execution_metadata(task_type),
        ),
        timeout=RPC_TIMEOUT,
    )
    assert created.resource_meta, f"CreateTask on {task_type} answered an empty resource_meta"
    got = stub.GetTask(
        agent_pb2.GetTaskRequest(
            resource_meta=created.resource_meta, task_category=category, output_prefix=OUTPUT_PREFIX
        ),
        timeout=RPC_TIMEOUT,
    )
    assert got.HasField("resource"), f"GetTask on {task_type} answered no resource"
    assert got.resource.phase == SUCCEEDED, (
        f"{task_type}: phase {phase_name(got.resource.phase)}, message {got.resource.message!r}\n{describe()}"
    )
    assert got.resource.outputs == inputs, f"{task_type}: outputs {got.resource.outputs} differ from inputs {inputs}"
    stub.DeleteTask(
        agent_pb2.DeleteTaskRequest(resource_meta=created.resource_meta, task_category=category),
        timeout=RPC_TIMEOUT,
    )
    return created.resource_meta


def sync_call(stub, task_type: str, inputs) -> List[agent_pb2.ExecuteTaskSyncResponse]:
    header = agent_pb2.CreateRequestHeader(
        template=make_template(task_type),
        output_prefix=OUTPUT_PREFIX,
        task_execution_metadata=execution_metadata(task_type),
    )
    requests = [agent_pb2.ExecuteTaskSyncRequest(header=header), agent_pb2.ExecuteTaskSyncRequest(inputs=inputs)]
    return list(stub.ExecuteTaskSync(iter(requests), timeout=RPC_TIMEOUT))


def assert_one_succeeded_header(responses, inputs, task_type: str, describe) -> None:
    assert len(responses) == 1, f"{task_type}: expected exactly one response message, got {len(responses)}"
    only = responses[0]
    assert only.WhichOneof("res") == "header", f"{task_type}: the response is not a header: {only}"
    resource = only.header.resource
    assert resource.phase == SUCCEEDED, (
        f"{task_type}: phase {phase_name(resource.phase)}, message {resource.message!r}\n{describe()}"
    )
    assert resource.outputs == inputs, f"{task_type}: outputs {resource.outputs} differ from inputs {inputs}"


# -------------------------------------------------------------------- tests


def test_mixed_fleet_routes_python_and_rust_backends(mixed_fleet: MixedFleet, gateway, fleet_output):
    metadata = agent_pb2_grpc.AgentMetadataServiceStub(gateway)
    async_stub = agent_pb2_grpc.AsyncAgentServiceStub(gateway)
    sync_stub = agent_pb2_grpc.SyncAgentServiceStub(gateway)

    # ListAgents on the gateway: the union of both backends, each category once.
    with fleet_on_rpc_error(mixed_fleet, "ListAgents on the gateway"):
        agents = list(metadata.ListAgents(agent_pb2.ListAgentsRequest(), timeout=RPC_TIMEOUT).agents)
    listed = [(c.name, c.version) for a in agents for c in a.supported_task_categories]
    assert RUST_CATEGORIES | PYTHON_CATEGORIES <= set(listed), f"gateway ListAgents: {agents}"
    assert len(listed) == len(set(listed)), f"a task category is listed twice: {sorted(listed)}"
    by_category = {(c.name, c.version): a for a in agents for c in a.supported_task_categories}
    assert not by_category[("py_echo", 0)].is_sync and by_category[("py_sync", 0)].is_sync
    assert not by_category[("echo", 0)].is_sync and by_category[("echo_sync", 0)].is_sync
    # GetAgent is answered for the Python backend's agents too.
    name = by_category[("py_echo", 0)].name
    with fleet_on_rpc_error(mixed_fleet, f"GetAgent {name!r} on the gateway"):
        got_agent = metadata.GetAgent(agent_pb2.GetAgentRequest(name=name), timeout=RPC_TIMEOUT).agent
    assert got_agent.name == name and ("py_echo", 0) in {
        (c.name, c.version) for c in got_agent.supported_task_categories
    }

    # No category is claimed by both backends.
    status, body = http_get(f"http://{mixed_fleet.gateway_admin}/metrics")
    assert status == 200, f"gateway /metrics answered HTTP {status}"
    conflicts = re.search(r"^flotilla_gateway_route_conflicts\s+(\S+)$", body, re.MULTILINE)
    assert conflicts and float(conflicts.group(1)) == 0, (
        f"gateway reports route conflicts: {conflicts.group(0) if conflicts else 'metric missing'}"
    )

    # Async round trip on the Python backend, through the gateway.
    py_inputs = make_inputs(count=42, label="from Python, via Rust ✓")
    with fleet_on_rpc_error(mixed_fleet, "py_echo CreateTask/GetTask/DeleteTask through the gateway"):
        py_meta = async_round_trip(async_stub, "py_echo", PY_ECHO, py_inputs, fleet_output)
    # pyflyte encodes resource_meta as JSON of its ResourceMeta dataclass.
    assert py_meta.startswith(b"{"), f"py_echo resource_meta is not flytekit's JSON: {py_meta[:80]!r}"

    # GetTask addressed only by the deprecated task_type string (version 0).
    with fleet_on_rpc_error(mixed_fleet, "py_echo GetTask by deprecated task_type through the gateway"):
        legacy = async_stub.GetTask(
            agent_pb2.GetTaskRequest(resource_meta=py_meta, task_type="py_echo", output_prefix=OUTPUT_PREFIX),
            timeout=RPC_TIMEOUT,
        )
    assert legacy.resource.phase == SUCCEEDED, (
        f"py_echo by task_type: phase {phase_name(legacy.resource.phase)}, message {legacy.resource.message!r}"
    )
    assert legacy.resource.outputs == py_inputs

    # Sync on the Python backend, through the gateway.
    sync_inputs = make_inputs(count=-7, label="sync, héllo")
    with fleet_on_rpc_error(mixed_fleet, "py_sync ExecuteTaskSync through the gateway"):
        responses = sync_call(sync_stub, "py_sync", sync_inputs)
    assert_one_succeeded_header(responses, sync_inputs, "py_sync", fleet_output)

    # The Rust backend still serves its own types through the same gateway.
    rust_inputs = make_inputs(count=7, label="from Rust")
    with fleet_on_rpc_error(mixed_fleet, "echo round trip and echo_sync through the gateway"):
        rust_meta = async_round_trip(async_stub, "echo", ECHO, rust_inputs, fleet_output)
        responses = sync_call(sync_stub, "echo_sync", rust_inputs)
    assert rust_meta != py_meta
    assert_one_succeeded_header(responses, rust_inputs, "echo_sync", fleet_output)

    # Each backend really served its own types: pyflyte counted the py_echo calls
    # (flytekit's own metrics), and the gateway labelled requests per plugin.
    status, python_metrics = http_get(f"http://127.0.0.1:{mixed_fleet.python_metrics_port}/metrics")
    assert status == 200, f"pyflyte's metrics port answered HTTP {status}"
    for operation in ("create", "get", "delete"):
        assert re.search(
            rf'^flyte_(agent|connector)_requests_success_total\{{[^}}]*operation="{operation}"[^}}]*task_type="py_echo"',
            python_metrics,
            re.MULTILINE,
        ) or re.search(
            rf'^flyte_(agent|connector)_requests_success_total\{{[^}}]*task_type="py_echo"[^}}]*operation="{operation}"',
            python_metrics,
            re.MULTILINE,
        ), f"pyflyte did not count a successful py_echo {operation}:\n{python_metrics[:2000]}"
    _, gateway_metrics = http_get(f"http://{mixed_fleet.gateway_admin}/metrics")
    for plugin in ("python", "echo"):
        assert re.search(
            rf'^flotilla_gateway_requests_total\{{[^}}]*plugin="{plugin}"', gateway_metrics, re.MULTILINE
        ), f"gateway counted no request for plugin {plugin!r}"


def test_python_task_type_unknown_version_is_not_found(gateway):
    """Routing stays exact: py_echo version 1 is served by nobody."""
    stub = agent_pb2_grpc.AsyncAgentServiceStub(gateway)
    inputs = make_inputs(count=1, label="v1")
    template = make_template("py_echo")
    template.task_type_version = 1
    with pytest.raises(grpc.RpcError) as info:
        stub.CreateTask(
            agent_pb2.CreateTaskRequest(inputs=inputs, template=template, output_prefix=OUTPUT_PREFIX),
            timeout=RPC_TIMEOUT,
        )
    assert info.value.code() == grpc.StatusCode.NOT_FOUND, (
        f"expected NOT_FOUND, got {info.value.code().name}: {info.value.details()!r}"
    )
    assert "py_echo" in (info.value.details() or "")
