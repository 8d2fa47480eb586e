"""`make bench`: the service against its peers, on the same pipeline and the same rows, on loopback.

    .venv/bin/python -m loadtests.bench            # full run (~13 min): updates BENCHMARKS.md and .json
    .venv/bin/python -m loadtests.bench --quick    # 32 connections only, short runs (~3 min)

Two models, one after the other:
- the served default model (breast cancer, 30 numeric features; a linear model): every system, at 1, 8, 32
  and 128 connections;
- a tree model on a table with categories and missing values (loadtests/tree_model.py: examples/customers.csv
  with HistGradientBoosting), trained into stores of the benchmark's own: tabserve and MLServer only, at 32
  and 128 connections (the lines the targets read), to keep the full run near 13 min on 2 cores.
A --quick run measures both models at 32 connections only.

For each model, one system after another, each on free loopback ports and stopped before the next starts:
1. the in-process model call (tabserve's scorer, and the scikit-learn pipeline the others call): rows/s at
   1, 32 and 1,024 rows per call, the physical limit;
2. tabserve (`bentoml serve service:Tabserve`): typed HTTP /predict, OIP REST and OIP gRPC;
3. a minimal FastAPI app (loadtests/baselines/fastapi_app.py): HTTP /predict (default model only);
4. MLServer with its scikit-learn runtime and adaptive batching: OIP REST and gRPC.
Each endpoint is checked with a real client first (right probabilities), then driven by wrk (HTTP) or
h2load (gRPC) at each number of connections: a warm-up run, then a measured run with the server's CPU
time read from /proc before and after. Then 1,000-row requests. Start to ready is timed for every server.
Raw figures go to loadtests/results/bench-<time>.json; a full run also rewrites BENCHMARKS.json and the
generated section of BENCHMARKS.md, targets included (see loadtests/report.py).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import numpy as np
import pandas as pd
import typer
from threadpoolctl import threadpool_limits

from loadtests import endpoints, generators, mlserver_env, proctree, report, rows, servers, tree_model
from loadtests.endpoints import Endpoint
from models.registry import served_model
from models.schema import FeatureKind
from models.store import StoredModel
from serving.dataplane import OIP_DATATYPES
from serving.model import RowPredictor
from settings import get_settings

RESULTS = Path(__file__).resolve().parent / "results"
BENCHMARKS_MD = servers.PROJECT_ROOT / "BENCHMARKS.md"
BENCHMARKS_JSON = servers.PROJECT_ROOT / "BENCHMARKS.json"
MIB = 2**20


@dataclass(frozen=True)
class Plan:
    connections: list[int]
    warmup_seconds: float
    measure_seconds: float
    in_process_seconds: float  # per batch size
    in_process_sizes: tuple[int, ...] = (1, 32, 1024)
    batch_rows: int = 1000
    # Enough requests in flight to keep 2 cores busy; 1,000-row requests are not merged by batching.
    batch_connections: int = 4


FULL = Plan(connections=[1, 8, 32, 128], warmup_seconds=3, measure_seconds=10, in_process_seconds=2)
# The tree model's full run: the connections the targets read (report.py), not the whole curve.
REDUCED = replace(FULL, connections=[32, 128])
QUICK = Plan(connections=[32], warmup_seconds=1, measure_seconds=3, in_process_seconds=1)


@dataclass
class Run:
    system: str
    transport: str
    rows: int  # per request
    connections: int
    load_average: float  # 1-minute load average when the run started: other jobs share the machine
    requests: int = 0
    seconds: float = 0.0
    rps: float = 0.0  # successful requests per second
    rows_per_second: float = 0.0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    errors: int = 0
    server_cpu_ms_per_request: float = 0.0
    generator_cpu_percent: float = 0.0  # of one core
    failure: str | None = None  # the run could not be measured


@dataclass
class SystemResult:
    name: str
    command: str
    ready_seconds: float | None = None  # from starting the server to its readiness check answering
    peak_rss_mib: float | None = None  # while serving (sampled every 0.25 s), whole process tree
    runs: list[Run] = field(default_factory=list)
    failure: str | None = None  # the system could not be started or checked
    wall_seconds: float = 0.0  # start, checks, every run and stop


@dataclass(frozen=True)
class Workload:
    """The rows every system gets, and what the pipeline answers for them in-process."""

    model: StoredModel
    one: pd.DataFrame
    batch: pd.DataFrame
    expected: dict[int, np.ndarray]  # rows per request -> class probabilities

    @classmethod
    def of(cls, model: StoredModel, held_out: pd.DataFrame, batch_rows: int) -> Workload:
        one, batch = held_out.head(1), rows.tiled(held_out, batch_rows)
        expected = {len(frame): np.asarray(model.predict(frame).probabilities) for frame in (one, batch)}
        return cls(model, one, batch, expected)


@dataclass(frozen=True)
class Subject:
    """A model under test: its rows, its plan, the systems that serve it, and what points tabserve at it."""

    workload: Workload
    held_out: pd.DataFrame
    plan: Plan
    systems: tuple[str, ...]
    tabserve_env: dict[str, str]  # nothing for the served default model

    @property
    def model(self) -> StoredModel:
        return self.workload.model


def main(
    quick: Annotated[bool, typer.Option("--quick", help="32 connections only, short runs (~3 min)")] = False,
    update: Annotated[
        bool | None,
        typer.Option(help="rewrite BENCHMARKS.md and BENCHMARKS.json (default: on for a full run)"),
    ] = None,
    systems: Annotated[
        list[str] | None,
        typer.Option("--system", help="only this system (repeatable): tabserve, fastapi, mlserver"),
    ] = None,
    models: Annotated[
        list[str] | None,
        typer.Option("--model", help=f"only this model (repeatable): default, {tree_model.NAME}"),
    ] = None,
) -> None:
    """Benchmark tabserve against FastAPI and MLServer on two models; see the module docstring."""
    _stop_on_sigterm()
    missing = generators.available()
    if missing:
        raise typer.BadParameter(
            f"missing load generators: {', '.join(missing)} (apt-get install wrk nghttp2-client)"
        )
    started = time.monotonic()
    stamp = datetime.now(UTC)
    workdir = RESULTS / f"bench-{stamp:%Y%m%dT%H%M%S}"
    workdir.mkdir(parents=True)
    subjects = {
        "default": partial(default_subject, QUICK if quick else FULL),
        tree_model.NAME: partial(tree_subject, QUICK if quick else REDUCED, workdir),
    }
    sections = []
    for name, make_subject in subjects.items():
        if models and name not in models:
            continue
        subject_started = time.monotonic()
        subject = make_subject()
        sections.append(bench_subject(subject, systems, workdir, subject_started))

    document = {
        "date": stamp.isoformat(timespec="seconds"),
        "mode": "quick" if quick else "full",
        "command": " ".join(["python -m loadtests.bench", *sys.argv[1:]]),
        "wall_seconds": round(time.monotonic() - started, 1),
        "machine": machine(),
        "versions": versions(),
        "models": sections,
    }
    raw = RESULTS / f"bench-{stamp:%Y%m%dT%H%M%S}.json"
    raw.write_text(json.dumps(document, indent=2))
    for bodies in workdir.glob("*/bodies"):
        shutil.rmtree(bodies, ignore_errors=True)
    echo(report.render(document))
    echo(f"raw figures: {raw.relative_to(servers.PROJECT_ROOT)}")
    echo(f"server output: {workdir.relative_to(servers.PROJECT_ROOT)}")
    if update is None:
        update = not quick  # the committed figures are those of a full run
    if update:
        BENCHMARKS_JSON.write_text(json.dumps(document, indent=2) + "\n")
        report.update_markdown(BENCHMARKS_MD, document)
        echo(f"updated {BENCHMARKS_MD.name} and {BENCHMARKS_JSON.name}")


def default_subject(plan: Plan) -> Subject:
    """The model the service serves by default, on the default model's held-out rows."""
    model = served_model(get_settings())[0]
    held_out = rows.held_out()
    if model.classes is None or model.schema.names != list(held_out.columns):
        raise typer.BadParameter(
            f"the benchmark needs the default model (`python train.py`), not {model.tag}"
        )
    return Subject(Workload.of(model, held_out, plan.batch_rows), held_out, plan, tuple(SYSTEMS), {})


