"""Build the bento as BentoML's users do: `bentoml build` at a project's root, on its bentofile.yaml.

Used by the container smoke test and by tests/test_deploy_bento.py, so both check the bento users get.
The requirements are the committed requirements.txt (uv.lock's export: `make requirements.txt`). The model
must already be in the BentoML store of `env` (BENTOML_HOME): `python train.py` puts it there.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BENTOML = str(Path(sys.executable).parent / "bentoml")


class BuildError(RuntimeError):
    pass


def build_bento(env: dict[str, str], project: Path = PROJECT_ROOT) -> str:
    """`bentoml build` at the root of `project` (this one, or a clone of it); returns the bento tag."""
    result = subprocess.run(
        [BENTOML, "build", "--output", "tag"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if result.returncode != 0:
        raise BuildError(f"bentoml build failed ({result.returncode}):\n{result.stderr[-4000:]}")
    match = re.search(r"__tag__:(\S+)", result.stdout)
    if match is None:
        raise BuildError(f"no bento tag in the output of bentoml build:\n{result.stdout[-2000:]}")
    return match.group(1)


def bento_path(env: dict[str, str], tag: str) -> Path:
    """Where the bento of `tag` lives in the store of `env`."""
    name, version = tag.split(":")
    return Path(env["BENTOML_HOME"]) / "bentos" / name / version
