"""A `bentoml serve` that cannot serve exits at once, non-zero, with one line that says why.

Before: a truncated pipeline.joblib made the workers crash-loop (72 tracebacks in 120 s) without the server
ever answering or exiting; a taken gRPC port, 36 worker restarts in 91 s; a second server joined the first
one's gRPC port silently (SO_REUSEPORT) and took part of its calls; a missing model file, a traceback.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from models.store import PIPELINE_FILE, SCHEMA_FILE, StoredModel
from tests.conftest import Server, Stores, free_port, start_server

# A bound, not a speed target: before the fix these servers never exited at all.
EXIT_WITHIN_SECONDS = 90


def serve_and_wait(env: dict[str, str], output: Path) -> tuple[int, str]:
    process = start_server(env, free_port(), output)
    try:
        process.wait(timeout=EXIT_WITHIN_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"bentoml serve did not exit:\n{output.read_text(errors='replace')[-3000:]}")
    return process.returncode, output.read_text(errors="replace")


def assert_one_line_error(returncode: int, output: str, *phrases: str) -> None:
    assert returncode != 0
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output[-3000:]
    for phrase in phrases:
        assert phrase in errors[0]


def test_a_grpc_port_taken_by_another_program(stores: Stores, server: Server, tmp_path: Path) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        env = stores.env(TABSERVE_GRPC_HOST="127.0.0.1", TABSERVE_GRPC_PORT=str(port))
        returncode, output = serve_and_wait(env, tmp_path / "out.txt")
    assert_one_line_error(returncode, output, f"gRPC port 127.0.0.1:{port}", "TABSERVE_GRPC_PORT")


def test_a_second_server_does_not_join_a_running_servers_grpc_port(
    stores: Stores, server: Server, tmp_path: Path
) -> None:
    host, port = server.grpc_target.rsplit(":", 1)
    env = stores.env(TABSERVE_GRPC_HOST=host, TABSERVE_GRPC_PORT=port)
    returncode, output = serve_and_wait(env, tmp_path / "out.txt")
    assert_one_line_error(returncode, output, f"gRPC port {host}:{port}")
    assert server.process.poll() is None  # the first server goes on


def damaged_store(stores: Stores, tmp_path: Path, damage: Callable[[Path], None]) -> dict[str, str]:
    """A copy of the session's BentoML store whose served model has been damaged."""
    home = tmp_path / "bentoml"
    shutil.copytree(stores.bentoml_home, home, symlinks=True)
    served = StoredModel.open("breast_cancer:latest")
    damage(home / served.path.relative_to(stores.bentoml_home))
    return stores.env(BENTOML_HOME=str(home), TABSERVE_GRPC_PORT="0")


def test_a_truncated_pipeline_file(stores: Stores, server: Server, tmp_path: Path) -> None:
    def truncate(model_dir: Path) -> None:
        pipeline = model_dir / PIPELINE_FILE
        pipeline.write_bytes(pipeline.read_bytes()[: pipeline.stat().st_size // 2])

    returncode, output = serve_and_wait(damaged_store(stores, tmp_path, truncate), tmp_path / "out.txt")
    assert_one_line_error(returncode, output, "damaged", PIPELINE_FILE)


def test_a_missing_model_file(stores: Stores, server: Server, tmp_path: Path) -> None:
    def remove(model_dir: Path) -> None:
        (model_dir / SCHEMA_FILE).unlink()

    returncode, output = serve_and_wait(damaged_store(stores, tmp_path, remove), tmp_path / "out.txt")
    assert_one_line_error(returncode, output, "incomplete", SCHEMA_FILE)