def tree_subject(plan: Plan, workdir: Path) -> Subject:
    """The tree model (loadtests/tree_model.py), trained now into the benchmark's own stores, served by
    tabserve from there (pinned to its tag) and by MLServer."""
    stores = workdir / "stores"
    echo(
        f"Training {tree_model.NAME} ({tree_model.ESTIMATOR}) into {stores.relative_to(servers.PROJECT_ROOT)}"
    )
    tag = tree_model.train_into(stores, workdir / f"{tree_model.NAME}-training.txt")
    model = tree_model.open_model(stores, tag)
    held_out = rows.carried_by_every_transport(rows.held_out(tree_model.table()), model.schema)
    return Subject(
        Workload.of(model, held_out, plan.batch_rows),
        held_out,
        plan,
        ("tabserve", "mlserver"),
        {**tree_model.stores_env(stores), "TABSERVE_MODEL_TAG": tag},
    )


def bench_subject(
    subject: Subject, systems: list[str] | None, workdir: Path, started: float
) -> dict[str, Any]:
    """Every measurement of one model: the section of the document that report.py renders."""
    model, plan = subject.model, subject.plan
    kinds = [feature.kind.value for feature in model.schema.features]
    echo(f"{model.tag} ({model.metadata['estimator']}):")
    echo(f"  in-process model call: {', '.join(map(str, plan.in_process_sizes))} rows per call")
    in_process = measure_in_process(model, subject.held_out, plan)
    results: list[SystemResult] = []
    for name in subject.systems:
        if systems and name not in systems:
            continue
        echo(f"  {name}:")
        system_started = time.monotonic()
        result = SYSTEMS[name](subject, workdir / model.name)
        result.wall_seconds = round(time.monotonic() - system_started, 1)
        results.append(result)
    return {
        "model": {
            "tag": model.tag,
            "estimator": model.metadata["estimator"],
            "features": {kind: kinds.count(kind) for kind in dict.fromkeys(kinds)},
            "missing_values": bool(subject.held_out.isna().any().any()),
            "rows": len(subject.held_out),
        },
        "plan": asdict(plan),
        "in_process": asdict(in_process),
        "systems": [asdict(result) for result in results],
        "wall_seconds": round(time.monotonic() - started, 1),
    }


