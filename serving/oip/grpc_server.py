"""The Open Inference Protocol over gRPC: a grpc.aio server whose servicer only translates.

The codec decodes and encodes, the data plane validates values and predicts. Beside the inference service
the server answers the standard health service (`grpc.health.v1.Health`: SERVING while the data plane is
ready, NOT_SERVING from the moment it stops) and server reflection, so grpcurl and grpc_health_probe work.
With auth on, `GrpcAuth` lets in only the calls serving/auth.py admits (health, ServerLive and ServerReady
stay open).
"""

# Method names and signatures are those of the generated servicer.
# ruff: noqa: N802, ARG002

from __future__ import annotations

import functools
import inspect
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, NoReturn, Protocol, TypeVar

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2

from serving import tracing
from serving.admission import Admission, OverloadedError
from serving.auth import Access, Gate, Refusal, calling_as, current_caller, presented_key
from serving.errors import BadInputError, ServingError
from serving.oip import grpc_predict_v2_pb2 as pb
from serving.oip import grpc_predict_v2_pb2_grpc as pb_grpc
from serving.oip.codec import InferRequest, OutputTensor, decode_grpc_request, encode_grpc_response

logger = logging.getLogger(__name__)

TRANSPORT: Final = "grpc"
SERVICE: Final = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
SERVICE_NAME: Final = SERVICE.full_name
INFER_METHOD: Final = f"/{SERVICE_NAME}/ModelInfer"
HEALTH_SERVICE_NAME: Final = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# A batch of thousands of rows of tens of features is a few MiB; gRPC's default limit is 4 MiB.
MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024


class DataPlane(Protocol):
    """What the adapter needs from serving.dataplane.DataPlane."""

    name: str
    version: str
    feature_names: list[str]

    def is_ready(self) -> bool: ...

    def check_model(self, name: str, version: str | None) -> None: ...  # raises ModelNotFoundError

    def model_metadata(self) -> dict[str, Any]: ...

    def server_metadata(self) -> dict[str, Any]: ...

    async def infer(
        self, request: InferRequest, transport: str, caller: str | None = None
    ) -> tuple[list[OutputTensor], str, dict[str, str]]: ...

    def refused(self, error: ServingError, transport: str) -> None: ...

    def observe(self, transport: str, endpoint: str, started: float) -> None: ...


class GrpcBindError(RuntimeError):
    pass


_Request = TypeVar("_Request", bound=Message)
_Response = TypeVar("_Response")
_Handler = Callable[["InferenceServicer", _Request, Any], Awaitable[_Response]]
_RawHandler = Callable[["InferenceServicer", bytes, Any], Awaitable[_Response]]


def _translating_errors(handler: _Handler[_Request, _Response]) -> _RawHandler[_Response]:
    """The request parsed from its bytes here (see `_add_inference_service`); ServingError -> its own status
    code, anything else -> INTERNAL: grpc would answer UNKNOWN."""
    request_type: type[_Request] = _message_class(SERVICE.methods_by_name[handler.__name__].input_type)

    @functools.wraps(handler)
    async def translated(self: InferenceServicer, request_bytes: bytes, context: Any) -> _Response:
        try:
            return await handler(self, _parse(request_type, request_bytes), context)
        except ServingError as error:
            self.current_plane().refused(error, TRANSPORT)
            await _abort(context, grpc.StatusCode[error.grpc_code], error.message, error.grpc_trailers)
        except Exception:
            logger.exception("gRPC %s failed", handler.__name__)
            await _abort(
                context, grpc.StatusCode.INTERNAL, f"internal error in {handler.__name__}; see the server log"
            )

    return translated


def _message_class(descriptor: Any) -> Any:
    return getattr(pb, descriptor.name)


def _parse(request_type: type[_Request], data: bytes) -> _Request:
    try:
        return request_type.FromString(data)
    except DecodeError:
        raise BadInputError(
            f"the request is not a valid protobuf {request_type.DESCRIPTOR.full_name} message",
            "undecodable_message",
        ) from None


