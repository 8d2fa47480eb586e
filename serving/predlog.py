"""Logs of JSON lines: the feedback log, one line per label sent back for an answered row, and the shadow
challenger's log (serving/shadow.py). The prediction log was one too before it became Arrow batches
(serving/arrowlog.py); its readers still read the files that earlier versions wrote (line format below).

Files: ``<log dir>/<stem>-<host>-<pid>.jsonl`` (stem ``feedback`` or ``shadow``), rotated by size
(``.1``, ``.2``, ... up to the backup count). One file per worker process, so that rotation never races
between processes; the host name keeps the files of replicas apart on a shared volume (in containers, every
replica's worker has the same pid).
Writing happens on a background thread (QueueHandler -> QueueListener), so a slow disk never blocks a
request, and a failing disk never fails one: the record is dropped, counted, and a warning is logged once.

A prediction line as earlier versions wrote them (keys in this order; ``row`` is the row's index within
its request, from 0):
    {"ts": "2026-11-23T10:00:00.123456+00:00", "request_id": "...", "row": 0, "transport": "http",
     "endpoint": "/predict", "features": {"mean radius": 13.5, ...}, "prediction": "benign",
     "probabilities": {"benign": 0.99, "malignant": 0.01}, "unknown_categories": {},
     "model": "breast_cancer", "version": "nxn7...", "registered_version": "1", "mlflow_run_id": "...",
     "data_digest": "84ef6c2c"}

A feedback line: ``{"ts": ..., "request_id": "...", "row": 0, "label": "malignant"}`` (classification: the
class label as a string) or ``..., "value": 12.5}`` (regression). A later line for the same request and row
replaces an earlier one.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import queue
import socket
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)
MAX_BURST_CHARS = 2**20


class _CountingFileHandler(logging.handlers.RotatingFileHandler):
    """Counts failed writes instead of printing a traceback per record."""

    def __init__(self, path: Path, max_bytes: int, backups: int, on_drop: Callable[[int], None]) -> None:
        super().__init__(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8", delay=True)
        self.on_drop = on_drop

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802  (logging.Handler API)
        self.on_drop(record.getMessage().count("\n") + 1)  # one record holds one request's lines

    def emit(self, record: logging.LogRecord) -> None:
        self._reopen_if_removed()
        super().emit(record)

    def _reopen_if_removed(self) -> None:
        """A file removed while open (or its whole directory) takes every later write without an error and
        keeps none of it: start the file again where it belongs. One stat per burst of requests."""
        if self.stream is None:
            Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
            return
        opened = os.fstat(self.stream.fileno())
        try:
            current = Path(self.baseFilename).stat()
            if (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino):
                return
        except FileNotFoundError:
            pass
        logger.warning("the log %s was removed while open; writing a new one", self.baseFilename)
        self.stream.close()
        self.stream = None  # reopened at the next write, as with delay=True
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)


class _DrainingListener(logging.handlers.QueueListener):
    """Hands the file handler everything queued at once: one size check, write and flush per burst of
    requests rather than per request (the per-record cost was a tenth of a busy worker). A burst stays
    a small part of a file, so that files still rotate near their size limit."""

    def __init__(
        self, records: queue.SimpleQueue[logging.LogRecord | None], handler: _CountingFileHandler
    ) -> None:
        super().__init__(records, handler)
        self._records = records
        self._burst_chars = min(MAX_BURST_CHARS, handler.maxBytes // 16)

    def dequeue(self, block: bool) -> logging.LogRecord:
        record = self._records.get(block)
        if record is None:  # stop() was called: QueueListener's sentinel, passed on to end its thread
            return record  # type: ignore[return-value]
        messages = [record.getMessage()]
        size = len(messages[0])
        while size < self._burst_chars:
            try:
                queued = self._records.get_nowait()
            except queue.Empty:
                break
            if queued is None:
                self._records.put_nowait(queued)  # stop once this burst is written
                break
            messages.append(queued.getMessage())
            size += len(messages[-1])
        record.msg, record.args = "\n".join(messages), None
        return record


class CountedDrops:
    """A log that never fails its caller: what it cannot write is dropped, counted, and warned about once."""

    def __init__(
        self, directory: Path, stem: str, suffix: str, on_drop: Callable[[int], None] | None
    ) -> None:
        # One file per worker process, the host name keeping the files of replicas apart on a shared volume.
        self.path = directory / f"{stem}-{socket.gethostname()}-{os.getpid()}{suffix}"
        self.dropped = 0
        self._on_drop_metric = on_drop
        self._warned = False
        self._writable = self._make_directory(directory, stem)

    def _make_directory(self, directory: Path, stem: str) -> bool:
        """The log's folder, made where missing; False, with the one warning, where nothing can be written."""
        try:
            directory.mkdir(parents=True, exist_ok=True)
            if not os.access(directory, os.W_OK):
                raise PermissionError(f"no write permission on {directory}")
        except OSError as exc:
            self._warn(f"{stem} log disabled, records will be dropped and counted: {exc}")
            return False
        return True

    def _drop(self, count: int) -> None:
        self.dropped += count
        if self._on_drop_metric is not None:
            self._on_drop_metric(count)
        self._warn(f"could not write to the log {self.path}; dropped records are counted")

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            logger.warning(message)


class JsonLinesLog(CountedDrops):
    def __init__(
        self,
        directory: Path,
        max_bytes: int,
        backups: int,
        on_drop: Callable[[int], None] | None = None,
        stem: str = "feedback",
    ) -> None:
        super().__init__(directory, stem, ".jsonl", on_drop)
        self._listener: _DrainingListener | None = None
        self._logger = logging.getLogger(f"tabserve.{stem}.{id(self)}")
        self._logger.propagate = False
        self._logger.setLevel(logging.INFO)
        if not self._writable:
            return
        handler = _CountingFileHandler(self.path, max_bytes, backups, self._drop)
        records: queue.SimpleQueue[logging.LogRecord | None] = queue.SimpleQueue()
        self._logger.addHandler(logging.handlers.QueueHandler(records))
        self._listener = _DrainingListener(records, handler)
        self._listener.start()

    @property
    def enabled(self) -> bool:
        return self._listener is not None

    def write(self, lines: list[bytes]) -> None:
        """The JSON lines of one request (without line ends)."""
        if self._listener is None:
            self._drop(len(lines))
            return
        # One log record per request, not per row: a file of 100k rows would otherwise pay the logging
        # machinery (record, queue, format, flush) 100k times.
        self._logger.info(b"\n".join(lines).decode())

    def close(self) -> None:
        """Flush what is queued; called at shutdown."""
        if self._listener is not None:
            self._listener.stop()
            self._listener = None
