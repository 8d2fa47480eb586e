"""Authentication (serving/auth.py): the key file, the gate's decisions and the failure limit in-process;
then a real `bentoml serve` with auth on, called over HTTP, OIP REST and gRPC as users call it."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from models.data import load_default
from serving.auth import (
    RIGHTS,
    Access,
    FailureLimiter,
    Gate,
    KeyFileError,
    KeyStore,
    digest_of,
    parse_keys,
    presented_key,
)
from serving.oip import grpc_predict_v2_pb2 as pb
from serving.oip import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.conftest import PROJECT_ROOT, Server, Stores, free_port, logged_rows, start_server, wait_ready

# ---- the key file, the gate and the limit, in-process -----------------------------------------------------


def line(name: str, raw_key: str, rights: str = "") -> str:
    return f"{name}:{digest_of(raw_key).hex()}" + (f":{rights}" if rights else "")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_key_file_gives_names_digests_and_rights() -> None:
    text = f"# team keys\n\n{line('ci', 'secret-1', 'predict')}\n  {line('ops', 'secret-2')}  \n"
    ci, ops = parse_keys(text, "keys.txt")
    assert (ci.name, ci.rights, ci.digest) == ("ci", {"predict"}, digest_of("secret-1"))
    assert ops.rights == set(RIGHTS)  # no rights given: every right


@pytest.mark.parametrize(
    ("bad_line", "problem"),
    [
        ("just-a-name", "needs the SHA-256 of the key as 64 hex digits"),
        (f"ci:{'ab' * 31}", "needs the SHA-256"),
        (f"has space:{'ab' * 32}", "expected name:sha256[:rights]"),
        (f"ci:{'ab' * 32}:predict,admin", "unknown right admin for the key 'ci'"),
        (line("one", "a"), "the key name 'one' is used twice"),
    ],
)
def test_a_bad_line_is_named_by_file_and_number_without_its_digest(bad_line: str, problem: str) -> None:
    with pytest.raises(KeyFileError) as raised:
        parse_keys(f"{line('one', 'x')}\n{bad_line}\n", "keys.txt")
    message = str(raised.value)
    assert message.startswith("keys.txt, line 2: ")
    assert problem in message
    assert digest_of("a").hex() not in message


def test_an_empty_or_missing_key_file_stops_the_start(tmp_path: Path) -> None:
    (tmp_path / "empty").write_text("# nothing yet\n")
    with pytest.raises(KeyFileError, match="holds no keys"):
        KeyStore(tmp_path / "empty", 10)
    with pytest.raises(KeyFileError, match=r"cannot read the key file .*missing"):
        KeyStore(tmp_path / "missing", 10)


def test_keys_match_by_digest_and_the_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    path, clock = tmp_path / "keys.txt", Clock()
    path.write_text(line("old", "old-secret") + "\n")
    store = KeyStore(path, reload_seconds=5, clock=clock)
    assert store.match("old-secret").name == "old"  # type: ignore[union-attr]
    assert store.match("old-secre") is None
    assert store.match("") is None
    path.write_text(line("new", "new-secret") + "\n")
    clock.now += 1  # within the reload period: not looked at yet
    assert store.match("old-secret") is not None
    clock.now += 5
    assert store.match("old-secret") is None
    assert store.match("new-secret").name == "new"  # type: ignore[union-attr]
    path.write_text("new:not-a-digest\n")  # a mistake keeps the keys there were
    clock.now += 5
    assert store.match("new-secret") is not None


def test_a_mounted_secret_directory_is_read_without_its_hidden_entries(tmp_path: Path) -> None:
    """As the kubelet lays a Secret out: a timestamped folder, `..data` linking to it, a link per key."""
    secret = tmp_path / "secret"
    (secret / "..2026_12_01").mkdir(parents=True)
    (secret / "..2026_12_01" / "keys").write_text(line("ci", "s1") + "\n")
    (secret / "..data").symlink_to("..2026_12_01")
    (secret / "keys").symlink_to("..data/keys")
    clock = Clock()
    store = KeyStore(secret, reload_seconds=1, clock=clock)
    assert [key.name for key in store.keys] == ["ci"]
    # An update: a new folder, `..data` swapped to it.
    (secret / "..2026_12_02").mkdir()
    (secret / "..2026_12_02" / "keys").write_text(line("ci", "s2") + "\n")
    (secret / "..data_tmp").symlink_to("..2026_12_02")
    (secret / "..data_tmp").replace(secret / "..data")
    clock.now += 2
    assert store.match("s1") is None
    assert store.match("s2") is not None


def test_repeated_unknown_keys_block_an_address_for_the_cool_down() -> None:
    clock = Clock()
    limiter = FailureLimiter(max_failures=3, block_seconds=10, clock=clock)
    limiter.failed("a")
    clock.now += 11  # outside the window: forgotten
    limiter.failed("a")
    limiter.failed("a")
    assert limiter.blocked_for("a") == 0
    limiter.failed("a")
    assert limiter.blocked_for("a") == 10
    assert limiter.blocked_for("b") == 0
    clock.now += 9.5
    assert limiter.blocked_for("a") == pytest.approx(0.5)
    clock.now += 1
    assert limiter.blocked_for("a") == 0


def gate(tmp_path: Path, *, auth_metrics: bool, auth_docs: bool) -> tuple[Gate, list[tuple[str, str]]]:
    path = tmp_path / "keys.txt"
    path.write_text(f"{line('all', 'k-all')}\n{line('reader', 'k-reader', 'feedback')}\n")
    counted: list[tuple[str, str]] = []
    limiter = FailureLimiter(2, 60)
    made = Gate(
        KeyStore(path, 10),
        limiter,
        lambda *labels: counted.append(labels),
        auth_metrics=auth_metrics,
        auth_docs=auth_docs,
    )
    return made, counted


@pytest.mark.parametrize(("auth_metrics", "auth_docs"), [(False, True), (True, False)])
def test_what_each_path_and_method_needs(tmp_path: Path, auth_metrics: bool, auth_docs: bool) -> None:
    checked, _ = gate(tmp_path, auth_metrics=auth_metrics, auth_docs=auth_docs)
    needs = {
        "/livez": Access.OPEN,
        "/readyz": Access.OPEN,
        "/v2/health/ready": Access.OPEN,
        "/metrics": Access.METRICS if auth_metrics else Access.OPEN,
        "/docs.json": Access.ANY_KEY if auth_docs else Access.OPEN,
        "/static_content/index.css": Access.ANY_KEY if auth_docs else Access.OPEN,
        "/docs": Access.ANY_KEY if auth_docs else Access.OPEN,
        "/ui": Access.ANY_KEY if auth_docs else Access.OPEN,
        "/ui/app.js": Access.ANY_KEY if auth_docs else Access.OPEN,
        "/predict_file": Access.PREDICT,
        "/explain": Access.PREDICT,
        "/explain_batch": Access.PREDICT,
        "/v2/models/breast_cancer/versions/1/infer": Access.PREDICT,
        "/feedback": Access.FEEDBACK,
        "/model": Access.ANY_KEY,
        "/v2/models/breast_cancer/ready": Access.ANY_KEY,
        "/no/such/path": Access.ANY_KEY,
    }
    assert {path: checked.http_access(path) for path in needs} == needs
    service = "/inference.GRPCInferenceService"
    assert checked.grpc_access("/grpc.health.v1.Health/Check") is Access.OPEN
    assert checked.grpc_access(f"{service}/ServerReady") is Access.OPEN
    assert checked.grpc_access(f"{service}/ModelInfer") is Access.PREDICT
    assert checked.grpc_access(f"{service}/ModelMetadata") is Access.ANY_KEY


def test_the_gate_refuses_by_reason_and_counts_each_refusal(tmp_path: Path) -> None:
    checked, counted = gate(tmp_path, auth_metrics=True, auth_docs=True)
    assert checked.check("http", "a", "k-all", Access.PREDICT).caller == "all"
    assert checked.check("http", "a", None, Access.OPEN).caller is None
    refusals = [
        checked.check("http", "a", None, Access.PREDICT),
        checked.check("grpc", "a", "k-reader", Access.PREDICT),
        checked.check("oip_rest", "a", "wrong", Access.ANY_KEY),
        checked.check("http", "a", "wrong", Access.ANY_KEY),  # the second unknown key: blocked from now on
        checked.check("http", "a", "k-all", Access.PREDICT),
    ]
    assert [(v.refusal.reason, v.refusal.status) for v in refusals if v.refusal] == [
        ("missing_key", 401),
        ("no_right", 403),
        ("unknown_key", 401),
        ("unknown_key", 401),
        ("blocked", 429),
    ]
    assert refusals[-1].retry_after == 60
    assert checked.check("http", "b", "k-all", Access.PREDICT).caller == "all"  # another address
    assert counted == [
        ("http", "missing_key"),
        ("grpc", "no_right"),
        ("oip_rest", "unknown_key"),
        ("http", "unknown_key"),
        ("http", "blocked"),
    ]
    assert all("k-" not in v.message and "wrong" not in v.message for v in refusals)


@pytest.mark.parametrize(
    ("authorization", "api_key", "presented"),
    [
        ("Bearer abc", None, "abc"),
        ("bearer abc", "other", "abc"),
        ("Basic dXNlcjpwYXNz", None, None),
        ("Bearer ", "abc", "abc"),
        (None, "abc", "abc"),
        (None, "", None),
    ],
)
def test_the_key_comes_from_a_bearer_token_or_x_api_key(
    authorization: str | None, api_key: str | None, presented: str | None
) -> None:
    assert presented_key(authorization, api_key) == presented


def test_new_key_prints_the_key_once_and_a_line_that_matches_it(tmp_path: Path) -> None:
    made = subprocess.run(
        [sys.executable, "-m", "serving.auth", "new-key", "ci", "--rights", "predict,feedback"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    [raw_key] = re.findall(r"tsk_\S+", made.stderr)
    assert raw_key not in made.stdout
    (tmp_path / "keys.txt").write_text(made.stdout)
    key = KeyStore(tmp_path / "keys.txt", 10).match(raw_key)
    assert key is not None
    assert (key.name, key.rights) == ("ci", {"predict", "feedback"})
    refused = subprocess.run(
        [sys.executable, "-m", "serving.auth", "new-key", "ci", "--rights", "admin"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode == 2
    assert "unknown right admin" in refused.stderr


# ---- a real server with auth on --------------------------------------------------------------------------

KEYS = {"all": "tsk_all-rights-key", "predictor": "tsk_predict-only-key", "reader": "tsk_feedback-only-key"}
ROTATING = ("rotating", "tsk_key-before-rotation")
ROTATED = ("rotated", "tsk_key-after-rotation")
WRONG = "tsk_a-key-nobody-was-given"
MAX_FAILURES = 3
BLOCK_SECONDS = 4
RELOAD_SECONDS = 0.5
RIGHTS_OF = {"all": "", "predictor": "predict", "reader": "feedback"}


def key_file_text(*extra: tuple[str, str]) -> str:
    lines = [line(name, KEYS[name], RIGHTS_OF[name]) for name in KEYS]
    return "\n".join([*lines, *(line(name, raw) for name, raw in extra)]) + "\n"


def bearer(name: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[name]}"}


@pytest.fixture(scope="module")
def auth_server(
    stores: Stores, default_model: object, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, Path]]:
    """/metrics closed and the OpenAPI page open (the other way round from the defaults, which the gate's
    table test covers); one worker, so that the failure limit is one process's; BentoML's access log on, so
    that the test of what the output holds means something."""
    folder = tmp_path_factory.mktemp("auth-server")
    keys_file = folder / "keys.txt"
    keys_file.write_text(key_file_text(ROTATING))
    port, grpc_port = free_port(), free_port()
    env = stores.env(
        BENTOML_HOME=str(stores.server_home(folder / "bentoml-home")),
        TABSERVE_GRPC_HOST="127.0.0.1",
        TABSERVE_GRPC_PORT=str(grpc_port),
        TABSERVE_PREDICTION_LOG_DIR=str(folder / "log"),
        TABSERVE_FEEDBACK_LOG_DIR=str(folder / "feedback"),
        TABSERVE_API_WORKERS="1",
        TABSERVE_ACCESS_LOG="true",
        TABSERVE_AUTH_KEYS_FILE=str(keys_file),
        TABSERVE_AUTH_METRICS="true",
        TABSERVE_AUTH_DOCS="false",
        TABSERVE_AUTH_MAX_FAILURES=str(MAX_FAILURES),
        TABSERVE_AUTH_BLOCK_SECONDS=str(BLOCK_SECONDS),
        TABSERVE_AUTH_RELOAD_SECONDS=str(RELOAD_SECONDS),
    )
    output = folder / "server-output.txt"
    process = start_server(env, port, output)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, url, output)
        yield (
            Server(url, f"127.0.0.1:{grpc_port}", folder / "log", folder / "feedback", process, output),
            keys_file,
        )
    finally:
        process.terminate()
        process.wait(timeout=60)


@pytest.fixture(scope="module")
def secured(auth_server: tuple[Server, Path]) -> Server:
    return auth_server[0]


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    return load_default().features.iloc[:3].to_numpy(dtype=np.float64)


@pytest.fixture(scope="module")
def record() -> dict[str, float]:
    features = load_default().features
    return {str(k): float(v) for k, v in features.iloc[0].items()}


# Addresses a test claims through X-Forwarded-For, which uvicorn takes from a loopback peer (its default
# FORWARDED_ALLOW_IPS): unknown keys sent from them block them, not 127.0.0.1, which the other tests use.
_addresses = iter(f"198.51.100.{n}" for n in range(1, 255))


def from_elsewhere(headers: dict[str, str] | None = None) -> dict[str, str]:
    return {**(headers or {}), "x-forwarded-for": next(_addresses)}


def http_calls(server: Server, record: dict[str, float], rows: np.ndarray) -> dict[str, Callable[..., Any]]:
    """One call per protected HTTP and OIP REST route, each taking the headers to send."""
    tensor = {"name": "rows", "shape": list(rows.shape), "datatype": "FP64", "data": rows.ravel().tolist()}
    csv = ",".join(f'"{name}"' for name in record) + "\n" + ",".join(map(str, record.values())) + "\n"
    url = server.url
    return {
        "/predict": lambda h: httpx.post(f"{url}/predict", json=record, headers=h, timeout=60),
        "/predict_batch": lambda h: httpx.post(f"{url}/predict_batch", json=[record], headers=h, timeout=60),
        "/explain": lambda h: httpx.post(f"{url}/explain", json=record, headers=h, timeout=60),
        "/predict_file": lambda h: httpx.post(
            f"{url}/predict_file", content=csv, headers={**h, "content-type": "text/csv"}, timeout=60
        ),
        "/model": lambda h: httpx.get(f"{url}/model", headers=h, timeout=60),
        "/feedback": lambda h: httpx.post(
            f"{url}/feedback",
            json=[{"request_id": "never-answered", "label": "benign"}],
            headers=h,
            timeout=60,
        ),
        "/v2": lambda h: httpx.get(f"{url}/v2", headers=h, timeout=60),
        "/v2/models/breast_cancer": lambda h: httpx.get(
            f"{url}/v2/models/breast_cancer", headers=h, timeout=60
        ),
        "/v2/models/breast_cancer/infer": lambda h: httpx.post(
            f"{url}/v2/models/breast_cancer/infer", json={"inputs": [tensor]}, headers=h, timeout=60
        ),
    }


def grpc_infer_request(rows: np.ndarray, request_id: str = "") -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(
        name="rows",
        datatype="FP64",
        shape=list(rows.shape),
        contents=pb.InferTensorContents(fp64_contents=rows.ravel()),
    )
    return pb.ModelInferRequest(model_name="breast_cancer", id=request_id, inputs=[tensor])


def grpc_infer(
    server: Server, rows: np.ndarray, metadata: list[tuple[str, str]], request_id: str = ""
) -> Any:
    with grpc.insecure_channel(server.grpc_target) as channel:
        return pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            grpc_infer_request(rows, request_id), metadata=metadata, timeout=60
        )


def grpc_refusal(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value


def metric_values(server: Server, name: str) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", headers=bearer("all"), timeout=30).text
    pattern = re.compile(rf"^{re.escape(name)}\{{([^}}]*)\}} ([0-9.e+-]+)$", re.MULTILINE)
    return {labels: float(value) for labels, value in pattern.findall(text)}


def refusals(server: Server) -> dict[tuple[str, str], float]:
    samples = metric_values(server, "tabserve_auth_refusals_total")
    counted: dict[tuple[str, str], float] = {}
    for labels, value in samples.items():
        found = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        counted[found["transport"], found["reason"]] = value
    return counted


def test_without_a_key_or_with_a_wrong_one_every_transport_answers_401(
    secured: Server, record: dict[str, float], rows: np.ndarray
) -> None:
    before = refusals(secured)
    calls = http_calls(secured, record, rows)
    for path, call in calls.items():
        for headers in (
            {},
            from_elsewhere({"authorization": f"Bearer {WRONG}"}),
            from_elsewhere({"x-api-key": WRONG}),
        ):
            response = call(headers)
            assert response.status_code == 401, (path, headers, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
            assert WRONG not in response.text
    grpc_error = grpc_refusal(lambda: grpc_infer(secured, rows, []))
    assert grpc_error.code() is grpc.StatusCode.UNAUTHENTICATED
    client = triton_grpc.InferenceServerClient(secured.grpc_target)
    with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
        client.get_model_metadata("breast_cancer")
    counted = refusals(secured)
    oip_paths = sum(path.startswith("/v2") for path in calls)
    assert counted[("http", "missing_key")] - before.get(("http", "missing_key"), 0) == len(calls) - oip_paths
    assert counted[("oip_rest", "unknown_key")] - before.get(("oip_rest", "unknown_key"), 0) == 2 * oip_paths
    assert counted[("grpc", "missing_key")] - before.get(("grpc", "missing_key"), 0) == 2


def test_a_valid_key_is_served_on_every_transport(
    secured: Server, record: dict[str, float], rows: np.ndarray
) -> None:
    for path, call in http_calls(secured, record, rows).items():
        for headers in (bearer("all"), {"x-api-key": KEYS["all"]}):
            response = call(headers)
            # /feedback gets past the gate to its handler, which knows no such answered request.
            assert response.status_code == (400 if path == "/feedback" else 200), (path, response.text)
    http_client = triton_http.InferenceServerClient(secured.url.removeprefix("http://"))
    tensor = triton_http.InferInput("rows", list(rows.shape), "FP64")
    tensor.set_data_from_numpy(rows)
    assert http_client.infer("breast_cancer", [tensor], headers=bearer("all")).as_numpy("label").shape == (3,)
    grpc_client = triton_grpc.InferenceServerClient(secured.grpc_target)
    grpc_tensor = triton_grpc.InferInput("rows", list(rows.shape), "FP64")
    grpc_tensor.set_data_from_numpy(rows)
    result = grpc_client.infer("breast_cancer", [grpc_tensor], headers=bearer("predictor"))
    assert result.as_numpy("label").shape == (3,)
    assert grpc_client.get_model_metadata("breast_cancer", headers=bearer("reader")).name == "breast_cancer"


def test_a_key_without_the_right_gets_403_or_permission_denied(
    secured: Server, record: dict[str, float], rows: np.ndarray
) -> None:
    calls = http_calls(secured, record, rows)
    needs_predict = [
        "/predict",
        "/predict_batch",
        "/predict_file",
        "/explain",
        "/v2/models/breast_cancer/infer",
    ]
    for path in needs_predict:
        response = calls[path](bearer("reader"))
        assert response.status_code == 403, path
        assert response.json() == {"error": "this API key lacks the right 'predict' this call needs"}
    assert calls["/feedback"](bearer("predictor")).status_code == 403
    assert calls["/model"](bearer("reader")).status_code == 200  # any valid key
    refused = grpc_refusal(lambda: grpc_infer(secured, rows, list(bearer("reader").items())))
    assert refused.code() is grpc.StatusCode.PERMISSION_DENIED
    assert KEYS["reader"] not in str(refused.details())


def test_probes_stay_open_on_every_transport(secured: Server) -> None:
    for path in ("/livez", "/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"):
        assert httpx.get(f"{secured.url}{path}", timeout=30).status_code == 200, path
    with grpc.insecure_channel(secured.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        oip = pb_grpc.GRPCInferenceServiceStub(channel)
        assert oip.ServerLive(pb.ServerLiveRequest(), timeout=30).live
        assert oip.ServerReady(pb.ServerReadyRequest(), timeout=30).ready


def test_metrics_and_docs_follow_their_settings(secured: Server) -> None:
    """Here TABSERVE_AUTH_METRICS=true (closed) and TABSERVE_AUTH_DOCS=false (open)."""
    metrics = f"{secured.url}/metrics"
    assert httpx.get(metrics, timeout=30).status_code == 401
    assert httpx.get(metrics, headers=bearer("predictor"), timeout=30).status_code == 403
    assert httpx.get(metrics, headers=bearer("all"), timeout=30).status_code == 200
    assert httpx.get(f"{secured.url}/docs.json", timeout=30).status_code == 200
    assert httpx.get(f"{secured.url}/docs", timeout=30).status_code == 200
    assert httpx.get(f"{secured.url}/ui/", timeout=30).status_code == 200


def test_the_openapi_page_documents_the_keys_and_the_refusals(secured: Server) -> None:
    spec = httpx.get(f"{secured.url}/docs.json", timeout=30).json()
    assert set(spec["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    predict = spec["paths"]["/predict"]["post"]
    assert {"401", "403", "429"} <= set(predict["responses"])
    assert predict["security"] == [{"bearer": []}, {"apiKey": []}]
    model = spec["paths"]["/model"]["get"]
    assert {"401", "429"} <= set(model["responses"])
    assert "403" not in model["responses"]  # any valid key
    assert "security" not in spec["paths"]["/readyz"]["get"]


def test_the_callers_key_name_is_in_the_prediction_log(
    secured: Server, record: dict[str, float], rows: np.ndarray
) -> None:
    httpx.post(
        f"{secured.url}/predict",
        json=record,
        headers={**bearer("predictor"), "x-request-id": "auth-http"},
        timeout=60,
    ).raise_for_status()
    tensor = {"name": "rows", "shape": list(rows.shape), "datatype": "FP64", "data": rows.ravel().tolist()}
    httpx.post(
        f"{secured.url}/v2/models/breast_cancer/infer",
        json={"id": "auth-oip", "inputs": [tensor]},
        headers=bearer("all"),
        timeout=60,
    ).raise_for_status()
    grpc_infer(secured, rows, [("x-api-key", KEYS["predictor"])], request_id="auth-grpc")
    expected = {"auth-http": {"predictor"}, "auth-oip": {"all"}, "auth-grpc": {"predictor"}}
    deadline = time.monotonic() + 15  # the log is written by a thread
    while time.monotonic() < deadline:
        callers: dict[str, set[str]] = {}
        for row in logged_rows(secured.log_dir):
            callers.setdefault(row["request_id"], set()).add(row["caller"])
        if all(request_id in callers for request_id in expected):
            break
        time.sleep(0.2)
    assert {request_id: callers.get(request_id) for request_id in expected} == expected


def test_repeated_wrong_keys_block_the_address_over_http_until_the_cool_down_ends(secured: Server) -> None:
    address = {"x-forwarded-for": next(_addresses)}
    model = f"{secured.url}/model"
    wrong = {**address, "authorization": f"Bearer {WRONG}"}
    assert [httpx.get(model, headers=wrong, timeout=30).status_code for _ in range(MAX_FAILURES)] == [401] * 3
    blocked = httpx.get(model, headers={**address, **bearer("all")}, timeout=30)  # even with a valid key
    assert blocked.status_code == 429
    retry_after = int(blocked.headers["retry-after"])
    assert 0 < retry_after <= BLOCK_SECONDS
    assert httpx.get(model, headers=bearer("all"), timeout=30).status_code == 200  # other addresses go on
    assert httpx.get(f"{secured.url}/readyz", headers=address, timeout=30).status_code == 200  # probes too
    time.sleep(retry_after)
    assert httpx.get(model, headers={**address, **bearer("all")}, timeout=30).status_code == 200
    assert refusals(secured)[("http", "blocked")] >= 1


def test_repeated_wrong_keys_block_a_grpc_client_until_the_cool_down_ends(
    secured: Server, rows: np.ndarray
) -> None:
    wrong = [("authorization", f"Bearer {WRONG}")]
    for _ in range(MAX_FAILURES):
        assert (
            grpc_refusal(lambda: grpc_infer(secured, rows, wrong)).code() is grpc.StatusCode.UNAUTHENTICATED
        )
    blocked = grpc_refusal(lambda: grpc_infer(secured, rows, list(bearer("all").items())))
    assert blocked.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    retry_after = int(dict(blocked.trailing_metadata())["retry-after"])
    assert 0 < retry_after <= BLOCK_SECONDS
    time.sleep(retry_after)
    assert grpc_infer(secured, rows, list(bearer("all").items())).outputs
    assert refusals(secured)[("grpc", "blocked")] >= 1


def test_a_rewritten_key_file_takes_effect_without_a_restart(
    auth_server: tuple[Server, Path], rows: np.ndarray
) -> None:
    secured, keys_file = auth_server
    model = f"{secured.url}/model"

    def status(raw_key: str) -> int:
        return httpx.get(model, headers=from_elsewhere({"x-api-key": raw_key}), timeout=30).status_code

    assert status(ROTATING[1]) == 200
    assert status(ROTATED[1]) == 401
    keys_file.write_text(key_file_text(ROTATED))
    deadline = time.monotonic() + RELOAD_SECONDS + 5
    while status(ROTATED[1]) != 200:
        assert time.monotonic() < deadline, "the new key was not taken within the reload period"
        time.sleep(0.1)
    assert status(ROTATING[1]) == 401
    assert grpc_infer(secured, rows, [("authorization", f"Bearer {ROTATED[1]}")]).outputs
    # A file that does not parse keeps the keys there were, and the log says so without any key.
    keys_file.write_text(key_file_text(ROTATED) + "broken line\n")
    time.sleep(RELOAD_SECONDS + 0.5)
    assert status(ROTATED[1]) == 200
    assert "the key file is unusable, keeping the 4 keys read before" in secured.output_text()


def test_no_raw_key_reaches_the_servers_output(secured: Server) -> None:
    """Run last: every key the tests above sent, valid or not, with BentoML's access log on."""
    output = secured.output_text()
    assert "status=401" in output  # the access log was written
    for raw_key in [*KEYS.values(), ROTATING[1], ROTATED[1], WRONG]:
        assert raw_key not in output


def test_a_bad_key_file_stops_the_server_with_the_line_at_fault(
    stores: Stores, default_model: object, tmp_path: Path
) -> None:
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(f"{line('ci', 'secret')}\nops:{'0' * 64}:predict,deploy\n")
    env = stores.env(
        BENTOML_HOME=str(stores.server_home(tmp_path / "bentoml-home")),
        TABSERVE_GRPC_PORT="0",
        TABSERVE_AUTH_KEYS_FILE=str(keys_file),
    )
    output = tmp_path / "out.txt"
    process = start_server(env, free_port(), output)
    try:
        assert process.wait(timeout=120) != 0
    finally:
        if process.poll() is None:
            process.kill()
    assert (
        f"error: TABSERVE_AUTH_KEYS_FILE: {keys_file}, line 2: unknown right deploy for the key 'ops'"
        in output.read_text()
    )
