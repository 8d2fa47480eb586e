"""The load-test harness against the session's real server: the locust smoke run (15 s, fails on any error),
the load generators and their error accounting, the FastAPI baseline, and the benchmark report."""

from __future__ import annotations

import csv
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import typer

from loadtests import bench, endpoints, generators, proctree, report, rows, run_locust, servers
from models.store import StoredModel
from models.training import TrainingOptions
from serving.oip import codec
from tests.conftest import PROJECT_ROOT, Server, Stores

SMOKE_SECONDS = 15
CLASSES = ["benign", "malignant"]  # of the default model


@pytest.fixture(scope="module")
def stored(server: Server) -> StoredModel:
    return StoredModel.open(f"{rows.DEFAULT_MODEL}:latest")


@pytest.fixture(scope="module")
def one_row() -> Any:
    return rows.held_out().head(1)


def test_rows_are_the_held_out_split_of_a_default_training_run() -> None:
    defaults = TrainingOptions()
    assert (defaults.seed, defaults.test_size) == (rows.SEED, rows.TEST_SIZE)
    assert len(rows.held_out()) == 114
    assert len(rows.tiled(rows.held_out(), 1000)) == 1000


def test_grpc_frame_is_flag_length_message() -> None:
    assert rows.grpc_frame(b"abc") == b"\x00\x00\x00\x00\x03abc"


def test_column_tensors_reach_the_service_as_the_rows_they_came_from() -> None:
    """One tensor per feature (FP64 with NaN, BOOL, BYTES), in JSON, in raw and in typed gRPC contents: the
    service's own OIP codec reads back the rows they were built from."""
    prepared = pd.DataFrame({"age": [30.0, np.nan], "member": [1.0, 0.0], "city": ["paris", "lyon"]})
    datatypes = {"age": "FP64", "member": "BOOL", "city": "BYTES"}
    tensors = rows.column_tensors(prepared, datatypes, hint_text=False)
    decoded = [
        codec.decode_rest_request(rows.oip_rest_body(tensors), None),
        codec.decode_grpc_request(rows.model_infer_request("m", tensors, raw=True)),
        codec.decode_grpc_request(rows.model_infer_request("m", tensors, raw=False)),
    ]
    for request in decoded:
        assert [tensor.shape for tensor in request.inputs] == [[2, 1]] * 3
        columns = codec.columns_from_tensors(request.inputs, list(datatypes))
        np.testing.assert_array_equal(np.asarray(columns["age"], dtype=np.float64), [30.0, np.nan])
        assert list(columns["member"]) == [True, False]
        assert list(columns["city"]) == ["paris", "lyon"]
    hinted = rows.column_tensors(prepared, datatypes, hint_text=True)
    assert [tensor.content_type for tensor in hinted] == [None, None, rows.TEXT_CONTENT_TYPE]


