"""The raw HTTP/1.1 framing cases (loadtests/framing.py, shared with `make fuzz`, which also waits out the
server's body deadline and holds more connections) against the session's real `bentoml serve`: chunked
bodies valid, malformed, over the limit and never-ending; heads over 64 KiB; bodies shorter or longer than
their Content-Length; bad versions and methods; GET on POST routes; pipelining; a trickled body; the
deadlines for slow clients (held unfinished heads get 408 and are closed while others are served, a silent
connection is closed, keep-alive still works; a stalled /predict_file upload gets 408, a steady one 200),
waited out at the short deadlines the test server is given (tests/conftest.py). About 30 s.
"""

from __future__ import annotations

import pytest

from loadtests.framing import Deadlines, run_cases
from tests.conftest import HEAD_TIMEOUT_SECONDS, MAX_BODY_BYTES, UPLOAD_IDLE_SECONDS, Server


@pytest.mark.timeout(120)
def test_every_framing_case_gets_a_client_error_or_a_close_and_the_server_keeps_serving(
    server: Server,
) -> None:
    results = run_cases(server.url, MAX_BODY_BYTES, Deadlines(HEAD_TIMEOUT_SECONDS, UPLOAD_IDLE_SECONDS))
    failed = [result.summary() for result in results if result.problem is not None]
    seconds = sum(result.seconds for result in results)
    print(f"Framing: {len(results)} cases in {seconds:.0f} s, {len(failed)} failed")
    assert len(results) >= 40
    assert not failed, "\n".join(map(str, failed))
