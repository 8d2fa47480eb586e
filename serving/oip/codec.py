"""Open Inference Protocol (KServe v2) codec: request bodies and messages in, tensors out; output tensors
in, response bodies and messages out. Pure functions: no server, no model, no schema.

Decoding checks the protocol (datatypes, shapes, byte lengths, kinds of values) and nothing else; whether
the values suit the model's features is the data plane's business. Every problem with a request raises
`BadInputError` naming the tensor or field; nothing else escapes for bad input.

REST requests may use the binary tensor data extension: a JSON header of `Inference-Header-Content-Length`
bytes followed by the raw contents of the inputs that declare `parameters.binary_data_size`, in input order.
Raw contents (binary extension and gRPC `raw_input_contents`) are the flattened row-major elements in
little-endian order; BOOL is one byte per element; each BYTES element is a 4-byte little-endian length
followed by that many bytes.
"""

from __future__ import annotations

import itertools
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import orjson

from serving.errors import BadInputError
from serving.oip import grpc_predict_v2_pb2 as pb

BYTES: Final = "BYTES"
# Explicitly little-endian: the protocol's byte order, whatever the host's.
NUMPY_DTYPES: Final[dict[str, np.dtype[Any]]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
DATATYPES: Final = frozenset([*NUMPY_DTYPES, BYTES])
# The typed gRPC field of each datatype; FP16 has none and must be sent raw.
CONTENTS_FIELDS: Final = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    BYTES: "bytes_contents",
}
# In `InferRequest.binary_outputs`: every output binary. A request that names no outputs but sets
# `binary_data_output` (tritonclient's HTTP client does) cannot list them: only the data plane knows them.
ALL_OUTPUTS: Final = "*"

_LENGTH_PREFIX = struct.Struct("<I")
_FLOATS = frozenset(["FP16", "FP32", "FP64"])


@dataclass(frozen=True)
class Tensor:
    """One decoded input tensor."""

    name: str
    datatype: str
    shape: list[int]
    # Flat, row-major. numpy arrays for numbers and BOOL; for BYTES a list of str (None: JSON null).
    data: list[Any] | np.ndarray


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    inputs: list[Tensor]
    outputs: list[str] | None  # requested output names; None: all
    binary_outputs: set[str]  # outputs wanted as binary (REST binary extension); may hold ALL_OUTPUTS


@dataclass(frozen=True)
class OutputTensor:
    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray | list[Any]  # any shape with the right element count; BYTES as str or bytes


# ---- REST -------------------------------------------------------------------------------------------------


def decode_rest_request(body: bytes, inference_header_length: int | None) -> InferRequest:
    binary = memoryview(b"")
    header: bytes | memoryview = body
    if inference_header_length is not None:
        if not 0 <= inference_header_length <= len(body):
            raise BadInputError(
                f"Inference-Header-Content-Length is {inference_header_length} "
                f"but the body has {len(body)} bytes",
                "binary_length",
            )
        header, binary = (
            memoryview(body)[:inference_header_length],
            memoryview(body)[inference_header_length:],
        )
    try:
        document = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise BadInputError(f"the request body is not valid JSON: {exc}", "invalid_json") from None
    if not isinstance(document, dict):
        raise BadInputError("the request body must be a JSON object", "invalid_request")
    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadInputError(f"'id' must be a string, got {_kind(request_id)}", "invalid_request")
    parameters = _json_object(document.get("parameters"), "request 'parameters'")
    binary_by_default = _json_bool(
        parameters.get("binary_data_output", False), "parameter 'binary_data_output'"
    )
    inputs = _json_list_of_objects(document.get("inputs"), "inputs")
    if not inputs:
        raise BadInputError("the request has no 'inputs'", "missing_inputs")

    tensors: list[Tensor] = []
    taken: set[str] = set()
    offset = 0
    for index, entry in enumerate(inputs):
        name = _tensor_name(entry, f"inputs[{index}]", taken)
        taken.add(name)
        datatype = _datatype(name, entry.get("datatype"))
        shape = _shape(name, entry.get("shape"))
        size = _json_object(entry.get("parameters"), f"input '{name}' parameters").get("binary_data_size")
        if size is None:
            if "data" not in entry:
                raise BadInputError(
                    f"input '{name}' has neither 'data' nor a binary_data_size", "invalid_request"
                )
            data = _from_json(name, datatype, shape, entry["data"])
        else:
            if "data" in entry:
                raise BadInputError(
                    f"input '{name}' has both 'data' and a binary_data_size", "invalid_request"
                )
            if inference_header_length is None:
                raise BadInputError(
                    f"input '{name}' declares binary data "
                    "but the request has no Inference-Header-Content-Length",
                    "binary_length",
                )
            if type(size) is not int or size < 0:
                raise BadInputError(
                    f"input '{name}': binary_data_size must be a byte count, got {size!r}", "binary_length"
                )
            if offset + size > len(binary):
                raise BadInputError(
                    f"input '{name}': binary_data_size is {size} "
                    f"but only {len(binary) - offset} bytes of binary data remain",
                    "binary_length",
                )
            data = _from_raw(name, datatype, shape, binary[offset : offset + size])
            offset += size
        tensors.append(Tensor(name, datatype, shape, data))
    if offset != len(binary):
        raise BadInputError(
            f"{len(binary) - offset} bytes of binary data after the JSON header belong to no input",
            "binary_length",
        )
    outputs, binary_outputs = _requested_outputs(document.get("outputs"), binary_by_default)
    return InferRequest(id=request_id or None, inputs=tensors, outputs=outputs, binary_outputs=binary_outputs)