def test_locust_smoke_run_has_no_errors(server: Server, tmp_path: Path) -> None:
    """CI's load smoke: every task of both users against a real server for 15 s; any failure fails it."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtests.run_locust",
            "--url",
            server.url,
            "--grpc-target",
            server.grpc_target,
            "--users",
            "4",
            "--run-time",
            f"{SMOKE_SECONDS}s",
            "--results",
            str(tmp_path),
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=SMOKE_SECONDS + 120,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with (tmp_path / "locust_stats.csv").open() as stats:
        counts = {
            row["Name"]: (int(row["Request Count"]), int(row["Failure Count"]))
            for row in csv.DictReader(stats)
        }
    for name in ("/predict", "/predict_batch", "/v2/models/[model]/infer", "ModelInfer"):
        requests, failures = counts[name]
        assert requests > 0, name
        assert failures == 0, name
    assert (tmp_path / "locust.html").stat().st_size > 0


def test_locust_runner_refuses_other_hosts() -> None:
    with pytest.raises(typer.BadParameter, match="loopback"):
        run_locust._require_loopback("http://example.com:3000")
    run_locust._require_loopback("http://127.0.0.1:3000")


needs_generators = pytest.mark.skipif(
    bool(generators.available()),
    reason=f"load generators not installed: {generators.available()} (apt-get install wrk nghttp2-client)",
)


@needs_generators
def test_wrk_and_h2load_measure_the_service(
    server: Server, stored: StoredModel, one_row: Any, tmp_path: Path
) -> None:
    expected = stored.predict(one_row).probabilities
    predict = bench.http_predict("tabserve", server.url, one_row, CLASSES)
    infer = bench.oip_grpc("tabserve", server.grpc_target, stored, one_row, "probabilities", raw=True)
    endpoints.check(predict, expected)
    answer_bytes = endpoints.check(infer, expected)
    (tmp_path / "predict.json").write_bytes(predict.wire_body)
    (tmp_path / "infer.bin").write_bytes(infer.wire_body)

    http = generators.wrk(predict.address, tmp_path / "predict.json", "application/json", 2, 2)
    for _ in range(2):  # the second run's percentiles must not include the first run's requests
        grpc = generators.h2load(
            infer.address, tmp_path / "infer.bin", 2, 1, tmp_path / "log.tsv", answer_bytes
        )
    assert len((tmp_path / "log.tsv").read_text().splitlines()) == grpc.requests
    for measured in (http, grpc):
        assert measured.requests > 0
        assert measured.errors == 0
        assert 0 < measured.p50_ms <= measured.p95_ms <= measured.p99_ms
        assert measured.generator_cpu_seconds > 0


@needs_generators
def test_h2load_paces_http_and_grpc(
    server: Server, stored: StoredModel, one_row: Any, tmp_path: Path
) -> None:
    """The soak's paced load (loadtests/soak.py): each connection sends at most `rps` requests a second, and
    a 4xx over HTTP/1.1 counts as an error."""
    predict = bench.http_predict("tabserve", server.url, one_row, CLASSES)
    infer = bench.oip_grpc("tabserve", server.grpc_target, stored, one_row, "probabilities", raw=True)
    answer_bytes = endpoints.check(infer, stored.predict(one_row).probabilities)
    (tmp_path / "predict.json").write_bytes(predict.wire_body)
    (tmp_path / "infer.bin").write_bytes(infer.wire_body)
    (tmp_path / "bad.json").write_bytes(b"{}")
    connections, rps, seconds = 2, 10, 2
    log = tmp_path / "log.tsv"
    paced = [
        generators.h2load_http(
            predict.address, tmp_path / "predict.json", "application/json", connections, rps, seconds, log
        ),
        generators.h2load(
            infer.address, tmp_path / "infer.bin", connections, seconds, log, answer_bytes, rps
        ),
    ]
    for measured in paced:
        assert measured.errors == 0
        # At most the paced number, give or take the first second's requests; far below the closed loop's.
        assert connections * rps * (seconds - 1) <= measured.requests <= connections * rps * (seconds + 1)
    refused = generators.h2load_http(
        predict.address, tmp_path / "bad.json", "application/json", 1, rps, 1, log
    )
    assert refused.requests > 0
    assert refused.errors == refused.requests


@needs_generators
def test_h2load_counts_failed_grpc_calls_as_errors(
    server: Server, stored: StoredModel, one_row: Any, tmp_path: Path
) -> None:
    """A failed gRPC call is an HTTP 200 with a grpc-status trailer: it must still count as an error."""
    good = rows.model_infer_request(
        stored.name, [rows.matrix_tensor(rows.matrix(one_row))]
    ).SerializeToString()
    infer = endpoints.Endpoint(
        "tabserve", "OIP gRPC", "grpc", server.grpc_target, good, 1, endpoints.oip_grpc("probabilities")
    )
    answer_bytes = endpoints.check(infer, stored.predict(one_row).probabilities)
    unknown_model = rows.model_infer_request(
        "no_such_model", [rows.matrix_tensor(rows.matrix(one_row))]
    ).SerializeToString()
    (tmp_path / "bad.bin").write_bytes(rows.grpc_frame(unknown_model))
    measured = generators.h2load(
        server.grpc_target, tmp_path / "bad.bin", 1, 1, tmp_path / "log.tsv", answer_bytes
    )
    assert measured.requests > 0
    assert measured.errors == measured.requests


def test_fastapi_baseline_answers_like_the_pipeline_and_stops_with_its_workers(
    server: Server, stored: StoredModel, one_row: Any, tmp_path: Path
) -> None:
    launch = servers.fastapi_baseline(servers.free_port())
    with servers.running(launch, tmp_path / "output.txt") as baseline:
        members = [(pid, proctree.start_time(pid)) for pid in proctree.tree(baseline.pid)]
        assert len(members) >= 3  # uvicorn's supervisor and 2 workers
        for rows_in in (one_row, rows.tiled(one_row, 3)):
            records = rows.records(rows_in)
            route, body = (
                ("/predict", rows.predict_body(records[0]))
                if len(records) == 1
                else ("/predict_batch", rows.predict_batch_body(records))
            )
            endpoint = endpoints.Endpoint(
                "fastapi",
                f"HTTP {route}",
                "http",
                launch.url + route,
                body,
                len(records),
                endpoints.typed_http(["benign", "malignant"]),
            )
            endpoints.check(endpoint, stored.predict(rows_in).probabilities)
    deadline = time.monotonic() + 10  # a killed process takes a moment to be gone

    def left() -> list[int]:
        return [pid for pid, started in members if proctree.is_running(pid, started)]

    while left() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left()


def test_a_wrong_answer_fails_the_check(server: Server, stored: StoredModel, one_row: Any) -> None:
    endpoint = bench.http_predict("tabserve", server.url, one_row, CLASSES)
    with pytest.raises(endpoints.CheckError, match="differ"):
        endpoints.check(endpoint, 1 - stored.predict(one_row).probabilities)


# ---- the report ------------------------------------------------------------------------------------------


def run(
    system: str,
    transport: str,
    rps: float,
    rows_in: int = 1,
    p99: float = 20,
    errors: int = 0,
    connections: int = 32,
) -> dict[str, Any]:
    return {
        "system": system,
        "transport": transport,
        "rows": rows_in,
        "connections": connections if rows_in == 1 else 4,
        "load_average": 1.0,
        "requests": int(rps * 10),
        "seconds": 10.0,
        "rps": rps,
        "rows_per_second": rps * rows_in,
        "p50_ms": p99 / 2,
        "p95_ms": p99 * 0.9,
        "p99_ms": p99,
        "errors": errors,
        "server_cpu_ms_per_request": 1.0,
        "generator_cpu_percent": 5.0,
        "failure": None,
    }


def system(name: str, runs: list[dict[str, Any]], ready: float) -> dict[str, Any]:
    return {
        "name": name,
        "command": name,
        "ready_seconds": ready,
        "peak_rss_mib": 100.0,
        "runs": runs,
        "failure": None,
        "wall_seconds": 60.0,
    }


def section(
    tag: str, estimator: str, systems: list[dict[str, Any]], served: dict[str, float]
) -> dict[str, Any]:
    return {
        "model": {
            "tag": tag,
            "estimator": estimator,
            "features": {"numeric": 30},
            "missing_values": False,
            "rows": 114,
        },
        "plan": {"warmup_seconds": 3, "measure_seconds": 10, "batch_rows": 1000, "batch_connections": 4},
        "in_process": {
            "scorer": "compiled",
            "served": served,
            "scikit_learn": {"1": 200.0, "32": 6000.0, "1024": 50_000.0},
        },
        "systems": systems,
        "wall_seconds": 300.0,
    }


def document() -> dict[str, Any]:
    """A full run of two models: the first measured at 32 and 128 connections, the second at 32 only and
    without MLServer's REST."""
    default = section(
        "breast_cancer:x",
        "logistic_regression",
        [
            system(
                "tabserve",
                [
                    run("tabserve", "HTTP /predict", 1600),
                    run("tabserve", "OIP REST", 1400, p99=80),
                    run("tabserve", "OIP gRPC", 3000, errors=1),
                    run("tabserve", "OIP gRPC", 2800, p99=90, connections=128),
                    run("tabserve", "OIP gRPC", 70, rows_in=1000),
                ],
                ready=4.0,
            ),
            system("fastapi", [run("fastapi", "HTTP /predict", 1000)], ready=3.0),
            system(
                "mlserver",
                [
                    run("mlserver", "OIP REST", 1000),
                    run("mlserver", "OIP gRPC", 1500),
                    run("mlserver", "OIP gRPC", 1400, p99=100, connections=128),
                ],
                ready=9.0,
            ),
        ],
        served={"1": 5000.0, "32": 90_000.0, "1024": 100_000.0},  # 25x and 2x scikit-learn
    )
    tree = section(
        "customers:y",
        "hist_gradient_boosting",
        [
            system("tabserve", [run("tabserve", "OIP gRPC", 600, p99=40)], ready=6.0),
            system("mlserver", [run("mlserver", "OIP gRPC", 500)], ready=3.0),
        ],
        served={"1": 2000.0, "32": 30_000.0, "1024": 200_000.0},
    )
    return {
        "date": "2026-11-23T12:00:00+00:00",
        "mode": "full",
        "command": "python -m loadtests.bench",
        "wall_seconds": 480.0,
        "machine": {
            "nproc": 2,
            "cpu": "AMD EPYC",
            "memory_gib": 23.5,
            "os": "Debian",
            "kernel": "6",
            "python": "3.11",
        },
        "versions": {"bentoml": "1.4.39"},
        "models": [default, tree],
    }


