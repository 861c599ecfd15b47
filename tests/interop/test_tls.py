"""TLS on the gateway, as a propeller set to `insecure: false` dials it
(PROTOCOL.md §2.3, checklist item 1): grpcio's secure channel, trusting a CA
that `trustme` (an independent certificate maker) creates, against
`flotilla up --tls-cert-file/--tls-key-file`."""

from __future__ import annotations

from typing import Iterator, Tuple

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flyteidl.admin import agent_pb2
from flyteidl.service import agent_pb2_grpc

from conftest import Fleet, connect, start_fleet, stop_fleet
from test_agent_protocol import (
    RPC_TIMEOUT,
    SUCCEEDED,
    echo_round_trip,
    list_agents,
    sample_inputs,
    sync_requests,
)


# trustme writes ECDSA keys as SEC1 PEM and RSA keys as PKCS#1 PEM ("BEGIN RSA PRIVATE KEY"), what
# cert-manager writes by default.
@pytest.fixture(scope="module", params=["ECDSA", "RSA"])
def tls_fleet(request, tmp_path_factory) -> Iterator[Tuple[Fleet, bytes]]:
    """`flotilla up` serving TLS with a certificate for 127.0.0.1 and localhost; and the CA (PEM)."""
    key_type = getattr(trustme.KeyType, request.param)
    ca = trustme.CA(key_type=key_type)
    cert = ca.issue_cert("127.0.0.1", "localhost", key_type=key_type)
    d = tmp_path_factory.mktemp("tls")
    cert_file, key_file = d / "tls.crt", d / "tls.key"
    cert.private_key_pem.write_to_path(str(key_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    fleet = start_fleet(["--tls-cert-file", str(cert_file), "--tls-key-file", str(key_file)], {})
    yield fleet, ca.cert_pem.bytes()
    stop_fleet(fleet)


def secure_channel(fleet: Fleet, ca_pem: bytes) -> grpc.Channel:
    return connect(fleet.gateway.grpc, credentials=grpc.ssl_channel_credentials(root_certificates=ca_pem))


def test_every_agent_service_answers_over_tls(tls_fleet):
    fleet, ca_pem = tls_fleet
    with secure_channel(fleet, ca_pem) as chan:
        health = health_pb2_grpc.HealthStub(chan).Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT)
        assert health.status == health_pb2.HealthCheckResponse.SERVING

        names = {a.name for a in list_agents(agent_pb2_grpc.AgentMetadataServiceStub(chan))}
        assert {"Echo Agent", "Echo Sync Agent"} <= names, names

        echo_round_trip(agent_pb2_grpc.AsyncAgentServiceStub(chan))

        inputs = sample_inputs()
        answers = list(
            agent_pb2_grpc.SyncAgentServiceStub(chan).ExecuteTaskSync(
                iter(sync_requests("echo_sync", inputs)), timeout=RPC_TIMEOUT
            )
        )
        assert len(answers) == 1 and answers[0].header.resource.phase == SUCCEEDED, answers
        assert answers[0].header.resource.outputs == inputs


def test_plaintext_gets_no_answer_from_the_tls_port(tls_fleet):
    fleet, _ = tls_fleet
    with grpc.insecure_channel(fleet.gateway.grpc, options=[("grpc.enable_http_proxy", 0)]) as chan:
        stub = agent_pb2_grpc.AgentMetadataServiceStub(chan)
        with pytest.raises(grpc.RpcError) as info:
            stub.ListAgents(agent_pb2.ListAgentsRequest(), timeout=RPC_TIMEOUT)
        assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), info.value


def test_a_client_that_does_not_trust_the_ca_is_refused(tls_fleet):
    fleet, _ = tls_fleet
    stranger = trustme.CA().cert_pem.bytes()
    creds = grpc.ssl_channel_credentials(root_certificates=stranger)
    with grpc.secure_channel(fleet.gateway.grpc, creds, options=[("grpc.enable_http_proxy", 0)]) as chan:
        with pytest.raises(grpc.RpcError) as info:
            agent_pb2_grpc.AgentMetadataServiceStub(chan).ListAgents(
                agent_pb2.ListAgentsRequest(), timeout=RPC_TIMEOUT
            )
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
