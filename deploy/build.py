"""Build the bento as `make build` does: the locked requirements, then `bentoml build` on bentofile.yaml.

Used by the container smoke test and by tests/test_deploy_bento.py, so both check the bento users get.
The model must already be in the BentoML store of `env` (BENTOML_HOME): `python train.py` puts it there.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BENTOML = str(Path(sys.executable).parent / "bentoml")
REQUIREMENTS = PROJECT_ROOT / "requirements.txt"  # bentofile.yaml: python.requirements_txt


class BuildError(RuntimeError):
    pass


def find_uv() -> str:
    """uv as the Makefile finds it: $UV, then PATH, then the copy `make setup` installs in .tools/."""
    for candidate in (os.environ.get("UV"), shutil.which("uv"), str(PROJECT_ROOT / ".tools" / "bin" / "uv")):
        if candidate and Path(candidate).exists():
            return candidate
    raise BuildError("uv not found: set UV, or run `make setup` (it installs uv into .tools/)")


def _run(command: list[str], env: dict[str, str]) -> str:
    result = subprocess.run(
        command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    if result.returncode != 0:
        raise BuildError(f"{' '.join(command[:3])} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result.stdout


def export_requirements(env: dict[str, str]) -> Path:
    """requirements.txt with the exact versions of uv.lock, without the dev tools (the Makefile's command)."""
    command = [find_uv(), "export", "--frozen", "--no-dev", "--no-hashes", "--no-emit-project", "--no-header"]
    _run([*command, "-o", str(REQUIREMENTS)], env)
    return REQUIREMENTS


def build_bento(env: dict[str, str]) -> str:
    """`bentoml build` in the project; returns the bento tag (name:version)."""
    export_requirements(env)
    output = _run([BENTOML, "build", "--output", "tag"], env)
    match = re.search(r"__tag__:(\S+)", output)
    if match is None:
        raise BuildError(f"no bento tag in the output of bentoml build:\n{output[-2000:]}")
    return match.group(1)


def bento_path(env: dict[str, str], tag: str) -> Path:
    """Where the bento of `tag` lives in the store of `env`."""
    name, version = tag.split(":")
    return Path(env["BENTOML_HOME"]) / "bentos" / name / version
