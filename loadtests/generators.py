"""The C load generators: wrk for HTTP/1.1, h2load for gRPC (HTTP/2). Each runs closed-loop: every
connection sends its next request when the previous one is answered, so connections = concurrent clients.

Both report their own CPU time, since on a 2-core machine the generator shares the cores with the server.
"""

from __future__ import annotations

import json
import re
import resource
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loadtests import rows

WRK_SCRIPT = Path(__file__).resolve().parent / "wrk_post.lua"
# A request slower than this counts as a (timeout) error.
TIMEOUT_SECONDS = 5
GRPC_HEADERS = ["content-type: application/grpc", "te: trailers"]


class GeneratorError(RuntimeError):
    pass


@dataclass(frozen=True)
class Measurement:
    requests: int  # answered requests, errors included
    seconds: float
    errors: int  # non-2xx answers, socket errors, timeouts; for gRPC also answers without a message
    p50_ms: float
    p95_ms: float
    p99_ms: float
    generator_cpu_seconds: float

    @property
    def rps(self) -> float:
        """Successful requests per second."""
        return (self.requests - self.errors) / self.seconds

    @property
    def generator_cpu_percent(self) -> float:
        """The generator's CPU use, in % of one core."""
        return 100 * self.generator_cpu_seconds / self.seconds


def available() -> list[str]:
    """The generators missing from PATH (Debian packages `wrk` and `nghttp2-client`)."""
    return [tool for tool in ("wrk", "h2load") if shutil.which(tool) is None]


def wrk(url: str, body: Path, content_type: str, connections: int, seconds: float) -> Measurement:
    """POST `body` to `url` over `connections` keep-alive connections for `seconds`."""
    output, cpu = _run(
        [
            "wrk",
            "-t1",  # one thread drives thousands of requests per second; a second would take a core
            f"-c{connections}",
            f"-d{seconds}s",
            f"--timeout={TIMEOUT_SECONDS}s",
            "-s",
            str(WRK_SCRIPT),
            url,
            "--",
            str(body),
            content_type,
        ],
        seconds,
    )
    summary = json.loads(next(line for line in output.splitlines() if line.startswith("{")))
    errors = sum(summary[key] for key in ("connect", "read", "write", "status", "timeout"))
    return Measurement(
        requests=summary["requests"],
        seconds=summary["duration_us"] / 1e6,
        errors=errors,
        p50_ms=summary["p50_us"] / 1000,
        p95_ms=summary["p95_us"] / 1000,
        p99_ms=summary["p99_us"] / 1000,
        generator_cpu_seconds=cpu,
    )


def h2load(
    target: str,
    body: Path,
    connections: int,
    seconds: float,
    log_file: Path,
    answer_bytes: int,
    rps: int | None = None,
) -> Measurement:
    """Send the framed gRPC message in `body` as ModelInfer calls to `target` (host:port) for `seconds`;
    with `rps`, each connection sends at most that many calls a second (paced load).

    h2load sees HTTP status codes, not the grpc-status trailer: a failed call is a 200 with an empty body.
    `answer_bytes` is the size of a successful answer as framed on the wire (seen beforehand with a real
    client; one body always gets the same answer); every 200 short of that much DATA counts as an error.
    """
    url = f"http://{target}{rows.MODEL_INFER_PATH}"
    pace = [f"--rps={rps}"] if rps is not None else []
    return _h2load(url, body, GRPC_HEADERS, pace, connections, seconds, log_file, answer_bytes)


def h2load_http(
    url: str, body: Path, content_type: str, connections: int, rps: int, seconds: float, log_file: Path
) -> Measurement:
    """POST `body` to `url` over HTTP/1.1 keep-alive connections for `seconds`, each connection at most
    `rps` requests a second: paced load, which wrk cannot send (wrk2, which can, is not packaged here).
    Every answer that is not 2xx counts as an error."""
    headers = [f"content-type: {content_type}"]
    return _h2load(url, body, headers, ["--h1", f"--rps={rps}"], connections, seconds, log_file, None)


def _h2load(
    url: str,
    body: Path,
    headers: list[str],
    options: list[str],
    connections: int,
    seconds: float,
    log_file: Path,
    answer_bytes: int | None,
) -> Measurement:
    log_file.unlink(missing_ok=True)  # h2load appends to an existing log
    output, cpu = _run(
        [
            "h2load",
            "-t1",
            f"-c{connections}",
            "-m1",  # one call in flight per connection, as a blocking client does
            f"-D{seconds}",
            *options,
            "-d",
            str(body),
            *[option for header in headers for option in ("-H", header)],
            f"--log-file={log_file}",
            url,
        ],
        seconds,
    )
    finished = _search(r"finished in ([\d.]+)s", output)
    counts = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded", output)
    if counts is None:
        raise GeneratorError(f"unexpected h2load output:\n{output}")
    done, succeeded = int(counts.group(2)), int(counts.group(3))
    errors = done - succeeded
    if answer_bytes is not None:
        answered = round(_search(r"traffic: .* \((\d+)\) data", output) / answer_bytes)
        errors += max(0, succeeded - answered)
    durations = [
        int(fields[2]) / 1000
        for fields in (line.split("\t") for line in log_file.read_text().splitlines())
        if len(fields) == 3 and fields[1].startswith("2")
    ]
    p50, p95, p99 = np.percentile(durations, [50, 95, 99]) if durations else (float("nan"),) * 3
    return Measurement(
        requests=done,
        seconds=finished,
        errors=errors,
        p50_ms=float(p50),
        p95_ms=float(p95),
        p99_ms=float(p99),
        generator_cpu_seconds=cpu,
    )


def _run(command: list[str], seconds: float) -> tuple[str, float]:
    """Run a generator to completion; its output and the CPU seconds it used (it is the only child process
    that exits meanwhile, so the change in the children's resource usage is its own)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60, check=False)
    except subprocess.TimeoutExpired:
        raise GeneratorError(f"{command[0]} did not finish in {seconds + 60} s") from None
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise GeneratorError(f"{command[0]} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return done.stdout, cpu


def _search(pattern: str, text: str) -> float:
    found = re.search(pattern, text)
    if found is None:
        raise GeneratorError(f"unexpected generator output (no {pattern!r}):\n{text}")
    return float(found.group(1))
