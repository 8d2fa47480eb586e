"""Raw HTTP/1.1 framing cases against a real server over plain sockets: bytes as a broken or hostile client
sends them, which no HTTP client library would write (chunked bodies with bad sizes or no end, heads over
the limit, bodies shorter or longer than their Content-Length, bad versions and methods, trickled bytes).

    run_cases(url, max_body_bytes, deadlines=Deadlines(), long=False)

Each case passes when the server answers with a status the case allows (a 4xx, or 200 for a valid request
framed in an unusual way) or closes the connection where the case allows that, never a 5xx, never hangs;
and a valid request right after is answered 200. The cases of slow clients wait out the server's deadlines
(`Deadlines`: short on the test server). `long=True` (`make fuzz`) also waits out the body's 30 s deadline
and holds more connections; the bounded cases (tests/test_fuzz_framing.py, in CI) take seconds.
Shared by tests/test_fuzz_framing.py and `make fuzz` (loadtests/fuzz.py).
"""

from __future__ import annotations

import contextlib
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
from settings import Settings

# How long a case waits for an answer it expects now: far above a loopback answer, far below a hang.
ANSWER_SECONDS = 10.0
# How late after its deadline the server may act on it (a timer on a busy event loop, a shared machine).
DEADLINE_MARGIN = 3.0
# Clients holding their bodies back, for longer than it takes a worker's time per request, measured over
# half-second windows, to exceed the default queue bound (1 s) if they counted as work.
SLOW_BODY_CLIENTS, SLOW_BODY_SECONDS = 6, 8.0
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
    problem: str | None = None  # what the case saw go wrong besides the answers (e.g. others not served)


@dataclass(frozen=True)
class Deadlines:
    """The server's deadlines for slow clients (settings.py), which some cases wait out."""

    head_seconds: float = Settings.model_fields["head_timeout_seconds"].default
    upload_idle_seconds: float = Settings.model_fields["upload_idle_seconds"].default


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

    def __init__(self, url: str, max_body_bytes: int, deadlines: Deadlines | None = None) -> None:
        parts = urlsplit(url)
        assert parts.hostname is not None
        assert parts.port is not None
        self.address = (parts.hostname, parts.port)
        self.max_body_bytes = max_body_bytes
        self.deadlines = deadlines or Deadlines()
        features = load_default().features
        row = features.iloc[0]
        self.record = orjson.dumps({str(name): float(value) for name, value in row.items()})
        self.csv = features.head(200).to_csv(index=False).encode()

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
    must be answered 200 meanwhile."""
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
        answer.problem = not_served(served_meanwhile)
        return answer


def not_served(statuses: list[int]) -> str | None:
    """What went wrong with the valid requests sent while a case held the server, if anything."""
    failed = [status for status in statuses if status != 200]
    return f"other clients were not served meanwhile: {failed}" if failed else None


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

    def slow_bodies(t: Target) -> Answer:
        """Clients that send the start of a body, then nothing for several seconds: each holds a place in
        its worker, not the worker's time (serving/admission.py), so valid requests on other connections
        are answered 200 meanwhile; then the bodies end and each is answered. (Counted as work, they once
        made the workers measure themselves slow and refuse everyone with 503.)"""
        head = t.head(Content_Type="application/json", Content_Length=str(len(t.record)))
        socks = [t.connect() for _ in range(SLOW_BODY_CLIENTS)]
        served_meanwhile, answer = [], Answer()
        try:
            for sock in socks:
                sock.sendall(head + t.record[:10])
            until = time.monotonic() + SLOW_BODY_SECONDS
            while time.monotonic() < until:
                served_meanwhile.append(valid_status(t))
                time.sleep(0.5)
            for sock in socks:
                sock.sendall(t.record[10:])
            for sock in socks:
                answer.statuses += read_answers(sock, 1).statuses
        finally:
            for sock in socks:
                sock.close()
        answer.problem = not_served(served_meanwhile)
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
            "bodies held back on several connections while others are served",
            slow_bodies,
            Expect(frozenset({200}), may_close=False, answers=SLOW_BODY_CLIENTS),
        ),
    ]


def deadline_cases(long: bool) -> list[Case]:
    """Clients too slow with their heads: each is closed by the head deadline (serving/rest.py), with 408
    when it sent part of a head; clients in time, and keep-alive between requests, are not disturbed."""

    def slowloris(t: Target) -> Answer:
        """Many connections each holding an unfinished head, a header line every half second: each must
        be answered 408 and closed within the head deadline (plus a margin), while valid requests on other
        connections are answered 200 meanwhile. The answer's statuses: those of the held connections."""
        held = [t.connect() for _ in range(200 if long else 40)]
        closed_by = time.monotonic() + t.deadlines.head_seconds + DEADLINE_MARGIN
        answer, served_meanwhile, left_open = Answer(), [], 0
        try:
            for sock in held:
                sock.sendall(b"POST /predict HTTP/1.1\r\nHost: fuzz\r\n")
            line = 0
            while held and time.monotonic() < closed_by:
                for sock in list(held):
                    if _readable(sock):  # answered: read the answer, and the connection must close
                        ended = read_answers(sock, 2, wait=1.0)
                        answer.statuses += ended.statuses or [0]
                        left_open += not ended.closed
                        held.remove(sock)
                        sock.close()
                        continue
                    with contextlib.suppress(ConnectionError):  # closed as written to: read next round
                        sock.sendall(b"X-Slow-%d: 1\r\n" % line)
                served_meanwhile.append(valid_status(t))
                line += 1
                time.sleep(0.5)
        finally:
            for sock in held:
                sock.close()
        answer.closed = not held and not left_open
        late = f"{len(held)} held connections unanswered and {left_open} answered but left open"
        answer.problem = not_served(served_meanwhile) or (None if answer.closed else late)
        return answer

    def silent(t: Target) -> Answer:
        """A connection that sends nothing: closed, with no answer, within the head deadline."""
        with t.connect() as sock:
            return read_answers(sock, 1, wait=t.deadlines.head_seconds + DEADLINE_MARGIN)

    def keep_alive(t: Target) -> Answer:
        """Two requests on one connection, the second a second after the first answer (within uvicorn's
        5 s keep-alive and the head deadline): both answered."""
        with t.connect() as sock:
            sock.sendall(t.valid())
            first = read_answers(sock, 1)
            time.sleep(1.0)
            sock.sendall(t.valid())
            second = read_answers(sock, 1)
            return Answer(first.statuses + second.statuses, closed=second.closed)

    def head_in_pieces(t: Target) -> Answer:
        """A head sent in three pieces over most of the deadline: answered, the deadline is the whole
        head's, not a piece's."""
        with t.connect() as sock:
            data = t.valid()
            third = len(data) // 3
            pause = t.deadlines.head_seconds / 4
            for piece in (data[:third], data[third : 2 * third], data[2 * third :]):
                sock.sendall(piece)
                time.sleep(pause)
            return read_answers(sock, 1)

    def late_second_head(t: Target) -> Answer:
        """A request answered, then part of the next head and nothing more: the deadline starts again at
        the response; the unfinished head gets 408 and the connection closes."""
        with t.connect() as sock:
            sock.sendall(t.valid())
            answer = read_answers(sock, 1)
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: fuzz\r\n")
            late = read_answers(sock, 2, wait=t.deadlines.head_seconds + DEADLINE_MARGIN)
            return Answer(answer.statuses + late.statuses, closed=late.closed, problem=still_open(late))

    return [
        ("slowloris: unfinished heads held open get 408 and are closed", slowloris, TIMED_OUT),
        ("a connection that sends nothing is closed", silent, Expect(frozenset())),
        (
            "keep-alive: a second request on the connection",
            keep_alive,
            Expect(frozenset({200}), may_close=False, answers=2),
        ),
        ("a head in pieces within the deadline", head_in_pieces, OK),
        (
            "an unfinished head after a response gets 408",
            late_second_head,
            Expect(frozenset({200, 408}), may_close=False, answers=2),
        ),
    ]


