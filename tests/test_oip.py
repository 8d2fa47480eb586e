"""The Open Inference Protocol layer: the codec against the bytes tritonclient's own request builders produce
and the responses its result readers parse, every malformed input refused with BadInputError, and the gRPC
server (real DataPlane, real scikit-learn pipeline) called by tritonclient and grpcio's health and
reflection clients on a loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import orjson
import pandas as pd
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.grpc import _utils as triton_grpc_utils
from tritonclient.grpc import service_pb2 as triton_pb
from tritonclient.utils import InferenceServerException

from models.candidates import candidates
from models.data import Task
from models.schema import FeatureSchema
from models.store import StoredModel
from serving.admission import Admission
from serving.arrowlog import ArrowLog
from serving.dataplane import DataPlane
from serving.errors import BadInputError
from serving.metrics import serving_metrics
from serving.oip import grpc_predict_v2_pb2 as pb
from serving.oip import grpc_predict_v2_pb2_grpc as pb_grpc
from serving.oip.codec import (
    ALL_OUTPUTS,
    InferRequest,
    OutputTensor,
    Tensor,
    columns_from_tensors,
    decode_grpc_request,
    decode_rest_request,
    encode_grpc_response,
    encode_rest_response,
    error_body,
)
from serving.oip.grpc_server import SERVICE_NAME, GrpcBindError, GrpcServer, start_grpc_server

FEATURES = ["size", "weight", "color", "member"]


def rest_body(document: dict[str, Any]) -> bytes:
    return orjson.dumps(document)


def fp64_input(name: str = "x", shape: list[int] | None = None, data: Any = None) -> dict[str, Any]:
    return {
        "name": name,
        "datatype": "FP64",
        "shape": shape or [2],
        "data": [1.0, 2.0] if data is None else data,
    }


def grpc_request(*tensors: tuple[str, str, list[int], bytes]) -> pb.ModelInferRequest:
    """A request with raw contents, as tritonclient sends it."""
    request = pb.ModelInferRequest(model_name="toy")
    for name, datatype, shape, raw in tensors:
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(raw)
    return request


def bytes_blob(*values: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(value)) + value for value in values)


# ---- decoding what tritonclient sends -------------------------------------------------------------------


def test_tritonclient_http_binary_and_json_inputs_decode() -> None:
    matrix = np.arange(6, dtype=np.float64).reshape(2, 3)
    inputs = [
        triton_http.InferInput("rows", [2, 3], "FP64").set_data_from_numpy(matrix, binary_data=True),
        triton_http.InferInput("color", [2], "BYTES").set_data_from_numpy(
            np.array(["red", "bleu é"], dtype=object), binary_data=True
        ),
        triton_http.InferInput("member", [2, 1], "BOOL").set_data_from_numpy(
            np.array([[True], [False]]), binary_data=True
        ),
        triton_http.InferInput("count", [2], "INT8").set_data_from_numpy(
            np.array([1, -2], dtype=np.int8), binary_data=False
        ),
        triton_http.InferInput("half", [2], "FP16").set_data_from_numpy(
            np.array([0.5, -1.5], dtype=np.float16), binary_data=True
        ),
        triton_http.InferInput("code", [2], "BYTES").set_data_from_numpy(
            np.array(["a", "b"], dtype=object), binary_data=False
        ),
    ]
    outputs = [
        triton_http.InferRequestedOutput("label", binary_data=True),
        triton_http.InferRequestedOutput("probabilities", binary_data=False),
    ]
    body, header_length = triton_http.InferenceServerClient.generate_request_body(
        inputs, outputs=outputs, request_id="req-1"
    )

    request = decode_rest_request(body, header_length)

    assert request.id == "req-1"
    assert request.outputs == ["label", "probabilities"]
    assert request.binary_outputs == {"label"}
    rows, color, member, count, half, code = request.inputs
    assert (rows.name, rows.datatype, rows.shape) == ("rows", "FP64", [2, 3])
    assert np.array_equal(rows.data, matrix.reshape(-1))
    assert color.data == ["red", "bleu é"]
    assert np.array_equal(member.data, [True, False])
    assert member.shape == [2, 1]
    assert np.array_equal(count.data, [1, -2])
    assert np.asarray(count.data).dtype == np.int8
    assert np.array_equal(half.data, np.array([0.5, -1.5], dtype=np.float16))
    assert code.data == ["a", "b"]


def test_tritonclient_http_without_outputs_asks_for_every_output_in_binary() -> None:
    tensor = triton_http.InferInput("rows", [1, 2], "FP32").set_data_from_numpy(
        np.array([[1.5, 2.5]], dtype=np.float32), binary_data=True
    )
    body, header_length = triton_http.InferenceServerClient.generate_request_body([tensor])
    request = decode_rest_request(body, header_length)
    assert request.outputs is None
    assert request.binary_outputs == {ALL_OUTPUTS}
    assert np.array_equal(request.inputs[0].data, [1.5, 2.5])


def test_plain_json_request_with_nested_data() -> None:
    body = rest_body(
        {
            "id": "42",
            "parameters": {"custom": 1},
            "inputs": [
                {"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2.5], [None, 4]]},
                {"name": "flag", "datatype": "BOOL", "shape": [2], "data": [True, False]},
                {"name": "big", "datatype": "UINT64", "shape": [1], "data": [2**64 - 1]},
                {"name": "city", "datatype": "BYTES", "shape": [2, 1], "data": [["paris"], [None]]},
            ],
            "outputs": [{"name": "label"}],
        }
    )
    request = decode_rest_request(body, None)
    assert request == InferRequest(id="42", inputs=request.inputs, outputs=["label"], binary_outputs=set())
    x, flag, big, city = request.inputs
    assert np.array_equal(x.data, np.array([1, 2.5, np.nan, 4], dtype=np.float32), equal_nan=True)
    assert np.asarray(flag.data).dtype == np.bool_
    assert int(np.asarray(big.data)[0]) == 2**64 - 1
    assert city.data == ["paris", None]


def test_tritonclient_grpc_request_parses_with_our_stubs_and_decodes() -> None:
    matrix = np.arange(6, dtype=np.float64).reshape(2, 3)
    inputs = [
        triton_grpc.InferInput("rows", [2, 3], "FP64").set_data_from_numpy(matrix),
        triton_grpc.InferInput("color", [2], "BYTES").set_data_from_numpy(
            np.array([b"red", "bleu é".encode()], dtype=object)
        ),
        triton_grpc.InferInput("member", [2], "BOOL").set_data_from_numpy(np.array([True, False])),
        triton_grpc.InferInput("count", [2], "UINT16").set_data_from_numpy(
            np.array([7, 65535], dtype=np.uint16)
        ),
    ]
    sent = triton_grpc_utils._get_inference_request(
        "toy", inputs, "", "id-7", [triton_grpc.InferRequestedOutput("label")], 0, False, False, 0, None, None
    )
    assert len(sent.raw_input_contents) == len(inputs)  # what tritonclient always does

    request = decode_grpc_request(pb.ModelInferRequest.FromString(sent.SerializeToString()))

    assert request.id == "id-7"
    assert request.outputs == ["label"]
    rows, color, member, count = request.inputs
    assert np.array_equal(rows.data, matrix.reshape(-1))
    assert rows.shape == [2, 3]
    assert color.data == ["red", "bleu é"]
    assert np.array_equal(member.data, [True, False])
    assert np.array_equal(count.data, [7, 65535])


@pytest.mark.parametrize(
    ("datatype", "field", "values", "expected"),
    [
        ("BOOL", "bool_contents", [True, False], [True, False]),
        ("INT8", "int_contents", [-128, 127], [-128, 127]),
        ("INT32", "int_contents", [-5, 5], [-5, 5]),
        ("INT64", "int64_contents", [-(2**62), 3], [-(2**62), 3]),
        ("UINT8", "uint_contents", [0, 255], [0, 255]),
        ("UINT64", "uint64_contents", [2**64 - 1, 0], [2**64 - 1, 0]),
        ("FP32", "fp32_contents", [0.5, -2.0], [0.5, -2.0]),
        ("FP64", "fp64_contents", [0.1, 1e300], [0.1, 1e300]),
        ("BYTES", "bytes_contents", [b"a", "é".encode()], ["a", "é"]),
    ],
)
def test_typed_grpc_contents_decode(
    datatype: str, field: str, values: list[Any], expected: list[Any]
) -> None:
    request = pb.ModelInferRequest(model_name="toy")
    tensor = request.inputs.add(name="x", datatype=datatype, shape=[2])
    getattr(tensor.contents, field).extend(values)
    # Both stubs describe the same messages: tritonclient's parses ours.
    assert triton_pb.ModelInferRequest.FromString(request.SerializeToString()).inputs[0].name == "x"
    [decoded] = decode_grpc_request(request).inputs
    data = decoded.data.tolist() if isinstance(decoded.data, np.ndarray) else decoded.data
    assert data == expected


# ---- encoding what tritonclient reads ---------------------------------------------------------------------

OUTPUTS = [
    OutputTensor("label", "BYTES", [3], ["benign", "malignant", "bénin"]),
    OutputTensor("probabilities", "FP64", [3, 2], np.array([[0.1, 0.9], [0.75, 0.25], [np.nan, 1.0]])),
    OutputTensor("rank", "INT32", [3], np.array([3, 1, 2])),
]


def assert_outputs(read: Callable[[str], Any]) -> None:
    labels = [value.decode() if isinstance(value, bytes) else value for value in read("label").tolist()]
    assert labels == ["benign", "malignant", "bénin"]
    assert np.array_equal(read("probabilities"), OUTPUTS[1].data, equal_nan=True)
    assert read("rank").tolist() == [3, 1, 2]


@pytest.mark.parametrize(
    "binary", [set(), {"label"}, {"probabilities", "rank"}, {ALL_OUTPUTS}], ids=["json", "one", "two", "all"]
)
def test_rest_response_reads_back_with_tritonclient(binary: set[str]) -> None:
    body, headers = encode_rest_response("toy", "v1", "req-1", OUTPUTS, binary)
    header_length = headers.get("Inference-Header-Content-Length")
    if binary:
        assert headers["Content-Type"] == "application/octet-stream"
        header = orjson.loads(body[: int(header_length or 0)])
    else:
        assert header_length is None
        assert headers["Content-Type"] == "application/json"
        header = orjson.loads(body)
    assert (header["model_name"], header["model_version"], header["id"]) == ("toy", "v1", "req-1")
    result = triton_http.InferResult.from_response_body(
        body, header_length=int(header_length) if header_length else None
    )
    assert_outputs(result.as_numpy)


def test_grpc_raw_response_reads_back_with_tritonclient() -> None:
    response = encode_grpc_response("toy", "v1", "req-1", OUTPUTS, raw=True)
    parsed = triton_pb.ModelInferResponse.FromString(response.SerializeToString())
    assert (parsed.model_name, parsed.model_version, parsed.id) == ("toy", "v1", "req-1")
    assert_outputs(triton_grpc.InferResult(parsed).as_numpy)


def test_grpc_typed_response_holds_the_values() -> None:
    response = encode_grpc_response("toy", "v1", "", OUTPUTS, raw=False)
    assert not response.raw_output_contents
    assert response.id == ""
    label, probabilities, rank = response.outputs
    assert list(label.contents.bytes_contents) == [b"benign", b"malignant", "bénin".encode()]
    assert list(probabilities.shape) == [3, 2]
    assert np.array_equal(
        list(probabilities.contents.fp64_contents), [0.1, 0.9, 0.75, 0.25, np.nan, 1.0], equal_nan=True
    )
    assert list(rank.contents.int_contents) == [3, 1, 2]


def test_rest_round_trip_through_the_binary_extension() -> None:
    body, headers = encode_rest_response("toy", "v1", "r", OUTPUTS, {ALL_OUTPUTS})
    header = orjson.loads(body[: int(headers["Inference-Header-Content-Length"])])
    # The response's layout is the request's: feed the tensors back in as inputs.
    request_header = orjson.dumps({"inputs": header["outputs"]})
    binary = body[int(headers["Inference-Header-Content-Length"]) :]
    request = decode_rest_request(request_header + binary, len(request_header))
    assert [tensor.name for tensor in request.inputs] == ["label", "probabilities", "rank"]
    assert request.inputs[0].data == ["benign", "malignant", "bénin"]
    assert np.array_equal(request.inputs[1].data, np.reshape(OUTPUTS[1].data, -1), equal_nan=True)


def test_error_body() -> None:
    assert orjson.loads(error_body("input 'x': bad")) == {"error": "input 'x': bad"}


# ---- columns --------------------------------------------------------------------------------------------


def test_one_tensor_per_feature_in_any_order() -> None:
    tensors = [
        Tensor("member", "BOOL", [2, 1], np.array([True, False])),
        Tensor("color", "BYTES", [2], ["red", "blue"]),
        Tensor("weight", "FP64", [2], np.array([1.0, 2.0])),
        Tensor("size", "FP32", [2, 1], np.array([3.0, 4.0], dtype=np.float32)),
    ]
    columns = columns_from_tensors(tensors, FEATURES)
    assert list(columns) == FEATURES
    assert columns["color"] == ["red", "blue"]
    assert np.array_equal(columns["size"], [3.0, 4.0])


def test_single_matrix_tensor_gives_columns_in_feature_order() -> None:
    matrix = np.arange(8, dtype=np.float64).reshape(2, 4)
    columns = columns_from_tensors([Tensor("rows", "FP64", [2, 4], matrix.reshape(-1))], FEATURES)
    assert [np.asarray(columns[name]).tolist() for name in FEATURES] == matrix.T.tolist()
    strings = columns_from_tensors([Tensor("rows", "BYTES", [2, 2], ["a", "b", "c", "d"])], ["x", "y"])
    assert strings == {"x": ["a", "c"], "y": ["b", "d"]}


@pytest.mark.parametrize(
    ("tensors", "reason", "named"),
    [
        ([Tensor("size", "FP64", [1], np.zeros(1))], "missing_tensor", ["'weight'", "'color'", "'member'"]),
        (
            [Tensor(name, "FP64", [1], np.zeros(1)) for name in [*FEATURES, "colour", "extra"]],
            "unknown_tensor",
            ["'colour'", "'extra'"],
        ),
        (
            [Tensor(name, "FP64", [2 if name == "color" else 3], np.zeros(2)) for name in FEATURES],
            "tensor_length",
            ["'color'", "2 rows", "3"],
        ),
        (
            [Tensor(name, "FP64", [1, 2], np.zeros(2)) for name in FEATURES],
            "tensor_shape",
            ["'size'", "[1, 2]"],
        ),
        ([Tensor("rows", "FP64", [2, 3], np.zeros(6))], "tensor_shape", ["'rows'", "[N, 4]"]),
        ([Tensor("rows", "FP64", [4], np.zeros(4))], "tensor_shape", ["'rows'", "[N, 4]"]),
    ],
    ids=["missing", "unknown", "lengths", "feature-2d", "matrix-width", "matrix-1d"],
)
def test_columns_refuse_mismatched_tensors(tensors: list[Tensor], reason: str, named: list[str]) -> None:
    with pytest.raises(BadInputError) as caught:
        columns_from_tensors(tensors, FEATURES)
    assert caught.value.reason == reason
    for text in named:
        assert text in caught.value.message


# ---- bad input ------------------------------------------------------------------------------------------


def with_binary(inputs: list[dict[str, Any]], blob: bytes) -> tuple[bytes, int]:
    """A binary-extension body and its Inference-Header-Content-Length."""
    header = orjson.dumps({"inputs": inputs})
    return header + blob, len(header)


def binary_input(name: str, datatype: str, shape: list[int], size: object) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": size}}


X16 = binary_input("x", "FP64", [2], 16)
S9 = binary_input("s", "BYTES", [2], 9)

# body, Inference-Header-Content-Length, reason, texts the message must contain
REST_CASES: dict[str, tuple[bytes, int | None, str, list[str]]] = {
    "not-json": (b"{inputs: [", None, "invalid_json", ["not valid JSON"]),
    "not-object": (b"[1, 2]", None, "invalid_request", ["JSON object"]),
    "no-inputs": (rest_body({"id": "a"}), None, "missing_inputs", ["'inputs'"]),
    "empty-inputs": (rest_body({"inputs": []}), None, "missing_inputs", ["'inputs'"]),
    "inputs-not-list": (rest_body({"inputs": {"x": 1}}), None, "invalid_request", ["'inputs'"]),
    "id-not-string": (rest_body({"id": 7, "inputs": [fp64_input()]}), None, "invalid_request", ["'id'"]),
    "no-name": (
        rest_body({"inputs": [{"datatype": "FP64", "shape": [1], "data": [1]}]}),
        None,
        "invalid_request",
        ["inputs[0]"],
    ),
    "duplicate-input": (
        rest_body({"inputs": [fp64_input(), fp64_input()]}),
        None,
        "duplicate_tensor",
        ["'x'"],
    ),
    "unknown-datatype": (
        rest_body({"inputs": [{**fp64_input(), "datatype": "FLOAT"}]}),
        None,
        "tensor_datatype",
        ["'x'", "'FLOAT'"],
    ),
    "bf16": (rest_body({"inputs": [{**fp64_input(), "datatype": "BF16"}]}), None, "tensor_datatype", ["'x'"]),
    "datatype-list": (
        rest_body({"inputs": [{**fp64_input(), "datatype": ["FP64"]}]}),
        None,
        "tensor_datatype",
        ["'x'", "['FP64']"],
    ),
    "datatype-object": (
        rest_body({"inputs": [{**fp64_input(), "datatype": {"a": 1}}]}),
        None,
        "tensor_datatype",
        ["'x'", "{'a': 1}"],
    ),
    "shape-product": (
        rest_body({"inputs": [fp64_input(shape=[3])]}),
        None,
        "tensor_shape",
        ["'x'", "[3]", "2 elements"],
    ),
    "negative-shape": (rest_body({"inputs": [fp64_input(shape=[-1])]}), None, "tensor_shape", ["'x'"]),
    "shape-not-ints": (
        rest_body({"inputs": [{**fp64_input(), "shape": ["2"]}]}),
        None,
        "tensor_shape",
        ["'x'"],
    ),
    "no-data": (
        rest_body({"inputs": [{"name": "x", "datatype": "FP64", "shape": [1]}]}),
        None,
        "invalid_request",
        ["'x'", "'data'"],
    ),
    "data-not-list": (rest_body({"inputs": [fp64_input(data="1,2")]}), None, "tensor_data", ["'x'", "array"]),
    "string-in-fp32": (
        rest_body({"inputs": [{**fp64_input(data=[1.0, "big"]), "datatype": "FP32"}]}),
        None,
        "tensor_data",
        ["'x'", "FP32", "element 1", "'big'"],
    ),
    "bool-in-fp64": (
        rest_body({"inputs": [fp64_input(data=[True, 1.0])]}),
        None,
        "tensor_data",
        ["'x'", "element 0"],
    ),
    "float-in-int": (
        rest_body({"inputs": [{**fp64_input(data=[1, 2.5]), "datatype": "INT32"}]}),
        None,
        "tensor_data",
        ["'x'", "integers"],
    ),
    "int8-overflow": (
        rest_body({"inputs": [{**fp64_input(data=[1, 300]), "datatype": "INT8"}]}),
        None,
        "tensor_data",
        ["'x'", "[-128, 127]"],
    ),
    "negative-uint": (
        rest_body({"inputs": [{**fp64_input(data=[1, -1]), "datatype": "UINT32"}]}),
        None,
        "tensor_data",
        ["'x'"],
    ),
    # orjson reads integers beyond 64 bits as floats, and refuses numbers beyond the double range.
    "int64-overflow": (
        b'{"inputs": [{"name": "x", "datatype": "INT64", "shape": [1], "data": [100000000000000000000000]}]}',
        None,
        "tensor_data",
        ["'x'", "integers"],
    ),
    "number-beyond-double": (
        b'{"inputs": [{"name": "x", "datatype": "FP64", "shape": [1], "data": [1e400]}]}',
        None,
        "invalid_json",
        ["infinity"],
    ),
    "number-in-bytes": (
        rest_body({"inputs": [{"name": "s", "datatype": "BYTES", "shape": [1], "data": [5]}]}),
        None,
        "tensor_data",
        ["'s'", "strings"],
    ),
    "int-in-bool": (
        rest_body({"inputs": [{"name": "b", "datatype": "BOOL", "shape": [1], "data": [1]}]}),
        None,
        "tensor_data",
        ["'b'", "true or false"],
    ),
    "data-and-binary": (
        *with_binary([{**X16, "data": [1.0, 2.0]}], b"\0" * 16),
        "invalid_request",
        ["'x'", "both"],
    ),
    "header-longer-than-body": (
        with_binary([X16], b"")[0],
        with_binary([X16], b"")[1] + 1,
        "binary_length",
        ["Inference-Header-Content-Length"],
    ),
    "binary-too-short": (*with_binary([X16], b"\0" * 8), "binary_length", ["'x'", "16", "only 8"]),
    "binary-left-over": (*with_binary([X16], b"\0" * 24), "binary_length", ["8 bytes", "no input"]),
    "binary-size-vs-shape": (
        *with_binary([binary_input("x", "FP64", [2, 3], 40)], b"\0" * 40),
        "binary_length",
        ["'x'", "40 bytes", "[2, 3]", "48"],
    ),
    "binary-without-header-length": (
        with_binary([X16], b"\0" * 16)[0],
        None,
        "invalid_json",
        ["not valid JSON"],
    ),
    "binary-declared-without-header-length": (
        rest_body({"inputs": [binary_input("x", "FP64", [1], 8)]}),
        None,
        "binary_length",
        ["'x'", "Inference-Header-Content-Length"],
    ),
    "binary-size-not-a-count": (
        *with_binary([binary_input("x", "FP64", [1], "8")], b""),
        "binary_length",
        ["'x'", "byte count"],
    ),
    "bytes-truncated-prefix": (
        *with_binary([S9], bytes_blob(b"abc") + b"\1\0"),
        "binary_length",
        ["'s'", "element 1"],
    ),
    "bytes-truncated-element": (
        *with_binary([S9], struct.pack("<I", 6) + b"abcde"),
        "binary_length",
        ["'s'", "element 0", "declares 6 bytes", "only 5"],
    ),
    "bytes-not-utf8": (
        *with_binary([S9], bytes_blob(b"\xff") + bytes_blob(b"")),
        "tensor_data",
        ["'s'", "element 0", "UTF-8"],
    ),
    "bool-byte-not-0-or-1": (
        *with_binary([binary_input("b", "BOOL", [2], 2)], b"\1\2"),
        "tensor_data",
        ["'b'", "0 or 1"],
    ),
    "duplicate-output": (
        rest_body({"inputs": [fp64_input()], "outputs": [{"name": "label"}, {"name": "label"}]}),
        None,
        "duplicate_tensor",
        ["'label'"],
    ),
    "binary-data-not-bool": (
        rest_body(
            {"inputs": [fp64_input()], "outputs": [{"name": "label", "parameters": {"binary_data": 1}}]}
        ),
        None,
        "invalid_request",
        ["'label'", "binary_data"],
    ),
}


@pytest.mark.parametrize("case", REST_CASES)
def test_bad_rest_requests_raise_bad_input_naming_the_problem(case: str) -> None:
    body, header_length, reason, named = REST_CASES[case]
    with pytest.raises(BadInputError) as caught:
        decode_rest_request(body, header_length)
    assert caught.value.reason == reason, caught.value.message
    for text in named:
        assert text in caught.value.message


def _typed(datatype: str, field: str, values: list[Any], shape: list[int]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="toy")
    getattr(request.inputs.add(name="x", datatype=datatype, shape=shape).contents, field).extend(values)
    return request


def _raw_and_typed() -> pb.ModelInferRequest:
    request = grpc_request(("x", "FP64", [1], b"\0" * 8))
    request.inputs[0].contents.fp64_contents.append(1.0)
    return request


def _raw_count_mismatch() -> pb.ModelInferRequest:
    request = grpc_request(("x", "FP64", [1], b"\0" * 8))
    request.inputs.add(name="y", datatype="FP64", shape=[1])
    return request


def _duplicate_output() -> pb.ModelInferRequest:
    request = grpc_request(("x", "FP64", [1], b"\0" * 8))
    request.outputs.add(name="label")
    request.outputs.add(name="label")
    return request


GRPC_CASES: dict[str, tuple[Callable[[], pb.ModelInferRequest], str, list[str]]] = {
    "no-inputs": (lambda: pb.ModelInferRequest(model_name="toy"), "missing_inputs", ["no inputs"]),
    "no-name": (lambda: grpc_request(("", "FP64", [1], b"\0" * 8)), "invalid_request", ["inputs[0]"]),
    "duplicate": (
        lambda: grpc_request(("x", "FP64", [1], b"\0" * 8), ("x", "FP64", [1], b"\0" * 8)),
        "duplicate_tensor",
        ["'x'"],
    ),
    "unknown-datatype": (
        lambda: grpc_request(("x", "DOUBLE", [1], b"\0" * 8)),
        "tensor_datatype",
        ["'x'", "'DOUBLE'"],
    ),
    "negative-shape": (lambda: grpc_request(("x", "FP64", [-1, 2], b"\0" * 16)), "tensor_shape", ["'x'"]),
    "raw-length": (
        lambda: grpc_request(("x", "FP64", [2, 3], b"\0" * 40)),
        "binary_length",
        ["'x'", "40 bytes", "48"],
    ),
    "raw-count": (_raw_count_mismatch, "binary_length", ["1 entries for 2 inputs"]),
    "raw-and-typed": (_raw_and_typed, "invalid_request", ["'x'", "raw_input_contents"]),
    "bytes-truncated": (
        lambda: grpc_request(("s", "BYTES", [2], bytes_blob(b"abc") + b"\5\0\0\0ab")),
        "binary_length",
        ["'s'", "element 1"],
    ),
    "typed-wrong-field": (
        lambda: _typed("FP64", "fp32_contents", [1.0], [1]),
        "tensor_data",
        ["'x'", "fp32_contents", "fp64_contents"],
    ),
    "typed-count": (lambda: _typed("FP64", "fp64_contents", [1.0, 2.0], [3]), "tensor_shape", ["'x'", "[3]"]),
    "typed-int8-overflow": (
        lambda: _typed("INT8", "int_contents", [1000], [1]),
        "tensor_data",
        ["'x'", "INT8"],
    ),
    "typed-fp16": (
        lambda: _typed("FP16", "fp32_contents", [1.0], [1]),
        "tensor_data",
        ["'x'", "raw_input_contents"],
    ),
    "typed-bytes-not-utf8": (
        lambda: _typed("BYTES", "bytes_contents", [b"\xff"], [1]),
        "tensor_data",
        ["'x'", "UTF-8"],
    ),
    "duplicate-output": (_duplicate_output, "duplicate_tensor", ["'label'"]),
}


@pytest.mark.parametrize("case", GRPC_CASES)
def test_bad_grpc_requests_raise_bad_input_naming_the_problem(case: str) -> None:
    build, reason, named = GRPC_CASES[case]
    with pytest.raises(BadInputError) as caught:
        decode_grpc_request(build())
    assert caught.value.reason == reason, caught.value.message
    for text in named:
        assert text in caught.value.message


def test_mangled_bodies_raise_only_bad_input() -> None:
    """Truncated, extended and bit-flipped versions of valid requests either decode or raise BadInputError."""
    inputs = [
        triton_http.InferInput("rows", [2, 3], "FP64").set_data_from_numpy(np.ones((2, 3)), binary_data=True),
        triton_http.InferInput("color", [2], "BYTES").set_data_from_numpy(
            np.array(["red", "blue"], dtype=object), binary_data=True
        ),
        triton_http.InferInput("member", [2], "BOOL").set_data_from_numpy(
            np.array([True, False]), binary_data=True
        ),
    ]
    body, header_length = triton_http.InferenceServerClient.generate_request_body(inputs)
    raw = grpc_request(
        ("rows", "FP64", [2, 3], np.ones(6).tobytes()),
        ("color", "BYTES", [2], bytes_blob(b"red", b"blue")),
        ("member", "BOOL", [2], b"\1\0"),
    ).SerializeToString()
    rng = random.Random(7)
    for _ in range(3000):
        mangled = bytearray(body)
        operation = rng.randrange(3)
        if operation == 0:
            del mangled[rng.randrange(len(mangled)) :]
        elif operation == 1:
            mangled += rng.randbytes(rng.randrange(1, 9))
        else:
            # Mostly in the binary part, where JSON parsing cannot catch the damage.
            first = rng.choice([0, header_length, header_length])
            for _ in range(rng.randrange(1, 4)):
                mangled[rng.randrange(first, len(mangled))] = rng.randrange(256)
        length = rng.choice([header_length, None, rng.randrange(len(mangled) + 2)])
        with contextlib.suppress(BadInputError):
            decode_rest_request(bytes(mangled), length)
        message = bytearray(raw)
        message[rng.randrange(len(message))] = rng.randrange(256)
        try:
            request = pb.ModelInferRequest.FromString(bytes(message))
        except Exception:  # not a protobuf message at all: grpc would not get this far
            continue
        with contextlib.suppress(BadInputError):
            decode_grpc_request(request)


# ---- the gRPC server -------------------------------------------------------------------------------------

ROWS = 12


def toy_table(rows: int, seed: int) -> tuple[pd.DataFrame, pd.Series]:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "size": rng.normal(10, 2, rows),
            "weight": rng.normal(50, 10, rows),
            "color": rng.choice(["red", "green", "blue"], rows),
            "member": rng.choice([True, False], rows),
        }
    )
    target = np.where(frame["size"] + (frame["color"] == "red") * 2 > 11, "yes", "no")
    return frame, pd.Series(target, name="target")


@dataclass
class ToyModel:
    stored: StoredModel
    pipeline: Any

    def probabilities(self, frame: pd.DataFrame) -> np.ndarray:
        result: np.ndarray = self.pipeline.predict_proba(self.stored.schema.prepare(frame))
        return result


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> ToyModel:
    frame, target = toy_table(200, seed=1)
    schema = FeatureSchema.infer(frame)
    pipeline = candidates(Task.CLASSIFICATION, schema, seed=1)["logistic_regression"]
    pipeline.fit(schema.prepare(frame), target)
    stored = StoredModel(
        tag="toy:v1",
        name="toy",
        version="v1",
        path=tmp_path_factory.mktemp("toy-model"),
        labels={
            "registered_version": "1",
            "mlflow_run_id": "run",
            "registered_model": "toy",
            "alias": "champion",
        },
        metadata={"task": "classification", "classes": ["no", "yes"], "dataset_digest": "digest"},
        schema=schema,
    )
    return ToyModel(stored, pipeline)


class Loop:
    """An event loop on its own thread: the servers run there while the test thread calls them with
    blocking clients, as separate processes would."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, Any], timeout: float = 20) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(scope="module")
