"""What the container smoke test asks a running service, over every transport users call it with.

Each check raises ProbeError with what it saw when the answer is wrong. The record sent is built from the
service's own feature schema (GET /model), so the checks work for whatever model the image carries.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import grpc
import httpx

from serving.oip import grpc_predict_v2_pb2 as pb
from serving.oip import grpc_predict_v2_pb2_grpc as pb_grpc


class ProbeError(AssertionError):
    pass


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise ProbeError(message)


def wait_ready(url: str, timeout: float, still_running: Callable[[], bool], interval: float = 0.5) -> float:
    """Poll BentoML's /readyz every `interval` seconds until it answers 200; returns the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        expect(still_running(), f"the container stopped before {url}/readyz answered")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        time.sleep(interval)
    raise ProbeError(f"{url}/readyz did not answer 200 within {timeout:.0f} s")


def wait_http_ok(url: str, timeout: float, headers: dict[str, str] | None = None) -> float:
    started = time.monotonic()
    last = "no answer"
    while time.monotonic() - started < timeout:
        try:
            response = httpx.get(url, headers=headers, timeout=5)
            if response.status_code == 200:
                return time.monotonic() - started
            last = f"{response.status_code} {response.text[:200]}"
        except httpx.TransportError as error:
            last = repr(error)
        time.sleep(1)
    raise ProbeError(f"{url} did not answer 200 within {timeout:.0f} s (last: {last})")


