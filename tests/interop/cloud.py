"""Helpers shared by the cloud plugin interop tests: serialize a task the way
`pyflyte register` does, make its inputs with flytekit's type engine, and poll
GetTask through the gateway until a terminal phase, within a bound."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import List, Tuple

import pytest
from flyteidl.admin import agent_pb2
from flyteidl.core import execution_pb2
from flytekit import FlyteContextManager
from flytekit.configuration import ImageConfig, SerializationSettings
from flytekit.core.type_engine import TypeEngine
from flytekit.tools.translator import get_serializable

Phase = execution_pb2.TaskExecution
POLL_BOUND_S = 15.0
TERMINAL = (Phase.SUCCEEDED, Phase.FAILED, Phase.RETRYABLE_FAILED, Phase.ABORTED)
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
        if resource.phase in TERMINAL:
            return phases, resource
    pytest.fail(f"no terminal phase within {POLL_BOUND_S} s; phases seen: {phases}")