def _add_inference_service(servicer: InferenceServicer, server: Any) -> None:
    """What the generated `add_GRPCInferenceServiceServicer_to_server` does, but with handlers that take the
    request's raw bytes: grpc parses a request before any code of ours runs, and answers one that does not
    parse with UNKNOWN ("Unexpected DecodeError"), which says nothing of the client's mistake."""
    handlers = {
        method.name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.name),
            request_deserializer=None,
            response_serializer=_message_class(method.output_type).SerializeToString,
        )
        for method in SERVICE.methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class UndecodableIsInvalidArgument(grpc.aio.ServerInterceptor):
    """The same for the services that are grpc's own (health, reflection): their handlers are given the raw
    bytes, parsed here with the handler's own deserializer, and a message that does not parse is refused
    with INVALID_ARGUMENT instead of grpc's UNKNOWN. Handlers that take raw bytes already pass unchanged."""

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse, method = handler.request_deserializer, details.method

        async def parsed(data: bytes, context: Any) -> Any:
            try:
                return parse(data)
            except DecodeError:
                await _abort(
                    context, grpc.StatusCode.INVALID_ARGUMENT, f"{method}: not a valid protobuf message"
                )

        serializer = handler.response_serializer
        if handler.unary_unary is not None:
            behavior = handler.unary_unary

            async def unary_unary(data: bytes, context: Any) -> Any:
                return await behavior(await parsed(data, context), context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, response_serializer=serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _streaming(handler.unary_stream, parsed), response_serializer=serializer
            )
        if handler.stream_stream is not None:

            async def each_parsed(requests: Any, context: Any) -> Any:
                async for data in requests:
                    yield await parsed(data, context)

            async def parsed_stream(requests: Any, context: Any) -> Any:
                return each_parsed(requests, context)

            return grpc.stream_stream_rpc_method_handler(
                _streaming(handler.stream_stream, parsed_stream), response_serializer=serializer
            )
        return handler  # stream-unary: no such method here


class AdmissionInterceptor(grpc.aio.ServerInterceptor):
    """Each ModelInfer call admitted by the worker's `Admission` (serving/admission.py), or refused at once
    with UNAVAILABLE and when to retry in the trailing metadata. The other methods are cheap: not gated."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or details.method != INFER_METHOD:
            return handler
        infer, admission = handler.unary_unary, self._admission

        async def admitted(request: Any, context: Any) -> Any:
            try:
                place = admission.admit(TRANSPORT)
            except OverloadedError as error:
                await _abort(context, grpc.StatusCode.UNAVAILABLE, error.message, error.grpc_trailers)
            with place:
                place.start()  # the message has arrived whole
                return await infer(request, context)

        return grpc.unary_unary_rpc_method_handler(
            admitted,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _streaming(behavior: Any, requests_of: Callable[[Any, Any], Awaitable[Any]]) -> Any:
    """`behavior` given the requests that `requests_of` makes of what arrives. A streaming behavior of grpc
    aio either yields its responses or writes them with `context.write`; the wrapper does as it does."""
    if inspect.isasyncgenfunction(behavior):

        async def yielding(arrived: Any, context: Any) -> Any:
            async for response in behavior(await requests_of(arrived, context), context):
                yield response

        return yielding

    async def writing(arrived: Any, context: Any) -> Any:
        return await behavior(await requests_of(arrived, context), context)

    return writing


class GrpcAuth(grpc.aio.ServerInterceptor):
    """Authentication of gRPC calls (metadata `authorization: Bearer <key>` or `x-api-key`): the gate
    (serving/auth.py) decides before the handler runs; a refusal is UNAUTHENTICATED, PERMISSION_DENIED, or
    RESOURCE_EXHAUSTED with `retry-after` in the trailing metadata. An admitted call runs as its key's
    name. Installed only with auth on."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        access = self.gate.grpc_access(details.method)
        if handler is None or access is Access.OPEN:
            return handler
        metadata = {key: value for key, value in details.invocation_metadata or () if isinstance(value, str)}
        presented = presented_key(metadata.get("authorization"), metadata.get("x-api-key"))
        gate = self.gate

        async def admitted(context: Any) -> str | None:
            verdict = gate.check(TRANSPORT, peer_address(context.peer()), presented, access)
            refusal = verdict.refusal
            if refusal is None:
                return verdict.caller
            trailing = (("retry-after", str(verdict.retry_after)),) if refusal is Refusal.BLOCKED else ()
            return await _abort(context, grpc.StatusCode[refusal.grpc_code], verdict.message, trailing)

        if handler.unary_unary is not None:
            behavior = handler.unary_unary

            async def unary_unary(request: Any, context: Any) -> Any:
                with calling_as(await admitted(context)):
                    return await behavior(request, context)

            return handler._replace(unary_unary=unary_unary)

        async def after_admission(arrived: Any, context: Any) -> Any:
            await admitted(context)
            return arrived

        # Streaming methods here are reflection's and health's: they reach no data plane, so no caller.
        kind = "unary_stream" if handler.unary_stream is not None else "stream_stream"
        if getattr(handler, kind) is None:
            return handler  # stream-unary: no such method here
        return handler._replace(**{kind: _streaming(getattr(handler, kind), after_admission)})


