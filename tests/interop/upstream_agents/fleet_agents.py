"""Two small agents written against upstream flytekit's own agent API.

Served by the unmodified `pyflyte serve agent --modules upstream_agents.fleet_agents`
as one more backend behind `flotilla-gateway` (tests/interop/test_mixed_fleet.py).
Importing this module registers both agents with flytekit's registry, which is
all `pyflyte serve` looks at:

- `py_echo` (async, task type "py_echo" version 0): CreateTask returns a
  `PyEchoMeta` carrying the request's inputs; GetTask answers SUCCEEDED with
  outputs equal to those inputs; DeleteTask does nothing. Stateless, like the
  Rust echo plugin: everything GetTask needs travels in `resource_meta`, so any
  replica answers for a task another one created.
- `py_sync` (sync, task type "py_sync" version 0): ExecuteTaskSync answers
  SUCCEEDED with outputs equal to the inputs.

Only flytekit's public agent classes are used (the `connector` names; the
`agent` names in `flytekit.extend.backend.base_agent` are aliases of them).
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

PY_ECHO = "py_echo"
PY_SYNC = "py_sync"


def _empty() -> LiteralMap:
    return LiteralMap(literals={})


@dataclass
class PyEchoMeta(ResourceMeta):
    """What GetTask needs, JSON-encoded by flytekit's `ResourceMeta.encode`.

    flytekit encodes resource metadata as `json.dumps(dataclasses.asdict(meta))`
    and decodes it with `dataclass_from_dict`, so fields must be JSON types:
    the inputs travel as a base64 string of the serialized LiteralMap proto.
    """

    inputs_b64: str = ""
    task_name: str = ""

    @staticmethod
    def of(inputs: Optional[LiteralMap], task_name: str) -> "PyEchoMeta":
        raw = inputs.to_flyte_idl().SerializeToString() if inputs is not None else b""
        return PyEchoMeta(inputs_b64=base64.b64encode(raw).decode("ascii"), task_name=task_name)

    def inputs(self) -> LiteralMap:
        pb = literals_pb2.LiteralMap()
        pb.ParseFromString(base64.b64decode(self.inputs_b64))
        return LiteralMap.from_flyte_idl(pb)


class PyEchoAgent(AsyncConnectorBase):
    name = "Python Echo Agent"

    def __init__(self) -> None:
        super().__init__(task_type_name=PY_ECHO, task_type_version=0, metadata_type=PyEchoMeta)

    async def create(
        self,
        task_template: TaskTemplate,
        output_prefix: str,
        inputs: Optional[LiteralMap] = None,
        task_execution_metadata: Optional[TaskExecutionMetadata] = None,
        **kwargs,
    ) -> PyEchoMeta:
        return PyEchoMeta.of(inputs, task_template.id.name if task_template.id else "")

    async def get(self, resource_meta: PyEchoMeta, **kwargs) -> Resource:
        return Resource(
            phase=TaskExecution.SUCCEEDED,
            message=f"echoed by flytekit ({resource_meta.task_name})",
            outputs=resource_meta.inputs(),
        )

    async def delete(self, resource_meta: PyEchoMeta, **kwargs) -> None:
        return None


class PySyncAgent(SyncConnectorBase):
    name = "Python Sync Agent"

    def __init__(self) -> None:
        super().__init__(task_type_name=PY_SYNC, task_type_version=0)

    async def do(
        self,
        task_template: TaskTemplate,
        output_prefix: str,
        inputs: Optional[LiteralMap] = None,
        **kwargs,
    ) -> Resource:
        return Resource(
            phase=TaskExecution.SUCCEEDED,
            message="echoed by flytekit (sync)",
            outputs=inputs if inputs is not None else _empty(),
        )


ConnectorRegistry.register(PyEchoAgent())
ConnectorRegistry.register(PySyncAgent())
