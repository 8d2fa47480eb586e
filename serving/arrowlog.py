"""The prediction log: the answered rows (the live data that drift and performance reports read) as Arrow
record batches, in one Arrow IPC stream file per worker process.

Files: ``<log dir>/predictions-<host>-<pid>.arrows``, rotated by size (``.1``, ``.2``, ... up to the backup
count), one per worker so that rotation never races between processes; the host name keeps the files of
replicas apart on a shared volume.

Why columns and not JSON lines: a 1,000-row request's JSON lines cost 8-14 ms to build, a third to half of
the server's CPU for that request. Here the request path only queues what it already holds (the validated
rows and the answer); a background thread turns every request waiting into one record batch (a few numpy
and Arrow calls per column, not per row) and adds it to the file whole, so a slow disk never blocks a request
and a reader only ever sees whole batches. A failing disk never fails a request: its rows are dropped,
counted and warned about once. The drift and performance readers (drift/logs.py) take the columns directly,
and still read the JSON-lines files that earlier versions wrote.

Why the IPC *stream* format: it has no footer, so a file cut short keeps every batch before the cut. A
write that fails part way (a full disk) is cut back to the last whole batch, and the next batch starts a new
file; only a crash in the middle of a write can leave half a batch, which readers skip and count. A file
holds one schema, the served version's features and classes; a version with other features or classes
starts a new file.

Columns, one row per answered row:
    ts                  timestamp[us, UTC]  when the request was answered
    request_id          string              the request's id (client-chosen or made)
    row                 int32               the row's index within its request, from 0
    transport, endpoint string
    caller              string              the name of the API key the request came with (serving/auth.py);
                                            null with auth off, absent from files written before it
    features            struct              a field per feature, in schema order: float64, bool or
                                            string; null where missing (from_pandas: NaN -> null)
    prediction          string | float64    the class label, or the predicted value (regression)
    probabilities       struct of float64   a field per class (classification only)
    unknown_categories  map<string, string> feature -> a value never seen in training
    model, version, registered_version, mlflow_run_id, data_digest   string: the lineage

Read it with `python -m drift show-log` (JSON lines) or pyarrow
(``pyarrow.ipc.open_stream(path).read_pandas()``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from models.schema import Feature, FeatureKind
from serving import tracing
from serving.predlog import CountedDrops

logger = logging.getLogger(__name__)
SUFFIX = ".arrows"  # Arrow's registered extension for the IPC stream format
# A burst of queued requests is written as one record batch of at most about this many rows: large enough
# to make a batch's fixed cost small, small enough that files still rotate near their size limit.
MAX_BATCH_ROWS = 65_536
LINEAGE_KEYS = ("model", "version", "registered_version", "mlflow_run_id", "data_digest")
_FEATURE_TYPES = {FeatureKind.NUMERIC: pa.float64(), FeatureKind.BOOLEAN: pa.bool_()}
_LABELS = pa.dictionary(pa.int32(), pa.string())  # a few distinct strings repeated on every row
_UNKNOWN = pa.map_(pa.string(), pa.string())
_TS = pa.timestamp("us", tz="UTC")


class LogColumns:
    """How one served version's answered rows become columns: built once per data plane."""

    def __init__(
        self, features: Sequence[Feature], classes: Sequence[Any] | None, lineage: dict[str, str]
    ) -> None:
        """`classes`: the model's class labels as it predicts them (a label's column holds its string)."""
        self.features = list(features)
        self.classes = [str(label) for label in classes] if classes is not None else None
        self._class_index = {label: index for index, label in enumerate(classes or [])}
        self._lineage = [pa.array([lineage[key]], pa.string()) for key in LINEAGE_KEYS]
        self._class_names = pa.array(self.classes or [], pa.string())
        fields = [
            pa.field("ts", _TS),
            pa.field("request_id", pa.string()),
            pa.field("row", pa.int32()),
            pa.field("transport", _LABELS),
            pa.field("endpoint", _LABELS),
            pa.field("caller", _LABELS),
            pa.field("features", pa.struct([(f.name, _feature_type(f)) for f in features])),
            pa.field("prediction", pa.string() if self.classes is not None else pa.float64()),
        ]
        if self.classes is not None:
            fields.append(
                pa.field("probabilities", pa.struct([(label, pa.float64()) for label in self.classes]))
            )
        fields.append(pa.field("unknown_categories", _UNKNOWN))
        fields += [pa.field(key, _LABELS) for key in LINEAGE_KEYS]
        self.schema = pa.schema(fields)
        self._feature_fields = list(self.schema.field("features").type)

    def batch(self, requests: Sequence[AnsweredRequest]) -> pa.RecordBatch:
        """One record batch of every row of `requests` (all answered by this version). Its cost is a few
        numpy and Arrow calls per column, whatever the rows: per row, only the unknown categories are
        looked at in Python."""
        sizes = np.array([len(request.labels) for request in requests])
        total = int(sizes.sum())
        rows = requests[0].rows if len(requests) == 1 else np.concatenate([r.rows for r in requests])
        columns: list[pa.Array] = [
            pa.array(np.repeat(np.array([r.answered_at_us for r in requests], dtype=np.int64), sizes), _TS),
            pa.array(np.repeat(np.array([r.request_id for r in requests], dtype=object), sizes), pa.string()),
            pa.array(np.concatenate([np.arange(size, dtype=np.int32) for size in sizes])),
            _repeated([r.transport for r in requests], sizes),
            _repeated([r.endpoint for r in requests], sizes),
            _repeated([r.caller for r in requests], sizes),
            pa.StructArray.from_arrays(self._feature_columns(rows), fields=self._feature_fields),
        ]
        if self.classes is not None:
            probabilities = np.concatenate([r.probabilities for r in requests if r.probabilities is not None])
            labels = (label for request in requests for label in request.labels)
            codes = np.fromiter(map(self._class_index.__getitem__, labels), dtype=np.int32, count=total)
            columns.append(pa.DictionaryArray.from_arrays(codes, self._class_names).cast(pa.string()))
            columns.append(
                pa.StructArray.from_arrays(
                    [pa.array(column) for column in np.ascontiguousarray(probabilities.T)], names=self.classes
                )
            )
        else:
            columns.append(pa.array(np.asarray([v for r in requests for v in r.labels], dtype=np.float64)))
        columns.append(_unknown_categories([found for r in requests for found in r.unknown_categories]))
        zeros = pa.array(np.zeros(total, dtype=np.int32))
        columns += [pa.DictionaryArray.from_arrays(zeros, value) for value in self._lineage]
        return pa.RecordBatch.from_arrays(columns, schema=self.schema)

    def _feature_columns(self, rows: np.ndarray) -> list[pa.Array]:
        if rows.dtype == np.float64:  # all numeric: one transposing copy, then each column as it is
            return [pa.array(column, from_pandas=True) for column in np.ascontiguousarray(rows.T)]
        return [_feature_column(rows[:, index], feature) for index, feature in enumerate(self.features)]