def test_targets_are_computed_per_model_against_mlserver_and_in_process() -> None:
    default, tree = ({t.name: t.met for t in report.targets(s)} for s in document()["models"])
    assert default["in-process, 1 row per call: tabserve's scorer vs scikit-learn"] is True  # 25x
    assert default["in-process, 1,024 rows per call: tabserve's scorer vs scikit-learn"] is False  # 2x
    assert default["OIP gRPC vs MLServer OIP gRPC, req/s at 32 connections"] is True  # 2.0x
    assert default["OIP REST vs MLServer OIP REST, req/s at 32 connections"] is False  # 1.4x
    assert default["HTTP /predict vs MLServer OIP REST, req/s at 32 connections"] is True  # 1.6x
    assert default["HTTP /predict: p99 and errors at 32 connections"] is True
    assert default["OIP REST: p99 and errors at 32 connections"] is False  # p99 80 ms
    assert default["OIP gRPC: p99 and errors at 32 connections"] is False  # 1 error
    assert default["OIP gRPC: p99 and errors at 128 connections vs MLServer OIP gRPC"] is True  # 90 vs 100
    assert default["OIP REST: p99 and errors at 128 connections vs MLServer OIP REST"] is None
    grpc_batch = "OIP gRPC: 1,000-row requests vs the in-process rate at 1,024 rows per call"
    assert default[grpc_batch] is True  # 70,000 of 100,000 rows/s
    assert (
        default["HTTP /predict_batch: 1,000-row requests vs the in-process rate at 1,024 rows per call"]
        is None
    )
    assert default["tabserve: start to ready"] is True
    # The second model's plan left out what it did not measure; the rest is judged as for the first.
    assert tree["OIP gRPC vs MLServer OIP gRPC, req/s at 32 connections"] is False  # 1.2x
    assert tree["OIP gRPC: p99 and errors at 32 connections"] is True
    assert tree["OIP REST vs MLServer OIP REST, req/s at 32 connections"] is None
    assert tree[grpc_batch] is None
    assert tree["tabserve: start to ready"] is False  # 6 s
    assert list(default) == list(tree)  # one row of the targets table per target


