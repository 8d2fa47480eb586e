"""Raw HTTP/1.1 framing cases against a real server over plain sockets: bytes as a broken or hostile client
sends them, which no HTTP client library would write (chunked bodies with bad sizes or no end, heads over
the limit, bodies shorter or longer than their Content-Length, bad versions and methods, trickled bytes).

    run_cases(url, max_body_bytes, long=False)

Each case passes when the server answers with a status the case allows (a 4xx, or 200 for a valid request
framed in an unusual way) or closes the connection where the case allows that, never a 5xx, never hangs;
and a valid request right after is answered 200. `long=True` (`make fuzz`) waits for the server's own
timeouts and holds more connections; the bounded cases (tests/test_fuzz_framing.py, in CI) take seconds.
Shared by tests/test_fuzz_framing.py and `make fuzz` (loadtests/fuzz.py).
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson

from models.data import load_default
from serving.rest import MAX_BODY_SECONDS, MAX_HEAD_BYTES

# How long a case waits for an answer it expects now: far above a loopback answer, far below a hang.
ANSWER_SECONDS = 10.0
OIP_INFER = "/v2/models/breast_cancer/infer"
POST_ROUTES = ("/predict", "/predict_batch", "/predict_file", "/feedback")
CLIENT_ERRORS = frozenset(range(400, 500))


@dataclass
class Answer:
    """What came back on one connection: the responses read whole, in order, and how it ended."""

    statuses: list[int] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    closed: bool = False  # the server closed the connection (or reset it)
    waited_out: bool = False  # nothing more came within the wait


@dataclass(frozen=True)
class Expect:
    statuses: frozenset[int]  # what each response may be
    may_close: bool = True  # whether closing without (another) answer is a fine end
    answers: int = 1  # how many responses the case must read, unless it may close


@dataclass
class CaseResult:
    name: str
    statuses: list[int]
    closed: bool
    seconds: float
    valid_after: int | None  # the status of a valid request right after, on a new connection
    problem: str | None

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "statuses": self.statuses,
            "closed": self.closed,
            "seconds": round(self.seconds, 2),
            "valid_after": self.valid_after,
            "problem": self.problem,
        }


class Target:
    """The server under test and the valid requests the cases frame."""

    def __init__(self, url: str, max_body_bytes: int) -> None:
        parts = urlsplit(url)
        assert parts.hostname is not None
        assert parts.port is not None
        self.address = (parts.hostname, parts.port)
        self.max_body_bytes = max_body_bytes
        row = load_default().features.iloc[0]
        self.record = orjson.dumps({str(name): float(value) for name, value in row.items()})

    def connect(self) -> socket.socket:
        sock = socket.create_connection(self.address, timeout=ANSWER_SECONDS)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def head(self, path: str = "/predict", method: str = "POST", extra: bytes = b"", **headers: str) -> bytes:
        """A request line and headers, ending with the blank line; `headers` named with _ for -."""
        lines = [f"{method} {path} HTTP/1.1", "Host: fuzz"]
        lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
        return ("\r\n".join(lines) + "\r\n").encode() + extra + b"\r\n"

    def valid(self) -> bytes:
        return self.head(Content_Type="application/json", Content_Length=str(len(self.record))) + self.record

    def chunked_head(self, path: str = "/predict") -> bytes:
        return self.head(path, Content_Type="application/json", Transfer_Encoding="chunked")


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def read_answers(sock: socket.socket, count: int, wait: float = ANSWER_SECONDS) -> Answer:
    """Up to `count` whole responses (Content-Length or chunked bodies), until the server closes or `wait`
    seconds pass with the answers incomplete."""
    answer = Answer()
    buffer = b""
    deadline = time.monotonic() + wait
    while len(answer.statuses) < count:
        parsed = _parse_response(buffer)
        if parsed is not None:
            status, headers, buffer = parsed
            answer.statuses.append(status)
            answer.headers.append(headers)
            continue
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            answer.waited_out = True
            break
        sock.settimeout(remaining)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            answer.waited_out = True
            break
        except ConnectionError:
            data = b""
        if not data:
            answer.closed = True
            break
        buffer += data
    return answer


def _parse_response(buffer: bytes) -> tuple[int, dict[str, str], bytes] | None:
    """The first whole response in `buffer`: its status, headers and what follows it; None if incomplete."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    status_line, *lines = buffer[:end].decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    rest = buffer[end + 4 :]
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size_end = rest.find(b"\r\n")
            if size_end < 0:
                return None
            size = int(rest[:size_end].split(b";")[0], 16)
            if len(rest) < size_end + 2 + size + 2:
                return None
            rest = rest[size_end + 2 + size + 2 :]
            if size == 0:
                break
    else:
        length = int(headers.get("content-length", "0"))
        if len(rest) < length:
            return None
        rest = rest[length:]
    return int(status_line.split()[1]), headers, rest