# ---- the systems -------------------------------------------------------------------------------------------


def bench_tabserve(subject: Subject, workdir: Path) -> SystemResult:
    workload = subject.workload
    log_dir = workdir / "tabserve-predictions"  # the service's prediction log, deleted afterwards
    launch = servers.tabserve(servers.free_port(), servers.free_port(), log_dir, **subject.tabserve_env)
    model, classes = workload.model, [str(label) for label in workload.model.classes or []]
    assert launch.grpc_target is not None
    single, batch = (
        [
            http_predict(launch.name, launch.url, frame, classes),
            oip_rest(launch.name, launch.url, model, frame, "probabilities"),
            oip_grpc(launch.name, launch.grpc_target, model, frame, "probabilities", raw=True),
        ]
        for frame in (workload.one, workload.batch)
    )
    try:
        return bench_system(launch, single, batch, subject.workload, subject.plan, workdir)
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)


def bench_fastapi(subject: Subject, workdir: Path) -> SystemResult:
    workload = subject.workload
    launch = servers.fastapi_baseline(servers.free_port())
    classes = [str(label) for label in workload.model.classes or []]
    single = [http_predict(launch.name, launch.url, workload.one, classes)]
    batch = [http_predict(launch.name, launch.url, workload.batch, classes)]
    return bench_system(launch, single, batch, subject.workload, subject.plan, workdir)


