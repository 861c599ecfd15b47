"""Fixtures for the Flotilla interop suite.

One real fleet (`flotilla up`) is started per test session, on free loopback
ports, and shut down with SIGINT at the end; the shutdown must be graceful
(exit code 0). Tests reach it only through the upstream flyteidl Python stubs,
the standard gRPC health stubs and plain HTTP on the admin ports.

The binary is `$FLOTILLA_BIN` when set, else `<repo>/target/debug/flotilla`.

An already running fleet (the compose stack, a cluster) is tested instead when
all four of FLOTILLA_GATEWAY, FLOTILLA_GATEWAY_ADMIN, FLOTILLA_ECHO and
FLOTILLA_ECHO_ADMIN are set (host:port each; ECHO is one echo replica, reached
directly). Nothing is started or stopped then; the fixture waits (bounded) for
both admin ports to answer /readyz 200.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import json

import grpc
import pytest
from flyteidl.service import agent_pb2_grpc
from pump import LinePump

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BIN = REPO_ROOT / "target" / "debug" / "flotilla"

STARTUP_TIMEOUT_S = 30.0
SHUTDOWN_TIMEOUT_S = 10.0
CHANNEL_READY_TIMEOUT_S = 10.0
HTTP_TIMEOUT_S = 10.0
READY_POLL_INTERVAL_S = 0.1
OUTPUT_TAIL_LINES = 200

# `flotilla up` output contract, one line per service and then the "up" line:
#   gateway  grpc=127.0.0.1:41234  admin=127.0.0.1:41235
#   echo     grpc=127.0.0.1:41236  admin=127.0.0.1:41237
#   flotilla is up: point propeller's agent-service at 127.0.0.1:41234 (Ctrl-C to stop)
_SERVICE_LINE = re.compile(r"^(?P<name>\S+)\s+grpc=(?P<grpc>\S+)\s+admin=(?P<admin>\S+)")
_UP_LINE = re.compile(r"^flotilla is up\b")
_UP_TARGET = re.compile(r"\bat\s+(?P<addr>\S+)")

# Never let an ambient http(s)_proxy setting divert loopback traffic.
_GRPC_BASE_OPTIONS = [("grpc.enable_http_proxy", 0)]
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class ServiceAddrs:
    grpc: str
    admin: str


# A running fleet to test instead of starting `flotilla up` (see the module docstring).
EXTERNAL_FLEET_ENV = {
    "FLOTILLA_GATEWAY": ("gateway", "grpc"),
    "FLOTILLA_GATEWAY_ADMIN": ("gateway", "admin"),
    "FLOTILLA_ECHO": ("echo", "grpc"),
    "FLOTILLA_ECHO_ADMIN": ("echo", "admin"),
}


@dataclass
class Fleet:
    process: Optional[subprocess.Popen]
    services: Dict[str, ServiceAddrs]
    stdout: Optional[LinePump] = None
    stderr: Optional[LinePump] = None
    argv: List[str] = field(default_factory=list)

    @property
    def gateway(self) -> ServiceAddrs:
        return self.services["gateway"]

    @property
    def echo(self) -> ServiceAddrs:
        return self.services["echo"]

    def describe(self) -> str:
        if self.process is None:
            return "external fleet: " + ", ".join(
                f"{name} grpc={a.grpc} admin={a.admin}" for name, a in self.services.items()
            )
        rc = self.process.poll()
        state = "running" if rc is None else f"exited with code {rc}"
        return (
            f"command: {' '.join(self.argv)}\nprocess: {state}\n"
            f"--- stdout (tail) ---\n{self.stdout.tail()}\n"
            f"--- stderr (tail) ---\n{self.stderr.tail()}"
        )


def _flotilla_binary() -> Path:
    configured = os.environ.get("FLOTILLA_BIN")
    path = Path(configured).expanduser().resolve() if configured else DEFAULT_BIN
    if not path.is_file() or not os.access(path, os.X_OK):
        source = "FLOTILLA_BIN" if configured else "default location"
        pytest.fail(
            f"flotilla executable not found at {path} ({source}); build it with "
            f"`cargo build --bin flotilla` or set FLOTILLA_BIN",
            pytrace=False,
        )
    return path


def _http_get(url: str, timeout: float = HTTP_TIMEOUT_S):
    """GET without proxies; returns (status, content_type, body_text)."""
    try:
        with _HTTP.open(url, timeout=timeout) as resp:
            body = resp.read().decode("utf-8", "replace")
            return resp.status, resp.headers.get("Content-Type", ""), body
    except urllib.error.HTTPError as err:
        body = err.read().decode("utf-8", "replace")
        return err.code, err.headers.get("Content-Type", ""), body


def _external_fleet() -> Optional[Fleet]:
    """The fleet named by FLOTILLA_GATEWAY & co., or None when none of them is set."""
    given = {k: os.environ[k] for k in EXTERNAL_FLEET_ENV if os.environ.get(k)}
    if not given:
        return None
    missing = [k for k in EXTERNAL_FLEET_ENV if k not in given]
    if missing:
        pytest.fail(
            f"an external fleet needs all of {', '.join(EXTERNAL_FLEET_ENV)} (host:port each); "
            f"missing: {', '.join(missing)}",
            pytrace=False,
        )
    addrs: Dict[str, Dict[str, str]] = {}
    for key, (service, kind) in EXTERNAL_FLEET_ENV.items():
        value = given[key]
        if not re.fullmatch(r"\S+:\d+", value):
            pytest.fail(f"{key}={value!r} is not host:port", pytrace=False)
        addrs.setdefault(service, {})[kind] = value
    services = {name: ServiceAddrs(a["grpc"], a["admin"]) for name, a in addrs.items()}
    return Fleet(process=None, services=services)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        try:
            proc.wait(timeout=SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass


def _wait_until_up(fleet: Fleet, deadline: float) -> None:
    """Parse the startup lines until the "flotilla is up" line (bounded)."""
    up_line = None
    while up_line is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(
                f"`flotilla up` did not report 'flotilla is up' within "
                f"{STARTUP_TIMEOUT_S:.0f} s\n{fleet.describe()}",
                pytrace=False,
            )
        try:
            line = fleet.stdout.next_line(timeout=min(remaining, 0.5))
        except queue.Empty:
            if fleet.process.poll() is not None:
                # Let the pump deliver whatever is left before failing.
                fleet.stdout.join(1.0)
                pytest.fail(f"`flotilla up` exited during startup\n{fleet.describe()}", pytrace=False)
            continue
        if line is None:
            try:
                fleet.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            pytest.fail(
                f"`flotilla up` closed stdout before reporting 'flotilla is up'\n{fleet.describe()}",
                pytrace=False,
            )
        stripped = line.strip()
        match = _SERVICE_LINE.match(stripped)
        if match:
            fleet.services[match["name"]] = ServiceAddrs(match["grpc"], match["admin"])
        elif _UP_LINE.match(stripped):
            up_line = stripped

    for required in ("gateway", "echo"):
        if required not in fleet.services:
            pytest.fail(
                f"`flotilla up` reported no '{required}  grpc=…  admin=…' line before "
                f"'flotilla is up'\n{fleet.describe()}",
                pytrace=False,
            )
    target = _UP_TARGET.search(up_line)
    if target and target["addr"] != fleet.gateway.grpc:
        pytest.fail(
            f"'flotilla is up' points propeller at {target['addr']}, but the gateway "
            f"listens on {fleet.gateway.grpc}\n{fleet.describe()}",
            pytrace=False,
        )


def _wait_until_ready(fleet: Fleet, deadline: float) -> None:
    """Poll /readyz on the gateway and the echo service until 200 (bounded)."""
    for name in ("gateway", "echo"):
        url = f"http://{fleet.services[name].admin}/readyz"
        last = "no answer yet"
        while True:
            if fleet.process is not None and fleet.process.poll() is not None:
                pytest.fail(f"`flotilla up` exited while waiting for {url}\n{fleet.describe()}", pytrace=False)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(
                    f"{url} did not answer 200 within the {STARTUP_TIMEOUT_S:.0f} s startup "
                    f"bound (last: {last})\n{fleet.describe()}",
                    pytrace=False,
                )
            try:
                status, _, body = _http_get(url, timeout=min(remaining, 2.0))
                if status == 200:
                    break
                last = f"HTTP {status}: {body[:200]!r}"
            except OSError as err:
                last = repr(err)
            time.sleep(min(READY_POLL_INTERVAL_S, max(deadline - time.monotonic(), 0)))


TEST_KEY = REPO_ROOT / "shared" / "testkit" / "keys" / "test_rsa_pkcs8.pem"


@dataclass
class Fakes:
    """`flotilla-fakes`: fake BigQuery, Databricks and Snowflake APIs on loopback."""

    process: subprocess.Popen
    urls: Dict[str, str]

    def requests(self, name: str) -> List[dict]:
        """Every request the fake `name` received, oldest first."""
        status, _, body = _http_get(f"{self.urls[name]}/_fake/requests")
        assert status == 200, body
        return json.loads(body)


def _fakes_binary() -> Path:
    configured = os.environ.get("FLOTILLA_FAKES_BIN")
    path = Path(configured) if configured else _flotilla_binary().with_name("flotilla-fakes")
    if not path.is_file():
        pytest.fail(f"flotilla-fakes not found at {path}; build it with `cargo build --bins`", pytrace=False)
    return path


@pytest.fixture(scope="session")
def fakes() -> Iterator[Fakes]:
    proc = subprocess.Popen(
        [str(_fakes_binary())], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out = LinePump(proc.stdout, "fakes-stdout", forward=True, tail_lines=OUTPUT_TAIL_LINES)
    LinePump(proc.stderr, "fakes-stderr", forward=False, tail_lines=OUTPUT_TAIL_LINES)
    try:
        line = out.next_line(timeout=STARTUP_TIMEOUT_S)
    except queue.Empty:
        _stop(proc)
        pytest.fail("flotilla-fakes printed no URLs in time", pytrace=False)
    if not line:
        _stop(proc)
        pytest.fail(f"flotilla-fakes exited with code {proc.wait()}", pytrace=False)
    yield Fakes(proc, json.loads(line))
    proc.stdin.close()
    try:
        proc.wait(timeout=SHUTDOWN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _stop(proc)


def cloud_env(fakes: Fakes, secrets_dir: Path) -> Dict[str, str]:
    """Environment pointing the cloud plugin services at the fakes, with test credentials
    placed where upstream operators put them."""
    key = TEST_KEY.read_text()
    service_account = secrets_dir / "service-account.json"
    service_account.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "flyte-project",
                "private_key_id": "test",
                "private_key": key,
                "client_email": "flyte@flyte-project.iam.gserviceaccount.com",
                "token_uri": f"{fakes.urls['bigquery']}/token",
            }
        )
    )
    env = {
        "FLOTILLA_BIGQUERY_BASE_URL": fakes.urls["bigquery"],
        "GOOGLE_APPLICATION_CREDENTIALS": str(service_account),
        "FLOTILLA_SECRETS_DIR": str(secrets_dir),
    }
    if "databricks" in fakes.urls:
        (secrets_dir / "flyte_databricks_access_token").write_text("dapi-test-token\n")
        env["FLOTILLA_DATABRICKS_BASE_URL"] = fakes.urls["databricks"]
    if "snowflake" in fakes.urls:
        (secrets_dir / "snowflake_private_key").write_text(key)
        env["FLOTILLA_SNOWFLAKE_BASE_URL"] = fakes.urls["snowflake"]
    return env


def start_fleet(extra_args: List[str], env: Dict[str, str]) -> Fleet:
    """Starts `flotilla up` on free loopback ports with `extra_args` and `env` added,
    and waits (bounded) until it is up and ready."""
    argv = [str(_flotilla_binary()), "up", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]
    argv += extra_args
    full_env = dict(os.environ)
    full_env.update(env)
    full_env.setdefault("NO_COLOR", "1")
    full_env.setdefault("RUST_BACKTRACE", "1")
    proc = subprocess.Popen(
        argv,
        cwd=str(REPO_ROOT),
        env=full_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    fleet = Fleet(
        process=proc,
        services={},
        stdout=LinePump(proc.stdout, "flotilla-stdout", forward=True, tail_lines=OUTPUT_TAIL_LINES),
        stderr=LinePump(proc.stderr, "flotilla-stderr", forward=False, tail_lines=OUTPUT_TAIL_LINES),
        argv=argv,
    )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        _wait_until_up(fleet, deadline)
        fleet.stdout.stop_forwarding()
        _wait_until_ready(fleet, deadline)
    except BaseException:
        _stop(proc)
        raise
    return fleet


def stop_fleet(fleet: Fleet) -> None:
    """Stops a fleet from `start_fleet` with SIGINT, as Ctrl-C would, and fails the
    test if it had died before, or does not exit 0 in time."""
    proc = fleet.process
    rc = proc.poll()
    if rc is not None:
        pytest.fail(f"`flotilla up` died during the test session\n{fleet.describe()}", pytrace=False)
    proc.send_signal(signal.SIGINT)
    try:
        rc = proc.wait(timeout=SHUTDOWN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _stop(proc)
        pytest.fail(
            f"`flotilla up` did not exit within {SHUTDOWN_TIMEOUT_S:.0f} s of SIGINT (killed)\n"
            f"{fleet.describe()}",
            pytrace=False,
        )
    fleet.stdout.join(2.0)
    fleet.stderr.join(2.0)
    if rc != 0:
        pytest.fail(f"`flotilla up` exited with code {rc} after SIGINT, expected 0\n{fleet.describe()}", pytrace=False)


@pytest.fixture(scope="session")
def fleet(request, tmp_path_factory) -> Iterator[Fleet]:
    """The running `flotilla up` fleet (gateway + built-in plugin services), its cloud
    services pointed at `flotilla-fakes`; or the external fleet FLOTILLA_GATEWAY & co. name."""
    external = _external_fleet()
    if external is not None:
        _wait_until_ready(external, time.monotonic() + STARTUP_TIMEOUT_S)
        yield external
        return
    fakes = request.getfixturevalue("fakes")
    fleet = start_fleet([], cloud_env(fakes, tmp_path_factory.mktemp("secrets")))
    yield fleet
    stop_fleet(fleet)


# ---------------------------------------------------------------- addresses


@pytest.fixture(scope="session")
def gateway_addr(fleet: Fleet) -> str:
    return fleet.gateway.grpc


@pytest.fixture(scope="session")
def gateway_admin_addr(fleet: Fleet) -> str:
    return fleet.gateway.admin


@pytest.fixture(scope="session")
def echo_addr(fleet: Fleet) -> str:
    """The echo plugin service's own gRPC address (bypassing the gateway)."""
    return fleet.echo.grpc


