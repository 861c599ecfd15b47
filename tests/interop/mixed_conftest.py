"""Fixtures for test_mixed_fleet.py: a gateway in front of a Rust and a Python backend.

The fleet is assembled from separate processes, the way an operator deploys it:

- the UNMODIFIED upstream agent server, `pyflyte serve agent` from flytekit,
  loading the agents in `upstream_agents/fleet_agents.py` (py_echo, py_sync);
- `flotilla-echo`, the Rust echo plugin service (echo, echo_sync);
- `flotilla-gateway`, with `FLOTILLA_PLUGINS` pointing `echo` at the first and
  `python` at the second.

Binaries: `$FLOTILLA_GATEWAY_BIN` / `$FLOTILLA_ECHO_BIN`, else
`<repo>/target/debug/flotilla-{gateway,echo}`. `pyflyte` is the one installed
next to the running interpreter (the suite's venv), else the one on PATH.

Every wait is bounded; every child's output is drained on a thread for its
whole life (and shown when something fails); every child is killed at teardown.
The test module imports the `mixed_fleet` fixture from here.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flyteidl.admin import agent_pb2
from flyteidl.service import agent_pb2_grpc
from pump import LinePump

INTEROP_DIR = Path(__file__).resolve().parent
REPO_ROOT = INTEROP_DIR.parents[1]
AGENT_MODULE = "upstream_agents.fleet_agents"
# flytekit 1.16 still has `pyflyte serve agent` (deprecated in favour of
# `serve connector`, same server); this is the command upstream charts run.
PYFLYTE_SERVE = ("serve", "agent")

PYFLYTE_STARTUP_TIMEOUT_S = 60.0  # ~1 s warm here; importing flytekit on a cold, busy machine is slower
RUST_STARTUP_TIMEOUT_S = 30.0
ROUTES_TIMEOUT_S = 20.0
SHUTDOWN_TIMEOUT_S = 10.0
PROBE_TIMEOUT_S = 2.0
POLL_INTERVAL_S = 0.1
REFRESH_INTERVAL = "500ms"
OUTPUT_TAIL_LINES = 300

_SOME = re.compile(r"^Some\((?P<addr>.*)\)$")
# Never let an ambient http(s)_proxy setting divert loopback traffic.
GRPC_OPTIONS = [("grpc.enable_http_proxy", 0)]
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Child:
    """One started process with its drained output."""

    name: str
    argv: List[str]
    process: subprocess.Popen
    output: LinePump
    retired: bool = False  # exited during startup and replaced by a new attempt

    def describe(self) -> str:
        rc = self.process.poll()
        state = "running" if rc is None else f"exited with code {rc}"
        return (
            f"=== {self.name}{' (retired)' if self.retired else ''}: {' '.join(self.argv)}\n"
            f"process: {state}\n--- output (tail) ---\n{self.output.tail()}"
        )

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=SHUTDOWN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=SHUTDOWN_TIMEOUT_S)
        self.output.join(2.0)


@dataclass
class MixedFleet:
    gateway_grpc: str = ""
    gateway_admin: str = ""
    echo_grpc: str = ""
    echo_admin: str = ""
    python_grpc: str = ""
    python_metrics_port: int = 0
    children: List[Child] = field(default_factory=list)

    def describe(self) -> str:
        return "\n".join(child.describe() for child in self.children)

    def live_children(self) -> List[Child]:
        """The children that are meant to be running (not retired startup attempts)."""
        return [child for child in self.children if not child.retired]

    def fail(self, message: str) -> None:
        pytest.fail(f"{message}\n{self.describe()}", pytrace=False)


def free_port() -> int:
    """A loopback port that was free a moment ago (bind port 0, read it, close).

    Only for pyflyte, which cannot be told to pick its own port and does not
    print the one it bound; the Rust binaries get port 0 and report theirs.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _binary(env_var: str, name: str) -> Path:
    configured = os.environ.get(env_var)
    path = Path(configured).expanduser().resolve() if configured else REPO_ROOT / "target" / "debug" / name
    if not path.is_file() or not os.access(path, os.X_OK):
        source = env_var if configured else "default location"
        pytest.fail(
            f"{name} executable not found at {path} ({source}); build it with "
            f"`cargo build --bins` or set {env_var}",
            pytrace=False,
        )
    return path


