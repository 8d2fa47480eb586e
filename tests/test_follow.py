"""The running service follows the champion alias: a real `bentoml serve` (2 API workers, polling every
second), its own MLflow and BentoML stores, real training runs (`python train.py`) that move the alias.

The tests run in file order on one story of one registry: v1 is served; v2 is forced champion under load
(swapped); v3, which drops a feature, is forced champion (not swapped: restart needed); the registry
breaks and comes back (keeps serving); then a model-service server starts on v3 and swaps to v4.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import orjson
import pytest
from scipy.special import expit

from models.data import load_default
from models.store import PROBABILITY_PREFIX, REFERENCE_FILE, StoredModel, reproduction_problem
from serving.follow import request_incompatibility
from serving.oip import grpc_predict_v2_pb2 as pb
from serving.oip import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.conftest import Stores, assert_ok, free_port, logged_rows, run_train, start_server, wait_ready
from tests.tables import breast_cancer_table

NAME = "breast_cancer"
CLIENTS_PER_TRANSPORT = {"http": 11, "oip_rest": 11, "grpc": 10}  # 32 concurrent clients
# After every client has seen the new version, each goes on this long: all of it must be the new version.
AFTER_SWAP_SECONDS = 2.0
MAX_LOAD_SECONDS = 150.0


@dataclass(frozen=True)
class Served:
    url: str
    grpc_target: str
    log_dir: Path
    output: Path

    def info(self) -> dict[str, Any]:
        answer = httpx.get(f"{self.url}/model", timeout=30)
        assert answer.status_code == 200, answer.text
        info: dict[str, Any] = answer.json()
        return info

    def metric_lines(self, metric: str) -> list[str]:
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        return [line for line in text.splitlines() if line.startswith(metric)]


@pytest.fixture(scope="module")
def own_stores(tmp_path_factory: pytest.TempPathFactory) -> Stores:
    """Stores of this module only: the registry is broken on purpose below."""
    root = tmp_path_factory.mktemp("follow-stores")
    return Stores(data_dir=root / "data", bentoml_home=root / "bentoml")


def train(stores: Stores, *extra: str) -> None:
    assert_ok(run_train(stores, "--cv-folds", "3", *extra))


def train_without_radius(stores: Stores) -> None:
    """A forced champion whose requests have no 'mean radius' (--drop applies to a --data table)."""
    table = stores.data_dir / "breast_cancer.csv"
    breast_cancer_table().to_csv(table, index=False)
    train(
        stores,
        "--data",
        str(table),
        "--target",
        "diagnosis",
        "--name",
        NAME,
        "--drop",
        "mean radius",
        "--force",
    )


def serve(stores: Stores, tmp_path: Path, **overrides: str) -> Iterator[Served]:
    port, grpc_port = free_port(), free_port()
    log_dir = tmp_path / "predictions"
    env = stores.env(
        TABSERVE_GRPC_HOST="127.0.0.1",
        TABSERVE_GRPC_PORT=str(grpc_port),
        TABSERVE_PREDICTION_LOG_DIR=str(log_dir),
        TABSERVE_RELOAD_SECONDS="1",
        **overrides,
    )
    output = tmp_path / "server-output.txt"
    process = start_server(env, port, output)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, url, output)
        yield Served(url, f"127.0.0.1:{grpc_port}", log_dir, output)
    finally:
        process.terminate()
        process.wait(timeout=60)


@pytest.fixture(scope="module")
def server(own_stores: Stores, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    train(own_stores)
    yield from serve(own_stores, tmp_path_factory.mktemp("follow-server"))


ROW = [float(value) for value in load_default().features.iloc[0]]
RECORD = dict(zip(load_default().features.columns, ROW, strict=True))


@dataclass
class Client:
    transport: str
    record: dict[str, float] = field(default_factory=lambda: RECORD)  # what HTTP clients send
    versions: list[str] = field(default_factory=list)  # BentoML version of each answer, in order
    failures: list[str] = field(default_factory=list)


async def ask(client: Client, served: Served, http: httpx.AsyncClient, stub: Any) -> str:
    if client.transport == "http":
        answer = await http.post("/predict", json=client.record)
        if answer.status_code != 200:
            raise AssertionError(f"HTTP {answer.status_code}: {answer.text[:200]}")
        return str(answer.json()["version"])
    if client.transport == "oip_rest":
        body = {"inputs": [{"name": "rows", "datatype": "FP64", "shape": [1, len(ROW)], "data": ROW}]}
        answer = await http.post(f"/v2/models/{NAME}/infer", content=orjson.dumps(body))
        if answer.status_code != 200:
            raise AssertionError(f"OIP REST {answer.status_code}: {answer.text[:200]}")
        return str(answer.json()["model_version"])
    request = pb.ModelInferRequest(model_name=NAME)
    tensor = request.inputs.add(name="rows", datatype="FP64", shape=[1, len(ROW)])
    tensor.contents.fp64_contents.extend(ROW)
    response = await stub.ModelInfer(request, timeout=30)
    return str(response.model_version)


async def run_client(client: Client, served: Served, new: asyncio.Future[str], deadline: float) -> None:
    """Ask until AFTER_SWAP_SECONDS after every client has seen the new version (`new` done), or the
    deadline. One keep-alive connection per client, so that it stays with one worker."""
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with (
        httpx.AsyncClient(base_url=served.url, limits=limits, timeout=30) as http,
        grpc.aio.insecure_channel(served.grpc_target) as channel,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stop_at = deadline
        while time.monotonic() < stop_at:
            try:
                client.versions.append(await ask(client, served, http, stub))
            except Exception as exc:
                client.failures.append(repr(exc)[:300])
            if new.done() and stop_at == deadline:
                stop_at = min(deadline, time.monotonic() + AFTER_SWAP_SECONDS)


async def load_across_swap(
    served: Served, clients: list[Client], move_alias: Any, old: str
) -> tuple[list[Client], str]:
    """Run the clients while `move_alias` (blocking) runs on a thread; returns the new BentoML version."""
    deadline = time.monotonic() + MAX_LOAD_SECONDS
    all_seen_new: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def watch() -> None:
        await asyncio.to_thread(move_alias)
        while time.monotonic() < deadline:
            if all(client.versions and client.versions[-1] != old for client in clients):
                all_seen_new.set_result(clients[0].versions[-1])
                return
            await asyncio.sleep(0.2)

    await asyncio.gather(watch(), *(run_client(c, served, all_seen_new, deadline) for c in clients))
    assert all_seen_new.done(), "not every client saw a new version before the deadline"
    return clients, all_seen_new.result()


def assert_swapped_cleanly(clients: list[Client], old: str, new: str) -> None:
    order = {old: 0, new: 1}
    for client in clients:
        assert client.failures == [], f"{client.transport}: {client.failures[:3]}"
        assert set(client.versions) <= {old, new}, f"{client.transport}: {set(client.versions)}"
        ranks = [order[version] for version in client.versions]
        assert ranks == sorted(ranks), f"{client.transport}: a version went backwards"
        assert client.versions[-1] == new


def assert_explained_by(served: Served, record: dict[str, float], registered_version: str) -> None:
    """/explain answers from the version served (each API worker, likely, in four calls), and its
    explanation adds up to that version's own prediction: the explainer follows the version."""
    for _ in range(4):
        response = httpx.post(f"{served.url}/explain", json=record, timeout=60)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["registered_version"] == registered_version
        explanation = answer["explanation"]
        assert list(explanation["attributions"]) == list(record)
        total = explanation["base_value"] + sum(explanation["attributions"].values())
        assert abs(total - explanation["output_value"]) <= 1e-6
        probability = answer["probabilities"][explanation["explained_class"]]
        if explanation["output"] == "log_odds":
            assert abs(expit(explanation["output_value"]) - probability) <= 1e-9
        else:
            assert abs(explanation["output_value"] - probability) <= 1e-9