def loop() -> Iterator[Loop]:
    running = Loop()
    yield running
    running.close()


ModelCall = Callable[[pd.DataFrame], Coroutine[Any, Any, np.ndarray]]
PlaneFactory = Callable[..., DataPlane]


@pytest.fixture(scope="module")
def new_plane(toy: ToyModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PlaneFactory]:
    """Real DataPlanes over the toy pipeline, or over `call` in its place."""
    logs: list[ArrowLog] = []

    def new(call: ModelCall | None = None) -> DataPlane:
        async def call_model(rows: np.ndarray) -> np.ndarray:
            # As the model service does: rows in schema column order.
            frame = pd.DataFrame(rows, columns=toy.stored.schema.names)
            return await call(frame) if call is not None else toy.probabilities(frame)

        logs.append(ArrowLog(tmp_path_factory.mktemp("predictions"), 1_000_000, 1))
        scorer = {"scorer": "scikit-learn", "reason": "a test's model call"}
        return DataPlane(toy.stored, call_model, scorer, logs[-1], serving_metrics())

    yield new
    for log in logs:
        log.close()


@dataclass
class Running:
    target: str
    plane: DataPlane
    server: GrpcServer


@pytest.fixture(scope="module")
def served(new_plane: PlaneFactory, loop: Loop) -> Iterator[Running]:
    plane = new_plane()
    server = loop.run(start_grpc_server(lambda: plane, "127.0.0.1", 0, Admission(10**6, 3600)))
    yield Running(f"127.0.0.1:{server.port}", plane, server)
    loop.run(server.stop(grace=1))