# A request refused for its slowness: 408, then the connection closes (checked by `still_open`).
TIMED_OUT = Expect(frozenset({408}), may_close=False)


def still_open(answer: Answer) -> str | None:
    return None if answer.closed else "the connection was left open after 408"


def upload_cases() -> list[Case]:
    """/predict_file reads its own upload, with a deadline on each piece (serving/files.py)."""

    def csv_head(t: Target, media_type: str = "text/csv") -> bytes:
        return t.head("/predict_file", Content_Type=media_type, Content_Length=str(len(t.csv)))

    def stalled(t: Target) -> Answer:
        """Half the CSV, then nothing: 408 and the connection closed within the idle deadline, and no byte
        of an answer (the whole upload is read before any answer)."""
        with t.connect() as sock:
            sock.sendall(csv_head(t) + t.csv[: len(t.csv) // 2])
            answer = read_answers(sock, 2, wait=t.deadlines.upload_idle_seconds + DEADLINE_MARGIN)
            answer.problem = still_open(answer)
            return answer

    def steady(t: Target) -> Answer:
        """The whole CSV a piece at a time, each in less than the idle deadline, over longer than it in
        all: answered 200, others served meanwhile."""
        pieces = 8
        interval = 1.5 * t.deadlines.upload_idle_seconds / pieces
        return trickle(t, csv_head(t), t.csv, len(t.csv) // pieces + 1, interval, ANSWER_SECONDS * 10)

    return [
        ("/predict_file upload that stalls half way gets 408", stalled, TIMED_OUT),
        ("/predict_file upload that trickles steadily is answered", steady, OK),
    ]


def valid_status(target: Target) -> int:
    """The status of a valid /predict on a new connection; 0 when none came."""
    answer = exchange(target, target.valid())
    return answer.statuses[0] if answer.statuses else 0


def all_cases(long: bool) -> list[Case]:
    return (
        chunked_cases()
        + length_cases()
        + head_cases(long)
        + line_cases()
        + connection_cases(long)
        + deadline_cases(long)
        + upload_cases()
    )


def run_cases(
    url: str, max_body_bytes: int, deadlines: Deadlines | None = None, long: bool = False
) -> list[CaseResult]:
    target = Target(url, max_body_bytes, deadlines)
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
    if answer.problem is not None:
        return answer.problem
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
