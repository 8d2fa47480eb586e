"""The seeded fuzzer of the Open Inference Protocol gRPC service (loadtests/grpc_fuzz.py, shared with `make
fuzz`, which sends 25 times as many messages) against a real `bentoml serve`, and grpc's own services.

Whatever a message holds, the answer is OK or a status that names the client's mistake (INVALID_ARGUMENT,
NOT_FOUND), never UNKNOWN or INTERNAL, and the server keeps answering valid calls.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from loadtests.grpc_fuzz import call_raw, fuzz, valid_requests
from tests.conftest import Server

SEED = 12
CASES_PER_METHOD = 210


@pytest.mark.timeout(180)
def test_fuzzed_messages_get_client_errors_and_the_server_keeps_serving(server: Server) -> None:
    run = fuzz(server.grpc_target, CASES_PER_METHOD, SEED)
    print(f"gRPC fuzz: {run.messages} messages in {run.seconds:.1f} s: {dict(run.codes)}")
    assert not run.faults, f"{len(run.faults)} server faults, first: {run.faults[:3]}"
    assert run.codes["INVALID_ARGUMENT"] > 0  # the fuzzer did reach the decoding
    assert run.outputs_after == ["label", "probabilities"]


def test_an_undecodable_message_is_invalid_argument_naming_the_message(server: Server) -> None:
    with grpc.insecure_channel(server.grpc_target) as channel:
        for method in valid_requests():
            code, details = call_raw(channel, method, b"\xff\xff\xff")
            assert code is grpc.StatusCode.INVALID_ARGUMENT, (method, code, details)
            assert f"{method}Request" in details
            assert "protobuf" in details


def test_grpcs_own_services_refuse_an_undecodable_message_with_invalid_argument(server: Server) -> None:
    """Health and reflection are grpc's own servicers; they answered such a message with UNKNOWN."""
    junk = b"\xff\xff\xff"
    check, watch, reflect = (
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    )
    with grpc.insecure_channel(server.grpc_target) as channel:
        calls: list[tuple[str, Callable[[], object]]] = [
            (check, lambda: channel.unary_unary(check)(junk, timeout=30)),
            (watch, lambda: list(channel.unary_stream(watch)(junk, timeout=30))),
            (reflect, lambda: list(channel.stream_stream(reflect)(iter([junk]), timeout=30))),
        ]
        for method, call in calls:
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT, (method, caught.value.details())
            assert f"{method}: not a valid protobuf message" == caught.value.details()
        assert channel.unary_unary(check)(b"", timeout=30) == b"\x08\x01"  # service "": SERVING