def triton_inputs(frame: pd.DataFrame) -> list[triton_grpc.InferInput]:
    rows = len(frame)
    return [
        triton_grpc.InferInput("size", [rows], "FP64").set_data_from_numpy(frame["size"].to_numpy()),
        triton_grpc.InferInput("weight", [rows, 1], "FP32").set_data_from_numpy(
            frame["weight"].to_numpy(np.float32).reshape(-1, 1)
        ),
        triton_grpc.InferInput("color", [rows], "BYTES").set_data_from_numpy(frame["color"].to_numpy(object)),
        triton_grpc.InferInput("member", [rows], "BOOL").set_data_from_numpy(frame["member"].to_numpy(bool)),
    ]


def test_tritonclient_grpc_health_and_metadata(served: Running) -> None:
    client = triton_grpc.InferenceServerClient(served.target)
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("toy")
    assert client.is_model_ready("toy", "v1")
    server = client.get_server_metadata(as_json=True)
    assert server["name"] == "tabserve"
    assert "binary_tensor_data" in server["extensions"]
    metadata = client.get_model_metadata("toy", as_json=True)
    assert metadata["name"] == "toy"
    assert metadata["versions"] == ["v1"]
    assert [(tensor["name"], tensor["datatype"]) for tensor in metadata["inputs"]] == [
        ("size", "FP64"),
        ("weight", "FP64"),
        ("color", "BYTES"),
        ("member", "BOOL"),
    ]
    assert [tensor["name"] for tensor in metadata["outputs"]] == ["label", "probabilities"]


