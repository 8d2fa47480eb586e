"""`make soak`: a long run of every transport together at a share of the measured peak, then the checks.

    .venv/bin/python -m loadtests.soak                              # 10 minutes at 70% of the peak
    .venv/bin/python -m loadtests.soak --minutes 1 --share 0.5

1. Starts `bentoml serve` on free loopback ports, with a prediction log and a BentoML home of its own
   (loadtests/servers.py) and a log large enough to keep every row of the run.
2. Checks each endpoint with a real client (typed HTTP /predict, OIP REST, OIP gRPC; one row a request, as
   `make bench` sends), then measures each one's peak alone: closed-loop, 32 connections (wrk for HTTP,
   h2load for gRPC), after a warm-up.
3. Drives all three together, each paced at `share / 3` of its own peak (h2load `--rps`, HTTP/1.1 for the
   HTTP transports), so that together they ask for `share` of the server's capacity; meanwhile samples, every
   few seconds, the server's resident memory (whole process tree), how long its threads waited for a core,
   and the load average: on a shared machine, what tells the server's own stalls from the machine's.
4. Checks, and fails (exit 1) unless all hold:
   - no errors: the generators saw only 2xx (and, for gRPC, whole answers), the server refused nothing
     (REFUSAL_COUNTERS: bad input; 503 "overloaded", shed at admission or after waiting longer than the
     batching deadline) and answered every request the generators saw succeed (its per-transport
     counts of answers: h2load cannot see gRPC's grpc-status trailer);
   - resident memory grew by at most 5% from the end of the warm-up (a fifth of the run, at most 2 min) to
     the end: the medians of the first and of the last few samples;
   - the prediction log holds as many rows as the server answered (tabserve_predictions_total), none
     dropped.
Writes loadtests/results/soak.json (the figures) and prints a summary.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import httpx
import typer
from prometheus_client.parser import text_string_to_metric_families

from drift.logs import find_log_files, log_records
from loadtests import bench, generators, proctree, servers
from loadtests.bench import echo
from loadtests.endpoints import Endpoint

RESULTS = Path(__file__).resolve().parent / "results"
PEAK = bench.Plan(connections=[32], warmup_seconds=3, measure_seconds=10, in_process_seconds=0)
# Connections per transport under paced load: few enough to stay keep-alive, enough to absorb a slow answer.
PACED_CONNECTIONS = 8
SAMPLE_SECONDS = 5
RSS_SAMPLES_COMPARED = 3  # medians of this many samples at the end of the warm-up and at the end
WARMUP_SHARE, MAX_WARMUP_SECONDS = 0.2, 120
MAX_RSS_GROWTH = 0.05
# A log as large as a long run needs: every row is counted at the end.
LOG_MAX_BYTES = 2**30
# What the server refused: bad input, and overload shed (serving/admission.py, the batching deadline).
REFUSAL_COUNTERS = ("tabserve_validation_errors_total", "tabserve_shed_total")
# The server's name of each transport's answered requests (tabserve_request_seconds_count labels).
SERVER_COUNTS = {
    "HTTP /predict": {"transport": "http", "endpoint": "/predict"},
    "OIP REST": {"transport": "oip_rest", "endpoint": "infer"},
    "OIP gRPC": {"transport": "grpc", "endpoint": "infer"},
}


@dataclass
class Paced:
    transport: str
    peak_rps: float  # alone, closed loop, 32 connections
    target_rps: float  # what it was paced at
    sent: int = 0  # requests the generator finished
    generator_errors: int = 0
    answered: int = 0  # the server's count of answers during the run
    achieved_rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0


@dataclass(frozen=True)
class Sample:
    at: float
    rss_mib: float
    load_average: float
    runqueue_wait: float


@dataclass
class Result:
    date: str
    minutes: float
    share: float
    load_average_start: list[float]
    load_average_end: list[float] = field(default_factory=list)
    transports: list[Paced] = field(default_factory=list)
    refused: int = 0  # REFUSAL_COUNTERS during the run
    # Every few seconds: seconds into the run, the tree's resident MiB, the machine's 1-minute load average,
    # and the cores' worth of time the server's threads waited for a core since the previous sample.
    samples: list[Sample] = field(default_factory=list)
    warmup_seconds: float = 0.0
    rss_after_warmup_mib: float = 0.0
    rss_end_mib: float = 0.0
    rss_growth: float = 0.0
    answered_rows: int = 0  # tabserve_predictions_total at the end, the whole server's life
    log_rows: int = 0
    log_dropped: int = 0
    failures: list[str] = field(default_factory=list)


def main(
    minutes: Annotated[float, typer.Option(help="length of the paced run")] = 10,
    share: Annotated[float, typer.Option(help="share of the measured peak asked for")] = 0.7,
) -> None:
    """Soak every transport at `share` of its peak for `minutes`; exit 1 if a check fails."""
    missing = generators.available()
    if missing:
        raise typer.BadParameter(
            f"missing load generators: {', '.join(missing)} (apt-get install wrk nghttp2-client)"
        )
    stamp = datetime.now(UTC)
    workdir = RESULTS / f"soak-{stamp:%Y%m%dT%H%M%S}"
    subject = bench.default_subject(PEAK)
    log_dir = workdir / "predictions"
    launch = servers.tabserve(
        servers.free_port(),
        servers.free_port(),
        log_dir,
        TABSERVE_PREDICTION_LOG_MAX_BYTES=str(LOG_MAX_BYTES),
    )
    assert launch.grpc_target is not None
    model, frame = subject.model, subject.workload.one
    chosen = [
        bench.http_predict(launch.name, launch.url, frame, [str(label) for label in model.classes or []]),
        bench.oip_rest(launch.name, launch.url, model, frame, "probabilities"),
        bench.oip_grpc(launch.name, launch.grpc_target, model, frame, "probabilities", raw=True),
    ]
    result = Result(stamp.isoformat(timespec="seconds"), minutes, share, _load_average())
    with servers.running(launch, workdir / "tabserve-output.txt") as server:
        answer_bytes = [bench.check(endpoint, subject.workload) for endpoint in chosen]
        for endpoint, size in zip(chosen, answer_bytes, strict=True):
            peak = bench.measure(server, endpoint, size, PEAK.connections[0], PEAK, workdir)
            if peak.failure is not None:
                raise SystemExit(f"soak: {endpoint.transport}: no peak measured: {peak.failure}")
            result.transports.append(Paced(endpoint.transport, peak.rps, share * peak.rps / len(chosen)))
        before = _scrape(launch.url)
        echo(
            f"soak: {minutes:g} min, every transport together at {share:.0%} of the peak (load average "
            f"{result.load_average_start[0]:.2f})"
        )
        with _Sampler(server.pid, SAMPLE_SECONDS) as sampler:
            _drive(chosen, answer_bytes, result.transports, round(minutes * 60), workdir)
        time.sleep(1)  # the last answers' counts
        after = _scrape(launch.url)
        for endpoint in chosen:  # still answering right
            bench.check(endpoint, subject.workload)
        final = _scrape(launch.url)
    # Stopped: each worker has written its queued rows and closed its log.
    result.load_average_end = _load_average()
    result.samples = sampler.samples
    for paced in result.transports:
        labels = SERVER_COUNTS[paced.transport]
        paced.answered = round(
            _total(after, "tabserve_request_seconds_count", labels)
            - _total(before, "tabserve_request_seconds_count", labels)
        )
    result.refused = round(sum(_total(after, name) - _total(before, name) for name in REFUSAL_COUNTERS))
    result.answered_rows = round(_total(final, "tabserve_predictions_total"))
    result.log_dropped = round(_total(final, "tabserve_prediction_log_dropped_total"))
    result.log_rows = sum(1 for _ in log_records(find_log_files(log_dir)))
    judge(result, minutes * 60)
    (RESULTS / "soak.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    echo(summary(result))
    echo(
        f"figures: {(RESULTS / 'soak.json').relative_to(servers.PROJECT_ROOT)}; server output: "
        f"{workdir.relative_to(servers.PROJECT_ROOT)}"
    )
    if result.failures:
        raise typer.Exit(1)


def _drive(
    chosen: list[Endpoint], answer_bytes: list[int], paced: list[Paced], seconds: int, workdir: Path
) -> None:
    """Every transport at once, each paced at its target rate, until `seconds` have passed."""

    def run(endpoint: Endpoint, size: int, target: Paced) -> None:
        slug = re.sub(r"\W+", "-", endpoint.transport)
        body = workdir / "bodies" / f"soak-{slug}.bin"
        body.parent.mkdir(parents=True, exist_ok=True)
        body.write_bytes(endpoint.wire_body)
        per_connection = max(1, round(target.target_rps / PACED_CONNECTIONS))
        target.target_rps = (
            per_connection * PACED_CONNECTIONS
        )  # h2load paces each connection in whole requests
        log = workdir / f"h2load-{slug}.tsv"
        if endpoint.protocol == "grpc":
            measured = generators.h2load(
                endpoint.address, body, PACED_CONNECTIONS, seconds, log, size, per_connection
            )
        else:
            measured = generators.h2load_http(
                endpoint.address, body, "application/json", PACED_CONNECTIONS, per_connection, seconds, log
            )
        target.sent, target.generator_errors = measured.requests, measured.errors
        target.achieved_rps = round(measured.rps, 1)
        target.p50_ms, target.p99_ms = round(measured.p50_ms, 2), round(measured.p99_ms, 2)

    with ThreadPoolExecutor(len(chosen)) as pool:
        for done in [pool.submit(run, *job) for job in zip(chosen, answer_bytes, paced, strict=True)]:
            done.result()


def judge(result: Result, seconds: float) -> None:
    """The run's verdicts, as failures named in `result`."""
    for paced in result.transports:
        if paced.generator_errors:
            result.failures.append(
                f"{paced.transport}: {paced.generator_errors} errors seen by the generator"
            )
        # The generator stops at the deadline with up to one request per connection unfinished, which the
        # server may still answer; every request the generator saw succeed must have been answered (a gRPC
        # call that failed has HTTP status 200, but the server does not count it).
        succeeded = paced.sent - paced.generator_errors
        if not succeeded <= paced.answered <= paced.sent + PACED_CONNECTIONS:
            result.failures.append(
                f"{paced.transport}: {succeeded} succeeded for the generator, {paced.answered} answered"
            )
    if result.refused:
        result.failures.append(f"{result.refused} requests refused by the server")
    result.warmup_seconds = min(MAX_WARMUP_SECONDS, WARMUP_SHARE * seconds)
    after_warmup = [sample.rss_mib for sample in result.samples if sample.at >= result.warmup_seconds]
    if len(after_warmup) < 2 * RSS_SAMPLES_COMPARED:
        result.failures.append(f"too few memory samples after the warm-up ({len(after_warmup)})")
    else:
        result.rss_after_warmup_mib = statistics.median(after_warmup[:RSS_SAMPLES_COMPARED])
        result.rss_end_mib = statistics.median(after_warmup[-RSS_SAMPLES_COMPARED:])
        result.rss_growth = round(result.rss_end_mib / result.rss_after_warmup_mib - 1, 4)
        if result.rss_growth > MAX_RSS_GROWTH:
            result.failures.append(f"resident memory grew {result.rss_growth:.1%} after the warm-up")
    if result.log_rows != result.answered_rows or result.log_dropped:
        result.failures.append(
            f"prediction log: {result.log_rows} rows for {result.answered_rows} answered "
            f"({result.log_dropped} dropped)"
        )