def exchange(target: Target, data: bytes, count: int = 1, wait: float = ANSWER_SECONDS) -> Answer:
    with target.connect() as sock:
        sock.sendall(data)
        return read_answers(sock, count, wait)


def stream_until_answered(target: Target, head: bytes, piece: bytes, most_bytes: int) -> Answer:
    """`head`, then `piece` again and again with no end, until the server answers, closes or stops reading,
    or `most_bytes` are sent: a body (or head) that never ends must be refused once over its limit."""
    with target.connect() as sock:
        sock.sendall(head)
        sock.settimeout(1.0)  # a piece that cannot go out within a second: the server stopped reading
        sent = 0
        try:
            while sent < most_bytes and not _readable(sock):
                sock.sendall(piece)
                sent += len(piece)
        except (TimeoutError, ConnectionError):
            pass  # its answer, if any, is read below
        return read_answers(sock, 1)


def trickle(target: Target, head: bytes, body: bytes, piece: int, interval: float, seconds: float) -> Answer:
    """`head` at once, then `body`, `piece` bytes every `interval` seconds for at most `seconds` (stopping
    at the server's answer), with a valid request on a connection of its own every 10 pieces: each of those
    must be answered 200 meanwhile, or the answer carries a -1 status."""
    with target.connect() as sock:
        sock.sendall(head)
        started = time.monotonic()
        served_meanwhile = []
        for index, offset in enumerate(range(0, len(body), piece)):
            if time.monotonic() - started > seconds or _readable(sock):
                break
            try:
                sock.sendall(body[offset : offset + piece])
            except ConnectionError:
                break
            if index % 10 == 0:
                served_meanwhile.append(valid_status(target))
            time.sleep(interval)
        answer = read_answers(sock, 1)
        if any(status != 200 for status in served_meanwhile):
            answer.statuses.append(-1)
        return answer


def _readable(sock: socket.socket) -> bool:
    """Whether the server has written (or closed) already."""
    return bool(select.select([sock], [], [], 0)[0])


# ---- the cases --------------------------------------------------------------------------------------------

Case = tuple[str, Callable[[Target], Answer], Expect]
OK = Expect(frozenset({200}), may_close=False)
REFUSED = Expect(CLIENT_ERRORS)