def encode_rest_response(
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: list[OutputTensor],
    binary_outputs: set[str],
    parameters: Mapping[str, str | int | float | bool] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers; outputs in `binary_outputs` follow the JSON header as raw bytes.
    `parameters`: the response's own (none when empty)."""
    described: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for output in outputs:
        entry: dict[str, Any] = {"name": output.name, "datatype": output.datatype, "shape": output.shape}
        if ALL_OUTPUTS in binary_outputs or output.name in binary_outputs:
            blob = _raw_bytes(output)
            blobs.append(blob)
            entry["parameters"] = {"binary_data_size": len(blob)}
        else:
            entry["data"] = _json_data(output)
        described.append(entry)
    response: dict[str, Any] = {
        "model_name": model_name,
        "model_version": model_version,
        "outputs": described,
    }
    if request_id:
        response["id"] = request_id
    if parameters:
        response["parameters"] = parameters
    header = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, {"Content-Type": "application/json"}
    return b"".join([header, *blobs]), {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }


def _parameter(value: str | int | float | bool) -> pb.InferParameter:
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return pb.InferParameter(int64_param=value)
    if isinstance(value, float):
        return pb.InferParameter(double_param=value)
    return pb.InferParameter(string_param=str(value))


def error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})


# ---- gRPC -------------------------------------------------------------------------------------------------


def decode_grpc_request(request: pb.ModelInferRequest) -> InferRequest:
    if not request.inputs:
        raise BadInputError("the request has no inputs", "missing_inputs")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise BadInputError(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs", "binary_length"
        )
    tensors: list[Tensor] = []
    taken: set[str] = set()
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        if not name:
            raise BadInputError(f"inputs[{index}] has no name", "invalid_request")
        if name in taken:
            raise BadInputError(f"input '{name}' is given twice", "duplicate_tensor")
        taken.add(name)
        datatype = _datatype(name, tensor.datatype)
        shape = _shape(name, list(tensor.shape))
        if raw:
            if tensor.HasField("contents"):
                raise BadInputError(
                    f"input '{name}' has contents although the request uses raw_input_contents",
                    "invalid_request",
                )
            data = _from_raw(name, datatype, shape, raw[index])
        else:
            data = _from_contents(name, datatype, shape, tensor.contents)
        tensors.append(Tensor(name, datatype, shape, data))
    outputs = [output.name for output in request.outputs]
    _check_output_names(outputs)
    return InferRequest(id=request.id or None, inputs=tensors, outputs=outputs or None, binary_outputs=set())


def encode_grpc_response(
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: list[OutputTensor],
    raw: bool,
    parameters: Mapping[str, str | int | float | bool] | None = None,
) -> pb.ModelInferResponse:
    """Raw contents when `raw` (what tritonclient, which sends raw, reads back), else typed contents.
    `parameters`: the response's own."""
    # FP16 has no typed field, and the protocol allows no mix of raw and typed contents.
    raw = raw or any(output.datatype not in CONTENTS_FIELDS for output in outputs)
    response = pb.ModelInferResponse(model_name=model_name, model_version=model_version, id=request_id or "")
    for key, value in (parameters or {}).items():
        response.parameters[key].CopyFrom(_parameter(value))
    for output in outputs:
        tensor = response.outputs.add(name=output.name, datatype=output.datatype, shape=output.shape)
        if raw:
            response.raw_output_contents.append(_raw_bytes(output))
        elif output.datatype == BYTES:
            tensor.contents.bytes_contents.extend(_encoded_strings(output))
        else:
            getattr(tensor.contents, CONTENTS_FIELDS[output.datatype]).extend(_array(output).tolist())
    return response