def test_targets_table_renders_each_model_with_its_verdicts() -> None:
    text = report.render(document())
    assert (
        "| target | needed | breast_cancer (logistic_regression) | customers (hist_gradient_boosting) |"
        in text
    )
    assert (
        "| OIP gRPC vs MLServer OIP gRPC, req/s at 32 connections | >= 2.0x | 2.00x (3,000 vs 1,500): met "
        "| 1.20x (600 vs 500): **not met** |"
    ) in text
    assert "| tabserve: start to ready | <= 5 s | 4.0 s: met | 6.0 s: **not met** |" in text
    assert "| OIP REST vs MLServer OIP REST, req/s at 32 connections | >= 2.0x | " in text
    assert text.count("### breast_cancer (logistic_regression)") == 1
    assert text.count("### customers (hist_gradient_boosting)") == 1


def test_markdown_section_is_replaced_and_the_rest_kept(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(
        f"# Benchmarks\n\n## Training\n\nhand-written\n\n{report.START}\nstale\n{report.END}\n\nafter\n"
    )
    report.update_markdown(path, document())
    report.update_markdown(path, document())
    text = path.read_text()
    assert text.count(report.START) == 1
    assert "hand-written" in text
    assert text.endswith("after\n")
    assert "stale" not in text
    assert "| tabserve | OIP gRPC | 32 | 3,000 | 2.00x |" in text


@needs_generators
def test_profile_samples_the_workers_under_load(stores: Stores, default_model: object) -> None:
    """`make profile`: a real server under h2load, sampled by py-spy; the model call is in the samples."""
    result = subprocess.run(
        [sys.executable, "-m", "loadtests.profile", "grpc", "--connections", "4", "--seconds", "2"],
        cwd=PROJECT_ROOT,
        env={**stores.env(), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "0 errors" in result.stdout
    assert "samples holding the GIL" in result.stdout
    # The data plane, which every request runs through, holds a large share of the samples. (The model
    # call no longer does: with the compiled scorer, a 1-row call is far below the top 30.)
    assert "DataPlane.infer (serving/dataplane.py" in result.stdout
