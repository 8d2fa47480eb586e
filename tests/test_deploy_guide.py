"""docs/deployment.md's commands are run, not only written: every ```bash / ```console block says, in the
marker line above it, which of the smoke test or the tests runs it, or why it cannot run here
(deploy/guide.py). This checks that the markers are there and that each runner really takes its blocks from
the guide; the runs themselves are the smoke test's (`make smoke`, in CI) and the tests'."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from deploy import guide
from deploy.container import smoke
from tests.conftest import PROJECT_ROOT


def test_every_command_block_says_who_runs_it_or_why_not() -> None:
    blocks = guide.blocks()
    assert len(blocks) >= 10
    for block in blocks:
        assert block.runner or block.reason, f"deployment.md:{block.line}"
        assert not (block.runner and block.reason), f"deployment.md:{block.line}"
    # What the issue asks to run here is run: building, running, calling and stopping the image, the jobs'
    # commands, the hardened run, the kustomize rendering.
    run = {(block.runner, block.name) for block in blocks if block.runner}
    assert {("smoke", "build"), ("smoke", "run"), ("smoke", "hardened"), ("smoke", "jobs")} <= run
    assert ("tests/test_deploy_k8s.py", "render") in run


def test_a_block_without_a_marker_is_an_error(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# A page\n\n<!-- run: smoke first -->\n```bash\ntrue\n```\n\nText.\n\n```bash\nfalse\n```\n"
    )
    with pytest.raises(guide.GuideError, match=r"page\.md:10: a command block with no"):
        guide.blocks(page)
    page.write_text(
        "```yaml\nnot: a command\n```\n<!-- not run here: a reason -->\n```console\n$ true\n```\n"
    )
    [block] = guide.blocks(page)
    assert (block.reason, block.commands) == ("a reason", ["true"])


def test_the_smoke_test_runs_the_blocks_marked_for_it() -> None:
    marked = {block.name for block in guide.blocks() if block.runner == "smoke"}
    assert marked == {"build", *smoke.GUIDE_RUN_BLOCKS}
    assert 'guide.block("smoke", "build")' in Path(smoke.__file__).read_text()


@pytest.mark.parametrize(
    "block", [block for block in guide.blocks() if block.runner and block.runner.startswith("tests/")],
    ids=lambda block: f"{block.runner}:{block.name}",
)  # fmt: skip
def test_a_block_marked_for_a_test_is_taken_from_the_guide_by_that_test(block: guide.Block) -> None:
    source = (PROJECT_ROOT / block.runner).read_text()
    assert f'guide.block("{block.runner}", "{block.name}")' in source


def test_the_smoke_block_is_what_make_smoke_and_ci_run() -> None:
    [block] = [block for block in guide.blocks() if block.runner == "make smoke"]
    [command] = block.commands
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    python = re.search(r"^PY := (\S+)$", makefile, re.MULTILINE)
    recipe = re.search(r"^smoke: .*\n\t(.+)$", makefile, re.MULTILINE)
    assert python
    assert recipe
    assert command.split("#")[0].strip() == recipe.group(1).replace("$(PY)", python.group(1))
    assert re.search(r"^make smoke$", (PROJECT_ROOT / ".ci" / "run").read_text(), re.MULTILINE)


def test_the_guide_names_the_kserve_release_whose_crd_the_tests_use() -> None:
    release = (PROJECT_ROOT / "deploy" / "kserve" / "crd" / "VERSION").read_text().strip()
    assert f"KServe {release}" in guide.GUIDE.read_text()
