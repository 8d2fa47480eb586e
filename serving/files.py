"""POST /predict_file: a CSV or Parquet table in, one prediction per row out as CSV, Parquet or JSON.

Memory stays bounded by one chunk of rows, whatever the file's size: the upload is spooled to a temporary
file as it arrives, then read twice in chunks. The first pass only validates, so that a bad value anywhere
in the file gets a 400 before any output is sent; the second predicts and streams each chunk's answers as
soon as they exist. Both passes parse with pyarrow on a worker thread, so the event loop (which also
serves gRPC) never waits on parsing.

Upload: the file as the body (`Content-Type: text/csv`, `application/vnd.apache.parquet` or
`application/octet-stream`) or as the `file` field of a multipart form. Parquet is recognised by its magic
bytes, so the content type only has to be one of those. Output: `?format=csv|parquet|json`, else the
`Accept` header, else the upload's own format. CSV and Parquet get the columns `prediction`,
`probability_<class>` (classification) and `unknown_categories` (a JSON object, when the model has
categorical features); JSON gets `{"model": ..., "version": ..., "predictions": [{...}, ...]}`. The model's
lineage is also in the response headers (`X-Model-Name`, `X-Model-Version`, `X-Registered-Version`,
`X-MLflow-Run-Id`, `X-Data-Digest`, `X-Request-Id`).
"""

from __future__ import annotations

import asyncio
import re
import tempfile
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from enum import StrEnum
from typing import IO, Any

import orjson
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from fastapi.routing import APIRoute
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartParser
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from models.schema import FeatureKind
from serving.auth import current_caller
from serving.dataplane import DataPlane, PredictionBatch
from serving.errors import (
    BadInputError,
    PayloadTooLargeError,
    RequestTimeoutError,
    ServingError,
    UnsupportedMediaTypeError,
)
from serving.rest import UPLOAD_ENDPOINT as ENDPOINT

TRANSPORT = "http"
PARQUET_MAGIC = b"PAR1"
CSV_BLOCK_BYTES = 1 << 20
ARROW_TYPES = {
    FeatureKind.NUMERIC: pa.float64(),
    FeatureKind.BOOLEAN: pa.bool_(),
    FeatureKind.CATEGORICAL: pa.string(),
}


class TableFormat(StrEnum):
    CSV = "csv"
    PARQUET = "parquet"
    JSON = "json"


MEDIA_TYPES = {
    TableFormat.CSV: "text/csv",
    TableFormat.PARQUET: "application/vnd.apache.parquet",
    TableFormat.JSON: "application/json",
}
ACCEPTED_UPLOADS = frozenset(
    {"text/csv", "application/csv", "application/vnd.apache.parquet", "application/x-parquet"}
    | {"application/octet-stream", "multipart/form-data"}
)
ACCEPT_ALIASES = {
    "text/csv": TableFormat.CSV,
    "application/csv": TableFormat.CSV,
    "application/vnd.apache.parquet": TableFormat.PARQUET,
    "application/x-parquet": TableFormat.PARQUET,
    "application/json": TableFormat.JSON,
}


def predict_file_route(
    current_plane: Callable[[], DataPlane], max_upload_bytes: int, chunk_rows: int, idle_seconds: float
) -> APIRoute:
    async def predict_file(request: Request) -> Response:
        plane = current_plane()
        try:
            upload = await _receive(request, max_upload_bytes, idle_seconds)
            try:
                return await _answer(request, plane, upload, chunk_rows)
            except BaseException:
                upload.close()
                raise
        except ServingError as error:
            plane.refused(error, TRANSPORT)
            body = orjson.dumps({"error": error.message})
            return Response(
                body, status_code=error.status, headers=error.headers, media_type="application/json"
            )

    return APIRoute(
        ENDPOINT,
        predict_file,
        methods=["POST"],
        summary="Predict every row of a CSV or Parquet file",
        description=(
            "The table as the body (text/csv, application/vnd.apache.parquet, application/octet-stream) "
            "or as the `file` field of a form, with the training column names as its header. Answers "
            "stream back in row order as CSV or Parquet (columns prediction, probability_<class>, "
            "unknown_categories when the model has categorical features) or JSON. The whole file is "
            "validated before the first answer: a bad value anywhere gets a 400 naming the row and column."
        ),
        response_class=Response,
        openapi_extra=OPENAPI,
    )


