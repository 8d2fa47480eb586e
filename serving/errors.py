"""Errors every transport understands: each carries its HTTP status and gRPC status code, and a message
that names the field and the problem. Transports translate them; none invents its own."""

from __future__ import annotations


class ServingError(Exception):
    status = 500
    grpc_code = "INTERNAL"  # a grpc.StatusCode member name

    def __init__(self, message: str, reason: str = "error") -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason  # short machine-readable label, used as a metrics label

    @property
    def headers(self) -> dict[str, str]:
        """HTTP headers the answer carries besides its status and body."""
        return {}

    @property
    def grpc_trailers(self) -> tuple[tuple[str, str], ...]:
        """Trailing metadata of the gRPC status."""
        return ()


class BadInputError(ServingError):
    status = 400
    grpc_code = "INVALID_ARGUMENT"


class PayloadTooLargeError(BadInputError):
    status = 413


class UnsupportedMediaTypeError(BadInputError):
    status = 415


class RequestTimeoutError(BadInputError):
    """The client stopped sending its request part way (HTTP only): 408, and the connection closes, since
    the rest of the body may still come and would be read as the next request."""

    status = 408
    grpc_code = "DEADLINE_EXCEEDED"

    @property
    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}


class ModelNotFoundError(ServingError):
    status = 404
    grpc_code = "NOT_FOUND"


class UnavailableError(ServingError):
    """The service cannot take the request now, whatever it holds: the client should send it again after
    `retry_after_seconds` (HTTP Retry-After; gRPC retry-after and grpc-retry-pushback-ms metadata)."""

    status = 503
    grpc_code = "UNAVAILABLE"

    def __init__(self, message: str, reason: str = "unavailable", retry_after_seconds: int = 1) -> None:
        super().__init__(message, reason)
        self.retry_after_seconds = retry_after_seconds

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_seconds)}

    @property
    def grpc_trailers(self) -> tuple[tuple[str, str], ...]:
        # grpc-retry-pushback-ms is what gRPC clients with a retry policy obey (gRFC A6).
        return (
            ("retry-after", str(self.retry_after_seconds)),
            ("grpc-retry-pushback-ms", str(1000 * self.retry_after_seconds)),
        )
