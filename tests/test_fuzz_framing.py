"""The raw HTTP/1.1 framing cases (loadtests/framing.py, shared with `make fuzz`, which also waits out the
server's body deadline and holds more connections) against the session's real `bentoml serve`: chunked
bodies valid, malformed, over the limit and never-ending; heads over 64 KiB; bodies shorter or longer than
their Content-Length; bad versions and methods; GET on POST routes; pipelining; a trickled body and held
unfinished heads while others are served. A few seconds.
"""

from __future__ import annotations

import pytest

from loadtests.framing import run_cases
from tests.conftest import MAX_BODY_BYTES, Server


@pytest.mark.timeout(120)
def test_every_framing_case_gets_a_client_error_or_a_close_and_the_server_keeps_serving(
    server: Server,
) -> None:
    results = run_cases(server.url, MAX_BODY_BYTES)
    failed = [result.summary() for result in results if result.problem is not None]
    print(f"Framing: {len(results)} cases, {len(failed)} failed")
    assert len(results) >= 40
    assert not failed, failed