def bench_mlserver(subject: Subject, workdir: Path) -> SystemResult:
    try:
        if not mlserver_env.installed():
            echo(f"    installing MLServer into {mlserver_env.VENV} (first use)")
        executable = mlserver_env.ensure_venv(workdir / "mlserver-install.txt")
    except RuntimeError as error:
        return SystemResult("mlserver", "mlserver start", failure=str(error))
    folder, model = workdir / "mlserver-models", subject.model
    http_port, grpc_port = servers.free_port(), servers.free_port()
    mlserver_env.export_model(model, folder, http_port, grpc_port, servers.free_port())
    launch = servers.mlserver(executable, folder, model.name, http_port, grpc_port)
    assert launch.grpc_target is not None
    frames = (subject.workload.one, subject.workload.batch)
    single, batch = (
        [
            oip_rest(launch.name, launch.url, model, frame, "predict_proba"),
            # Typed contents: MLServer answered them faster than raw_input_contents here (A/B, 5 rounds).
            oip_grpc(launch.name, launch.grpc_target, model, frame, "predict_proba", raw=False),
        ]
        for frame in frames
    )
    return bench_system(launch, single, batch, subject.workload, subject.plan, workdir)


SYSTEMS: dict[str, Callable[[Subject, Path], SystemResult]] = {
    "tabserve": bench_tabserve,
    "fastapi": bench_fastapi,
    "mlserver": bench_mlserver,
}


# ---- endpoints: one request body on one route -------------------------------------------------------------


def http_predict(system: str, url: str, frame: pd.DataFrame, classes: list[str]) -> Endpoint:
    """The typed HTTP API: /predict with one record, /predict_batch with a list of them."""
    records = rows.records(frame)
    if len(records) == 1:
        route, body = "/predict", rows.predict_body(records[0])
    else:
        route, body = "/predict_batch", rows.predict_batch_body(records)
    read = endpoints.typed_http(classes)
    return Endpoint(system, f"HTTP {route}", "http", url + route, body, len(records), read)


def oip_rest(system: str, url: str, model: StoredModel, frame: pd.DataFrame, output: str) -> Endpoint:
    body = rows.oip_rest_body(*oip_tensors(system, model, frame))
    address = f"{url}/v2/models/{model.name}/infer"
    return Endpoint(system, "OIP REST", "http", address, body, len(frame), endpoints.oip_rest(output))


def oip_grpc(
    system: str, target: str, model: StoredModel, frame: pd.DataFrame, output: str, raw: bool
) -> Endpoint:
    """The tensors of `oip_tensors`, in raw_input_contents (`raw`) or in typed contents."""
    tensors, content_type = oip_tensors(system, model, frame)
    body = rows.model_infer_request(model.name, tensors, raw, content_type).SerializeToString()
    return Endpoint(system, "OIP gRPC", "grpc", target, body, len(frame), endpoints.oip_grpc(output))


def oip_tensors(system: str, model: StoredModel, frame: pd.DataFrame) -> tuple[list[rows.Tensor], str | None]:
    """`frame`'s rows as `system` takes them over OIP, and the request's content type.

    An all-numeric model: one [rows, features] FP64 tensor, each system's fastest request. Otherwise one
    tensor per feature: for tabserve, of the datatype its model metadata names (BOOL for a boolean, BYTES for
    a category); for MLServer, what its PandasCodec decodes into the frame the pipeline takes (booleans as
    FP64 0/1, as FeatureSchema.prepare makes them; BYTES marked as text; the request marked as a DataFrame).
    """
    schema = model.schema
    if all(feature.kind is FeatureKind.NUMERIC for feature in schema.features):
        return [rows.matrix_tensor(rows.matrix(frame))], None
    prepared = schema.prepare(frame)
    if system == "mlserver":
        datatypes = {
            f.name: "BYTES" if f.kind is FeatureKind.CATEGORICAL else "FP64" for f in schema.features
        }
        return rows.column_tensors(prepared, datatypes, hint_text=True), rows.DATAFRAME_CONTENT_TYPE
    datatypes = {feature.name: OIP_DATATYPES[feature.kind] for feature in schema.features}
    return rows.column_tensors(prepared, datatypes, hint_text=False), None