# ---- the model's columns ----------------------------------------------------------------------------------


def columns_from_tensors(inputs: list[Tensor], feature_names: list[str]) -> dict[str, list[Any] | np.ndarray]:
    """Flat, equally long columns keyed by feature name, in `feature_names` order.

    Either one tensor per feature, named as the feature, of shape [N] or [N, 1]; or a single tensor of shape
    [N, F] (any name) whose columns are the F features in order.
    """
    features = set(feature_names)
    if len(inputs) == 1 and not (inputs[0].name in features and _is_column(inputs[0].shape)):
        return _columns_of_matrix(inputs[0], feature_names)
    unknown = [tensor.name for tensor in inputs if tensor.name not in features]
    if unknown:
        raise BadInputError(
            f"unknown input tensor {_names(unknown)}: send one tensor per feature, named as the feature "
            f"({_names(feature_names)}), or a single [N, {len(feature_names)}] tensor",
            "unknown_tensor",
        )
    given = {tensor.name: tensor for tensor in inputs}
    missing = [name for name in feature_names if name not in given]
    if missing:
        raise BadInputError(f"missing input tensor for feature {_names(missing)}", "missing_tensor")
    first = inputs[0]
    for tensor in inputs:
        if not _is_column(tensor.shape):
            raise BadInputError(
                f"input '{tensor.name}' has shape {tensor.shape}; a feature's tensor must be [N] or [N, 1]",
                "tensor_shape",
            )
        if tensor.shape[0] != first.shape[0]:
            raise BadInputError(
                f"input '{tensor.name}' has {tensor.shape[0]} rows "
                f"but input '{first.name}' has {first.shape[0]}",
                "tensor_length",
            )
    return {name: given[name].data for name in feature_names}


def _is_column(shape: list[int]) -> bool:
    return len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)


def _columns_of_matrix(tensor: Tensor, feature_names: list[str]) -> dict[str, list[Any] | np.ndarray]:
    width = len(feature_names)
    if len(tensor.shape) != 2 or tensor.shape[1] != width:
        raise BadInputError(
            f"input '{tensor.name}' has shape {tensor.shape}; a single tensor must have shape [N, {width}] "
            f"(one column per feature: {_names(feature_names)}), or send one tensor per feature",
            "tensor_shape",
        )
    if isinstance(tensor.data, np.ndarray):
        matrix = tensor.data.reshape(-1, width)
        return {name: matrix[:, column] for column, name in enumerate(feature_names)}
    # Row-major and flat: column j is every width-th element from j.
    return {name: tensor.data[column::width] for column, name in enumerate(feature_names)}


# ---- decoding helpers -------------------------------------------------------------------------------------


def _tensor_name(entry: dict[str, Any], where: str, taken: set[str]) -> str:
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise BadInputError(f"{where} needs a 'name' string", "invalid_request")
    if name in taken:
        raise BadInputError(f"input '{name}' is given twice", "duplicate_tensor")
    return name


def _datatype(name: str, datatype: object) -> str:
    if not isinstance(datatype, str) or datatype not in DATATYPES:  # a list or object is no datatype either
        raise BadInputError(
            f"input '{name}' has unsupported datatype {datatype!r}; "
            f"supported: {', '.join(sorted(DATATYPES))}",
            "tensor_datatype",
        )
    return str(datatype)


def _shape(name: str, shape: object) -> list[int]:
    if not isinstance(shape, list) or not all(type(size) is int and size >= 0 for size in shape):
        raise BadInputError(
            f"input '{name}' has shape {shape!r}; a shape is a list of non-negative integers", "tensor_shape"
        )
    return shape


def _check_count(name: str, shape: list[int], count: int) -> None:
    if math.prod(shape) != count:
        raise BadInputError(
            f"input '{name}' has shape {shape} ({math.prod(shape)} elements) but {count} elements",
            "tensor_shape",
        )


