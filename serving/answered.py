"""Which requests this service answered, and with how many rows: what `POST /feedback` checks a label against.

One SQLite file beside the prediction log (``answered.sqlite3``), shared by every worker of a server (and by
replicas on a shared volume): a label may reach another worker than the one that answered. Writes happen on a
thread of their own, in one transaction per burst of requests, so a request never waits on the disk; a failing
disk drops the ids, counts them and warns once, as the prediction log does. Ids older than the retention are
pruned now and then: a label that late could not be joined to a rotated-away prediction log anyway.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)
FILE_NAME = "answered.sqlite3"
PRUNE_EVERY_SECONDS = 600
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS answered (request_id TEXT PRIMARY KEY, rows INTEGER, version TEXT, ts REAL)"
)


def _connect(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, timeout=5, check_same_thread=False, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writers of other workers
    connection.execute("PRAGMA synchronous=NORMAL")  # with WAL: no sync per commit, still never corrupt
    connection.execute(_SCHEMA)
    return connection


class AnsweredIndex:
    def __init__(
        self, directory: Path, retention_seconds: float, on_drop: Callable[[int], None] | None = None
    ) -> None:
        self.path = directory / FILE_NAME
        self._retention = retention_seconds
        self._on_drop = on_drop
        self._warned = False
        self._pending: queue.SimpleQueue[tuple[str, int, str, float] | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._writes = _connect(self.path)
            self._reads = _connect(self.path)
        except (OSError, sqlite3.Error) as exc:
            self._warn(f"answered-request index disabled, feedback cannot be checked: {exc}")
            return
        self._writer = threading.Thread(target=self._write_forever, name="tabserve-answered", daemon=True)
        self._writer.start()

    def add(self, request_id: str, rows: int, version: str) -> None:
        if self._writer is None:
            self._drop(1)
            return
        self._pending.put((request_id, rows, version, time.time()))

    def rows_of(self, request_ids: list[str]) -> dict[str, int]:
        """The number of rows each of these requests was answered with; unknown ids are left out."""
        if self._writer is None or not request_ids:
            return {}
        placeholders = ",".join("?" * len(request_ids))
        query = f"SELECT request_id, rows FROM answered WHERE request_id IN ({placeholders})"
        try:
            return dict(self._reads.execute(query, request_ids).fetchall())
        except sqlite3.Error as exc:
            self._warn(f"answered-request index cannot be read: {exc}")
            return {}

    def close(self) -> None:
        """Write what is pending; called at shutdown."""
        if self._writer is not None:
            self._pending.put(None)
            self._writer.join(timeout=10)
            self._writer = None

    def _write_forever(self) -> None:
        pruned = 0.0
        while True:
            burst = [self._pending.get()]
            while True:
                try:
                    burst.append(self._pending.get_nowait())
                except queue.Empty:
                    break
            rows = [entry for entry in burst if entry is not None]
            try:
                with self._writes:  # one transaction: a burst of requests costs one disk sync
                    self._writes.execute("BEGIN")
                    self._writes.executemany("INSERT OR REPLACE INTO answered VALUES (?, ?, ?, ?)", rows)
                    if time.time() - pruned > PRUNE_EVERY_SECONDS:
                        self._writes.execute(
                            "DELETE FROM answered WHERE ts < ?", (time.time() - self._retention,)
                        )
                        pruned = time.time()
            except sqlite3.Error as exc:
                self._drop(len(rows))
                self._warn(f"could not write to the answered-request index {self.path}: {exc}")
            if len(rows) < len(burst):  # close() was called
                return

    def _drop(self, count: int) -> None:
        if self._on_drop is not None:
            self._on_drop(count)

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            logger.warning(message)