# ---- measuring --------------------------------------------------------------------------------------------


def bench_system(
    launch: servers.Launch,
    single: list[Endpoint],
    batch: list[Endpoint],
    workload: Workload,
    plan: Plan,
    workdir: Path,
) -> SystemResult:
    result = SystemResult(
        launch.name, " ".join(Path(part).name if "/" in part else part for part in launch.command)
    )
    try:
        with (
            servers.running(launch, workdir / f"{launch.name}-output.txt") as server,
            proctree.PeakRss(server.pid) as peak,
        ):
            result.ready_seconds = round(server.ready_seconds, 2)
            echo(f"    ready in {server.ready_seconds:.1f} s")
            # Every endpoint is checked before any load: a wrong answer must not make it into the table.
            checked = [(endpoint, check(endpoint, workload)) for endpoint in single + batch]
            for endpoint, answer_bytes in checked:
                levels = plan.connections if endpoint in single else [plan.batch_connections]
                for connections in levels:
                    result.runs.append(measure(server, endpoint, answer_bytes, connections, plan, workdir))
            for endpoint in single:  # still answering right after the load
                check(endpoint, workload)
            result.peak_rss_mib = round(peak.peak / MIB, 1)
    except (RuntimeError, endpoints.CheckError) as error:
        result.failure = str(error)[-2000:]
        echo(f"    FAILED: {result.failure}")
    return result


def check(endpoint: Endpoint, workload: Workload) -> int:
    return endpoints.check(endpoint, workload.expected[endpoint.rows])


def measure(
    server: servers.Running,
    endpoint: Endpoint,
    answer_bytes: int,
    connections: int,
    plan: Plan,
    workdir: Path,
) -> Run:
    run = Run(endpoint.system, endpoint.transport, endpoint.rows, connections, round(os.getloadavg()[0], 2))
    label = f"    {endpoint.transport:<20} {endpoint.rows:>5} rows x {connections:>3} connections"
    slug = re.sub(r"\W+", "-", endpoint.transport)
    body = workdir / "bodies" / f"{endpoint.system}-{slug}-{endpoint.rows}.bin"
    body.parent.mkdir(parents=True, exist_ok=True)
    body.write_bytes(endpoint.wire_body)
    log = workdir / "h2load-log.tsv"
    try:
        load(endpoint, body, connections, plan.warmup_seconds, answer_bytes, log)
        cpu_before = proctree.cpu_seconds(server.pid)
        measured = load(endpoint, body, connections, plan.measure_seconds, answer_bytes, log)
        cpu = proctree.cpu_seconds(server.pid) - cpu_before
    except generators.GeneratorError as error:
        run.failure = str(error)[-1000:]
        echo(f"{label}: FAILED {run.failure}")
        return run
    run.requests, run.seconds, run.errors = measured.requests, round(measured.seconds, 2), measured.errors
    run.rps = round(measured.rps, 1)
    run.rows_per_second = round(measured.rps * endpoint.rows, 1)
    run.p50_ms, run.p95_ms, run.p99_ms = (
        round(value, 2) for value in (measured.p50_ms, measured.p95_ms, measured.p99_ms)
    )
    run.server_cpu_ms_per_request = round(1000 * cpu / max(measured.requests, 1), 2)
    run.generator_cpu_percent = round(measured.generator_cpu_percent, 1)
    echo(
        f"{label}: {run.rps:8.1f} req/s  p99 {run.p99_ms:7.1f} ms  errors {run.errors}  "
        f"server CPU {run.server_cpu_ms_per_request} ms/req"
    )
    return run