def _from_json(name: str, datatype: str, shape: list[int], data: object) -> list[Any] | np.ndarray:
    if not isinstance(data, list):
        raise BadInputError(f"input '{name}': 'data' must be a JSON array, got {_kind(data)}", "tensor_data")
    values = _flatten(data)
    _check_count(name, shape, len(values))
    if datatype == BYTES:
        _check_kinds(name, datatype, values, (str, type(None)), "strings")
        return values
    if datatype == "BOOL":
        _check_kinds(name, datatype, values, (bool,), "true or false")
        return np.array(values, dtype=np.bool_)
    if datatype in _FLOATS:
        # null is a missing value (NaN): JSON has no other way to send one.
        _check_kinds(name, datatype, values, (int, float, type(None)), "numbers")
    else:
        _check_kinds(name, datatype, values, (int,), "integers")
    return _numbers(name, datatype, values)


def _flatten(data: list[Any]) -> list[Any]:
    if not any(isinstance(item, list) for item in data):
        return data
    if all(type(item) is list for item in data):  # the usual [rows, columns]: flattened in C
        flat = list(itertools.chain.from_iterable(data))
        if list not in set(map(type, flat)):
            return flat
    flat = []
    # Iterative: JSON nesting can be deeper than Python's recursion limit.
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _check_kinds(name: str, datatype: str, values: list[Any], kinds: tuple[type, ...], expected: str) -> None:
    # Exact types: bool is an int subclass, and True is no number here. The set of types is found in C;
    # only a wrong one takes the loop that names its position.
    if set(map(type, values)) <= set(kinds):
        return
    for index, value in enumerate(values):
        if type(value) not in kinds:
            raise BadInputError(
                f"input '{name}' ({datatype}): element {index} is {_kind(value)}; expected {expected}",
                "tensor_data",
            )


def _numbers(name: str, datatype: str, values: Sequence[Any]) -> np.ndarray:
    dtype = NUMPY_DTYPES[datatype]
    try:
        return np.array(values, dtype=dtype)
    except OverflowError:
        limits = np.finfo(dtype) if dtype.kind == "f" else np.iinfo(dtype)
        raise BadInputError(
            f"input '{name}' ({datatype}): a value is outside [{limits.min}, {limits.max}]", "tensor_data"
        ) from None


def _from_raw(name: str, datatype: str, shape: list[int], blob: bytes | memoryview) -> list[Any] | np.ndarray:
    count = math.prod(shape)
    if datatype == BYTES:
        return _strings_from_raw(name, blob, count)
    dtype = NUMPY_DTYPES[datatype]
    if len(blob) != count * dtype.itemsize:
        raise BadInputError(
            f"input '{name}': {len(blob)} bytes of raw data, but shape {shape} of {datatype} takes "
            f"{count * dtype.itemsize} ({dtype.itemsize} per element)",
            "binary_length",
        )
    if datatype == "BOOL":
        octets = np.frombuffer(blob, dtype=np.uint8)
        if (octets > 1).any():
            raise BadInputError(f"input '{name}' (BOOL): raw elements must be bytes 0 or 1", "tensor_data")
        return octets.view(np.bool_)
    return np.frombuffer(blob, dtype=dtype)


def _strings_from_raw(name: str, blob: bytes | memoryview, count: int) -> list[str]:
    view = memoryview(blob)
    strings: list[str] = []
    offset = 0
    for index in range(count):
        if offset + 4 > len(view):
            raise BadInputError(
                f"input '{name}' (BYTES): raw data ends before element {index} of {count}", "binary_length"
            )
        (length,) = _LENGTH_PREFIX.unpack_from(view, offset)
        start, offset = offset + 4, offset + 4 + length
        if offset > len(view):
            raise BadInputError(
                f"input '{name}' (BYTES): element {index} declares {length} bytes but only "
                f"{len(view) - start} remain",
                "binary_length",
            )
        try:
            strings.append(str(view[start:offset], "utf-8"))
        except UnicodeDecodeError:
            raise BadInputError(
                f"input '{name}' (BYTES): element {index} is not valid UTF-8", "tensor_data"
            ) from None
    if offset != len(view):
        raise BadInputError(
            f"input '{name}' (BYTES): {len(view) - offset} bytes of raw data after its {count} elements",
            "binary_length",
        )
    return strings


