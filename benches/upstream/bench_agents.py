"""The upstream side of Flotilla's benchmark: echo agents for flytekit's own server.

Served by the unmodified `pyflyte serve agent --modules bench_agents` (run from
this directory, or with it on PYTHONPATH). They do what Flotilla's Rust echo
plugin does, under the same task type names, so one set of benchmark requests
works against every target:

- `echo` (async, version 0): CreateTask returns an `EchoMeta` carrying the
  request's inputs (a flytekit `ResourceMeta` dataclass, which flytekit encodes
  as JSON); GetTask answers SUCCEEDED with outputs equal to those inputs;
  DeleteTask does nothing. Stateless: everything GetTask needs travels in
  `resource_meta`.
- `echo_sync` (sync, version 0): ExecuteTaskSync answers SUCCEEDED with outputs
  equal to the inputs.

pyflyte also registers its built-in `sensor` and `webhook` agents, so its
ListAgents answers four agents. Only flytekit's public agent (connector) API is
used; the code is what a plugin author would write.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Optional

from flyteidl.core import literals_pb2
from flyteidl.core.execution_pb2 import TaskExecution

from flytekit.extend.backend.base_connector import (
    AsyncConnectorBase,
    ConnectorRegistry,
    Resource,
    ResourceMeta,
    SyncConnectorBase,
)
from flytekit.models.literals import LiteralMap
from flytekit.models.task import TaskExecutionMetadata, TaskTemplate

ECHO = "echo"
ECHO_SYNC = "echo_sync"


@dataclass
class EchoMeta(ResourceMeta):
    """What GetTask needs. flytekit encodes it as `json.dumps(dataclasses.asdict(meta))`,
    so the inputs travel as base64 of the serialized LiteralMap proto."""

    inputs_b64: str = ""

    @staticmethod
    def of(inputs: Optional[LiteralMap]) -> "EchoMeta":
        raw = inputs.to_flyte_idl().SerializeToString() if inputs is not None else b""
        return EchoMeta(inputs_b64=base64.b64encode(raw).decode("ascii"))

    def inputs(self) -> LiteralMap:
        pb = literals_pb2.LiteralMap()
        pb.ParseFromString(base64.b64decode(self.inputs_b64))
        return LiteralMap.from_flyte_idl(pb)


class EchoAgent(AsyncConnectorBase):
    name = "Echo Agent"

    def __init__(self) -> None:
        super().__init__(task_type_name=ECHO, task_type_version=0, metadata_type=EchoMeta)

    async def create(
        self,
        task_template: TaskTemplate,
        output_prefix: str,
        inputs: Optional[LiteralMap] = None,
        task_execution_metadata: Optional[TaskExecutionMetadata] = None,
        **kwargs,
    ) -> EchoMeta:
        return EchoMeta.of(inputs)

    async def get(self, resource_meta: EchoMeta, **kwargs) -> Resource:
        return Resource(phase=TaskExecution.SUCCEEDED, outputs=resource_meta.inputs())

    async def delete(self, resource_meta: EchoMeta, **kwargs) -> None:
        return None


class EchoSyncAgent(SyncConnectorBase):
    name = "Echo Sync Agent"

    def __init__(self) -> None:
        super().__init__(task_type_name=ECHO_SYNC, task_type_version=0)

    async def do(
        self,
        task_template: TaskTemplate,
        output_prefix: str,
        inputs: Optional[LiteralMap] = None,
        **kwargs,
    ) -> Resource:
        return Resource(
            phase=TaskExecution.SUCCEEDED,
            outputs=inputs if inputs is not None else LiteralMap(literals={}),
        )


ConnectorRegistry.register(EchoAgent())
ConnectorRegistry.register(EchoSyncAgent())