@pytest.fixture(scope="session")
def echo_admin_addr(fleet: Fleet) -> str:
    return fleet.echo.admin


@pytest.fixture(scope="session")
def http_get() -> Callable[..., tuple]:
    """`http_get(url)` -> (status, content_type, body_text), proxies bypassed."""
    return _http_get


# ----------------------------------------------------------------- channels


def connect(target: str, options=(), credentials: Optional[grpc.ChannelCredentials] = None) -> grpc.Channel:
    """A channel to `target` that is ready (bounded), over TLS with `credentials`."""
    all_options = _GRPC_BASE_OPTIONS + list(options)
    if credentials is None:
        chan = grpc.insecure_channel(target, options=all_options)
    else:
        chan = grpc.secure_channel(target, credentials, options=all_options)
    try:
        grpc.channel_ready_future(chan).result(timeout=CHANNEL_READY_TIMEOUT_S)
    except grpc.FutureTimeoutError:
        chan.close()
        pytest.fail(f"gRPC channel to {target} not ready within {CHANNEL_READY_TIMEOUT_S:.0f} s", pytrace=False)
    return chan


@pytest.fixture(scope="session")
def channel(gateway_addr: str) -> Iterator[grpc.Channel]:
    """Insecure channel to the gateway, shared by the session."""
    chan = connect(gateway_addr)
    yield chan
    chan.close()


