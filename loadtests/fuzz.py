"""`make fuzz`: the long fuzzing run against a real `bentoml serve` of its own (about 10 minutes here).

    .venv/bin/python -m loadtests.fuzz      # writes loadtests/results/fuzz.json; exits 1 on any failure

Trains the default model into stores of its own (under loadtests/results/fuzz-<time>/), serves it on free
loopback ports, and runs, one after the other:
1. Schemathesis over every operation of the OpenAPI spec with every check that applies
   (loadtests/openapi_fuzz.py): at least 20,000 cases; no failure of any check.
2. The gRPC fuzzer over every method of the OIP service (loadtests/grpc_fuzz.py): at least 5,000 messages;
   no UNKNOWN or INTERNAL.
3. The raw HTTP framing cases (loadtests/framing.py), long: the slow clients wait out the server's deadlines.
4. Schemathesis again, shorter (about 2,000 cases), against a second server with auth on, given an API key:
   its ignored_auth check also runs (each operation that needs a key refuses calls without one or with a
   wrong one). `--auth-only` runs this part alone.
Memory: the resident memory of the server's whole process tree after a warm-up, after each part, at its
peak, and after the run; it may grow by at most MAX_RSS_GROWTH_BYTES. The CI tests run the same three, bounded
(tests/test_fuzz_http.py, test_fuzz_grpc.py, test_fuzz_framing.py).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from loadtests import framing, grpc_fuzz, openapi_fuzz, proctree, servers, tree_model
from loadtests.bench import RESULTS, machine

MIN_HTTP_CASES = 20_000
# The auth-on run: Schemathesis --max-examples, and the fewest cases it must run (about 2,000 are made).
AUTH_CASES_PER_OPERATION = 200
MIN_AUTH_CASES = 1_500
MIN_GRPC_MESSAGES = 5_000
# The service's limits during the run. The body limit holds the largest batch the schema allows (1,000
# records of 30 numbers, under 1 MB): a schema-valid body must never meet 413, or positive_data_acceptance
# would rightly fail. Small enough that the framing cases over the limit send a few MiB, not the default 64.
MAX_BODY_BYTES = 4 * 2**20
MAX_BATCH_RECORDS = 1_000
# Valid requests before the first memory sample: the first calls load lazily imported code and fill
# caches, which is growth, but no leak.
WARM_UP_REQUESTS = 300
# Growth of the tree's resident memory from after the warm-up to after the run that fails it. Some growth is
# expected (allocator arenas kept after the largest bodies, the prediction log's buffers); a leak of 5 KB
# per request would pass 128 MiB over the ~30,000 requests of a run.
MAX_RSS_GROWTH_BYTES = 128 * 2**20
# The server settles (log writers flush, request tasks end) before the last sample.
SETTLE_SECONDS = 5


def main(
    http_cases_per_operation: Annotated[
        int, typer.Option(help="Schemathesis --max-examples; the 4 POST operations get about this many each")
    ] = 5_000,
    grpc_messages_per_method: Annotated[
        int, typer.Option(help="messages to each of the 6 OIP methods")
    ] = 2_000,
    seed: Annotated[int, typer.Option(help="seed of Schemathesis and of the gRPC fuzzer")] = 12,
    auth_only: Annotated[bool, typer.Option(help="only the auth-on Schemathesis run (part 4)")] = False,
) -> None:
    stamp = datetime.now(UTC)
    workdir = RESULTS / f"fuzz-{stamp:%Y%m%dT%H%M%S}"
    stores = workdir / "stores"
    echo(f"Training the default model into {stores.relative_to(servers.PROJECT_ROOT)}")
    train(stores, workdir / "training.txt")
    if auth_only:
        auth = fuzz_with_auth(stores, workdir, seed)
        problems = judge_auth(auth)
        echo("PASSED" if not problems else "FAILED:\n  " + "\n  ".join(problems))
        if problems:
            raise typer.Exit(1)
        return
    launch = fuzzed_server(stores, workdir, "")
    assert launch.grpc_target is not None
    started = time.monotonic()
    with servers.running(launch, workdir / "server.txt") as server:
        echo(f"Serving at {launch.url} and {launch.grpc_target} (ready in {server.ready_seconds:.1f} s)")
        warm_up(launch.url)
        rss_before = proctree.rss_bytes(server.pid)
        with proctree.PeakRss(server.pid) as peak:
            echo(f"Schemathesis: {http_cases_per_operation} examples per operation, every check")
            http = openapi_fuzz.run(
                launch.url, workdir / "schemathesis", http_cases_per_operation, seed, timeout=3600
            )
            echo(
                f"  {http.cases} cases in {http.seconds:.0f} s; failures: {http.failures_by_check or 'none'}"
            )
            echo(f"gRPC: {grpc_messages_per_method} messages per method")
            rss_by_phase = {"schemathesis": proctree.rss_bytes(server.pid)}
            grpc = grpc_fuzz.fuzz(launch.grpc_target, grpc_messages_per_method, seed)
            rss_by_phase["grpc"] = proctree.rss_bytes(server.pid)
            echo(f"  {grpc.messages} messages in {grpc.seconds:.0f} s: {dict(grpc.codes)}")
            echo("HTTP framing cases, long")
            framing_started = time.monotonic()
            cases = framing.run_cases(launch.url, MAX_BODY_BYTES, long=True)
            framing_seconds = time.monotonic() - framing_started
            rss_by_phase["framing"] = proctree.rss_bytes(server.pid)
            time.sleep(SETTLE_SECONDS)
        rss_after = proctree.rss_bytes(server.pid)
        tracebacks = server.output.read_text(errors="replace").count("Traceback")
    auth = fuzz_with_auth(stores, workdir, seed)
    memory = {
        "before_bytes": rss_before,
        "peak_bytes": peak.peak,
        **{f"after_{phase}_bytes": value for phase, value in rss_by_phase.items()},
        "after_bytes": rss_after,
        "growth_bytes": rss_after - rss_before,
        "max_growth_bytes": MAX_RSS_GROWTH_BYTES,
    }
    problems = judge(http, grpc, cases, memory) + judge_auth(auth)
    document = {
        "date": stamp.isoformat(timespec="seconds"),
        "command": " ".join(["python -m loadtests.fuzz", *sys.argv[1:]]),
        "machine": machine(),
        "seconds": round(time.monotonic() - started, 1),
        "server": {"max_body_bytes": MAX_BODY_BYTES, "max_batch_records": MAX_BATCH_RECORDS},
        "http": http.summary(),
        "http_auth": auth.summary(),
        "grpc": {**grpc.summary(), "per_method": grpc_messages_per_method},
        "framing": {
            "cases": len(cases),
            "failed": sum(case.problem is not None for case in cases),
            "seconds": round(framing_seconds, 1),
            "results": [case.summary() for case in cases],
        },
        "rss": memory,
        "server_tracebacks": tracebacks,
        "problems": problems,
        "workdir": str(workdir.relative_to(servers.PROJECT_ROOT)),
    }
    (RESULTS / "fuzz.json").write_text(json.dumps(document, indent=2))
    report(document)
    if problems:
        raise typer.Exit(1)


def train(stores: Path, output: Path) -> None:
    """`python train.py` (the default model) with `stores` as its stores; its output goes to `output`."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w") as sink:
        done = subprocess.run(
            [sys.executable, "train.py"],
            cwd=servers.PROJECT_ROOT,
            env=servers.server_env(**tree_model.stores_env(stores)),
            stdout=sink,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if done.returncode:
        raise RuntimeError(f"training failed ({done.returncode}); see {output}")


def fuzzed_server(stores: Path, workdir: Path, suffix: str, **settings: str) -> servers.Launch:
    """A server on free loopback ports with the run's limits, its log and feedback in folders named with
    `suffix`, and `settings` besides."""
    return servers.tabserve(
        servers.free_port(),
        servers.free_port(),
        workdir / f"predictions{suffix}",
        **tree_model.stores_env(stores),
        TABSERVE_FEEDBACK_LOG_DIR=str(workdir / f"feedback{suffix}"),
        TABSERVE_MAX_BODY_BYTES=str(MAX_BODY_BYTES),
        TABSERVE_MAX_BATCH_RECORDS=str(MAX_BATCH_RECORDS),
        **settings,
    )


def fuzz_with_auth(stores: Path, workdir: Path, seed: int) -> openapi_fuzz.SchemathesisRun:
    """Part 4: a server of its own with auth on (a key file with one new key, made by the key tool as an
    operator makes one), and Schemathesis given that key."""
    keys = workdir / "keys.txt"
    made = subprocess.run(
        [sys.executable, "-m", "serving.auth", "new-key", "fuzz"],
        cwd=servers.PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    keys.write_text(made.stdout)
    shown = re.search(r"\(shown once\): (\S+)", made.stderr)
    assert shown is not None, made.stderr
    launch = fuzzed_server(
        stores,
        workdir,
        "-auth",
        TABSERVE_AUTH_KEYS_FILE=str(keys),
        # ignored_auth sends wrong keys on purpose, from the one loopback address: never block it, or the
        # calls with the right key would meet 429.
        TABSERVE_AUTH_MAX_FAILURES=str(2**31),
    )
    with servers.running(launch, workdir / "server-auth.txt"):
        echo(f"Schemathesis with auth on: {AUTH_CASES_PER_OPERATION} examples per operation, every check")
        run = openapi_fuzz.run(
            launch.url,
            workdir / "schemathesis-auth",
            AUTH_CASES_PER_OPERATION,
            seed,
            timeout=1800,
            api_key=shown[1],
        )
    echo(f"  {run.cases} cases in {run.seconds:.0f} s; failures: {run.failures_by_check or 'none'}")
    echo(f"  checks: {sorted(set().union(*map(set, run.checks_by_operation.values())))}")
    return run


def judge_auth(auth: openapi_fuzz.SchemathesisRun) -> list[str]:
    problems = []
    if auth.cases < MIN_AUTH_CASES:
        problems.append(f"Schemathesis with auth on ran {auth.cases} cases, fewer than {MIN_AUTH_CASES}")
    if auth.failures or auth.returncode:
        problems.append(f"Schemathesis with auth on failed ({auth.returncode}): {auth.failures_by_check}")
    if not any("ignored_auth" in checks for checks in auth.checks_by_operation.values()):
        problems.append("Schemathesis with auth on never ran ignored_auth")
    return problems


def warm_up(url: str) -> None:
    target = framing.Target(url, MAX_BODY_BYTES)
    statuses = [framing.valid_status(target) for _ in range(WARM_UP_REQUESTS)]
    if set(statuses) != {200}:
        raise RuntimeError(f"valid requests failed during the warm-up: {sorted(set(statuses))}")


def judge(
    http: openapi_fuzz.SchemathesisRun,
    grpc: grpc_fuzz.GrpcFuzzRun,
    cases: list[framing.CaseResult],
    memory: dict[str, int],
) -> list[str]:
    problems = []
    if http.cases < MIN_HTTP_CASES:
        problems.append(f"Schemathesis ran {http.cases} cases, fewer than {MIN_HTTP_CASES}")
    if http.operations_tested != http.operations_total:
        problems.append(f"Schemathesis tested {http.operations_tested} of {http.operations_total} operations")
    if http.failures or http.returncode:
        problems.append(f"Schemathesis failed ({http.returncode}): {http.failures_by_check}")
    if grpc.messages < MIN_GRPC_MESSAGES:
        problems.append(f"the gRPC fuzzer sent {grpc.messages} messages, fewer than {MIN_GRPC_MESSAGES}")
    if grpc.faults:
        problems.append(f"{len(grpc.faults)} gRPC server faults, first: {grpc.faults[:3]}")
    if grpc.outputs_after != ["label", "probabilities"]:
        problems.append(f"a valid ModelInfer after the gRPC fuzzing answered {grpc.outputs_after}")
    problems += [f"framing: {case.name}: {case.problem}" for case in cases if case.problem is not None]
    if memory["growth_bytes"] > memory["max_growth_bytes"]:
        problems.append(f"resident memory grew by {memory['growth_bytes'] / 2**20:.0f} MiB")
    return problems


def report(document: dict[str, Any]) -> None:
    http, grpc, frames, rss = document["http"], document["grpc"], document["framing"], document["rss"]
    mib = 2**20
    echo("")
    echo(f"make fuzz, {document['date']}, {document['seconds']:.0f} s")
    echo(
        f"HTTP (Schemathesis): {http['cases']} cases over {http['operations']['tested']} operations"
        f" in {http['seconds']:.0f} s"
    )
    for operation, count in http["cases_by_operation"].items():
        echo(f"  {operation:<22} {count:>6}")
    echo(f"  failures by check: {http['failures_by_check'] or 'none'}")
    echo(f"gRPC: {grpc['messages']} messages in {grpc['seconds']:.0f} s: {grpc['codes']}")
    echo(f"framing: {frames['cases']} cases, {frames['failed']} failed, {frames['seconds']:.0f} s")
    for case in frames["results"]:
        verdict = "ok" if case["problem"] is None else f"FAILED: {case['problem']}"
        echo(f"  {case['name']:<56} {case['statuses']} {'closed ' if case['closed'] else ''}{verdict}")
    echo(
        f"RSS of the server tree: {rss['before_bytes'] / mib:.0f} MiB after warm-up,"
        f" peak {rss['peak_bytes'] / mib:.0f},"
        f" {rss['after_bytes'] / mib:.0f} after (growth {rss['growth_bytes'] / mib:+.0f} MiB,"
        f" at most {rss['max_growth_bytes'] / mib:.0f})"
    )
    echo(f"server log tracebacks: {document['server_tracebacks']}")
    echo("PASSED" if not document["problems"] else "FAILED:\n  " + "\n  ".join(document["problems"]))
    echo(f"written: {RESULTS / 'fuzz.json'}")


def echo(message: str) -> None:
    print(message, flush=True)


if __name__ == "__main__":
    typer.run(main)
