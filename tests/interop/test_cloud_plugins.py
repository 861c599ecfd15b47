"""Task templates serialized by upstream's own plugins (flytekitplugins-bigquery,
-spark, -snowflake from PyPI: what `pyflyte register` sends to Flyte) go through
the gateway to Flotilla's cloud plugin services, which are pointed at the fake
APIs of `flotilla-fakes`. Each test checks the API calls the fake received and
the `Resource` that comes back, as propeller would read it."""

from __future__ import annotations

import json
from typing import List

import grpc
import pytest
from cloud import Phase, category, inputs, poll, serialize
from flyteidl.admin import agent_pb2
from flytekit import StructuredDataset, kwtypes


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


# --------------------------------------------------------------- Snowflake


def _snowflake_task(name: str, query: str, inputs=None, outputs: bool = True):
    from flytekitplugins.snowflake import SnowflakeConfig, SnowflakeTask

    return SnowflakeTask(
        name=name,
        inputs=inputs,
        output_schema_type=StructuredDataset if outputs else None,
        task_config=SnowflakeConfig(
            user="FLYTE", account="myorg-myacct", database="DB", schema="PUBLIC", warehouse="WH"
        ),
        query_template=query,
    )


def test_snowflake_task_from_flytekitplugins_runs_through_the_gateway(async_stub, fakes):
    task = _snowflake_task(
        "flotilla.interop.snowflake",
        "SELECT * FROM t WHERE id = %(id)s AND name = %(name)s",
        inputs=kwtypes(id=int, name=str),
    )
    template = serialize(task)
    assert template.type == "snowflake"
    seen = len(fakes.requests("snowflake"))

    created = async_stub.CreateTask(
        agent_pb2.CreateTaskRequest(
            inputs=inputs(task, id=7, name="x'); DROP TABLE t; --"),
            template=template,
            output_prefix="s3://bucket/out",
        ),
        timeout=10,
    )
    meta = json.loads(created.resource_meta)
    query_id = meta["query_id"]
    # upstream's fields, in upstream's spelling
    assert meta == {
        "user": "FLYTE",
        "account": "myorg-myacct",
        "database": "DB",
        "schema": "PUBLIC",
        "warehouse": "WH",
        "query_id": query_id,
        "has_output": True,
    }

    submits = [
        r
        for r in new_requests(fakes, "snowflake", seen)
        if r["method"] == "POST" and r["path"] == "/api/v2/statements"
    ]
    assert len(submits) == 1
    query = dict(submits[0]["query"])
    assert query["async"] == "true" and query["retry"] == "true" and len(query["requestId"]) == 36
    headers = dict((k.lower(), v) for k, v in submits[0]["headers"])
    assert headers["x-snowflake-authorization-token-type"] == "KEYPAIR_JWT"
    assert headers["authorization"].startswith("Bearer ")
    body = json.loads(submits[0]["body"])
    assert body["statement"] == "SELECT * FROM t WHERE id = ? AND name = ?"
    assert body["bindings"] == {
        "1": {"type": "FIXED", "value": "7"},
        "2": {"type": "TEXT", "value": "x'); DROP TABLE t; --"},
    }
    assert (body["database"], body["schema"], body["warehouse"]) == ("DB", "PUBLIC", "WH")

    phases, final = poll(async_stub, "snowflake", created.resource_meta)
    assert phases[-1] == Phase.SUCCEEDED and Phase.RUNNING in phases, phases
    dataset = final.outputs.literals["results"].scalar.structured_dataset
    assert dataset.uri == f"snowflake://FLYTE:myorg-myacct/WH/DB/PUBLIC/{query_id}"
    assert [l.name for l in final.log_links] == ["Snowflake Query Details"]
    assert query_id in final.log_links[0].uri


def test_snowflake_delete_cancels_and_upstream_meta_is_read(async_stub, fakes):
    task = _snowflake_task("flotilla.interop.snowflake_cancel", "SELECT 1", outputs=False)
    created = async_stub.CreateTask(agent_pb2.CreateTaskRequest(template=serialize(task)), timeout=10)
    meta = json.loads(created.resource_meta)
    assert meta["has_output"] is False
    seen = len(fakes.requests("snowflake"))
    async_stub.DeleteTask(
        agent_pb2.DeleteTaskRequest(
            task_type="snowflake", task_category=category("snowflake"), resource_meta=created.resource_meta
        ),
        timeout=10,
    )
    cancels = [r for r in new_requests(fakes, "snowflake", seen) if r["path"].endswith("/cancel")]
    assert [c["path"] for c in cancels] == [f"/api/v2/statements/{meta['query_id']}/cancel"]

    # The meta upstream's connector writes for the same statement is polled as is.
    from flytekitplugins.snowflake.connector import SnowflakeJobMetadata

    upstream = SnowflakeJobMetadata(
        user="FLYTE",
        account="myorg-myacct",
        database="DB",
        schema="PUBLIC",
        warehouse="WH",
        query_id=meta["query_id"],
        has_output=False,
    ).encode()
    _, final = poll(async_stub, "snowflake", upstream)
    assert final.phase in (Phase.ABORTED, Phase.FAILED), final