_BINARY = {"schema": {"type": "string", "format": "binary"}}
_ERROR = {
    "content": {
        "application/json": {"schema": {"type": "object", "properties": {"error": {"type": "string"}}}}
    }
}
# What FastAPI cannot infer from a handler that reads the request itself.
OPENAPI: dict[str, Any] = {
    "parameters": [
        {
            "name": "format",
            "in": "query",
            "required": False,
            "schema": {"type": "string", "enum": [f.value for f in TableFormat]},
            "description": "Output format; default: the Accept header, else the upload's format",
        }
    ],
    "requestBody": {
        "required": True,
        "content": {
            "text/csv": _BINARY,
            "application/vnd.apache.parquet": _BINARY,
            "application/octet-stream": _BINARY,
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}}
            },
        },
    },
    "responses": {
        "200": {
            "description": "One prediction per row, streamed",
            "content": dict.fromkeys(MEDIA_TYPES.values(), _BINARY),
        },
        "400": {"description": "The file cannot be read or a value is invalid", **_ERROR},
        "408": {
            "description": "The upload stopped: no byte of it came for TABSERVE_UPLOAD_IDLE_SECONDS",
            **_ERROR,
        },
        "413": {"description": "The upload is over TABSERVE_MAX_UPLOAD_BYTES", **_ERROR},
        "415": {"description": "Not a CSV, Parquet or multipart upload", **_ERROR},
    },
}


async def _answer(request: Request, plane: DataPlane, upload: IO[bytes], chunk_rows: int) -> Response:
    source = _sniff(upload)
    output = _output_format(request, source)
    rows = await asyncio.to_thread(_validate, plane, upload, source, chunk_rows)
    if rows == 0:
        raise BadInputError("the uploaded file has a header but no rows", "empty_file")
    request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
    headers = {
        "X-Model-Name": plane.name,
        "X-Model-Version": plane.version,
        "X-Registered-Version": plane.lineage["registered_version"],
        "X-MLflow-Run-Id": plane.lineage["mlflow_run_id"],
        "X-Data-Digest": plane.lineage["data_digest"],
        "X-Request-Id": request_id,
    }
    # Read here, while the request runs as its caller: the answer streams after the handler returns.
    body = _predictions(plane, upload, source, output, chunk_rows, request_id, current_caller())
    return StreamingResponse(body, media_type=MEDIA_TYPES[output], headers=headers)


# ---- upload ---------------------------------------------------------------------------------------------