def load(
    endpoint: Endpoint, body: Path, connections: int, seconds: float, answer_bytes: int, log: Path
) -> generators.Measurement:
    if endpoint.protocol == "http":
        return generators.wrk(endpoint.address, body, "application/json", connections, seconds)
    return generators.h2load(endpoint.address, body, connections, seconds, log, answer_bytes)


@dataclass(frozen=True)
class InProcess:
    scorer: str  # what serves the model (serving/model.py planned_scorer)
    served: dict[str, float]  # rows per call -> rows/s
    scikit_learn: dict[str, float]


def measure_in_process(model: StoredModel, held_out: pd.DataFrame, plan: Plan) -> InProcess:
    """rows/s of the model call that tabserve serves (serving/model.py RowPredictor: the compiled scorer)
    and of the scikit-learn pipeline that the other systems call, on prepared rows, in this process, on one
    thread (as the servers run them)."""
    prepared = model.schema.prepare(held_out)
    # As the data plane hands them over: rows in schema column order, float64 where every feature is a
    # number, else objects (serving/dataplane.py).
    numeric_only = all(feature.kind is FeatureKind.NUMERIC for feature in model.schema.features)
    served = RowPredictor(model, compiled=True)
    pipeline = model.pipeline
    figures: dict[str, dict[str, float]] = {"served": {}, "scikit-learn": {}}
    with threadpool_limits(1):
        for size in plan.in_process_sizes:
            frame = rows.tiled(prepared, size)
            calls = {
                "served": partial(served, frame.to_numpy(dtype=np.float64 if numeric_only else object)),
                "scikit-learn": partial(pipeline.predict_proba, frame),
            }
            for name, call in calls.items():
                call()
                count, started = 0, time.perf_counter()
                while (elapsed := time.perf_counter() - started) < plan.in_process_seconds:
                    call()
                    count += 1
                figures[name][str(size)] = round(count * size / elapsed, 1)
            echo(
                f"    {size:>5} rows per call: {figures['served'][str(size)]:>10,.0f} rows/s "
                f"({served.scorer['scorer']}), scikit-learn {figures['scikit-learn'][str(size)]:>10,.0f}"
            )
    return InProcess(served.scorer["scorer"], figures["served"], figures["scikit-learn"])


# ---- the record -------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model_name = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    meminfo = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
    os_release = re.search(r'^PRETTY_NAME="?([^"\n]+)', Path("/etc/os-release").read_text(), re.MULTILINE)
    return {
        "nproc": os.cpu_count(),
        "cpu": model_name.group(1) if model_name else platform.processor(),
        "memory_gib": round(int(meminfo.group(1)) / 2**20, 1) if meminfo else None,
        "os": os_release.group(1) if os_release else platform.system(),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def versions() -> dict[str, str]:
    ours = ["bentoml", "scikit-learn", "numpy", "pandas", "grpcio", "fastapi", "uvicorn", "uvloop", "locust"]
    found = {name: importlib.metadata.version(name) for name in ours}
    found["mlserver"] = next(
        pin.split("==")[1] for pin in mlserver_env.MLSERVER_PINS if pin.startswith("mlserver==")
    )
    found["wrk"] = _tool_version(["wrk", "--version"], r"wrk (\S+)")
    found["h2load"] = _tool_version(["h2load", "--version"], r"nghttp2/(\S+)")
    return found


def _tool_version(command: list[str], pattern: str) -> str:
    output = subprocess.run(command, capture_output=True, text=True, check=False)
    found = re.search(pattern, output.stdout + output.stderr)
    return found.group(1) if found else "unknown"


def echo(message: str) -> None:
    print(message, flush=True)


def _stop_on_sigterm() -> None:
    """SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so every server started is stopped."""

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


if __name__ == "__main__":
    typer.run(main)