def model_info(url: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    response = httpx.get(f"{url}/model", headers=headers, timeout=10)
    expect(response.status_code == 200, f"GET /model: {response.status_code} {response.text[:300]}")
    info: dict[str, Any] = response.json()
    return info


def record_from_schema(info: dict[str, Any]) -> dict[str, Any]:
    """One valid record: mid-range numbers, the most frequent category, False for booleans."""
    record: dict[str, Any] = {}
    for feature in info["feature_schema"]["features"]:
        if feature["kind"] == "numeric":
            record[feature["name"]] = (feature["minimum"] + feature["maximum"]) / 2
        elif feature["kind"] == "boolean":
            record[feature["name"]] = False
        else:
            record[feature["name"]] = feature["categories"][0]
    return record


def records_from_schema(info: dict[str, Any], count: int) -> list[dict[str, Any]]:
    """`count` different valid records: numbers spread over their training range, categories in turn."""
    records = []
    for index in range(count):
        position = (index * 0.618) % 1  # golden-ratio steps: spread evenly, no two records alike
        record: dict[str, Any] = {}
        for feature in info["feature_schema"]["features"]:
            if feature["kind"] == "numeric":
                low, high = feature["minimum"], feature["maximum"]
                record[feature["name"]] = low + (high - low) * position
            elif feature["kind"] == "boolean":
                record[feature["name"]] = index % 2 == 1
            else:
                record[feature["name"]] = feature["categories"][index % len(feature["categories"])]
        records.append(record)
    return records


def check_predict_batch(
    url: str, records: list[dict[str, Any]], headers: dict[str, str] | None = None
) -> None:
    response = httpx.post(f"{url}/predict_batch", json=records, headers=headers, timeout=60)
    expect(response.status_code == 200, f"POST /predict_batch: {response.status_code} {response.text[:500]}")
    expect(len(response.json()) == len(records), "/predict_batch did not answer every record")


def check_predict(
    url: str, info: dict[str, Any], record: dict[str, Any], headers: dict[str, str] | None = None
) -> Any:
    """POST /predict with one record (`headers`: e.g. an API key's); returns the prediction."""
    response = httpx.post(f"{url}/predict", json=record, headers=headers, timeout=30)
    expect(response.status_code == 200, f"POST /predict: {response.status_code} {response.text[:500]}")
    answer = response.json()
    expect(
        (answer["model"], answer["version"]) == (info["model"], info["version"]),
        f"/predict answered for {answer['model']}:{answer['version']}, /model says "
        f"{info['model']}:{info['version']}",
    )
    return answer["prediction"]


def check_explain(
    url: str, record: dict[str, Any], prediction: Any, headers: dict[str, str] | None = None
) -> None:
    """POST /explain (shap, with numba, in the image): the same prediction, and base plus attributions add
    up to the explained output."""
    response = httpx.post(f"{url}/explain", json=record, headers=headers, timeout=120)
    expect(response.status_code == 200, f"POST /explain: {response.status_code} {response.text[:500]}")
    answer = response.json()
    expect(
        answer["prediction"] == prediction, f"/explain predicted {answer['prediction']!r}, not {prediction!r}"
    )
    explanation = answer["explanation"]
    total = explanation["base_value"] + sum(explanation["attributions"].values())
    expect(
        math.isclose(total, explanation["output_value"], rel_tol=1e-6, abs_tol=1e-6),
        f"/explain: base + attributions = {total}, output {explanation['output_value']}",
    )


def check_refused_without_key(url: str, record: dict[str, Any]) -> None:
    """With auth on: no key is 401 with WWW-Authenticate, before anything is predicted."""
    response = httpx.post(f"{url}/predict", json=record, timeout=30)
    expect(
        response.status_code == 401 and response.headers.get("www-authenticate") == "Bearer",
        f"POST /predict without a key: {response.status_code} {response.text[:300]}",
    )


def check_bad_request(url: str, record: dict[str, Any]) -> None:
    """A wrong type gets a 400 that names the field, and the server keeps serving."""
    name = next(iter(record))
    response = httpx.post(f"{url}/predict", json={**record, name: "not a number"}, timeout=30)
    expect(response.status_code == 400, f"bad /predict: {response.status_code}, expected 400")
    expect(name in response.text, f"the 400 does not name the field {name!r}: {response.text[:300]}")


def _rest_tensor(feature: dict[str, Any], value: Any) -> dict[str, Any]:
    datatype = {"numeric": "FP64", "boolean": "BOOL"}.get(feature["kind"], "BYTES")
    return {"name": feature["name"], "shape": [1], "datatype": datatype, "data": [value]}


def check_oip_rest(url: str, info: dict[str, Any], record: dict[str, Any], expected: Any) -> None:
    """Open Inference Protocol over REST, one tensor per feature."""
    features = info["feature_schema"]["features"]
    body = {"inputs": [_rest_tensor(feature, record[feature["name"]]) for feature in features]}
    response = httpx.post(f"{url}/v2/models/{info['model']}/infer", json=body, timeout=30)
    expect(response.status_code == 200, f"OIP REST infer: {response.status_code} {response.text[:500]}")
    outputs = {output["name"]: output for output in response.json()["outputs"]}
    if "label" in outputs:
        expect(
            outputs["label"]["data"] == [expected], f"OIP REST label {outputs['label']['data']} != {expected}"
        )


def _grpc_tensor(feature: dict[str, Any], value: Any) -> pb.ModelInferRequest.InferInputTensor:
    tensor = pb.ModelInferRequest.InferInputTensor(name=feature["name"], shape=[1])
    if feature["kind"] == "numeric":
        tensor.datatype = "FP64"
        tensor.contents.fp64_contents.append(float(value))
    elif feature["kind"] == "boolean":
        tensor.datatype = "BOOL"
        tensor.contents.bool_contents.append(bool(value))
    else:
        tensor.datatype = "BYTES"
        tensor.contents.bytes_contents.append(str(value).encode())
    return tensor


def check_grpc(target: str, info: dict[str, Any], record: dict[str, Any], expected: Any) -> None:
    """Open Inference Protocol over gRPC: ServerReady, then ModelInfer with one tensor per feature."""
    features = info["feature_schema"]["features"]
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        ready = stub.ServerReady(pb.ServerReadyRequest(), timeout=10)
        expect(ready.ready, f"gRPC ServerReady at {target} says not ready")
        request = pb.ModelInferRequest(
            model_name=info["model"],
            inputs=[_grpc_tensor(feature, record[feature["name"]]) for feature in features],
        )
        response = stub.ModelInfer(request, timeout=30)
    expect(response.model_name == info["model"], f"gRPC answered for model {response.model_name!r}")
    expect(response.model_version == info["version"], f"gRPC answered for version {response.model_version!r}")
    labels = [list(output.contents.bytes_contents) for output in response.outputs if output.name == "label"]
    if labels:
        expect(labels[0] == [str(expected).encode()], f"gRPC label {labels[0]} != {expected!r}")


def metric_lines(url: str) -> list[str]:
    response = httpx.get(f"{url}/metrics", timeout=10)
    expect(response.status_code == 200, f"GET /metrics: {response.status_code}")
    return [line for line in response.text.splitlines() if line and not line.startswith("#")]


def check_metrics(url: str) -> None:
    """After the calls above, /metrics counts them: ours per transport, and BentoML's own."""
    lines = metric_lines(url)

    def seen(name: str, label: str = "") -> bool:
        return any(line.startswith(name) and label in line and not line.endswith(" 0.0") for line in lines)

    for transport in ("http", "oip_rest", "grpc"):
        expect(
            seen("tabserve_request_seconds_count", f'transport="{transport}"'),
            f"/metrics has no {transport} request",
        )
    expect(seen("tabserve_predictions_total"), "/metrics has no tabserve_predictions_total")
    expect(seen("tabserve_validation_errors_total"), "/metrics has no tabserve_validation_errors_total")
    expect(seen("tabserve_batch_rows_count"), "/metrics has no tabserve_batch_rows_count")
    expect(seen("bentoml_service_request_total", 'endpoint="/predict"'), "/metrics has no BentoML counters")


def check_evidently_project(url: str) -> None:
    """The Evidently UI lists a project: the drift report's snapshot, read from the shared workspace."""
    response = httpx.get(f"{url}/api/projects", timeout=10)
    expect(response.status_code == 200, f"Evidently UI /api/projects: {response.status_code}")
    projects = response.json()
    expect(bool(projects), "the Evidently UI lists no project after the drift report")