@dataclass(frozen=True)
class AnsweredRequest:
    """What the request path hands the log: the rows as validated, and the answer."""

    columns: LogColumns
    answered_at_us: int  # microseconds since the epoch (UTC)
    request_id: str
    transport: str
    endpoint: str
    rows: np.ndarray  # (rows, features) in schema order: float64, or object with booleans and text
    labels: list[Any]
    probabilities: np.ndarray | None
    unknown_categories: list[dict[str, str]]
    caller: str | None = None  # the API key's name; None with auth off
    trace: tracing.Answered | None = None  # the request's span, when traced


def _feature_type(feature: Feature) -> pa.DataType:
    return _FEATURE_TYPES.get(feature.kind, pa.string())


def _feature_column(values: np.ndarray, feature: Feature) -> pa.Array:
    if feature.kind is FeatureKind.NUMERIC:
        return pa.array(np.asarray(values, dtype=np.float64), from_pandas=True)
    return pa.array(values, _feature_type(feature), from_pandas=True)


def _repeated(values: Sequence[str | None], sizes: np.ndarray) -> pa.DictionaryArray:
    """Each value repeated as many times as its request has rows, each distinct value stored once; None is
    null."""
    names = [name for name in dict.fromkeys(values) if name is not None]
    codes = np.repeat(np.array([-1 if v is None else names.index(v) for v in values], dtype=np.int32), sizes)
    indices = pa.array(codes, mask=codes < 0) if None in values else pa.array(codes)
    return pa.DictionaryArray.from_arrays(indices, pa.array(names, pa.string()))


