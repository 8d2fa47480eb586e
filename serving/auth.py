"""Authentication: who may call what, decided in one place for every transport.

Off unless TABSERVE_AUTH_KEYS_FILE is set; then nothing but the probes answers without an API key. The HTTP
middleware (serving/rest.py `HttpAuth`, which also serves OIP REST) and the gRPC interceptor
(serving/oip/grpc_server.py `GrpcAuth`) only read the key and the client's address off the call, ask
`Gate.check`, and turn its verdict into their own status codes. With auth off neither is installed.

Keys. A client sends its key as `Authorization: Bearer <key>` (HTTP header or gRPC metadata) or
`X-API-Key: <key>`. The server holds only each key's SHA-256, in a key file of lines

    name:sha256-hex[:rights]      # e.g. ci-loadtest:9f86d0...:predict,feedback

(`#` comments and blank lines are skipped; no rights: every right), or in a directory of such files, as
Kubernetes mounts a Secret. `python -m serving.auth new-key NAME --rights predict` makes a key and its line.
The file is read again when it changes (checked at most every TABSERVE_AUTH_RELOAD_SECONDS), so keys are
added and revoked without a restart; a file that no longer parses keeps the keys read before (and says so
in the log), while at start-up it stops the server with the line at fault. A raw key is never logged.

Rights. `predict` (/predict, /predict_batch, /predict_file, /explain, /explain_batch, OIP infer),
`feedback` (POST /feedback), `metrics` (/metrics, when TABSERVE_AUTH_METRICS is on). Everything else
(/model, OIP metadata, gRPC reflection, the OpenAPI page when TABSERVE_AUTH_DOCS is on) takes any valid key.
Open to all: BentoML's probes (/livez, /healthz, /readyz), OIP's server live and ready (REST /v2/health/*,
gRPC ServerLive and ServerReady: KServe probes them) and the gRPC health service.

Refusals: no key or an unknown key -> 401 / UNAUTHENTICATED; a known key without the right -> 403 /
PERMISSION_DENIED; counted in tabserve_auth_refusals_total{transport,reason}. An address that sends
TABSERVE_AUTH_MAX_FAILURES unknown keys within TABSERVE_AUTH_BLOCK_SECONDS is refused everything but the
probes, even with a valid key, for TABSERVE_AUTH_BLOCK_SECONDS: 429 / RESOURCE_EXHAUSTED with Retry-After.
Only unknown keys count (guessing), not a missing key (a misconfigured client) nor a missing right. The
count is per worker process.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import math
import re
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from fastapi.security.utils import get_authorization_scheme_param

logger = logging.getLogger(__name__)

RIGHTS = ("predict", "feedback", "metrics")
VALID_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
VALID_DIGEST = re.compile(r"[0-9a-f]{64}")
KEY_PREFIX = "tsk_"  # makes a leaked key easy to find with a secret scanner
# Addresses whose failures are remembered; past this the oldest are forgotten, so that a flood of
# addresses cannot grow the table without bound.
MAX_TRACKED_ADDRESSES = 10_000

# Probes stay open whatever the settings: orchestrators call them without credentials.
HTTP_PROBES = frozenset({"/livez", "/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})
# The pages for people: the OpenAPI page (/docs; / redirects to /ui/), its spec and assets, and the web page
# (serving/pages.py), whose own calls to the API carry a key like any client's.
HTTP_DOCS = frozenset({"/", "/docs", "/docs.json", "/ui"})
HTTP_DOCS_PREFIXES = ("/static_content/", "/ui/")
HTTP_PREDICT = frozenset({"/predict", "/predict_batch", "/predict_file", "/explain", "/explain_batch"})
OIP_SERVICE = "/inference.GRPCInferenceService/"
GRPC_HEALTH = "/grpc.health.v1.Health/"
GRPC_PROBES = frozenset({f"{OIP_SERVICE}ServerLive", f"{OIP_SERVICE}ServerReady"})


class Access(enum.Enum):
    """What a call needs."""

    OPEN = "open"
    ANY_KEY = "any key"
    PREDICT = "predict"
    FEEDBACK = "feedback"
    METRICS = "metrics"


class Refusal(enum.Enum):
    """Why a call is refused, and how each transport says it."""

    MISSING_KEY = ("missing_key", 401, "UNAUTHENTICATED")
    UNKNOWN_KEY = ("unknown_key", 401, "UNAUTHENTICATED")
    NO_RIGHT = ("no_right", 403, "PERMISSION_DENIED")
    BLOCKED = ("blocked", 429, "RESOURCE_EXHAUSTED")

    def __init__(self, reason: str, status: int, grpc_code: str) -> None:
        self.reason = reason
        self.status = status
        self.grpc_code = grpc_code


@dataclass(frozen=True)
class Verdict:
    caller: str | None  # the key's name; None for an open call or a refused one
    refusal: Refusal | None = None
    message: str = ""
    retry_after: int | None = None  # seconds, for BLOCKED


class KeyFileError(ValueError):
    pass


@dataclass(frozen=True)
class ApiKey:
    name: str
    digest: bytes  # SHA-256 of the raw key
    rights: frozenset[str]


def digest_of(raw_key: str) -> bytes:
    return hashlib.sha256(raw_key.encode("utf-8", "surrogateescape")).digest()


def parse_keys(text: str, source: str) -> list[ApiKey]:
    """The keys of one key file; a bad line is a KeyFileError naming the file and the line (never its
    digest)."""
    keys: list[ApiKey] = []
    names: set[str] = set()
    for number, text_line in enumerate(text.splitlines(), start=1):
        line = text_line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}, line {number}"
        name, _, rest = line.partition(":")
        digest, _, rights_text = rest.partition(":")
        if not VALID_NAME.fullmatch(name):
            raise KeyFileError(
                f"{where}: expected name:sha256[:rights], where a name is 1 to 64 letters, digits, "
                "'_', '.', '@' or '-'"
            )
        if not VALID_DIGEST.fullmatch(digest.lower()):
            raise KeyFileError(f"{where}: the key {name!r} needs the SHA-256 of the key as 64 hex digits")
        rights = frozenset(r.strip() for r in rights_text.split(",") if r.strip()) or frozenset(RIGHTS)
        unknown = sorted(rights - set(RIGHTS))
        if unknown:
            raise KeyFileError(
                f"{where}: unknown right {', '.join(unknown)} for the key {name!r}; "
                f"rights: {', '.join(RIGHTS)}"
            )
        if name in names:
            raise KeyFileError(f"{where}: the key name {name!r} is used twice")
        names.add(name)
        keys.append(ApiKey(name, bytes.fromhex(digest), rights))
    return keys


def _key_files(path: Path) -> list[Path]:
    """The file, or a directory's visible files: a mounted Kubernetes Secret keeps its own bookkeeping
    (`..data`, `..2026_...`) in hidden entries beside a link per key."""
    if not path.is_dir():
        return [path]
    return sorted(p for p in path.iterdir() if not p.name.startswith(".") and p.is_file())


def read_keys(path: Path) -> list[ApiKey]:
    keys: list[ApiKey] = []
    for file in _key_files(path):
        keys += parse_keys(file.read_text(encoding="utf-8"), str(file))
    names = [key.name for key in keys]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise KeyFileError(f"{path}: the key name {', '.join(map(repr, twice))} is in more than one file")
    return keys


def _signature(path: Path) -> tuple[tuple[str, int, int, int], ...]:
    """What changes when a key file is rewritten, replaced or added (stat follows a Secret's links)."""
    stats = [(file, file.stat()) for file in _key_files(path)]
    return tuple((str(file), stat.st_mtime_ns, stat.st_size, stat.st_ino) for file, stat in stats)


class KeyStore:
    """The keys of a key file, read again when it changes."""

    def __init__(
        self, path: Path, reload_seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.path = path
        self._reload_seconds = reload_seconds
        self._clock = clock
        try:
            self._seen = _signature(path)
            self.keys = read_keys(path)
        except OSError as exc:
            raise KeyFileError(f"cannot read the key file {path}: {exc.strerror or exc}") from None
        if not self.keys:
            raise KeyFileError(f"{path} holds no keys: add one (python -m serving.auth new-key NAME)")
        self._checked_at = clock()

    def match(self, raw_key: str) -> ApiKey | None:
        self._reload_if_changed()
        digest = digest_of(raw_key)
        found = None
        for key in self.keys:  # every key compared, in constant time each: no early exit to time
            if hmac.compare_digest(digest, key.digest):
                found = key
        return found

    def _reload_if_changed(self) -> None:
        now = self._clock()
        if now - self._checked_at < self._reload_seconds:
            return
        self._checked_at = now
        try:
            seen = _signature(self.path)
            if seen == self._seen:
                return
            keys = read_keys(self.path)
        except (OSError, KeyFileError) as exc:
            # A half-written file or a mistake must not lock every client out: the keys stay as they were.
            logger.error("the key file is unusable, keeping the %d keys read before: %s", len(self.keys), exc)
            return
        self._seen, self.keys = seen, keys
        logger.info("read %d API keys from %s", len(keys), self.path)
        if not keys:
            logger.warning("%s holds no keys: every call but the probes is refused", self.path)


class FailureLimiter:
    """Unknown keys per client address: `max_failures` within `block_seconds` block the address for
    `block_seconds`."""

    def __init__(
        self, max_failures: int, block_seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._max_failures = max_failures
        self._block_seconds = block_seconds
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._blocked_until: dict[str, float] = {}

    def blocked_for(self, address: str) -> float:
        """Seconds the address stays blocked; 0 when it is not."""
        until = self._blocked_until.get(address)
        if until is None:
            return 0.0
        left = until - self._clock()
        if left <= 0:
            del self._blocked_until[address]
            return 0.0
        return left

    def failed(self, address: str) -> None:
        now = self._clock()
        failures = self._failures.pop(address, None) or deque()
        while failures and failures[0] <= now - self._block_seconds:
            failures.popleft()
        failures.append(now)
        if len(failures) >= self._max_failures:
            self._blocked_until[address] = now + self._block_seconds
            return  # forgotten: the block starts the count again
        self._failures[address] = failures  # most recent last
        if len(self._failures) > MAX_TRACKED_ADDRESSES:
            self._failures.popitem(last=False)
        if len(self._blocked_until) > MAX_TRACKED_ADDRESSES:
            self._blocked_until = {a: t for a, t in self._blocked_until.items() if t > now}


class Gate:
    """The one decision: may this call, from this address, with this key, go on?"""

    def __init__(
        self,
        keys: KeyStore,
        limiter: FailureLimiter,
        on_refusal: Callable[[str, str], None],
        *,
        auth_metrics: bool,
        auth_docs: bool,
    ) -> None:
        self.keys = keys
        self._limiter = limiter
        self._on_refusal = on_refusal  # (transport, reason)
        self._auth_metrics = auth_metrics
        self._auth_docs = auth_docs

    def http_access(self, path: str) -> Access:
        if path in HTTP_PROBES:
            return Access.OPEN
        if path == "/metrics":
            return Access.METRICS if self._auth_metrics else Access.OPEN
        if path in HTTP_DOCS or path.startswith(HTTP_DOCS_PREFIXES):
            return Access.ANY_KEY if self._auth_docs else Access.OPEN
        if path in HTTP_PREDICT or (path.startswith("/v2/models/") and path.endswith("/infer")):
            return Access.PREDICT
        if path == "/feedback":
            return Access.FEEDBACK
        return Access.ANY_KEY  # /model, OIP metadata, and any path that does not exist

    @staticmethod
    def grpc_access(method: str) -> Access:
        if method.startswith(GRPC_HEALTH) or method in GRPC_PROBES:
            return Access.OPEN
        if method == f"{OIP_SERVICE}ModelInfer":
            return Access.PREDICT
        return Access.ANY_KEY  # OIP metadata, reflection

    def check(self, transport: str, address: str, presented: str | None, access: Access) -> Verdict:
        if access is Access.OPEN:
            return Verdict(caller=None)
        blocked = self._limiter.blocked_for(address)
        if blocked:
            return self._refuse(
                transport,
                Refusal.BLOCKED,
                "too many calls with an invalid API key from this address; retry later",
                retry_after=math.ceil(blocked),
            )
        if presented is None:
            return self._refuse(
                transport, Refusal.MISSING_KEY, "an API key is required: Authorization: Bearer <key>"
            )
        key = self.keys.match(presented)
        if key is None:
            self._limiter.failed(address)
            return self._refuse(transport, Refusal.UNKNOWN_KEY, "the API key is not valid")
        if access is not Access.ANY_KEY and access.value not in key.rights:
            return self._refuse(
                transport, Refusal.NO_RIGHT, f"this API key lacks the right '{access.value}' this call needs"
            )
        return Verdict(caller=key.name)

    def _refuse(
        self, transport: str, refusal: Refusal, message: str, retry_after: int | None = None
    ) -> Verdict:
        self._on_refusal(transport, refusal.reason)
        return Verdict(caller=None, refusal=refusal, message=message, retry_after=retry_after)


def presented_key(authorization: str | None, api_key: str | None) -> str | None:
    """The key a call carries: `Authorization: Bearer <key>`, else `X-API-Key: <key>`."""
    scheme, credentials = get_authorization_scheme_param(authorization)
    if scheme.lower() == "bearer" and credentials:
        return credentials
    return api_key or None


# The name of the key the current call was let in with (None with auth off); set by the transport's adapter
# for the length of the call, read where the call reaches the data plane (the prediction log's `caller`).
_caller: ContextVar[str | None] = ContextVar("caller", default=None)


def current_caller() -> str | None:
    return _caller.get()


@contextmanager
def calling_as(name: str | None) -> Iterator[None]:
    token = _caller.set(name)
    try:
        yield
    finally:
        _caller.reset(token)


def gate_from(
    keys_file: Path | None,
    *,
    reload_seconds: float,
    max_failures: int,
    block_seconds: float,
    auth_metrics: bool,
    auth_docs: bool,
) -> Gate | None:
    """The gate of the settings, None with auth off. A key file that cannot be used raises KeyFileError."""
    if keys_file is None:
        return None
    from serving.metrics import serving_metrics  # noqa: PLC0415  (prometheus_client: only in a worker)

    def count(transport: str, reason: str) -> None:
        serving_metrics().auth_refusals.labels(transport=transport, reason=reason).inc()

    return Gate(
        KeyStore(keys_file, reload_seconds),
        FailureLimiter(max_failures, block_seconds),
        count,
        auth_metrics=auth_metrics,
        auth_docs=auth_docs,
    )


# ---- python -m serving.auth ------------------------------------------------------------------------------

cli = typer.Typer(
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="API keys of the service (serving/auth.py).",
)


@cli.command("new-key")
def new_key(
    name: Annotated[str, typer.Argument(help="The key's name, logged with every prediction it asks for.")],
    rights: Annotated[
        str, typer.Option(help=f"Comma-separated rights ({', '.join(RIGHTS)}); default: all.")
    ] = ",".join(RIGHTS),
) -> None:
    """A new random key: the key itself on stderr (shown once: give it to the client), the line for the key
    file on stdout (`>> keys.txt`)."""
    raw_key = KEY_PREFIX + secrets.token_urlsafe(32)
    line = f"{name}:{digest_of(raw_key).hex()}:{rights}"
    try:
        parse_keys(line, "the new line")
    except KeyFileError as exc:
        typer.echo(f"error: {str(exc).removeprefix('the new line, line 1: ')}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"API key {name!r} (shown once): {raw_key}", err=True)
    typer.echo(line)


@cli.command("check")
def check(path: Annotated[Path, typer.Argument(help="A key file, or a directory of them.")]) -> None:
    """Read a key file as the service would: its key names and rights, or the line at fault."""
    try:
        keys = KeyStore(path, reload_seconds=0).keys
    except KeyFileError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    for key in keys:
        typer.echo(f"{key.name}: {','.join(sorted(key.rights))}")


if __name__ == "__main__":
    cli(prog_name="python -m serving.auth")
