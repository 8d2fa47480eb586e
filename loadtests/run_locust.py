"""`make loadtest`: one bounded, headless locust run of loadtests/locustfile.py, on loopback.

    .venv/bin/python -m loadtests.run_locust --run-time 60s     # starts `bentoml serve` on free ports
    .venv/bin/python -m loadtests.run_locust --url http://127.0.0.1:3000 --grpc-target 127.0.0.1:3001

Writes locust's CSV files (`locust_stats.csv`, `locust_failures.csv`, ...) and its HTML report
(`locust.html`) under loadtests/results/, stops by itself after --run-time, and exits non-zero if any
request failed (locust's --exit-code-on-error).
"""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

import typer

from loadtests import rows, servers

RESULTS = Path(__file__).resolve().parent / "results"
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
# Time locust may take beyond --run-time: start-up, the users' last requests (--stop-timeout), reports.
GRACE_SECONDS = 60
STOP_TIMEOUT_SECONDS = 10


def main(
    url: Annotated[
        str | None, typer.Option(help="base URL of a running service (default: start one on free ports)")
    ] = None,
    grpc_target: Annotated[
        str | None, typer.Option(help="host:port of its gRPC server (default: the URL's host, port 3001)")
    ] = None,
    users: Annotated[int, typer.Option(min=1, help="concurrent users, each a closed loop")] = 8,
    run_time: Annotated[str, typer.Option(help="how long to run, e.g. 15s, 2m")] = "60s",
    tags: Annotated[
        list[str] | None, typer.Option("--tag", help="only tasks with this tag (repeatable): http, grpc, ...")
    ] = None,
    model: Annotated[str, typer.Option(help="model name in OIP requests")] = rows.DEFAULT_MODEL,
    results: Annotated[Path, typer.Option(help="where locust's CSV and HTML reports go")] = RESULTS,
) -> None:
    """Run the locust scenario headless for --run-time; exit non-zero on any failed request."""
    seconds = _seconds(run_time)
    results.mkdir(parents=True, exist_ok=True)
    if url is not None:
        _require_loopback(url)
        if grpc_target:
            _require_loopback(f"grpc://{grpc_target}")
        code = run_locust(url, grpc_target, users, run_time, seconds, tags or [], model, results)
        raise typer.Exit(code)
    with tempfile.TemporaryDirectory(prefix="tabserve-loadtest-") as workdir:
        launch = servers.tabserve(servers.free_port(), servers.free_port(), Path(workdir) / "predictions")
        output = results / "server-output.txt"
        typer.echo(f"starting `bentoml serve` on {launch.url} (output: {output})")
        with servers.running(launch, output) as server:
            typer.echo(f"ready in {server.ready_seconds:.1f} s")
            code = run_locust(
                launch.url, launch.grpc_target, users, run_time, seconds, tags or [], model, results
            )
    raise typer.Exit(code)


def run_locust(
    url: str,
    grpc_target: str | None,
    users: int,
    run_time: str,
    seconds: int,
    tags: list[str],
    model: str,
    results: Path,
) -> int:
    command = [
        str(servers.VENV_BIN / "locust"),
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        url,
        "--users",
        str(users),
        "--spawn-rate",
        str(users),
        "--run-time",
        run_time,
        "--stop-timeout",
        str(STOP_TIMEOUT_SECONDS),
        "--only-summary",
        "--csv",
        str(results / "locust"),
        "--html",
        str(results / "locust.html"),
        "--exit-code-on-error",
        "1",
        "--model",
        model,
    ]
    if grpc_target:
        command += ["--grpc-target", grpc_target]
    if tags:
        command += ["--tags", *tags]
    # The locustfile imports the project's packages (loadtests, models, serving).
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(servers.PROJECT_ROOT), os.environ.get("PYTHONPATH")])
        ),
    }
    try:
        done = subprocess.run(
            command, cwd=servers.PROJECT_ROOT, env=env, timeout=seconds + GRACE_SECONDS, check=False
        )
    except subprocess.TimeoutExpired:
        typer.echo(f"locust did not stop within {seconds + GRACE_SECONDS} s", err=True)
        return 1
    typer.echo(f"reports: {results / 'locust.html'}, {results / 'locust_stats.csv'}")
    return done.returncode


def _seconds(run_time: str) -> int:
    """Locust's --run-time format (15, 15s, 2m, 1h30m), parsed here: importing locust would monkey-patch
    this process with gevent."""
    found = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s?)?", run_time.strip())
    if not run_time.strip() or found is None:
        raise typer.BadParameter(f"{run_time!r}: use e.g. 15s, 2m or 1h30m", param_hint="--run-time")
    hours, minutes, seconds = (int(part or 0) for part in found.groups())
    return hours * 3600 + minutes * 60 + seconds


def _require_loopback(url: str) -> None:
    """Load tests stay on this machine: a load test against a shared server is an incident."""
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise typer.BadParameter(
            f"{url}: only loopback addresses (127.0.0.1, ::1, localhost)", param_hint="--url"
        )


if __name__ == "__main__":
    typer.run(main)
