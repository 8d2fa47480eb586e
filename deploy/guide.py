"""The command blocks of docs/deployment.md, so that what the guide tells users to run is what the smoke test
and the tests run.

Every ```bash / ```console block of the guide follows one marker line, invisible on the page:
    <!-- run: smoke NAME -->              deploy/container/smoke.py runs it (names and ports its own)
    <!-- run: tests/FILE.py NAME -->      that test file runs it
    <!-- run: make smoke -->              the block is the smoke test itself (CI's `make smoke`)
    <!-- not run here: REASON -->         it needs what this machine has not (a cluster, a registry)
tests/test_deploy_guide.py fails on a block without one, and on a name that nothing runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "deployment.md"
COMMAND_LANGUAGES = ("bash", "console", "sh", "shell")
MARKER = re.compile(
    r"^<!-- (?:run: (?P<runner>make smoke|smoke|tests/\S+\.py)(?: (?P<name>[\w-]+))?"
    r"|not run here: (?P<reason>.+?)) -->$"
)
FENCE = re.compile(r"^\s*```(?P<language>\w*)\s*$")


class GuideError(ValueError):
    pass


@dataclass(frozen=True)
class Block:
    language: str
    text: str
    line: int  # of the opening fence, 1-based
    runner: str | None  # "smoke", "make smoke", a test file; None when not run here
    name: str | None
    reason: str | None  # why it is not run here

    @property
    def commands(self) -> list[str]:
        """A console block's commands (its `$ ` lines), or a shell block's text as one command."""
        if self.language != "console":
            return [self.text]
        return [line[2:] for line in self.text.splitlines() if line.startswith("$ ")]

    @property
    def output(self) -> list[str]:
        """A console block's output lines: the lines that are not commands."""
        return [line for line in self.text.splitlines() if not line.startswith("$ ")]


def blocks(path: Path = GUIDE) -> list[Block]:
    """Every command block of the guide, with its marker (GuideError if one has none)."""
    lines = path.read_text().splitlines()
    found: list[Block] = []
    index = 0
    while index < len(lines):
        fence = FENCE.match(lines[index])
        if fence is None:
            index += 1
            continue
        end = next((i for i in range(index + 1, len(lines)) if lines[i].strip() == "```"), None)
        if end is None:
            raise GuideError(f"{path.name}:{index + 1}: a code block that never closes")
        if fence["language"] in COMMAND_LANGUAGES:
            indent = len(lines[index]) - len(lines[index].lstrip())
            marker = MARKER.match(lines[index - 1].strip()) if index else None
            if marker is None:
                raise GuideError(
                    f"{path.name}:{index + 1}: a command block with no `<!-- run: ... -->` or "
                    "`<!-- not run here: ... -->` line above it"
                )
            found.append(
                Block(
                    language=fence["language"],
                    text="\n".join(line[indent:] for line in lines[index + 1 : end]),
                    line=index + 1,
                    runner=marker["runner"],
                    name=marker["name"],
                    reason=marker["reason"],
                )
            )
        index = end + 1
    return found


def block(runner: str, name: str, path: Path = GUIDE) -> Block:
    """The guide's block that `runner` runs under `name`."""
    matching = [found for found in blocks(path) if (found.runner, found.name) == (runner, name)]
    if len(matching) != 1:
        raise GuideError(f"{path.name} has {len(matching)} blocks marked `<!-- run: {runner} {name} -->`")
    return matching[0]