@pytest.fixture(scope="session")
def echo_channel(echo_addr: str) -> Iterator[grpc.Channel]:
    """Insecure channel straight to the echo plugin service."""
    chan = connect(echo_addr)
    yield chan
    chan.close()


@pytest.fixture
def open_channel() -> Iterator[Callable[..., grpc.Channel]]:
    """Factory for extra channels with custom options; closed after the test."""
    opened: List[grpc.Channel] = []

    def factory(target: str, options=()) -> grpc.Channel:
        chan = connect(target, options)
        opened.append(chan)
        return chan

    yield factory
    for chan in opened:
        chan.close()


# -------------------------------------------------------------------- stubs


@pytest.fixture(scope="session")
def async_stub(channel: grpc.Channel) -> agent_pb2_grpc.AsyncAgentServiceStub:
    return agent_pb2_grpc.AsyncAgentServiceStub(channel)


@pytest.fixture(scope="session")
def sync_stub(channel: grpc.Channel) -> agent_pb2_grpc.SyncAgentServiceStub:
    return agent_pb2_grpc.SyncAgentServiceStub(channel)


@pytest.fixture(scope="session")
def metadata_stub(channel: grpc.Channel) -> agent_pb2_grpc.AgentMetadataServiceStub:
    return agent_pb2_grpc.AgentMetadataServiceStub(channel)


@pytest.fixture(scope="session")
def echo_async_stub(echo_channel: grpc.Channel) -> agent_pb2_grpc.AsyncAgentServiceStub:
    return agent_pb2_grpc.AsyncAgentServiceStub(echo_channel)


@pytest.fixture(scope="session")
def echo_sync_stub(echo_channel: grpc.Channel) -> agent_pb2_grpc.SyncAgentServiceStub:
    return agent_pb2_grpc.SyncAgentServiceStub(echo_channel)


@pytest.fixture(scope="session")
def echo_metadata_stub(echo_channel: grpc.Channel) -> agent_pb2_grpc.AgentMetadataServiceStub:
    return agent_pb2_grpc.AgentMetadataServiceStub(echo_channel)