def _pyflyte() -> Path:
    beside = Path(sys.executable).parent / "pyflyte"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("pyflyte")
    if found:
        return Path(found)
    pytest.fail(
        "pyflyte not found next to the running Python nor on PATH: install "
        "tests/interop/requirements.txt (it pins flytekit), e.g. with scripts/setup-python",
        pytrace=False,
    )
    raise AssertionError("unreachable")


def _start(fleet: MixedFleet, name: str, argv: List[str], env: Dict[str, str], cwd: Path) -> Child:
    process = subprocess.Popen(
        argv,
        cwd=str(cwd),
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    child = Child(name=name, argv=argv, process=process, output=LinePump(process.stdout, f"{name}-output", tail_lines=OUTPUT_TAIL_LINES))
    fleet.children.append(child)
    return child


def _rust_env(**extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOTILLA_")}
    env.update(NO_COLOR="1", RUST_BACKTRACE="1", RUST_LOG="info")
    env.update(extra)
    return env


def _wait_listening(fleet: MixedFleet, child: Child, deadline: float) -> Dict[str, str]:
    """Reads the child's JSON log lines until its "<binary> listening" event.

    Both Rust binaries log `{"fields": {"message": "... listening", "grpc": ..., "admin": ...}}`
    once they have bound their (port 0) listeners; the gateway wraps addresses in `Some(...)`.
    """
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            fleet.fail(f"{child.name} did not log its listening addresses in time")
        try:
            line = child.output.next_line(timeout=min(remaining, 0.5))
        except queue.Empty:
            if not child.alive():
                child.output.join(1.0)
                fleet.fail(f"{child.name} exited during startup")
            continue
        if line is None:
            fleet.fail(f"{child.name} closed its output during startup")
        try:
            event = json.loads(line)
        except ValueError:
            continue
        fields = event.get("fields", {}) if isinstance(event, dict) else {}
        if str(fields.get("message", "")).endswith("listening") and "grpc" in fields and "admin" in fields:
            addrs = {}
            for key in ("grpc", "admin"):
                value = str(fields[key])
                match = _SOME.match(value)
                addrs[key] = match["addr"] if match else value
            return addrs


def http_get(url: str, timeout: float = PROBE_TIMEOUT_S):
    """GET without proxies; returns (status, body_text)."""
    try:
        with _HTTP.open(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode("utf-8", "replace")


def _wait_readyz(fleet: MixedFleet, child: Child, admin: str, deadline: float) -> None:
    url = f"http://{admin}/readyz"
    last = "no answer yet"
    while True:
        if not child.alive():
            fleet.fail(f"{child.name} exited while waiting for {url}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            fleet.fail(f"{url} did not answer 200 in time (last: {last})")
        try:
            status, body = http_get(url, timeout=min(remaining, PROBE_TIMEOUT_S))
            if status == 200:
                return
            last = f"HTTP {status}: {body[:200]!r}"
        except OSError as err:
            last = repr(err)
        time.sleep(min(POLL_INTERVAL_S, max(deadline - time.monotonic(), 0)))


def wait_until(
    fleet: MixedFleet,
    what: str,
    probe: Callable[[], Optional[str]],
    deadline: float,
) -> None:
    """Polls `probe` (None = done, else a description of why not yet) until `deadline`."""
    last = "not probed yet"
    while True:
        for child in fleet.live_children():
            if not child.alive():
                fleet.fail(f"{child.name} exited while waiting for {what} (last: {last})")
        last = probe() or ""
        if not last:
            return
        if time.monotonic() >= deadline:
            fleet.fail(f"timed out waiting for {what} (last: {last})")
        time.sleep(min(POLL_INTERVAL_S, max(deadline - time.monotonic(), 0)))


def _probe_python_backend(target: str, expected: set) -> Callable[[], Optional[str]]:
    """Health SERVING, then ListAgents naming every expected (task type, version)."""

    def probe() -> Optional[str]:
        chan = grpc.insecure_channel(target, options=GRPC_OPTIONS)
        try:
            health = health_pb2_grpc.HealthStub(chan).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=PROBE_TIMEOUT_S
            )
            if health.status != health_pb2.HealthCheckResponse.SERVING:
                return f"health {health_pb2.HealthCheckResponse.ServingStatus.Name(health.status)}"
            agents = agent_pb2_grpc.AgentMetadataServiceStub(chan).ListAgents(
                agent_pb2.ListAgentsRequest(), timeout=PROBE_TIMEOUT_S
            ).agents
            listed = {(c.name, c.version) for a in agents for c in a.supported_task_categories}
            missing = expected - listed
            return f"ListAgents lacks {sorted(missing)} (has {sorted(listed)})" if missing else None
        except grpc.RpcError as err:
            return f"{err.code().name}: {err.details()}"
        finally:
            chan.close()

    return probe


def listed_categories(target: str) -> set:
    chan = grpc.insecure_channel(target, options=GRPC_OPTIONS)
    try:
        agents = agent_pb2_grpc.AgentMetadataServiceStub(chan).ListAgents(
            agent_pb2.ListAgentsRequest(), timeout=PROBE_TIMEOUT_S
        ).agents
        return {(c.name, c.version) for a in agents for c in a.supported_task_categories}
    finally:
        chan.close()


def _pyflyte_env() -> Dict[str, str]:
    """The server talks to no Flyte backend; make sure no ambient config points it at one."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith("FLYTE") or k.startswith("UCTL") or k.startswith("FLOTILLA_"))
    }
    pythonpath = [str(INTEROP_DIR)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env.update(
        PYTHONPATH=os.pathsep.join(pythonpath),  # `--modules upstream_agents.fleet_agents`
        PYTHONUNBUFFERED="1",  # lines reach the pump as they are printed
        PYTHONDONTWRITEBYTECODE="1",  # no __pycache__ left under tests/interop
        NO_COLOR="1",
        COLUMNS="160",  # rich's startup table, not wrapped
        FLYTE_SDK_LOGGING_LEVEL="20",  # INFO: one line per CreateTask/GetTask/DeleteTask
    )
    return env


PYFLYTE_START_ATTEMPTS = 3  # a port picked by free_port() can be taken before pyflyte binds it


def _start_pyflyte(fleet: MixedFleet, pyflyte: Path) -> Child:
    port, metrics_port = free_port(), free_port()
    while metrics_port == port:
        metrics_port = free_port()
    fleet.python_grpc = f"127.0.0.1:{port}"
    fleet.python_metrics_port = metrics_port
    argv = [
        str(pyflyte), *PYFLYTE_SERVE,
        "--port", str(port),
        "--prometheus_port", str(metrics_port),
        "--modules", AGENT_MODULE,
    ]
    return _start(fleet, "pyflyte", argv, _pyflyte_env(), INTEROP_DIR)


def _wait_pyflyte(fleet: MixedFleet, python: Child, pyflyte: Path) -> Child:
    """Waits (bounded) for gRPC health SERVING and ListAgents naming py_echo and py_sync.

    pyflyte cannot pick its own ports, so the ones chosen for it may have been
    taken meanwhile: when it exits during startup it is started again on new
    ports, at most PYFLYTE_START_ATTEMPTS times in all.
    """
    expected = {("py_echo", 0), ("py_sync", 0)}
    for attempt in range(1, PYFLYTE_START_ATTEMPTS + 1):
        probe = _probe_python_backend(fleet.python_grpc, expected)
        deadline = time.monotonic() + PYFLYTE_STARTUP_TIMEOUT_S
        last = "not probed yet"
        while python.alive():
            last = probe() or ""
            if not last:
                return python
            if time.monotonic() >= deadline:
                fleet.fail(
                    f"pyflyte did not serve on {fleet.python_grpc} within "
                    f"{PYFLYTE_STARTUP_TIMEOUT_S:.0f} s (last: {last})"
                )
            time.sleep(min(POLL_INTERVAL_S, max(deadline - time.monotonic(), 0)))
        python.output.join(1.0)
        python.retired = True
        if attempt == PYFLYTE_START_ATTEMPTS:
            fleet.fail(f"pyflyte exited during startup {attempt} times (last probe: {last})")
        python = _start_pyflyte(fleet, pyflyte)
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def mixed_fleet() -> Iterator[MixedFleet]:
    """pyflyte (py_echo, py_sync) + flotilla-echo (echo, echo_sync) behind flotilla-gateway."""
    gateway_bin = _binary("FLOTILLA_GATEWAY_BIN", "flotilla-gateway")
    echo_bin = _binary("FLOTILLA_ECHO_BIN", "flotilla-echo")
    pyflyte = _pyflyte()
    fleet = MixedFleet()
    try:
        # 1. The upstream Python agent server (slowest to start, so first).
        python = _start_pyflyte(fleet, pyflyte)

        # 2. The Rust echo plugin service, meanwhile.
        echo = _start(
            fleet,
            "flotilla-echo",
            [str(echo_bin), "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--log-format", "json"],
            _rust_env(),
            REPO_ROOT,
        )
        addrs = _wait_listening(fleet, echo, time.monotonic() + RUST_STARTUP_TIMEOUT_S)
        fleet.echo_grpc, fleet.echo_admin = addrs["grpc"], addrs["admin"]
        _wait_readyz(fleet, echo, fleet.echo_admin, time.monotonic() + RUST_STARTUP_TIMEOUT_S)

        _wait_pyflyte(fleet, python, pyflyte)

        # 3. The gateway, in front of both.
        plugins = f"echo=static://{fleet.echo_grpc};python=static://{fleet.python_grpc}"
        gateway = _start(
            fleet,
            "flotilla-gateway",
            [str(gateway_bin), "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--log-format", "json"],
            _rust_env(FLOTILLA_PLUGINS=plugins, FLOTILLA_REFRESH_INTERVAL=REFRESH_INTERVAL),
            REPO_ROOT,
        )
        deadline = time.monotonic() + RUST_STARTUP_TIMEOUT_S
        addrs = _wait_listening(fleet, gateway, deadline)
        fleet.gateway_grpc, fleet.gateway_admin = addrs["grpc"], addrs["admin"]
        _wait_readyz(fleet, gateway, fleet.gateway_admin, deadline)

        # /readyz says the gateway serves; its routes come from polling each
        # backend's ListAgents. Wait (bounded) until both backends' types route.
        expected = {("echo", 0), ("echo_sync", 0), ("py_echo", 0), ("py_sync", 0)}

        def routes_known() -> Optional[str]:
            try:
                missing = expected - listed_categories(fleet.gateway_grpc)
            except grpc.RpcError as err:
                return f"{err.code().name}: {err.details()}"
            return f"gateway ListAgents lacks {sorted(missing)}" if missing else None

        wait_until(fleet, "the gateway to learn every backend's task types", routes_known,
                   time.monotonic() + ROUTES_TIMEOUT_S)
    except BaseException:
        for child in reversed(fleet.children):
            child.stop()
        raise
    for child in fleet.children:
        child.output.stop_forwarding()

    yield fleet

    died = [child.name for child in fleet.live_children() if not child.alive()]
    for child in reversed(fleet.children):
        child.stop()
    if died:
        fleet.fail(f"{', '.join(died)} died during the test")