def chunked_cases() -> list[Case]:
    def valid_in_chunks(t: Target) -> Answer:
        third = len(t.record) // 3
        pieces = [t.record[:third], t.record[third : 2 * third], t.record[2 * third :]]
        return exchange(t, t.chunked_head() + b"".join(map(chunk, pieces)) + b"0\r\n\r\n")

    def over_limit(path: str) -> Callable[[Target], Answer]:
        def send(t: Target) -> Answer:
            body = b"".join(chunk(b" " * 65536) for _ in range(t.max_body_bytes // 65536 + 2)) + b"0\r\n\r\n"
            return exchange(t, t.chunked_head(path) + body)

        return send

    def never_ending(t: Target) -> Answer:
        return stream_until_answered(t, t.chunked_head(), chunk(b" " * 8192), 4 * t.max_body_bytes)

    too_large = Expect(frozenset({413}))
    return [
        ("chunked body, valid, in 3 chunks", valid_in_chunks, OK),
        (
            "chunked body, chunk size not hex",
            lambda t: exchange(t, t.chunked_head() + b"zz\r\n{}\r\n0\r\n\r\n"),
            REFUSED,
        ),
        (
            "chunked body, chunk size 2**80",
            lambda t: exchange(t, t.chunked_head() + b"1" + b"0" * 20 + b"\r\n{}"),
            REFUSED,
        ),
        (
            "chunked body, negative chunk size",
            lambda t: exchange(t, t.chunked_head() + b"-5\r\n{}\r\n0\r\n\r\n"),
            REFUSED,
        ),
        (
            "chunked body, chunk longer than its size",
            lambda t: exchange(t, t.chunked_head() + b"2\r\n{}}}}\r\n0\r\n\r\n"),
            REFUSED,
        ),
        ("chunked body over the body limit, /predict", over_limit("/predict"), too_large),
        ("chunked body over the body limit, OIP REST infer", over_limit(OIP_INFER), too_large),
        ("chunked body over the body limit, /feedback", over_limit("/feedback"), too_large),
        ("chunked body that never ends", never_ending, too_large),
        (
            "Transfer-Encoding chunked and Content-Length together",
            lambda t: exchange(
                t,
                t.head(Content_Type="application/json", Content_Length="5", Transfer_Encoding="chunked")
                + chunk(t.record)
                + b"0\r\n\r\n",
            ),
            Expect(CLIENT_ERRORS | {200}),  # either refused, or read as chunked (RFC 9112 6.3) and closed
        ),
    ]


def length_cases() -> list[Case]:
    def declared(length: str) -> Callable[[Target], Answer]:
        return lambda t: exchange(t, t.head(Content_Type="application/json", Content_Length=length) + b"{}")

    def shorter(t: Target) -> Answer:
        with t.connect() as sock:
            head = t.head(Content_Type="application/json", Content_Length=str(len(t.record) + 100))
            sock.sendall(head + t.record)
            sock.shutdown(socket.SHUT_WR)  # and no more: the server sees the end of the stream
            return read_answers(sock, 1)

    def longer(t: Target) -> Answer:
        # What follows the declared body is read as the next request: garbage, refused.
        return exchange(t, t.valid() + b"garbage that is no request\r\n\r\n", count=2)

    return [
        (
            "Content-Length over the body limit, no body sent",
            lambda t: exchange(
                t, t.head(Content_Type="application/json", Content_Length=str(t.max_body_bytes + 1))
            ),
            Expect(frozenset({413})),
        ),
        ("Content-Length not a number", declared("twelve"), REFUSED),
        ("Content-Length negative", declared("-2"), REFUSED),
        ("Content-Length 2**70", declared(str(2**70)), REFUSED),
        (
            "Content-Length twice, different",
            lambda t: exchange(
                t,
                t.head(Content_Type="application/json", Content_Length="2", extra=b"Content-Length: 3\r\n")
                + b"{}",
            ),
            REFUSED,
        ),
        ("body shorter than Content-Length, then end of stream", shorter, Expect(CLIENT_ERRORS)),
        ("body longer than Content-Length", longer, Expect(CLIENT_ERRORS | {200}, answers=2)),
    ]


def head_cases(long: bool) -> list[Case]:
    def never_ending_head(t: Target) -> Answer:
        return stream_until_answered(
            t, t.head()[:-2], b"X-Filler: " + b"a" * 1000 + b"\r\n", 8 * MAX_HEAD_BYTES
        )

    too_large = Expect(frozenset({431}))
    many = 4000 if long else 1000
    return [
        (
            "one header over 64 KiB",
            lambda t: exchange(t, t.head(X_Big="a" * (MAX_HEAD_BYTES + 1))),
            too_large,
        ),
        (
            "URL over 64 KiB",
            lambda t: exchange(t, t.head("/predict?" + "a" * (MAX_HEAD_BYTES + 1))),
            too_large,
        ),
        (
            "many small headers over 64 KiB together",
            lambda t: exchange(
                t, t.head(extra=b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 60) for i in range(many)))
            ),
            too_large,
        ),
        (
            "many small headers within 64 KiB, valid request",
            lambda t: exchange(
                t,
                t.head(
                    Content_Type="application/json",
                    Content_Length=str(len(t.record)),
                    extra=b"".join(b"X-H%d: v\r\n" % i for i in range(500)),
                )
                + t.record,
            ),
            OK,
        ),
        ("head that never ends", never_ending_head, too_large),
        ("header without a colon", lambda t: exchange(t, t.head(extra=b"no colon here\r\n")), REFUSED),
        ("header with a NUL byte", lambda t: exchange(t, t.head(extra=b"X-Nul: a\x00b\r\n")), REFUSED),
        ("header folded (obs-fold)", lambda t: exchange(t, t.head(extra=b"X-A: a\r\n folded\r\n")), REFUSED),
    ]


def line_cases() -> list[Case]:
    def raw(line: bytes) -> Callable[[Target], Answer]:
        return lambda t: exchange(t, line + b"\r\nHost: fuzz\r\nContent-Length: 0\r\n\r\n")

    def post_route_get(path: str, method: str) -> Case:
        return (
            f"{method} on POST route {path}",
            lambda t: exchange(t, t.head(path, method=method)),
            Expect(frozenset({405}), may_close=False),
        )

    cases: list[Case] = [
        ("HTTP/9.9", raw(b"POST /predict HTTP/9.9"), REFUSED),
        ("HTTP/1.7", raw(b"POST /predict HTTP/1.7"), REFUSED),
        ("HTTX/1.1", raw(b"POST /predict HTTX/1.1"), REFUSED),
        # httptools reads a request line without a version as HTTP/0.9 and uvicorn answers it, then closes:
        # harmless; a POST so framed has no Content-Type, and is refused as any such POST is.
        ("HTTP/0.9 request line (no version)", lambda t: exchange(t, b"POST /predict\r\n\r\n"), REFUSED),
        ("invalid method token", raw(b"G(T /predict HTTP/1.1"), REFUSED),
        ("unknown method", raw(b"BREW /predict HTTP/1.1"), Expect(frozenset({400, 405}))),
        ("request target not a path", raw(b"POST predict HTTP/1.1"), REFUSED),
        ("binary garbage", lambda t: exchange(t, bytes(range(256)) * 4), REFUSED),
    ]
    cases += [post_route_get(path, "GET") for path in POST_ROUTES]
    cases += [post_route_get("/predict", method) for method in ("PUT", "DELETE", "PATCH")]
    return cases


