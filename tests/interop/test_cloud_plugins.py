"""Task templates serialized by upstream's own plugins (flytekitplugins-bigquery,
-spark, -snowflake from PyPI: what `pyflyte register` sends to Flyte) go through
the gateway to Flotilla's cloud plugin services, which are pointed at the fake
APIs of `flotilla-fakes`. Each test checks the API calls the fake received and
the `Resource` that comes back, as propeller would read it."""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from typing import List, Tuple

import grpc
import pytest
from flyteidl.admin import agent_pb2
from flyteidl.core import execution_pb2
from flytekit import FlyteContextManager, StructuredDataset, kwtypes
from flytekit.configuration import ImageConfig, SerializationSettings
from flytekit.core.type_engine import TypeEngine
from flytekit.tools.translator import get_serializable

Phase = execution_pb2.TaskExecution
POLL_BOUND_S = 15.0
SETTINGS = SerializationSettings(
    image_config=ImageConfig.auto_default_image(), project="flytesnacks", domain="development", version="v1"
)


def serialize(task):
    """The TaskTemplate protobuf flytekit would register for `task`."""
    return get_serializable(OrderedDict(), SETTINGS, task).template.to_flyte_idl()


def inputs(task, **values):
    """The inputs LiteralMap propeller would send, made by flytekit's type engine."""
    ctx = FlyteContextManager.current_context()
    return TypeEngine.dict_to_literal_map(ctx, values, task.python_interface.inputs).to_flyte_idl()


def category(name: str) -> agent_pb2.TaskCategory:
    return agent_pb2.TaskCategory(name=name, version=0)


def poll(async_stub, task_type: str, meta: bytes) -> Tuple[List[int], agent_pb2.Resource]:
    """GetTask until a terminal phase (bounded); the phases seen and the last resource."""
    phases: List[int] = []
    deadline = time.monotonic() + POLL_BOUND_S
    while time.monotonic() < deadline:
        resource = async_stub.GetTask(
            agent_pb2.GetTaskRequest(task_type=task_type, task_category=category(task_type), resource_meta=meta),
            timeout=3,
        ).resource
        phases.append(resource.phase)
        if resource.phase in (Phase.SUCCEEDED, Phase.FAILED, Phase.RETRYABLE_FAILED, Phase.ABORTED):
            return phases, resource
    pytest.fail(f"no terminal phase within {POLL_BOUND_S} s; phases seen: {phases}")


def new_requests(fakes, name: str, since: int) -> List[dict]:
    return fakes.requests(name)[since:]


# ---------------------------------------------------------------- BigQuery


def test_bigquery_task_from_flytekitplugins_runs_through_the_gateway(async_stub, fakes):
    from google.cloud import bigquery
    from flytekitplugins.bigquery import BigQueryConfig, BigQueryTask

    task = BigQueryTask(
        name="flotilla.interop.bigquery",
        inputs=kwtypes(version=int, name=str),
        output_structured_dataset_type=StructuredDataset,
        task_config=BigQueryConfig(
            ProjectID="flyte-project",
            Location="EU",
            QueryJobConfig=bigquery.QueryJobConfig(priority="BATCH", maximum_bytes_billed=10**9),
        ),
        query_template="SELECT * FROM t WHERE v = @version AND n = @name",
    )
    template = serialize(task)
    assert template.type == "bigquery_query_job_task"
    seen = len(fakes.requests("bigquery"))

    created = async_stub.CreateTask(
        agent_pb2.CreateTaskRequest(
            inputs=inputs(task, version=3, name="x"), template=template, output_prefix="s3://bucket/out"
        ),
        timeout=10,
    )
    meta = json.loads(created.resource_meta)
    assert set(meta) == {"job_id", "project", "location"}, "upstream's resource_meta fields, nothing else"
    assert (meta["project"], meta["location"]) == ("flyte-project", "EU")

    inserts = [
        r
        for r in new_requests(fakes, "bigquery", seen)
        if r["method"] == "POST" and r["path"] == "/bigquery/v2/projects/flyte-project/jobs"
    ]
    assert len(inserts) == 1
    body = json.loads(inserts[0]["body"])
    assert body["jobReference"] == {"projectId": "flyte-project", "jobId": meta["job_id"], "location": "EU"}
    query = body["configuration"]["query"]
    assert query["query"] == "SELECT * FROM t WHERE v = @version AND n = @name"
    assert query["useLegacySql"] is False
    assert sorted(query["queryParameters"], key=lambda p: p["name"]) == [
        {"name": "name", "parameterType": {"type": "STRING"}, "parameterValue": {"value": "x"}},
        {"name": "version", "parameterType": {"type": "INT64"}, "parameterValue": {"value": "3"}},
    ]
    # The QueryJobConfig keys flytekit put in `custom` reach BigQuery (upstream's agent drops them).
    assert query["priority"] == "BATCH"
    assert query["maximumBytesBilled"] == "1000000000"
    headers = dict((k.lower(), v) for k, v in inserts[0]["headers"])
    assert headers["authorization"].startswith("Bearer ya29.fake-")

    phases, final = poll(async_stub, "bigquery_query_job_task", created.resource_meta)
    assert phases[:3] == [Phase.INITIALIZING, Phase.RUNNING, Phase.SUCCEEDED], phases
    dataset = final.outputs.literals["results"].scalar.structured_dataset
    assert dataset.uri == f"bq://flyte-project:_anon_fake.anon_{meta['job_id']}"
    assert [(l.name, l.uri) for l in final.log_links] == [
        (
            "BigQuery Console",
            "https://console.cloud.google.com/bigquery?project=flyte-project"
            f"&j=bq:EU:{meta['job_id']}&page=queryresults",
        )
    ]

    async_stub.DeleteTask(
        agent_pb2.DeleteTaskRequest(
            task_type="bigquery_query_job_task",
            task_category=category("bigquery_query_job_task"),
            resource_meta=created.resource_meta,
        ),
        timeout=10,
    )
    cancels = [r for r in new_requests(fakes, "bigquery", seen) if r["path"].endswith(f"/jobs/{meta['job_id']}/cancel")]
    assert len(cancels) == 1


def test_bigquery_reads_resource_meta_written_by_upstreams_agent(async_stub, fakes):
    """After switching from flytekit's agent, tasks it created keep being polled: its
    resource_meta encoding is read as is."""
    from flytekitplugins.bigquery.connector import BigQueryMetadata
    from flytekitplugins.bigquery import BigQueryConfig, BigQueryTask

    task = BigQueryTask(
        name="flotilla.interop.bigquery_switch",
        inputs=None,
        task_config=BigQueryConfig(ProjectID="flyte-project", Location="US"),
        query_template="SELECT 1",
    )
    created = async_stub.CreateTask(agent_pb2.CreateTaskRequest(template=serialize(task)), timeout=10)
    job_id = json.loads(created.resource_meta)["job_id"]
    upstream_meta = BigQueryMetadata(job_id=job_id, project="flyte-project", location="US").encode()
    _, final = poll(async_stub, "bigquery_query_job_task", upstream_meta)
    assert final.phase == Phase.SUCCEEDED


def test_bigquery_without_project_is_invalid_argument(async_stub):
    template = agent_pb2.CreateTaskRequest().template
    template.type = "bigquery_query_job_task"
    template.sql.statement = "SELECT 1"
    with pytest.raises(grpc.RpcError) as err:
        async_stub.CreateTask(agent_pb2.CreateTaskRequest(template=template), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "custom.ProjectID" in err.value.details()
