"""Databricks tasks serialized by the real flytekitplugins-spark go through the gateway
to flotilla-databricks, pointed at flotilla-fakes' Databricks workspace. The runs/submit
body it sends is compared with the one upstream's own connector builds from the same
template, live (flytekitplugins.spark.connector._get_databricks_job_spec)."""

from __future__ import annotations

import copy
import json
import time

import grpc
import pytest
from cloud import Phase, category, poll, serialize
from flyteidl.admin import agent_pb2
from flyteidl.core import identifier_pb2
from flytekit import task
from flytekit.models.task import TaskTemplate

INSTANCE = "dbc-interop.cloud.databricks.com"


def upstream_spec(template) -> dict:
    """What upstream's connector would POST for this template (it mutates its input: give it a copy)."""
    from flytekitplugins.spark.connector import _get_databricks_job_spec

    return _get_databricks_job_spec(TaskTemplate.from_flyte_idl(copy.deepcopy(template)))


def normalize(v):
    """Struct numbers are doubles on the wire; Flotilla sends integral ones as integers."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, list):
        return [normalize(x) for x in v]
    if isinstance(v, dict):
        return {k: normalize(x) for k, x in v.items()}
    return v


def metadata(attempt: int) -> agent_pb2.TaskExecutionMetadata:
    return agent_pb2.TaskExecutionMetadata(
        task_execution_id=identifier_pb2.TaskExecutionIdentifier(
            node_execution_id=identifier_pb2.NodeExecutionIdentifier(
                node_id="n0",
                execution_id=identifier_pb2.WorkflowExecutionIdentifier(
                    project="flytesnacks", domain="development", name=f"interop{time.monotonic_ns()}"
                ),
            ),
            retry_attempt=attempt,
        ),
        namespace="flytesnacks-development",
    )


def submits(fakes, since: int):
    return [
        r
        for r in fakes.requests("databricks")[since:]
        if r["method"] == "POST" and r["path"] == "/api/2.1/jobs/runs/submit"
    ]


def classic_task():
    from flytekitplugins.spark import DatabricksV2

    @task(
        task_config=DatabricksV2(
            spark_conf={"spark.driver.memory": "1000M"},
            databricks_conf={
                "run_name": "flotilla interop",
                "new_cluster": {"spark_version": "13.3.x-scala2.12", "node_type_id": "m6i.large", "num_workers": 2},
                "timeout_seconds": 3600,
            },
            databricks_instance=INSTANCE,
        )
    )
    def hello_spark(partitions: int) -> float:
        return float(partitions)

    return hello_spark


def test_databricks_task_from_flytekitplugins_spark_runs_through_the_gateway(async_stub, fakes):
    template = serialize(classic_task())
    assert template.type == "databricks"
    seen = len(fakes.requests("databricks"))
    created = async_stub.CreateTask(
        agent_pb2.CreateTaskRequest(
            template=template, output_prefix="s3://bucket/outputs/n0/0", task_execution_metadata=metadata(0)
        ),
        timeout=10,
    )
    meta = json.loads(created.resource_meta)
    assert set(meta) == {"databricks_instance", "run_id"}, "upstream's resource_meta fields, and no token"
    assert meta["databricks_instance"] == INSTANCE

    sent = submits(fakes, seen)
    assert len(sent) == 1
    headers = dict((k.lower(), v) for k, v in sent[0]["headers"])
    assert headers["authorization"] == "Bearer dapi-test-token"
    body = json.loads(sent[0]["body"])
    token = body.pop("idempotency_token")
    assert len(token) == 64
    assert body == normalize(upstream_spec(template))

    phases, final = poll(async_stub, "databricks", created.resource_meta)
    assert phases[-1] == Phase.SUCCEEDED, phases
    assert final.outputs.literals == {} or not final.HasField("outputs"), "the job writes outputs.pb itself"
    assert [(l.name, l.uri.split("/#job/")[0]) for l in final.log_links] == [
        ("Databricks Console", f"https://{INSTANCE}")
    ]
    assert final.log_links[0].uri.endswith(f"/run/{meta['run_id']}")

    async_stub.DeleteTask(
        agent_pb2.DeleteTaskRequest(
            task_type="databricks", task_category=category("databricks"), resource_meta=created.resource_meta
        ),
        timeout=10,
    )
    cancels = [r for r in fakes.requests("databricks")[seen:] if r["path"] == "/api/2.1/jobs/runs/cancel"]
    assert [json.loads(c["body"]) for c in cancels] == [{"run_id": int(meta["run_id"])}]


def test_spark_task_type_serverless_and_notebook_specs_match_upstream(async_stub, fakes):
    from flytekitplugins.spark import Databricks, DatabricksV2

    @task(task_config=Databricks(databricks_conf={"existing_cluster_id": "0123-abc"}, databricks_instance=INSTANCE))
    def legacy(n: int) -> int:
        return n

    @task(
        task_config=DatabricksV2(
            databricks_conf={"environment_key": "gpu"},
            databricks_instance=INSTANCE,
            databricks_service_credential_provider="acme",
        )
    )
    def serverless(n: int) -> int:
        return n

    @task(
        task_config=DatabricksV2(
            databricks_conf={"environment_key": "nb", "git_source": {"git_url": "https://github.com/acme/nb",
                                                                      "git_provider": "gitHub", "git_branch": "main"}},
            databricks_instance=INSTANCE,
            notebook_path="notebooks/report",
            notebook_base_parameters={"day": "monday"},
        )
    )
    def notebook(n: int) -> int:
        return n

    for attempt, t in enumerate([legacy, serverless, notebook], start=1):
        template = serialize(t)
        seen = len(fakes.requests("databricks"))
        created = async_stub.CreateTask(
            agent_pb2.CreateTaskRequest(template=template, task_execution_metadata=metadata(attempt)), timeout=10
        )
        assert json.loads(created.resource_meta)["databricks_instance"] == INSTANCE
        body = json.loads(submits(fakes, seen)[0]["body"])
        body.pop("idempotency_token")
        assert body == normalize(upstream_spec(template)), template.type


def test_runs_created_by_upstreams_connector_keep_being_polled(async_stub, fakes):
    """After switching from flytekit's connector, runs it created (its resource_meta carries
    its bearer token and auth type) are polled with the service's own credentials."""
    from flytekitplugins.spark.connector import DatabricksJobMetadata

    created = async_stub.CreateTask(
        agent_pb2.CreateTaskRequest(template=serialize(classic_task()), task_execution_metadata=metadata(9)),
        timeout=10,
    )
    run_id = json.loads(created.resource_meta)["run_id"]
    upstream_meta = DatabricksJobMetadata(
        databricks_instance=INSTANCE, run_id=run_id, auth_token="dapi-kept-by-upstream", auth_type="pat"
    ).encode()
    seen = len(fakes.requests("databricks"))
    _, final = poll(async_stub, "databricks", upstream_meta)
    assert final.phase == Phase.SUCCEEDED
    gets = fakes.requests("databricks")[seen:]
    assert gets and all(dict((k.lower(), v) for k, v in g["headers"])["authorization"] == "Bearer dapi-test-token"
                        for g in gets)


def test_a_template_without_databricks_conf_is_invalid_argument(async_stub):
    template = serialize(classic_task())
    del template.custom.fields["databricksConf"]
    with pytest.raises(grpc.RpcError) as err:
        async_stub.CreateTask(agent_pb2.CreateTaskRequest(template=template), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "custom.databricksConf" in err.value.details()
