"""What the benchmark sends to each system, and how a real client checks the answer before any load.

An endpoint is one request body on one route of one system. The check sends it once with a real client
(httpx, grpcio) and compares the class probabilities in the answer with the in-process pipeline's: a
system that answers fast but wrongly must not make it into the table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import grpc
import httpx
import numpy as np
import orjson

from loadtests import rows
from serving.oip import grpc_predict_v2_pb2 as pb

# Reads an answer's body into a [rows, classes] array of class probabilities.
ProbabilityReader = Callable[[bytes], np.ndarray]
# The same pipeline on the same rows; only float formatting (JSON round trips) may differ.
TOLERANCE = 1e-9


class CheckError(RuntimeError):
    pass


@dataclass(frozen=True)
class Endpoint:
    system: str
    transport: str  # as shown in the table
    protocol: Literal["http", "grpc"]
    address: str  # URL (http) or host:port (grpc)
    body: bytes  # http: the request body; grpc: the serialized ModelInferRequest, not yet framed
    rows: int
    read: ProbabilityReader

    @property
    def wire_body(self) -> bytes:
        """What the load generator sends."""
        return rows.grpc_frame(self.body) if self.protocol == "grpc" else self.body


def check(endpoint: Endpoint, expected: np.ndarray) -> int:
    """Send the request once; raise CheckError unless the answer holds the expected probabilities.
    Returns the answer's size as framed on the wire (what h2load must see per successful gRPC call)."""
    if endpoint.protocol == "http":
        try:
            response = httpx.post(
                endpoint.address,
                content=endpoint.body,
                headers={"Content-Type": "application/json"},
                timeout=60,
            )
        except httpx.HTTPError as error:
            raise CheckError(f"{endpoint.system} {endpoint.transport}: {error!r}") from None
        if response.status_code != 200:
            raise CheckError(
                f"{endpoint.system} {endpoint.transport}: {response.status_code} {response.text[:300]}"
            )
        answer = response.content
    else:
        with grpc.insecure_channel(endpoint.address) as channel:
            call = channel.unary_unary(rows.MODEL_INFER_PATH)  # bytes in, bytes out
            try:
                answer = call(endpoint.body, timeout=60)
            except grpc.RpcError as error:
                raise CheckError(f"{endpoint.system} {endpoint.transport}: {error}") from None
    got = endpoint.read(answer)
    if got.shape != expected.shape or not np.allclose(got, expected, rtol=0, atol=TOLERANCE):
        raise CheckError(
            f"{endpoint.system} {endpoint.transport}: probabilities {got[:2].tolist()} "
            f"differ from the in-process {expected[:2].tolist()}"
        )
    return len(rows.grpc_frame(answer)) if endpoint.protocol == "grpc" else len(answer)


# ---- answer readers ---------------------------------------------------------------------------------------


def typed_http(classes: list[str]) -> ProbabilityReader:
    """tabserve /predict and /predict_batch, and the FastAPI baseline: {"probabilities": {class: p}}."""

    def read(body: bytes) -> np.ndarray:
        answers = orjson.loads(body)
        answers = answers if isinstance(answers, list) else [answers]
        return np.array([[answer["probabilities"][label] for label in classes] for answer in answers])

    return read


def oip_rest(output: str) -> ProbabilityReader:
    def read(body: bytes) -> np.ndarray:
        [tensor] = [tensor for tensor in orjson.loads(body)["outputs"] if tensor["name"] == output]
        return np.asarray(tensor["data"], dtype=np.float64).reshape(tensor["shape"])

    return read


def oip_grpc(output: str) -> ProbabilityReader:
    def read(body: bytes) -> np.ndarray:
        response = pb.ModelInferResponse.FromString(body)
        [(index, tensor)] = [
            (i, tensor) for i, tensor in enumerate(response.outputs) if tensor.name == output
        ]
        if response.raw_output_contents:
            values = np.frombuffer(response.raw_output_contents[index], dtype="<f8")
        else:
            values = np.asarray(tensor.contents.fp64_contents, dtype=np.float64)
        return values.reshape(list(tensor.shape))

    return read