async def _receive(request: Request, max_bytes: int, idle_seconds: float) -> IO[bytes]:
    """The uploaded file, spooled to disk beyond a few MB, positioned at its start. The whole upload is read
    before any answer is sent, so a client that stops sending gets a clean 408, never half an answer."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type not in ACCEPTED_UPLOADS:
        raise UnsupportedMediaTypeError(
            f"Content-Type must be text/csv, application/vnd.apache.parquet, application/octet-stream or "
            f"multipart/form-data, got {media_type or 'none'}",
            "unsupported_media_type",
        )
    if media_type == "multipart/form-data":
        return await _receive_form(request, max_bytes, idle_seconds)
    spool = tempfile.SpooledTemporaryFile(max_size=8 << 20)  # noqa: SIM115  (closed by the response)
    size = 0
    async for piece in _arriving(request, idle_seconds):
        size += len(piece)
        if size > max_bytes:
            spool.close()
            raise PayloadTooLargeError(
                f"uploaded file is over the limit of {max_bytes} bytes", "body_too_large"
            )
        spool.write(piece)
    if size == 0:
        spool.close()
        raise BadInputError("the uploaded file is empty", "empty_file")
    spool.seek(0)
    return spool


async def _arriving(request: Request, idle_seconds: float) -> AsyncGenerator[bytes]:
    """The request's body piece by piece as it arrives; RequestTimeoutError when no piece comes within
    `idle_seconds`. A deadline on each piece, not on the whole: a large file may take minutes to arrive,
    and a client that stalls is refused in seconds. (HttpLimits's deadline on a whole body does not apply to
    uploads; without this one a stalled upload met BentoML's request timeout: a 504, the server blamed.)"""
    pieces = aiter(request.stream())
    while True:
        try:
            async with asyncio.timeout(idle_seconds):
                piece = await anext(pieces)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise RequestTimeoutError(
                f"the upload stopped: no byte of it came for {idle_seconds:g} s", "upload_timeout"
            ) from None
        yield piece


async def _receive_form(request: Request, max_bytes: int, idle_seconds: float) -> IO[bytes]:
    # Starlette spools form files to disk but does not bound their size: the declared length does.
    if not request.headers.get("content-length", "").isdigit():
        raise BadInputError("a multipart upload needs a Content-Length header", "no_content_length")
    if int(request.headers["content-length"]) > max_bytes:
        raise PayloadTooLargeError(f"uploaded file is over the limit of {max_bytes} bytes", "body_too_large")
    # Starlette's own parser, fed the body through the same deadline as a bare upload.
    parser = MultiPartParser(request.headers, _arriving(request, idle_seconds), max_files=1, max_fields=8)
    try:
        form = await parser.parse()
    except RequestTimeoutError:
        raise
    except Exception as exc:  # python-multipart reports malformed forms with several exception types
        raise BadInputError(f"malformed multipart form: {exc}", "malformed_form") from None
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise BadInputError("the multipart form has no file in its 'file' field", "missing_file")
    if not upload.size:
        raise BadInputError("the uploaded file is empty", "empty_file")
    upload.file.seek(0)
    return upload.file


def _sniff(upload: IO[bytes]) -> TableFormat:
    magic = upload.read(len(PARQUET_MAGIC))
    upload.seek(0)
    return TableFormat.PARQUET if magic == PARQUET_MAGIC else TableFormat.CSV


def _output_format(request: Request, source: TableFormat) -> TableFormat:
    asked = request.query_params.get("format")
    if asked is not None:
        try:
            return TableFormat(asked.lower())
        except ValueError:
            raise BadInputError(
                f"format '{asked}' is not one of csv, parquet, json", "unknown_output_format"
            ) from None
    for part in request.headers.get("accept", "").split(","):
        media_type = part.split(";")[0].strip().lower()
        if media_type in ACCEPT_ALIASES:
            return ACCEPT_ALIASES[media_type]
    return source


# ---- reading --------------------------------------------------------------------------------------------


def _chunks(
    plane: DataPlane, upload: IO[bytes], source: TableFormat, chunk_rows: int
) -> Iterator[pa.RecordBatch]:
    """The file as record batches of at most `chunk_rows` rows, columns checked against the schema."""
    upload.seek(0)
    try:
        if source is TableFormat.PARQUET:
            parquet = pq.ParquetFile(upload)
            _check_columns(plane, parquet.schema_arrow.names)
            batches: Iterator[pa.RecordBatch] = parquet.iter_batches(batch_size=chunk_rows)
        else:
            types = {feature.name: ARROW_TYPES[feature.kind] for feature in plane.schema.features}
            reader = pa_csv.open_csv(
                upload,
                read_options=pa_csv.ReadOptions(block_size=CSV_BLOCK_BYTES),
                convert_options=pa_csv.ConvertOptions(column_types=types, strings_can_be_null=True),
            )
            _check_columns(plane, reader.schema.names)
            batches = iter(reader)
        for batch in batches:
            for offset in range(0, batch.num_rows, chunk_rows):
                yield batch.slice(offset, chunk_rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as exc:
        raise BadInputError(_arrow_message(source, exc, plane.feature_names), "unreadable_file") from None
    except UnicodeDecodeError:  # pyarrow decodes the CSV header's column names in Python
        raise BadInputError(
            f"could not read the uploaded {source.value.upper()} file: its header is not UTF-8 text "
            "(is it a CSV or Parquet table?)",
            "unreadable_file",
        ) from None


def _check_columns(plane: DataPlane, columns: list[str]) -> None:
    missing = [name for name in plane.feature_names if name not in columns]
    unknown = [name for name in columns if name not in plane.feature_names]
    repeated = sorted({name for name in columns if columns.count(name) > 1})
    if missing or unknown or repeated:
        problems = []
        if repeated:
            problems.append(f"repeated column(s) {', '.join(map(repr, repeated))}")
        if missing:
            problems.append(f"missing column(s) {', '.join(map(repr, missing))}")
        if unknown:
            problems.append(f"unknown column(s) {', '.join(map(repr, unknown))}")
        raise BadInputError(f"the uploaded table has {' and '.join(problems)}", "columns")


def _arrow_message(source: TableFormat, exc: Exception, names: list[str]) -> str:
    message = str(exc).splitlines()[0]
    # pyarrow numbers CSV columns from 0; name the column instead.
    found = re.match(r"In CSV column #(\d+): (.*)", message)
    if found and int(found[1]) < len(names):
        message = f"column '{names[int(found[1])]}': {found[2]}"
    return f"could not read the uploaded {source.value.upper()} file: {message}"


def _frame_columns(batch: pa.RecordBatch, plane: DataPlane) -> dict[str, Any]:
    return {name: batch.column(name).to_numpy(zero_copy_only=False) for name in plane.feature_names}


def _validate(plane: DataPlane, upload: IO[bytes], source: TableFormat, chunk_rows: int) -> int:
    rows = 0
    for batch in _chunks(plane, upload, source, chunk_rows):
        plane.rows_from_columns(_frame_columns(batch, plane), first_row=rows)
        rows += batch.num_rows
    return rows


# ---- writing --------------------------------------------------------------------------------------------


async def _predictions(
    plane: DataPlane,
    upload: IO[bytes],
    source: TableFormat,
    output: TableFormat,
    chunk_rows: int,
    request_id: str,
    caller: str | None,
) -> AsyncIterator[bytes]:
    chunks = _chunks(plane, upload, source, chunk_rows)
    encoder = _Encoder(plane, output)
    try:
        yield encoder.start()
        while (batch := await asyncio.to_thread(next, chunks, None)) is not None:
            rows = plane.rows_from_columns(_frame_columns(batch, plane))
            predictions = await plane.predict_rows(rows, TRANSPORT, ENDPOINT, request_id, caller)
            yield await asyncio.to_thread(encoder.chunk, predictions)
        yield encoder.finish()
    finally:
        upload.close()


class _Buffer:
    """A write-only sink whose bytes are taken after each chunk, so Parquet can be streamed."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> int:
        self.pieces.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def take(self) -> bytes:
        data, self.pieces = b"".join(self.pieces), []
        return data


class _Encoder:
    def __init__(self, plane: DataPlane, output: TableFormat) -> None:
        self.plane = plane
        self.output = output
        self.with_unknown = bool(plane.schema.names_of(FeatureKind.CATEGORICAL))
        self.first = True
        self.sink = _Buffer()
        self.parquet: pq.ParquetWriter | None = None

    def start(self) -> bytes:
        if self.output is TableFormat.JSON:
            return orjson.dumps(self.plane.lineage)[:-1] + b', "predictions": ['
        return b""

    def chunk(self, batch: PredictionBatch) -> bytes:
        if self.output is TableFormat.JSON:
            rows = b",".join(orjson.dumps(answer) for answer in self._json_rows(batch))
            data = rows if self.first else b"," + rows
        elif self.output is TableFormat.CSV:
            table = self._table(batch)
            out = pa.BufferOutputStream()
            pa_csv.write_csv(table, out, pa_csv.WriteOptions(include_header=self.first))
            data = out.getvalue().to_pybytes()
        else:
            table = self._table(batch)
            if self.parquet is None:
                self.parquet = pq.ParquetWriter(self.sink, table.schema)
            self.parquet.write_table(table)
            data = self.sink.take()
        self.first = False
        return data

    def finish(self) -> bytes:
        if self.output is TableFormat.JSON:
            return b"]}"
        if self.parquet is not None:
            self.parquet.close()
        return self.sink.take()

    def _json_rows(self, batch: PredictionBatch) -> Iterator[dict[str, Any]]:
        for answer in self.plane.responses(batch):
            yield {key: answer[key] for key in ("prediction", "probabilities", "unknown_categories")}

    def _table(self, batch: PredictionBatch) -> pa.Table:
        columns: dict[str, Any] = {"prediction": pa.array(batch.labels)}
        if batch.probabilities is not None and batch.classes:
            for index, label in enumerate(batch.classes):
                columns[f"probability_{label}"] = pa.array(batch.probabilities[:, index])
        if self.with_unknown:
            columns["unknown_categories"] = pa.array(
                [orjson.dumps(u).decode() for u in batch.unknown_categories]
            )
        return pa.table(columns)
