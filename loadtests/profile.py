"""`make profile`: where tabserve's workers spend their CPU under load, from py-spy samples.

    .venv/bin/python -m loadtests.profile grpc                               # one row a call, 32 connections
    .venv/bin/python -m loadtests.profile http --rows 1000 --connections 4   # 1,000-row /predict_batch

Starts `bentoml serve` on free loopback ports, checks the endpoint with a real client, drives it with wrk or
h2load as `make bench` does, and meanwhile samples every worker process with py-spy. `--gil` samples only
the thread that holds the GIL: the shares are of the Python CPU time, the cost that limits a worker. Prints
the functions with the largest shares (inclusive, then self); the raw samples stay in loadtests/results/.
"""

from __future__ import annotations

import collections
import shutil
import subprocess
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

import typer

from loadtests import bench, proctree, servers
from loadtests.bench import FULL, Workload
from loadtests.rows import held_out
from models.registry import served_model
from settings import get_settings

RESULTS = Path(__file__).resolve().parent / "results"
WARMUP_SECONDS = 3
# Frames of the process's own main loop and of idle threads: in every sample, they say nothing.
ALWAYS_THERE = (
    "threading.py",
    "runpy",
    "click/core.py",
    "uvicorn/server.py",
    "uvicorn/_compat.py",
    "asyncio/runners.py",
    "_bentoml_impl/worker/service.py",
    "concurrent/futures/thread.py",
)


def main(
    transport: Annotated[Literal["http", "oip-rest", "grpc"], typer.Argument(help="what to drive")],
    rows: Annotated[int, typer.Option(help="rows per request (1 or 1000)")] = 1,
    connections: Annotated[int, typer.Option(help="concurrent clients")] = 32,
    seconds: Annotated[int, typer.Option(help="how long to sample")] = 12,
    rate: Annotated[int, typer.Option(help="py-spy samples per second")] = 100,
    top: Annotated[int, typer.Option(help="functions shown")] = 30,
) -> None:
    """Profile the workers of `bentoml serve service:Tabserve` under one transport's load."""
    if shutil.which("py-spy") is None and not (servers.VENV_BIN / "py-spy").exists():
        raise typer.BadParameter("py-spy is missing: `make setup` installs it (dev dependency)")
    model = served_model(get_settings())[0]
    workload = Workload.of(model, held_out(), FULL.batch_rows)
    frame = workload.one if rows == 1 else workload.batch
    workdir = RESULTS / f"profile-{transport}-{rows}-{datetime.now(UTC):%Y%m%dT%H%M%S}"
    workdir.mkdir(parents=True)
    launch = servers.tabserve(servers.free_port(), servers.free_port(), workdir / "predictions")
    assert launch.grpc_target is not None
    classes = [str(label) for label in model.classes or []]
    endpoint = {
        "http": lambda: bench.http_predict(launch.name, launch.url, frame, classes),
        "oip-rest": lambda: bench.oip_rest(launch.name, launch.url, model, frame, "probabilities"),
        "grpc": lambda: bench.oip_grpc(
            launch.name, launch.grpc_target or "", model, frame, "probabilities", raw=True
        ),
    }[transport]()
    body = workdir / "body.bin"
    body.write_bytes(endpoint.wire_body)
    with servers.running(launch, workdir / "server-output.txt") as server:
        answer_bytes = bench.check(endpoint, workload)
        workers = [pid for pid in proctree.tree(server.pid) if pid != server.pid]
        measured: list[bench.generators.Measurement] = []
        load_seconds = WARMUP_SECONDS + seconds + 2  # outlasts the sampling

        def drive() -> None:
            log = workdir / "h2load-log.tsv"
            measured.append(bench.load(endpoint, body, connections, load_seconds, answer_bytes, log))

        load = threading.Thread(target=drive)
        load.start()
        time.sleep(WARMUP_SECONDS)
        samples = [workdir / f"worker-{pid}.txt" for pid in workers]
        sampling = ["--gil", "--nonblocking", "--rate", str(rate), "--duration", str(round(seconds))]
        spies = [
            subprocess.Popen(
                [py_spy(), "record", *sampling, "--format", "raw", "--pid", str(pid), "--output", str(path)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for pid, path in zip(workers, samples, strict=True)
        ]
        for spy in spies:
            spy.wait()
        load.join()
    result = measured[0]
    typer.echo(
        f"{endpoint.transport}, {rows} rows x {connections} connections, while sampled (py-spy slows the "
        f"workers): {result.rps:.0f} req/s, p99 {result.p99_ms:.1f} ms, {result.errors} errors"
    )
    typer.echo(render(read_samples(samples), top))
    typer.echo(f"raw samples: {workdir.relative_to(servers.PROJECT_ROOT)}")


def py_spy() -> str:
    return shutil.which("py-spy") or str(servers.VENV_BIN / "py-spy")


def read_samples(paths: list[Path]) -> tuple[collections.Counter[str], collections.Counter[str], int]:
    """Inclusive and self sample counts per function, over py-spy's raw (collapsed-stack) files."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for path in paths:
        for line in path.read_text().splitlines() if path.exists() else []:
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            frames = [frame for frame in stack.split(";") if frame and not frame.startswith("process ")]
            total += int(count)
            if frames:
                own[frames[-1]] += int(count)
            for frame in set(frames):
                inclusive[frame] += int(count)
    return inclusive, own, total


def render(counts: tuple[collections.Counter[str], collections.Counter[str], int], top: int) -> str:
    inclusive, own, total = counts
    if total == 0:
        return "no samples (is py-spy allowed to attach to processes here?)"
    lines = [f"{total} samples holding the GIL", "", "inclusive:"]
    shown = [item for item in inclusive.most_common() if not any(part in item[0] for part in ALWAYS_THERE)]
    lines += [f"  {count / total:6.1%}  {frame}" for frame, count in shown[:top]]
    lines += ["", "self:"]
    lines += [f"  {count / total:6.1%}  {frame}" for frame, count in own.most_common(top // 2)]
    return "\n".join(lines)


if __name__ == "__main__":
    typer.run(main)
