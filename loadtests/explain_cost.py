"""What explanations cost (models/explain.py, serving/explaining.py), measured in one run:

    .venv/bin/python -m loadtests.explain_cost    # ~5 min; loadtests/results/explain-cost-<time>.json

1. In process, one thread, on the default data (breast cancer, 30 numeric features; fitted on the default
   training split, explaining its held-out rows): each method's explainer, its build time and its cost per
   explained row at batches of 1, 10 and 100 rows (best of `--repeats`). Tree: HistGradientBoosting and
   random forest; linear: logistic regression; permutation: the same pipelines forced through the
   model-agnostic explainer with the default settings (100 background rows, 3 permutations).
2. Served: `bentoml serve` of the default model (stores of its own in the results folder; 2 API workers,
   the model in process), on loopback, driven by wrk:
   a. one client (-c1): /explain (1 record) and /explain_batch (10, 100 records) beside /predict and
      /predict_batch at the same sizes: milliseconds per request and per row, and what explaining adds;
   b. /predict at 32 connections alone; then with a second load beside it (another wrk, 4 connections of
      10 records each): /predict_batch (the control: any load takes CPU from /predict on a saturated
      machine), then /explain_batch. /predict's req/s and p99 each time, and what the load beside got (a
      refused explanation, 503, counts as an error of that load). Interleaved rounds (`--rounds`): the
      medians of each scenario over the rounds, and of its req/s against /predict alone in the same round.
The load average is recorded beside each served run: the figures mean little on a machine busy with
something else.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import httpx
import pandas as pd
import typer

from loadtests import generators, rows, servers
from loadtests.bench import RESULTS, machine
from models.candidates import candidates
from models.data import Task, load_default, split
from models.explain import Explainer, ExplainerOptions
from models.schema import FeatureSchema

BATCHES = (1, 10, 100)
CONNECTIONS = 32
EXPLAIN_BESIDE = {"records": 10, "connections": 4}
# (method asked for or None for the estimator's own, estimator)
CASES = [
    (None, "hist_gradient_boosting"),
    (None, "random_forest"),
    (None, "logistic_regression"),
    ("permutation", "logistic_regression"),
    ("permutation", "hist_gradient_boosting"),
]


@dataclass
class InProcessCost:
    method: str
    output: str
    estimator: str
    build_seconds: float
    ms_per_row: dict[int, float]  # batch rows -> milliseconds per explained row


@dataclass
class ServedRun:
    name: str
    route: str
    records: int
    connections: int
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    load_average: float

    @property
    def ms_per_row(self) -> float:
        return 1000 / (self.rps * self.records) if self.rps else float("nan")


def main(
    seconds: Annotated[int, typer.Option(help="measured seconds per served run")] = 8,
    repeats: Annotated[int, typer.Option(help="in-process timings per batch (the best counts)")] = 5,
    rounds: Annotated[int, typer.Option(help="interleaved rounds of the side-by-side runs")] = 5,
    in_process_part: Annotated[bool, typer.Option("--in-process/--served-only")] = True,
) -> None:
    """Cost per explained row per method, and plain /predict throughput with and without explanations."""
    stamp = datetime.now(UTC)
    workdir = RESULTS / f"explain-cost-{stamp:%Y%m%dT%H%M%S}"
    workdir.mkdir(parents=True)
    started = time.perf_counter()
    import_seconds, first_permutation_seconds = warm_up() if in_process_part else (0.0, 0.0)
    costs = in_process(repeats) if in_process_part else []
    print(in_process_table(costs))
    served = serve_and_measure(workdir, seconds, rounds)
    print(served_tables(served))
    document = {
        "date": stamp.isoformat(timespec="seconds"),
        "command": " ".join(["python -m loadtests.explain_cost", *sys.argv[1:]]),
        "machine": machine(),
        "shap_import_seconds": round(import_seconds, 2),
        "first_permutation_explainer_seconds": round(first_permutation_seconds, 2),
        "in_process": [asdict(cost) for cost in costs],
        "served": asdict(served),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    (RESULTS / f"explain-cost-{stamp:%Y%m%dT%H%M%S}.json").write_text(json.dumps(document, indent=2))
    print(
        f"import shap {import_seconds:.2f} s; first permutation explainer in a process (numba compiles) "
        f"{first_permutation_seconds:.2f} s; wall {document['wall_seconds']} s"
    )


# ---- in process --------------------------------------------------------------------------------------------


def default_split() -> tuple[FeatureSchema, pd.DataFrame, pd.Series, pd.DataFrame]:
    table = load_default()
    parts = split(table, Task.CLASSIFICATION, test_size=rows.TEST_SIZE, seed=rows.SEED)
    schema = FeatureSchema.infer(table.features)
    return schema, schema.prepare(parts.X_train), parts.y_train, schema.prepare(parts.X_test)


def warm_up() -> tuple[float, float]:
    """shap's import, and the first permutation explainer of a process (shap compiles its numba code): paid
    once per worker process, by its first explanation, and kept out of the figures below."""
    started = time.perf_counter()
    import shap  # noqa: F401, PLC0415

    imported = time.perf_counter()
    schema, train, target, _ = default_split()
    pipeline = candidates(Task.CLASSIFICATION, schema, rows.SEED)["logistic_regression"].fit(train, target)
    Explainer(pipeline, schema, pipeline.classes_.tolist(), train, method="permutation")
    return imported - started, time.perf_counter() - imported


def in_process(repeats: int) -> list[InProcessCost]:
    schema, train, target, test = default_split()
    pipelines = candidates(Task.CLASSIFICATION, schema, rows.SEED)
    fitted: dict[str, Any] = {}
    costs = []
    for method, estimator in CASES:
        if estimator not in fitted:
            fitted[estimator] = pipelines[estimator].fit(train, target)
        pipeline = fitted[estimator]
        started = time.perf_counter()
        explainer = Explainer(pipeline, schema, pipeline.classes_.tolist(), train, ExplainerOptions(), method)
        built = time.perf_counter() - started
        per_row = {}
        for size in BATCHES:
            batch = rows.tiled(test, size)
            tries = 1 if explainer.method == "permutation" and size > 10 else repeats
            timings = []
            for _ in range(tries):
                begun = time.perf_counter()
                explainer.explain(batch)
                timings.append(time.perf_counter() - begun)
            per_row[size] = round(1000 * min(timings) / size, 4)
        cost = InProcessCost(explainer.method, explainer.output, estimator, round(built, 3), per_row)
        print(f"  {cost.method:<12} {estimator:<24} build {built:6.3f} s  ms/row {per_row}")
        costs.append(cost)
    return costs


def in_process_table(costs: list[InProcessCost]) -> str:
    lines = [
        "| method | units | estimator | build s | ms/row, 1 row | ms/row, 10 rows | ms/row, 100 rows |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for cost in costs:
        ms = cost.ms_per_row
        lines.append(
            f"| {cost.method} | {cost.output} | {cost.estimator} | {cost.build_seconds:.3f} | "
            f"{ms[1]:.3f} | {ms[10]:.3f} | {ms[100]:.3f} |"
        )
    return "\n".join(lines)


# ---- served ------------------------------------------------------------------------------------------------


@dataclass
class Served:
    first_explain_seconds: float  # a worker's first explanation: shap's import and the explainer's build
    method: str  # the served model's explanation method
    one_client: list[ServedRun]
    rounds: list[
        list[ServedRun]
    ]  # each: /predict alone, beside predictions, that load, beside explanations, that load


def serve_and_measure(workdir: Path, seconds: float, rounds_of_runs: int) -> Served:
    stores = {"TABSERVE_DATA_DIR": str(workdir / "data"), "BENTOML_HOME": str(workdir / "bentoml")}
    os.environ.update(stores)  # the training run and the service see the same stores
    subprocess.run([sys.executable, "train.py"], cwd=servers.PROJECT_ROOT, check=True, capture_output=True)
    launch = servers.tabserve(servers.free_port(), servers.free_port(), workdir / "predictions")
    bodies: dict[tuple[str, int], Path] = {}
    for size in BATCHES:
        batch = rows.records(rows.tiled(rows.held_out(), size))
        for kind in ("predict", "explain"):
            body = workdir / f"{kind}-{size}.json"
            body.write_bytes(rows.predict_body(batch[0]) if size == 1 else rows.predict_batch_body(batch))
            bodies[kind, size] = body
    with servers.running(launch, workdir / "server.txt"):
        began = time.perf_counter()
        answer = httpx.post(
            f"{launch.url}/explain",
            content=bodies["explain", 1].read_bytes(),
            headers={"content-type": "application/json"},
            timeout=60,
        )
        first = time.perf_counter() - began
        answer.raise_for_status()
        method = str(answer.json()["explanation"]["method"])
        print(f"  a worker's first /explain (shap imported, explainer built): {first:.2f} s ({method})")
        for (kind, size), body in bodies.items():  # both workers build their explainers
            run(launch.url, "warm-up", kind, size, body, 2, 2)
        one_client = [
            run(launch.url, kind, kind, size, bodies[kind, size], 1, seconds)
            for size in BATCHES
            for kind in ("predict", "explain")
        ]
        predict = bodies["predict", 1]
        rounds: list[list[ServedRun]] = []
        for _ in range(rounds_of_runs):  # interleaved: a busy moment of the machine falls on all alike
            alone = run(launch.url, "predict alone", "predict", 1, predict, CONNECTIONS, seconds)
            # The same load beside it, predictions only (a control: any load takes CPU from the other),
            # then with explanations.
            rounds.append([alone, *two_loads(launch.url, "predict", bodies, seconds)])
            rounds[-1] += two_loads(launch.url, "explain", bodies, seconds)
    return Served(round(first, 3), method, one_client, rounds)


def two_loads(url: str, kind: str, bodies: dict[tuple[str, int], Path], seconds: float) -> list[ServedRun]:
    """/predict at CONNECTIONS, with a load of `kind` (EXPLAIN_BESIDE's shape) beside it."""
    size, connections = EXPLAIN_BESIDE["records"], EXPLAIN_BESIDE["connections"]
    other: list[ServedRun] = []
    load = threading.Thread(
        target=lambda: other.append(
            run(url, f"{kind} load", kind, size, bodies[kind, size], connections, seconds)
        )
    )
    load.start()
    predict = run(url, f"predict beside {kind}s", "predict", 1, bodies["predict", 1], CONNECTIONS, seconds)
    load.join()
    return [predict, *other]


def run(url: str, name: str, kind: str, size: int, body: Path, connections: int, seconds: float) -> ServedRun:
    route = f"/{kind}" if size == 1 else f"/{kind}_batch"
    load_average = round(os.getloadavg()[0], 2)
    measured = generators.wrk(url + route, body, "application/json", connections, seconds)
    served = ServedRun(
        name,
        route,
        size,
        connections,
        measured.requests,
        measured.errors,
        round(measured.rps, 1),
        round(measured.p50_ms, 2),
        round(measured.p99_ms, 2),
        load_average,
    )
    if name != "warm-up":
        print(
            f"  {name:<28} {route:<15} x{size:<4} c{connections:<3} {served.rps:8.1f} req/s  "
            f"p50 {served.p50_ms:7.2f} ms  p99 {served.p99_ms:7.2f} ms  "
            f"errors {served.errors}/{served.requests}  load {load_average}"
        )
    return served


def served_tables(results: Served) -> str:
    one = {(run.name, run.records): run for run in results.one_client}
    lines = [
        "| records per request | /predict(_batch) ms/request | /explain(_batch) ms/request | "
        "explain ms/row | added by explaining, ms/row |",
        "|---:|---:|---:|---:|---:|",
    ]
    for size in BATCHES:
        predicted, explained = one["predict", size], one["explain", size]
        lines.append(
            f"| {size} | {predicted.p50_ms:.2f} | {explained.p50_ms:.2f} | {explained.ms_per_row:.3f} | "
            f"{explained.ms_per_row - predicted.ms_per_row:.3f} |"
        )
    lines += [
        "",
        "| run | route | connections | req/s | ratio to alone | p50 ms | p99 ms | errors / requests |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for scenario in zip(*results.rounds, strict=True):
        ratios = [run.rps / its_round[0].rps for run, its_round in zip(scenario, results.rounds, strict=True)]
        first = scenario[0]
        errors, requests = sum(run.errors for run in scenario), sum(run.requests for run in scenario)
        lines.append(
            f"| {first.name} | {first.route} x{first.records} | {first.connections} | "
            f"{median([run.rps for run in scenario]):.0f} | {median(ratios):.2f} | "
            f"{median([run.p50_ms for run in scenario]):.1f} | "
            f"{median([run.p99_ms for run in scenario]):.1f} | {errors} / {requests} |"
        )
    loads = [run.load_average for its_round in results.rounds for run in its_round]
    lines += ["", f"Load average at the runs' starts: {min(loads)} to {max(loads)}."]
    return "\n".join(lines)


def median(values: list[float]) -> float:
    return float(statistics.median(values))


if __name__ == "__main__":
    typer.run(main)