def logged_versions(log_dir: Path) -> set[str]:
    return {row["registered_version"] for row in logged_rows(log_dir)}


def test_starts_on_the_champion_and_follows_it(server: Served) -> None:
    info = server.info()
    assert info["registered_version"] == "1"
    assert info["alias"] == "champion"
    assert info["following"]["alias"] == "champion"
    assert info["following"]["every_seconds"] == 1
    assert info["following"]["restart_needed"] is False
    served = server.metric_lines("tabserve_served_version")
    assert any('registered_version="1"' in line and line.endswith(" 1.0") for line in served), served
    assert_explained_by(server, RECORD, "1")


def test_swap_under_load_on_every_transport(server: Served, own_stores: Stores) -> None:
    v1 = server.info()["version"]
    clients = [Client(t) for t, count in CLIENTS_PER_TRANSPORT.items() for _ in range(count)]
    clients, v2 = asyncio.run(load_across_swap(server, clients, lambda: train(own_stores, "--force"), v1))

    assert_swapped_cleanly(clients, v1, v2)
    info = server.info()
    assert (info["version"], info["registered_version"], info["alias"]) == (v2, "2", "champion")
    assert sum(len(c.versions) for c in clients) > 200  # a real load, not a handful of requests
    assert_explained_by(server, RECORD, "2")
    time.sleep(1.5)  # the log is written on a thread
    assert logged_versions(server.log_dir) == {"1", "2"}
    swaps = server.metric_lines("tabserve_model_swaps_total")
    assert any('result="swapped"' in line for line in swaps), swaps


