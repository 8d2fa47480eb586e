"""A seeded fuzzer of the Open Inference Protocol gRPC service: random bytes and bit-flipped and truncated
valid requests, sent as raw messages to every method of the service.

    fuzz(target, cases_per_method=210, seed=12)

Whatever a message holds, the answer must be OK or a status that names the client's mistake
(INVALID_ARGUMENT, NOT_FOUND), never UNKNOWN or INTERNAL, and the server must answer a valid call after.
Shared by tests/test_fuzz_grpc.py (bounded, in CI) and `make fuzz` (loadtests/fuzz.py, long).
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
import numpy as np
from google.protobuf.message import Message

from models.data import load_default
from serving.oip import grpc_predict_v2_pb2 as pb
from serving.oip import grpc_predict_v2_pb2_grpc as pb_grpc
from serving.oip.grpc_server import SERVICE_NAME

MODEL = "breast_cancer"  # the default model, which `python train.py` trains
SERVER_FAULTS = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}


@dataclass
class GrpcFuzzRun:
    messages: int = 0
    seconds: float = 0.0
    codes: Counter[str] = field(default_factory=Counter)
    faults: list[tuple[str, str, str]] = field(default_factory=list)  # method, status, details
    outputs_after: list[str] = field(default_factory=list)  # of a valid ModelInfer after the fuzzing

    def summary(self) -> dict[str, object]:
        return {
            "messages": self.messages,
            "seconds": round(self.seconds, 1),
            "codes": dict(self.codes.most_common()),
            "faults": len(self.faults),
            "first_faults": self.faults[:5],
            "outputs_after": self.outputs_after,
        }


def valid_requests() -> dict[str, Message]:
    """A valid request of each method of the service, keyed by method name."""
    rows = load_default().features.iloc[:3].to_numpy(dtype=np.float64)
    infer = pb.ModelInferRequest(model_name=MODEL, id="fuzz")
    infer.inputs.add(name="input", datatype="FP64", shape=list(rows.shape))
    infer.raw_input_contents.append(rows.astype("<f8").tobytes())
    return {
        "ServerLive": pb.ServerLiveRequest(),
        "ServerReady": pb.ServerReadyRequest(),
        "ModelReady": pb.ModelReadyRequest(name=MODEL),
        "ServerMetadata": pb.ServerMetadataRequest(),
        "ModelMetadata": pb.ModelMetadataRequest(name=MODEL),
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


def fuzz(target: str, cases_per_method: int, seed: int) -> GrpcFuzzRun:
    """`cases_per_method` messages to each method of the service at `target` (host:port), then one valid
    ModelInfer."""
    rng = random.Random(seed)
    requests = valid_requests()
    infer_bytes = requests["ModelInfer"].SerializeToString()
    run = GrpcFuzzRun()
    started = time.monotonic()
    with grpc.insecure_channel(target) as channel:
        for method, valid in requests.items():
            # Each method gets mutations of its own request and of ModelInfer's (the largest message).
            messages = mutations(valid.SerializeToString(), rng, cases_per_method // 2)
            messages += mutations(infer_bytes, rng, cases_per_method - cases_per_method // 2)
            for message in messages:
                code, details = call_raw(channel, method, message)
                run.messages += 1
                run.codes[code.name] += 1
                if code in SERVER_FAULTS:
                    run.faults.append((method, code.name, details))
        after = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(requests["ModelInfer"], timeout=30)
    run.seconds = time.monotonic() - started
    run.outputs_after = [output.name for output in after.outputs]
    return run
