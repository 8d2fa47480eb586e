"""The servers under test: how each is launched on free loopback ports, timed to ready and stopped.

    with running(tabserve(free_port(), free_port(), log_dir), output) as server: ...

A server is stopped with SIGTERM and, if it has not exited after a grace period, every process of its
tree is killed; on errors and Ctrl-C too, since `running` is a context manager.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx

from loadtests import proctree
from settings import get_settings

PROJECT_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
LOOPBACK = "127.0.0.1"
# Prediction logs of benchmark servers rotate early: a long run must not fill the disk.
LOG_MAX_BYTES = 16 * 2**20
LOG_BACKUPS = 2


@dataclass(frozen=True)
class Launch:
    name: str
    command: list[str]
    env: dict[str, str]
    cwd: Path
    url: str  # HTTP base URL
    ready_path: str  # answers 200 once the server takes requests
    grpc_target: str | None = None


@dataclass(frozen=True)
class Running:
    launch: Launch
    process: subprocess.Popen[bytes]
    ready_seconds: float  # from process start to the first successful readiness check
    output: Path  # the server's stdout and stderr

    @property
    def pid(self) -> int:
        return self.process.pid


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def server_env(**overrides: str) -> dict[str, str]:
    # One OpenMP thread per process: with more, worker processes fight over 2 cores (see ../shared/NOTES.md).
    return {**os.environ, "OMP_NUM_THREADS": "1", "BENTOML_DO_NOT_TRACK": "true", **overrides}


def tabserve(http_port: int, grpc_port: int, log_dir: Path, **env: str) -> Launch:
    """`bentoml serve` with the prediction log in `log_dir` and a BentoML home of its own beside it, sharing
    the configured model store, unless `env` names a BENTOML_HOME (a store that only this server uses)."""
    home = env.pop("BENTOML_HOME", None) or str(_home_sharing_the_models(log_dir.parent / "bentoml-home"))
    return Launch(
        name="tabserve",
        command=[
            str(VENV_BIN / "bentoml"),
            "serve",
            "service:Tabserve",
            "--host",
            LOOPBACK,
            "--port",
            str(http_port),
        ],
        env=server_env(
            TABSERVE_GRPC_HOST=LOOPBACK,
            TABSERVE_GRPC_PORT=str(grpc_port),
            TABSERVE_PREDICTION_LOG_DIR=str(log_dir),
            BENTOML_HOME=home,
            # `env` may keep more of the log (the soak counts every row).
            **{
                "TABSERVE_PREDICTION_LOG_MAX_BYTES": str(LOG_MAX_BYTES),
                "TABSERVE_PREDICTION_LOG_BACKUPS": str(LOG_BACKUPS),
                **env,
            },
        ),
        cwd=PROJECT_ROOT,
        url=f"http://{LOOPBACK}:{http_port}",
        ready_path="/readyz",
        grpc_target=f"{LOOPBACK}:{grpc_port}",
    )


def _home_sharing_the_models(home: Path) -> Path:
    """A BentoML home whose model store is the configured one. `bentoml serve` empties the Prometheus folder
    of its home when it starts, which would wipe the metrics of any other server on the same home (a running
    `make serve`, the tests' server)."""
    models = home / "models"
    if not models.exists():
        home.mkdir(parents=True, exist_ok=True)
        models.symlink_to(get_settings().bentoml_home.resolve() / "models", target_is_directory=True)
    return home


def fastapi_baseline(port: int, **env: str) -> Launch:
    return Launch(
        name="fastapi",
        command=[
            str(VENV_BIN / "uvicorn"),
            "loadtests.baselines.fastapi_app:app",
            "--host",
            LOOPBACK,
            "--port",
            str(port),
            "--workers",
            "2",
        ],
        env=server_env(**env),
        cwd=PROJECT_ROOT,
        url=f"http://{LOOPBACK}:{port}",
        ready_path="/ready",
    )


def mlserver(executable: Path, folder: Path, model: str, http_port: int, grpc_port: int) -> Launch:
    """MLServer serving the model folder that `mlserver_env.export_model` wrote with these ports."""
    return Launch(
        name="mlserver",
        command=[str(executable), "start", str(folder)],
        env=server_env(),
        cwd=folder,  # MLServer keeps its metrics files in the working directory
        url=f"http://{LOOPBACK}:{http_port}",
        ready_path=f"/v2/models/{model}/ready",
        grpc_target=f"{LOOPBACK}:{grpc_port}",
    )


@contextmanager
def running(launch: Launch, output: Path, timeout: float = 180) -> Iterator[Running]:
    output.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with output.open("wb") as sink:
        # A file, not a pipe: a pipe nobody reads fills up and blocks the server's logging. A session of
        # its own: Ctrl-C in the terminal reaches the harness, which then stops the server in order.
        process = subprocess.Popen(
            launch.command,
            cwd=launch.cwd,
            env=launch.env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_ready(launch, process, output, started + timeout)
        yield Running(launch, process, time.monotonic() - started, output)
    finally:
        stop(process)


def stop(process: subprocess.Popen[bytes], grace: float = 30) -> None:
    """SIGTERM to the root (servers stop their own workers), then SIGKILL to whatever of the tree is left."""
    members = [(pid, proctree.start_time(pid)) for pid in proctree.tree(process.pid)]
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)
    for pid, start_time in members:
        # The start time tells a leftover worker from an unrelated process that reused its id.
        if start_time is not None and proctree.is_running(pid, start_time):
            with suppress(ProcessLookupError):  # it may exit in between
                os.kill(pid, signal.SIGKILL)
    if process.poll() is None:
        process.wait()


def _wait_ready(launch: Launch, process: subprocess.Popen[bytes], output: Path, deadline: float) -> None:
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = output.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"{launch.name} exited with {process.returncode} before ready:\n{tail}")
        if _http_ready(launch.url + launch.ready_path) and _accepts(launch.grpc_target):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{launch.name} was not ready in time; its output is in {output}")


def _http_ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _accepts(target: str | None) -> bool:
    if target is None:
        return True
    host, port = target.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False
