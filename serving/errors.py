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


class BadInputError(ServingError):
    status = 400
    grpc_code = "INVALID_ARGUMENT"


class PayloadTooLargeError(BadInputError):
    status = 413


class UnsupportedMediaTypeError(BadInputError):
    status = 415


class ModelNotFoundError(ServingError):
    status = 404
    grpc_code = "NOT_FOUND"


class UnavailableError(ServingError):
    status = 503
    grpc_code = "UNAVAILABLE"
