"""Schemathesis against the live OpenAPI spec (`/docs.json`) of a real `bentoml serve`: every operation, with
its examples, boundary and mutated cases (wrong types, missing and unknown fields, malformed bodies, wrong
media types and methods) and random ones, each answer checked by every check that applies
(loadtests/openapi_fuzz.py, shared with `make fuzz`, which runs 50 times as many cases).

Bounded to fit CI on a 2-core machine (about 30 s here, at most 3 minutes).
"""

from __future__ import annotations

from pathlib import Path

import httpx

from loadtests import openapi_fuzz
from tests.conftest import Server

CASES_PER_OPERATION = 400


def test_schemathesis_finds_no_server_error_and_every_answer_matches_the_spec(
    server: Server, tmp_path: Path
) -> None:
    run = openapi_fuzz.run(server.url, tmp_path, CASES_PER_OPERATION, seed=12, timeout=170)
    print(f"Schemathesis: {run.cases} cases {run.cases_by_operation}, failures {run.failures_by_check}")
    assert run.operations_tested == run.operations_total >= 8
    assert run.cases > 10 * run.operations_total
    assert run.failures == [], run.output[-6000:]
    assert run.returncode == 0, run.output[-6000:]
    assert "positive_data_acceptance" in run.checks_by_operation["POST /predict"]
    assert httpx.get(f"{server.url}/readyz", timeout=30).status_code == 200  # still serving