def summary(result: Result) -> str:
    lines = [
        f"soak {result.date}: {result.minutes:g} min at {result.share:.0%} of the peak; load average "
        f"{result.load_average_start[0]:.2f} at the start, {result.load_average_end[0]:.2f} at the end",
    ]
    for paced in result.transports:
        lines.append(
            f"  {paced.transport:<14} peak {paced.peak_rps:7.1f} req/s  paced at {paced.target_rps:6.1f}  "
            f"achieved {paced.achieved_rps:6.1f}  p50 {paced.p50_ms:6.1f} ms  p99 {paced.p99_ms:6.1f} ms  "
            f"sent {paced.sent}  answered {paced.answered}  errors {paced.generator_errors}"
        )
    loads = [sample.load_average for sample in result.samples]
    waits = [sample.runqueue_wait for sample in result.samples]
    lines += [
        f"  refused by the server: {result.refused}",
        f"  machine: load average {min(loads, default=0):.2f}-{max(loads, default=0):.2f} (median "
        f"{statistics.median(loads or [0]):.2f}); the server's threads waited for a core "
        f"{statistics.median(waits or [0]):.2f} cores' worth (median), {max(waits, default=0):.2f} at most",
        f"  resident memory (process tree): {result.rss_after_warmup_mib:.1f} MiB after the warm-up "
        f"({result.warmup_seconds:.0f} s), {result.rss_end_mib:.1f} MiB at the end: {result.rss_growth:+.2%}",
        f"  prediction log: {result.log_rows} rows; answered {result.answered_rows}; "
        f"dropped {result.log_dropped}",
        "  PASSED" if not result.failures else "  FAILED: " + "; ".join(result.failures),
    ]
    return "\n".join(lines)