def _from_contents(
    name: str, datatype: str, shape: list[int], contents: pb.InferTensorContents
) -> list[Any] | np.ndarray:
    field = CONTENTS_FIELDS.get(datatype)
    if field is None:
        raise BadInputError(
            f"input '{name}' ({datatype}) can only be sent in raw_input_contents", "tensor_data"
        )
    others = [described.name for described, _ in contents.ListFields() if described.name != field]
    if others:
        raise BadInputError(
            f"input '{name}' ({datatype}) has values in {', '.join(others)}; expected {field}", "tensor_data"
        )
    values = list(getattr(contents, field))
    _check_count(name, shape, len(values))
    if datatype == BYTES:
        try:
            return [value.decode("utf-8") for value in values]
        except UnicodeDecodeError:
            raise BadInputError(
                f"input '{name}' (BYTES): an element is not valid UTF-8", "tensor_data"
            ) from None
    # INT8/16 and UINT8/16 travel in 32-bit fields: narrower values may not fit.
    return _numbers(name, datatype, values)


def _requested_outputs(outputs: object, binary_by_default: bool) -> tuple[list[str] | None, set[str]]:
    if outputs is None:
        return None, {ALL_OUTPUTS} if binary_by_default else set()
    names: list[str] = []
    binary: set[str] = set()
    for index, entry in enumerate(_json_list_of_objects(outputs, "outputs")):
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise BadInputError(f"outputs[{index}] needs a 'name' string", "invalid_request")
        parameters = _json_object(entry.get("parameters"), f"output '{name}' parameters")
        if _json_bool(parameters.get("binary_data", binary_by_default), f"output '{name}' binary_data"):
            binary.add(name)
        names.append(name)
    _check_output_names(names)
    if not names:
        return None, {ALL_OUTPUTS} if binary_by_default else set()
    return names, binary


def _check_output_names(names: list[str]) -> None:
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise BadInputError(f"output {_names(repeated)} requested more than once", "duplicate_tensor")


def _json_object(value: object, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadInputError(f"{what} must be a JSON object, got {_kind(value)}", "invalid_request")
    return value


def _json_list_of_objects(value: object, what: str) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(entry, dict) for entry in value):
        raise BadInputError(f"'{what}' must be a JSON array of objects", "invalid_request")
    return value


def _json_bool(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise BadInputError(f"{what} must be true or false, got {_kind(value)}", "invalid_request")
    return value


_JSON_KINDS: Final[dict[type, str]] = {type(None): "null", list: "an array", dict: "an object"}


def _kind(value: object) -> str:
    """What a decoded JSON value is, for messages."""
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, str):
        return f"a string ({value[:40]!r})"
    if isinstance(value, int | float):
        return f"a number ({value!r})"
    return _JSON_KINDS.get(type(value), type(value).__name__)


def _names(names: Sequence[str]) -> str:
    return ", ".join(f"'{name}'" for name in names)


# ---- encoding helpers -------------------------------------------------------------------------------------


def _array(output: OutputTensor) -> np.ndarray:
    array = np.ascontiguousarray(output.data, dtype=NUMPY_DTYPES[output.datatype]).reshape(-1)
    if array.size != math.prod(output.shape):
        raise ValueError(f"output '{output.name}' has {array.size} elements for shape {output.shape}")
    return array


def _encoded_strings(output: OutputTensor) -> list[bytes]:
    values = output.data.reshape(-1).tolist() if isinstance(output.data, np.ndarray) else output.data
    if len(values) != math.prod(output.shape):
        raise ValueError(f"output '{output.name}' has {len(values)} elements for shape {output.shape}")
    return [value if isinstance(value, bytes) else str(value).encode("utf-8") for value in values]


def _raw_bytes(output: OutputTensor) -> bytes:
    if output.datatype == BYTES:
        return b"".join(_LENGTH_PREFIX.pack(len(value)) + value for value in _encoded_strings(output))
    return _array(output).tobytes()


def _json_data(output: OutputTensor) -> list[Any] | np.ndarray:
    if output.datatype == BYTES:
        return [value.decode("utf-8", errors="replace") for value in _encoded_strings(output)]
    array = _array(output)
    # orjson serializes native-endian arrays directly (NaN as null); anything else goes through Python.
    return array if array.dtype.isnative and array.dtype != np.float16 else array.tolist()