def _unknown_categories(per_row: list[dict[str, str]]) -> pa.MapArray:
    """Nearly every row has none: only the rows that have some are looked at one by one."""
    counts = np.fromiter(map(len, per_row), dtype=np.int32, count=len(per_row))
    offsets = np.zeros(len(per_row) + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    found = [item for row in np.flatnonzero(counts).tolist() for item in per_row[row].items()]
    return pa.MapArray.from_arrays(
        pa.array(offsets),
        pa.array([k for k, _ in found], pa.string()),
        pa.array([v for _, v in found], pa.string()),
    )


class ArrowLog(CountedDrops):
    def __init__(
        self,
        directory: Path,
        max_bytes: int,
        backups: int,
        on_drop: Callable[[int], None] | None = None,
        stem: str = "predictions",
    ) -> None:
        super().__init__(directory, stem, SUFFIX, on_drop)
        self._max_bytes, self._backups = max_bytes, backups
        self._fd: int | None = None  # the live file, written with os.write (see _append)
        self._size = 0  # bytes in it: whole batches
        self._pending = _Pending()
        self._writer: pa.ipc.RecordBatchStreamWriter | None = None
        self._schema: pa.Schema | None = None
        self._queue: queue.SimpleQueue[AnsweredRequest | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        if not self._writable:
            return
        self._thread = threading.Thread(target=self._run, name=f"tabserve-{stem}-log", daemon=True)
        self._thread.start()

    @property
    def enabled(self) -> bool:
        return self._thread is not None

    def write(self, request: AnsweredRequest) -> None:
        """Queue one answered request; written with the others waiting, on the log's thread."""
        if self._thread is None:
            self._drop(len(request.labels))
            return
        self._queue.put(request)

    def close(self) -> None:
        """Write what is queued and end the file; called at shutdown."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    # ---- the writer thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            burst, rows = [first], len(first.labels)
            while rows < MAX_BATCH_ROWS:
                try:
                    queued = self._queue.get_nowait()
                except queue.Empty:
                    break
                if queued is None:
                    stopping = True  # after this burst is written
                    break
                burst.append(queued)
                rows += len(queued.labels)
            self._write_burst(burst)
        self._close_file()

    def _write_burst(self, burst: list[AnsweredRequest]) -> None:
        """One record batch per run of requests answered by the same version (a swap changes the version)."""
        start = 0
        for end in range(1, len(burst) + 1):
            if end == len(burst) or burst[end].columns is not burst[start].columns:
                self._write_batch(burst[start:end])
                start = end

    def _write_batch(self, requests: list[AnsweredRequest]) -> None:
        rows = sum(len(request.labels) for request in requests)
        with tracing.log_write((request.trace for request in requests), rows):
            self._write_rows(requests, rows)

    def _write_rows(self, requests: list[AnsweredRequest], rows: int) -> None:
        try:
            batch = requests[0].columns.batch(requests)
        except (KeyError, ValueError, TypeError, pa.ArrowException) as exc:  # never expected; not fatal
            logger.error("could not turn %d answered rows into log columns: %s", rows, exc)
            self._drop(rows)
            return
        try:
            self._writer_for(batch.schema).write_batch(batch)
            self._append(self._pending.take())
        except (OSError, pa.ArrowException) as exc:  # a disk full or gone; the thread goes on
            logger.debug("prediction log write failed: %s", exc)
            self._drop(rows)
            self._abandon_file()  # whole batches only: the next one starts a new file

    def _writer_for(self, schema: pa.Schema) -> pa.ipc.RecordBatchStreamWriter:
        if self._writer is not None and (
            schema != self._schema or self._size >= self._max_bytes or self._file_was_removed()
        ):
            self._close_file()  # the next file is started below, the full one rotated away
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists() and self.path.stat().st_size > 0:
                self._rotate()  # a stream is never continued: an earlier process's file, or another schema's
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._size = 0
            self._pending = _Pending()
            self._writer = pa.ipc.new_stream(self._pending, schema)
            self._schema = schema
        return self._writer

    def _append(self, data: bytes) -> None:
        """Add a batch's messages to the file whole, or nothing of them: a write that fails part way (a full
        disk) is cut back off, so that a reader never meets half a batch."""
        assert self._fd is not None
        view, written = memoryview(data), 0
        try:
            while written < len(view):
                written += os.write(self._fd, view[written:])
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            raise
        self._size += written

    def _file_was_removed(self) -> bool:
        """A file removed while open (or its whole directory) takes every later write and keeps none of it.
        One stat per batch."""
        assert self._fd is not None
        opened = os.fstat(self._fd)
        try:
            current = self.path.stat()
        except FileNotFoundError:
            current = None
        if current is not None and (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino):
            return False
        logger.warning("the log %s was removed while open; writing a new one", self.path)
        return True

    def _rotate(self) -> None:
        """predictions.arrows -> .1 -> .2 ...; the oldest beyond the backup count is removed."""
        if self._backups == 0:
            self.path.unlink(missing_ok=True)
            return
        for number in range(self._backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{number}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{number + 1}"))
        self.path.replace(self.path.with_name(f"{self.path.name}.1"))

    def _close_file(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(OSError, pa.ArrowException):
                self._writer.close()  # the end-of-stream marker, when the disk takes it
                self._append(self._pending.take())
        self._abandon_file()

    def _abandon_file(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd, self._writer, self._schema = None, None, None


class _Pending:
    """Where the Arrow stream writer writes: its bytes are held here until `ArrowLog._append` adds a whole
    batch's worth to the file."""

    closed = False

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._position = 0

    def write(self, data: Any) -> int:
        self._parts.append(bytes(data))
        self._position += len(self._parts[-1])
        return len(self._parts[-1])

    def tell(self) -> int:
        return self._position

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data
