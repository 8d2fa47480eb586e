"""A seeded fuzzer of the Open Inference Protocol gRPC service of a real `bentoml serve`: random bytes and
bit-flipped and truncated valid requests, sent as raw messages to every method of the service.

Whatever a message holds, the answer is OK or a status that names the client's mistake (INVALID_ARGUMENT,
NOT_FOUND), never UNKNOWN or INTERNAL, and the server keeps answering valid calls.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from google.protobuf.message import Message

from models.data import load_default
from serving.oip import grpc_predict_v2_pb2 as pb
from serving.oip import grpc_predict_v2_pb2_grpc as pb_grpc
from serving.oip.grpc_server import SERVICE_NAME
from tests.conftest import Server

SEED = 12
CASES_PER_METHOD = 210
SERVER_FAULTS = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}


def valid_requests() -> dict[str, Message]:
    """A valid request of each method of the service, keyed by method name."""
    rows = load_default().features.iloc[:3].to_numpy(dtype=np.float64)
    infer = pb.ModelInferRequest(model_name="breast_cancer", id="fuzz")
    infer.inputs.add(name="input", datatype="FP64", shape=list(rows.shape))
    infer.raw_input_contents.append(rows.astype("<f8").tobytes())
    return {
        "ServerLive": pb.ServerLiveRequest(),
        "ServerReady": pb.ServerReadyRequest(),
        "ModelReady": pb.ModelReadyRequest(name="breast_cancer"),
        "ServerMetadata": pb.ServerMetadataRequest(),
        "ModelMetadata": pb.ModelMetadataRequest(name="breast_cancer"),
        "ModelInfer": infer,
    }


def mutations(valid: bytes, rng: random.Random, count: int) -> list[bytes]:
    """`count` messages, a third of each kind: random bytes, bit flips and truncations of `valid`."""
    messages = []
    for index in range(count):
        kind = index % 3
        if kind == 0 or not valid:
            messages.append(rng.randbytes(rng.randint(1, 64)))
        elif kind == 1:
            flipped = bytearray(valid)
            for _ in range(rng.randint(1, 4)):
                flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            messages.append(bytes(flipped))
        else:
            messages.append(valid[: rng.randrange(len(valid))])
    return messages


def call_raw(channel: grpc.Channel, method: str, message: bytes) -> tuple[grpc.StatusCode, str]:
    # No serializers: the bytes go on the wire as they are, as a broken or hostile client would send them.
    stub = channel.unary_unary(f"/{SERVICE_NAME}/{method}")
    try:
        stub(message, timeout=30)
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.mark.timeout(180)
def test_fuzzed_messages_get_client_errors_and_the_server_keeps_serving(server: Server) -> None:
    rng = random.Random(SEED)
    requests = valid_requests()
    infer_bytes = requests["ModelInfer"].SerializeToString()
    codes: Counter[str] = Counter()
    faults: list[tuple[str, grpc.StatusCode, str]] = []
    started = time.monotonic()
    with grpc.insecure_channel(server.grpc_target) as channel:
        for method, valid in requests.items():
            # Each method gets mutations of its own request and of ModelInfer's (the largest message).
            messages = mutations(valid.SerializeToString(), rng, CASES_PER_METHOD // 2)
            messages += mutations(infer_bytes, rng, CASES_PER_METHOD // 2)
            for message in messages:
                code, details = call_raw(channel, method, message)
                codes[code.name] += 1
                if code in SERVER_FAULTS:
                    faults.append((method, code, details))
        after = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(requests["ModelInfer"], timeout=30)
    elapsed = time.monotonic() - started
    print(f"gRPC fuzz: {len(requests) * CASES_PER_METHOD} messages in {elapsed:.1f} s: {dict(codes)}")
    assert not faults, f"{len(faults)} server faults, first: {faults[:3]}"
    assert codes["INVALID_ARGUMENT"] > 0  # the fuzzer did reach the decoding
    assert [output.name for output in after.outputs] == ["label", "probabilities"]


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