def connection_cases(long: bool) -> list[Case]:
    def pipelined(t: Target) -> Answer:
        return exchange(t, t.valid() * 3, count=3)

    def slow_body(t: Target) -> Answer:
        head = t.head(Content_Type="application/json", Content_Length=str(len(t.record)))
        if long:  # a byte a second: the body cannot arrive within the server's deadline
            return trickle(t, head, t.record, 1, 1.0, MAX_BODY_SECONDS + 15)
        return trickle(t, head, t.record, 20, 0.05, 10)  # whole in a few seconds: answered

    def slowloris(t: Target) -> Answer:
        """Many connections each holding an unfinished head, a header line now and then; others are still
        served meanwhile. The held connections are then closed by the client."""
        count, rounds = (200, 10) if long else (40, 3)
        held = [t.connect() for _ in range(count)]
        answer = Answer()
        try:
            for sock in held:
                sock.sendall(b"POST /predict HTTP/1.1\r\nHost: fuzz\r\n")
            for index in range(rounds):
                for sock in held:
                    sock.sendall(b"X-Slow-%d: 1\r\n" % index)
                answer.statuses.append(valid_status(t))
                time.sleep(0.5)
        finally:
            for sock in held:
                sock.close()
        return answer

    # The long run trickles longer than the server waits for a body: 408 (serving/rest.py).
    slow = Expect(frozenset({408})) if long else OK
    return [
        (
            "three requests pipelined in one write",
            pipelined,
            Expect(frozenset({200}), may_close=False, answers=3),
        ),
        ("slow body, a byte at a time", slow_body, slow),
        (
            "slowloris: unfinished heads held open",
            slowloris,
            Expect(frozenset({200}), may_close=False, answers=3),
        ),
    ]


def valid_status(target: Target) -> int:
    """The status of a valid /predict on a new connection; 0 when none came."""
    answer = exchange(target, target.valid())
    return answer.statuses[0] if answer.statuses else 0


def all_cases(long: bool) -> list[Case]:
    return chunked_cases() + length_cases() + head_cases(long) + line_cases() + connection_cases(long)


def run_cases(url: str, max_body_bytes: int, long: bool = False) -> list[CaseResult]:
    target = Target(url, max_body_bytes)
    results = []
    for name, send, expect in all_cases(long):
        started = time.monotonic()
        try:
            answer = send(target)
        except OSError as error:  # the case could not even be sent: a refusal at connect time is a problem
            answer = Answer(closed=True)
            problem: str | None = f"{type(error).__name__}: {error}"
        else:
            problem = judge(answer, expect)
        seconds = time.monotonic() - started
        valid_after = valid_status(target)
        if problem is None and valid_after != 200:
            problem = f"a valid request right after got {valid_after or 'no answer'}"
        results.append(CaseResult(name, answer.statuses, answer.closed, seconds, valid_after, problem))
    return results


def judge(answer: Answer, expect: Expect) -> str | None:
    """Why the answer breaks the case's expectation, or None."""
    if -1 in answer.statuses:
        return "another client was not served while this one trickled"
    if any(status >= 500 for status in answer.statuses):
        return f"server error {answer.statuses}"
    wrong = [status for status in answer.statuses if status not in expect.statuses]
    if wrong:
        return f"got {wrong}, expected one of {sorted(expect.statuses)}"
    if len(answer.statuses) < expect.answers and not (answer.closed and expect.may_close):
        how = "closed" if answer.closed else "waited out" if answer.waited_out else "ended"
        return f"{len(answer.statuses)} of {expect.answers} answers, then {how}"
    for status, headers in zip(answer.statuses, answer.headers, strict=False):
        if status == 405 and "POST" not in headers.get("allow", ""):
            return f"405 without Allow: POST ({headers.get('allow')!r})"
    return None