def test_tritonclient_grpc_infer_gets_the_pipelines_predictions(served: Running, toy: ToyModel) -> None:
    frame, _ = toy_table(ROWS, seed=2)
    client = triton_grpc.InferenceServerClient(served.target)
    result = client.infer("toy", triton_inputs(frame), request_id="req-9")
    expected = toy.probabilities(frame.assign(weight=frame["weight"].astype(np.float32)))
    assert result.get_response().id == "req-9"
    assert np.array_equal(result.as_numpy("probabilities"), expected)
    labels = [label.decode() for label in result.as_numpy("label").tolist()]
    assert labels == np.array(["no", "yes"])[expected.argmax(axis=1)].tolist()
    # Only what was asked for.
    only = client.infer("toy", triton_inputs(frame), outputs=[triton_grpc.InferRequestedOutput("label")])
    assert only.as_numpy("probabilities") is None
    assert only.as_numpy("label").shape == (ROWS,)


def test_typed_contents_get_typed_contents_back(served: Running, toy: ToyModel) -> None:
    frame, _ = toy_table(3, seed=3)
    request = pb.ModelInferRequest(model_name="toy", id="typed")
    for name, datatype, field in [
        ("size", "FP64", "fp64_contents"),
        ("weight", "FP64", "fp64_contents"),
        ("color", "BYTES", "bytes_contents"),
        ("member", "BOOL", "bool_contents"),
    ]:
        values = [value.encode() if isinstance(value, str) else value for value in frame[name].tolist()]
        getattr(request.inputs.add(name=name, datatype=datatype, shape=[3]).contents, field).extend(values)
    with grpc.insecure_channel(served.target) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    assert not response.raw_output_contents
    assert (response.model_name, response.model_version, response.id) == ("toy", "v1", "typed")
    probabilities = response.outputs[1]
    assert np.array_equal(np.reshape(probabilities.contents.fp64_contents, (3, 2)), toy.probabilities(frame))


