"""Schemathesis against the live OpenAPI spec (`/docs.json`) of a real `bentoml serve`, run as its command
line (`st run`) the way it is meant to run: all its phases (examples, coverage: boundary values, wrong types,
missing and unknown fields, wrong media types and methods; fuzzing), every check that applies, and reports
whose counts are read back here.

    run(url, workdir, cases_per_operation=400, seed=12, timeout=170, api_key=None)

Shared by tests/test_fuzz_http.py (bounded, in CI) and `make fuzz` (loadtests/fuzz.py, long).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ST = str(Path(sys.executable).parent / "st")
PROJECT_ROOT = Path(__file__).resolve().parents[1]
# What negative_data_rejection takes as a refusal: Schemathesis's own list, plus 413. A list of labels as
# long as /feedback's maxItems can be over a small body limit, and a body too large is refused with 413.
REFUSALS = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]
# Every check runs on every operation, but one check where it cannot apply: positive_data_acceptance (a body
# the schema allows must be accepted) where acceptance depends on what no schema of the body can say.
# /predict and /predict_batch do say all: the Record schema carries the limits the data plane enforces.
NOT_APPLICABLE = {
    # A label must name a request this server answered (its request_id and row): that is the server's
    # state, not the body's shape; a label for a request never answered is refused with 400, rightly.
    "/feedback": ["positive_data_acceptance"],
    # The body is a CSV or Parquet file, a binary string to the schema: a random one is no table.
    "/predict_file": ["positive_data_acceptance"],
}


@dataclass(frozen=True)
class SchemathesisRun:
    command: list[str]
    returncode: int
    seconds: float
    operations_total: int
    operations_tested: int
    cases: int  # as the JSON report counts them
    cases_by_operation: dict[str, int]  # from the NDJSON events: coverage, examples and fuzzing together
    checks_by_operation: dict[str, list[str]]  # the checks that ran on each operation's cases
    failures: list[dict[str, Any]]  # the JSON report's: code, title, count, operations
    output: str  # st's own, for a failure's message

    @property
    def failures_by_check(self) -> dict[str, int]:
        return {f"{failure['code']} {failure['title']}": failure["count"] for failure in self.failures}

    def summary(self) -> dict[str, Any]:
        return {
            "command": " ".join(self.command),
            "returncode": self.returncode,
            "seconds": round(self.seconds, 1),
            "operations": {"total": self.operations_total, "tested": self.operations_tested},
            "cases": self.cases,
            "cases_by_operation": self.cases_by_operation,
            "checks_by_operation": self.checks_by_operation,
            "not_applicable": NOT_APPLICABLE,
            "failures_by_check": self.failures_by_check,
            "failures": self.failures,
        }


def config() -> str:
    """schemathesis.toml: the refusals of negative_data_rejection and the checks that do not apply."""
    # Every check enabled here, not by `--checks=all`: a check named on the command line would be enabled on
    # every operation, over the operations' own settings.
    lines = ["[checks]", "enabled = true", "", "[checks.negative_data_rejection]"]
    lines.append(f"expected-statuses = {json.dumps(REFUSALS)}")
    for path, checks in NOT_APPLICABLE.items():
        lines += ["", "[[operations]]", f"include-path = {json.dumps(path)}"]
        lines += [f"checks.{check}.enabled = false" for check in checks]
    return "\n".join(lines) + "\n"


def command(url: str, workdir: Path, cases_per_operation: int, seed: int, api_key: str | None) -> list[str]:
    """With `api_key` (auth on), every call carries it, and Schemathesis's ignored_auth check also runs: each
    operation that needs a key must refuse a call without one, or with a wrong one."""
    key = [f"--header=Authorization: Bearer {api_key}"] if api_key else []
    return [
        ST,
        "run",
        f"{url}/docs.json",
        f"--max-examples={cases_per_operation}",
        f"--seed={seed}",
        "--continue-on-failure",
        "--no-shrink",  # a failure is reported as generated: shrinking it could take minutes
        "--generation-database=none",
        "--report=json,ndjson",
        f"--report-json-path={workdir / 'schemathesis.json'}",
        f"--report-ndjson-path={workdir / 'schemathesis.ndjson'}",
        *key,
    ]


def run(
    url: str, workdir: Path, cases_per_operation: int, seed: int, timeout: float, api_key: str | None = None
) -> SchemathesisRun:
    """`st run` in `workdir`, which must be empty: Schemathesis reads its configuration from its working
    directory and keeps a cache of the failures it found there, which it would replay."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "schemathesis.toml").write_text(config())
    argv = command(url, workdir, cases_per_operation, seed, api_key)
    started = time.monotonic()
    result = subprocess.run(
        argv,
        cwd=workdir,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    seconds = time.monotonic() - started
    report = workdir / "schemathesis.json"
    if not report.exists():
        raise RuntimeError(
            f"st run wrote no report ({result.returncode}):\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
        )
    summary = json.loads(report.read_text())
    cases, checks = read_events(workdir / "schemathesis.ndjson")
    return SchemathesisRun(
        command=argv,
        returncode=result.returncode,
        seconds=seconds,
        operations_total=summary["operations"]["total"],
        operations_tested=summary["operations"]["tested"],
        cases=summary["test_cases"]["generated"],
        cases_by_operation=cases,
        checks_by_operation=checks,
        failures=summary["failures"],
        output=result.stdout + result.stderr,
    )


def read_events(events: Path) -> tuple[dict[str, int], dict[str, list[str]]]:
    """The cases of each operation over all phases, and the checks that ran on them, from the NDJSON events
    (the JSON report has only totals). The file is large (about 7 KB a case): read line by line, removed."""
    cases: Counter[str] = Counter()
    checks: dict[str, set[str]] = {}
    with events.open() as lines:
        for line in lines:
            if line.startswith('{"ScenarioFinished"'):
                recorder = json.loads(line)["ScenarioFinished"]["recorder"]
                label = recorder["label"]
                cases[label] += len(recorder.get("cases", {}))
                ran = checks.setdefault(label, set())
                for results in recorder.get("checks", {}).values():
                    ran.update(result["name"] for result in results)
    events.unlink()
    return dict(cases.most_common()), {label: sorted(names) for label, names in checks.items()}
