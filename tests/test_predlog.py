"""The prediction log alone: rotation, and failing disks that must never fail a prediction."""

import json
import shutil
import time
from pathlib import Path

import orjson

from serving.predlog import JsonLinesLog


def test_records_are_json_lines_and_rotate(tmp_path: Path) -> None:
    log = JsonLinesLog(tmp_path, max_bytes=2_000, backups=3)
    for request in range(100):  # five rows a request; files rotate between requests
        log.write(
            [
                orjson.dumps({"row": i, "features": {"x": float(i)}})
                for i in range(request * 5, request * 5 + 5)
            ]
        )
    log.close()
    files = sorted(tmp_path.glob("predictions-*.jsonl*"))
    assert len(files) == 4  # the live file and three backups
    rows = sorted(json.loads(line)["row"] for path in files for line in path.read_text().splitlines())
    assert rows[-1] == 499
    assert rows[0] > 0  # the oldest rows were rotated away
    assert rows == list(range(rows[0], 500))  # and nothing in between was lost
    assert log.dropped == 0


def test_unwritable_directory_drops_and_counts_without_raising(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    counted: list[int] = []
    log = JsonLinesLog(blocker / "logs", max_bytes=10_000, backups=1, on_drop=counted.append)
    assert not log.enabled
    log.write([b'{"row": 1}', b'{"row": 2}'])
    assert log.dropped == 2
    assert sum(counted) == 2


def test_a_write_that_fails_later_is_counted_not_raised(tmp_path: Path) -> None:
    log = JsonLinesLog(tmp_path, max_bytes=500, backups=2)
    # Rotation renames the live file to .1; a non-empty directory there makes every rotation fail.
    backup = tmp_path / f"{log.path.name}.1"
    backup.mkdir()
    (backup / "keep").write_text("x")
    for i in range(20):
        log.write([orjson.dumps({"row": i, "padding": "x" * 100})])
    log.close()
    assert log.dropped > 0
    assert log.dropped < 20  # the rows before the first rotation were written


def test_a_log_directory_removed_while_serving_is_made_again_and_loses_no_later_row(tmp_path: Path) -> None:
    directory = tmp_path / "predictions"
    log = JsonLinesLog(directory, max_bytes=1_000_000, backups=2)
    log.write([orjson.dumps({"row": 0})])
    log.close()  # flushes: the first row is on disk
    assert log.path.exists()
    log = JsonLinesLog(directory, max_bytes=1_000_000, backups=2)
    log.write([orjson.dumps({"row": 1})])
    deadline = time.monotonic() + 10
    while log.path.read_text().count("\n") < 2 and time.monotonic() < deadline:
        time.sleep(0.01)  # the writer thread has opened the file and written row 1
    shutil.rmtree(directory)
    for row in range(2, 302):
        log.write([orjson.dumps({"row": row})])
    log.close()
    rows = [json.loads(line)["row"] for line in log.path.read_text().splitlines()]
    assert rows == list(range(2, 302))
    assert log.dropped == 0