def infer_error(target: str, model: str, inputs: list[triton_grpc.InferInput]) -> InferenceServerException:
    client = triton_grpc.InferenceServerClient(target)
    with pytest.raises(InferenceServerException) as caught:
        client.infer(model, inputs)
    return caught.value


def test_invalid_requests_get_invalid_argument_naming_the_problem(served: Running) -> None:
    frame, _ = toy_table(2, seed=4)
    # Valid protocol, invalid for the model (the data plane refuses it).
    missing = infer_error(served.target, "toy", triton_inputs(frame)[:3])
    assert missing.status() == "StatusCode.INVALID_ARGUMENT"
    assert "'member'" in missing.message()
    strings = triton_inputs(frame)
    strings[0] = triton_grpc.InferInput("size", [2], "BYTES").set_data_from_numpy(
        np.array([b"a", b"b"], dtype=object)
    )
    wrong = infer_error(served.target, "toy", strings)
    assert wrong.status() == "StatusCode.INVALID_ARGUMENT"
    assert "'size'" in wrong.message()
    # Invalid protocol (the codec refuses it): 40 raw bytes for a [2, 3] FP64 tensor.
    with grpc.insecure_channel(served.target) as channel, pytest.raises(grpc.RpcError) as caught:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            grpc_request(("size", "FP64", [2, 3], b"\0" * 40)), timeout=10
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'size'" in caught.value.details()
    assert "40 bytes" in caught.value.details()