def test_incompatible_champion_is_not_swapped(server: Served, own_stores: Stores) -> None:
    train_without_radius(own_stores)  # v3
    deadline = time.monotonic() + 20
    while not server.info()["following"]["restart_needed"] and time.monotonic() < deadline:
        time.sleep(0.5)
    info = server.info()
    assert info["registered_version"] == "2"
    assert info["alias"] is None  # v2 no longer holds the champion alias
    following = info["following"]
    assert following["alias_version"] == "3"
    assert following["restart_needed"] is True
    assert "version 3 holds 'champion' but is not served: feature columns differ" in following["last_problem"]
    assert "a restart is needed" in following["last_problem"]
    assert any(line.endswith(" 1.0") for line in server.metric_lines("tabserve_restart_needed")), (
        server.metric_lines("tabserve_restart_needed")
    )
    swaps = server.metric_lines("tabserve_model_swaps_total")
    assert any('result="incompatible"' in line for line in swaps), swaps
    answer = httpx.post(f"{server.url}/predict", json=RECORD, timeout=30)
    assert answer.status_code == 200
    assert answer.json()["registered_version"] == "2"


def test_unreachable_registry_keeps_serving_and_says_so(server: Served, own_stores: Stores) -> None:
    database = own_stores.data_dir / "mlflow.db"
    header = database.read_bytes()[:100]
    with database.open("r+b") as file:  # in place: the server's open connections read the damage too
        file.write(b"\0" * 100)
    try:
        time.sleep(4)  # several polls
        info = server.info()
        assert "the registry is unreachable" in info["following"]["last_problem"]
        assert "still serving version 2" in info["following"]["last_problem"]
        answer = httpx.post(f"{server.url}/predict", json=RECORD, timeout=30)
        assert answer.status_code == 200
        assert answer.json()["registered_version"] == "2"
        # One line per worker for the outage, not one per poll.
        outage_lines = re.findall(r"the registry is unreachable", server.output.read_text())
        assert 1 <= len(outage_lines) <= 2, len(outage_lines)
        swaps = server.metric_lines("tabserve_model_swaps_total")
        assert any('result="registry_unreachable"' in line for line in swaps), swaps
    finally:
        with database.open("r+b") as file:
            file.write(header)
    time.sleep(3)
    assert "the registry answers again" in server.output.read_text()


def test_model_service_layout_swaps(
    server: Served, own_stores: Stores, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Started on v3 (the champion now), then v4 (the same features) is forced champion under load."""
    served_iter = serve(
        own_stores, tmp_path_factory.mktemp("follow-model-service"), TABSERVE_MODEL_SERVICE="true"
    )
    model_service = next(served_iter)
    try:
        v3 = model_service.info()["version"]
        assert model_service.info()["registered_version"] == "3"
        assert model_service.info()["scorer"]["scorer"] == "compiled"  # as the model service chooses
        without_radius = {key: value for key, value in RECORD.items() if key != "mean radius"}
        # The API workers load the pipeline to explain with: the model service holds it for predictions.
        assert_explained_by(model_service, without_radius, "3")
        clients = [Client("http", without_radius) for _ in range(8)]
        clients, v4 = asyncio.run(
            load_across_swap(
                model_service,
                clients,
                lambda: train_without_radius(own_stores),
                v3,
            )
        )
        assert_swapped_cleanly(clients, v3, v4)
        assert model_service.info()["registered_version"] == "4"
        assert_explained_by(model_service, without_radius, "4")
    finally:
        next(served_iter, None)


def test_a_version_must_reproduce_its_reference_predictions(
    stores: Stores, default_model: object, tmp_path: Path
) -> None:
    model = StoredModel.open("breast_cancer:latest")
    assert reproduction_problem(model) is None
    copy = tmp_path / "model"
    shutil.copytree(model.path, copy)
    reference = model.load_reference()
    reference[PROBABILITY_PREFIX + "benign"] += 1e-6  # as if another library version scored it
    reference.to_parquet(copy / REFERENCE_FILE, index=False)
    problem = reproduction_problem(dataclasses.replace(model, path=copy))
    assert problem == "its reference rows' class probabilities differ from those stored with it"


def test_a_version_must_take_the_same_requests(stores: Stores, default_model: object) -> None:
    model = StoredModel.open("breast_cancer:latest")
    assert request_incompatibility(model, model) is None
    features = [f.model_copy(update={"nullable": True}) for f in model.schema.features]
    nullable = dataclasses.replace(model, schema=model.schema.model_copy(update={"features": features}))
    assert request_incompatibility(model, nullable) == (
        "feature 'mean radius': the new version allows missing values"
    )
    other_classes = dataclasses.replace(model, metadata={**model.metadata, "classes": ["a", "b"]})
    assert request_incompatibility(model, other_classes) == (
        "the classes were ['benign', 'malignant'], are now ['a', 'b']"
    )
