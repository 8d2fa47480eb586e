"""The same server over every transport: HTTP, Open Inference Protocol REST and gRPC, called by the clients
users call us with (tritonclient, grpcio's health and reflection clients)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.utils import InferenceServerException

from models.data import load_default
from models.store import StoredModel
from tests.conftest import MAX_BODY_BYTES, Server, logged_rows

ROWS = 16


@pytest.fixture(scope="module")
def features() -> np.ndarray:
    return load_default().features.iloc[:ROWS].to_numpy(dtype=np.float64)


@pytest.fixture(scope="module")
def stored(server: Server) -> StoredModel:
    return StoredModel.open("breast_cancer:latest")


@pytest.fixture(scope="module")
def names(stored: StoredModel) -> list[str]:
    return stored.schema.names


def http_predictions(server: Server, features: np.ndarray, names: list[str]) -> tuple[list[str], np.ndarray]:
    records = [dict(zip(names, row.tolist(), strict=True)) for row in features]
    answers = httpx.post(f"{server.url}/predict_batch", json=records, timeout=60).json()
    return [a["prediction"] for a in answers], np.array(
        [[a["probabilities"][c] for c in ("benign", "malignant")] for a in answers]
    )


def triton_http_inputs(features: np.ndarray, binary: bool) -> list[triton_http.InferInput]:
    tensor = triton_http.InferInput("rows", list(features.shape), "FP64")
    tensor.set_data_from_numpy(features, binary_data=binary)
    return [tensor]


@pytest.mark.parametrize("binary", [True, False], ids=["binary-extension", "json"])
def test_tritonclient_http_gets_the_same_predictions_as_http_and_in_process(
    server: Server, stored: StoredModel, features: np.ndarray, names: list[str], binary: bool
) -> None:
    client = triton_http.InferenceServerClient(server.url.removeprefix("http://"))
    assert client.is_server_live()
    assert client.is_model_ready("breast_cancer")
    outputs = [
        triton_http.InferRequestedOutput("label", binary_data=binary),
        triton_http.InferRequestedOutput("probabilities", binary_data=binary),
    ]
    result = client.infer("breast_cancer", triton_http_inputs(features, binary), outputs=outputs)
    labels = [
        value.decode() if isinstance(value, bytes) else value for value in result.as_numpy("label").tolist()
    ]
    probabilities = result.as_numpy("probabilities")
    expected = stored.predict(load_default().features.iloc[:ROWS])
    assert labels == expected.labels.tolist()
    assert np.array_equal(probabilities, expected.probabilities)
    http_labels, http_probabilities = http_predictions(server, features, names)
    assert labels == http_labels
    assert np.allclose(probabilities, http_probabilities, rtol=0, atol=1e-12)


def test_tritonclient_grpc_gets_the_same_predictions(
    server: Server, stored: StoredModel, features: np.ndarray
) -> None:
    client = triton_grpc.InferenceServerClient(server.grpc_target)
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("breast_cancer")
    metadata = client.get_model_metadata("breast_cancer", as_json=True)
    assert metadata["name"] == "breast_cancer"
    assert metadata["versions"] == [stored.version]
    assert (
        metadata["platform"] == "tabserve_compiled"
    )  # the scorer that serves (gRPC metadata has no parameters)
    tensor = triton_grpc.InferInput("rows", list(features.shape), "FP64")
    tensor.set_data_from_numpy(features)
    result = client.infer("breast_cancer", [tensor])
    labels = [value.decode() for value in result.as_numpy("label").tolist()]
    expected = stored.predict(load_default().features.iloc[:ROWS])
    assert labels == expected.labels.tolist()
    assert np.array_equal(result.as_numpy("probabilities"), expected.probabilities)


def test_one_tensor_per_feature_is_accepted(server: Server, features: np.ndarray, names: list[str]) -> None:
    inputs = [
        {"name": name, "shape": [ROWS], "datatype": "FP64", "data": features[:, index].tolist()}
        for index, name in enumerate(names)
    ]
    response = httpx.post(f"{server.url}/v2/models/breast_cancer/infer", json={"inputs": inputs}, timeout=60)
    assert response.status_code == 200, response.text
    outputs = {output["name"]: output for output in response.json()["outputs"]}
    http_labels, _ = http_predictions(server, features, names)
    assert outputs["label"]["data"] == http_labels
    assert outputs["probabilities"]["shape"] == [ROWS, 2]


def test_requested_outputs_are_honoured(server: Server, features: np.ndarray) -> None:
    body = {
        "inputs": [
            {
                "name": "rows",
                "shape": list(features.shape),
                "datatype": "FP64",
                "data": features.ravel().tolist(),
            }
        ],
        "outputs": [{"name": "probabilities"}],
    }
    response = httpx.post(f"{server.url}/v2/models/breast_cancer/infer", json=body, timeout=60)
    assert [output["name"] for output in response.json()["outputs"]] == ["probabilities"]


def test_oip_metadata_and_health(server: Server, stored: StoredModel) -> None:
    assert httpx.get(f"{server.url}/v2/health/live").status_code == 200
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
    assert "binary_tensor_data" in httpx.get(f"{server.url}/v2").json()["extensions"]
    metadata = httpx.get(f"{server.url}/v2/models/breast_cancer").json()
    assert [i["name"] for i in metadata["inputs"]] == stored.schema.names
    versioned = httpx.get(f"{server.url}/v2/models/breast_cancer/versions/{stored.version}/ready")
    assert versioned.status_code == 200


def tensor(name: str, shape: list[int], datatype: str, data: list[object]) -> dict[str, object]:
    return {"name": name, "shape": shape, "datatype": datatype, "data": data}


BAD_OIP = {
    "wrong shape": ({"inputs": [tensor("rows", [2, 30], "FP64", [1.0] * 30)]}, "rows"),
    "wrong width": ({"inputs": [tensor("rows", [1, 3], "FP64", [1.0, 2.0, 3.0])]}, "30"),
    "unknown datatype": ({"inputs": [tensor("rows", [1, 30], "FP99", [1.0] * 30)]}, "FP99"),
    "datatype not a string": (
        {"inputs": [{**tensor("rows", [1, 30], "", [1.0] * 30), "datatype": {"a": 1}}]},
        "{'a': 1}",
    ),
    "text in a number tensor": (
        {"inputs": [tensor("rows", [1, 30], "BYTES", ["a"] * 30)]},
        "expected numbers",
    ),
    "no inputs": ({"inputs": []}, "inputs"),
    "unknown output": (
        {"inputs": [tensor("rows", [1, 30], "FP64", [1.0] * 30)], "outputs": [{"name": "colour"}]},
        "colour",
    ),
}


@pytest.mark.parametrize("case", BAD_OIP)
def test_bad_oip_requests_get_400_naming_the_problem(server: Server, case: str) -> None:
    body, named = BAD_OIP[case]
    response = httpx.post(f"{server.url}/v2/models/breast_cancer/infer", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert named in response.json()["error"]


def test_inference_header_length_that_is_no_byte_count_gets_400(server: Server) -> None:
    for value in ["\u00b2", "-1", "12a"]:  # '²' passes str.isdigit() but not int()
        response = httpx.post(
            f"{server.url}/v2/models/breast_cancer/infer",
            content=b"{}",
            headers={"Inference-Header-Content-Length": value.encode("latin-1")},
            timeout=60,
        )
        assert response.status_code == 400, (value, response.text)
        assert "inference-header-content-length must be a byte count" in response.json()["error"]


def test_a_chunked_body_over_the_limit_gets_413(server: Server, features: np.ndarray) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: only the bytes received can tell
        piece = b" " * 65_536
        for _ in range(MAX_BODY_BYTES // len(piece) + 2):
            yield piece

    for path in ["/v2/models/breast_cancer/infer", "/v2/models/breast_cancer/versions/1/infer"]:
        response = httpx.post(f"{server.url}{path}", content=chunks(), timeout=60)
        assert response.status_code == 413, path
        assert response.json() == {"error": f"request body is over the limit of {MAX_BODY_BYTES} bytes"}
    body = {"inputs": [tensor("rows", list(features.shape), "FP64", features.reshape(-1).tolist())]}
    response = httpx.post(f"{server.url}/v2/models/breast_cancer/infer", json=body, timeout=60)
    assert response.status_code == 200


def test_mismatched_tensor_lengths_name_both(server: Server, names: list[str]) -> None:
    inputs = [tensor(name, [2], "FP64", [1.0, 2.0]) for name in names]
    inputs[3] = tensor(names[3], [3], "FP64", [1.0, 2.0, 3.0])
    response = httpx.post(f"{server.url}/v2/models/breast_cancer/infer", json={"inputs": inputs}, timeout=60)
    assert response.status_code == 400
    assert names[3] in response.json()["error"]


def test_binary_tensor_with_wrong_byte_length_gets_400(server: Server) -> None:
    header = (
        b'{"inputs":[{"name":"rows","shape":[1,30],"datatype":"FP64","parameters":{"binary_data_size":16}}]}'
    )
    response = httpx.post(
        f"{server.url}/v2/models/breast_cancer/infer",
        content=header + b"\x00" * 16,
        headers={"Inference-Header-Content-Length": str(len(header))},
        timeout=60,
    )
    assert response.status_code == 400
    assert "rows" in response.json()["error"]


def test_unknown_model_is_404_over_rest_and_not_found_over_grpc(server: Server, features: np.ndarray) -> None:
    assert httpx.get(f"{server.url}/v2/models/nope").status_code == 404
    response = httpx.post(f"{server.url}/v2/models/nope/infer", json={"inputs": []})
    assert response.status_code == 404
    client = triton_grpc.InferenceServerClient(server.grpc_target)
    tensor_in = triton_grpc.InferInput("rows", list(features.shape), "FP64")
    tensor_in.set_data_from_numpy(features)
    with pytest.raises(InferenceServerException) as caught:
        client.infer("nope", [tensor_in])
    assert caught.value.status() == "StatusCode.NOT_FOUND"


def test_bad_grpc_input_is_invalid_argument(server: Server) -> None:
    client = triton_grpc.InferenceServerClient(server.grpc_target)
    tensor_in = triton_grpc.InferInput("rows", [1, 3], "FP64")
    tensor_in.set_data_from_numpy(np.ones((1, 3)))
    with pytest.raises(InferenceServerException) as caught:
        client.infer("breast_cancer", [tensor_in])
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "30" in str(caught.value.message())
    assert client.is_server_live()


def test_grpc_health_and_reflection(server: Server) -> None:
    with grpc.insecure_channel(server.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        [answer] = list(
            reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
            )
        )
        services = {service.name for service in answer.list_services_response.service}
        assert "inference.GRPCInferenceService" in services
        assert "grpc.health.v1.Health" in services


def test_grpc_predictions_are_logged_with_their_transport(server: Server) -> None:
    deadline = time.monotonic() + 10
    transports: set[str] = set()
    while time.monotonic() < deadline and not {"grpc", "oip_rest"} <= transports:
        transports = {row["transport"] for row in logged_rows(server.log_dir)}
        time.sleep(0.2)
    assert {"grpc", "oip_rest"} <= transports