def peer_address(peer: str) -> str:
    """'ipv4:127.0.0.1:5123' -> '127.0.0.1', 'ipv6:[::1]:5123' -> '::1'; anything else as it is."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    return peer


async def _abort(
    context: Any, code: grpc.StatusCode, message: str, trailing: tuple[tuple[str, str], ...] = ()
) -> NoReturn:
    await context.abort(code, message, trailing_metadata=trailing)
    raise AssertionError("unreachable: context.abort raises")


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Each call takes the served data plane once and uses only it: the service may swap in another version
    (another plane) between calls."""

    def __init__(self, current_plane: Callable[[], DataPlane]) -> None:
        self.current_plane = current_plane

    @_translating_errors
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @_translating_errors
    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.current_plane().is_ready())

    @_translating_errors
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        plane = self.current_plane()
        plane.check_model(request.name, request.version or None)
        return pb.ModelReadyResponse(ready=plane.is_ready())

    @_translating_errors
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Any
    ) -> pb.ServerMetadataResponse:
        metadata = self.current_plane().server_metadata()
        return pb.ServerMetadataResponse(
            name=metadata["name"], version=metadata["version"], extensions=metadata.get("extensions", [])
        )

    @_translating_errors
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        plane = self.current_plane()
        plane.check_model(request.name, request.version or None)
        metadata = plane.model_metadata()
        return pb.ModelMetadataResponse(
            name=metadata["name"],
            versions=metadata.get("versions", []),
            platform=metadata.get("platform", ""),
            inputs=[_tensor_metadata(tensor) for tensor in metadata["inputs"]],
            outputs=[_tensor_metadata(tensor) for tensor in metadata["outputs"]],
        )

    @_translating_errors
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        started = time.perf_counter()
        plane = self.current_plane()
        # The request's span starts once the message is parsed (`_translating_errors`): its decode span is
        # the tensors' decoding and the values' validation.
        with tracing.grpc_request(TRANSPORT, INFER_METHOD, context.invocation_metadata()):
            plane.check_model(request.model_name, request.model_version or None)
            outputs, request_id, parameters = await plane.infer(
                decode_grpc_request(request), TRANSPORT, current_caller()
            )
            response = encode_grpc_response(
                plane.name,
                plane.version,
                request_id,
                outputs,
                raw=bool(request.raw_input_contents),
                parameters=parameters,
            )
        plane.observe(TRANSPORT, "infer", started)
        return response


def _tensor_metadata(tensor: dict[str, Any]) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(
        name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"]
    )


def _reflection_pool() -> descriptor_pool.DescriptorPool:
    # Our stubs live in their own descriptor pool (see the proto target in the Makefile), so reflection
    # gets a pool holding every service it describes.
    pool = descriptor_pool.DescriptorPool()
    for file in (pb.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
        pool.AddSerializedFile(file.serialized_pb)
    return pool


class GrpcServer:
    def __init__(self, server: Any, health: HealthServicer, port: int) -> None:
        self._server = server
        self._health = health
        self.port = port  # the bound port: the one asked for, or the one chosen for port 0

    async def stop(self, grace: float) -> None:
        """Health NOT_SERVING, refuse new RPCs, give in-flight ones `grace` seconds to finish."""
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace)


def check_port_free(host: str, port: int) -> None:
    """Exit with one line if host:port is taken. Called once before the workers start: they bind with
    SO_REUSEPORT to share the port, and so would every other process of the same user, so a bind of
    theirs cannot tell a sibling worker from another server. A plain bind can."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # connections in TIME_WAIT do not count
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as exc:
            raise SystemExit(
                f"error: the gRPC port {host}:{port} is not available ({exc.strerror}): another server "
                "listens there; choose another with TABSERVE_GRPC_PORT (0: no gRPC server)"
            ) from None


async def start_grpc_server(
    current_plane: Callable[[], DataPlane],
    host: str,
    port: int,
    admission: Admission,
    gate: Gate | None = None,
) -> GrpcServer:
    """Serve the data plane that `current_plane` gives (per call) on host:port (port 0: any free port),
    inference calls admitted by `admission`. The port is bound with SO_REUSEPORT, so that several worker
    processes can share it. `gate`: authentication (serving/auth.py), None when it is off."""
    # Admission first: a refused call costs as little as it can. Then authentication: a refused call is
    # not even parsed.
    authentication = [GrpcAuth(gate)] if gate is not None else []
    server = grpc.aio.server(
        interceptors=[AdmissionInterceptor(admission), *authentication, UndecodableIsInvalidArgument()],
        options=[
            ("grpc.so_reuseport", 1),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    _add_inference_service(InferenceServicer(current_plane), server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if current_plane().is_ready()
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for service in ("", SERVICE_NAME):
        await health.set(service, status)
    reflection.enable_server_reflection(
        [SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME], server, pool=_reflection_pool()
    )

    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise GrpcBindError(f"gRPC server cannot listen on {address}: {exc}") from None
    # Older grpc releases report a failed bind as port 0 instead of raising.
    if bound == 0:
        raise GrpcBindError(f"gRPC server cannot listen on {address}: the address is in use or not available")
    await server.start()
    logger.info("Open Inference Protocol gRPC server listening on %s", address)
    return GrpcServer(server, health, bound)