def test_unknown_model_is_not_found(served: Running) -> None:
    frame, _ = toy_table(2, seed=5)
    error = infer_error(served.target, "nope", triton_inputs(frame))
    assert error.status() == "StatusCode.NOT_FOUND"
    assert "'nope'" in error.message()
    client = triton_grpc.InferenceServerClient(served.target)
    for call in (
        lambda: client.get_model_metadata("nope"),
        lambda: client.is_model_ready("toy", "v0"),
    ):
        with pytest.raises(InferenceServerException) as caught:
            call()
        assert caught.value.status() == "StatusCode.NOT_FOUND"


def test_health_service(served: Running) -> None:
    with grpc.insecure_channel(served.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as caught:
            health.Check(health_pb2.HealthCheckRequest(service="no.Such"), timeout=10)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_describes_the_services(served: Running) -> None:
    with grpc.insecure_channel(served.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="grpc.health.v1.Health"),
        ]
        listing, inference, health = list(stub.ServerReflectionInfo(iter(requests), timeout=10))
    services = {service.name for service in listing.list_services_response.service}
    assert services == {SERVICE_NAME, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
    [proto] = inference.file_descriptor_response.file_descriptor_proto
    described = descriptor_pb2.FileDescriptorProto.FromString(proto)
    assert described.package == "inference"
    assert [method.name for method in described.service[0].method] == [
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
    ]
    assert health.file_descriptor_response.file_descriptor_proto


def test_unexpected_errors_are_internal_without_details(new_plane: PlaneFactory, loop: Loop) -> None:
    async def broken(frame: pd.DataFrame) -> np.ndarray:
        raise RuntimeError("secret detail")

    plane = new_plane(broken)
    server = loop.run(start_grpc_server(lambda: plane, "127.0.0.1", 0, Admission(10**6, 3600)))
    try:
        frame, _ = toy_table(2, seed=6)
        error = infer_error(f"127.0.0.1:{server.port}", "toy", triton_inputs(frame))
        assert error.status() == "StatusCode.INTERNAL"
        assert "secret" not in error.message()
        assert "ModelInfer" in error.message()
    finally:
        loop.run(server.stop(grace=1))


def test_stop_drains_in_flight_requests_and_reports_not_serving(
    toy: ToyModel, new_plane: PlaneFactory, loop: Loop
) -> None:
    started, release = threading.Event(), asyncio.Event()

    async def slow(frame: pd.DataFrame) -> np.ndarray:
        started.set()
        await release.wait()
        return toy.probabilities(frame)

    plane = new_plane(slow)
    server = loop.run(start_grpc_server(lambda: plane, "127.0.0.1", 0, Admission(10**6, 3600)))
    target = f"127.0.0.1:{server.port}"
    frame, _ = toy_table(2, seed=7)
    with ThreadPoolExecutor(2) as pool, grpc.insecure_channel(target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=20
        )
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        in_flight = pool.submit(
            lambda: triton_grpc.InferenceServerClient(target).infer("toy", triton_inputs(frame))
        )
        assert started.wait(10)
        stopping = asyncio.run_coroutine_threadsafe(server.stop(grace=10), loop.loop)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()  # an open Watch is an in-flight call too: it would hold stop() for the whole grace
        time.sleep(0.2)  # stop() is now refusing new calls while the first one waits for the model
        with pytest.raises(InferenceServerException):
            triton_grpc.InferenceServerClient(target).is_server_live(client_timeout=5)
        loop.loop.call_soon_threadsafe(release.set)
        assert in_flight.result(10).as_numpy("label").shape == (2,)
        stopping.result(15)


def test_port_in_use_is_a_clear_error_and_workers_can_share_a_port(
    new_plane: PlaneFactory, loop: Loop
) -> None:
    plane = new_plane()
    with socket.socket() as taken:  # no SO_REUSEPORT: nobody may share this port
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(GrpcBindError, match=f"127.0.0.1:{port}"):
            loop.run(start_grpc_server(lambda: plane, "127.0.0.1", port, Admission(10**6, 3600)))
    first = loop.run(start_grpc_server(lambda: plane, "127.0.0.1", 0, Admission(10**6, 3600)))
    second = loop.run(start_grpc_server(lambda: plane, "127.0.0.1", first.port, Admission(10**6, 3600)))
    try:
        assert second.port == first.port
        assert triton_grpc.InferenceServerClient(f"127.0.0.1:{first.port}").is_server_live()
    finally:
        loop.run(first.stop(grace=0))
        loop.run(second.stop(grace=0))