class _Sampler(proctree.Sampler):
    """The server tree's resident memory and run-queue wait, and the load average, every `interval` s."""

    def __init__(self, root: int, interval: float) -> None:
        super().__init__(root, interval)
        self.samples: list[Sample] = []
        self._started = time.monotonic()
        self._last: tuple[float, float] | None = None  # when the previous sample was taken, the wait then

    def sample(self) -> None:
        now, waited = time.monotonic(), proctree.runqueue_wait_seconds(self.root)
        if self._last is not None:  # the wait is a rate: from the second sample on
            then, waited_then = self._last
            self.samples.append(
                Sample(
                    at=round(now - self._started, 1),
                    rss_mib=round(proctree.rss_bytes(self.root) / 2**20, 1),
                    load_average=round(os.getloadavg()[0], 2),
                    runqueue_wait=round((waited - waited_then) / (now - then), 3),
                )
            )
        self._last = now, waited


def _scrape(url: str) -> list[tuple[str, dict[str, str], float]]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def _total(
    samples: list[tuple[str, dict[str, str], float]], name: str, labels: dict[str, str] | None = None
) -> float:
    """The sum of the samples named `name` whose labels include `labels` (over the workers, classes...)."""
    wanted = (labels or {}).items()
    return sum(value for sample, have, value in samples if sample == name and wanted <= have.items())


def _load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


if __name__ == "__main__":
    typer.run(main)
