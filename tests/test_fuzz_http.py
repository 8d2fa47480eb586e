"""Schemathesis against the live OpenAPI spec (`/docs.json`) of a real `bentoml serve`: every operation, with
its examples, boundary and mutated cases (wrong types, missing and unknown fields, malformed bodies, wrong
media types) and random ones, each answer checked against the spec.

Run as its command line (`st run`), the way it is meant to run: all its phases, and a JSON report whose
counts the test prints. Bounded to fit CI on a 2-core machine (about 30 s here, at most 3 minutes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import PROJECT_ROOT, Server

ST = str(Path(sys.executable).parent / "st")
CASES_PER_OPERATION = 400
# Every check that holds for this service. Not positive_data_acceptance: a schema-valid body can still be
# refused for its content (a binary string that is no CSV table).
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
]
# What negative_data_rejection takes as a refusal: Schemathesis's own list, plus 413. A list of labels as
# long as /feedback's maxItems is over the tests' body limit, and a body too large is refused with 413.
REFUSALS = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]


def test_schemathesis_finds_no_server_error_and_every_answer_matches_the_spec(
    server: Server, tmp_path: Path
) -> None:
    report = tmp_path / "schemathesis.json"
    # Read by `st` from its working directory.
    (tmp_path / "schemathesis.toml").write_text(
        f"[checks.negative_data_rejection]\nexpected-statuses = {json.dumps(REFUSALS)}\n"
    )
    command = [
        ST,
        "run",
        f"{server.url}/docs.json",
        f"--checks={','.join(CHECKS)}",
        f"--max-examples={CASES_PER_OPERATION}",
        "--seed=12",
        "--continue-on-failure",
        "--no-shrink",  # a failure is reported as generated: shrinking it could take minutes
        "--generation-database=none",
        "--report=json",
        f"--report-json-path={report}",
    ]
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    # In a directory of its own: Schemathesis keeps a cache of the failures it found there, and replays them.
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=170, check=False
    )
    assert report.exists(), result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(report.read_text())
    cases, operations = summary["test_cases"], summary["operations"]
    print(
        f"Schemathesis: {cases['generated']} cases, {operations['tested']} operations, {summary['failures']}"
    )
    assert operations["tested"] == operations["total"] >= 8
    assert cases["generated"] > 10 * operations["total"]
    assert summary["failures"] == [], result.stdout[-6000:]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert httpx.get(f"{server.url}/readyz", timeout=30).status_code == 200  # still serving
